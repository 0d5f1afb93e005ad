"""``mtpkern demo``: the embedded default, offline, on a laptop-class CPU in a few minutes.

It writes the synthetic maths corpus, trains three models of one tiny GPT-2 family on it
and compares them through the same evaluation as ``mtpkern eval``:

* NTP: plain next-token prediction, from scratch;
* MTP: Gloeckle et al.'s multi-token prediction (4 transformer-block heads on a shared trunk),
  from scratch with the same number of steps, so the two differ only in the objective;
* MEDUSA-1: 5 residual-block heads (MEDUSA's own default) trained on top of the frozen NTP model, on the NTP model's
  own greedy answers to the corpus's prompts (self-distillation, as MEDUSA recommends: heads
  trained on text the model did not write learn a distribution it does not follow).

The output folder holds each run (checkpoint, log, summary), ``report.json``, the markdown
table ``report.md`` and the plots (loss curves, tokens/s, accepted lengths, head accuracy).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from mtpkern.commands import train_and_calibrate
from mtpkern.distill import distill
from mtpkern.eval import evaluate
from mtpkern.train import TrainConfig

# Sized so the whole demo (3 trainings + evaluation) stays within 5 minutes on 2 CPU cores.
DEMO_STEPS = 400
# 600 steps: the heads' top-1 agreement with the model rises from 0.85-0.90 (300 steps) to 0.88-0.93,
# about 20 s more on 2 CPU cores.
DEMO_MEDUSA_STEPS = 600
DEMO_MEDUSA_HEADS = 5
# MEDUSA's 1e-3 (its paper, for 7B models) leaves the demo's small heads at 0.56 top-1 after 300
# steps; at 1e-2 they reach 0.69, near the base's own 0.72 (2-core CPU, demo shape, seed 0).
DEMO_MEDUSA_LR = 1e-2
QUICK_STEPS = 30


RUNS = ("ntp", "mtp", "medusa")
DISTILLED = "ntp_answers.jsonl"  # the NTP model's answers, MEDUSA's training data, in the MEDUSA run's folder
MARKER = ".mtpkern-demo"  # written into each run folder the demo creates: --overwrite removes only those


def _clear_previous_runs(out: Path, overwrite: bool) -> None:
    """Remove the demo's own previous runs (with ``--overwrite``); a folder in the way that the
    demo did not write (no marker) is an error, never deleted."""
    previous = [out / r for r in RUNS if (out / r).exists()]
    foreign = [run for run in previous if not (run / MARKER).is_file()]
    if foreign:
        raise ValueError(f"{foreign[0]} exists and was not written by the demo: the demo will not replace it; "
                         "choose another --out")
    if previous and not overwrite:
        raise ValueError(f"{out} already holds a demo run; pass --overwrite to replace it, or --out elsewhere")
    for run in previous:
        shutil.rmtree(run)



def run_demo(out="demo_out", device: str = "auto", steps: int | None = None, quick: bool = False,
             overwrite: bool = False) -> dict:
    """Train the three models into ``out`` (each as ``mtpkern train`` does: MTP and MEDUSA end by
    calibrating their heads), then evaluate them together; returns the evaluation's report."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory")
    _clear_previous_runs(out, overwrite)
    for run in RUNS:  # marked before training, so an interrupted demo's runs are the demo's too
        (out / run).mkdir(parents=True)
        (out / run / MARKER).write_text("written by `mtpkern demo`; `mtpkern demo --overwrite` may remove this run\n")
    steps = steps or (QUICK_STEPS if quick else DEMO_STEPS)
    medusa_steps = max(1, steps * DEMO_MEDUSA_STEPS // DEMO_STEPS)
    common: dict[str, Any] = dict(  # TrainConfig fields of every run
        config="tiny" if quick else "demo", data="synthetic", data_limit=400 if quick else 4000, device=device, batch_size=16,
        max_len=128, eval_every=max(steps // 4, 1), eval_batches=8, save_every=steps, log_every=10, seed=0,
    )
    if torch.get_num_threads() > 4 and device in ("auto", "cpu") and not torch.cuda.is_available():
        torch.set_num_threads(4)  # tiny matmuls: more threads only add overhead

    print(f"mtpkern demo: training NTP, MTP and MEDUSA-1 on the synthetic maths corpus into {out}/")
    runs = {}
    print("\n[1/5] NTP (next-token prediction), from scratch")
    runs["ntp"] = train_and_calibrate(TrainConfig(objective="ntp", out=str(out / "ntp"), steps=steps, **common))
    print("\n[2/5] MTP (4 transformer-block heads on a shared trunk), from scratch")
    runs["mtp"] = train_and_calibrate(TrainConfig(objective="mtp", out=str(out / "mtp"), steps=steps, n_heads=4,
                                                  **common))
    print(f"\n[3/5] The NTP model's own greedy answers to the corpus's prompts (batched) -> {out / 'medusa' / DISTILLED}")
    answers = distill(runs["ntp"].checkpoint, "synthetic", out / "medusa" / DISTILLED, max_new_tokens=80,
                      limit=common["data_limit"], device=device, progress=True)
    print(f"\n[4/5] MEDUSA-1 ({DEMO_MEDUSA_HEADS} residual-block heads on the frozen NTP model), on those answers")
    runs["medusa"] = train_and_calibrate(TrainConfig(
        objective="medusa", out=str(out / "medusa"), base=runs["ntp"].checkpoint, steps=medusa_steps,
        n_heads=1 + DEMO_MEDUSA_HEADS, lr=DEMO_MEDUSA_LR,
        **{**common, "data": answers.out, "eval_every": max(medusa_steps // 3, 1)}))
    train_time = time.perf_counter() - t0

    print("\n[5/5] Evaluation: quality on held-out problems, decode speed through one engine")
    report = evaluate(
        [out / "ntp", out / "mtp", out / "medusa"], json_path=out / "report.json", device=device,
        max_samples=8 if quick else 24, max_new_tokens=48 if quick else 80, max_batches=8,
        hf_baseline=True, progress=True,
    )
    total = time.perf_counter() - t0
    print(f"\ndemo finished in {total:.0f} s (training {train_time:.0f} s); everything is in {out}/")
    report["demo_seconds"] = total
    return report
