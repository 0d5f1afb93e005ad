"""KV compaction at the GPT-2 124M decode shape: 12 layers x 12 heads x 64, fp16, root + 5 accepted."""

import pytest
import torch

from mtpkern.ops import _backend
from mtpkern.ops.kv_compact import kv_compact_, kv_compact_ref_

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _backend.HAS_CUDA_EXT, reason="needs the built extension")]


def test_kv_compact_gpt2(benchmark, bench_against):
    L, B, H, S, Dh = 12, 1, 12, 2048, 64
    k = torch.randn(L, B, H, S, Dh, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    path = torch.tensor([0, 2, 5, 9, 14, 20], device="cuda")  # root + 5 accepted nodes of a 64-node tree
    prefix, count = torch.tensor(500, device="cuda"), torch.tensor(6, device="cuda")
    # Read and write `count` vectors of K and V in every layer and head.
    bytes_moved = 2 * 2 * L * B * H * 6 * Dh * k.element_size()
    bench_against(benchmark, lambda: kv_compact_(k, v, path, prefix, count, backend="cuda"),
                  lambda: kv_compact_ref_(k, v, path, prefix, count), bytes_moved=bytes_moved,
                  shape=[L, B, H, S, Dh], dtype="float16", accepted=6)
