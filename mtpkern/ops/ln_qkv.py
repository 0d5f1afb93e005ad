"""LayerNorm + QKV projection + bias, with K and V written straight into the static KV cache.

The first kernel of a fused decoder layer (``docs/decode_step.md``): for the M = B * T rows
of a decode step, ``qkv = LayerNorm(x) @ W.T + b`` with W [3D, D]; Q goes to a [B, T, D]
output (the model views it as [B, H, T, Dh]), and K and V of token t go to cache slot
``slots[t]`` of every head, so no separate ``index_copy_`` runs. One program per 16 output
columns reads its [16, D] weight tile once for all rows (``mtpkern/ops/_decode_linear.py``).

Performance model: W is 3.5 MB of the 14.2 MB a GPT-2 124M layer reads in fp16; the whole
step's bytes, launches and expected times are in ``docs/decode_step.md``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from mtpkern.ops import _backend
from mtpkern.ops._decode_linear import (
    blocks, bt_strides, check_int32_offsets, check_params, check_rows, input_precision,
    layer_norm_stats, linear_tile, output_tile,
)
from mtpkern.ops._checks import values_on_host
from mtpkern.ops._triton_compat import wrap_triton


# ----------------------------------------------------------------------------- kernel


@triton.jit(do_not_specialize=["T"])
def _ln_qkv_kernel(
    x_ptr, lnw_ptr, lnb_ptr, w_ptr, b_ptr,  # inputs: x [B, T, D], LayerNorm, W [3D, D], b [3D]
    q_ptr, k_ptr, v_ptr, slots_ptr,  # outputs: q [B, T, D]; k / v caches [B, H, S, Dh]; slots [T]
    M, T, D, S, stride_sb, eps,
    stride_xb, stride_xt, stride_xd,
    stride_wn, stride_wk,
    stride_qb, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT: tl.constexpr,
):
    rows, cols, row_ok, col_ok, x_off = output_tile(M, 3 * D, T, stride_xb, stride_xt, BLOCK_M, BLOCK_N)

    eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as fp64
    mean, rstd = layer_norm_stats(x_ptr, x_off, row_ok, stride_xd, D, eps, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = linear_tile(acc, x_ptr, x_off, row_ok, stride_xd, w_ptr, cols, col_ok, stride_wn, stride_wk,
                      0, D, lnw_ptr, lnb_ptr, mean, rstd, True, BLOCK_K, INPUT_PRECISION, DOT)
    acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    which = cols // D  # 0: q, 1: k, 2: v
    c = cols % D
    head = c // HEAD_DIM
    d = c % HEAD_DIM
    b = rows // T
    t = rows % T
    q_off = b * stride_qb + t * stride_qt
    tl.store(q_ptr + q_off[:, None] + c[None, :] * stride_qd, acc.to(q_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (col_ok & (which == 0))[None, :])
    # A slot outside the cache is skipped (checking it would sync with the host; the public
    # function checks CPU slots): never an out-of-bounds write.
    slot = tl.load(slots_ptr + b * stride_sb + t, mask=row_ok, other=-1)  # stride_sb 0: every row's slots
    kv_ok = row_ok & (slot >= 0) & (slot < S)
    slot = tl.where(kv_ok, slot, 0).to(tl.int32)
    k_off = (b * stride_kb + slot * stride_ks)[:, None] + (head * stride_kh + d * stride_kd)[None, :]
    tl.store(k_ptr + k_off, acc.to(k_ptr.dtype.element_ty), mask=kv_ok[:, None] & (col_ok & (which == 1))[None, :])
    v_off = (b * stride_vb + slot * stride_vs)[:, None] + (head * stride_vh + d * stride_vd)[None, :]
    tl.store(v_ptr + v_off, acc.to(v_ptr.dtype.element_ty), mask=kv_ok[:, None] & (col_ok & (which == 2))[None, :])


# ----------------------------------------------------------------------------- reference


def ln_qkv_ref(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
               k_cache: Tensor, v_cache: Tensor, slots: Tensor, eps: float = 1e-5) -> Tensor:
    """Reference, in fp32. With x [B, T, D], H heads of Dh = D / H:

        [q | k | v] = LayerNorm(x; ln_weight, ln_bias, eps) @ weight.T + bias    (weight [3D, D])
        k_cache[b, h, slots[t]] = k[b, t, h*Dh:(h+1)*Dh], likewise v_cache; returns q [B, T, D]

    LayerNorm(x) = (x - mean) / sqrt(var + eps) * ln_weight + ln_bias over the last dimension
    (biased variance). Outputs are rounded to x's / the caches' dtype.
    """
    B, T, D = x.shape
    H, Dh = k_cache.shape[1], k_cache.shape[3]
    h = torch.nn.functional.layer_norm(x.float(), (D,), ln_weight.float(), ln_bias.float(), eps)
    q, k, v = (h @ weight.float().T + bias.float()).split(D, dim=-1)
    for cache, new in ((k_cache, k), (v_cache, v)):
        new = new.view(B, T, H, Dh).transpose(1, 2).to(cache.dtype)
        if slots.dim() == 2:  # each batch row at its own slots
            rows = torch.arange(B, device=cache.device)[:, None]
            cache[rows, :, slots.to(cache.device, torch.int64)] = new.transpose(1, 2)
        else:
            cache.index_copy_(2, slots.to(cache.device, torch.int64), new)
    return q.to(x.dtype)


# ----------------------------------------------------------------------------- launcher


def _check_inputs(x, ln_weight, ln_bias, weight, bias, k_cache, v_cache, slots, eps) -> None:
    if weight.dim() != 2 or weight.shape[0] != 3 * weight.shape[1]:
        raise ValueError(f"weight must be [3D, D], got shape {tuple(weight.shape)}")
    D = weight.shape[1]
    check_rows("x", x, D)
    check_params(x, weight=weight, bias=bias, ln_weight=ln_weight, ln_bias=ln_bias)
    for name, p, n in (("bias", bias, 3 * D), ("ln_weight", ln_weight, D), ("ln_bias", ln_bias, D)):
        if p.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(p.shape)}")
    check_cache_and_slots(x, k_cache, v_cache, slots, D)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def check_cache_and_slots(x: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, width: int) -> None:
    """One layer's K and V caches [B, H_kv, S, Dh] with H_kv * Dh = ``width``, of x's dtype and
    device, and the slots [T] or [B, T] the new tokens are written at (their values checked on
    the host, where reading them is free)."""
    B, T, _ = x.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[0] != B or c.shape[1] * c.shape[3] != width:
            raise ValueError(f"{name} must be [B={B}, H, S, Dh] with H * Dh = {width}, got shape {tuple(c.shape)}")
        if c.dtype != x.dtype or c.device != x.device:
            raise TypeError(f"{name} must be {x.dtype} on {x.device}, got {c.dtype} on {c.device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if slots.dtype not in (torch.int32, torch.int64) or slots.shape not in ((T,), (B, T)) or slots.device != x.device:
        raise ValueError(f"slots must be an int [T] = [{T}] (or per batch row [B, T] = [{B}, {T}]) tensor on "
                         f"{x.device}, got {slots.dtype} of shape {tuple(slots.shape)} on {slots.device}")
    if not slots.is_contiguous():
        raise ValueError("slots must be contiguous")
    if values_on_host(slots):  # a CUDA check would sync with the host
        S = k_cache.shape[2]
        bad = (slots < 0) | (slots >= S)
        if bool(bad.any()):
            i = tuple(int(j) for j in bad.nonzero()[0])
            where = ", ".join(map(str, i))
            raise ValueError(f"slots[{where}] = {int(slots[i])} is outside the cache's {S} slots")


def _launch(x, ln_weight, ln_bias, weight, bias, k_cache, v_cache, slots, eps: float) -> Tensor:
    B, T, D = x.shape
    q = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    if _backend.triton_interpret() and is_fake(x):
        # Under the interpreter, wrap_triton hands back the plain kernel, which cannot run on
        # fake tensors; a fake implementation only needs the output's metadata anyway.
        return q
    M, N = B * T, 3 * D
    cfg = blocks(M, N, D, x.dtype)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        wrap_triton(_ln_qkv_kernel)[grid](
            x, ln_weight, ln_bias, weight, bias, q, k_cache, v_cache, slots,
            M, T, D, k_cache.shape[2], T if slots.dim() == 2 else 0, eps,
            *bt_strides(x), *weight.stride(), *bt_strides(q), *k_cache.stride(), *v_cache.stride(),
            HEAD_DIM=k_cache.shape[3],
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            INPUT_PRECISION=input_precision(x.dtype), DOT=cfg["DOT"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return q


# ----------------------------------------------------------------------------- registration


@torch.library.triton_op("mtpkern::ln_qkv", mutates_args=("k_cache", "v_cache"))
def _ln_qkv_op(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
               k_cache: Tensor, v_cache: Tensor, slots: Tensor, eps: float) -> Tensor:
    # This body is also the fake implementation (run on fake tensors under torch.compile).
    _check_inputs(x, ln_weight, ln_bias, weight, bias, k_cache, v_cache, slots, eps)
    if x.device.type == "cpu" and not _backend.triton_interpret():
        return ln_qkv_ref(x, ln_weight, ln_bias, weight, bias, k_cache, v_cache, slots, eps).contiguous()
    check_int32_offsets(x=x, weight=weight, k_cache=k_cache, v_cache=v_cache)
    return _launch(x, ln_weight, ln_bias, weight, bias, k_cache, v_cache, slots, eps)


# ----------------------------------------------------------------------------- public


def ln_qkv(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
           k_cache: Tensor, v_cache: Tensor, slots: Tensor, *, eps: float = 1e-5,
           backend: str | None = None) -> Tensor:
    """q of ``LayerNorm(x) @ weight.T + bias``, with k and v written into the caches at ``slots``.

    x [B, T, D] (any strides); ln_weight, ln_bias [D]; weight [3D, D]; bias [3D]; one layer's
    k_cache / v_cache [B, H, S, Dh] with H * Dh = D (written in place); slots int [T] (or [B, T]: each batch row its own). All float
    tensors share one dtype and device. Returns q [B, T, D].
    backend: None (automatic), "triton" or "eager" (the fp32 reference).
    """
    _check_inputs(x, ln_weight, ln_bias, weight, bias, k_cache, v_cache, slots, float(eps))
    if _backend.pick(x.device, ("triton", "eager"), backend) == "eager":
        return ln_qkv_ref(x, ln_weight, ln_bias, weight, bias, k_cache, v_cache, slots, eps)
    return torch.ops.mtpkern.ln_qkv(x, ln_weight, ln_bias, weight, bias, k_cache, v_cache, slots, float(eps))


__all__ = ["ln_qkv", "ln_qkv_ref"]
