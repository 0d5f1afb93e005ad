"""Linear layer + bias + residual add: ``out = residual + x @ W.T + b``, in one kernel.

The second and fourth kernels of a fused decoder layer (``docs/decode_step.md``): the
attention's output projection (W [D, D]) and the MLP's down projection (W [D, 4D]), each
adding the residual stream in its epilogue, for the M = B * T rows of a decode step.

GPT-2's outputs are only D = 768 wide: 48 blocks of 16 columns would leave most of an H100's
132 SMs idle while the weights stream. So K is split over SPLIT_K programs per column block
(``_decode_linear.blocks``), each writing an fp32 partial [M, 16]; the program that finishes a
column block last (an atomic counter per block) sums the SPLIT_K partials in split order, adds
bias and residual, stores the block and resets its counter for the next launch. The sum's
order never depends on which program came last, so results are deterministic, and the
partials (SPLIT_K * M * D * 4 bytes: 9 KB at T = 1, 590 KB at T = 64) stay small next to the
weights. The counters are one persistent zeroed buffer per device
(``_decode_linear.split_counters``).

Performance model: W is 1.2 MB (attention) and 4.7 MB (MLP) of the 14.2 MB a GPT-2 124M layer
reads in fp16; the whole step's bytes, launches and expected times are in ``docs/decode_step.md``.
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
    blocks, bt_strides, check_int32_offsets, check_params, check_rows, input_precision, linear_tile, output_tile, row_offsets,
    split_counters,
)
from mtpkern.ops._triton_compat import wrap_triton


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _bias_residual_store(acc, b_ptr, r_ptr, o_ptr, rows, cols, row_ok, col_ok, T,
                         stride_rb, stride_rt, stride_rn, stride_ob, stride_ot, stride_on, HAS_BIAS: tl.constexpr):
    mask = row_ok[:, None] & col_ok[None, :]
    r_off = row_offsets(rows, T, stride_rb, stride_rt)
    res = tl.load(r_ptr + r_off[:, None] + cols[None, :] * stride_rn, mask=mask, other=0.0)
    acc += res.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    o_off = row_offsets(rows, T, stride_ob, stride_ot)
    tl.store(o_ptr + o_off[:, None] + cols[None, :] * stride_on, acc.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T"])
def _linear_residual_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr,  # inputs: x [B, T, K], W [N, K], b [N] (HAS_BIAS), residual [B, T, N]
    o_ptr, part_ptr, count_ptr,  # out [B, T, N]; split-K partials [SPLIT_K, M, N] fp32; counters
    M, T, N, K, K_SPLIT,  # K_SPLIT: the K range of one split, a multiple of BLOCK_K
    stride_xb, stride_xt, stride_xk,
    stride_wn, stride_wk,
    stride_rb, stride_rt, stride_rn,
    stride_ob, stride_ot, stride_on,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT: tl.constexpr,
):
    rows, cols, row_ok, col_ok, x_off = output_tile(M, N, T, stride_xb, stride_xt, BLOCK_M, BLOCK_N)
    pid_k = tl.program_id(2)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)

    no_ln = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = linear_tile(acc, x_ptr, x_off, row_ok, stride_xk, w_ptr, cols, col_ok, stride_wn, stride_wk,
                      k_lo, k_hi, x_ptr, x_ptr, no_ln, no_ln, False, BLOCK_K, INPUT_PRECISION, DOT)
    if SPLIT_K == 1:
        _bias_residual_store(acc, b_ptr, r_ptr, o_ptr, rows, cols, row_ok, col_ok, T,
                             stride_rb, stride_rt, stride_rn, stride_ob, stride_ot, stride_on, HAS_BIAS)
    else:
        mask = row_ok[:, None] & col_ok[None, :]
        tl.store(part_ptr + (pid_k * M + rows[:, None]) * N + cols[None, :], acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the counter moves
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last of the tile's splits: reduce in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(part_ptr + (s * M + rows[:, None]) * N + cols[None, :], mask=mask, other=0.0,
                                 cache_modifier=".cg")  # from L2: other SMs wrote them
            _bias_residual_store(total, b_ptr, r_ptr, o_ptr, rows, cols, row_ok, col_ok, T,
                                 stride_rb, stride_rt, stride_rn, stride_ob, stride_ot, stride_on, HAS_BIAS)
            tl.store(count_ptr + tile, 0)  # ready for the next launch


# ----------------------------------------------------------------------------- reference


def linear_residual_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor) -> Tensor:
    """Reference, in fp32, rounded to x's dtype: ``residual + x @ weight.T + bias`` with
    x [B, T, K], weight [N, K], bias [N] or None (no bias), residual [B, T, N]."""
    out = residual.float() + x.float() @ weight.float().T
    return (out if bias is None else out + bias.float()).to(x.dtype)


# ----------------------------------------------------------------------------- launcher

def _check_inputs(x, weight, bias, residual) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    check_rows("x", x, K)
    check_params(x, weight=weight, bias=bias)
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape [{N}], got {tuple(bias.shape)}")
    check_rows("residual", residual, N)
    if residual.shape[:2] != x.shape[:2]:
        raise ValueError(f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ in [B, T]")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise TypeError(f"residual must be {x.dtype} on {x.device}, got {residual.dtype} on {residual.device}")


def _launch(x, weight, bias, residual) -> Tensor:
    B, T, K = x.shape
    N = weight.shape[0]
    out = torch.empty((B, T, N), dtype=x.dtype, device=x.device)
    if _backend.triton_interpret() and is_fake(x):
        # Under the interpreter, wrap_triton hands back the plain kernel, which cannot run on
        # fake tensors; a fake implementation only needs the output's metadata anyway.
        return out
    M = B * T
    cfg = blocks(M, N, K, x.dtype, split_k=True)
    return _run(x, weight, bias, residual, out, cfg)


def _run(x, weight, bias, residual, out, cfg: dict) -> Tensor:
    B, T, K = x.shape
    M, N = B * T, weight.shape[0]
    split = cfg["SPLIT_K"]
    k_split = triton.cdiv(triton.cdiv(K, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = triton.cdiv(K, k_split)  # no empty split
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]), split)
    part = torch.empty((split, M, N) if split > 1 else (1,), dtype=torch.float32, device=x.device)
    counters = split_counters(x.device, grid[0] * grid[1], like=x) if split > 1 else part
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        wrap_triton(_linear_residual_kernel)[grid](
            x, weight, x if bias is None else bias, residual, out, part, counters,
            M, T, N, K, k_split,
            *bt_strides(x), *weight.stride(), *bt_strides(residual), *bt_strides(out),
            SPLIT_K=split,
            HAS_BIAS=bias is not None,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            INPUT_PRECISION=input_precision(x.dtype), DOT=cfg["DOT"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out


# ----------------------------------------------------------------------------- registration


@torch.library.triton_op("mtpkern::linear_residual", mutates_args=())
def _linear_residual_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor) -> Tensor:
    # This body is also the fake implementation (run on fake tensors under torch.compile).
    _check_inputs(x, weight, bias, residual)
    if x.device.type == "cpu" and not _backend.triton_interpret():
        return linear_residual_ref(x, weight, bias, residual).contiguous()
    check_int32_offsets(x=x, weight=weight, residual=residual)
    return _launch(x, weight, bias, residual)


# ----------------------------------------------------------------------------- public


def linear_residual(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor, *,
                    backend: str | None = None) -> Tensor:
    """``residual + x @ weight.T + bias``: x [B, T, K] and residual [B, T, N] (any strides),
    weight [N, K], bias [N] or None (a projection without bias: Llama's), one dtype and
    device. Returns a new [B, T, N] tensor.
    backend: None (automatic), "triton" or "eager" (the fp32 reference).
    """
    _check_inputs(x, weight, bias, residual)
    if _backend.pick(x.device, ("triton", "eager"), backend) == "eager":
        return linear_residual_ref(x, weight, bias, residual)
    return torch.ops.mtpkern.linear_residual(x, weight, bias, residual)


__all__ = ["linear_residual", "linear_residual_ref"]
