"""Speculation trees: MEDUSA choices, chains, widths, validation, and the buffers of small
trees checked against hand-computed values."""

import pytest
import torch

from mtpkern.ops.tree_attention import unpack_tree_mask
from mtpkern.tree import MC_SIM_7B_63, Tree

# Given out of order on purpose: the Tree sorts by depth, then lexicographically.
SMALL = [[1, 0], [0], [0, 1], [1], [0, 0]]


def test_small_tree_node_order_and_parents():
    tree = Tree(SMALL)
    # nodes: 0 root, 1 (0,), 2 (1,), 3 (0,0), 4 (0,1), 5 (1,0)
    assert tree.choices == ((0,), (1,), (0, 0), (0, 1), (1, 0))
    assert tree.parents == [-1, 0, 0, 1, 1, 2]
    assert len(tree) == 6 and tree.max_depth == 2 and tree.topk == 2 and not tree.is_chain


def test_small_tree_buffers_by_hand():
    tt = Tree(SMALL).tensors()
    assert tt.depth.tolist() == [0, 1, 1, 2, 2, 2]
    assert tt.head_row.tolist() == [0, 0, 1, 1, 1]  # draft head d is row d - 1
    assert tt.rank.tolist() == [0, 1, 0, 1, 0]
    assert tt.retrieve.tolist() == [[0, -1, -1], [0, 1, -1], [0, 2, -1], [0, 1, 3], [0, 1, 4], [0, 2, 5]]
    assert tt.paths.tolist() == [[0, 1, 3], [0, 1, 4], [0, 2, 5]]  # the leaves' rows
    dense = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ]
    assert tt.dense_mask.int().tolist() == dense
    # bit j of row i: 0b1, 0b11, 0b101, 0b1011, 0b10011, 0b100101
    assert tt.mask[:, 0].tolist() == [1, 3, 5, 11, 19, 37]
    assert torch.equal(unpack_tree_mask(tt.mask, 6), tt.dense_mask)


def test_chain():
    tree = Tree.chain(3)
    assert tree.choices == ((0,), (0, 0), (0, 0, 0))
    assert tree.parents == [-1, 0, 1, 2] and tree.is_chain
    tt = tree.tensors()
    assert tt.paths.tolist() == [[0, 1, 2, 3]]
    assert tt.dense_mask.equal(torch.ones(4, 4, dtype=torch.bool).tril())
    root_only = Tree.chain(0)
    assert len(root_only) == 1 and root_only.max_depth == 0 and root_only.tensors().paths.tolist() == [[0]]


def test_from_widths_is_the_full_product():
    tree = Tree.from_widths([3, 2])
    assert tree.choices == ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1))
    assert len(Tree.from_widths([2, 2, 2])) == 1 + 2 + 4 + 8
    assert Tree.from_widths([1, 1, 1]) == Tree.chain(3)


def test_mc_sim_7b_63():
    tree = Tree(MC_SIM_7B_63)
    assert len(MC_SIM_7B_63) == 63 and len(tree) == 64
    assert tree.max_depth == 4 and tree.topk == 10
    assert [list(p) for p in tree.choices] == sorted(MC_SIM_7B_63, key=lambda p: (len(p), p))
    tt = tree.tensors()
    # every node sees exactly its depth + 1 ancestors (itself included)
    assert torch.equal(tt.dense_mask.sum(1), tt.depth + 1)
    assert tt.paths.shape[1] == 5 and (tt.paths[:, 0] == 0).all()


def test_tensors_are_cached_per_device():
    tree = Tree(SMALL)
    assert tree.tensors("cpu") is tree.tensors(torch.device("cpu"))


@pytest.mark.parametrize(
    "choices, message",
    [
        ([[0], [0]], r"\[0\] appears twice"),
        ([[0], [1, 0]], r"\[1, 0\] lacks its parent path \[1\]"),
        ([[0], []], "must not be empty"),
        ([[0], [-1]], "ints >= 0"),
        ([[0], "01"], "list of ranks"),
        ([[0], [0.5]], "ints >= 0"),
    ],
)
def test_bad_choices(choices, message):
    with pytest.raises(ValueError, match=message):
        Tree(choices)


def test_checks_against_heads_and_topk():
    with pytest.raises(ValueError, match=r"\[0, 0, 0\] is 3 deep but there are only 2 draft heads"):
        Tree([[0], [0, 0], [0, 0, 0]], n_heads=2)
    with pytest.raises(ValueError, match=r"\[0, 3\] uses rank 3 but the heads offer only top-3"):
        Tree([[0], [0, 3], [0, 0], [0, 1], [0, 2]], topk=3)
    assert len(Tree([[0]], n_heads=1, topk=1)) == 2  # within the limits
    with pytest.raises(ValueError, match="widths"):
        Tree.from_widths([2, 0])
    with pytest.raises(ValueError, match="n >= 0"):
        Tree.chain(-1)


def test_parse():
    assert Tree.parse("mc_sim_7b_63") == Tree(MC_SIM_7B_63)
    assert Tree.parse("3,2") == Tree.from_widths([3, 2])
    assert Tree.parse("chain4") == Tree.parse("chain:4") == Tree.parse(" Chain:4 ") == Tree.chain(4)
    with pytest.raises(ValueError, match="tree spec"):
        Tree.parse("3;2")
    # chainN and chain:N are one form: both accepted, both refused alike, in one line.
    for bad in ("chain:0", "chain0", "chain:x", "chainx", "chain:", "chain:-1", "chain"):
        with pytest.raises(ValueError, match="a chain needs a number of drafts >= 1") as info:
            Tree.parse(bad)
        assert "\n" not in str(info.value)
    for bad in ("0,2", "2,,1", "", "4,-1", "wide"):
        with pytest.raises(ValueError, match="comma-separated widths"):
            Tree.parse(bad)
