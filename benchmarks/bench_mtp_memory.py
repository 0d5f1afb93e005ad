"""Peak memory of one MTP training step: the paper's memory-efficient order against the naive
summed loss, with next-token training of the same base as the reference point.

    python benchmarks/bench_mtp_memory.py                      # GPT-2 124M shape, n = 4 heads
    python benchmarks/bench_mtp_memory.py --config tiny --batch 8 --seq 256

Each variant is one forward + backward (no optimizer) of a freshly built model:
  ntp            GPT2, ntp_loss                         (one head)
  mtp-naive      MTPModel, mtp_loss_naive + .backward() (all n heads' logits alive at once)
  mtp-efficient  MTPModel, mtp_loss_and_backward        (one head's logits at a time)
On CUDA the figure is torch.cuda.max_memory_allocated during the step minus the memory held
before it (weights and inputs): activations, logits and gradients. On CPU every variant runs
in a fresh subprocess and the figure is the growth of its peak resident set size over the step
(Linux VmHWM, reset through /proc/self/clear_refs after the model is built), which includes
allocator slack. Gloeckle et al. predict the efficient order's
logits memory O(V) instead of O(nV), so its peak should sit close to ntp's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace

import torch

from mtpkern.model import GPT2, GPT2Config, MTPModel
from mtpkern.train import mtp_loss_and_backward, mtp_loss_naive, ntp_loss

VARIANTS = ("ntp", "mtp-naive", "mtp-efficient")


def build(variant: str, args, device) -> torch.nn.Module:
    torch.manual_seed(0)
    if args.config == "tiny":
        cfg = GPT2Config.tiny(vocab_size=50257, n_positions=max(256, args.seq))
    else:
        cfg = GPT2Config(n_positions=max(1024, args.seq))
    model = GPT2(cfg) if variant == "ntp" else MTPModel(replace(cfg, model_type="mtp", n_heads=args.n_heads))
    return model.to(device).train()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM), so model construction does not hide the step."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def step(variant: str, model, idx, labels, amp_dtype):
    with torch.autocast(idx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        if variant == "ntp":
            ntp_loss(model, idx, labels)[0].backward()
        elif variant == "mtp-naive":
            mtp_loss_naive(model, idx, labels).backward()
        else:
            mtp_loss_and_backward(model, idx, labels)


def measure(variant: str, args) -> dict:
    """Peak bytes of one step of ``variant`` in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
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
    return {"variant": variant, "device": str(device), "peak_bytes": peak, "measure": kind,
            "params": sum(p.numel() for p in model.parameters())}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=("gpt2", "tiny"), default="gpt2")
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=None, help="default 8 on CUDA, 4 on CPU")
    p.add_argument("--seq", type=int, default=None, help="default 512 on CUDA, 256 on CPU")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast on CUDA; CPU is fp32")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    args.batch = args.batch or (8 if cuda else 4)
    args.seq = args.seq or (512 if cuda else 256)

    if args.child:  # one CPU measurement in a fresh process
        print(json.dumps(measure(args.child, args)))
        return
    results = []
    for variant in VARIANTS:
        if cuda:
            results.append(measure(variant, args))
            torch.cuda.empty_cache()
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", variant] + sys.argv[1:]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    ntp = results[0]["peak_bytes"]
    print(f"{args.config} shape, n_heads={args.n_heads}, batch {args.batch} x {args.seq} tokens, "
          f"{results[0]['device']}, {results[0]['measure']}")
    print(f"{'variant':<15}{'peak MiB':>12}{'vs ntp':>10}")
    for r in results:
        r["vs_ntp"] = r["peak_bytes"] / ntp
        print(f"{r['variant']:<15}{r['peak_bytes'] / 2**20:>12.1f}{r['vs_ntp']:>9.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
