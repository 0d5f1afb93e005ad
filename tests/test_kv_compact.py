"""kv_compact_: the reference against a naive copy on overlapping paths; kernels against the reference."""

import pytest
import torch

from mtpkern.ops import _backend
from mtpkern.ops.kv_compact import kv_compact_, kv_compact_ref_

needs_ext = pytest.mark.skipif(not _backend.HAS_CUDA_EXT, reason="the C++ extension mtpkern._C is not built")
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _backend.HAS_CUDA_EXT),
                               reason="needs a CUDA GPU and the built extension")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def caches(shape, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, *shape, generator=gen).to(dtype)
    return k.contiguous().to(device), v.contiguous().to(device)


def naive_compact(cache, path, prefix, count):
    """One vector at a time, reading from an untouched clone."""
    old, new = cache.clone(), cache.clone()
    L, B, H = cache.shape[:3]
    for l in range(L):
        for b in range(B):
            for h in range(H):
                for i in range(count):
                    new[l, b, h, prefix + i] = old[l, b, h, prefix + path[i]]
    return new


def idx(x, device="cpu", dtype=torch.int64):
    return torch.tensor(x, dtype=dtype, device=device)


def run_and_compare(fn, shape, path, prefix, count, dtype=torch.float32, device="cpu", index_dtype=torch.int64):
    k, v = caches(shape, dtype, device, seed=len(path) + prefix)
    want_k, want_v = naive_compact(k, path, prefix, count), naive_compact(v, path, prefix, count)
    fn(k, v, idx(path, device), idx(prefix, device, index_dtype), idx(count, device, index_dtype))
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


# ---------------------------------------------------------------- reference

@pytest.mark.parametrize("path,prefix,count", [
    ([0, 2, 3], 5, 3),           # overlapping: p+2 -> p+1 while p+3 -> p+2
    ([0, 1, 4, 5, 9], 0, 5),     # chain with jumps, prefix 0
    ([0, 3, -1, -1], 2, 2),      # padded path
    ([0, 6, 7], 4, 0),           # nothing accepted: a no-op
    ([0, 1, 2, 3], 3, 4),        # already in place
])
def test_reference_matches_naive_copy(path, prefix, count):
    run_and_compare(kv_compact_ref_, (2, 2, 3, 16, 5), path, prefix, count)


@pytest.mark.parametrize("path,prefix,count,msg", [
    ([0, 20], 0, 2, "path\\[1\\] = 20"),     # source beyond S = 16
    ([0, 3], 14, 2, "path\\[1\\] = 3"),      # source 17
    ([0, -1], 4, 2, "path\\[1\\] = -1"),     # padding inside count
    ([0, 1], 0, 3, "count = 3"),
    ([0, 1], 0, -1, "count = -1"),
])
def test_reference_rejects_moves_outside_the_cache(path, prefix, count, msg):
    k, v = caches((1, 1, 2, 16, 4))
    with pytest.raises(ValueError, match=msg):
        kv_compact_ref_(k, v, idx(path), idx(prefix), idx(count))


def test_reference_rejects_one_buffer_passed_twice():
    k, _ = caches((1, 1, 2, 16, 4))
    with pytest.raises(ValueError, match="different tensors"):
        kv_compact_ref_(k, k, idx([0, 2]), idx(0), idx(2))


def naive_skipping_compact(cache, path, prefix, count):
    """The CUDA kernel's rule: count clamped into [0, N], moves outside the S slots skipped."""
    S = cache.shape[3]
    keep = [(i, node) for i, node in enumerate(path[:max(0, min(count, len(path)))])
            if node >= 0 and 0 <= prefix + node < S and 0 <= prefix + i < S]
    old, new = cache.clone(), cache.clone()
    for i, node in keep:
        new[..., prefix + i, :] = old[..., prefix + node, :]
    return new


@pytest.mark.parametrize("path,prefix,count", [
    ([0, 20, 2], 0, 3),          # a source beyond S = 16 in the middle: only that move is skipped
    ([0, 2, 1, 3, 4, 5], 13, 6),  # destinations past the end: the clamped ones must not clobber slot 15
    ([0, 3, 1], -2, 3),          # negative prefix: destinations clamped at slot 0
    ([0, 2, 5], 3, 7),           # count beyond N
    ([0, 2, 5], 3, -1),          # negative count: nothing moves
    ([3, -1, 4], 12, 3),         # padding inside count
])
@pytest.mark.parametrize("device", DEVICES)
def test_reference_without_checks_skips_moves_like_the_kernel(monkeypatch, device, path, prefix, count):
    """On a GPU the reference cannot check without a host sync; its unchecked path (forced here
    on the CPU too) skips what the CUDA kernel skips, and never syncs."""
    import mtpkern.ops.kv_compact as kv

    monkeypatch.setattr(kv, "_check_moves", lambda *args: None)
    k, v = caches((1, 2, 2, 16, 3), device=device)
    want_k, want_v = naive_skipping_compact(k, path, prefix, count), naive_skipping_compact(v, path, prefix, count)
    args = idx(path, device), idx(prefix, device), idx(count, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        kv_compact_ref_(k, v, *args)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    if device == "cuda" and _backend.HAS_CUDA_EXT:
        k2, v2 = caches((1, 2, 2, 16, 3), device=device)
        kv_compact_(k2, v2, *args, backend="cuda")
        assert torch.equal(k2, want_k) and torch.equal(v2, want_v)


# ---------------------------------------------------------------- the extension's kernels

@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,path,prefix,count", [
    ((2, 1, 3, 16, 8), [0, 2, 3], 5, 3),
    ((1, 2, 1, 33, 3), [0, 4, 7, 8, 12, -1], 17, 5),   # odd head dim
    ((3, 1, 2, 9, 64), [0, 1, 2], 6, 3),               # path ends at the last slot
    ((1, 1, 1, 4, 1), [0, 3, -1], 0, 1),
])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_cpu_kernel_matches_naive_copy(dtype, shape, path, prefix, count, index_dtype):
    run_and_compare(lambda *a: kv_compact_(*a, backend="cuda"), shape, path, prefix, count, dtype,
                    index_dtype=index_dtype)


@needs_ext
def test_cpu_kernel_rejects_moves_outside_the_cache():
    k, v = caches((1, 1, 2, 16, 4))
    before = k.clone()
    for path, prefix, count in [([0, 20], 0, 2), ([0, -1], 4, 2), ([0, 1], 15, 2), ([0, 1], -1, 2)]:
        with pytest.raises(ValueError, match="outside the cache"):
            kv_compact_(k, v, idx(path), idx(prefix), idx(count), backend="cuda")
    with pytest.raises(ValueError, match="count = 3"):
        kv_compact_(k, v, idx([0, 1]), idx(0), idx(3), backend="cuda")
    assert torch.equal(k, before)  # checked before anything moved


@needs_ext
def test_boundary_checks():
    op = torch.ops.mtpkern.kv_compact_
    k, v = caches((1, 1, 2, 8, 4))
    path, zero, two = idx([0, 2]), idx(0), idx(2)
    cases = [
        (TypeError, "v_cache is float16", (k, v.half(), path, zero, two)),
        (TypeError, "caches must be float32, float16 or bfloat16, got int64", (k.long(), v.long(), path, zero, two)),
        (ValueError, "5-D", (k[0], v[0], path, zero, two)),
        (ValueError, "v_cache has shape", (k, v[..., :2].contiguous(), path, zero, two)),
        (ValueError, "contiguous", (k.transpose(3, 4), v.transpose(3, 4), path, zero, two)),
        (ValueError, "different tensors", (k, k, path, zero, two)),
        (TypeError, "path must be int64", (k, v, path.int(), zero, two)),
        (ValueError, "path must be 1-D", (k, v, path.view(1, 2), zero, two)),
        (ValueError, "at most 1024", (k, v, torch.zeros(1025, dtype=torch.int64), zero, two)),
        (ValueError, "prefix_len must be a 0-d", (k, v, path, idx([0]), two)),
        (TypeError, "count must be int64 or int32, got float32", (k, v, path, zero, torch.tensor(2.0))),
    ]
    if torch.cuda.is_available():
        cases.append((RuntimeError, "count is on cpu", (k.cuda(), v.cuda(), path.cuda(), zero.cuda(), two)))
    for exc, msg, args in cases:
        with pytest.raises(exc, match=msg):
            op(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    k, v = caches((2, 1, 2, 12, 8), device=device)
    torch.library.opcheck(torch.ops.mtpkern.kv_compact_,
                          (k, v, idx([0, 2, 3, -1], device), idx(4, device), idx(3, device)))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,path,prefix,count", [
    ((12, 1, 12, 64, 64), [0, 2, 3, 7, 9, 10], 40, 6),   # GPT-2 head dim
    ((2, 2, 3, 33, 3), [0, 4, 7, 8, 12, -1], 17, 5),     # 6-byte rows: the 2-byte copy path
    ((1, 1, 1, 300, 128), list(range(0, 256, 2)), 30, 128),  # a long path, chunked over the head dim
])
def test_cuda_kernel_matches_naive_copy(dtype, shape, path, prefix, count):
    run_and_compare(kv_compact_, shape, path, prefix, count, dtype, device="cuda")


@needs_gpu
def test_cuda_kernel_unaligned_storage_and_skipped_moves():
    flat = torch.randn(1 + 2 * 3 * 16 * 4, device="cuda", dtype=torch.float16)
    k = flat[1:].view(1, 2, 3, 16, 4)  # 2-byte aligned base: the kernel must pick its 2-byte copy unit
    v = torch.randn_like(k)
    want_k, want_v = naive_compact(k, [0, 2, 5], 3, 3), naive_compact(v, [0, 2, 5], 3, 3)
    kv_compact_(k, v, idx([0, 2, 5], "cuda"), idx(3, "cuda"), idx(3, "cuda"))
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    # Out-of-range moves are skipped (the CUDA kernel cannot raise without a sync): slot 14 stays.
    before = k.clone()
    kv_compact_(k, v, idx([0, 100, -1], "cuda"), idx(13, "cuda"), idx(3, "cuda"))
    assert torch.equal(k, before)


@needs_gpu
def test_cuda_graph_with_device_side_lengths():
    k, v = caches((12, 1, 12, 64, 64), torch.float16, "cuda")
    path, prefix, count = idx([0, 3, 4, 9, -1, -1], "cuda"), idx(10, "cuda"), idx(4, "cuda")
    kv_compact_(k.clone(), v.clone(), path, prefix, count)  # warm up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kv_compact_(k, v, path, prefix, count)
    k0, v0 = k.clone(), v.clone()
    for new_path, new_prefix, new_count in [([0, 1, 5, 6, 7, 8], 20, 6), ([0, 2, -1, -1, -1, -1], 3, 2)]:
        k.copy_(k0)
        v.copy_(v0)
        path.copy_(idx(new_path))
        prefix.fill_(new_prefix)
        count.fill_(new_count)
        graph.replay()
        want_k, want_v = k0.clone(), v0.clone()
        kv_compact_ref_(want_k, want_v, path, prefix, count)
        assert torch.equal(k, want_k) and torch.equal(v, want_v)
