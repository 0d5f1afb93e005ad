"""tree_buffers: the eager reference on hand-computed trees, the C++ kernels against it."""

import pytest
import torch

from mtpkern.ops import _backend
from mtpkern.ops.tree_attention import pack_tree_mask, unpack_tree_mask
from mtpkern.ops.tree_mask import MAX_NODES, tree_buffers, tree_buffers_ref

from _errors import assert_one_error, errors_of

needs_ext = pytest.mark.skipif(not _backend.HAS_CUDA_EXT, reason="the C++ extension mtpkern._C is not built")
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _backend.HAS_CUDA_EXT),
                               reason="needs a CUDA GPU and the built extension")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def assert_buffers_equal(got, want):
    for name, g, w in zip(want._fields, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name}: {g.dtype} {g.shape} vs {w.dtype} {w.shape}"
        assert torch.equal(g.cpu(), w.cpu()), f"{name} differs:\n{g}\nvs\n{w}"


def random_parents(T: int, gen: torch.Generator) -> torch.Tensor:
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, T)]
    return torch.tensor(parents)


def naive_ancestors(parents: list[int]) -> torch.Tensor:
    """anc[i] = anc[parents[i]] | {i}, built in topological order."""
    T = len(parents)
    anc = torch.zeros(T, T, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] = anc[p]
        anc[i, i] = True
    return anc


# ---------------------------------------------------------------- hand-computed trees

def test_chain_of_four():
    out = tree_buffers_ref(torch.tensor([-1, 0, 1, 2]), max_depth=3)
    assert out.mask.tolist() == [[0b1], [0b11], [0b111], [0b1111]]
    assert out.depth.tolist() == [0, 1, 2, 3]
    assert out.retrieve.tolist() == [[0, -1, -1, -1], [0, 1, -1, -1], [0, 1, 2, -1], [0, 1, 2, 3]]
    assert out.is_leaf.tolist() == [False, False, False, True]


def test_two_level_branching():
    out = tree_buffers_ref(torch.tensor([-1, 0, 0, 1, 1, 2]), max_depth=2)
    assert out.mask.view(-1).tolist() == [0b1, 0b11, 0b101, 0b1011, 0b10011, 0b100101]
    assert out.depth.tolist() == [0, 1, 1, 2, 2, 2]
    assert out.retrieve.tolist() == [[0, -1, -1], [0, 1, -1], [0, 2, -1], [0, 1, 3], [0, 1, 4], [0, 2, 5]]
    assert out.is_leaf.tolist() == [False, False, False, True, True, True]


def test_medusa_style_tree_with_spare_depth():
    # root; top-3 of head 1; top-2 of head 2 under the first, top-1 under the second.
    out = tree_buffers_ref(torch.tensor([-1, 0, 0, 0, 1, 1, 2]), max_depth=4)
    assert out.depth.tolist() == [0, 1, 1, 1, 2, 2, 2]
    assert out.mask.view(-1).tolist() == [1, 3, 5, 9, 1 + 2 + 16, 1 + 2 + 32, 1 + 4 + 64]
    assert out.retrieve[6].tolist() == [0, 2, 6, -1, -1]
    assert out.retrieve[3].tolist() == [0, 3, -1, -1, -1]
    assert out.is_leaf.tolist() == [False, False, False, True, True, True, True]


def test_chain_across_words_sets_the_sign_bit():
    out = tree_buffers_ref(torch.arange(-1, 39), max_depth=39)  # chain of 40 nodes, W = 2
    assert out.mask.shape == (40, 2)
    assert out.mask[39].tolist() == [-1, 0xFF]  # all 32 bits of word 0, then nodes 32..39
    assert out.mask[31].tolist() == [-1, 0]
    assert out.mask[30].tolist() == [2**31 - 1, 0]


@pytest.mark.parametrize("T", [1, 31, 32, 33, 97])
def test_pack_unpack_round_trip(T):
    dense = torch.rand(T, T, generator=torch.Generator().manual_seed(T)) < 0.5
    packed = pack_tree_mask(dense)
    assert packed.dtype == torch.int32 and packed.shape == (T, (T + 31) // 32)
    assert torch.equal(unpack_tree_mask(packed, T), dense)


@pytest.mark.parametrize("T", [1, 2, 7, 64, 97])
def test_reference_matches_naive_ancestors(T):
    gen = torch.Generator().manual_seed(T)
    parents = random_parents(T, gen)
    out = tree_buffers_ref(parents, max_depth=T)
    anc = naive_ancestors(parents.tolist())
    assert torch.equal(unpack_tree_mask(out.mask, T), anc)
    assert torch.equal(out.depth, anc.sum(1) - 1)
    for i in range(T):
        row = out.retrieve[i]
        path = row[row >= 0]
        assert path[-1] == i and torch.equal(anc[i].nonzero().view(-1), path)  # ancestors in index order
    has_child = torch.zeros(T, dtype=torch.bool)
    has_child[parents[1:]] = True
    assert torch.equal(out.is_leaf, ~has_child)


# ---------------------------------------------------------------- invalid trees

INVALID = [
    ([0, 0, 1], 2, "node 0"),
    ([-1, 0, 2], 2, "node 2 has parent 2"),
    ([-1, 0, 1, -1], 3, "node 3 has parent -1"),
    ([-1, 0, 5, 1], 3, "node 2 has parent 5"),
    ([-1, 0, 1, 2], 2, "node 3 has depth 3"),
]


@pytest.mark.parametrize("parents,max_depth,msg", INVALID)
def test_invalid_tree_raises_naming_the_node(parents, max_depth, msg):
    with pytest.raises(ValueError, match=msg):
        tree_buffers_ref(torch.tensor(parents), max_depth)


@pytest.mark.parametrize("T", [0, MAX_NODES + 1])
def test_tree_size_limits(T):
    parents = torch.arange(-1, T - 1)
    with pytest.raises(ValueError, match="nodes"):
        tree_buffers_ref(parents, 3)


@needs_ext
@pytest.mark.parametrize("parents,max_depth,msg", INVALID)
def test_extension_flags_invalid_nodes(parents, max_depth, msg):
    p = torch.tensor(parents)
    with pytest.raises(ValueError, match=msg):  # check=True: one sync, then the reference's error
        tree_buffers(p, max_depth, backend="cuda")
    out = tree_buffers(p, max_depth, check=False, backend="cuda")
    bad = int(msg.split()[1])  # the first invalid node, and every node at or below it, is flagged
    assert (out.depth[:bad] >= 0).all() and out.depth[bad] == -1
    flagged = out.depth < 0
    assert (out.retrieve[flagged] == -1).all() and (out.mask[flagged] == 0).all() and not out.is_leaf[flagged].any()


# ---------------------------------------------------------------- the extension's kernels

@needs_ext
@pytest.mark.parametrize("T", [1, 3, 32, 33, 97, 300])
def test_cpu_kernel_matches_reference(T):
    gen = torch.Generator().manual_seed(1000 + T)
    parents = random_parents(T, gen)
    max_depth = int(tree_buffers_ref(parents, T).depth.max()) + (T % 3)  # exact, or with spare columns
    assert_buffers_equal(tree_buffers(parents, max_depth, backend="cuda"), tree_buffers_ref(parents, max_depth))


BACKENDS = ["eager"] + (["cuda"] if _backend.HAS_CUDA_EXT else [])  # cuda: the C++ kernels (here on CPU)


@pytest.mark.parametrize("error, match, parents, max_depth", [
    (TypeError, "parents must be int64, got int32", torch.tensor([-1, 0], dtype=torch.int32), 1),
    (ValueError, "parents must be 1-D, got shape [1, 2]", torch.tensor([[-1, 0]]), 1),
    (ValueError, "parents must be contiguous", torch.tensor([-1, 9, 0, 9])[::2], 1),
    (ValueError, "a tree has 1..4096 nodes, got 0", torch.empty(0, dtype=torch.int64), 1),
    (ValueError, "a tree has 1..4096 nodes, got 4097", torch.arange(-1, MAX_NODES), 1),
    (ValueError, "max_depth must be in [0, 4096), got -1", torch.tensor([-1, 0]), -1),
    (ValueError, "node 2 has parent 5", torch.tensor([-1, 0, 5, 1]), 3),
])
def test_one_error_in_every_backend(error, match, parents, max_depth):
    """The same bad input, the same exception type and message: eager and C++ (int32 parents
    used to be a ValueError in eager and a TypeError in C++)."""
    calls = {b: (lambda b=b: tree_buffers(parents, max_depth, backend=b)) for b in BACKENDS}
    if "node" not in match:  # the C++ op flags invalid nodes (depth -1); the wrapper raises
        calls["op"] = lambda: torch.ops.mtpkern.tree_buffers(parents, max_depth)
    assert_one_error(errors_of(calls), error, match, "tree_buffers")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3], device=device)
    torch.library.opcheck(torch.ops.mtpkern.tree_buffers, (parents, 4))


@needs_gpu
@pytest.mark.parametrize("T", [1, 33, 64, 1500])
def test_cuda_kernel_matches_reference(T):
    parents = random_parents(T, torch.Generator().manual_seed(T)).cuda()
    max_depth = int(tree_buffers_ref(parents, T).depth.max())
    assert_buffers_equal(tree_buffers(parents, max_depth, backend="cuda"), tree_buffers_ref(parents, max_depth))
    bad = parents.clone()
    bad[-1] = T - 1 if T > 1 else 0  # its own parent
    with pytest.raises(ValueError, match=f"node {T - 1}"):
        tree_buffers(bad, max_depth, backend="cuda")


@needs_gpu
def test_cuda_graph_with_dynamic_tree():
    parents = torch.tensor([-1, 0, 0, 1, 1, 2], device="cuda")
    tree_buffers(parents, 3, check=False)  # warm up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tree_buffers(parents, 3, check=False)
    for new in ([-1, 0, 1, 2, 0, 4], [-1, 0, 0, 0, 3, 3]):
        parents.copy_(torch.tensor(new))
        graph.replay()
        torch.cuda.synchronize()
        assert_buffers_equal(out, tree_buffers_ref(parents, 3))
