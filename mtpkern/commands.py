"""Commands that join two layers: ``mtpkern train`` is a training run (:mod:`mtpkern.train`)
followed by the calibration of its heads (:mod:`mtpkern.calibrate`).

Training does not know about calibration, and calibration does not know about training: this
module, above both, is where they meet. ``mtpkern train`` and ``mtpkern demo`` call it.
"""

from __future__ import annotations

from mtpkern.calibrate import calibrate_after_training
from mtpkern.train import FinishedRun, TrainConfig, TrainResult, train


def train_and_calibrate(cfg: TrainConfig) -> TrainResult:
    """``mtpkern train`` in Python: :func:`mtpkern.train.train`, and for an MTP or MEDUSA run
    that trained to its last step, the acceptance of its heads on the run's own validation split
    written as ``calibration.json`` into the checkpoint (what ``tree="auto"`` plans with). A
    model that leaves no room to decode is skipped with a warning: training succeeded."""
    return train(cfg, after=calibrate_finished_run)


def calibrate_finished_run(run: FinishedRun) -> None:
    """Calibrate the heads of a finished MTP or MEDUSA run on its held-out records (a short
    calibration, so that training ends soon; ``mtpkern calibrate`` measures more)."""
    if run.config.objective == "ntp":
        return
    source = dict(source=str(run.config.data), held_out=True, note="the run's own validation split, after training")
    calibrate_after_training(run.model, run.val_records, run.tokenizer, run.checkpoint, source=source)


__all__ = ["calibrate_finished_run", "train_and_calibrate"]
