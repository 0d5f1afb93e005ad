"""Block-size sweep of the three decoder-layer kernels (``ln_qkv``, ``ln_fc_gelu``,
``linear_residual``) at GPT-2 124M's shapes, to choose ``_decode_linear.blocks()`` from data.

The H200 run of 2026-11-30 found these kernels slower than the eager layer they replace: at one
decode token, ``ln_qkv`` took 10.3 us and ``ln_fc_gelu`` 10.1 us for 3.5 and 4.7 MB of fp16
weights (340-470 GB/s of the chip's ~4.8 TB/s), where cuBLAS' GEMV takes 4.4-4.9 us and a
LayerNorm 3.3 us. Each configuration below is checked against the fp32 reference, then timed
as ``benchmarks/conftest.py`` times every kernel (one call captured in a CUDA graph, L2
flushed before each sample, the median device time), against the default ``blocks()`` and the
eager ops (LayerNorm + addmm [+ GELU], or addmm + add).

    python benchmarks/sweep_decode_layer.py --json sweep.json [--rows 1,32] [--ops ln_qkv,...]
    (20 tensor-core configurations per LayerNorm op and row count and 60 for linear_residual, plus
    up to 12 / 36 GEMV ones at 1-4 rows: minutes of compiles on one core; one process per op,
    run side by side, divides that by three)
    python benchmarks/sweep_decode_layer.py --dry-run   # every configuration once, tiny shapes,
                                                        # in Triton's interpreter (no GPU needed)

The table ends with the best configuration per (op, rows) and its gain over the default.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

OPS = ("ln_qkv", "ln_fc_gelu", "linear_residual")
WIDTH, HEADS, CONTEXT = 768, 12, 1024  # GPT-2 124M


def grid(op: str, dry_run: bool, rows: int) -> list[dict]:
    """The configurations to try (``blocks()``'s keys; BLOCK_M comes from the defaults): tensor-core
    tiles, and for 1-4 rows the GEMV path (``DOT=False``: no padding to 16 rows, thinner tiles)."""
    splits = (1, 4, 8) if op == "linear_residual" else (1,)
    gemv_m = 1 << (rows - 1).bit_length()
    if dry_run:
        out = [dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=s, num_warps=4, num_stages=2, DOT=True) for s in splits[:2]]
        return out + ([dict(BLOCK_M=gemv_m, BLOCK_N=8, BLOCK_K=32, SPLIT_K=splits[-1], num_warps=4, num_stages=2,
                            DOT=False)] if rows <= 4 else [])
    out = []
    for n, k, w, st, s in itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (2, 4), splits):
        if (n == 64 and k == 256) or (w == 8 and n < 64):  # too much shared memory; 8 warps on a thin tile
            continue
        out.append(dict(BLOCK_N=n, BLOCK_K=k, SPLIT_K=s, num_warps=w, num_stages=st, DOT=True))
    if rows <= 4:
        for n, k, st, s in itertools.product((8, 16, 32), (128, 256, 512), (2, 3), splits):
            if n * k * gemv_m <= 8192:  # the product tile in fp32 registers: 64 per thread at 4 warps
                out.append(dict(BLOCK_M=gemv_m, BLOCK_N=n, BLOCK_K=k, SPLIT_K=s, num_warps=4, num_stages=st, DOT=False))
    return out


def _inputs(op: str, M: int, dtype, device, torch):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    D = WIDTH
    if op == "ln_qkv":
        Dh = D // HEADS
        S = CONTEXT
        k_cache = torch.zeros(1, HEADS, S, Dh, dtype=dtype, device=device)
        slots = torch.arange(S - M, S, device=device)
        args = (rnd(1, M, D), 1 + rnd(D, scale=0.1), rnd(D, scale=0.1), rnd(3 * D, D, scale=0.02), rnd(3 * D, scale=0.02),
                k_cache, k_cache.clone(), slots)
        return args, dict(eps=1e-5)
    if op == "ln_fc_gelu":
        return (rnd(1, M, D), 1 + rnd(D, scale=0.1), rnd(D, scale=0.1), rnd(4 * D, D, scale=0.02),
                rnd(4 * D, scale=0.02)), dict(eps=1e-5)
    K = 4 * D  # the MLP's down projection; the attention's (K = D) is the smaller of the two
    return (rnd(1, M, K), rnd(D, K, scale=0.02), rnd(D, scale=0.02), rnd(1, M, D)), {}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--rows", default="1,32", help="decode rows M = B * T to sweep (comma-separated)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes in Triton's interpreter, no timing")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import device_us  # the kernel benchmarks' timing

    importlib.import_module("mtpkern.ops._decode_linear")  # the Triton kernels the layer ops use
    ops = [o.strip() for o in args.ops.split(",")]
    for op in ops:
        if op not in OPS:
            raise SystemExit(f"--ops: {op!r} is not one of {', '.join(OPS)}")
    rows = [int(r) for r in args.rows.split(",")]
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --dry-run to check the script on a CPU")
    dtype = torch.float32 if args.dry_run else torch.float16
    global WIDTH, HEADS, CONTEXT
    if args.dry_run:
        WIDTH, HEADS, CONTEXT = 64, 2, 64
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)", "results": []}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    for op in ops:
        mod = importlib.import_module(f"mtpkern.ops.{op}")
        ref_fn = getattr(mod, f"{op}_ref")
        fn = getattr(mod, op)
        default_blocks = mod.blocks
        for M in rows:
            pos, kw = _inputs(op, M, dtype, device, torch)
            ref = ref_fn(*pos, **kw)
            base = default_blocks(M, pos[3].shape[0] if op != "linear_residual" else pos[1].shape[0],
                                  WIDTH if op != "linear_residual" else 4 * WIDTH, dtype, split_k=op == "linear_residual")
            candidates = [("default", None)] + [(json.dumps(c, sort_keys=True), c) for c in grid(op, args.dry_run, M)]
            for name, cfg in candidates:
                row = {"op": op, "rows": M, "config": name if cfg is None else cfg}
                try:
                    if cfg is not None:
                        full = {**base, **cfg}
                        mod.blocks = lambda *a, _c=full, **k: dict(_c)
                    call = lambda: fn(*pos, **kw, backend="triton")  # noqa: E731
                    out = call()
                    err = float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))
                    row["rel_err"] = err
                    if not err < (1e-5 if dtype == torch.float32 else 1e-2):
                        row["error"] = f"wrong result: relative error {err:.3g}"
                    elif not args.dry_run:
                        row["device_us"] = round(device_us(call)[0], 2)
                except Exception as e:  # noqa: BLE001 - a configuration that fails is reported, the sweep goes on
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                finally:
                    mod.blocks = default_blocks
                report["results"].append(row)
                print(json.dumps(row), flush=True)
                save()
            if not args.dry_run:  # eager, for scale
                eager = lambda: fn(*pos, **kw, backend="eager")  # noqa: E731
                report["results"].append({"op": op, "rows": M, "config": "eager (fp32 reference ops)",
                                          "device_us": round(device_us(eager)[0], 2)})
                save()
    _table(report)
    return report


def _table(report: dict) -> None:
    print(f"\n{report['device']}: best configuration per op and row count (device us)")
    keys = sorted({(r["op"], r["rows"]) for r in report["results"]})
    for op, M in keys:
        rs = [r for r in report["results"] if r["op"] == op and r["rows"] == M and "device_us" in r]
        default = next((r for r in rs if r["config"] == "default"), None)
        tried = [r for r in rs if isinstance(r["config"], dict)]
        bad = sum(1 for r in report["results"] if r["op"] == op and r["rows"] == M and "error" in r)
        if not tried or default is None:
            print(f"  {op} M={M}: nothing timed ({bad} configurations failed)")
            continue
        best = min(tried, key=lambda r: r["device_us"])
        print(f"  {op} M={M}: default {default['device_us']} us, best {best['device_us']} us "
              f"({default['device_us'] / best['device_us']:.2f}x) with {best['config']}; {bad} failed")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"{time.perf_counter() - t0:.0f} s")
