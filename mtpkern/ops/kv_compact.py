"""KV-cache compaction after verification: move the accepted path's K and V into place, in place.

After a tree step the cache holds the T tree nodes at slots prefix_len .. prefix_len + T - 1.
The accepted path (root first) must end up contiguous after the prefix, for every layer, batch
row and head, in one launch. ``prefix_len`` and ``count`` are device tensors, so the op never
syncs with the host and can sit inside a CUDA graph.

Kernels: ``csrc/kv_compact_api.cpp`` and ``csrc/cuda/kv_compact.cu`` (op ``mtpkern::kv_compact_``).
Every backend checks shapes, dtypes, devices and layout with the same exception types and
messages (``_check`` here mirrors ``check_kv_compact`` in ``csrc/mtpkern.h``). Values
(``count``, the moves) are checked on CPU tensors, by the eager reference and the C++ CPU
kernel alike; on a GPU both the CUDA kernel and the eager reference skip moves outside the cache
instead (raising would need a host sync). The op copies bytes, so NaNs move like any other value.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from mtpkern.ops import _backend
from mtpkern.ops._checks import check_rows, check_same_device, values_on_host
from mtpkern.runtime import dtype_name

MAX_PATH = 1024  # the CUDA kernel stages the whole path in shared memory (kMaxCompactPath)


def _check_scalar_index(cache: Tensor, t: Tensor, name: str) -> None:
    if t.dim() != 0:
        raise ValueError(f"kv_compact_: {name} must be a 0-d tensor, got shape {list(t.shape)}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"kv_compact_: {name} must be int64 or int32, got {dtype_name(t.dtype)}")
    check_same_device(cache, t, "kv_compact_", name)


def _check_row_index(cache: Tensor, t: Tensor, name: str) -> None:
    B = cache.shape[1]
    if t.dim() != 1 or t.shape[0] != B:
        raise ValueError(f"kv_compact_: with a path per batch row, {name} must be 1-D [{B}], got shape {list(t.shape)}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"kv_compact_: {name} must be int64 or int32, got {dtype_name(t.dtype)}")
    if not t.is_contiguous():
        raise ValueError(f"kv_compact_: {name} must be contiguous")
    check_same_device(cache, t, "kv_compact_", name)


def _check(k: Tensor, v: Tensor, path: Tensor, prefix_len: Tensor, count: Tensor) -> None:
    """``check_kv_compact`` of csrc/mtpkern.h: the same checks, order, types and messages."""
    if k.dim() != 5:
        raise ValueError(f"kv_compact_: k_cache must be 5-D [L, B, H, S, Dh], got shape {list(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"kv_compact_: v_cache has shape {list(v.shape)} but k_cache has {list(k.shape)}")
    if k.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"kv_compact_: caches must be float32, float16 or bfloat16, got {dtype_name(k.dtype)}")
    if v.dtype != k.dtype:
        raise TypeError(f"kv_compact_: v_cache is {dtype_name(v.dtype)} but k_cache is {dtype_name(k.dtype)}")
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError("kv_compact_: k_cache and v_cache must be contiguous")
    check_same_device(k, v, "kv_compact_", "v_cache")
    # One buffer passed twice would be compacted twice. (Fake and meta tensors have no data.)
    no_data = is_fake(k) or k.device.type == "meta"
    if k.numel() and (k is v if no_data else k.data_ptr() == v.data_ptr()):
        raise ValueError("kv_compact_: k_cache and v_cache must be different tensors")
    check_rows(path, "kv_compact_", "path", torch.int64)
    if path.shape[-1] > MAX_PATH:
        raise ValueError(f"kv_compact_: path has {path.shape[-1]} entries, at most {MAX_PATH} are supported")
    check_same_device(k, path, "kv_compact_", "path")
    if path.dim() == 1:  # one path for every batch row
        _check_scalar_index(k, prefix_len, "prefix_len")
        _check_scalar_index(k, count, "count")
    else:  # a path, prefix length and count per batch row
        if path.shape[0] != k.shape[1]:
            raise ValueError(f"kv_compact_: path has {path.shape[0]} rows but the caches have {k.shape[1]} batch rows")
        _check_row_index(k, prefix_len, "prefix_len")
        _check_row_index(k, count, "count")
    L, B, H, _, Dh = k.shape
    if L * B * H > 2**31 - 1 or Dh * k.element_size() > 2 * 65535:
        raise ValueError(f"kv_compact_: cache shape {list(k.shape)} is too large for one launch")


def kv_compact_ref_(k_cache: Tensor, v_cache: Tensor, path: Tensor, prefix_len: Tensor, count: Tensor) -> None:
    """Eager reference. For caches [L, B, H, S, Dh], every l, b, h and i < count, at once:

        cache[l, b, h, prefix_len + i] <- cache[l, b, h, prefix_len + path[i]]   (old values)

    Reads (index_select) happen before writes (index_copy_), so overlapping ranges are safe.
    With ``path``, ``prefix_len`` and ``count`` on the CPU, a move outside the S slots or a count
    outside [0, N] raises ValueError. On a GPU, checking them would sync with the host, so
    there, like the CUDA kernel, such moves are skipped and count is clamped: no host sync.
    """
    _check(k_cache, v_cache, path, prefix_len, count)
    S = k_cache.shape[3]
    if path.dim() == 2:  # row b of the batch: its own path, prefix length and count
        if all(values_on_host(t) for t in (path, prefix_len, count)):  # every row checked before any move
            for b in range(path.shape[0]):
                _check_moves(path[b], int(prefix_len[b]), int(count[b]), S, f" (batch row {b})")
        for b in range(path.shape[0]):
            _compact(k_cache[:, b], v_cache[:, b], 2, path[b], prefix_len[b], count[b])
        return
    if all(values_on_host(t) for t in (path, prefix_len, count)):  # checking is free here
        _check_moves(path, int(prefix_len), int(count), S)
    _compact(k_cache, v_cache, 3, path, prefix_len, count)


def _compact(k_cache: Tensor, v_cache: Tensor, dim: int, path: Tensor, prefix_len: Tensor, count: Tensor) -> None:
    """The moves along the slot dimension ``dim`` of the two caches (views allowed)."""
    S, N = k_cache.shape[dim], path.numel()
    if N == 0 or S == 0:
        return
    # Entry i writes slot dst = prefix + i, clamped into the cache. Everything it writes is a
    # function of dst alone (the entry j = dst - prefix whose slot it is: i unless clamped), so
    # clamped entries that share a slot write the same value and index_copy_ stays
    # deterministic. A slot with no valid move is copied onto itself.
    prefix = prefix_len.reshape(()).to(device=path.device, dtype=torch.int64)
    n = count.reshape(()).to(device=path.device, dtype=torch.int64)
    dst = (prefix + torch.arange(N, device=path.device)).clamp(0, S - 1)
    j = dst - prefix
    node = path[j.clamp(0, N - 1)]
    move = (j >= 0) & (j < n) & (j < N) & (node >= 0) & (prefix + node >= 0) & (prefix + node < S)
    src = torch.where(move, prefix + node, dst)
    for cache in (k_cache, v_cache):
        cache.index_copy_(dim, dst.to(cache.device), cache.index_select(dim, src.to(cache.device)))


def _check_moves(path: Tensor, prefix: int, n: int, S: int, where: str = "") -> None:
    if not 0 <= n <= path.numel():
        raise ValueError(f"kv_compact_: count = {n} is outside [0, {path.numel()}]{where}")
    for i, node in enumerate(path[:n].tolist()):
        if not (node >= 0 and 0 <= prefix + node < S and 0 <= prefix + i < S):
            raise ValueError(f"kv_compact_: path[{i}] = {node} with prefix_len = {prefix} moves slot "
                             f"{prefix + node} to slot {prefix + i}, outside the cache's {S} slots{where}")


# ---------------------------------------------------------------- registration

SCHEMA = "(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor path, Tensor prefix_len, Tensor count) -> ()"

if not _backend.HAS_CUDA_EXT:  # the extension defines the op in C++; otherwise the reference is its kernel
    torch.library.define("mtpkern::kv_compact_", SCHEMA)
    torch.library.impl("mtpkern::kv_compact_", ("CPU", "CUDA"), kv_compact_ref_)


@torch.library.register_fake("mtpkern::kv_compact_")
def _kv_compact_fake(k_cache, v_cache, path, prefix_len, count):
    _check(k_cache, v_cache, path, prefix_len, count)  # reads no values: fake tensors fail like real ones
    return None


# ---------------------------------------------------------------- public function

def kv_compact_(k_cache: Tensor, v_cache: Tensor, path: Tensor, prefix_len: Tensor, count: Tensor, *,
                backend: str | None = None) -> None:
    """Move slot prefix_len + path[i] to slot prefix_len + i for i < count, in K and V, in place.

    ``k_cache``, ``v_cache``: contiguous [L, B, H, S, Dh] fp32/fp16/bf16; ``path``: int64 [N],
    root first, -1 padded; ``prefix_len``, ``count``: 0-d int tensors on the caches' device. Or a
    path per batch row, [B, N], with ``prefix_len`` and ``count`` [B]: row b's slices follow its
    own (batched decoding, ``mtpkern.batch``), still in one launch.
    The CUDA kernel skips moves outside the cache instead of raising (it cannot without a sync).
    """
    if _backend.pick(k_cache.device, ("cuda", "eager"), backend) == "eager":
        kv_compact_ref_(k_cache, v_cache, path, prefix_len, count)
    else:
        torch.ops.mtpkern.kv_compact_(k_cache, v_cache, path, prefix_len, count)
