"""Fused multi-head logits: top-k, argmax, logsumexp, entropy and a target logit per row,
without writing the ``[R, V]`` logits to memory.

``z = scale * hidden @ weight.T`` for R rows (the MTP / MEDUSA heads at one position, or the
nodes of a tree) against the shared unembedding ``weight`` [V, D]. Decoding needs only a few
numbers per row, so the logits stay on chip:

1. ``_logits_partials_kernel``: one program per (row block, V block). It reads its weight tile
   once for all rows (``tl.dot``), and writes per-row partials for its V block: the block max
   ``m``, ``s = sum exp(z - m)``, ``t = sum exp(z - m) (z - m)``, the block's top-k (as sortable
   int64 keys, below), and ``z[target]`` if the target falls in the block.
2. ``_logits_merge_kernel``: one program per row merges the partials (online-softmax merge):
   with ``M = max_b m_b``, ``S = sum_b exp(m_b - M) s_b`` and
   ``T = sum_b exp(m_b - M) (t_b + (m_b - M) s_b)``, ``lse = M + log S`` and
   ``entropy = log S - T / S``; the global top-k is the top-k of the blocks' top-k.

With ``norm_weight`` / ``norm_bias`` the rows go through a LayerNorm first, in the partials
kernel's prologue (two fp32 passes over each program's rows for the mean and variance, then the
normalised rows feed the dot): the model's final norm without a launch of its own.

Top-k keys: a float32 value is mapped to an int32 with the same order (negative floats get
their magnitude bits flipped), shifted into the high half of an int64, and the low half holds
``2**31 - 1 - index``. Sorting the keys descending sorts values descending and, among equal
values, indices ascending, so ``argmax`` is the first index of the maximum like
``torch.argmax``, and one int64 maximum carries a value and its index together: all-zero
logits give argmax 0 in every backend. (``-0.0`` keys below ``+0.0``, but the kernel's zero
logits all share one sign: its sums start from ``+0.0``, and ``+0.0 + -0.0 = +0.0``.)

NaN contract (every backend): a row whose logits hold a NaN (a NaN in its hidden row, in any
weight row, or ``inf - inf``) gets NaN ``topk_values``, ``lse``, ``entropy`` and
``target_logit``, and ``-1`` (not a token) as ``argmax`` and every ``topk_indices`` entry:
never a valid-looking token. Other rows are unaffected. (``torch.argmax`` would name the NaN's
column, so one NaN weight row would become every row's argmax.)

Every input is checked inside the registered op ``torch.ops.mtpkern.fused_logits`` (shapes,
dtypes, devices, ``1 <= k <= min(64, V)``, a finite ``scale``), so calling it directly is as
safe as :func:`fused_logits`; the checks read no tensor values, so they also run on fake tensors.
"""

import contextlib
import math
from typing import Any, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from mtpkern.ops import _backend
from mtpkern.ops._triton_compat import wrap_triton
from mtpkern.runtime import dtype_name

MAX_K = 64
_MERGE_KEYS = 2048  # candidate keys the merge kernel holds per step
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Globals a compiled kernel reads must be tl.constexpr instances (an annotation is not
# enough: the interpreter accepts it, the compiler raises NameError).
# Smaller than the key of any float32, -inf included: pads partial top-k lists.
_MIN_KEY = tl.constexpr(-(2**63) + 1)
_LOW_MASK = tl.constexpr(0x7FFFFFFF)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _to_key(z, cols):
    """Order-preserving int64 key of (float32 value, int32 index), ties broken by lower index."""
    bits = z.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & _LOW_MASK)
    # cols ^ _LOW_MASK = 2**31 - 1 - cols (tensor first: the interpreter's constexpr - tensor fails)
    return (ordered.to(tl.int64) << 32) | (cols ^ _LOW_MASK).to(tl.int64)


@triton.jit
def _from_key(key):
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & _LOW_MASK)
    index = (key & _LOW_MASK) ^ _LOW_MASK
    return bits.to(tl.float32, bitcast=True), index


@triton.jit
def _logits_partials_kernel(
    h_ptr, w_ptr, target_ptr,  # inputs: hidden [R, D], weight [V, D], target [R] (or dummy)
    ln_w_ptr, ln_b_ptr,  # the final LayerNorm's weight and bias [D] (or dummies)
    keys_ptr, stats_ptr, target_logit_ptr,  # outputs: [R, NB, k] int64, [4, R, NB], [R]
    R, V, D, NB, k,
    stride_hr, stride_hd, stride_wv, stride_wd,
    scale, eps,
    HAS_TARGET: tl.constexpr,
    HAS_NORM: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    scale, eps = tl.cast(scale, tl.float32), tl.cast(eps, tl.float32)  # torch.compile passes Python floats as fp64
    # Row blocks vary fastest, so the programs sharing a weight tile run together (L2 hits).
    pid_r = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < R
    col_ok = cols < V
    # The block's first weight row, in int64: V * D can pass 2**31 (large vocabularies).
    w_ptr += pid_v.to(tl.int64) * BLOCK_V * stride_wv
    local_cols = tl.arange(0, BLOCK_V)

    if HAS_NORM:
        # The final LayerNorm in the prologue: each program normalises its rows itself (R x D
        # reads, next to a BLOCK_V x D weight tile), in fp32, two passes like torch's.
        mean = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(h_ptr + rows[:, None] * stride_hr + ds[None, :] * stride_hd,
                        mask=row_ok[:, None] & (ds < D)[None, :], other=0.0).to(tl.float32)
            mean += tl.sum(x, axis=1)
        mean = mean / D
        var = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(h_ptr + rows[:, None] * stride_hr + ds[None, :] * stride_hd,
                        mask=row_ok[:, None] & (ds < D)[None, :], other=0.0).to(tl.float32)
            x = tl.where((ds < D)[None, :], x - mean[:, None], 0.0)
            var += tl.sum(x * x, axis=1)
        rstd = 1.0 / tl.sqrt(var / D + eps)

    acc = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        h = tl.load(
            h_ptr + rows[:, None] * stride_hr + ds[None, :] * stride_hd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if HAS_NORM:
            g = tl.load(ln_w_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
            b = tl.load(ln_b_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
            # normalised in fp32, then rounded to the weight's dtype like eager LayerNorm's output
            h = ((h.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]).to(h.dtype)
        w = tl.load(
            w_ptr + local_cols[:, None] * stride_wv + ds[None, :] * stride_wd,
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)

    z = acc * scale
    nan = z != z
    # A NaN row is flagged (4th stats plane) and its NaNs taken as -inf, so the rest stays defined.
    z = tl.where(col_ok[None, :] & ~nan, z, float("-inf"))
    m = tl.max(z, axis=1)  # finite unless the row is all NaN here: every block holds a column
    shifted = z - m[:, None]
    e = tl.exp(shifted)  # 0 on padded columns
    s = tl.sum(e, axis=1)
    t = tl.sum(e * tl.where(col_ok[None, :], shifted, 0.0), axis=1)  # no 0 * -inf

    part = rows * NB + pid_v
    tl.store(stats_ptr + part, m, mask=row_ok)
    tl.store(stats_ptr + R * NB + part, s, mask=row_ok)
    tl.store(stats_ptr + 2 * R * NB + part, t, mask=row_ok)
    tl.store(stats_ptr + 3 * R * NB + part, tl.sum(nan.to(tl.float32), axis=1), mask=row_ok)

    # The block's top-k by k rounds of "take the max, knock it out": keys are unique, and a
    # row reduction per round is cheap next to the weight tile's load (and, unlike the
    # bitonic tl.topk, fast in the interpreter too).
    keys = _to_key(z, cols[None, :])
    ks = tl.arange(0, K_PAD)
    top = tl.full((BLOCK_R, K_PAD), _MIN_KEY, dtype=tl.int64)
    for i in range(k):
        best = tl.max(keys, axis=1)
        keys = tl.where(keys == best[:, None], _MIN_KEY, keys)
        top = tl.where(ks[None, :] == i, best[:, None], top)
    tl.store(keys_ptr + part[:, None] * k + ks[None, :], top, mask=row_ok[:, None] & (ks[None, :] < k))

    if HAS_TARGET:
        tgt = tl.load(target_ptr + rows, mask=row_ok, other=-1)
        hit = cols[None, :] == tgt[:, None]
        val = tl.sum(tl.where(hit, z, 0.0), axis=1)
        mine = (tgt >= pid_v * BLOCK_V) & (tgt < pid_v * BLOCK_V + BLOCK_V) & (tgt < V)
        tl.store(target_logit_ptr + rows, val, mask=row_ok & mine)


@triton.jit
def _logits_merge_kernel(
    keys_ptr, stats_ptr,  # partials from _logits_partials_kernel
    topv_ptr, topi_ptr, argmax_ptr, lse_ptr, entropy_ptr, target_logit_ptr,  # outputs
    R, NB, k,
    K_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    r = tl.program_id(0)
    bs = tl.arange(0, BLOCK_B)
    ks = tl.arange(0, K_PAD)
    m_ptr = stats_ptr + r * NB
    s_ptr = m_ptr + R * NB
    t_ptr = s_ptr + R * NB
    nan_ptr = t_ptr + R * NB

    m_run = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    nan_run = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for b0 in range(0, NB, BLOCK_B):
        m_run = tl.maximum(m_run, tl.load(m_ptr + b0 + bs, mask=b0 + bs < NB, other=float("-inf")))
        nan_run += tl.load(nan_ptr + b0 + bs, mask=b0 + bs < NB, other=0.0)
    big_m = tl.max(m_run, axis=0)
    row_nan = tl.sum(nan_run, axis=0) > 0

    s_acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    best = tl.full((K_PAD,), _MIN_KEY, dtype=tl.int64)
    for b0 in range(0, NB, BLOCK_B):
        blk = b0 + bs
        ok = blk < NB
        # Padded blocks get m = M and s = t = 0, so they add exactly nothing.
        m = tl.load(m_ptr + blk, mask=ok, other=big_m)
        s = tl.load(s_ptr + blk, mask=ok, other=0.0)
        t = tl.load(t_ptr + blk, mask=ok, other=0.0)
        w = tl.exp(m - big_m)
        s_acc += w * s
        t_acc += w * (t + (m - big_m) * s)

        # Merge this chunk's candidates into the running top-k, k rounds of max-and-knock-out.
        cand = tl.load(
            keys_ptr + (r * NB + blk[:, None]) * k + ks[None, :],
            mask=ok[:, None] & (ks[None, :] < k),
            other=_MIN_KEY,
        )
        merged = tl.full((K_PAD,), _MIN_KEY, dtype=tl.int64)
        for i in range(k):
            top = tl.maximum(tl.max(cand), tl.max(best, axis=0))
            cand = tl.where(cand == top, _MIN_KEY, cand)
            best = tl.where(best == top, _MIN_KEY, best)
            merged = tl.where(ks == i, top, merged)
        best = merged

    big_s = tl.sum(s_acc, axis=0)
    big_t = tl.sum(t_acc, axis=0)
    log_s = tl.log(big_s)
    tl.store(lse_ptr + r, tl.where(row_nan, float("nan"), big_m + log_s))
    tl.store(entropy_ptr + r, tl.where(row_nan, float("nan"), log_s - big_t / big_s))

    values, index = _from_key(best)
    values = tl.where(row_nan, float("nan"), values)
    index = tl.where(row_nan, -1, index)
    tl.store(topv_ptr + r * k + ks, values, mask=ks < k)
    tl.store(topi_ptr + r * k + ks, index.to(tl.int64), mask=ks < k)
    tl.store(argmax_ptr + r, tl.sum(tl.where(ks == 0, index, 0), axis=0).to(tl.int64))
    tl.store(target_logit_ptr + r, float("nan"), mask=row_nan)


# ----------------------------------------------------------------------------- reference


class LogitsStats(NamedTuple):
    topk_values: Tensor  # [R, k] float32, descending
    topk_indices: Tensor  # [R, k] int64
    argmax: Tensor  # [R] int64, first index of the maximum
    lse: Tensor  # [R] float32
    entropy: Tensor  # [R] float32
    target_logit: Tensor  # [R] float32, NaN where there is no valid target


def logits_stats(z: Tensor, k: int = 10, target: Optional[Tensor] = None) -> LogitsStats:
    """The statistics of materialised logits ``z`` [R, V], computed in fp32.

    topk = the k largest z (descending), argmax = first index of max z,
    lse = log sum_v exp(z_v), entropy = -sum_v p_v log p_v with p = softmax(z) (= lse - sum p z),
    target_logit = z[target] where 0 <= target < V, else NaN.
    A row holding a NaN gets NaN values and -1 indices (the module's NaN contract).

    This is what eager PyTorch does after a plain LM head; the benchmark times it.
    """
    z = z.float()
    topv, topi = torch.topk(z, k, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse[:, None]
    entropy = -(logp.exp() * logp).sum(dim=-1)
    if target is None:
        target_logit = torch.full_like(lse, float("nan"))
    else:
        valid = (target >= 0) & (target < z.shape[1])
        picked = z.gather(1, target.long().clamp(0, z.shape[1] - 1)[:, None])[:, 0]
        target_logit = torch.where(valid, picked, float("nan"))
    nan = z.isnan().any(dim=-1)  # no host sync: every output is masked with where
    topv = torch.where(nan[:, None], float("nan"), topv)
    topi = torch.where(nan[:, None], -1, topi)
    argmax = torch.where(nan, -1, z.argmax(dim=-1))
    target_logit = torch.where(nan, float("nan"), target_logit)
    return LogitsStats(topv, topi, argmax, lse, entropy, target_logit)


def fused_logits_ref(
    hidden: Tensor, weight: Tensor, k: int = 10, target: Optional[Tensor] = None, *, scale: float = 1.0,
    norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None, eps: float = 1e-5,
) -> LogitsStats:
    """Reference: ``logits_stats(z, k, target)`` with ``z = scale * h @ weight.T`` in fp32, where
    ``h = hidden``, or ``LayerNorm(hidden; norm_weight, norm_bias, eps)`` when a norm is given.

    It materialises the [R, V] logits (in fp32), which the kernel never does.
    """
    h = hidden.float()
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("fused_logits_ref: norm_weight and norm_bias come together (a LayerNorm's weight and bias)")
    if norm_weight is not None and norm_bias is not None:
        h = torch.nn.functional.layer_norm(h, (h.shape[-1],), norm_weight.float(), norm_bias.float(), eps)
        h = h.to(hidden.dtype).float()  # rounded to the input dtype, as the kernel feeds its dot
    return logits_stats(scale * (h @ weight.float().T), k, target)


# ----------------------------------------------------------------------------- launcher


def _finite_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"fused_logits: scale must be a finite number, got {scale!r}")
    return float(scale)


def _check_inputs(hidden: Tensor, weight: Tensor, k: int, target: Optional[Tensor], scale: float,
                  norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None, eps: float = 1e-5) -> None:
    """Every argument check, for every backend (no tensor values read: fake tensors pass through)."""
    if hidden.dim() != 2:
        raise ValueError(f"fused_logits: hidden must be 2-D [R, D], got shape {list(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"fused_logits: weight must be 2-D [V, D], got shape {list(weight.shape)}")
    (R, D), (V, Dw) = hidden.shape, weight.shape
    if D != Dw:
        raise ValueError(f"fused_logits: hidden [R, D] and weight [V, D] disagree on D: {D} vs {Dw}")
    if R == 0 or V == 0 or D == 0:
        raise ValueError(f"fused_logits: empty input: hidden {list(hidden.shape)}, weight {list(weight.shape)}")
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"fused_logits: hidden must be float32, float16 or bfloat16, got {dtype_name(hidden.dtype)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"fused_logits: weight is {dtype_name(weight.dtype)} but hidden is {dtype_name(hidden.dtype)}")
    if weight.device != hidden.device:
        raise ValueError(f"fused_logits: weight is on {weight.device} but hidden is on {hidden.device}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(MAX_K, V):
        raise ValueError(f"fused_logits: k must be an int in [1, min({MAX_K}, V={V})], got {k!r}")
    _finite_scale(scale)
    if target is not None:
        if target.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"fused_logits: target must be int32 or int64, got {dtype_name(target.dtype)}")
        if target.shape != (R,):
            raise ValueError(f"fused_logits: target must have shape [R] = [{R}], got {list(target.shape)}")
        if target.device != hidden.device:
            raise ValueError(f"fused_logits: target is on {target.device} but hidden is on {hidden.device}")
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("fused_logits: norm_weight and norm_bias come together (a LayerNorm's weight and bias)")
    if norm_weight is not None:
        assert norm_bias is not None  # checked just above: the two come together
        for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
            if t.shape != (D,):
                raise ValueError(f"fused_logits: {name} must have shape [D] = [{D}], got {list(t.shape)}")
            if t.dtype != hidden.dtype:
                raise TypeError(f"fused_logits: {name} is {dtype_name(t.dtype)} but hidden is {dtype_name(hidden.dtype)}")
            if t.device != hidden.device:
                raise ValueError(f"fused_logits: {name} is on {t.device} but hidden is on {hidden.device}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"fused_logits: eps must be a finite number > 0, got {eps!r}")


def _config(R: int, V: int, k: int, fp32: bool = False) -> dict:
    # tl.dot wants at least 16 rows; more than 64 rows per program costs registers, so
    # R > 64 takes two row blocks (the second read of a weight tile then hits L2).
    block_r = min(64, max(16, triton.next_power_of_2(R)))
    k_pad = triton.next_power_of_2(k)
    # 128 columns x 768 fp16 = 192 KiB of weight per program: ~400 programs for GPT-2's vocab,
    # three waves on an H100. The interpreter pays per program, not per element, so there
    # wider blocks keep the tests fast (the kernels are the same).
    block_v = 1024 if _backend.triton_interpret() else 128
    nb = triton.cdiv(V, block_v)
    # The merge kernel takes BLOCK_B blocks' candidates (BLOCK_B * K_PAD keys) per step.
    block_b = min(triton.next_power_of_2(nb), max(1, _MERGE_KEYS // k_pad))
    return dict(
        # fp32's exact ("ieee") dot runs on the FMA units with its operands in registers: a
        # 64-wide D step spills on an A100 (tests/test_triton_compile.py checks), 32 does not.
        BLOCK_R=block_r, BLOCK_V=block_v, BLOCK_D=32 if fp32 else 64, K_PAD=k_pad, NB=nb, BLOCK_B=block_b,
        num_warps=8 if block_r >= 64 else 4,
    )


def _launch(hidden: Tensor, weight: Tensor, k: int, target: Optional[Tensor], scale: float,
            norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None, eps: float = 1e-5):
    R, D = hidden.shape
    V = weight.shape[0]
    fp32 = hidden.dtype == torch.float32
    cfg = _config(R, V, k, fp32)
    nb, k_pad = cfg["NB"], cfg["K_PAD"]
    dev = hidden.device
    keys = torch.empty((R, nb, k), dtype=torch.int64, device=dev)
    stats = torch.empty((4, R, nb), dtype=torch.float32, device=dev)
    target_logit = torch.full((R,), float("nan"), dtype=torch.float32, device=dev)
    topv = torch.empty((R, k), dtype=torch.float32, device=dev)
    topi = torch.empty((R, k), dtype=torch.int64, device=dev)
    argmax = torch.empty((R,), dtype=torch.int64, device=dev)
    lse = torch.empty((R,), dtype=torch.float32, device=dev)
    entropy = torch.empty((R,), dtype=torch.float32, device=dev)
    if _backend.triton_interpret() and is_fake(hidden):
        # Under the interpreter, wrap_triton hands back the plain kernel, which cannot run on
        # fake tensors; a fake implementation only needs the outputs' metadata anyway.
        return topv, topi, argmax, lse, entropy, target_logit

    grid = (triton.cdiv(R, cfg["BLOCK_R"]), nb)
    # Triton launches on the current CUDA device, not the tensors' one.
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        wrap_triton(_logits_partials_kernel)[grid](
            hidden, weight, target if target is not None else target_logit,
            norm_weight if norm_weight is not None else hidden, norm_bias if norm_bias is not None else hidden,
            keys, stats, target_logit,
            R, V, D, nb, k,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            scale, float(eps),
            HAS_TARGET=target is not None,
            HAS_NORM=norm_weight is not None,
            K_PAD=k_pad,
            BLOCK_R=cfg["BLOCK_R"],
            BLOCK_V=cfg["BLOCK_V"],
            BLOCK_D=cfg["BLOCK_D"],
            INPUT_PRECISION="ieee" if fp32 else "tf32",  # TF32 would break fp32's token identity
            num_warps=cfg["num_warps"],
            num_stages=3,
        )
        wrap_triton(_logits_merge_kernel)[(R,)](
            keys, stats, topv, topi, argmax, lse, entropy, target_logit,
            R, nb, k,
            K_PAD=k_pad,
            BLOCK_B=cfg["BLOCK_B"],
            num_warps=4,
        )
    return topv, topi, argmax, lse, entropy, target_logit


# ----------------------------------------------------------------------------- registration


@torch.library.triton_op("mtpkern::fused_logits", mutates_args=())
def _fused_logits_op(
    hidden: Tensor, weight: Tensor, k: int, target: Optional[Tensor], scale: float,
    norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None, eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # This body is also the fake implementation (run on fake tensors under torch.compile).
    _check_inputs(hidden, weight, k, target, scale, norm_weight, norm_bias, eps)
    if hidden.device.type == "cpu" and not _backend.triton_interpret():
        # the six tensors of LogitsStats (mypy cannot count a generator's items)
        return tuple(t.contiguous() for t in fused_logits_ref(  # type: ignore[return-value]
            hidden, weight, k, target, scale=scale, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps))
    return _launch(hidden, weight, k, target, scale, norm_weight, norm_bias, eps)


# ----------------------------------------------------------------------------- public


def fused_logits(
    hidden: Tensor,
    weight: Tensor,
    k: int = 10,
    target: Optional[Tensor] = None,
    *,
    scale: float = 1.0,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    backend: Optional[str] = None,
) -> LogitsStats:
    """Top-k, argmax, logsumexp, entropy and target logit of ``z = scale * hidden @ weight.T``.

    hidden [R, D] (any strides), weight [V, D], same float dtype and device; 1 <= k <= 64.
    ``norm_weight``, ``norm_bias`` [D] (with ``eps``): a LayerNorm applied to hidden first, in
    the kernel's prologue (the model's final norm without a launch of its own).
    The [R, V] logits are never materialised. ``p(target) = exp(target_logit - lse)``.
    backend: None (automatic), "triton" or "eager" (the fp32 reference).
    A row whose logits hold a NaN gets NaN values and -1 indices (see the module docstring).
    """
    # Checked here too: a non-int k or non-number scale would otherwise meet the op's schema first.
    _check_inputs(hidden, weight, k, target, scale, norm_weight, norm_bias, eps)
    norm: dict[str, Any] = dict(norm_weight=norm_weight, norm_bias=norm_bias, eps=float(eps))
    if _backend.pick(hidden.device, ("triton", "eager"), backend) == "eager":
        return fused_logits_ref(hidden, weight, k, target, scale=scale, **norm)
    return LogitsStats(*torch.ops.mtpkern.fused_logits(hidden, weight, k, target, float(scale), **norm))


__all__ = ["LogitsStats", "fused_logits", "fused_logits_ref", "logits_stats", "MAX_K"]
