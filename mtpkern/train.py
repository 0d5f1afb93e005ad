"""One trainer for four objectives: next-token (ntp), multi-token (mtp), MEDUSA-1 (medusa) and
MEDUSA-2 (medusa2). Each objective is a small object in ``mtpkern.objectives`` (its loss, the
maths and the per-head metrics from a batch); this module holds the generic loop: the
schedule, resume state, logging, evaluation and checkpoints. The run folder's files are
``mtpkern.rundir``'s, the validation metrics ``mtpkern.metrics``'. Training stops there: the
calibration of the heads that ``mtpkern train`` writes next is a layer above
(``mtpkern.commands.train_and_calibrate``, through ``train(cfg, after=...)``).

Within a training step N_j counts the whole global batch (every micro-batch of every process),
so a step's gradient does not depend on how the batch is split for gradient accumulation or
over processes.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the trainer initialises the process group
(nccl on GPU, gloo on CPU), shards every global batch deterministically over the ranks and
wraps the model in DistributedDataParallel; rank 0 writes logs and checkpoints between
barriers. ``batch_size`` is per process: the global batch is batch_size x grad_accum x world.
DDP's reducer expects one backward per forward of every trained parameter, which MTP's order
(n + 1 backward calls per micro-batch, none through ``DDP.forward``) and MEDUSA-2's head warmup
(no gradient for the backbone) break: for those (``Objective.manual_grad_sync``) the backward
calls run under ``no_sync()`` and the gradients are averaged afterwards in one flat all-reduce
per step.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from mtpkern.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    interrupted_save,
    is_local,
    model_source,
    recover_interrupted_save,
    run_lock,
)
from mtpkern.config import GPT2Config
from mtpkern.data import (
    IGNORE_INDEX,
    DataError,
    SFTDataset,
    check_tokenizer_records,
    collate,
    has_tokenizer,
    load_records,
    load_tokenizer,
    record_text,
    split_records,
    train_tokenizer,
)
from mtpkern.hf_io import load_model
from mtpkern.metrics import evaluate_heads  # also mtpkern.train.evaluate_heads, as before
from mtpkern.models import BASE_CLASSES, GPT2, MedusaModel, MTPModel
from mtpkern.objectives import (  # noqa: F401 - the losses are part of this module's API
    OBJECTIVES as _OBJECTIVE_CLASSES,
    head_loss,
    medusa2_loss,
    medusa_loss,
    mtp_loss_and_backward,
    mtp_loss_naive,
    ntp_loss,
)
from mtpkern.rundir import (
    CONFIG_NAME,
    LOG_NAME,
    SUMMARY_NAME,
    append_log,
    read_state,
    refuse_foreign_out,
    save_checkpoint,
    saved_config,
    start_log,
    write_json,
)
from mtpkern.runtime import peak_memory, reset_peak_memory, resolve_device, resolve_dtype

OBJECTIVES = ("ntp", "mtp", "medusa", "medusa2")
BACKBONE_LOSSES = ("ce", "kl")  # MEDUSA-2 backbone: the labels, or KL to the original model
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOSSES = ("fused", "plain")  # head losses by linear_cross_entropy, or from materialised logits
SHAPES = ("tiny", "demo", "gpt2")  # see model_shape
MIN_LR_RATIO = 0.1  # the cosine decays to 10% of the peak learning rate (nanoGPT, Chinchilla)
# On resume a run keeps its saved configuration. These fields may be given anew (to extend a
# run, or to evaluate, save and log at another rhythm); any other that contradicts the saved
# one is an error. device, progress and stop_after belong to the process, not the run.
RESUME_MAY_CHANGE = ("steps", "epochs", "eval_every", "save_every", "log_every", "eval_batches")
_PER_PROCESS = ("out", "resume", "device", "progress", "stop_after")


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """One field per CLI flag. ``None`` fields are resolved per objective in ``__post_init__``;
    invalid values raise ``ValueError`` with a one-line message."""

    objective: str  # "ntp" | "mtp" | "medusa" | "medusa2"
    out: str  # output directory
    base: str | None = None  # HF GPT-2 name/dir or an mtpkern checkpoint dir; required for medusa(2)
    config: str = "tiny"  # model shape when training from scratch: "tiny" | "gpt2" (124M)
    data: str = "synthetic"  # "synthetic" | "metamathqa" | a .json/.jsonl path
    data_limit: int | None = None
    steps: int | None = None  # optimizer steps; exactly one of steps / epochs (default 200 steps)
    epochs: float | None = None
    batch_size: int = 16  # per process
    grad_accum: int = 1
    lr: float | None = None  # default 3e-4 (ntp, mtp), 1e-3 (medusa, medusa2: the heads' rate)
    weight_decay: float = 0.1
    warmup: int | None = None  # warmup steps, default 5% of the total
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    n_heads: int | None = None  # every head, the next-token head included: default ntp 1, mtp 4, medusa(2) 6
    medusa_layers: int = 1
    medusa_proj: bool = False  # MEDUSA heads with their own unembedding (initialised from the LM head)
    head_weights: list[float] | None = None  # MEDUSA loss weights, one per MEDUSA head (n_heads - 1): default
    #                                         0.8**k for MEDUSA head k
    # MEDUSA-2 (see mtpkern.objectives for the recipe and where the defaults come from)
    heads_coefficient: float = 0.2  # lambda: L = backbone loss + lambda * sum_k w_k CE_{k+1}
    backbone_lr_ratio: float = 0.25  # backbone learning rate / heads' learning rate
    head_warmup: int | None = None  # steps of heads alone before the backbone joins; default 25%
    backbone_loss: str = "ce"  # "ce" (the labels) | "kl" (KL to the teacher's distribution)
    # MTP: the trunk's (and head 0's, and the embedding's) learning rate / the draft heads' (lr)
    trunk_lr_ratio: float = 1.0
    teacher: str | None = None  # the KL teacher, default the base
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16"
    loss: str = "fused"  # "fused" (no [N, V] logits) | "plain" (materialised logits)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    grad_checkpointing: bool = False
    max_len: int = 256
    vocab_size: int = 2048  # for a tokenizer trained on the data (no base tokenizer)
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    stop_after: int | None = None  # end this run after that many steps (checkpointed); the
    #                                schedule still spans `steps`, so a resumed run continues it
    val_fraction: float = 0.05
    progress: bool = True

    def __post_init__(self):
        # the fields set away from their defaults: on resume, those must agree with the saved run
        self._given = {f.name for f in fields(self) if getattr(self, f.name) != f.default}
        self._check_objective_and_length()
        self._check_out_and_seed()
        self._check_objective_settings()
        self._resolve_rate_and_heads()
        self._check_sizes()
        self._check_precision_and_device()

    def _check_objective_and_length(self) -> None:
        """The objective, and the run's length: steps or epochs (200 steps when neither is given)."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}: expected one of {OBJECTIVES}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set steps or epochs, not both")
        if self.steps is None and self.epochs is None:
            self.steps = 200
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs must be a finite number > 0, got {self.epochs}")

    def _check_out_and_seed(self) -> None:
        if not str(self.out).strip():
            raise ValueError("out (--out) is empty: name a run directory")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"out (--out) {str(self.out)!r} is a file, not a run directory")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed}")

    def _check_objective_settings(self) -> None:
        """MEDUSA needs a base; the MEDUSA-only, MEDUSA-2-only and MTP-only settings need their
        objective, and the ratios and coefficients are finite and positive."""
        medusa = self.objective in ("medusa", "medusa2")
        if self.objective == "medusa" and not self.base:
            raise ValueError("objective 'medusa' needs a trained base model (base=..., --base): MEDUSA-1 freezes it")
        if self.objective == "medusa2" and not self.base:
            raise ValueError("objective 'medusa2' needs a trained base model (base=..., --base): MEDUSA-2 "
                             "fine-tunes it together with the heads")
        if self.medusa_proj and not medusa:
            raise ValueError(f"medusa_proj (--medusa-proj) gives MEDUSA heads their own unembedding: objective "
                             f"{self.objective!r} has no MEDUSA heads")
        if self.objective != "medusa2":
            for name, default in (("backbone_loss", "ce"), ("teacher", None), ("head_warmup", None)):
                if getattr(self, name) != default:
                    raise ValueError(f"{name} ({_flag(name)}) is a MEDUSA-2 setting: objective "
                                     f"{self.objective!r} does not take it")
        if self.backbone_loss not in BACKBONE_LOSSES:
            raise ValueError(f"unknown backbone_loss {self.backbone_loss!r}: expected one of {BACKBONE_LOSSES}")
        if self.teacher is not None and self.backbone_loss != "kl":
            raise ValueError("teacher (--teacher) is the KL teacher: it needs backbone_loss 'kl' (--backbone-loss kl)")
        if not (math.isfinite(self.heads_coefficient) and self.heads_coefficient > 0):
            raise ValueError(f"heads_coefficient must be a finite number > 0, got {self.heads_coefficient}")
        if not (math.isfinite(self.backbone_lr_ratio) and self.backbone_lr_ratio > 0):
            raise ValueError(f"backbone_lr_ratio must be a finite number > 0, got {self.backbone_lr_ratio}")
        if not (math.isfinite(self.trunk_lr_ratio) and self.trunk_lr_ratio > 0):
            raise ValueError(f"trunk_lr_ratio must be a finite number > 0, got {self.trunk_lr_ratio}")
        if self.trunk_lr_ratio != 1.0 and self.objective != "mtp":
            raise ValueError(f"trunk_lr_ratio (--trunk-lr-ratio) is an MTP setting: objective {self.objective!r} "
                             "does not take it")

    def _resolve_rate_and_heads(self) -> None:
        """The model shape; the objective's defaults for lr, n_heads and MEDUSA's head_weights, checked."""
        medusa = self.objective in ("medusa", "medusa2")
        if self.config not in SHAPES:
            raise ValueError(f"unknown model config {self.config!r}: expected one of {SHAPES}")
        if self.lr is None:
            self.lr = 1e-3 if medusa else 3e-4
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.n_heads is None:  # MEDUSA's 5 heads and the next-token head; Gloeckle et al.'s 4
            self.n_heads = {"ntp": 1, "mtp": 4, "medusa": 6, "medusa2": 6}[self.objective]
        if self.n_heads < 1 or (self.objective == "ntp" and self.n_heads != 1):
            raise ValueError(f"n_heads={self.n_heads} is invalid for objective {self.objective!r}")
        if self.objective == "mtp" and self.n_heads < 2:
            raise ValueError("objective 'mtp' needs n_heads >= 2 (n_heads counts every head: head 0 and at least "
                             "one draft head): a model with one head cannot decode with the mtp strategy")
        if medusa and self.n_heads < 2:
            raise ValueError(f"objective {self.objective!r} needs n_heads >= 2 (n_heads counts every head: the "
                             "next-token head and at least one MEDUSA head)")
        if medusa:
            if self.head_weights is None:
                self.head_weights = [0.8**k for k in range(self.n_heads - 1)]
            if len(self.head_weights) != self.n_heads - 1:
                raise ValueError(f"head_weights has {len(self.head_weights)} entries, but n_heads={self.n_heads} makes "
                                 f"{self.n_heads - 1} MEDUSA heads: one weight per MEDUSA head (n_heads - 1)")

    def _check_sizes(self) -> None:
        """Counts, lengths, warmups and fractions in their ranges."""
        for name in ("batch_size", "grad_accum", "medusa_layers", "eval_every", "eval_batches",
                     "save_every", "log_every", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        assert self.n_heads is not None  # resolved by _resolve_rate_and_heads
        _check_heads_fit(self.n_heads, self.max_len, f", max_len (--max-len) {self.max_len}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.head_warmup is not None and self.head_warmup < 0:
            raise ValueError(f"head_warmup must be >= 0, got {self.head_warmup}")
        if self.steps is not None:  # in epochs the length is known with the data: checked then
            _check_head_warmup(self, self.steps)
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1, got {self.stop_after}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def _check_precision_and_device(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: expected one of {LOSSES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}: expected one of {PRECISIONS}")
        device = resolve_device(self.device)
        if self.precision == "fp16" and device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device (use fp32 or bf16 on CPU)")


def _check_heads_fit(n_heads: int, length: int, which: str) -> None:
    """Head j predicts token t + j + 1: n_heads heads (every head, the next-token head included)
    need sequences longer than n_heads. ``which`` names ``length``, the sequence length they
    are held against."""
    if n_heads < length:
        return
    raise ValueError(f"n_heads (--n-heads) {n_heads} must be below the sequence length{which}: head j predicts "
                     "token t + j + 1, so the last heads would have nothing to predict")


def _check_head_warmup(cfg: "TrainConfig", total: int) -> None:
    """MEDUSA-2's backbone joins after ``head_warmup`` steps: a warmup longer than the run is a
    mistake (the backbone would never train). One as long as the run is the heads' phase of a
    run that a resume with more steps continues, so it is allowed."""
    if cfg.objective == "medusa2" and cfg.head_warmup is not None and cfg.head_warmup > total:
        raise ValueError(f"head_warmup (--head-warmup) {cfg.head_warmup} is longer than the run's {total} steps: "
                         "the backbone would never train; give a shorter warmup or more steps")


def lr_at(step: int, *, lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps,
    then cosine decay to MIN_LR_RATIO * lr at ``total``. A pure function of the step, so a
    resumed run needs no scheduler state beyond the step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    checkpoint: str  # the final checkpoint directory (mtpkern.load_model reads it)
    log_path: str
    steps: int  # optimizer steps done (in all runs of a resumed training)
    val_loss: float | None  # the last evaluation's next-token loss (None if none ran)
    val_ppl: float | None
    head_acc: list[float] | None  # per-head top-1 accuracy at the true offsets
    head_acc_top5: list[float] | None
    wall_time_s: float
    peak_memory_bytes: int  # CUDA max_memory_allocated, or the process's peak RSS on CPU
    interrupted: bool  # stopped by a signal or stop_after before the last step
    signal: int | None = None  # the signal that stopped it (SIGINT, SIGTERM), checkpoint written
    model: nn.Module | None = field(default=None, repr=False)  # the trained model (eval mode)


@dataclass
class FinishedRun:
    """A run that trained to its last step, as ``train(after=...)`` receives it (on rank 0)."""

    config: TrainConfig  # as the run used it (a resumed run's saved configuration)
    model: nn.Module  # the trained model, in eval mode
    val_records: list[dict]  # the run's held-out records (its validation split)
    tokenizer: Any
    checkpoint: Path  # the final checkpoint directory


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became non-finite; the last good checkpoint is kept."""


class _StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop checkpoints and exits at the end of the step.
    A second signal raises KeyboardInterrupt (the atomic checkpoint write survives it)."""

    def __init__(self):
        self.requested = False
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal() only works there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def model_shape(name: str, **ids) -> GPT2Config:
    """The config of a model trained from scratch: ``tiny`` (4 layers x 128, for tests),
    ``demo`` (6 layers x 128: deep enough that an MTP model's 3 extra head blocks are a third of
    its step, as GPT-2 124M's are a fifth, so that speculation can pay on a CPU) or ``gpt2`` (124M)."""
    if name == "gpt2":
        return GPT2Config(**ids)
    return GPT2Config.tiny(**ids, **({"n_layer": 6} if name == "demo" else {}))


def _build_model(cfg: TrainConfig, train_records, checkpoint: Path, world: int):
    """(model, tokenizer): resumed, from ``cfg.base``, or from scratch with a new tokenizer."""
    if cfg.resume:
        model = load_model(checkpoint)
        if not isinstance(model, _OBJECTIVE_CLASSES[cfg.objective].family):
            raise ValueError(f"cannot resume objective {cfg.objective!r} from a {type(model).__name__} checkpoint")
        if model.config.n_heads != cfg.n_heads or model.config.medusa_proj != cfg.medusa_proj:
            raise CheckpointError(f"{checkpoint} holds a model with {model.config.n_heads} heads (medusa_proj "
                                  f"{model.config.medusa_proj}), but its run says n_heads={cfg.n_heads} "
                                  f"(medusa_proj {cfg.medusa_proj})")
        return model, load_tokenizer(checkpoint)  # a lost tokenizer is an error, never an empty one
    torch.manual_seed(cfg.seed)
    tokenizer = None
    if cfg.base:
        base = load_model(cfg.base).float()
        if not is_local(cfg.base):  # a hub name: its tokenizer comes from the hub too
            tokenizer = load_tokenizer(cfg.base)
        elif has_tokenizer(model_source(cfg.base)):
            tokenizer = load_tokenizer(cfg.base)
    if tokenizer is None:
        tokenizer = _rank0_tokenizer(train_records, cfg.vocab_size, world, cfg.progress)
    if not cfg.base:
        ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
        shape = model_shape(cfg.config, **ids)
        shape.n_positions = max(shape.n_positions, cfg.max_len)
        base = GPT2(shape)
    model = _model_for_objective(base, cfg)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")
    return model, tokenizer


def _rank0_tokenizer(records, vocab_size, world, progress: bool):
    """Train a tokenizer on rank 0 and share it, so every rank tokenizes identically."""
    main = not dist.is_initialized() or dist.get_rank() == 0
    check_tokenizer_records(records)
    if main and progress:
        size = sum(len(record_text(r)) for r in records) / 1e6
        print(f"mtpkern train: training a {vocab_size}-token tokenizer on {len(records)} records "
              f"({size:.1f} M characters)", file=sys.stderr)
    start = time.perf_counter()
    # the trainer's own bars draw on stdout: only on a terminal (elsewhere they are blank lines)
    tok = [train_tokenizer(records, vocab_size, progress=progress and sys.stdout.isatty()) if main else None]
    if main and progress:
        print(f"mtpkern train: tokenizer trained in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if world > 1:
        dist.broadcast_object_list(tok, src=0)
    return tok[0]


def _model_for_objective(base, cfg: TrainConfig):
    family = _OBJECTIVE_CLASSES[cfg.objective].family
    if isinstance(base, family):  # continue training a model of the same family
        if cfg.objective != "ntp" and base.config.n_heads != cfg.n_heads:
            raise ValueError(f"base {cfg.base} has {base.config.n_heads} heads, not n_heads={cfg.n_heads}")
        if base.config.medusa_proj != cfg.medusa_proj:
            raise ValueError(f"base {cfg.base} has medusa_proj={base.config.medusa_proj}, not {cfg.medusa_proj}")
        return base
    if type(base) not in BASE_CLASSES.values():  # a GPT2 or a Llama: heads go on either family
        raise ValueError(f"objective {cfg.objective!r} cannot start from a {type(base).__name__} base ({cfg.base})")
    assert cfg.n_heads is not None  # resolved by TrainConfig.__post_init__
    if cfg.objective == "mtp":
        return MTPModel.from_base(base, n_heads=cfg.n_heads)
    return MedusaModel.from_base(base, n_heads=cfg.n_heads, n_layers=cfg.medusa_layers, proj=cfg.medusa_proj)


def _optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the objective's parameter groups (see ``Objective.param_groups``)."""
    groups = [g for g in groups if g["params"]]
    assert cfg.lr is not None  # resolved by TrainConfig.__post_init__
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _all_reduce_grads(params: list[torch.Tensor], world: int) -> None:
    """Average the gradients over the processes in one flat all-reduce (``manual_grad_sync``);
    parameters without a gradient (MEDUSA-2's backbone during the heads' warmup) keep none."""
    params = [p for p in params if p.grad is not None]  # every rank runs the same graph: the same ones
    if not params:
        return
    grads = [p.grad for p in params if p.grad is not None]  # all of them: params is filtered above
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


class _Batches:
    """Deterministic, step-indexed batches: epoch e is a permutation seeded by seed + e, step s
    takes the (s mod steps_per_epoch)-th global batch of it, and micro-batch m of rank r takes
    rows (m * world + r) * batch_size onwards. The data position is the step alone."""

    def __init__(self, dataset, batch_size, grad_accum, world, rank, seed, pad_id, n_heads):
        self.dataset, self.batch_size, self.grad_accum = dataset, batch_size, grad_accum
        self.world, self.rank, self.seed, self.pad_id, self.n_heads = world, rank, seed, pad_id, n_heads
        self.global_batch = batch_size * grad_accum * world
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the global batch of {self.global_batch} exceeds the {len(dataset)} training examples")
        self._epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def __call__(self, step: int):
        """Micro-batches [(input_ids, labels)] of this rank, the global label counts N_j per head
        and the global number of real tokens."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch or self._perm is None:
            self._epoch = epoch
            self._perm = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
        rows = self._perm[i * self.global_batch : (i + 1) * self.global_batch].tolist()
        batch = collate([self.dataset[r] for r in rows], self.pad_id)
        width = self.n_heads + 1  # head j reads label t + j + 1: padded so, it has none where no row reaches it
        if batch["input_ids"].shape[1] < width:
            extra = width - batch["input_ids"].shape[1]
            batch["input_ids"] = F.pad(batch["input_ids"], (0, extra), value=self.pad_id)
            batch["labels"] = F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
        labels, lengths = batch["labels"], batch["attention_mask"].sum(1)
        n_tokens = [int((labels[:, j + 1 :] != IGNORE_INDEX).sum()) for j in range(self.n_heads)]
        micro = []
        for m in range(self.grad_accum):
            lo = (m * self.world + self.rank) * self.batch_size
            sl = slice(lo, lo + self.batch_size)
            L = max(int(lengths[sl].max()), width)  # trim the padding this micro-batch does not need
            micro.append((batch["input_ids"][sl, :L], labels[sl, :L]))
        return micro, n_tokens, int(lengths.sum())


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # a copy from pageable memory would make the host wait for the GPU's queue: pin it first
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision``, or None for full fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        # bf16 where the GPU has it natively; emulated bf16 (pre-Ampere) is slower than fp16 + a scaler
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    dtype = resolve_dtype(precision)
    return None if dtype is torch.float32 else dtype


def train(cfg: TrainConfig, *, after: Callable[[FinishedRun], object] | None = None) -> TrainResult:
    """Train ``cfg.objective`` and write OUT/checkpoint, OUT/log.jsonl, OUT/train_config.json and
    OUT/summary.json (see the module docstring). Works unchanged under torchrun.

    ``after(run)``: called with the :class:`FinishedRun` of a run that trained to its last step
    (not one stopped early), on rank 0, still holding the run directory's lock, after the
    summary is written. Training does not calibrate: ``mtpkern train`` does, as ``after``
    (:func:`mtpkern.commands.train_and_calibrate`: this run, then ``calibration.json``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0"))).type == "cuda" else "gloo"
        dist.init_process_group(backend)
        # destroyed at exit, not after this run: a process group initialised again after a
        # destroy reads stale rendezvous keys under torchrun (gloo then fails to connect)
        atexit.register(_destroy_process_group)
    return _train(cfg, world, after)


def _destroy_process_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arg(name: str, value) -> str:
    """A setting as the Python API and the command line spell it: ``steps=50 (--steps 50)``."""
    return f"{name}=True ({_flag(name)})" if value is True else f"{name}={value!r} ({_flag(name)} {value})"


def resumed_config(cfg: TrainConfig, saved: dict) -> TrainConfig:
    """The configuration of a resumed run: the saved one, with ``cfg``'s per-process fields and
    the fields of RESUME_MAY_CHANGE that ``cfg`` sets. Any other field that ``cfg`` sets to a
    value contradicting the saved one is a ``ValueError`` naming the flag. ``saved``: in the current
    format, as :func:`mtpkern.rundir.read_state` returns it (an older run's MEDUSA n_heads converted)."""
    if saved.get("objective") != cfg.objective:
        raise ValueError(f"{Path(cfg.out) / CHECKPOINT_DIR} was trained with objective "
                         f"{saved.get('objective')!r}, not {cfg.objective!r}")
    names = {f.name for f in fields(TrainConfig)}
    for name in sorted(cfg._given - set(RESUME_MAY_CHANGE) - set(_PER_PROCESS) - {"objective"}):
        if name in saved and getattr(cfg, name) != saved[name]:
            raise ValueError(
                f"{_flag(name)} {getattr(cfg, name)!r} contradicts the run's saved {saved[name]!r}: a resumed run "
                f"keeps its configuration; only {', '.join(_flag(n) for n in RESUME_MAY_CHANGE)} may change")
    merged = {k: v for k, v in saved.items() if k in names}
    changed = {k: getattr(cfg, k) for k in RESUME_MAY_CHANGE if k in cfg._given}
    if "steps" in changed or "epochs" in changed:  # a new length replaces the old one, in either unit
        merged["steps"] = merged["epochs"] = None
    merged.update(changed)
    merged.update({k: getattr(cfg, k) for k in _PER_PROCESS})
    return TrainConfig(**merged)


def _train(cfg: TrainConfig, world: int, after: Callable[[FinishedRun], object] | None) -> TrainResult:
    """Hold the run directory's lock (rank 0) for the whole run: a second training into the
    same ``out`` fails at once instead of interleaving logs and checkpoints."""
    main = world == 1 or dist.get_rank() == 0
    if not cfg.resume:
        refuse_foreign_out(Path(cfg.out), cfg.data)
    with run_lock(cfg.out) if main else contextlib.nullcontext():
        return _train_locked(cfg, world, after)


def _refuse_no_steps_left(cfg: TrainConfig, given: set, ckpt_dir: Path, done: int, end: int) -> None:
    """A resumed run that would end at or before its saved step would train nothing and
    overwrite its summary with empty metrics: refused, the run left as it is. ``given``: the
    settings the caller gave (the rest came from the saved run)."""
    if end > done:
        return
    if cfg.stop_after is not None and cfg.stop_after <= done:
        asked = f"stop_after={cfg.stop_after}"
    elif "epochs" in given:
        asked = f"{_arg('epochs', cfg.epochs)}, {end} steps,"
    elif "steps" in given:
        asked = _arg("steps", end)
    else:
        asked = f"its saved length of {end} steps"
    raise ValueError(f"{ckpt_dir} is already at step {done}: {asked} ends there, so there is nothing to train; "
                     f"pass steps=N (--steps N) with N above {done} to extend the run")


def _refuse_too_few_records(cfg: TrainConfig, n: int) -> None:
    """One record would leave nothing to train on or nothing to validate on."""
    if n >= 2:
        return
    source = str(cfg.data) if cfg.data_limit is None else f"{cfg.data} with {_arg('data_limit', cfg.data_limit)}"
    raise DataError(f"{source} holds {n} record{'' if n == 1 else 's'}: training needs at least 2 (one to train on, "
                    "one held out for validation)")


def _validation_set(records: list[dict], tokenizer, max_len: int) -> SFTDataset:
    """The validation examples; when none fits ``max_len`` the run goes on without them, warned."""
    try:
        return SFTDataset(records, tokenizer, max_len)
    except DataError:
        warnings.warn(f"no validation record fits max_len={max_len}: the run reports no validation metrics "
                      "(every held-out prompt alone fills it)", stacklevel=4)
        return SFTDataset([], tokenizer, max_len)


def _open_run(cfg: TrainConfig, out: Path, ckpt_dir: Path, world: int, main: bool) -> tuple[TrainConfig, dict | None]:
    """A fresh run (refused where a checkpoint or an interrupted save is in the way) or a
    resumed one: ``(its configuration, the saved trainer state or None)``. A resumed run keeps
    its saved configuration (see :func:`resumed_config`)."""
    if cfg.resume:
        if main:
            recovered = recover_interrupted_save(ckpt_dir)
            if recovered is not None:
                print(f"mtpkern train: recovered {ckpt_dir} from {recovered.name} (a save was interrupted)",
                      file=sys.stderr)
        if world > 1:
            dist.barrier()
        state = read_state(ckpt_dir)
        given = cfg._given
        resumed = resumed_config(cfg, state["config"])
        if "steps" in given:  # known before the data is: refused at once
            assert resumed.steps is not None  # given
            _refuse_no_steps_left(resumed, given, ckpt_dir, state["step"], resumed.steps)
        return resumed, state
    if ckpt_dir.exists():
        raise ValueError(f"{ckpt_dir} already exists: pass resume=True (--resume) to continue it, "
                         "or choose another out (--out)")
    if (half_saved := interrupted_save(ckpt_dir)) is not None:
        raise ValueError(f"{out} holds the checkpoint of an interrupted save ({half_saved.name}): "
                         "pass resume=True (--resume) to recover and continue it, or choose another out")
    if main:
        recover_interrupted_save(ckpt_dir)  # nothing to recover: removes stale temporary folders
    return cfg, None


class _Run:
    """One training run between its steps, as nanoGPT's train.py lays it out: set up (resume
    or start, the data, the model, the optimizer), then a step, its log, its evaluation and its
    checkpoint, each a method; :meth:`loop` strings them together."""

    def __init__(self, cfg: TrainConfig, world: int):
        self.t_start = time.perf_counter()
        self.world, self.rank = world, dist.get_rank() if world > 1 else 0
        self.main = self.rank == 0
        self.device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        reset_peak_memory(self.device)
        self.out = Path(cfg.out)
        self.ckpt_dir, self.log_path = self.out / CHECKPOINT_DIR, self.out / LOG_NAME
        self.given = cfg._given
        self.cfg, self.state = _open_run(cfg, self.out, self.ckpt_dir, world, self.main)
        self._load_data()
        self._prepare_training()
        self._restore()
        self._start_files()

    def _load_data(self) -> None:
        """The records and their split, the model and tokenizer, the batches and the schedule's length."""
        cfg = self.cfg
        assert cfg.n_heads is not None  # resolved by TrainConfig.__post_init__
        records = load_records(cfg.data, seed=cfg.seed, limit=cfg.data_limit)
        _refuse_too_few_records(cfg, len(records))
        train_records, self.val_records = split_records(records, cfg.val_fraction, cfg.seed)
        self.model, self.tokenizer = _build_model(cfg, train_records, self.ckpt_dir, self.world)
        max_len = min(cfg.max_len, self.model.config.n_positions)  # a base's shorter context wins
        train_ds = SFTDataset(train_records, self.tokenizer, max_len)
        self.val_ds = _validation_set(self.val_records, self.tokenizer, max_len)
        longest = max(len(ids) for ids, _ in train_ds.examples)
        _check_heads_fit(cfg.n_heads, longest,
                         f", and the longest training sequence has {longest} tokens (max_len {max_len})")
        pad_id = self.tokenizer.pad_token_id
        self.batches = _Batches(train_ds, cfg.batch_size, cfg.grad_accum, self.world, self.rank, cfg.seed,
                                pad_id, self.model.n_heads)
        self.total = cfg.steps or math.ceil(cfg.epochs * self.batches.steps_per_epoch)
        self.stop_at = min(self.total, cfg.stop_after) if cfg.stop_after else self.total
        if self.state is not None:
            _refuse_no_steps_left(cfg, self.given, self.ckpt_dir, self.state["step"], self.stop_at)
        _check_head_warmup(cfg, self.total)
        self.warmup = cfg.warmup if cfg.warmup is not None else round(0.05 * self.total)
        self.val_loader = torch.utils.data.DataLoader(self.val_ds, batch_size=cfg.batch_size,
                                                      collate_fn=partial(collate, pad_id=pad_id))

    def _prepare_training(self) -> None:
        """The objective, the model on its device, the optimizer, mixed precision and DDP."""
        cfg, device, model = self.cfg, self.device, self.model
        if cfg.objective == "medusa2" and cfg.head_warmup is None:  # resolved once: saved with the run, kept on resume
            self.cfg = cfg = replace(cfg, head_warmup=round(0.25 * self.total))
        assert cfg.lr is not None  # resolved by TrainConfig.__post_init__
        self.peak_lr: float = cfg.lr
        self.fused = cfg.loss == "fused"
        self.objective = _OBJECTIVE_CLASSES[cfg.objective](cfg, fused=self.fused)
        model.to(device)
        self.objective.prepare(model, device)
        model.gradient_checkpointing = cfg.grad_checkpointing
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = _optimizer(self.objective.param_groups(model), cfg, device)
        amp_dtype = _amp_dtype(cfg.precision, device)
        self.autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
        self.ddp = None
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

    def _restore(self) -> None:
        """The counters, and on resume the optimizer, scaler and random state of the checkpoint."""
        self.step, self.elapsed_before, self.tokens_seen = 0, 0.0, 0
        self.saved_step: int | None = None
        state = self.state
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.step, self.elapsed_before, self.tokens_seen = state["step"], state["elapsed_s"], state["tokens"]
            self.saved_step = state["step"]
            torch.set_rng_state(state["rng"]["torch"])
            if self.device.type == "cuda" and "cuda" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.first_bad = torch.full((), _NEVER, dtype=torch.long, device=self.device)  # first non-finite step
        # the logged objective and per-head losses, summed over the steps of a log interval
        self.interval = torch.zeros(1 + self.objective.n_logged(self.model), device=self.device)
        self.interval_steps, self.interval_tokens = 0, 0
        self.metrics: dict | None = None

    def _start_files(self) -> None:
        """train_config.json, and the log (on resume, its records up to the checkpoint's step)."""
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / CONFIG_NAME, saved_config(self.cfg))
            start_log(self.log_path, self.step, self.cfg.resume)

    def elapsed(self) -> float:
        """Training seconds, over every run of a resumed training."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def log(self, record: dict) -> None:
        if self.main:
            append_log(self.log_path, record)

    # ------------------------------------------------------------------------- the loop

    def loop(self) -> int | None:
        """Train up to ``stop_at``: each step, then its log, evaluation and checkpoint where they
        fall. Returns the signal that stopped it early (its checkpoint written), or None."""
        cfg = self.cfg
        self.t_interval = time.perf_counter()
        self.progress = _progress_bar(cfg, self.main, self.total, self.step)
        stopped_by = None
        with _StopRequest() as stop:
            while self.step < self.stop_at:
                lr, grad_norm = self.train_step()
                at_log = self.step % cfg.log_every == 0 or self.step == self.stop_at
                stopping = stop.requested
                if at_log:
                    stopping = self.log_interval(lr, grad_norm, stop)
                elif self.ddp:
                    stopping = False  # ranks agree on stopping at log steps only (no per-step sync)
                t_pause = time.perf_counter()
                if self.step % cfg.eval_every == 0 or self.step == self.total:
                    self.metrics = self.evaluate() or self.metrics
                if self.step % cfg.save_every == 0 or self.step == self.stop_at or stopping:
                    self.save()
                if at_log:
                    self.t_interval = time.perf_counter()
                else:
                    self.t_interval += time.perf_counter() - t_pause  # eval and saving are not training time
                if stopping:
                    stopped_by = stop.signum or signal.SIGTERM  # under DDP a peer may have got it
                    break
        self.progress.close()
        return stopped_by

    def train_step(self) -> tuple[float, torch.Tensor]:
        """One optimizer step on the global batch of this step: its learning rate and gradient norm."""
        objective, device = self.objective, self.device
        micro, n_tokens, n_real = self.batches(self.step)
        step_loss = torch.zeros((), device=device)
        lr = lr_at(self.step, lr=self.peak_lr, warmup=self.warmup, total=self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * objective.lr_scale(group.get("part", "all"), self.step, self.warmup)
        for m, (idx, labels) in enumerate(micro):
            idx, labels = _to_device(idx, device), _to_device(labels, device)
            loss, per_head = objective.backward(self.model, self.ddp, idx, labels, n_tokens=n_tokens, step=self.step,
                                                world=self.world, scaler=self.scaler, autocast=self.autocast,
                                                last=m == len(micro) - 1)
            self.interval += torch.cat([loss.reshape(1), per_head])
            step_loss += loss.float()
        if objective.manual_grad_sync and self.ddp:
            _all_reduce_grads(self.params, self.world)
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        finite = torch.isfinite(step_loss)
        if not self.scaler.is_enabled():  # fp16's scaler skips non-finite steps by design
            finite &= torch.isfinite(grad_norm)
        self.first_bad = torch.where(finite, self.first_bad, torch.clamp(self.first_bad, max=self.step + 1))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += n_real
        self.interval_steps += 1
        self.interval_tokens += n_real
        self.progress.update(1)
        return lr, grad_norm

    def log_interval(self, lr: float, grad_norm: torch.Tensor, stop: _StopRequest) -> bool:
        """Log the steps since the last record, in one host sync that under DDP also agrees on a
        stop request; whether to stop."""
        self.check_finite()
        flags_dev = torch.cat([self.interval, torch.tensor([float(stop.requested)], device=self.device)])
        if self.ddp:
            dist.all_reduce(flags_dev)
        flags = flags_dev.tolist()
        n, dt = self.interval_steps, time.perf_counter() - self.t_interval
        record = {
            "kind": "train", "step": self.step, "loss": flags[0] / n, "head_losses": [x / n for x in flags[1:-1]],
            "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": self.interval_tokens / max(dt, 1e-9),
            "peak_memory_bytes": peak_memory(self.device)[0], "elapsed_s": self.elapsed(),
        }
        self.log(record)
        self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        self.interval.zero_()
        self.interval_steps, self.interval_tokens = 0, 0
        return flags[-1] > 0

    def check_finite(self) -> None:
        """Stop on a non-finite loss or gradient (one host sync; at log and save steps only)."""
        bad = self.first_bad.clone()
        if self.ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        bad_step = int(bad)
        if bad_step >= _NEVER:
            return
        kept = (f"{self.ckpt_dir} keeps step {self.saved_step}" if self.saved_step is not None
                else "no checkpoint was written")
        lr = lr_at(bad_step - 1, lr=self.peak_lr, warmup=self.warmup, total=self.total)
        message = (f"training diverged: the loss or gradient norm became non-finite at step {bad_step} "
                   f"(lr {lr:.3g}); stopped without saving, {kept}")
        self.log({"kind": "error", "step": bad_step, "error": message})
        raise TrainingDiverged(message)

    def save(self) -> None:
        """The checkpoint of this step (rank 0, between barriers), never of non-finite weights."""
        self.check_finite()
        if self.world > 1:
            dist.barrier()
        if self.main:
            if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
                raise TrainingDiverged(f"the weights hold non-finite values at step {self.step}; "
                                       f"stopped without overwriting {self.ckpt_dir}")
            save_checkpoint(self.ckpt_dir, self.model, self.tokenizer, self._state())
            self.saved_step = self.step
        if self.world > 1:
            dist.barrier()

    def _state(self) -> dict:
        """The trainer's state saved beside the weights: what a resumed run continues from."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        per_epoch = self.batches.steps_per_epoch
        return {
            "step": self.step, "total_steps": self.total, "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng, "config": saved_config(self.cfg), "tokens": self.tokens_seen,
            "elapsed_s": self.elapsed(),
            "data_position": {"epoch": self.step // per_epoch, "batch_in_epoch": self.step % per_epoch},
        }

    def evaluate(self) -> dict | None:
        """Every head's validation metrics (rank 0), logged; None without validation examples."""
        if not self.main or len(self.val_ds) == 0:
            return None
        with self.autocast:
            m = evaluate_heads(self.model, self.val_loader, self.device, self.cfg.eval_batches, fused=self.fused)
        self.log({"kind": "eval", "step": self.step, "val_loss": m["loss"], "val_ppl": m["ppl"],
                  "val_head_loss": m["head_loss"], "val_acc_top1": m["acc_top1"], "val_acc_top5": m["acc_top5"]})
        return m

    # ------------------------------------------------------------------------- the end

    def result(self, stopped_by: int | None) -> tuple[TrainResult, str]:
        """The run's result (the last evaluation's metrics shared by rank 0) and the kind of its peak memory."""
        metrics = self.metrics
        if self.world > 1:
            shared = [metrics]
            dist.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        peak, peak_kind = peak_memory(self.device)
        return TrainResult(
            checkpoint=str(self.ckpt_dir), log_path=str(self.log_path), steps=self.step,
            val_loss=metrics["loss"] if metrics else None, val_ppl=metrics["ppl"] if metrics else None,
            head_acc=metrics["acc_top1"] if metrics else None,
            head_acc_top5=metrics["acc_top5"] if metrics else None,
            wall_time_s=self.elapsed(), peak_memory_bytes=peak, interrupted=self.step < self.total,
            model=self.model.eval(), signal=stopped_by,
        ), peak_kind

    def write_summary(self, result: TrainResult, peak_kind: str) -> None:
        """summary.json: the result and the run's totals."""
        wall, model = result.wall_time_s, self.model
        summary = {f.name: getattr(result, f.name) for f in fields(result) if f.name != "model"}
        summary.update(
            objective=self.cfg.objective, total_steps=self.total, tokens=self.tokens_seen,
            tokens_per_s=self.tokens_seen / max(wall, 1e-9),
            time_per_epoch_s=wall * self.batches.steps_per_epoch / max(self.step, 1),
            peak_memory_kind=peak_kind,
            parameters=model.num_parameters(), trainable_parameters=model.num_parameters(trainable_only=True),
        )
        write_json(self.out / SUMMARY_NAME, summary)

    def finished(self) -> FinishedRun:
        return FinishedRun(config=self.cfg, model=self.model, val_records=self.val_records, tokenizer=self.tokenizer,
                           checkpoint=self.ckpt_dir)


_NEVER = 2**62  # first_bad before any non-finite step


def _train_locked(cfg: TrainConfig, world: int, after: Callable[[FinishedRun], object] | None) -> TrainResult:
    run = _Run(cfg, world)
    stopped_by = run.loop()
    result, peak_kind = run.result(stopped_by)
    if run.main:
        run.write_summary(result, peak_kind)
        if after is not None and not result.interrupted:
            after(run.finished())
    return result


def _progress_bar(cfg: TrainConfig, main: bool, total: int, step: int):
    return tqdm(total=total, initial=step, desc=f"train {cfg.objective}", disable=not (main and cfg.progress),
                dynamic_ncols=True)
