"""The fused decode step against the eager step, both in CUDA graphs, and ``torch.compile``.

GPT-2 124M shape, random weights, batch 1, a prefix of ``--prefix`` cached tokens: one forward
pass over T = 1, 16 and 64 tokens (the decoder's forward pass, ``Decoder(model, "ntp", kernels=...)``,
no LM head), as

- ``eager+graph``: today's per-op layer (dense-mask SDPA) replayed from a CUDA graph;
- ``compile+graph``: the same step compiled by Inductor, then captured in a CUDA graph (timed
  last, at ``--compile-t``: each T compiles the model anew);
- ``fused+graph``: the fused layer (``Block.fused_decode``: ln_qkv, tree attention,
  linear_residual, ln_fc_gelu, linear_residual) replayed from a CUDA graph.

Each is timed over graph replays with CUDA events and reported with its achieved bandwidth
(the layers' weights plus the K and V it attends over, divided by its time; ``docs/decode_step.md``
has the model). Then ``ntp`` (eager and fused) and ``medusa`` (fused, random heads) end to end,
in tokens/s. Every case is written to ``--json`` as soon as it is measured.

    python benchmarks/bench_fused_step.py --json fused_step.json

Without a CUDA GPU it prints why and exits 0 (the point of these kernels is the GPU's memory
stream; on the CPU the interpreter runs them, which the tests cover).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from mtpkern.decoder import Decoder
from mtpkern.steps import _Forward
from mtpkern.graphs import CapturedCall
from mtpkern.tree import Tree


def _write(path, report):
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def _step_bytes(model, T: int, prefix: int) -> int:
    """Bytes a step must read: every block's parameters and the final norm, plus K and V of
    the prefix and the T new tokens in every layer."""
    params = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith(("h.", "ln_f.")))
    cfg = model.config
    kv = 2 * cfg.n_layer * cfg.n_head * (prefix + T) * cfg.head_dim * model.dtype.itemsize
    return params + kv


def _replay_us(graph_step, tokens, prefix: torch.Tensor, iters: int) -> float:
    """Mean microseconds per replay over ``iters`` back-to-back replays (the device's events)."""
    for _ in range(3):
        graph_step(tokens, prefix)
    events = torch.get_device_module(prefix.device)
    start, end = events.Event(enable_timing=True), events.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph_step(tokens, prefix)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def _graphed_forward(model, name: str, T: int, tokens: torch.Tensor, prefix: torch.Tensor) -> CapturedCall:
    """One forward pass over T tokens (a chain) of an ntp decoder with the case's kernels, captured."""
    dec = Decoder(model, "ntp", kernels="fused" if name.startswith("fused") else "eager", prefix_cache=False)
    forward, tt = _Forward(dec, T), Tree.chain(T - 1).tensors(model.device)

    def step(tok, p):
        return forward(tok[None], p, None, dec.cache, tt.depth, tt.dense_mask, tt.mask)

    fn = torch.compile(step, dynamic=False) if name.startswith("compile") else step
    return CapturedCall(fn, (tokens, prefix), model.device)


def step_cases(model, names, Ts, prefix: int, iters: int, report: dict, json_path):
    device = model.device
    for T in Ts:
        tokens = torch.randint(0, model.config.vocab_size, (T,), device=device)
        for name in names:
            case = {"case": name, "T": T, "prefix": prefix}
            try:
                p = torch.full((), prefix, dtype=torch.long, device=device)
                us = _replay_us(_graphed_forward(model, name, T, tokens, p), tokens, p, iters)
                nbytes = _step_bytes(model, T, prefix)
                case.update(step_us=us, bytes=nbytes, achieved_GBps=nbytes / us / 1e3)
            except Exception as e:  # noqa: BLE001 - one failed case must not hide the others
                case["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            report["step"].append(case)
            _speedups(report)
            _write(json_path, report)
            print(json.dumps(case), flush=True)


def _speedups(report: dict) -> None:
    """The fused step's speedup over each other step measured at the same T."""
    for T in sorted({c["T"] for c in report["step"]}):
        times = {c["case"]: c.get("step_us") for c in report["step"] if c["T"] == T}
        if times.get("fused+graph"):
            report["speedup"][f"T={T}"] = {
                f"over_{k}": v / times["fused+graph"] for k, v in times.items() if v and k != "fused+graph"}


def end_to_end_cases(models, prompt_len: int, max_new_tokens: int, report: dict, json_path):
    from mtpkern.bench import decoder_run, time_case

    g = torch.Generator().manual_seed(0)
    device = models["ntp"].device
    prompts = [torch.randint(0, models["ntp"].config.vocab_size, (1, prompt_len), generator=g).to(device)
               for _ in range(3)]
    cases = [("ntp/eager+graph", "ntp", "eager"), ("ntp/fused+graph", "ntp", "fused"),
             ("medusa/fused+graph", "medusa", "fused")]
    for name, strategy, kernels in cases:
        case = {"case": name, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens}
        try:
            run = decoder_run(models[strategy], max_new_tokens=max_new_tokens, strategy=strategy, kernels=kernels,
                              cuda_graph=True)
            case.update(time_case(run, prompts, device))
        except Exception as e:  # noqa: BLE001
            case["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        report["end_to_end"].append(case)
        _write(json_path, report)
        print(json.dumps(case), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here, case by case")
    ap.add_argument("--prefix", type=int, default=512, help="cached tokens before the step (default 512)")
    ap.add_argument("--iters", type=int, default=200, help="graph replays per step case")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens per end-to-end run")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--compile-t", default="1,16,64",
                    help="step sizes T to time torch.compile + CUDA graph at (each compiles the model; '' for none)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        reason = "skipped: needs a CUDA GPU (the fused step streams weights on a GPU; the CPU tests cover correctness)"
        print(reason)
        _write(args.json, {"skipped": reason})
        return 0
    if not 0 <= args.prefix <= 1024 - 64:
        ap.error(f"--prefix must be in [0, 960] (the context of 1024 holds it and 64 tokens), got {args.prefix}")

    from mtpkern.bench import bench_models
    from mtpkern.runtime import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    device = torch.device("cuda")
    models = bench_models(None, quick=False, device=device, dtype=dtype)
    report = {"device": torch.cuda.get_device_name(device), "dtype": args.dtype, "torch": torch.__version__,
              "model": "GPT-2 124M shape, random weights", "step": [], "speedup": {}, "end_to_end": []}
    # Compiling is the slow part (tens of seconds per T): it runs last, so a time limit cuts
    # it rather than the fused and eager figures (the JSON holds every case measured so far).
    with torch.inference_mode():
        step_cases(models["ntp"], ("eager+graph", "fused+graph"), (1, 16, 64), args.prefix, args.iters, report,
                   args.json)
    end_to_end_cases(models, 32, args.max_new_tokens, report, args.json)
    compile_t = [int(t) for t in args.compile_t.split(",") if t.strip()]
    with torch.inference_mode():
        step_cases(models["ntp"], ("compile+graph",), compile_t, args.prefix, args.iters, report, args.json)
    print(json.dumps(report["speedup"], indent=2))
    failed = [c["case"] for c in report["step"] + report["end_to_end"] if "error" in c]
    if failed:
        print(f"failed cases: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
