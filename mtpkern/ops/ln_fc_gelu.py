"""LayerNorm + the MLP's up projection + bias + GELU (tanh), in one kernel.

The third kernel of a fused decoder layer (``docs/decode_step.md``): ``h = GELU(LayerNorm(x)
@ W.T + b)`` with W [4D, D], for the M = B * T rows of a decode step. LayerNorm 2 lives here,
in this kernel's prologue, rather than in the epilogue of the output projection before it: an
epilogue sees 16 columns of a row, a LayerNorm needs the whole row. The [M, 4D] activation is
written once (6 KB per row at GPT-2's width, against the 4.7 MB of W) and read by
``linear_residual``: fusing the down projection in too would need a reduction over 4D across
programs whose partial sums, [programs, M, D] in fp32, outweigh the activation at every T.

Performance model: W is 4.7 MB of the 14.2 MB a GPT-2 124M layer reads in fp16; the whole
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
    blocks, bt_strides, check_int32_offsets, check_params, check_rows, gelu_tanh, input_precision,
    layer_norm_stats, linear_tile, output_tile, row_offsets,
)
from mtpkern.ops._triton_compat import wrap_triton


# ----------------------------------------------------------------------------- kernel


@triton.jit(do_not_specialize=["T"])
def _ln_fc_gelu_kernel(
    x_ptr, lnw_ptr, lnb_ptr, w_ptr, b_ptr, h_ptr,  # x [B, T, D], LayerNorm, W [N, D], b [N]; h [B, T, N]
    M, T, N, D, eps,
    stride_xb, stride_xt, stride_xd,
    stride_wn, stride_wk,
    stride_hb, stride_ht, stride_hn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT: tl.constexpr,
):
    rows, cols, row_ok, col_ok, x_off = output_tile(M, N, T, stride_xb, stride_xt, BLOCK_M, BLOCK_N)

    eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as fp64
    mean, rstd = layer_norm_stats(x_ptr, x_off, row_ok, stride_xd, D, eps, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = linear_tile(acc, x_ptr, x_off, row_ok, stride_xd, w_ptr, cols, col_ok, stride_wn, stride_wk,
                      0, D, lnw_ptr, lnb_ptr, mean, rstd, True, BLOCK_K, INPUT_PRECISION, DOT)
    acc = gelu_tanh(acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :])
    h_off = row_offsets(rows, T, stride_hb, stride_ht)
    tl.store(h_ptr + h_off[:, None] + cols[None, :] * stride_hn, acc.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------- reference


def ln_fc_gelu_ref(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
                   eps: float = 1e-5) -> Tensor:
    """Reference, in fp32, rounded to x's dtype. With x [B, T, D] and weight [N, D]:

        h = GELU_tanh(LayerNorm(x; ln_weight, ln_bias, eps) @ weight.T + bias)
        GELU_tanh(z) = 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))
    """
    D = x.shape[-1]
    h = torch.nn.functional.layer_norm(x.float(), (D,), ln_weight.float(), ln_bias.float(), eps)
    return torch.nn.functional.gelu(h @ weight.float().T + bias.float(), approximate="tanh").to(x.dtype)


# ----------------------------------------------------------------------------- launcher


def _check_inputs(x, ln_weight, ln_bias, weight, bias, eps) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, D], got shape {tuple(weight.shape)}")
    N, D = weight.shape
    check_rows("x", x, D)
    check_params(x, weight=weight, bias=bias, ln_weight=ln_weight, ln_bias=ln_bias)
    for name, p, n in (("bias", bias, N), ("ln_weight", ln_weight, D), ("ln_bias", ln_bias, D)):
        if p.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(p.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def _launch(x, ln_weight, ln_bias, weight, bias, eps: float) -> Tensor:
    B, T, D = x.shape
    N = weight.shape[0]
    h = torch.empty((B, T, N), dtype=x.dtype, device=x.device)
    if _backend.triton_interpret() and is_fake(x):
        # Under the interpreter, wrap_triton hands back the plain kernel, which cannot run on
        # fake tensors; a fake implementation only needs the output's metadata anyway.
        return h
    M = B * T
    cfg = blocks(M, N, D, x.dtype)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        wrap_triton(_ln_fc_gelu_kernel)[grid](
            x, ln_weight, ln_bias, weight, bias, h,
            M, T, N, D, eps,
            *bt_strides(x), *weight.stride(), *bt_strides(h),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            INPUT_PRECISION=input_precision(x.dtype), DOT=cfg["DOT"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return h


# ----------------------------------------------------------------------------- registration


@torch.library.triton_op("mtpkern::ln_fc_gelu", mutates_args=())
def _ln_fc_gelu_op(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
                   eps: float) -> Tensor:
    # This body is also the fake implementation (run on fake tensors under torch.compile).
    _check_inputs(x, ln_weight, ln_bias, weight, bias, eps)
    if x.device.type == "cpu" and not _backend.triton_interpret():
        return ln_fc_gelu_ref(x, ln_weight, ln_bias, weight, bias, eps).contiguous()
    check_int32_offsets(x=x, weight=weight)
    return _launch(x, ln_weight, ln_bias, weight, bias, eps)


# ----------------------------------------------------------------------------- public


def ln_fc_gelu(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor, *,
               eps: float = 1e-5, backend: str | None = None) -> Tensor:
    """``GELU_tanh(LayerNorm(x) @ weight.T + bias)``: x [B, T, D] (any strides), ln_weight /
    ln_bias [D], weight [N, D], bias [N], one dtype and device. Returns [B, T, N].
    backend: None (automatic), "triton" or "eager" (the fp32 reference).
    """
    _check_inputs(x, ln_weight, ln_bias, weight, bias, float(eps))
    if _backend.pick(x.device, ("triton", "eager"), backend) == "eager":
        return ln_fc_gelu_ref(x, ln_weight, ln_bias, weight, bias, eps)
    return torch.ops.mtpkern.ln_fc_gelu(x, ln_weight, ln_bias, weight, bias, float(eps))


__all__ = ["ln_fc_gelu", "ln_fc_gelu_ref"]
