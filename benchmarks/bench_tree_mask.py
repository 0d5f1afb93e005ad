"""tree_buffers for a 64-node tree (the buffers a dynamic tree rebuilds every step). The eager
reference builds them on the host (a sync and a copy back), which is what the kernel replaces."""

import pytest
import torch

from mtpkern.ops import _backend
from mtpkern.ops.tree_mask import tree_buffers, tree_buffers_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _backend.HAS_CUDA_EXT, reason="needs the built extension")]


def test_tree_buffers_64(benchmark, bench_against):
    T = 64
    parents = torch.tensor([-1] + [(i - 1) // 3 for i in range(1, T)], device="cuda")  # a ternary tree, depth 4
    max_depth = 4
    W = (T + 31) // 32
    # Read parents; write mask, depth, retrieve, is_leaf.
    bytes_moved = T * 8 + T * W * 4 + T * 8 + T * (max_depth + 1) * 8 + T
    bench_against(benchmark, lambda: tree_buffers(parents, max_depth, check=False, backend="cuda"),
                  lambda: tree_buffers_ref(parents, max_depth), bytes_moved=bytes_moved, T=T, max_depth=max_depth,
                  ref_capture=False)  # the reference walks the tree on the host: it syncs
