"""Tree attention: T new tokens attend a static KV cache prefix plus each other through a
bit-packed tree mask (FlashAttention-style online softmax, one kernel), optionally followed in
the same kernel by the attention's output projection, bias and residual add.

Cache layout: one layer's ``k_cache`` / ``v_cache`` [B, H, S, Dh]. The prefix fills slots
``0 .. P-1`` (``P = prefix_len``, an int tensor read inside the kernel, so a CUDA graph replays
with a new value and nothing syncs), and the T tree tokens' own K/V are already written at
slots ``P .. P+T-1``. Tree token i attends every slot < P, and tree token j (slot P + j) iff
bit j of row i of the packed mask is set; slots >= P + T are never read.

Packed mask format (shared with the C++ ops): int32 [T, W], W = ceil(T / 32); bit j of row i
is bit ``j % 32`` of word ``j // 32`` (bit 31 is the sign bit). A token sees itself iff its
own bit is set (every valid tree sets it). A chain mask (lower triangle) makes this a causal
prefill of T tokens.

Input checks: the registered op ``torch.ops.mtpkern.tree_attention`` checks every shape, dtype and
device itself (also on fake tensors), so calling it directly is as safe as :func:`tree_attention`.
The value of ``prefix_len`` must satisfy ``0 <= P <= S - T``. Where ``prefix_len`` is a CPU tensor
(the eager reference, and the Triton interpreter) it is checked on the host: ``ValueError``. On a
GPU, checking it would cost a host sync per call (and break CUDA-graph capture), so the kernel
reads it and refuses instead: for an out-of-range P it reads nothing and writes NaN to every
output row (so the caller sees NaN, never values read past the cache); the eager reference on a
GPU does the same, without a sync.

NaN contract (every backend): a slot a token cannot see never affects its output, whatever it
holds (NaN or inf in a masked-out or unused K or V slot changes nothing). A NaN reaching a row
through what it sees (its query, a visible K) makes that row NaN, and so does a non-finite V in
a visible slot; a row that sees no slot at all (only an invalid mask with P = 0) is zeros.

With the output projection (``tree_attention_proj``, the fused decoder layer's second launch):
``residual + y @ W.T + bias``, y the attention laid out as [B, T, H * Dh]. The program that
finishes a head (the head's program, or its last split) multiplies the head's [T, Dh] output by
its Dh columns of W into an fp32 partial [T, N]; the last head of a row block to finish (an
atomic counter) sums the H partials in head order, adds bias and residual and stores the rows.
The sum's order never depends on which head came last, so results are deterministic, and the
partials are small (H x T x N x 4 bytes: 37 KB at T = 1 for GPT-2, 2.4 MB at T = 64).

Grouped-query attention (``tree_attention_gqa``, the Llama family): H query heads over
H_kv = H / G KV heads, query head h reading KV head h // G. A program serves one KV head and
its G query heads at once: its row r is token r % TOKENS of query head r // TOKENS, so every
K/V tile it loads feeds all G heads and each KV head is read once per block of tokens, not G
times. Head dims that are not a power of two >= 16 (8, 80, 96) are padded in registers, their
padding masked on every load and store. With G = 1 it is ``tree_attention``, whose kernels it
shares; ``tree_attention_gqa_proj`` adds the output projection as ``tree_attention_proj`` does
(each program projects each of its query heads through that head's columns of W; the last of
a row block's KV-head programs sums the H query heads' partials in head order), bias optional.

Flash-decoding: when the grid of (query block, batch, head) programs is small (T = 1 gives
B * H, 12 for GPT-2), ``_tree_attention_split_kernel`` splits each prefix over several programs
and merges their partial softmax sums in split order (``_prefix_splits`` decides how many),
with the same prefix check and NaN contract (the two kernels share their prefix and tree loops).
"""

import contextlib
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from mtpkern.ops import _backend
from mtpkern.ops._checks import values_on_host
from mtpkern.ops._decode_linear import split_counters
from mtpkern.ops._triton_compat import wrap_triton
from mtpkern.ops.linear_residual import linear_residual_ref
from mtpkern.runtime import dtype_name

HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, INPUT_PRECISION: tl.constexpr):
    """One online-softmax update with scores ``s`` (log2 domain, -inf where masked)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with nothing visible yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _nonfinite_rows(v):
    """[N, D] tile -> [N]: whether each row holds a NaN or an inf."""
    return tl.max(((v != v) | (tl.abs(v) == float("inf"))).to(tl.int32), axis=1) > 0


@triton.jit
def _read_prefix_len(prefix_ptr, S, T):
    """(P, tree tokens to read, bad): an out-of-range P (only a device tensor can get here
    unchecked) reads nothing (P = 0, no tree tokens) and ``bad`` makes every row NaN."""
    prefix = tl.load(prefix_ptr).to(tl.int64)
    bad = (prefix < 0) | (prefix > S - T)
    prefix = tl.where(bad, 0, prefix).to(tl.int32)
    n_tree = tl.where(bad, 0, T)
    return prefix, n_tree, bad


@triton.jit
def _attend_prefix(q, k_base, v_base, d_ok, stride_ks, stride_vs, lo, hi, qk_scale, m_i, l_i, acc, poison,
                   BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Prefix slots ``lo .. hi-1``, visible to every tree token; ``poison`` marks the rows that
    see a non-finite V (every row, here)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        slots = start + offs_n
        ok = slots < hi
        kt = tl.load(k_base + slots[None, :] * stride_ks, mask=d_ok[:, None] & ok[None, :], other=0.0)
        v = tl.load(v_base + slots[:, None] * stride_vs, mask=ok[:, None] & d_ok[None, :], other=0.0)
        poison = tl.maximum(poison, tl.max(_nonfinite_rows(v).to(tl.int32), axis=0))
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, INPUT_PRECISION)
    return m_i, l_i, acc, poison


@triton.jit
def _attend_tree(q, k_base, v_base, d_ok, stride_ks, stride_vs, mask_ptr, offs_m, m_ok, prefix, n_tree, T, W,
                 qk_scale, m_i, l_i, acc, poison, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """The tree tokens: slot P + j is visible to token i iff bit j of mask row i is set."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(0, n_tree, BLOCK_N):
        js = start + offs_n
        ok = js < T
        words = tl.load(
            mask_ptr + offs_m[:, None] * W + (js // 32)[None, :], mask=m_ok[:, None] & ok[None, :], other=0
        )
        visible = ((words >> (js % 32)[None, :]) & 1) != 0
        slots = prefix + js
        kt = tl.load(k_base + slots[None, :] * stride_ks, mask=d_ok[:, None] & ok[None, :], other=0.0)
        v = tl.load(v_base + slots[:, None] * stride_vs, mask=ok[:, None] & d_ok[None, :], other=0.0)
        # A non-finite V must not reach the rows that cannot see it (0 * NaN = NaN in the dot):
        # zero it, and poison the rows that can.
        v_bad = _nonfinite_rows(v)
        v = tl.where(v_bad[:, None], 0.0, v)
        poison = tl.maximum(poison, tl.max((visible & v_bad[None, :]).to(tl.int32), axis=1))
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, INPUT_PRECISION)
    return m_i, l_i, acc, poison


@triton.jit
def _finish(acc, l_i, nan_rows):
    """acc / l, NaN where ``nan_rows``; a row that sees nothing (only possible with an invalid
    mask and P = 0) has l = 0 and outputs zeros."""
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    return tl.where(nan_rows[:, None], float("nan"), out)


@triton.jit
def _epilogue(out, b, h, heads, pid_m, offs_m, m_ok, d_ok, H, N,
              o_ptr, stride_ob, stride_oh, stride_ot, stride_od,
              w_ptr, stride_wn, stride_wk, bias_ptr, r_ptr, stride_rb, stride_rt, stride_rn,
              y_ptr, stride_yb, stride_yt, stride_yn, part_ptr, hcount_ptr,
              HEAD_DIM: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, PROJ: tl.constexpr, GROUP: tl.constexpr, TOKENS: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    """A finished program's rows (query heads ``heads``, tokens ``offs_m``): stored as they are,
    or (``PROJ``; h: the KV head) through the output projection."""
    if PROJ:
        _project_head(out, b, h, pid_m, tl.num_programs(0), offs_m, m_ok, d_ok, H, N,
                      w_ptr, stride_wn, stride_wk, bias_ptr, r_ptr, stride_rb, stride_rt, stride_rn,
                      y_ptr, stride_yb, stride_yt, stride_yn, part_ptr, hcount_ptr,
                      HEAD_DIM, DH, BLOCK_M, BLOCK_P, INPUT_PRECISION, GROUP, TOKENS, HAS_BIAS)
    else:
        offs_d = tl.arange(0, HEAD_DIM)
        tl.store(
            o_ptr + b * stride_ob + (heads * stride_oh + offs_m * stride_ot)[:, None] + offs_d[None, :] * stride_od,
            out.to(o_ptr.dtype.element_ty),
            mask=m_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def _project_head(out, b, h, pid_m, n_mblocks, offs_m, m_ok, d_ok, H, N,
                  w_ptr, stride_wn, stride_wk, bias_ptr, r_ptr, stride_rb, stride_rt, stride_rn,
                  y_ptr, stride_yb, stride_yt, stride_yn, part_ptr, hcount_ptr,
                  HEAD_DIM: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, GROUP: tl.constexpr, TOKENS: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """``tree_attention_proj``'s epilogue: each query head's share of the output projection,
    its rows of out [BLOCK_M, Dh] (rounded to the weights' dtype, as eager rounds the attention
    output) @ W[:, q*Dh:(q+1)*Dh].T for query head q = h * GROUP + g, an fp32 partial
    [TOKENS, N] per (row block, query head), its valid rows only (T = 1: one row, 3 KB at
    GPT-2's width). With grouped KV heads the program holds GROUP query heads (row r: head
    r // TOKENS) and projects each through its own columns of W. The program that finishes a
    row block's KV heads last (an atomic counter per row block, H = KV heads) sums the
    H * GROUP partials in head order, adds bias (``HAS_BIAS``) and residual, stores the rows
    and resets its counter."""
    a = out.to(w_ptr.dtype.element_ty)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = tl.arange(0, BLOCK_M)
    g_rows = rows // TOKENS
    t_rows = rows % TOKENS
    tile = b * n_mblocks + pid_m
    n_heads = H * GROUP
    for n0 in range(0, N, BLOCK_P):
        cols = n0 + tl.arange(0, BLOCK_P)
        c_ok = cols < N
        for g in tl.static_range(GROUP):
            head = h * GROUP + g
            w = tl.load(w_ptr + cols[:, None] * stride_wn + (head * DH + offs_d)[None, :] * stride_wk,
                        mask=c_ok[:, None] & d_ok[None, :], other=0.0)
            mine = g_rows == g
            a_g = a if GROUP == 1 else tl.where(mine[:, None], a, tl.zeros_like(a))
            part = tl.dot(a_g, tl.trans(w), input_precision=INPUT_PRECISION)
            dst = part_ptr + ((tile * n_heads + head) * TOKENS + t_rows[:, None]) * N + cols[None, :]
            tl.store(dst, part, mask=(m_ok & mine)[:, None] & c_ok[None, :])
    tl.debug_barrier()  # every thread's partial is stored before the counter moves
    arrived = tl.atomic_add(hcount_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == H - 1:  # the row block's last KV head: reduce in query head order
        first = part_ptr + tile * n_heads * TOKENS * N
        out_ok = m_ok & (g_rows == 0)  # each token once
        r_off = b * stride_rb + offs_m * stride_rt
        y_off = b * stride_yb + offs_m * stride_yt
        for n0 in range(0, N, BLOCK_P):
            cols = n0 + tl.arange(0, BLOCK_P)
            c_ok = cols < N
            mask = out_ok[:, None] & c_ok[None, :]
            total = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
            for hh in range(0, n_heads):
                total += tl.load(first + (hh * TOKENS + t_rows[:, None]) * N + cols[None, :], mask=mask,
                                 other=0.0, cache_modifier=".cg")  # from L2: other SMs wrote them
            res = tl.load(r_ptr + r_off[:, None] + cols[None, :] * stride_rn, mask=mask, other=0.0)
            total += res.to(tl.float32)
            if HAS_BIAS:
                total += tl.load(bias_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + y_off[:, None] + cols[None, :] * stride_yn, total.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(hcount_ptr + tile, 0)  # ready for the next launch


@triton.jit
def _load_queries(q_ptr, b, kv_head, pid_m, T, stride_qb, stride_qh, stride_qt, stride_qd,
                  GROUP: tl.constexpr, TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, DH: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """This program's query rows: row r is token pid_m * TOKENS + r % TOKENS of query head
    kv_head * GROUP + r // TOKENS, so every query head a KV head serves shares each K/V tile it
    loads (grouped-query attention reads a KV head once; GROUP = 1: one head, rows = tokens).
    Returns (tokens, heads, row_ok, offs_d, d_ok, q [BLOCK_M, HEAD_DIM])."""
    r = tl.arange(0, BLOCK_M)
    g = r // TOKENS
    offs_m = pid_m * TOKENS + r % TOKENS
    m_ok = (g < GROUP) & (offs_m < T)
    heads = kv_head * GROUP + g
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < DH
    q = tl.load(q_ptr + b * stride_qb + (heads * stride_qh + offs_m * stride_qt)[:, None] + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    return offs_m, heads, m_ok, offs_d, d_ok, q


# T is not specialised: T = 1 (plain decoding) and T % 16 == 0 would each compile a kernel of
# their own, for no gain (T only bounds the loops and masks).
@triton.jit(do_not_specialize=["T"])
def _tree_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, prefix_ptr, mask_ptr,
    T, S, W, H, stride_pb, qk_scale,  # qk_scale = softmax scale * log2(e)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    w_ptr, bias_ptr, r_ptr, y_ptr, part_ptr, hcount_ptr, N,  # PROJ: W [N, H*Dh], b [N], residual / y [B, T, N]
    stride_wn, stride_wk, stride_rb, stride_rt, stride_rn, stride_yb, stride_yt, stride_yn,
    HEAD_DIM: tl.constexpr,  # the head dim padded to a power of two >= 16 (tl.dot's least)
    DH: tl.constexpr,  # the head dim
    GROUP: tl.constexpr,  # query heads per KV head
    TOKENS: tl.constexpr,  # tree tokens per program: BLOCK_M = TOKENS * next_power_of_2(GROUP)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    PROJ: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # PROJ: whether the projection has a bias
    BLOCK_P: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile passes Python floats as fp64
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H  # the KV head
    prefix, n_tree, bad_prefix = _read_prefix_len(prefix_ptr + b * stride_pb, S, T)  # stride 0: shared

    offs_m, heads, m_ok, offs_d, d_ok, q = _load_queries(q_ptr, b, h, pid_m, T, stride_qb, stride_qh, stride_qt,
                                                         stride_qd, GROUP, TOKENS, HEAD_DIM, DH, BLOCK_M)
    k_base = k_ptr + b * stride_kb + h * stride_kh + offs_d[:, None] * stride_kd  # K^T tiles
    v_base = v_ptr + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    poison = tl.zeros((BLOCK_M,), dtype=tl.int32)  # rows that see a non-finite V
    m_i, l_i, acc, poison = _attend_prefix(q, k_base, v_base, d_ok, stride_ks, stride_vs, 0, prefix, qk_scale,
                                           m_i, l_i, acc, poison, BLOCK_N, INPUT_PRECISION)
    m_i, l_i, acc, poison = _attend_tree(q, k_base, v_base, d_ok, stride_ks, stride_vs, mask_ptr, offs_m, m_ok,
                                         prefix, n_tree, T, W, qk_scale, m_i, l_i, acc, poison,
                                         BLOCK_N, INPUT_PRECISION)
    out = _finish(acc, l_i, (poison > 0) | bad_prefix)
    _epilogue(out, b, h, heads, pid_m, offs_m, m_ok, d_ok, H, N, o_ptr, stride_ob, stride_oh, stride_ot, stride_od,
              w_ptr, stride_wn, stride_wk, bias_ptr, r_ptr, stride_rb, stride_rt, stride_rn,
              y_ptr, stride_yb, stride_yt, stride_yn, part_ptr, hcount_ptr,
              HEAD_DIM, DH, BLOCK_M, BLOCK_P, INPUT_PRECISION, PROJ, GROUP, TOKENS,
              HAS_BIAS)


# Flash-decoding: at T = 1 the grid above is B * H programs (12 for GPT-2), too few to stream a
# long prefix. This variant splits the prefix over NUM_SPLITS programs per (query block, b, h);
# the last split also takes the tree tokens. Each writes its unnormalised partial (acc, m, l),
# with l = NaN for the rows it saw a non-finite V in; the program that finishes a tile last (an
# atomic counter) merges the splits in split order, so the result never depends on which came
# last, and resets the counter. Same prefix check and NaN contract as the kernel above.
@triton.jit(do_not_specialize=["T"])
def _tree_attention_split_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, prefix_ptr, mask_ptr,
    acc_ptr, ml_ptr, count_ptr,  # partials [tiles, NUM_SPLITS, BLOCK_M, HEAD_DIM], [tiles, NUM_SPLITS, 2, BLOCK_M]
    T, S, W, H, stride_pb, qk_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    w_ptr, bias_ptr, r_ptr, y_ptr, part_ptr, hcount_ptr, N,  # PROJ: W [N, H*Dh], b [N], residual / y [B, T, N]
    stride_wn, stride_wk, stride_rb, stride_rt, stride_rn, stride_yb, stride_yt, stride_yn,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,  # the head dim padded to a power of two >= 16 (tl.dot's least)
    DH: tl.constexpr,  # the head dim
    GROUP: tl.constexpr,  # query heads per KV head
    TOKENS: tl.constexpr,  # tree tokens per program: BLOCK_M = TOKENS * next_power_of_2(GROUP)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    PROJ: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # PROJ: whether the projection has a bias
    BLOCK_P: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile passes Python floats as fp64
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H  # the KV head
    prefix, n_tree, bad_prefix = _read_prefix_len(prefix_ptr + b * stride_pb, S, T)  # stride 0: shared
    # This split's prefix range, in whole BLOCK_N blocks.
    chunk = tl.cdiv(tl.cdiv(prefix, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(prefix, lo + chunk)

    offs_m, heads, m_ok, offs_d, d_ok, q = _load_queries(q_ptr, b, h, pid_m, T, stride_qb, stride_qh, stride_qt,
                                                         stride_qd, GROUP, TOKENS, HEAD_DIM, DH, BLOCK_M)
    k_base = k_ptr + b * stride_kb + h * stride_kh + offs_d[:, None] * stride_kd  # K^T tiles
    v_base = v_ptr + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    poison = tl.zeros((BLOCK_M,), dtype=tl.int32)
    m_i, l_i, acc, poison = _attend_prefix(q, k_base, v_base, d_ok, stride_ks, stride_vs, lo, hi, qk_scale,
                                           m_i, l_i, acc, poison, BLOCK_N, INPUT_PRECISION)
    if split == NUM_SPLITS - 1:
        m_i, l_i, acc, poison = _attend_tree(q, k_base, v_base, d_ok, stride_ks, stride_vs, mask_ptr, offs_m, m_ok,
                                             prefix, n_tree, T, W, qk_scale, m_i, l_i, acc, poison,
                                             BLOCK_N, INPUT_PRECISION)

    tile = pid_bh * tl.num_programs(0) + pid_m
    rows = tl.arange(0, BLOCK_M)
    part = tile * NUM_SPLITS + split
    tl.store(acc_ptr + (part * BLOCK_M + rows[:, None]) * HEAD_DIM + offs_d[None, :], acc)
    tl.store(ml_ptr + part * 2 * BLOCK_M + rows, m_i)
    tl.store(ml_ptr + (part * 2 + 1) * BLOCK_M + rows, tl.where(poison > 0, float("nan"), l_i))
    tl.debug_barrier()  # every thread's partial is stored before the counter moves
    arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == NUM_SPLITS - 1:
        first = tile * NUM_SPLITS
        m_all = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        for i in range(NUM_SPLITS):
            m_all = tl.maximum(m_all, tl.load(ml_ptr + (first + i) * 2 * BLOCK_M + rows, cache_modifier=".cg"))
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)  # a row that sees nothing: all partials 0
        total = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        l_all = tl.zeros((BLOCK_M,), dtype=tl.float32)
        poisoned = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for i in range(NUM_SPLITS):
            w = tl.exp2(tl.load(ml_ptr + (first + i) * 2 * BLOCK_M + rows, cache_modifier=".cg") - m_safe)
            l_part = tl.load(ml_ptr + ((first + i) * 2 + 1) * BLOCK_M + rows, cache_modifier=".cg")
            # l = NaN: that split saw a non-finite V (or a NaN score); its row is NaN, whatever w is
            poisoned = tl.maximum(poisoned, (l_part != l_part).to(tl.int32))
            l_all += w * l_part
            a = tl.load(acc_ptr + ((first + i) * BLOCK_M + rows[:, None]) * HEAD_DIM + offs_d[None, :],
                        cache_modifier=".cg")
            total += w[:, None] * a
        out = _finish(total, l_all, (poisoned > 0) | bad_prefix)
        tl.store(count_ptr + tile, 0)  # ready for the next launch
        _epilogue(out, b, h, heads, pid_m, offs_m, m_ok, d_ok, H, N, o_ptr, stride_ob, stride_oh, stride_ot, stride_od,
                  w_ptr, stride_wn, stride_wk, bias_ptr, r_ptr, stride_rb, stride_rt, stride_rn,
                  y_ptr, stride_yb, stride_yt, stride_yn, part_ptr, hcount_ptr,
                  HEAD_DIM, DH, BLOCK_M, BLOCK_P, INPUT_PRECISION, PROJ, GROUP, TOKENS,
              HAS_BIAS)


# ----------------------------------------------------------------------------- reference


def pack_tree_mask(mask: Tensor) -> Tensor:
    """bool [T, T] -> int32 [T, ceil(T/32)]: bit j % 32 of word j // 32 of row i is mask[i, j]."""
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask must be a square 2-D [T, T] tensor, got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask.dtype must be torch.bool, got {mask.dtype}")
    T = mask.shape[0]
    W = (T + 31) // 32
    padded = torch.zeros((T, W * 32), dtype=torch.int64, device=mask.device)
    padded[:, :T] = mask
    shifts = torch.arange(32, device=mask.device, dtype=torch.int64)
    words = (padded.view(T, W, 32) << shifts).sum(-1)  # in [0, 2**32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # bit 31 = sign


def unpack_tree_mask(packed: Tensor, T: int) -> Tensor:
    """int32 [T, ceil(T/32)] -> bool [T, T], the inverse of :func:`pack_tree_mask`."""
    _check_packed(packed, T)
    shifts = torch.arange(32, device=packed.device, dtype=torch.int32)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # arithmetic shift: bit 31 still comes out right
    return bits.view(T, -1)[:, :T].bool()


def dense_tree_mask(prefix_len: Tensor, tree_mask: Tensor, S: int) -> Tensor:
    """bool [T, S]: slot s is visible to tree token i iff s < P, or s = P + j and bit j of
    row i of the packed ``tree_mask`` is set; [B, T, S] for a prefix length per batch row
    ([B], B > 1). No host sync (P stays a tensor)."""
    T = tree_mask.shape[0]
    slots = torch.arange(S, device=tree_mask.device)
    bits = unpack_tree_mask(tree_mask, T)
    if _prefix_stride(prefix_len):
        return torch.stack([dense_tree_mask(p, tree_mask, S) for p in prefix_len])
    prefix = prefix_len.reshape(()).to(device=tree_mask.device, dtype=torch.int64)
    j = slots - prefix  # tree index of each slot
    in_tree = (j >= 0) & (j < T)
    tree_bits = bits[:, j.clamp(0, T - 1)]
    return (slots < prefix) | (in_tree & tree_bits)


def _attention_dense(q, k_cache, v_cache, prefix_len, tree_mask, scale):
    """The reference's maths without host syncs (also the op's CPU implementation)."""
    visible = dense_tree_mask(prefix_len, tree_mask, k_cache.shape[2])  # [T, S], or [B, T, S] per row
    if visible.dim() == 3:
        visible = visible[:, None]  # [B, 1, T, S]: every head of row b
    group = q.shape[1] // k_cache.shape[1]
    if group > 1:  # grouped-query attention: query head h reads KV head h // group
        k_cache, v_cache = k_cache.repeat_interleave(group, 1), v_cache.repeat_interleave(group, 1)
    scores = scale * (q.float() @ k_cache.float().transpose(-1, -2))
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(visible.any(-1, keepdim=True), probs, 0.0)  # a row that sees nothing -> 0
    # Non-finite V slots are zeroed (0 * NaN would reach rows that cannot see them), and the
    # rows that can see one are set to NaN (the module's NaN contract).
    v = v_cache.float()
    bad = ~v.isfinite().all(-1, keepdim=True)  # [B, H, S, 1]
    out = probs @ v.masked_fill(bad, 0.0)
    poisoned = (visible.float() @ bad.float()) > 0  # [B, H, T, 1]
    # An out-of-range P (unchecked only on a GPU, where checking would sync): NaN, as the kernel.
    T, S = q.shape[2], k_cache.shape[2]
    prefix = prefix_len.to(device=q.device, dtype=torch.int64)
    prefix = prefix.reshape(-1, 1, 1, 1) if _prefix_stride(prefix_len) else prefix.reshape(())
    poisoned = poisoned | (prefix < 0) | (prefix > S - T)
    return out.masked_fill(poisoned, float("nan")).to(q.dtype)


def tree_attention_ref(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_len: Tensor, tree_mask: Tensor, *, scale=None
) -> Tensor:
    """Reference, in fp32 with a dense mask over the cache.

    out[b, h, i] = sum_s softmax_s(scale * q[b, h, i] . k[b, h, s] + bias[i, s]) v[b, h, s],
    bias[i, s] = 0 where s < P, or s = P + j with bit j of row i of ``tree_mask`` set, and
    -inf elsewhere; scale defaults to 1/sqrt(Dh). A row that sees no slot outputs 0; a row that
    sees a non-finite V outputs NaN, and slots a row cannot see never affect it.
    Checks ``0 <= P <= S - T`` where ``prefix_len`` is on the CPU; on a GPU that check would
    sync with the host, so there an out-of-range P gives NaN rows, as in the kernel.
    """
    scale = _resolve_scale(scale, q)
    _check_inputs(q, k_cache, v_cache, prefix_len, tree_mask, scale)
    if values_on_host(prefix_len):
        _check_prefix_len_value(prefix_len, q.shape[2], k_cache.shape[2])
    return _attention_dense(q, k_cache, v_cache, prefix_len, tree_mask, scale)


def tree_attention_gqa_ref(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_len: Tensor, tree_mask: Tensor, *, scale=None
) -> Tensor:
    """Reference of grouped-query tree attention, in fp32: :func:`tree_attention_ref` with
    k_cache / v_cache [B, H_kv, S, Dh] and query head h (of H = G * H_kv) reading KV head
    h // G, as if each KV head were repeated G times."""
    scale = _resolve_scale(scale, q)
    _check_inputs(q, k_cache, v_cache, prefix_len, tree_mask, scale, grouped=True)
    if values_on_host(prefix_len):
        _check_prefix_len_value(prefix_len, q.shape[2], k_cache.shape[2])
    return _attention_dense(q, k_cache, v_cache, prefix_len, tree_mask, scale)


def tree_attention_proj_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_len: Tensor, tree_mask: Tensor,
                            weight: Tensor, bias: Tensor, residual: Tensor, *, scale=None) -> Tensor:
    """Reference of the attention with its output projection: with y = tree attention [B, H, T,
    Dh] (:func:`tree_attention_ref`, rounded to q's dtype as the eager model rounds it) laid
    out as [B, T, H * Dh], ``residual + y @ weight.T + bias`` in fp32, rounded to q's dtype."""
    _check_proj(q, weight, bias, residual)
    y = tree_attention_ref(q, k_cache, v_cache, prefix_len, tree_mask, scale=scale)
    return _project(y, weight, bias, residual)


def tree_attention_gqa_proj_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_len: Tensor, tree_mask: Tensor,
                                weight: Tensor, bias: Optional[Tensor], residual: Tensor, *, scale=None) -> Tensor:
    """Reference of grouped-query tree attention with its output projection:
    :func:`tree_attention_proj_ref` over :func:`tree_attention_gqa_ref`, bias optional."""
    _check_proj(q, weight, bias, residual)
    return _project(tree_attention_gqa_ref(q, k_cache, v_cache, prefix_len, tree_mask, scale=scale), weight, bias,
                    residual)


def _project(y: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor) -> Tensor:
    B, H, T, Dh = y.shape
    return linear_residual_ref(y.transpose(1, 2).reshape(B, T, H * Dh), weight, bias, residual)


# ----------------------------------------------------------------------------- launcher


def _check_packed(packed: Tensor, T: int) -> None:
    W = (T + 31) // 32
    if packed.dtype != torch.int32:
        raise TypeError(f"tree_attention: tree_mask must be int32 (packed bits), got {dtype_name(packed.dtype)}")
    if packed.shape != (T, W):
        raise ValueError(
            f"tree_attention: tree_mask must have shape [T, ceil(T/32)] = [{T}, {W}], got {list(packed.shape)}"
        )


def _check_inputs(q, k_cache, v_cache, prefix_len, tree_mask, scale: float, grouped: bool = False) -> None:
    """Every check that reads no tensor value, for every backend (fake tensors pass through).
    ``grouped`` (``tree_attention_gqa``): H_kv KV heads for H = G * H_kv query heads, and any
    head dim up to 128."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"tree_attention: {name} must be 4-D, got shape {list(t.shape)}")
    B, H, T, Dh = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"tree_attention: k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} differ")
    Bk, Hk, S, Dk = k_cache.shape
    if grouped and (Bk, Dk) == (B, Dh) and Hk > 0 and H % Hk == 0:
        pass
    elif grouped:
        raise ValueError(f"tree_attention_gqa: q [B, H, T, Dh] = {list(q.shape)} does not match k_cache "
                         f"[B, H_kv, S, Dh] = {list(k_cache.shape)} with H a multiple of H_kv")
    elif (Bk, Hk, Dk) != (B, H, Dh):
        raise ValueError(
            f"tree_attention: q [B, H, T, Dh] = {list(q.shape)} does not match "
            f"k_cache [B, H, S, Dh] = {list(k_cache.shape)}"
        )
    if grouped and not 1 <= Dh <= 128:
        raise ValueError(f"tree_attention_gqa: head dim must be 1 to 128, got {Dh}")
    if not grouped and Dh not in HEAD_DIMS:
        raise ValueError(f"tree_attention: head dim must be one of {HEAD_DIMS}, got {Dh}")
    if not 1 <= T <= S:
        raise ValueError(f"tree_attention: q has T = {T} tree tokens; need 1 <= T <= S = {S}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"tree_attention: q must be float32, float16 or bfloat16, got {dtype_name(q.dtype)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"tree_attention: {name} is {dtype_name(t.dtype)} but q is {dtype_name(q.dtype)}")
    others = {"k_cache": k_cache, "v_cache": v_cache, "prefix_len": prefix_len, "tree_mask": tree_mask}
    for name, t in others.items():
        if t.device != q.device:
            raise ValueError(f"tree_attention: {name} is on {t.device} but q is on {q.device}")
    if prefix_len.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tree_attention: prefix_len must be int32 or int64, got {dtype_name(prefix_len.dtype)}")
    if not (prefix_len.dim() == 0 or (prefix_len.dim() == 1 and prefix_len.shape[0] in (1, B))):
        raise ValueError(f"tree_attention: prefix_len must be 0-d, [1] or one per batch row [{B}], got shape "
                         f"{list(prefix_len.shape)}")
    if prefix_len.dim() == 1 and not prefix_len.is_contiguous():
        raise ValueError("tree_attention: prefix_len must be contiguous")
    _check_packed(tree_mask, T)
    if not tree_mask.is_contiguous():
        raise ValueError("tree_attention: tree_mask must be contiguous")
    _check_scale(scale)


def _check_proj(q: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor) -> None:
    """tree_attention_proj's projection: weight [N, H * Dh], bias [N] (or None: only
    ``tree_attention_gqa_proj`` takes none), residual [B, T, N], all of q's dtype and device
    (the attention's own inputs are ``_check_inputs``')."""
    B, H, T, Dh = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    for name, t, dims in (("weight", weight, 2), ("bias", bias, 1), ("residual", residual, 3)):
        if t is None:
            continue
        if t.dim() != dims:
            raise ValueError(f"tree_attention_proj: {name} must be {dims}-D, got shape {list(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"tree_attention_proj: {name} is {dtype_name(t.dtype)} but q is {dtype_name(q.dtype)}")
        if t.device != q.device:
            raise ValueError(f"tree_attention_proj: {name} is on {t.device} but q is on {q.device}")
    N = weight.shape[0]
    if weight.shape[1] != H * Dh:
        raise ValueError(f"tree_attention_proj: weight must be [N, H * Dh] = [N, {H * Dh}], got {list(weight.shape)}")
    if N == 0:
        raise ValueError("tree_attention_proj: weight has no output rows (N = 0)")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"tree_attention_proj: bias must have shape [{N}], got {list(bias.shape)}")
    if residual.shape != (B, T, N):
        raise ValueError(f"tree_attention_proj: residual must be [B, T, N] = {[B, T, N]}, got {list(residual.shape)}")


def _check_int32_offsets(**tensors: Tensor) -> None:
    """The kernel computes element offsets in int32 (int64 ones cost it registers)."""
    for name, t in tensors.items():
        if sum((n - 1) * s for n, s in zip(t.shape, t.stride())) >= 2**31:
            raise ValueError(f"tree_attention: {name} {list(t.shape)} spans 2**31 elements or more; the "
                             "Triton kernel's offsets are int32 (split the batch, or use backend='eager')")


def _check_prefix_len_value(prefix_len: Tensor, T: int, S: int) -> None:
    """On the host: a sync on CUDA, so only the reference and CPU tensors come here."""
    for b, prefix in enumerate(prefix_len.reshape(-1).tolist()):
        if not 0 <= prefix <= S - T:
            row = f" (batch row {b})" if prefix_len.numel() > 1 else ""
            raise ValueError(f"tree_attention: prefix_len = {prefix} out of range: need 0 <= prefix_len <= S - T = "
                             f"{S - T}{row}")


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"tree_attention: scale must be a finite number, got {scale!r}")


def _resolve_scale(scale, q: Tensor) -> float:
    """``scale``, or 1/sqrt(Dh) for None, as a float (a bad q is left to the op's checks)."""
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1]) if q.dim() == 4 and q.shape[-1] > 0 else 1.0
    _check_scale(scale)
    return float(scale)


def _empty_out(q: Tensor) -> Tensor:
    # [B, H, T, Dh] view of a [B, T, H, Dh] buffer: the model's following
    # ``y.transpose(1, 2).reshape(B, T, C)`` is then free.
    B, H, T, Dh = q.shape
    return torch.empty((B, T, H, Dh), dtype=q.dtype, device=q.device).transpose(1, 2)


_BLOCK_P = 64  # output columns per step of tree_attention_proj's epilogue


def _proj_args(q, proj, block_m: int, counters: Tensor):
    """The PROJ arguments of the kernels: (the output y [B, T, N], the arguments), or (None,
    dummies) without a projection."""
    if proj is None:
        return None, (q, q, q, q, q, q, 0, *(0,) * 8)
    weight, bias, residual = proj
    B, H, T, Dh = q.shape
    N = weight.shape[0]
    y = torch.empty((B, T, N), dtype=q.dtype, device=q.device)
    tiles = B * triton.cdiv(T, block_m)
    part = torch.empty(tiles * H * block_m * N, dtype=torch.float32, device=q.device)
    return y, (weight, weight if bias is None else bias, residual, y, part, counters, N, *weight.stride(), residual.stride(0), residual.stride(1),
               residual.stride(2), *y.stride())


def _launch(q, k_cache, v_cache, prefix_len, tree_mask, scale: float, proj=None) -> Tensor:
    """The attention [B, H, T, Dh]; with ``proj`` = (weight, bias, residual), the projected
    output ``residual + attention @ weight.T + bias`` [B, T, N] instead."""
    B, H, T, Dh = q.shape
    out = _empty_out(q) if proj is None else q  # with a projection, a stand-in the kernels never write
    if _backend.triton_interpret() and is_fake(q):
        # Under the interpreter, wrap_triton hands back the plain kernel, which cannot run on
        # fake tensors; a fake implementation only needs the output's metadata anyway.
        return out if proj is None else q.new_empty((B, T, proj[0].shape[0]))
    # Row blocks: ``_geometry``. fp32's exact ("ieee") dot runs on the FMA units with its
    # operands in registers: 16-row blocks keep ptxas from spilling, with 8 warps from head
    # dim 64 up; below that, 8 warps leave each thread so little work that ptxas caps it at 64
    # registers and spills (triton 3.6, sm_90), where 4 warps do not (tests/test_triton_compile.py checks).
    fp32 = q.dtype == torch.float32
    geo = _geometry(q, k_cache)
    tokens, Hk = geo["TOKENS"], k_cache.shape[1]
    block_n = 64
    grid = (triton.cdiv(T, tokens), B * Hk)
    splits = _prefix_splits(B * Hk, k_cache.shape[2], T)
    if splits > 1:
        return _launch_split(q, k_cache, v_cache, prefix_len, tree_mask, scale, out, geo, block_n, splits, proj)
    counters = split_counters(q.device, B * grid[0], like=q) if proj is not None else q
    y, proj_args = _proj_args(q, proj, tokens, counters)
    # Triton launches on the current CUDA device, not the tensors' one.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        wrap_triton(_tree_attention_kernel)[grid](
            q, k_cache, v_cache, out, prefix_len, tree_mask,
            T, k_cache.shape[2], tree_mask.shape[1], Hk, _prefix_stride(prefix_len), scale * _LOG2E,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *proj_args,
            **geo,
            BLOCK_N=block_n,
            INPUT_PRECISION="ieee" if fp32 else "tf32",  # TF32 would break fp32's token identity
            PROJ=proj is not None,
            HAS_BIAS=proj is not None and proj[1] is not None,
            BLOCK_P=_BLOCK_P,
            num_warps=8 if (fp32 and geo["HEAD_DIM"] >= 64) or geo["HEAD_DIM"] > 64 else 4,
            num_stages=2,
        )
    return out if y is None else y


def _geometry(q: Tensor, k_cache: Tensor) -> dict:
    """The kernels' row blocks: HEAD_DIM (Dh padded to a power of two >= 16), DH, GROUP (query
    heads per KV head), TOKENS (tree tokens per program) and BLOCK_M = TOKENS * GROUP padded to a
    power of two: each program holds a KV head's GROUP query heads for TOKENS tokens (row r:
    head r // TOKENS, token r % TOKENS), so it reads each K/V tile once for all of them. Decoding
    trees are small (T <= 64): 16-row blocks spread the programs over the SMs; a long causal
    prefill takes 32-row blocks (64-row ones spill at Dh=64 in 16 bits, sm_80, triton 3.6). fp32
    keeps 16 rows: its exact dots run on the FMA units with their operands in registers."""
    B, H, T, Dh = q.shape
    group = H // k_cache.shape[1]
    fp32 = q.dtype == torch.float32
    block_m = max(16 if T <= 64 or fp32 else 32, triton.next_power_of_2(group))
    tokens = block_m // triton.next_power_of_2(group)
    return dict(HEAD_DIM=max(16, triton.next_power_of_2(Dh)), DH=Dh, GROUP=group, TOKENS=tokens, BLOCK_M=block_m)


def _prefix_stride(prefix_len: Tensor) -> int:
    """1 for a prefix length per batch row ([B], B > 1), 0 for one shared by every row."""
    return 1 if prefix_len.dim() == 1 and prefix_len.shape[0] > 1 else 0


_SPLIT_TARGET_PROGRAMS = 128  # about one per SM of an H100 / H200
_MIN_SPLIT_SLOTS = 128  # a split streams at least this many cached slots


def _prefix_splits(heads: int, S: int, T: int) -> int:
    """How many programs share each query block's prefix (flash-decoding): enough to give the
    GPU about 128 programs at T = 1 (``heads`` = B * H programs without a split), each
    streaming >= 128 slots of a full cache. Decided from the cache length S, not the prefix (a
    device tensor, unknown here and changing between CUDA-graph replays); the kernel divides the
    actual prefix evenly. The same for every T <= 64, so a row's prefix is summed in the same
    pieces whatever the tree size. Long prefills (T > 64) and the interpreter (which pays per
    program) get 1; tests force splits through ``_prefix_splits``."""
    if _backend.triton_interpret() or T > 64:
        return 1
    return max(1, min(triton.cdiv(_SPLIT_TARGET_PROGRAMS, heads), S // _MIN_SPLIT_SLOTS))


def _launch_split(q, k_cache, v_cache, prefix_len, tree_mask, scale, out, geo: dict, block_n, splits, proj) -> Tensor:
    B, H, T, Dh = q.shape
    block_m, Hk = geo["BLOCK_M"], k_cache.shape[1]
    grid = (triton.cdiv(T, geo["TOKENS"]), B * Hk, splits)
    tiles = grid[0] * grid[1]
    acc = torch.empty((tiles, splits, block_m, geo["HEAD_DIM"]), dtype=torch.float32, device=q.device)
    ml = torch.empty((tiles, splits, 2, block_m), dtype=torch.float32, device=q.device)
    # the splits' counters, then (with a projection) the heads' counters per row block
    counters = split_counters(q.device, tiles + B * grid[0], like=q)
    y, proj_args = _proj_args(q, proj, geo["TOKENS"], counters[tiles:])
    fp32 = q.dtype == torch.float32
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        wrap_triton(_tree_attention_split_kernel)[grid](
            q, k_cache, v_cache, out, prefix_len, tree_mask,
            acc, ml, counters,
            T, k_cache.shape[2], tree_mask.shape[1], Hk, _prefix_stride(prefix_len), scale * _LOG2E,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *proj_args,
            NUM_SPLITS=splits,
            **geo,
            BLOCK_N=block_n,
            INPUT_PRECISION="ieee" if fp32 else "tf32",
            PROJ=proj is not None,
            HAS_BIAS=proj is not None and proj[1] is not None,
            BLOCK_P=_BLOCK_P,
            num_warps=8 if fp32 or geo["HEAD_DIM"] > 64 else 4,
            num_stages=2,
        )
    return out if y is None else y


# ----------------------------------------------------------------------------- registration


def _attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_len: Tensor, tree_mask: Tensor, scale: float,
            grouped: bool) -> Tensor:
    """The body of ``tree_attention`` and ``tree_attention_gqa`` (grouped KV heads): the checks,
    then the dense path on a CPU outside the interpreter, else the kernel."""
    _check_inputs(q, k_cache, v_cache, prefix_len, tree_mask, scale, grouped=grouped)
    if values_on_host(prefix_len):  # a CUDA check would sync with the host
        _check_prefix_len_value(prefix_len, q.shape[2], k_cache.shape[2])
    if q.device.type == "cpu" and not _backend.triton_interpret():
        return _empty_out(q).copy_(_attention_dense(q, k_cache, v_cache, prefix_len, tree_mask, scale))
    _check_int32_offsets(q=q, k_cache=k_cache, v_cache=v_cache)
    return _launch(q, k_cache, v_cache, prefix_len, tree_mask, scale)


@torch.library.triton_op("mtpkern::tree_attention", mutates_args=())
def _tree_attention_op(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_len: Tensor, tree_mask: Tensor, scale: float
) -> Tensor:
    # This body is also the fake implementation (run on fake tensors under torch.compile).
    return _attend(q, k_cache, v_cache, prefix_len, tree_mask, scale, grouped=False)


@torch.library.triton_op("mtpkern::tree_attention_gqa", mutates_args=())
def _tree_attention_gqa_op(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_len: Tensor, tree_mask: Tensor, scale: float
) -> Tensor:
    # This body is also the fake implementation (run on fake tensors under torch.compile).
    return _attend(q, k_cache, v_cache, prefix_len, tree_mask, scale, grouped=True)


@torch.library.triton_op("mtpkern::tree_attention_gqa_proj", mutates_args=())
def _tree_attention_gqa_proj_op(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_len: Tensor, tree_mask: Tensor, scale: float,
    weight: Tensor, bias: Optional[Tensor], residual: Tensor,
) -> Tensor:
    # This body is also the fake implementation (run on fake tensors under torch.compile).
    _check_inputs(q, k_cache, v_cache, prefix_len, tree_mask, scale, grouped=True)
    _check_proj(q, weight, bias, residual)
    if values_on_host(prefix_len):  # a CUDA check would sync with the host
        _check_prefix_len_value(prefix_len, q.shape[2], k_cache.shape[2])
    if q.device.type == "cpu" and not _backend.triton_interpret():
        return _project(_attention_dense(q, k_cache, v_cache, prefix_len, tree_mask, scale), weight, bias,
                        residual).contiguous()
    _check_int32_offsets(q=q, k_cache=k_cache, v_cache=v_cache, weight=weight, residual=residual)
    return _launch(q, k_cache, v_cache, prefix_len, tree_mask, scale, proj=(weight, bias, residual))


@torch.library.triton_op("mtpkern::tree_attention_proj", mutates_args=())
def _tree_attention_proj_op(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_len: Tensor, tree_mask: Tensor, scale: float,
    weight: Tensor, bias: Tensor, residual: Tensor,
) -> Tensor:
    # This body is also the fake implementation (run on fake tensors under torch.compile).
    _check_inputs(q, k_cache, v_cache, prefix_len, tree_mask, scale)
    _check_proj(q, weight, bias, residual)
    if values_on_host(prefix_len):  # a CUDA check would sync with the host
        _check_prefix_len_value(prefix_len, q.shape[2], k_cache.shape[2])
    if q.device.type == "cpu" and not _backend.triton_interpret():
        return _project(_attention_dense(q, k_cache, v_cache, prefix_len, tree_mask, scale), weight, bias,
                        residual).contiguous()
    _check_int32_offsets(q=q, k_cache=k_cache, v_cache=v_cache, weight=weight, residual=residual)
    return _launch(q, k_cache, v_cache, prefix_len, tree_mask, scale, proj=(weight, bias, residual))


# ----------------------------------------------------------------------------- public


def tree_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    prefix_len: Tensor,
    tree_mask: Tensor,
    *,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Attention of T tree tokens over a cached prefix and each other (see the module doc).

    q [B, H, T, Dh], k_cache / v_cache [B, H, S, Dh] (any strides, same dtype and device),
    prefix_len a 0-d or [1] int tensor on that device (or [B]: each batch row's own prefix
    length, rows of a batch drifting apart), tree_mask the packed int32 [T, W] mask.
    Returns [B, H, T, Dh] in q's dtype. scale defaults to 1/sqrt(Dh).
    backend: None (automatic), "triton" or "eager" (the fp32 reference). The op checks its
    inputs itself; an out-of-range prefix_len on a GPU gives NaN rows (see the module doc).
    """
    if _backend.pick(q.device, ("triton", "eager"), backend) == "eager":
        return tree_attention_ref(q, k_cache, v_cache, prefix_len, tree_mask, scale=scale)
    return torch.ops.mtpkern.tree_attention(q, k_cache, v_cache, prefix_len, tree_mask, _resolve_scale(scale, q))


def tree_attention_gqa(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    prefix_len: Tensor,
    tree_mask: Tensor,
    *,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Grouped-query tree attention (Llama 2 70B, Llama 3, Mistral, Qwen2): :func:`tree_attention`
    with q [B, H, T, Dh] and k_cache / v_cache [B, H_kv, S, Dh], H a multiple of H_kv; query
    head h reads KV head h // (H / H_kv). Each program holds the query heads a KV head serves
    (for a block of tree tokens), so it reads each K/V tile once for all of them. Any head dim
    up to 128 (padded to a power of two in the kernel). Same prefix, mask and NaN contract as
    :func:`tree_attention`; returns [B, H, T, Dh] in q's dtype."""
    if _backend.pick(q.device, ("triton", "eager"), backend) == "eager":
        return tree_attention_gqa_ref(q, k_cache, v_cache, prefix_len, tree_mask, scale=scale)
    return torch.ops.mtpkern.tree_attention_gqa(q, k_cache, v_cache, prefix_len, tree_mask, _resolve_scale(scale, q))


def tree_attention_gqa_proj(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    prefix_len: Tensor,
    tree_mask: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Tensor,
    *,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Grouped-query tree attention and the output projection in one kernel (the second of the
    Llama family's fused decoder layer's four): ``residual + y @ weight.T (+ bias)`` [B, T, N],
    y the attention of :func:`tree_attention_gqa` (same inputs) laid out as [B, T, H * Dh];
    weight [N, H * Dh], bias [N] or None, residual [B, T, N]. Each KV head's program projects
    its query heads' outputs; the last of a row block's programs sums the H heads' fp32
    partials in head order (deterministic) and adds bias and residual.
    backend: None (automatic), "triton" or "eager" (the fp32 reference)."""
    if _backend.pick(q.device, ("triton", "eager"), backend) == "eager":
        return tree_attention_gqa_proj_ref(q, k_cache, v_cache, prefix_len, tree_mask, weight, bias, residual,
                                           scale=scale)
    return torch.ops.mtpkern.tree_attention_gqa_proj(q, k_cache, v_cache, prefix_len, tree_mask,
                                                     _resolve_scale(scale, q), weight, bias, residual)


def tree_attention_proj(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    prefix_len: Tensor,
    tree_mask: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Tensor,
    *,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Tree attention and the attention's output projection in one kernel (the second of a
    fused decoder layer's four): ``residual + y @ weight.T + bias`` [B, T, N], y the
    attention [B, H, T, Dh] of :func:`tree_attention` (same inputs) laid out as [B, T, H * Dh].
    weight [N, H * Dh], bias [N], residual [B, T, N] (any strides), q's dtype and device.
    Each head's program projects its own output (Dh of the H * Dh inputs); the last head of a
    row block to finish sums the heads' fp32 partials in head order (deterministic) and adds
    bias and residual. backend: None (automatic), "triton" or "eager" (the fp32 reference)."""
    if _backend.pick(q.device, ("triton", "eager"), backend) == "eager":
        return tree_attention_proj_ref(q, k_cache, v_cache, prefix_len, tree_mask, weight, bias, residual, scale=scale)
    return torch.ops.mtpkern.tree_attention_proj(q, k_cache, v_cache, prefix_len, tree_mask, _resolve_scale(scale, q),
                                                 weight, bias, residual)


__all__ = [
    "tree_attention",
    "tree_attention_ref",
    "tree_attention_gqa",
    "tree_attention_gqa_ref",
    "tree_attention_gqa_proj",
    "tree_attention_gqa_proj_ref",
    "tree_attention_proj",
    "tree_attention_proj_ref",
    "pack_tree_mask",
    "unpack_tree_mask",
    "dense_tree_mask",
    "HEAD_DIMS",
]
