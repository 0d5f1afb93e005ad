"""The CPU products' layouts, step for step: one decoding step of a checkpoint under each value
of ``MTPKERN_CPU_MATMUL`` (``copy``, ``flip``, ``auto``; see ``mtpkern.cpu_matmul``).

Each value runs in its own process (a layout is chosen once per process), the processes
alternate round by round (the order turns each round, so a slow minute of the machine falls on
every value), torch's threads are pinned, and each point is the fastest of the rounds
(``mtpkern.costmodel.time_tree_step``: the engine's own greedy step over a T-token tree after
``--prefix`` cached tokens; T=1 is a next-token step). The table gives milliseconds per step
and each value's time over ``copy``'s. ``--acceptance`` times sampling steps at temperature 1
instead, trees verified by rejection sampling or typical acceptance (T=1: ``ntp`` sampling).

    python benchmarks/bench_cpu_matmul.py runs/real/medusa --tokens 1,2,4,8,16
    python benchmarks/bench_cpu_matmul.py CHECKPOINT --json layouts.json --rounds 5
    python benchmarks/bench_cpu_matmul.py runs/real/medusa --tokens 1,4,8 --acceptance typical

Run it on a quiet machine: another busy process slows a 2-core machine's steps many times over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MODES = ("copy", "flip", "auto")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a checkpoint or run folder (mtpkern.load_model)")
    ap.add_argument("--tokens", default="1,2,4,8,16", help="tree sizes T, comma-separated (default 1,2,4,8,16)")
    ap.add_argument("--depth", type=int, default=3, help="the timing trees' depth (default 3)")
    ap.add_argument("--prefix", type=int, default=60, help="cached tokens before the step (default 60)")
    ap.add_argument("--rounds", type=int, default=3, help="processes per value, alternating (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds each timing runs at least (default 0.3)")
    ap.add_argument("--acceptance", choices=("greedy", "rejection", "typical"), default="greedy",
                    help="greedy steps (default), or sampling steps at temperature 1 verified this way")
    ap.add_argument("--json", type=Path, default=None, help="write the measurements here")
    ap.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        args.sizes = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        args.sizes = []
    if not args.sizes or min(args.sizes) < 1:
        raise SystemExit(f"bench_cpu_matmul: --tokens takes tree sizes >= 1 such as 1,4,16, got {args.tokens!r}")
    if args.rounds < 1 or args.threads < 1 or args.depth < 1:
        raise SystemExit("bench_cpu_matmul: --rounds, --threads and --depth take numbers >= 1")
    return args


def child(args) -> dict[str, float]:
    """In a process with ``MTPKERN_CPU_MATMUL`` set: seconds per step for each T."""
    import torch

    import mtpkern
    from mtpkern.costmodel import time_tree_step, timing_tree

    torch.set_num_threads(args.threads)
    model = mtpkern.load_model(args.checkpoint, device="cpu", dtype=torch.float32).eval()
    if model.config.model_type not in ("mtp", "medusa") and max(args.sizes) > 1:
        raise SystemExit(f"bench_cpu_matmul: {args.checkpoint} has no draft heads: only --tokens 1 times it")
    return {str(T): time_tree_step(model, None if T == 1 else timing_tree(T, args.depth), prefix_len=args.prefix,
                                   min_time=args.min_time, acceptance=args.acceptance) for T in args.sizes}


def run_child(args, mode: str) -> dict[str, float]:
    threads = str(args.threads)
    env = dict(os.environ, MTPKERN_CPU_MATMUL=mode, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    cmd = [sys.executable, __file__, args.checkpoint, "--tokens", args.tokens, "--depth", str(args.depth),
           "--prefix", str(args.prefix), "--threads", threads, "--min-time", str(args.min_time), "--acceptance", args.acceptance, "--child", mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"bench_cpu_matmul: MTPKERN_CPU_MATMUL={mode} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args) -> dict[str, dict[str, list[float]]]:
    """``{mode: {T: [seconds per round]}}``; round r runs the modes rotated by r."""
    times: dict[str, dict[str, list[float]]] = {m: {str(T): [] for T in args.sizes} for m in MODES}
    for r in range(args.rounds):
        for mode in MODES[r % len(MODES):] + MODES[: r % len(MODES)]:
            for T, seconds in run_child(args, mode).items():
                times[mode][T].append(seconds)
            print(f"bench_cpu_matmul: round {r + 1}/{args.rounds} {mode} done", file=sys.stderr, flush=True)
    return times


def format_table(times: dict[str, dict[str, list[float]]]) -> str:
    sizes = list(times["copy"])
    lines = ["| T | " + " | ".join(f"{m} ms" for m in MODES) + " | flip / copy | auto / copy |",
             "| ---: | " + " | ".join("---:" for _ in MODES) + " | ---: | ---: |"]
    for T in sizes:
        best = {m: min(times[m][T]) for m in MODES}
        lines.append(f"| {T} | " + " | ".join(f"{best[m] * 1e3:.2f}" for m in MODES)
                     + f" | {best['flip'] / best['copy']:.2f} | {best['auto'] / best['copy']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args)))
        return {}
    times = measure(args)
    report = dict(schema="mtpkern.bench_cpu_matmul/1", checkpoint=args.checkpoint, threads=args.threads,
                  depth=args.depth, prefix=args.prefix, rounds=args.rounds, acceptance=args.acceptance,
                  seconds=times)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(format_table(times))
    return report


if __name__ == "__main__":
    main()
