"""Peak memory and time of one training step: NTP, MTP (the paper's memory-efficient order and
the naive summed loss) and MEDUSA-1, each with the plain loss (materialised logits) and the
fused linear cross-entropy (``mtpkern.ops.linear_cross_entropy``, no [N, V] logits).

    python benchmarks/bench_mtp_memory.py                      # GPT-2 124M shape, n = 4 heads
    python benchmarks/bench_mtp_memory.py --config tiny --batch 8 --seq 256
    python benchmarks/bench_mtp_memory.py --variants ntp ntp-fused

Each variant is one forward + backward (no optimizer) of a freshly built model; "-fused"
variants compute every head's loss with the fused op (the trainer's default, ``--loss fused``),
the others as ``--loss plain``:
  ntp            GPT2, ntp_loss                         (one head)
  mtp-naive      MTPModel, mtp_loss_naive + .backward() (all n heads' logits alive at once)
  mtp-efficient  MTPModel, mtp_loss_and_backward        (one head's logits at a time)
  mtp-matched    the same, with n - 1 fewer trunk blocks: trunk + heads = NTP's blocks, so the
                 model has NTP's parameters (Gloeckle et al. compare at equal size)
  medusa         MedusaModel (n MEDUSA heads, frozen base), medusa_loss + .backward()
On CUDA the figure is torch.cuda.max_memory_allocated during the step minus the memory held
before it (weights and inputs): activations, logits and gradients. On CPU every variant runs
in a fresh subprocess and the figure is the growth of its peak resident set size over the step
(Linux VmHWM, reset through /proc/self/clear_refs after the model is built). The subprocess runs
with ``MALLOC_MMAP_THRESHOLD_=1048576`` (unless set): glibc then maps every block of 1 MiB or
more on its own and returns it when freed, so the peak is that of live memory, not of blocks
glibc kept for reuse (which varied by about 70 MiB from run to run). Gloeckle et al. predict the efficient order's
logits memory O(V) instead of O(nV), so its peak should sit close to ntp's.

Step time: the median of ``--repeat`` further steps after the measured one (synchronised on
CUDA; on CPU with ``--threads`` threads, 1 by default, so a shared machine's ratios hold).
Targets (ANCHORS.md): mtp-efficient-fused <= 1.05x ntp-fused, ntp-fused >= 30% below ntp,
each fused step no slower than 1.1x its plain variant. Where MTP's peak exceeds NTP's after the
fused loss, what remains is its n - 1 extra head blocks: their weight gradients (27 MiB each at
GPT-2's width, fp32) exist while the trunk's activations do; ``mtp-matched`` shows the order's
cost without them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace

import torch

from mtpkern.config import GPT2Config
from mtpkern.models import GPT2, MedusaModel, MTPModel
from mtpkern.runtime import timed
from mtpkern.train import medusa_loss, mtp_loss_and_backward, mtp_loss_naive, ntp_loss

OBJECTIVES = ("ntp", "mtp-naive", "mtp-efficient", "mtp-matched", "medusa")
VARIANTS = tuple(v for o in OBJECTIVES for v in (o, o + "-fused"))
DEFAULT_VARIANTS = ("ntp", "ntp-fused", "mtp-naive", "mtp-efficient", "mtp-efficient-fused", "mtp-matched-fused",
                    "medusa", "medusa-fused")


def build(variant: str, args, device) -> torch.nn.Module:
    torch.manual_seed(0)
    if args.config == "tiny":
        cfg = GPT2Config.tiny(vocab_size=50257, n_positions=max(256, args.seq))
    else:
        cfg = GPT2Config(n_positions=max(1024, args.seq))
    if variant.startswith("ntp"):
        model = GPT2(cfg)
    elif variant.startswith("medusa"):
        model = MedusaModel.from_base(GPT2(cfg), n_heads=args.n_heads)
    elif variant.startswith("mtp-matched"):  # trunk + heads = the NTP model's blocks
        n_layer = cfg.n_layer - args.n_heads + 1
        if n_layer < 2:
            raise SystemExit(f"mtp-matched needs more than {args.n_heads} blocks ({cfg.n_layer} here): "
                             "use --config gpt2 or fewer --n-heads")
        model = MTPModel(replace(cfg, model_type="mtp", n_heads=args.n_heads, n_layer=n_layer))
    else:
        model = MTPModel(replace(cfg, model_type="mtp", n_heads=args.n_heads))
    return model.to(device).train()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM), so model construction does not hide the step."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def step(variant: str, model, idx, labels, amp_dtype):
    objective, fused = variant.removesuffix("-fused"), variant.endswith("-fused")
    with torch.autocast(idx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        if objective == "ntp":
            ntp_loss(model, idx, labels, fused=fused)[0].backward()
        elif objective == "mtp-naive":
            mtp_loss_naive(model, idx, labels, fused=fused).backward()
        elif objective == "medusa":
            weights = [0.8**k for k in range(model.n_heads - 1)]
            medusa_loss(model, idx, labels, weights, fused=fused)[0].backward()
        else:
            mtp_loss_and_backward(model, idx, labels, fused=fused)


def measure(variant: str, args) -> dict:
    """Peak bytes of one step of ``variant`` in this process, and the median time of more steps."""
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    amp_dtype = torch.bfloat16 if device.type == "cuda" and args.precision == "bf16" else None
    model = build(variant, args, device)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    labels = idx.clone()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(variant, model, idx, labels, amp_dtype)
        torch.cuda.synchronize()
        peak, kind = torch.cuda.max_memory_allocated() - before, "cuda max_memory_allocated - allocated before"
    else:
        before = _rss_kib("VmRSS")
        _reset_peak_rss()
        step(variant, model, idx, labels, amp_dtype)
        peak, kind = (_rss_kib("VmHWM") - before) * 1024, "peak RSS (VmHWM) growth over the step, fresh process"
    times = []
    for _ in range(args.repeat):
        model.zero_grad(set_to_none=True)
        times.append(timed(lambda: step(variant, model, idx, labels, amp_dtype), device)[1])
    return {"variant": variant, "device": str(device), "peak_bytes": peak, "measure": kind,
            "step_s": sorted(times)[len(times) // 2] if times else None,
            "params": sum(p.numel() for p in model.parameters())}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=("gpt2", "tiny"), default="gpt2")
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=None, help="default 8 on CUDA, 4 on CPU")
    p.add_argument("--seq", type=int, default=None, help="default 512 on CUDA, 256 on CPU")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast on CUDA; CPU is fp32")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    p.add_argument("--repeat", type=int, default=1, help="timed steps after the measured one (0: no timing)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    args.batch = args.batch or (8 if cuda else 4)
    args.seq = args.seq or (512 if cuda else 256)

    if args.child:  # one CPU measurement in a fresh process
        print(json.dumps(measure(args.child, args)))
        return
    results = {}
    for variant in args.variants:
        if cuda:
            results[variant] = measure(variant, args)
            torch.cuda.empty_cache()
        else:
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", variant]
            env = {"MALLOC_MMAP_THRESHOLD_": str(2**20), **os.environ}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    first = next(iter(results.values()))
    print(f"{args.config} shape, n_heads={args.n_heads}, batch {args.batch} x {args.seq} tokens, "
          f"{first['device']}, {first['measure']}" + ("" if cuda else f", {args.threads} thread(s)"))
    print(f"{'variant':<21}{'peak MiB':>10}{'vs ntp':>9}{'vs ntp-fused':>14}{'step s':>9}{'vs plain':>10}")

    def ratio(a, b, key):
        ra, rb = results.get(a), results.get(b)
        return ra[key] / rb[key] if ra and rb and ra.get(key) and rb.get(key) else None

    fmt = lambda x, width, unit="x": format("-" if x is None else f"{x:.2f}{unit}", f">{width}")  # noqa: E731
    for name, r in results.items():
        r["vs_ntp"], r["vs_ntp_fused"] = ratio(name, "ntp", "peak_bytes"), ratio(name, "ntp-fused", "peak_bytes")
        r["step_vs_plain"] = ratio(name, name.removesuffix("-fused"), "step_s") if name.endswith("-fused") else None
        print(f"{name:<21}{r['peak_bytes'] / 2**20:>10.1f}{fmt(r['vs_ntp'], 9)}{fmt(r['vs_ntp_fused'], 14)}"
              f"{fmt(r['step_s'], 9, '')}{fmt(r['step_vs_plain'], 10)}")
    targets = [("mtp-efficient-fused <= 1.05x ntp-fused", ratio("mtp-efficient-fused", "ntp-fused", "peak_bytes"), 1.05),
               ("mtp-matched-fused <= 1.05x ntp-fused", ratio("mtp-matched-fused", "ntp-fused", "peak_bytes"), 1.05),
               ("ntp-fused <= 0.70x ntp", ratio("ntp-fused", "ntp", "peak_bytes"), 0.70)]
    targets += [(f"{v} step <= 1.10x {v.removesuffix('-fused')}", results[v]["step_vs_plain"], 1.10)
                for v in results if results[v].get("step_vs_plain") is not None]
    for label, value, limit in targets:
        if value is not None:
            print(f"target {label}: {value:.2f}x {'met' if value <= limit else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": list(results.values())}, f, indent=2)


if __name__ == "__main__":
    main()
