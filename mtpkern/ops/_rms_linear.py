"""What the Llama family's fused decode kernels share: ``rms_qkv_rope`` and ``rms_swiglu``.

Both are the GEMV-style stream of ``_decode_linear`` (one program per block of output columns
and rows, each weight tile read once per step for all rows) with an RMSNorm in the prologue,
and both need two output columns per result: a rotary pair (d, d + Dh/2) of one head, or the
gate and up columns of one MLP unit. ``rms_linear_pair`` accumulates both column sets from one
load of the normalised rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mtpkern.ops._decode_linear import blocks


@triton.jit
def rms_stats(x_ptr, row_off, row_ok, stride_k, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of each row, in fp32."""
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row_off[:, None] + ks[None, :] * stride_k,
                    mask=row_ok[:, None] & (ks < K)[None, :], other=0.0).to(tl.float32)
        s2 += tl.sum(x * x, axis=1)
    return 1.0 / tl.sqrt(s2 / K + eps)


@triton.jit
def rms_linear_pair(
    acc1, acc2, x_ptr, row_off, row_ok, stride_xk, K, g_ptr, rstd,
    w_ptr, cols1, cols2, col_ok, stride_wn, stride_wk,
    BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT: tl.constexpr,
):
    """acc1 += a @ W[cols1].T and acc2 += a @ W[cols2].T, a = RMSNorm(x) = x * rstd * g. As
    eager rounds it (``mtpkern.llama.rms_norm``): x * rstd to x's dtype, times g, to W's dtype.
    ``DOT``: on the tensor cores, else as fp32 products on the FMA units (``linear_tile``)."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + row_off[:, None] + ks[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        a = (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32) * g[None, :]
        w_mask = col_ok[:, None] & k_ok[None, :]
        w1 = tl.load(w_ptr + cols1[:, None] * stride_wn + ks[None, :] * stride_wk, mask=w_mask, other=0.0)
        w2 = tl.load(w_ptr + cols2[:, None] * stride_wn + ks[None, :] * stride_wk, mask=w_mask, other=0.0)
        a = a.to(w1.dtype)
        if DOT:
            acc1 = tl.dot(a, tl.trans(w1), acc1, input_precision=INPUT_PRECISION)
            acc2 = tl.dot(a, tl.trans(w2), acc2, input_precision=INPUT_PRECISION)
        else:
            af = a.to(tl.float32)[:, None, :]
            acc1 += tl.sum(af * w1.to(tl.float32)[None, :, :], axis=2)
            acc2 += tl.sum(af * w2.to(tl.float32)[None, :, :], axis=2)
    return acc1, acc2


def pair_blocks(M: int, n_pairs: int, K: int, dtype: torch.dtype) -> dict:
    """``_decode_linear.blocks`` for a stream of column pairs: half as many pairs per program
    as it gives columns (at least 16, ``tl.dot``'s least), so a program's two accumulators and
    two weight tiles take the registers one of each takes in ``ln_qkv`` (at 64 rows in 16 bits
    the full width spilled on sm_80: tests/test_triton_compile.py)."""
    cfg = blocks(M, n_pairs, K, dtype)
    return {**cfg, "BLOCK_N": max(16, cfg["BLOCK_N"] // 2)}
