"""RMSNorm + the SwiGLU MLP's gate and up projections + SiLU(gate) * up, in one kernel.

The third kernel of the Llama family's fused decoder layer: ``h = SiLU(a W_g.T) * (a W_u.T)``
with a = RMSNorm(x) and W = [W_g; W_u] [2I, D] (``SwiGLU.c_fc``: gate rows, then up rows), for
the M = B * T rows of a decode step. A program owns BLOCK_N units of the I-wide output and
streams their gate and up rows together (``_rms_linear.rms_linear_pair``), so neither [M, I]
projection is ever written: only h, which ``linear_residual`` (the down projection and the
residual add) reads next.
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
    bt_strides, check_int32_offsets, check_params, check_rows, input_precision, row_offsets,
)
from mtpkern.ops._rms_linear import pair_blocks, rms_linear_pair, rms_stats
from mtpkern.ops._triton_compat import wrap_triton

# ----------------------------------------------------------------------------- kernel


@triton.jit(do_not_specialize=["T"])
def _rms_swiglu_kernel(
    x_ptr, g_ptr, w_ptr, h_ptr,  # x [B, T, D], RMSNorm g [D], W [2I, D]; h [B, T, I]
    M, T, I, D, eps,
    stride_xb, stride_xt, stride_xd,
    stride_wn, stride_wk,
    stride_hb, stride_ht, stride_hn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < I

    eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as fp64
    x_off = row_offsets(rows, T, stride_xb, stride_xt)
    rstd = rms_stats(x_ptr, x_off, row_ok, stride_xd, D, eps, BLOCK_M, BLOCK_K)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate, up = rms_linear_pair(gate, up, x_ptr, x_off, row_ok, stride_xd, D, g_ptr, rstd,
                               w_ptr, cols, cols + I, col_ok, stride_wn, stride_wk, BLOCK_K, INPUT_PRECISION, DOT)
    # Eager rounds both projections to the model's dtype before the activation.
    gate = gate.to(h_ptr.dtype.element_ty).to(tl.float32)
    up = up.to(h_ptr.dtype.element_ty).to(tl.float32)
    h = gate / (1.0 + tl.exp(-gate)) * up
    h_off = row_offsets(rows, T, stride_hb, stride_ht)
    tl.store(h_ptr + h_off[:, None] + cols[None, :] * stride_hn, h.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------- reference


def rms_swiglu_ref(x: Tensor, ln_weight: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Reference, in fp32, rounded to x's dtype. With x [B, T, D] and weight [2I, D]:

        a = RMSNorm(x) = x / sqrt(mean(x^2) + eps) * ln_weight
        [gate | up] = a @ weight.T,   h = SiLU(gate) * up = gate / (1 + exp(-gate)) * up   [B, T, I]
    """
    D = x.shape[-1]
    a = torch.nn.functional.rms_norm(x.float(), (D,), ln_weight.float(), eps)
    gate, up = (a @ weight.float().T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


# ----------------------------------------------------------------------------- launcher


def _check_inputs(x, ln_weight, weight, eps) -> None:
    if weight.dim() != 2 or weight.shape[0] % 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [2I, D] (gate rows, then up rows), got shape {tuple(weight.shape)}")
    D = weight.shape[1]
    check_rows("x", x, D)
    check_params(x, weight=weight, ln_weight=ln_weight)
    if ln_weight.shape != (D,):
        raise ValueError(f"ln_weight must have shape [{D}], got {tuple(ln_weight.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def _launch(x, ln_weight, weight, eps: float) -> Tensor:
    B, T, D = x.shape
    I = weight.shape[0] // 2  # noqa: E741 - the MLP's intermediate size, as the papers name it
    h = torch.empty((B, T, I), dtype=x.dtype, device=x.device)
    if _backend.triton_interpret() and is_fake(x):
        # Under the interpreter, wrap_triton hands back the plain kernel, which cannot run on
        # fake tensors; a fake implementation only needs the output's metadata anyway.
        return h
    M = B * T
    cfg = pair_blocks(M, I, D, x.dtype)
    grid = (triton.cdiv(I, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        wrap_triton(_rms_swiglu_kernel)[grid](
            x, ln_weight, weight, h,
            M, T, I, D, eps,
            *bt_strides(x), *weight.stride(), *bt_strides(h),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            INPUT_PRECISION=input_precision(x.dtype), DOT=cfg["DOT"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return h


# ----------------------------------------------------------------------------- registration


@torch.library.triton_op("mtpkern::rms_swiglu", mutates_args=())
def _rms_swiglu_op(x: Tensor, ln_weight: Tensor, weight: Tensor, eps: float) -> Tensor:
    # This body is also the fake implementation (run on fake tensors under torch.compile).
    _check_inputs(x, ln_weight, weight, eps)
    if x.device.type == "cpu" and not _backend.triton_interpret():
        return rms_swiglu_ref(x, ln_weight, weight, eps).contiguous()
    check_int32_offsets(x=x, weight=weight)
    return _launch(x, ln_weight, weight, eps)


# ----------------------------------------------------------------------------- public


def rms_swiglu(x: Tensor, ln_weight: Tensor, weight: Tensor, *, eps: float = 1e-6,
               backend: str | None = None) -> Tensor:
    """``SiLU(gate) * up`` with ``[gate | up] = RMSNorm(x) @ weight.T``: x [B, T, D] (any
    strides), ln_weight [D], weight [2I, D] (gate rows, then up rows), one dtype and device.
    Returns [B, T, I]. backend: None (automatic), "triton" or "eager" (the fp32 reference).
    """
    _check_inputs(x, ln_weight, weight, float(eps))
    if _backend.pick(x.device, ("triton", "eager"), backend) == "eager":
        return rms_swiglu_ref(x, ln_weight, weight, eps)
    return torch.ops.mtpkern.rms_swiglu(x, ln_weight, weight, float(eps))


__all__ = ["rms_swiglu", "rms_swiglu_ref"]
