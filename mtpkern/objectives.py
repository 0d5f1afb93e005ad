"""One small object per training objective: its loss and per-head metrics from a batch.

Labels are aligned with the inputs (the Hugging Face convention) and ``-100`` marks tokens
without a target (prompt, padding). Head j at position t predicts token t + j + 1, so its loss
is the cross-entropy against the labels shifted by j + 1:

    CE_j = (1 / N_j) * sum_{b, t} -log softmax(z_j[b, t])[labels[b, t + j + 1]]

over the N_j positions whose shifted label is not -100. ``n = n_heads`` counts every head, the
next-token head (j = 0) included; MEDUSA head k (k = 0 .. n - 2) is head k + 1. The objectives:

    ntp:     L = CE_0                                  all parameters
    mtp:     L = (1 / n) * sum_{j < n} CE_j            all parameters (Gloeckle et al. 2024)
    medusa:  L = sum_k w_k * CE_{k+1},  w_k = 0.8**k   MEDUSA heads only, the base frozen
                                                       (MEDUSA-1, Cai et al. 2024)
    medusa2: L = B + lambda * sum_k w_k * CE_{k+1}     backbone and heads (MEDUSA-2, same paper)
             B = CE_0, or with a teacher p (the original model, self-distillation)
             B = (1 / N_0) sum_{b, t} KL(p[b, t] || softmax(z_0[b, t]))

MEDUSA-2's recipe (Cai et al. 2024, section 2.2.2, and the defaults of its training code,
FasterDecoding/Medusa): lambda = 0.2 (``medusa_heads_coefficient``), w_k = 0.8**k
(``medusa_decay_coefficient``), the heads' learning rate 4x the backbone's
(``medusa_lr_multiplier``), and the heads warmed up first: for ``head_warmup`` steps (default
25% of the run: our choice, the paper trains MEDUSA-1 first for a whole stage) the backbone
is held fixed and L = sum_k w_k CE_{k+1}, as in MEDUSA-1; then the backbone joins, its
learning rate ramping up over the run's ``warmup`` steps.

Every head's cross-entropy goes through the fused linear cross-entropy
(``mtpkern.ops.linear_cross_entropy``: no [N, V] logits) unless ``fused=False``; the KL term
needs the teacher's and the student's full distributions, so it materialises head 0's logits.

An ``Objective`` gives the loop three things: its parameter groups (each with an ``lr_scale``
at a step), ``backward`` (the loss of one micro-batch, backpropagated; detached (L, per-head
losses) returned without a host sync) and ``n_logged`` (the number of per-head losses).
"""

from __future__ import annotations

import contextlib
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtpkern.data import IGNORE_INDEX
from mtpkern.hf_io import load_model
from mtpkern.models import GPT2, MedusaModel, MTPModel
from mtpkern.models import SpeculativeLM as _Family
from mtpkern.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_accumulate_

# ----------------------------------------------------------------------------- losses


def _unwrap(model: nn.Module) -> _Family:
    """The model of the family itself, from under a DDP wrapper too."""
    return cast(_Family, model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)


def head_logits(model: nn.Module, hidden_j: torch.Tensor, j: int) -> torch.Tensor:
    """Head j's float logits from its hidden states [..., D] (through a DDP wrapper too)."""
    return _unwrap(model).head_logits(hidden_j, j)


def head_loss(model, hidden_j: torch.Tensor, labels: torch.Tensor, j: int, n_tokens=None, fused: bool = True,
              weight: torch.Tensor | None = None):
    """CE_j = (1 / N_j) sum_{b,t} -log softmax(hidden_j[b, t] W_j^T)[labels[b, t + j + 1]],
    over labels that are not -100. N_j = ``n_tokens[j]`` when given (a global count), else the
    number of such labels in this batch. ``weight`` replaces W_j (default: head j's own).
    Logits exist only for positions that have a target."""
    T = labels.shape[1]
    target = labels[:, j + 1 :]
    hidden, rows = target_rows(hidden_j[:, : T - j - 1].flatten(0, 1), target.flatten())
    w = _unwrap(model).head_weight(j) if weight is None else weight
    if fused:
        ce = linear_cross_entropy(hidden, w, rows, IGNORE_INDEX, "sum")
    else:
        ce = F.cross_entropy((hidden @ w.T).float(), rows, ignore_index=IGNORE_INDEX, reduction="sum")
    n = (target != IGNORE_INDEX).sum().clamp(min=1) if n_tokens is None else max(n_tokens[j], 1)
    return ce / n


def target_rows(hidden: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [N, D], target [N]) without the rows whose target is ``IGNORE_INDEX`` (the prompt,
    the padding), on the CPU: their logits would cost as much as the others' and add nothing.
    On other devices every row stays (the kernels give ignored rows no loss and no gradient),
    since selecting them would wait on the device."""
    if target.device.type != "cpu":
        return hidden, target
    keep = target != IGNORE_INDEX
    if not bool(keep.any()):
        return hidden, target
    return hidden[keep], target[keep]


def kl_to_teacher(model, hidden0: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  n_tokens=None) -> torch.Tensor:
    """(1 / N_0) sum_{b,t} KL(softmax(teacher[b, t]) || softmax(z_0[b, t])) over the positions
    whose next-token label is not -100 (the positions CE_0 scores), in fp32."""
    T = labels.shape[1]
    valid = labels[:, 1:] != IGNORE_INDEX
    student = F.log_softmax(head_logits(model, hidden0[:, : T - 1][valid], 0), dim=-1)
    teacher = F.log_softmax(teacher_logits[:, : T - 1][valid].float(), dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum")
    n = valid.sum().clamp(min=1) if n_tokens is None else max(n_tokens[0], 1)
    return kl / n


def _forward_loss(model, idx, labels, heads, weights, n_tokens=None, fused=True):
    """One forward, then sum_j weights[j] * CE_{heads[j]}; returns (loss, per-head CE)."""
    hidden = model(idx, logits=False).hidden
    per_head = [head_loss(model, hidden[:, :, j], labels, j, n_tokens, fused) for j in heads]
    loss = sum(w * ce for w, ce in zip(weights, per_head))
    return loss, torch.stack(per_head).detach()


def ntp_loss(model, idx, labels, *, n_tokens=None, fused=True):
    """L = CE_0 (plain next-token prediction). Returns (loss, per_head [1])."""
    return _forward_loss(model, idx, labels, [0], [1.0], n_tokens, fused)


def mtp_loss_naive(model, idx, labels, *, n_tokens=None, fused=True) -> torch.Tensor:
    """L = (1/n) sum_j CE_j from one full forward: all n heads' logits are alive at once.
    The reference for ``mtp_loss_and_backward`` and the baseline of the memory benchmark."""
    J = _unwrap(model).n_heads
    return _forward_loss(model, idx, labels, range(J), [1.0 / J] * J, n_tokens, fused)[0]


def medusa_loss(model, idx, labels, head_weights, *, n_tokens=None, fused=True):
    """MEDUSA-1: L = sum_k w_k CE_{k+1} over the MEDUSA heads only (model head k + 1 predicts
    token t + k + 2); the frozen base (head 0) gets no loss. Returns (loss, per_head [n])."""
    n = _unwrap(model).n_heads - 1
    if len(head_weights) != n:
        raise ValueError(f"{len(head_weights)} head weights for {n} MEDUSA heads: one per MEDUSA head "
                         f"(the model's n_heads {n + 1} - 1)")
    return _forward_loss(model, idx, labels, range(1, n + 1), list(head_weights), n_tokens, fused)


def medusa2_loss(model, idx, labels, head_weights, *, heads_coefficient: float, train_backbone: bool = True,
                 teacher: nn.Module | None = None, n_tokens=None, fused=True):
    """MEDUSA-2: L = B + lambda * sum_k w_k CE_{k+1} (see the module docstring), or, with
    ``train_backbone=False`` (the heads' warmup), L = sum_k w_k CE_{k+1} with the backbone
    and the shared unembedding held fixed (no gradient reaches them). Returns (loss,
    per_head [1 + n]): B (or CE_0, as a metric, during the warmup) then each CE_{k+1}."""
    m = cast(MedusaModel, _unwrap(model))
    n = m.n_heads - 1
    if len(head_weights) != n:
        raise ValueError(f"{len(head_weights)} head weights for {n} MEDUSA heads: one per MEDUSA head "
                         f"(the model's n_heads {n + 1} - 1)")
    with torch.set_grad_enabled(torch.is_grad_enabled() and train_backbone):
        h0 = m.base.hidden_states(idx)
    shared = m.unembed_weight if train_backbone else m.unembed_weight.detach()
    ce = [head_loss(m, m.medusa[k](h0), labels, k + 1, n_tokens, fused,
                    weight=None if m.medusa[k].proj is not None else shared) for k in range(n)]
    heads = sum(w * c for w, c in zip(head_weights, ce))
    with torch.set_grad_enabled(torch.is_grad_enabled() and train_backbone):
        if teacher is not None:
            with torch.no_grad():
                target = teacher(idx).logits[:, :, 0]
            backbone = kl_to_teacher(m, h0, target, labels, n_tokens)
        else:
            backbone = head_loss(m, h0, labels, 0, n_tokens, fused)
    loss = backbone + heads_coefficient * heads if train_backbone else heads
    return loss, torch.stack([backbone.detach()] + [c.detach() for c in ce])


def mtp_loss_and_backward(model: MTPModel, idx, labels, *, scale: float = 1.0, n_tokens=None, scaler=None,
                          fused=True):
    """Backpropagate scale * L, L = (1/n) sum_j CE_j, in Gloeckle et al.'s memory-efficient order.

    The trunk runs forward once; its output h is detached into a leaf. Each head j then runs
    forward on the leaf, computes CE_j and backpropagates it into the head's weights and the
    leaf's gradient, and its graph (logits included) is freed before the next head. A final
    trunk backward with the accumulated dL/dh ends the pass. Gradients equal those of
    ``mtp_loss_naive`` (the same sum, split by linearity). Call it inside the caller's autocast;
    the backward calls run with autocast off, as PyTorch recommends. ``scaler`` is an optional
    ``torch.amp.GradScaler`` (fp16). Returns detached (L, per_head [n]) tensors: no host sync
    (off the CPU: there, rows without a target are dropped first, ``target_rows``).
    Peak logits memory is O(V) instead of O(nV).
    """
    J = model.n_heads
    h = model.trunk_forward(idx)
    h_leaf = h.detach().requires_grad_()
    per_head = []
    backward = torch.autocast(idx.device.type, enabled=False)
    W = model.unembed_weight
    # Fused: the heads' shared unembedding gradient is added into W.grad in place by each head
    # (linear_cross_entropy_accumulate_), never one [V, D] buffer per head beside it.
    into = (fused and W.requires_grad and W.dtype in (torch.float32, torch.float64)
            and all(model.head_weight(j) is W for j in range(J)))
    if into and W.grad is None:
        W.grad = torch.zeros_like(W, dtype=torch.float64 if W.dtype == torch.float64 else torch.float32)
    for j in range(J):
        hidden_j = model.head_forward(j, h_leaf)
        if into:
            T = labels.shape[1]
            target = labels[:, j + 1 :].flatten()
            n = (target != IGNORE_INDEX).sum().clamp(min=1) if n_tokens is None else max(n_tokens[j], 1)
            g = torch.as_tensor(scale / J, dtype=torch.float64, device=W.device) / n
            if scaler is not None:
                g = scaler.scale(g)
            x, target = target_rows(hidden_j[:, : T - j - 1].flatten(0, 1), target)
            assert W.grad is not None  # made above when ``into``
            ce_sum, grad_x = linear_cross_entropy_accumulate_(x, W, target, W.grad, g, IGNORE_INDEX)
            with backward:
                x.backward(grad_x)
            per_head.append((ce_sum / n).detach().float())
            continue
        ce = head_loss(model, hidden_j, labels, j, n_tokens, fused)
        part = ce * (scale / J)
        with backward:
            (scaler.scale(part) if scaler is not None else part).backward()
        per_head.append(ce.detach())
    with backward:
        h.backward(h_leaf.grad)
    losses = torch.stack(per_head)
    return losses.mean(), losses


# ----------------------------------------------------------------------------- objectives


class Objective:
    """The loss of one objective. ``family``: the model class it trains. ``manual_grad_sync``:
    under DDP its backward runs outside ``DDP.forward`` (inside ``no_sync``) and the loop
    all-reduces the gradients itself once per step."""

    name = ""
    family: type = GPT2
    manual_grad_sync = False

    def __init__(self, cfg, *, fused: bool = True):
        self.cfg, self.fused = cfg, fused

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        """Set which parameters train (and load anything the loss needs) before the optimizer."""

    def n_logged(self, model: _Family) -> int:
        """The number of per-head losses ``backward`` returns."""
        return model.n_heads

    def param_groups(self, model: nn.Module) -> list[dict]:
        """AdamW groups: weight decay on matrices and embeddings only, not on biases and
        LayerNorms; each group also names its ``part`` for ``lr_scale``."""
        params = [p for p in model.parameters() if p.requires_grad]
        return _decay_groups(params, self.cfg.weight_decay, "all")

    def lr_scale(self, part: str, step: int, warmup: int) -> float:
        """The factor on the scheduled learning rate for the group ``part`` at ``step``."""
        return 1.0

    def loss(self, model, idx, labels, *, n_tokens, step: int):
        raise NotImplementedError

    def backward(self, model, ddp, idx, labels, *, n_tokens, step: int, world: int, scaler, autocast,
                 last: bool):
        """Backpropagate this micro-batch's share of the step's loss; DDP averages gradients
        over ranks, and scaling by ``world`` turns that into the sum the global N_j need."""
        manual = self.manual_grad_sync
        sync = ddp.no_sync() if ddp is not None and (manual or not last) else contextlib.nullcontext()
        net = ddp if ddp is not None and not manual else model
        with sync:
            with autocast:
                loss, per_head = self.loss(net, idx, labels, n_tokens=n_tokens, step=step)
            scaler.scale(loss * world).backward()
        return loss.detach(), per_head


class NTP(Objective):
    name, family = "ntp", GPT2

    def n_logged(self, model):
        return 1

    def loss(self, model, idx, labels, *, n_tokens, step):
        return ntp_loss(model, idx, labels, n_tokens=n_tokens, fused=self.fused)


class MTP(Objective):
    """Gloeckle et al.'s multi-token prediction. ``trunk_lr_ratio`` < 1 trains the trunk, head 0
    and the embedding slower than the draft heads: on a pretrained model the draft heads start as
    copies of its last layer and must move far, while the trunk must stay close to what it was."""

    name, family, manual_grad_sync = "mtp", MTPModel, True

    def param_groups(self, model):
        if self.cfg.trunk_lr_ratio == 1.0:
            return super().param_groups(model)
        heads = cast(MTPModel, _unwrap(model)).heads
        drafts = {id(p) for head in list(heads)[1:] for p in head.parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        return (_decay_groups([p for p in params if id(p) in drafts], self.cfg.weight_decay, "drafts")
                + _decay_groups([p for p in params if id(p) not in drafts], self.cfg.weight_decay, "trunk"))

    def lr_scale(self, part, step, warmup):
        return self.cfg.trunk_lr_ratio if part == "trunk" else 1.0

    def backward(self, model, ddp, idx, labels, *, n_tokens, step, world, scaler, autocast, last):
        # n + 1 backward calls per micro-batch, none through DDP.forward: see mtp_loss_and_backward
        with (ddp.no_sync() if ddp is not None else contextlib.nullcontext()), autocast:
            return mtp_loss_and_backward(model, idx, labels, scale=world, n_tokens=n_tokens, scaler=scaler,
                                         fused=self.fused)


class Medusa(Objective):
    name, family = "medusa", MedusaModel

    def n_logged(self, model):
        return model.n_heads - 1

    def loss(self, model, idx, labels, *, n_tokens, step):
        return medusa_loss(model, idx, labels, self.cfg.head_weights, n_tokens=n_tokens, fused=self.fused)


class Medusa2(Objective):
    """MEDUSA-2: the backbone trains too, at ``backbone_lr_ratio`` of the heads' rate, after
    ``head_warmup`` steps of heads alone (its gradients are then absent, not zero, so the loop
    syncs them by hand under DDP). ``backbone_loss="kl"`` loads the teacher (``cfg.teacher``,
    default the base) frozen beside the model."""

    name, family, manual_grad_sync = "medusa2", MedusaModel, True

    def __init__(self, cfg, *, fused: bool = True):
        super().__init__(cfg, fused=fused)
        self.teacher: GPT2 | None = None

    def prepare(self, model, device):
        for p in model.base.parameters():
            p.requires_grad_(True)
        if self.cfg.backbone_loss == "kl":
            self.teacher = load_teacher(self.cfg, model.config.vocab_size).to(device).eval()

    def param_groups(self, model):
        backbone = [p for p in model.base.parameters() if p.requires_grad]
        heads = [p for p in model.medusa.parameters() if p.requires_grad]
        return (_decay_groups(heads, self.cfg.weight_decay, "heads")
                + _decay_groups(backbone, self.cfg.weight_decay, "backbone"))

    def lr_scale(self, part, step, warmup):
        if part != "backbone":
            return 1.0
        joined = step - self.cfg.head_warmup
        if joined < 0:
            return 0.0
        return self.cfg.backbone_lr_ratio * min(1.0, (joined + 1) / max(1, warmup))

    def loss(self, model, idx, labels, *, n_tokens, step):
        return medusa2_loss(model, idx, labels, self.cfg.head_weights, heads_coefficient=self.cfg.heads_coefficient,
                            train_backbone=step >= self.cfg.head_warmup, teacher=self.teacher, n_tokens=n_tokens,
                            fused=self.fused)


OBJECTIVES = {o.name: o for o in (NTP, MTP, Medusa, Medusa2)}


def load_teacher(cfg, vocab_size: int) -> GPT2:
    """The KL teacher of a MEDUSA-2 run (``cfg.teacher``, else ``cfg.base``) as a frozen GPT-2:
    a MEDUSA checkpoint gives its base. Its vocabulary must be the model's."""
    source = cfg.teacher or cfg.base
    teacher = load_model(source).float()
    if isinstance(teacher, MedusaModel):
        teacher = teacher.base
    if not isinstance(teacher, GPT2):
        raise ValueError(f"the KL teacher {source} is a {type(teacher).__name__}: it must be a GPT-2 "
                         "(or a MEDUSA model, whose base is used)")
    if teacher.config.vocab_size != vocab_size:
        raise ValueError(f"the KL teacher {source} has a vocabulary of {teacher.config.vocab_size} tokens, "
                         f"the model {vocab_size}: a KL between their distributions is undefined")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _decay_groups(params, weight_decay: float, part: str) -> list[dict]:
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "part": part},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "part": part},
    ]
