"""A run directory: what ``mtpkern train`` writes into ``--out``, and what ``mtpkern eval`` and
``mtpkern calibrate`` read back from it.

::

    OUT/checkpoint/          the model and its tokenizer (mtpkern.checkpoint), the trainer's
                             state (trainer_state.pt) and, after ``mtpkern train mtp|medusa``,
                             calibration.json (mtpkern.calibration)
    OUT/log.jsonl            one JSON record per line: kind "train", "eval" or "error", with its step
    OUT/train_config.json    the run's TrainConfig, as saved (a resumed run keeps it)
    OUT/summary.json         the run's result: its TrainResult and a few totals

The trainer writes through the functions of the first half, the commands read through those of
the second; the held-out split of a run is recomputed from its train_config.json exactly as the
trainer made it (:func:`validation_records`).

The saved training configuration (train_config.json, and the trainer state's ``"config"``) carries
``"format": RUN_FORMAT`` beside the TrainConfig's fields (:func:`saved_config`). One without it was
written before format 2, when a MEDUSA run's ``n_heads`` counted its MEDUSA heads alone; the
readers (:func:`read_run`, :func:`read_state`) convert it (:func:`upgrade_config`), so that
``n_heads`` always counts every head, the next-token head included.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from mtpkern.checkpoint import (
    CHECKPOINT_DIR,
    LOCK_NAME,
    CheckpointError,
    atomic_directory,
    disk_full_error,
    interrupted_save,
    is_disk_full,
    require_file,
    write_text_atomic,
)
from mtpkern.data import load_records, split_records
from mtpkern.objectives import OBJECTIVES

STATE_NAME = "trainer_state.pt"
LOG_NAME = "log.jsonl"
CONFIG_NAME = "train_config.json"
SUMMARY_NAME = "summary.json"
# The saved training configuration's format. 1 (no "format" key, before this one): a MEDUSA run's
# n_heads counted its MEDUSA heads only. 2: n_heads counts every head, the next-token head included.
RUN_FORMAT = 2
MEDUSA_OBJECTIVES = ("medusa", "medusa2")


# ----------------------------------------------------------------------------- the saved configuration


def saved_config(cfg) -> dict:
    """A TrainConfig as a run saves it (train_config.json, the trainer state): its fields and
    the format they are written in."""
    return {**asdict(cfg), "format": RUN_FORMAT}


def upgrade_config(saved, where) -> dict:
    """A saved training configuration in the current format: one written before format 2 (no
    ``"format"``) by a MEDUSA run counted its MEDUSA heads alone in ``n_heads``, which gains
    the next-token head. ``where`` (the file) names a bad or newer format in the error."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: the saved training configuration must be a JSON object, "
                              f"got {type(saved).__name__}")
    fmt = saved.get("format", 1)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        raise CheckpointError(f"{where}: the field 'format' must be a positive integer, got {fmt!r}")
    if fmt > RUN_FORMAT:
        raise CheckpointError(f"{where}: the field 'format' is {fmt}: written by a newer mtpkern (this one reads "
                              f"formats 1 to {RUN_FORMAT}); upgrade mtpkern")
    upgraded = {**saved, "format": RUN_FORMAT}
    n = saved.get("n_heads")
    if fmt < 2 and saved.get("objective") in MEDUSA_OBJECTIVES and isinstance(n, int) and not isinstance(n, bool):
        upgraded["n_heads"] = n + 1  # format 1 counted the MEDUSA heads, not the next-token head
    return upgraded


# ----------------------------------------------------------------------------- the trainer's side


def refuse_foreign_out(out: Path, data: str) -> None:
    """A fresh run writes checkpoint/, log.jsonl, summary.json and train_config.json into
    ``out``: refuse a folder that holds anything else, unless it is a run of ours (the run's own
    ``data`` file may sit there, as the demo keeps its distilled answers)."""
    if not out.is_dir() or is_run(out):
        return
    data_file = Path(data).resolve() if Path(data).is_file() else None
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and p.resolve() != data_file)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ValueError(f"out (--out) {str(out)!r} is not empty and is not an mtpkern run (it holds {shown}): a run "
                         f"writes {CHECKPOINT_DIR}/, {LOG_NAME}, {SUMMARY_NAME} and {CONFIG_NAME} there; "
                         "choose an empty or new out")


def is_run(out: Path) -> bool:
    """Whether ``out`` is a run of ours: it has a checkpoint (or an interrupted save's), a
    train_config.json we wrote, or an ``.mtpkern-*`` mark (``mtpkern demo`` marks the run
    folders it creates before training into them)."""
    ckpt = out / CHECKPOINT_DIR
    if ckpt.is_dir() or interrupted_save(ckpt) is not None:
        return True
    if any(p.name.startswith(".mtpkern-") and p.is_file() for p in out.iterdir()):
        return True
    try:
        saved = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get("objective") in OBJECTIVES and {"out", "steps", "seed"} <= saved.keys()


def write_json(path: Path, value) -> None:
    """``value`` as indented JSON at ``path``, replaced atomically (train_config.json, summary.json)."""
    write_text_atomic(path, json.dumps(value, indent=2))


def start_log(log_path: Path, step: int, resume: bool) -> None:
    """The log a run appends to: empty for a fresh run; on resume the records of the steps up to
    ``step``, the saved checkpoint's (a killed run logged past it)."""
    kept = read_log(log_path, step) if resume else []
    write_text_atomic(log_path, "".join(ln + "\n" for ln in kept))


def append_log(log_path: Path, record: dict) -> None:
    try:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(log_path, "its last line may be cut short (a resumed run drops it)") from e
        raise


def read_log(log_path: Path, step: int) -> list[str]:
    """The log records of steps up to ``step`` (a killed run wrote more after its checkpoint);
    a half-written last line (a run killed mid-write) is dropped, with a warning."""
    if not log_path.exists():
        return []
    lines = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    kept = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                print(f"mtpkern train: {log_path}:{i}: dropped a half-written last line (the previous run "
                      "was killed while writing it)", file=sys.stderr)
                break
            raise CheckpointError(f"{log_path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise CheckpointError(f"{log_path}:{i}: not a log record (no integer 'step')")
        if record["step"] <= step:
            kept.append(line)
    return kept


def read_state(checkpoint: Path) -> dict:
    """The trainer's state saved beside the weights (step, optimizer, scaler, RNG, config), its
    config in the current format (:func:`upgrade_config`)."""
    path = require_file(checkpoint, STATE_NAME)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds on a damaged file
        raise CheckpointError(f"{path} is corrupt or truncated: {e}") from None
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"{path} is not a trainer state (no 'config')")
    return {**state, "config": upgrade_config(state["config"], path)}


def save_checkpoint(path: Path, model, tokenizer, state: dict) -> None:
    """Model + tokenizer + trainer state, published in one atomic rename: a crash mid-write
    leaves the previous checkpoint whole."""
    with atomic_directory(path) as tmp:
        model.write_files(tmp, tokenizer=tokenizer)
        torch.save(state, tmp / STATE_NAME)


# ----------------------------------------------------------------------------- the readers' side


def read_run(run_dir: Path | None) -> tuple[dict | None, list[dict], dict | None]:
    """``(train_config, log records, summary)`` of a run; missing files give None / []. The
    train_config is in the current format (:func:`upgrade_config`)."""
    if run_dir is None:
        return None, [], None

    def parse(f: Path, text: str, where: str = ""):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}{where} is not valid JSON: {e.msg}") from None

    def load(name):
        f = run_dir / name
        return parse(f, f.read_text()) if f.is_file() else None

    log, f = [], run_dir / LOG_NAME
    if f.is_file():
        log = [parse(f, line, f":{i}") for i, line in enumerate(f.read_text().splitlines(), 1) if line.strip()]
    train_config = load(CONFIG_NAME)
    if train_config is not None:
        train_config = upgrade_config(train_config, run_dir / CONFIG_NAME)
    return train_config, log, load(SUMMARY_NAME)


def validation_records(train_config: dict | None, data: str | None = None, *, seed: int = 1234,
                       limit: int | None = None, val_fraction: float = 0.05) -> tuple[list[dict], dict]:
    """The held-out records and a description of where they came from.

    With the run's ``train_config`` the split is recomputed exactly as the trainer made it:
    ``split_records(load_records(data, seed, data_limit), val_fraction, seed)[1]``. Without it
    (a bare checkpoint) ``data`` is split with a fresh ``seed``; the model may have trained on
    those records, and the description says so.
    """
    if train_config is not None:
        source = train_config.get("data", "synthetic")
        seed = train_config.get("seed", 0)
        limit = train_config.get("data_limit")
        val_fraction = train_config.get("val_fraction", val_fraction)
        held_out, note = True, "the run's own validation split (recomputed from train_config.json)"
        if data is not None and data != source:
            raise ValueError(f"--data {data!r} differs from the run's training data {source!r}: "
                             "its validation split is only defined on the training source")
    elif data is not None:
        source = data
        held_out, note = False, (f"no train_config.json: {source!r} split with seed {seed}; "
                                 "the model may have trained on these records")
    else:
        raise ValueError("a bare checkpoint has no train_config.json: pass data= (--data) to evaluate it on")
    records = load_records(source, seed=seed, limit=limit)
    _, val = split_records(records, val_fraction, seed)
    info = dict(source=str(source), seed=seed, val_fraction=val_fraction, limit=limit,
                n_records=len(val), held_out=held_out, note=note)
    return val, info


def training_summary(log: list[dict], summary: dict | None) -> dict | None:
    """Wall time, peak memory, time per epoch and the loss curve of a run, from its logs."""
    if not log and summary is None:
        return None
    steps = [r for r in log if r.get("kind", "train") == "train" and "loss" in r and "step" in r]
    curve = dict(step=[r["step"] for r in steps], loss=[r["loss"] for r in steps])
    head_losses = [r.get("head_losses") for r in steps]
    width = len(head_losses[0]) if steps and isinstance(head_losses[0], list) else -1
    if steps and all(isinstance(h, list) and len(h) == width for h in head_losses):
        curve["head_losses"] = [list(col) for col in zip(*head_losses)]
    summary = summary or {}
    peaks = [r["peak_memory_bytes"] for r in steps if r.get("peak_memory_bytes") is not None]
    return dict(
        wall_time_s=summary.get("wall_time_s", steps[-1].get("elapsed_s") if steps else None),
        peak_memory_bytes=summary.get("peak_memory_bytes", max(peaks) if peaks else None),
        time_per_epoch_s=summary.get("time_per_epoch_s"),
        curve=curve,
    )


__all__ = [
    "CONFIG_NAME", "LOG_NAME", "RUN_FORMAT", "STATE_NAME", "SUMMARY_NAME", "append_log", "is_run", "read_log",
    "read_run", "read_state", "refuse_foreign_out", "save_checkpoint", "saved_config", "start_log",
    "training_summary", "upgrade_config", "validation_records", "write_json",
]
