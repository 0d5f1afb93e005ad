"""KV-cache compaction after verification: move the accepted path's K and V into place, in place.

After a tree step the cache holds the T tree nodes at slots prefix_len .. prefix_len + T - 1.
The accepted path (root first) must end up contiguous after the prefix, for every layer, batch
row and head, in one launch. ``prefix_len`` and ``count`` are device tensors, so the op never
syncs with the host and can sit inside a CUDA graph.

Kernels: ``csrc/kv_compact_api.cpp`` and ``csrc/cuda/kv_compact.cu`` (op ``mtpkern::kv_compact_``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtpkern.ops import _backend


def kv_compact_ref_(k_cache: Tensor, v_cache: Tensor, path: Tensor, prefix_len: Tensor, count: Tensor) -> None:
    """Eager reference. For caches [L, B, H, S, Dh], every l, b, h and i < count, at once:

        cache[l, b, h, prefix_len + i] <- cache[l, b, h, prefix_len + path[i]]   (old values)

    Reads (index_select) happen before writes (index_copy_), so overlapping ranges are safe.
    With ``path``, ``prefix_len`` and ``count`` on the CPU, a move outside the S slots or a count
    outside [0, N] raises ValueError. On a GPU, checking them would sync with the host, so
    there, like the CUDA kernel, such moves are skipped and count is clamped: no host sync.
    """
    if k_cache.dim() != 5 or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"kv_compact_: k_cache and v_cache must both be [L, B, H, S, Dh] of one dtype, got "
                         f"{tuple(k_cache.shape)} {k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}")
    if k_cache.numel() and k_cache.data_ptr() == v_cache.data_ptr():
        raise ValueError("kv_compact_: k_cache and v_cache must be different tensors")
    if path.dim() != 1 or path.dtype != torch.int64:
        raise ValueError(f"kv_compact_: path must be 1-D int64, got {path.dtype} of shape {tuple(path.shape)}")
    S, N = k_cache.shape[3], path.numel()
    if all(t.device.type == "cpu" for t in (path, prefix_len, count)):  # checking is free here
        _check_moves(path, int(prefix_len), int(count), S)
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
        cache.index_copy_(3, dst.to(cache.device), cache.index_select(3, src.to(cache.device)))


def _check_moves(path: Tensor, prefix: int, n: int, S: int) -> None:
    if not 0 <= n <= path.numel():
        raise ValueError(f"kv_compact_: count = {n} is outside [0, {path.numel()}]")
    for i, node in enumerate(path[:n].tolist()):
        if not (node >= 0 and 0 <= prefix + node < S and 0 <= prefix + i < S):
            raise ValueError(f"kv_compact_: path[{i}] = {node} with prefix_len = {prefix} moves slot "
                             f"{prefix + node} to slot {prefix + i}, outside the cache's {S} slots")


# ---------------------------------------------------------------- registration

SCHEMA = "(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor path, Tensor prefix_len, Tensor count) -> ()"

if not _backend.HAS_CUDA_EXT:  # the extension defines the op in C++; otherwise the reference is its kernel
    torch.library.define("mtpkern::kv_compact_", SCHEMA)
    torch.library.impl("mtpkern::kv_compact_", ("CPU", "CUDA"), kv_compact_ref_)


@torch.library.register_fake("mtpkern::kv_compact_")
def _kv_compact_fake(k_cache, v_cache, path, prefix_len, count):
    return None


# ---------------------------------------------------------------- public function

def kv_compact_(k_cache: Tensor, v_cache: Tensor, path: Tensor, prefix_len: Tensor, count: Tensor, *,
                backend: str | None = None) -> None:
    """Move slot prefix_len + path[i] to slot prefix_len + i for i < count, in K and V, in place.

    ``k_cache``, ``v_cache``: contiguous [L, B, H, S, Dh] fp32/fp16/bf16; ``path``: int64 [N],
    root first, -1 padded; ``prefix_len``, ``count``: 0-d int tensors on the caches' device.
    The CUDA kernel skips moves outside the cache instead of raising (it cannot without a sync).
    """
    if _backend.pick(k_cache.device, ("cuda", "eager"), backend) == "eager":
        kv_compact_ref_(k_cache, v_cache, path, prefix_len, count)
    else:
        torch.ops.mtpkern.kv_compact_(k_cache, v_cache, path, prefix_len, count)
