"""What the fused decoder-layer kernels share: ``ln_qkv``, ``ln_fc_gelu`` and ``linear_residual``.

Each of them is a GEMV-style stream over one weight matrix W [N, K] (nn.Linear's layout: the
reduction dimension K is contiguous) for the M = B * T rows of a decode step, T = 1..128:

- one program per block of BLOCK_N output columns (and per block of BLOCK_M <= 128 rows, a
  single one for every T the decode path runs), so each weight tile is read from memory once
  per step for all rows; ``linear_residual`` may also split K over SPLIT_K programs (below);
- the rows' LayerNorm (when the op has one) is applied to each K chunk as it is loaded, from
  row statistics the program computes first (the rows are a few KB and sit in L2);
- fp16 / bf16 operands on the tensor cores, fp32 accumulation (fp32 models: exact "ieee" dots
  on the FMA units, so greedy decoding keeps eager fp32's tokens).

Inputs of shape [B, T, K] are addressed by (batch, token) strides, so the model's views (the
attention output's transposed layout, a sliced tensor) need no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from mtpkern.ops import _backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SPLIT_K = 8
_TARGET_PROGRAMS = 128  # about one per SM of an H100 / H200 (132): a stream over the weights needs them all


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def row_offsets(rows, T, stride_b, stride_t):
    """Element offsets of rows m = b * T + t of a [B, T, *] tensor."""
    return (rows // T) * stride_b + (rows % T) * stride_t


@triton.jit
def output_tile(M, N, T, stride_xb, stride_xt, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile: (rows, cols, row_ok, col_ok, the rows' offsets into x [B, T, K]), for
    a grid of (column blocks, row blocks, ...)."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols, rows < M, cols < N, row_offsets(rows, T, stride_xb, stride_xt)


@triton.jit
def layer_norm_stats(x_ptr, row_off, row_ok, stride_k, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Mean and 1 / sqrt(var + eps) of each row, in fp32 (one pass: sum and sum of squares)."""
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row_off[:, None] + ks[None, :] * stride_k,
                    mask=row_ok[:, None] & (ks < K)[None, :], other=0.0).to(tl.float32)
        s1 += tl.sum(x, axis=1)
        s2 += tl.sum(x * x, axis=1)
    mean = s1 / K
    var = tl.maximum(s2 / K - mean * mean, 0.0)
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def linear_tile(
    acc, x_ptr, row_off, row_ok, stride_xk,
    w_ptr, cols, col_ok, stride_wn, stride_wk,
    k_lo, k_hi,
    lnw_ptr, lnb_ptr, mean, rstd,
    HAS_LN: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT: tl.constexpr = True,
):
    """acc [BLOCK_M, BLOCK_N] += a[:, k_lo:k_hi] @ W[cols, k_lo:k_hi].T, where a = x, or
    LayerNorm(x) = (x - mean) * rstd * ln_weight + ln_bias rounded to W's dtype (as eager
    rounds the LayerNorm's output before the linear layer). ``DOT``: on the tensor cores
    (``tl.dot``, which needs 16 rows, padding one decode row to 16), else as products summed in
    fp32 on the FMA units, for 1-4 rows (a GEMV: no padding, tiles of any width)."""
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_hi
        w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :] * stride_wk,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + row_off[:, None] + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_LN:
            g = tl.load(lnw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            b = tl.load(lnb_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
        if DOT:
            acc = tl.dot(x.to(w.dtype), tl.trans(w), acc, input_precision=INPUT_PRECISION)
        else:  # [BLOCK_M, 1, BLOCK_K] x [1, BLOCK_N, BLOCK_K], summed over K
            a = x.to(w.dtype).to(tl.float32)
            acc += tl.sum(a[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def gelu_tanh(x):
    """0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), written as x * sigmoid(2u)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * u))


# ----------------------------------------------------------------------------- host helpers


def blocks(M: int, N: int, K: int, dtype: torch.dtype, *, split_k: bool = False) -> dict:
    """Block sizes for a [M, K] x [N, K]^T stream (see the module docstring).

    GPU: 16 output columns per program (GPT-2's 2304 / 3072 wide projections give 144 / 192
    programs), K in 128-wide steps, four pipeline stages so several weight tiles are in flight
    per SM. Each program reads its rows' K range too (from L2), M / BLOCK_N times the bytes of
    its weight tile: above 16 rows, half precision takes 32 columns per program to keep that
    in bounds. fp32's dots run on the FMA units and keep 16 x 32 tiles in registers, for every
    M, so an fp32 row's result never depends on how many rows share the step (greedy
    speculative decoding stays token-identical to ntp). The 768-wide outputs give few column
    blocks: ``split_k`` lets ``linear_residual`` split K until about 128 programs run.
    The interpreter pays per program and per operation, not per element: it gets blocks as
    wide as the matrix (up to 256), so the CPU tests stay fast; the kernels are the same.
    ``DOT=False`` (a GEMV on the FMA units, ``linear_tile``) is not chosen here yet:
    ``benchmarks/sweep_decode_layer.py`` times it against these blocks on a GPU.
    """
    block_m = min(128, max(16, triton.next_power_of_2(M)))
    if _backend.triton_interpret():
        return dict(BLOCK_M=block_m, BLOCK_N=min(256, max(16, triton.next_power_of_2(N))),
                    BLOCK_K=min(256, max(16, triton.next_power_of_2(K))), SPLIT_K=1, num_warps=4, num_stages=1,
                    DOT=True)
    fp32 = dtype == torch.float32
    block_n = 16 if fp32 or M <= 16 else 32
    block_k = 32 if fp32 else 128 if M <= 64 else 64
    n_split = 1
    if split_k:  # each split keeps at least two K steps
        n_split = max(1, min(MAX_SPLIT_K, triton.cdiv(_TARGET_PROGRAMS, triton.cdiv(N, block_n)), K // (2 * block_k)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=n_split,
                num_warps=8 if block_m >= 128 else 4, num_stages=4 if block_m <= 64 else 3, DOT=True)


_COUNTERS: dict[torch.device, Tensor] = {}


def split_counters(device: torch.device, n: int, like: Tensor | None = None) -> Tensor:
    """int32 counters for kernels whose last-arriving program reduces the others' partials
    (``linear_residual``'s split K, ``tree_attention``'s split prefix). Every counter is zero
    between launches: the last program of each tile resets its own. One buffer per device, so
    launches on one stream (and CUDA-graph replays) share it; concurrent streams must not.
    While ``torch.compile`` traces (``like`` is a fake tensor) each call gets fresh zeros, so
    no fake tensor is ever cached."""
    if like is not None and is_fake(like):
        return torch.zeros(n, dtype=torch.int32, device=device)
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


def input_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # TF32 would break fp32's token identity


def check_rows(name: str, x: Tensor, width: int) -> None:
    """x must be a [B, T, width] float tensor with B, T >= 1."""
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D [B, T, {width}], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if x.shape[2] != width:
        raise ValueError(f"{name} must have {width} features (the weight's input width), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name}.dtype must be float32, float16 or bfloat16, got {x.dtype}")


def check_params(x: Tensor, **params: Tensor | None) -> None:
    """Every parameter has x's dtype and device; ``weight`` is 2-D, the others 1-D."""
    for name, p in params.items():
        if p is None:
            continue
        want = 2 if name == "weight" else 1
        if p.dim() != want:
            raise ValueError(f"{name} must be {want}-D, got shape {tuple(p.shape)}")
        if p.dtype != x.dtype:
            raise TypeError(f"{name}.dtype ({p.dtype}) must equal the input's dtype ({x.dtype})")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but the input is on {x.device}")


def check_int32_offsets(**tensors: Tensor) -> None:
    """The kernels compute element offsets in int32 (int64 ones cost registers)."""
    for name, t in tensors.items():
        if sum((n - 1) * s for n, s in zip(t.shape, t.stride())) >= 2**31:
            raise ValueError(f"{name} {tuple(t.shape)} spans 2**31 elements or more; the Triton kernels' "
                             "offsets are int32 (use backend='eager')")


def bt_strides(t: Tensor) -> tuple[int, int, int]:
    """(batch, token, feature) strides of a [B, T, *] tensor."""
    return t.stride(0), t.stride(1), t.stride(2)
