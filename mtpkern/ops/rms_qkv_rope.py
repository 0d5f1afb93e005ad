"""RMSNorm + QKV projection (+ optional bias) + rotary positions, with K and V written straight
into the static KV cache: the first kernel of the Llama family's fused decoder layer.

For the M = B * T rows of a decode step, ``[q | k | v] = RMSNorm(x) @ W.T (+ b)`` with
W [(H + 2 H_kv) Dh, D] (``LlamaAttention.c_attn``), then q and k rotated at each row's own
position (a tree node's: prefix + depth) from the rotary tables the model computed for the
step, ``rope(y) = y cos + rotate_half(y) sin`` with rotate_half(y) = (-y2, y1) over the two
halves of each head. Q goes to a [B, T, H Dh] output; K and V of token t go to cache slot
``slots[t]`` of each of the H_kv KV heads, so no ``index_copy_`` runs.

A rotary output needs two columns of the projection, d and d + Dh/2 of one head: a program
owns BLOCK_N such pairs (``_rms_linear.rms_linear_pair`` reads each row chunk once for both),
so the rotation happens in registers. V's pairs are stored as they are.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from mtpkern.ops import _backend
from mtpkern.ops._decode_linear import (
    bt_strides, check_int32_offsets, check_params, check_rows, input_precision, row_offsets,
)
from mtpkern.ops._rms_linear import pair_blocks, rms_linear_pair, rms_stats
from mtpkern.ops._triton_compat import wrap_triton
from mtpkern.ops.ln_qkv import check_cache_and_slots

# ----------------------------------------------------------------------------- kernel


@triton.jit(do_not_specialize=["T"])
def _rms_qkv_rope_kernel(
    x_ptr, g_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr,  # x [B, T, D], RMSNorm g [D], W [N, D], b [N]; cos / sin [B or 1, T, Dh]
    q_ptr, k_ptr, v_ptr, slots_ptr,  # outputs: q [B, T, H Dh]; caches [B, H_kv, S, Dh]; slots [T] or [B, T]
    M, T, D, S, H, H_KV, stride_sb, eps,
    stride_xb, stride_xt, stride_xd,
    stride_wn, stride_wk,
    stride_cb, stride_ct, stride_cd,  # cos and sin share their strides
    stride_qb, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    pair_ok = pairs < (H + 2 * H_KV) * HALF
    head = pairs // HALF  # 0 .. H-1: q, then H_kv k heads, then H_kv v heads
    d = pairs % HALF
    c1 = head * HEAD_DIM + d
    c2 = c1 + HALF

    eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as fp64
    x_off = row_offsets(rows, T, stride_xb, stride_xt)
    rstd = rms_stats(x_ptr, x_off, row_ok, stride_xd, D, eps, BLOCK_M, BLOCK_K)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1, acc2 = rms_linear_pair(acc1, acc2, x_ptr, x_off, row_ok, stride_xd, D, g_ptr, rstd,
                                 w_ptr, c1, c2, pair_ok, stride_wn, stride_wk, BLOCK_K, INPUT_PRECISION, DOT)
    if HAS_BIAS:
        acc1 += tl.load(b_ptr + c1, mask=pair_ok, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(b_ptr + c2, mask=pair_ok, other=0.0).to(tl.float32)[None, :]
    # Eager rounds the projection to the model's dtype before rotating it.
    y1 = acc1.to(q_ptr.dtype.element_ty).to(tl.float32)
    y2 = acc2.to(q_ptr.dtype.element_ty).to(tl.float32)

    b = rows // T
    t = rows % T
    mask = row_ok[:, None] & pair_ok[None, :]
    c_off = (b * stride_cb + t * stride_ct)[:, None] + d[None, :] * stride_cd
    cos1 = tl.load(cos_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + c_off + HALF * stride_cd, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + c_off + HALF * stride_cd, mask=mask, other=0.0).to(tl.float32)
    rotate = (head < H + H_KV)[None, :]  # q and k; v as it is
    o1 = tl.where(rotate, y1 * cos1 - y2 * sin1, y1)
    o2 = tl.where(rotate, y2 * cos2 + y1 * sin2, y2)

    q_off = (b * stride_qb + t * stride_qt)[:, None]
    is_q = mask & (head < H)[None, :]
    tl.store(q_ptr + q_off + c1[None, :] * stride_qd, o1.to(q_ptr.dtype.element_ty), mask=is_q)
    tl.store(q_ptr + q_off + c2[None, :] * stride_qd, o2.to(q_ptr.dtype.element_ty), mask=is_q)
    # A slot outside the cache is skipped (checking it would sync with the host; the public
    # function checks CPU slots): never an out-of-bounds write.
    slot = tl.load(slots_ptr + b * stride_sb + t, mask=row_ok, other=-1)  # stride_sb 0: every row's slots
    kv_ok = row_ok & (slot >= 0) & (slot < S)
    slot = tl.where(kv_ok, slot, 0).to(tl.int32)
    is_k = kv_ok[:, None] & (pair_ok & (head >= H) & (head < H + H_KV))[None, :]
    k_off = (b * stride_kb + slot * stride_ks)[:, None] + ((head - H) * stride_kh + d * stride_kd)[None, :]
    tl.store(k_ptr + k_off, o1.to(k_ptr.dtype.element_ty), mask=is_k)
    tl.store(k_ptr + k_off + HALF * stride_kd, o2.to(k_ptr.dtype.element_ty), mask=is_k)
    is_v = kv_ok[:, None] & (pair_ok & (head >= H + H_KV))[None, :]
    v_off = (b * stride_vb + slot * stride_vs)[:, None] + ((head - H - H_KV) * stride_vh + d * stride_vd)[None, :]
    tl.store(v_ptr + v_off, o1.to(v_ptr.dtype.element_ty), mask=is_v)
    tl.store(v_ptr + v_off + HALF * stride_vd, o2.to(v_ptr.dtype.element_ty), mask=is_v)


# ----------------------------------------------------------------------------- reference


def rms_qkv_rope_ref(x: Tensor, ln_weight: Tensor, weight: Tensor, bias: Optional[Tensor], cos: Tensor, sin: Tensor,
                     k_cache: Tensor, v_cache: Tensor, slots: Tensor, eps: float = 1e-6) -> Tensor:
    """Reference, in fp32. With x [B, T, D], k_cache [B, H_kv, S, Dh] and weight [N, D],
    N = (H + 2 H_kv) Dh:

        [q | k | v] = RMSNorm(x) @ weight.T (+ bias),  RMSNorm(x) = x / sqrt(mean(x^2) + eps) * ln_weight
        q, k <- y cos + rotate_half(y) sin per head, rotate_half(y) = (-y[Dh/2:], y[:Dh/2]),
                cos / sin [B or 1, T, Dh] (each token's position)
        k_cache[b, :, slots[t]] = k[b, t], likewise v (slots [T], or [B, T] per batch row)

    Returns q [B, T, H Dh]; outputs are rounded to x's / the caches' dtype."""
    B, T, D = x.shape
    Hk, Dh = k_cache.shape[1], k_cache.shape[3]
    h = torch.nn.functional.rms_norm(x.float(), (D,), ln_weight.float(), eps)
    y = h @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    H = weight.shape[0] // Dh - 2 * Hk
    q, k, v = y.view(B, T, H + 2 * Hk, Dh).split([H, Hk, Hk], dim=2)
    c, s = cos.float()[:, :, None], sin.float()[:, :, None]  # [B or 1, T, 1, Dh]

    def rope(z):
        z1, z2 = z.chunk(2, dim=-1)
        return z * c + torch.cat((-z2, z1), dim=-1) * s

    for cache, new in ((k_cache, rope(k)), (v_cache, v)):
        new = new.to(cache.dtype)  # [B, T, H_kv, Dh]
        if slots.dim() == 2:  # each batch row at its own slots
            rows = torch.arange(B, device=cache.device)[:, None]
            cache[rows, :, slots.to(cache.device, torch.int64)] = new
        else:
            cache.index_copy_(2, slots.to(cache.device, torch.int64), new.transpose(1, 2))
    return rope(q).reshape(B, T, H * Dh).to(x.dtype)


# ----------------------------------------------------------------------------- launcher


def _check_inputs(x, ln_weight, weight, bias, cos, sin, k_cache, v_cache, slots, eps) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [(H + 2 H_kv) Dh, D], got shape {tuple(weight.shape)}")
    N, D = weight.shape
    check_rows("x", x, D)
    check_params(x, weight=weight, bias=bias, ln_weight=ln_weight)
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [B, H_kv, S, Dh], got shape {tuple(k_cache.shape)}")
    Hk, Dh = k_cache.shape[1], k_cache.shape[3]
    H = N // Dh - 2 * Hk if Dh else 0
    if Dh % 2 or Hk == 0 or N % Dh or H < Hk or H % Hk:
        raise ValueError(f"weight [{N}, {D}] must be [(H + 2 H_kv) Dh, D] with H a multiple of H_kv = {Hk} and an "
                         f"even Dh = {Dh} (from k_cache {tuple(k_cache.shape)})")
    check_cache_and_slots(x, k_cache, v_cache, slots, Hk * Dh)
    for name, p, n in (("bias", bias, N), ("ln_weight", ln_weight, D)):
        if p is not None and p.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(p.shape)}")
    B, T, _ = x.shape
    for name, c in (("cos", cos), ("sin", sin)):
        if c.dim() != 3 or c.shape[0] not in (1, B) or c.shape[1:] != (T, Dh):
            raise ValueError(f"{name} must be [B or 1, T, Dh] = [{B} or 1, {T}, {Dh}], got shape {tuple(c.shape)}")
        if c.dtype != x.dtype or c.device != x.device:
            raise TypeError(f"{name} must be {x.dtype} on {x.device}, got {c.dtype} on {c.device}")
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape or strides")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def _launch(x, ln_weight, weight, bias, cos, sin, k_cache, v_cache, slots, eps: float) -> Tensor:
    B, T, D = x.shape
    Hk, Dh = k_cache.shape[1], k_cache.shape[3]
    H = weight.shape[0] // Dh - 2 * Hk
    q = torch.empty((B, T, H * Dh), dtype=x.dtype, device=x.device)
    if _backend.triton_interpret() and is_fake(x):
        # Under the interpreter, wrap_triton hands back the plain kernel, which cannot run on
        # fake tensors; a fake implementation only needs the output's metadata anyway.
        return q
    M, n_pairs = B * T, weight.shape[0] // 2
    cfg = pair_blocks(M, n_pairs, D, x.dtype)
    grid = (triton.cdiv(n_pairs, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        wrap_triton(_rms_qkv_rope_kernel)[grid](
            x, ln_weight, weight, x if bias is None else bias, cos, sin, q, k_cache, v_cache, slots,
            M, T, D, k_cache.shape[2], H, Hk, T if slots.dim() == 2 else 0, eps,
            *bt_strides(x), *weight.stride(), 0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), cos.stride(2),
            *bt_strides(q), *k_cache.stride(), *v_cache.stride(),
            HEAD_DIM=Dh, HAS_BIAS=bias is not None,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            INPUT_PRECISION=input_precision(x.dtype), DOT=cfg["DOT"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return q


# ----------------------------------------------------------------------------- registration


@torch.library.triton_op("mtpkern::rms_qkv_rope", mutates_args=("k_cache", "v_cache"))
def _rms_qkv_rope_op(x: Tensor, ln_weight: Tensor, weight: Tensor, bias: Optional[Tensor], cos: Tensor, sin: Tensor,
                     k_cache: Tensor, v_cache: Tensor, slots: Tensor, eps: float) -> Tensor:
    # This body is also the fake implementation (run on fake tensors under torch.compile).
    _check_inputs(x, ln_weight, weight, bias, cos, sin, k_cache, v_cache, slots, eps)
    if x.device.type == "cpu" and not _backend.triton_interpret():
        return rms_qkv_rope_ref(x, ln_weight, weight, bias, cos, sin, k_cache, v_cache, slots, eps).contiguous()
    check_int32_offsets(x=x, weight=weight, k_cache=k_cache, v_cache=v_cache)
    return _launch(x, ln_weight, weight, bias, cos, sin, k_cache, v_cache, slots, eps)


# ----------------------------------------------------------------------------- public


def rms_qkv_rope(x: Tensor, ln_weight: Tensor, weight: Tensor, bias: Tensor | None, cos: Tensor, sin: Tensor,
                 k_cache: Tensor, v_cache: Tensor, slots: Tensor, *, eps: float = 1e-6,
                 backend: str | None = None) -> Tensor:
    """q of ``rope(RMSNorm(x) @ weight.T + bias)``, with rope(k) and v written into the caches at ``slots``.

    x [B, T, D] (any strides); ln_weight [D]; weight [(H + 2 H_kv) Dh, D] (q, k, v heads in
    that order); bias [(H + 2 H_kv) Dh] or None; cos / sin [B or 1, T, Dh] (the rotary at each
    token's position, as ``mtpkern.llama.Rotary`` gives it); one layer's k_cache / v_cache
    [B, H_kv, S, Dh] (written in place); slots int [T] (or [B, T]: each batch row its own).
    Float tensors share one dtype and device. Returns q [B, T, H Dh].
    backend: None (automatic), "triton" or "eager" (the fp32 reference).
    """
    _check_inputs(x, ln_weight, weight, bias, cos, sin, k_cache, v_cache, slots, float(eps))
    if _backend.pick(x.device, ("triton", "eager"), backend) == "eager":
        return rms_qkv_rope_ref(x, ln_weight, weight, bias, cos, sin, k_cache, v_cache, slots, eps)
    return torch.ops.mtpkern.rms_qkv_rope(x, ln_weight, weight, bias, cos, sin, k_cache, v_cache, slots, float(eps))


__all__ = ["rms_qkv_rope", "rms_qkv_rope_ref"]
