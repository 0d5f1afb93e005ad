"""Tree buffers for tree speculative decoding: packed ancestor mask, depths, paths, leaves.

A tree has T nodes in topological order; node 0 is the root (the last accepted token) and
``parents`` (int64 [T]) has parents[0] = -1 and 0 <= parents[i] < i. The packed mask format
(shared with the tree-attention op) is int32 [T, W], W = ceil(T / 32): in row i, bit j % 32 of
word j // 32 is set iff node j is node i or one of its ancestors.

Kernels: ``csrc/tree_mask_api.cpp`` and ``csrc/cuda/tree_mask.cu`` (op ``mtpkern::tree_buffers``).
Both backends check ``parents`` (1-D contiguous int64, 1..4096 nodes) and ``max_depth`` with the
same exception types and messages. The C++ op marks the nodes of an invalid tree with depth -1
(it cannot raise from a GPU without a sync); :func:`tree_buffers` turns those marks into the
reference's ValueError naming the node. NaN cannot occur (integer inputs only).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mtpkern.ops import _backend
from mtpkern.ops._checks import check_vector
from mtpkern.ops.tree_attention import pack_tree_mask

MAX_NODES = 4096  # the CUDA kernel builds a whole tree in one thread block


class TreeBuffers(NamedTuple):
    mask: Tensor  # int32 [T, W] packed ancestor mask (self included)
    depth: Tensor  # int64 [T], root 0; position id of node i is prefix_len + depth[i]
    retrieve: Tensor  # int64 [T, max_depth + 1]: row i = the path root..i (node indices), padded with -1
    is_leaf: Tensor  # bool [T]


def _check(parents: Tensor, max_depth: int) -> None:
    """``check_tree_buffers`` of csrc/mtpkern.h: the same checks, order, types and messages."""
    check_vector(parents, "tree_buffers", "parents", torch.int64)
    T = parents.shape[0]
    if not 1 <= T <= MAX_NODES:
        raise ValueError(f"tree_buffers: a tree has 1..{MAX_NODES} nodes, got {T}")
    if not 0 <= max_depth < MAX_NODES:
        raise ValueError(f"tree_buffers: max_depth must be in [0, {MAX_NODES}), got {max_depth}")


def _tree_depths(parents: list[int], max_depth: int) -> list[int]:
    """The depth of every node; ValueError naming the first node that breaks the tree rules."""
    if parents[0] != -1:
        raise ValueError(f"tree_buffers: node 0 is the root, its parent must be -1, got {parents[0]}")
    depth = [0]
    for i, p in enumerate(parents[1:], start=1):
        if not 0 <= p < i:
            raise ValueError(f"tree_buffers: node {i} has parent {p}; parents must satisfy 0 <= parents[i] < i")
        if depth[p] + 1 > max_depth:
            raise ValueError(f"tree_buffers: node {i} has depth {depth[p] + 1} > max_depth = {max_depth}")
        depth.append(depth[p] + 1)
    return depth


def tree_buffers_ref(parents: Tensor, max_depth: int) -> TreeBuffers:
    """Eager reference. With anc(0) = {0} and anc(i) = {i} ∪ anc(parents[i]):

        depth[i]       = 0 if i == 0 else depth[parents[i]] + 1
        retrieve[i, d] = the node of anc(i) at depth d, for d <= depth[i]; -1 beyond
        mask[i]        = pack(j in anc(i) for j in 0..T-1)
        is_leaf[i]     = no node has parent i

    Invalid trees raise ValueError naming the node (host-side, so this syncs on CUDA).
    """
    _check(parents, max_depth)
    par = parents.tolist()
    depth = _tree_depths(par, max_depth)
    T = len(par)
    retrieve = [[-1] * (max_depth + 1) for _ in range(T)]
    for i in range(T):
        node = i
        for d in range(depth[i], -1, -1):
            retrieve[i][d] = node
            node = par[node]
    retrieve_t = torch.tensor(retrieve, dtype=torch.int64)
    # Padding (-1) is pointed at the root, which is on every path anyway.
    dense = torch.zeros(T, T, dtype=torch.bool).scatter_(1, retrieve_t.clamp(min=0), True)
    has_child = torch.zeros(T, dtype=torch.bool)
    has_child[par[1:]] = True
    dev = parents.device
    return TreeBuffers(pack_tree_mask(dense).to(dev), torch.tensor(depth, device=dev), retrieve_t.to(dev),
                       (~has_child).to(dev))


# ---------------------------------------------------------------- registration

SCHEMA = "(Tensor parents, int max_depth) -> (Tensor mask, Tensor depth, Tensor retrieve, Tensor is_leaf)"

if not _backend.HAS_CUDA_EXT:  # the extension defines the op in C++; otherwise the reference is its kernel
    torch.library.define("mtpkern::tree_buffers", SCHEMA)
    torch.library.impl("mtpkern::tree_buffers", ("CPU", "CUDA"), lambda p, d: tuple(tree_buffers_ref(p, d)))


@torch.library.register_fake("mtpkern::tree_buffers")
def _tree_buffers_fake(parents, max_depth):
    _check(parents, max_depth)
    T = parents.shape[0]
    return (parents.new_empty(T, (T + 31) // 32, dtype=torch.int32), parents.new_empty(T),
            parents.new_empty(T, max_depth + 1), parents.new_empty(T, dtype=torch.bool))


# ---------------------------------------------------------------- public function

def tree_buffers(parents: Tensor, max_depth: int, *, check: bool = True, backend: str | None = None) -> TreeBuffers:
    """The buffers of the tree given by ``parents`` (see :class:`TreeBuffers`), paths up to ``max_depth``.

    Backend "cuda" (the extension, automatic on CUDA tensors when built) marks nodes of an
    invalid tree with depth -1; with ``check=True`` one host sync turns them into the reference's
    ValueError. ``check=False`` never syncs (dynamic trees inside a CUDA graph).
    """
    if _backend.pick(parents.device, ("cuda", "eager"), backend) == "eager":
        return tree_buffers_ref(parents, max_depth)
    out = TreeBuffers(*torch.ops.mtpkern.tree_buffers(parents, max_depth))
    if check and bool((out.depth < 0).any()):  # the one sync
        _tree_depths(parents.tolist(), max_depth)  # raises, naming the first bad node
        raise RuntimeError("tree_buffers: the kernel rejected a tree the reference accepts")
    return out
