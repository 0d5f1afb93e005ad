"""kv_compact_: the reference against a naive copy on overlapping paths; kernels against the reference."""

import pytest
import torch

from mtpkern.ops import _backend
from mtpkern.ops.kv_compact import kv_compact_, kv_compact_ref_

from _errors import assert_one_error, errors_of

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


BACKENDS = ["eager"] + (["cuda"] if _backend.HAS_CUDA_EXT else [])  # cuda: the C++ kernels (here on CPU)
_K, _V = caches((1, 1, 2, 8, 4))
_PATH, _ZERO, _TWO = idx([0, 2]), idx(0), idx(2)


@pytest.mark.parametrize("error, match, args", [
    (TypeError, "v_cache is float16 but k_cache is float32", (_K, _V.half(), _PATH, _ZERO, _TWO)),
    (TypeError, "caches must be float32, float16 or bfloat16, got int64", (_K.long(), _V.long(), _PATH, _ZERO, _TWO)),
    (ValueError, "k_cache must be 5-D [L, B, H, S, Dh], got shape [1, 2, 8, 4]", (_K[0], _V[0], _PATH, _ZERO, _TWO)),
    (ValueError, "v_cache has shape [1, 1, 2, 8, 2] but k_cache has [1, 1, 2, 8, 4]",
     (_K, _V[..., :2].contiguous(), _PATH, _ZERO, _TWO)),
    (ValueError, "k_cache and v_cache must be contiguous", (_K.transpose(3, 4), _V.transpose(3, 4), _PATH, _ZERO, _TWO)),
    (ValueError, "v_cache is on meta but the other inputs are on cpu", (_K, _V.to("meta"), _PATH, _ZERO, _TWO)),
    (ValueError, "different tensors", (_K, _K, _PATH, _ZERO, _TWO)),
    (TypeError, "path must be int64, got int32", (_K, _V, _PATH.int(), _ZERO, _TWO)),
    (ValueError, "path must be 1-D [T] or 2-D [B, T], got shape [1, 1, 2]", (_K, _V, _PATH.view(1, 1, 2), _ZERO, _TWO)),
    (ValueError, "with a path per batch row, prefix_len must be 1-D [1], got shape []",
     (_K, _V, _PATH.view(1, 2), _ZERO, _TWO)),
    (ValueError, "path must be contiguous", (_K, _V, idx([0, 9, 2, 9])[::2], _ZERO, _TWO)),
    (ValueError, "path has 1025 entries, at most 1024", (_K, _V, torch.zeros(1025, dtype=torch.int64), _ZERO, _TWO)),
    (ValueError, "prefix_len must be a 0-d tensor, got shape [1]", (_K, _V, _PATH, idx([0]), _TWO)),
    (TypeError, "prefix_len must be int64 or int32, got float32", (_K, _V, _PATH, torch.tensor(2.7), _TWO)),
    (TypeError, "count must be int64 or int32, got float32", (_K, _V, _PATH, _ZERO, torch.tensor(2.0))),
    (ValueError, "count = 3 is outside [0, 2]", (_K, _V, _PATH, _ZERO, idx(3))),
    (ValueError, "path[1] = 2 with prefix_len = 6 moves slot 8 to slot 7, outside the cache's 8 slots",
     (_K, _V, _PATH, idx(6), _TWO)),
])
def test_one_error_in_every_backend(error, match, args):
    """The same bad input, the same exception type and message: eager, C++ and the op itself
    (a float prefix_len used to be truncated by eager and refused by C++)."""
    before = [a.clone() for a in args[:2] if a.device.type != "meta"]
    calls = {b: (lambda b=b: kv_compact_(*args, backend=b)) for b in BACKENDS}
    calls["op"] = lambda: torch.ops.mtpkern.kv_compact_(*args)
    assert_one_error(errors_of(calls), error, match, "kv_compact_")
    for old, new in zip(before, args[:2]):
        assert torch.equal(old, new)  # checked before anything moved


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


# ---------------------------------------------------------------- a path per batch row

ROWS = [([0, 2, 3], 5, 3), ([0, 1, 4, 5], 0, 4), ([0, 3, -1, -1], 9, 2), ([0, 6, 7, 8], 4, 0)]


def _rows_args(device="cpu", index_dtype=torch.int64):
    N = max(len(p) for p, _, _ in ROWS)
    path = torch.tensor([p + [-1] * (N - len(p)) for p, _, _ in ROWS], device=device)
    prefix = torch.tensor([r[1] for r in ROWS], dtype=index_dtype, device=device)
    count = torch.tensor([r[2] for r in ROWS], dtype=index_dtype, device=device)
    return path, prefix, count


def _naive_rows(cache):
    out = cache.clone()
    for b, (path, prefix, count) in enumerate(ROWS):
        out[:, b : b + 1] = naive_compact(cache[:, b : b + 1], path, prefix, count)
    return out


BACKENDS = ["eager"] + (["cuda"] if _backend.HAS_CUDA_EXT else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_a_path_per_batch_row(backend, device, dtype, index_dtype):
    """Each batch row follows its own path, prefix length and count (one of them 0), in one call."""
    k, v = caches((2, len(ROWS), 3, 16, 5), dtype, device, seed=3)
    want_k, want_v = _naive_rows(k), _naive_rows(v)
    kv_compact_(k, v, *_rows_args(device, index_dtype), backend=backend)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_row_moves_nothing(backend):
    k, v = caches((1, len(ROWS), 1, 16, 2))
    before = k.clone()
    path, prefix, count = _rows_args()
    prefix[2] = 13  # row 2 would move slot 13 + 3 = 16, past the 16 slots
    with pytest.raises(ValueError, match=r"path\[1\] = 3 with prefix_len = 13 moves slot 16 to slot 14, outside "
                                         r"the cache's 16 slots \(batch row 2\)"):
        kv_compact_(k, v, path, prefix, count, backend=backend)
    assert torch.equal(k, before)  # rows 0 and 1 were fine, and still did not move


@pytest.mark.parametrize("args, match", [
    (lambda p, x, c: (p[:3], x, c), "path has 3 rows but the caches have 4 batch rows"),
    (lambda p, x, c: (p, x[0], c), r"with a path per batch row, prefix_len must be 1-D \[4\], got shape \[\]"),
    (lambda p, x, c: (p, x, c[:2]), r"with a path per batch row, count must be 1-D \[4\], got shape \[2\]"),
    (lambda p, x, c: (p, x.float(), c), "prefix_len must be int64 or int32, got float32"),
    (lambda p, x, c: (p[None], x, c), r"path must be 1-D \[T\] or 2-D \[B, T\], got shape \[1, 4, 4\]"),
])
def test_per_row_errors_in_every_backend(args, match):
    k, v = caches((1, len(ROWS), 1, 16, 2))
    a = args(*_rows_args())
    calls = {b: (lambda b=b: kv_compact_(k, v, *a, backend=b)) for b in BACKENDS}
    calls["op"] = lambda: torch.ops.mtpkern.kv_compact_(k, v, *a)
    errors = errors_of(calls)
    assert len(set(errors.values())) == 1, errors
    (kind, message), = set(errors.values())
    assert message.startswith("kv_compact_: ") and __import__("re").search(match, message), errors
