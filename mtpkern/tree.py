"""Speculation trees: which draft tokens one verification pass checks.

Node 0 is the root: the last accepted token, the verifier's own prediction. Every other node
is a path of per-head top-k ranks, MEDUSA's "choices" format: the path ``(r1, ..., rd)`` is the
node reached by taking the r1-th top token of draft head 1, then the r2-th top token of draft
head 2, ..., so node ``(r1, ..., rd)`` sits at depth d and holds the rd-th top token of draft
head d, a child of node ``(r1, ..., r(d-1))``. Draft head d predicts the token d positions
after the root (MEDUSA: MEDUSA head d-1 = model head d; MTP: model head d).

All the index buffers a decoding step needs are computed once per tree, by the same
``tree_buffers`` op the kernels use, and cached per device.
"""

from __future__ import annotations

import itertools
from functools import cached_property
from typing import NamedTuple, Sequence

import torch

from mtpkern.ops.tree_mask import tree_buffers_ref

# MEDUSA's 63-node tree for Vicuna-7B (FasterDecoding/Medusa, medusa_choices.py): 4 heads, top-10.
MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0],
    [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2],
    [3, 0], [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4],
    [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7],
    [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1],
    [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0], [0, 0, 0, 1],
    [1, 6], [0, 7, 0],
]


class TreeTensors(NamedTuple):
    """A tree's index buffers on one device (T nodes, D = max depth)."""

    parents: torch.Tensor  # int64 [T], -1 for the root
    depth: torch.Tensor  # int64 [T]: position id offset of each node from the root
    head_row: torch.Tensor  # int64 [T-1]: node i+1's draft head, as a row of the heads 1..D stats
    rank: torch.Tensor  # int64 [T-1]: node i+1's rank within its head's top-k
    mask: torch.Tensor  # int32 [T, ceil(T/32)]: packed ancestor mask (self included)
    dense_mask: torch.Tensor  # bool [T, T]: the same mask unpacked, for eager attention
    retrieve: torch.Tensor  # int64 [T, D+1]: row i = the path root..i, padded with -1
    paths: torch.Tensor  # int64 [P, D+1]: the root-to-leaf paths (retrieve's leaf rows)


class Tree:
    """A speculation tree given as MEDUSA choices: a list of paths of per-head top-k ranks.

    ``Tree([[0], [1], [0, 0]])`` has a root and three nodes: the top-1 and top-2 tokens of
    draft head 1 and, below the first, the top-1 token of draft head 2. The paths are sorted
    like MEDUSA's (by depth, then lexicographically), which fixes the node order: node i is
    ``self.choices[i - 1]``. Every prefix of a path must be a path too.

    ``n_heads`` (the number of draft heads) and ``topk`` (how many top tokens each head
    offers), when given, are checked: a path deeper than ``n_heads`` or a rank ``>= topk`` is
    an error.
    """

    def __init__(self, choices: Sequence[Sequence[int]], *, n_heads: int | None = None,
                 topk: int | None = None):
        paths = []
        for c in choices:
            if isinstance(c, (str, bytes)) or not isinstance(c, Sequence):
                raise ValueError(f"a tree path must be a list of ranks, got {c!r}")
            path = tuple(c)
            if not path:
                raise ValueError("a tree path must not be empty (the root is implicit)")
            if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in path):
                raise ValueError(f"tree path {list(path)} must hold ranks that are ints >= 0")
            paths.append(path)
        seen = set()
        for path in paths:
            if path in seen:
                raise ValueError(f"tree path {list(path)} appears twice")
            seen.add(path)
        for path in paths:
            if len(path) > 1 and path[:-1] not in seen:
                raise ValueError(f"tree path {list(path)} lacks its parent path {list(path[:-1])}")
        self.choices: tuple[tuple[int, ...], ...] = tuple(sorted(paths, key=lambda p: (len(p), p)))
        self.check(n_heads=n_heads, topk=topk)
        self._on_device: dict[torch.device, TreeTensors] = {}

    @classmethod
    def chain(cls, n: int) -> Tree:
        """A chain of n drafts: the top-1 token of draft heads 1..n (blockwise parallel decoding)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"a chain needs n >= 0 drafts, got {n!r}")
        return cls([[0] * d for d in range(1, n + 1)])

    @classmethod
    def from_widths(cls, widths: Sequence[int]) -> Tree:
        """The full Cartesian product of per-depth widths: depth d holds every path whose
        i-th rank is below ``widths[i]``, so ``from_widths([3, 2])`` has 3 + 3 * 2 = 9 nodes
        besides the root. No capping: sizes multiply, so keep the widths small."""
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of ints >= 1, got {widths!r}")
        paths: list[list[int]] = []
        for d in range(1, len(widths) + 1):
            paths.extend(list(p) for p in itertools.product(*(range(w) for w in widths[:d])))
        return cls(paths)

    @classmethod
    def parse(cls, spec: str) -> Tree:
        """A tree from a spec, the one parser of the CLI and the library: ``mc_sim_7b_63``
        (MEDUSA's tree), ``chain:N`` or ``chainN`` (N >= 1 drafts), or per-depth widths
        ``4,2,2``. A bad spec is a one-line ValueError."""
        if not isinstance(spec, str):
            raise ValueError(f"a tree spec must be a string, got {spec!r}")
        text = spec.strip().lower()
        if text == "mc_sim_7b_63":
            return cls(MC_SIM_7B_63)
        if text.startswith("chain"):
            n = text[len("chain"):].removeprefix(":")
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"tree spec {spec!r}: a chain needs a number of drafts >= 1, like 'chain:3'")
            return cls.chain(int(n))
        parts = text.split(",")
        if not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
            raise ValueError(
                f"tree spec {spec!r} is not 'mc_sim_7b_63', 'chain:N' or comma-separated widths >= 1 like '4,2,2'"
            )
        return cls.from_widths([int(p) for p in parts])

    def check(self, *, n_heads: int | None = None, topk: int | None = None) -> None:
        """Raise ValueError if a path is deeper than ``n_heads`` or uses a rank ``>= topk``."""
        for path in self.choices:
            if n_heads is not None and len(path) > n_heads:
                raise ValueError(
                    f"tree path {list(path)} is {len(path)} deep but there are only {n_heads} draft heads"
                )
            if topk is not None and max(path) >= topk:
                raise ValueError(
                    f"tree path {list(path)} uses rank {max(path)} but the heads offer only top-{topk}"
                )

    # -- shape -----------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of nodes, the root included."""
        return 1 + len(self.choices)

    @property
    def max_depth(self) -> int:
        """The deepest path: the number of draft heads the tree uses."""
        return max((len(p) for p in self.choices), default=0)

    @property
    def topk(self) -> int:
        """How many top tokens per head the tree uses (the largest rank + 1)."""
        return 1 + max((max(p) for p in self.choices), default=0)

    @property
    def is_chain(self) -> bool:
        """Every node has at most one child: ranks are all 0 (a chain of top-1 drafts)."""
        return all(p == (0,) * len(p) for p in self.choices)

    def __eq__(self, other) -> bool:
        return isinstance(other, Tree) and self.choices == other.choices

    def __hash__(self) -> int:
        return hash(self.choices)

    def __repr__(self) -> str:
        return f"Tree(nodes={len(self)}, depth={self.max_depth}, topk={self.topk})"

    # -- buffers ---------------------------------------------------------------------

    @cached_property
    def parents(self) -> list[int]:
        index = {p: i for i, p in enumerate(self.choices, start=1)}
        index[()] = 0
        return [-1] + [index[p[:-1]] for p in self.choices]

    def tensors(self, device: torch.device | str = "cpu") -> TreeTensors:
        """The index buffers on ``device``, computed once (by ``tree_buffers_ref``) and cached."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = TreeTensors(*(x.to(device) for x in self._build()))
        return self._on_device[device]

    def _build(self) -> TreeTensors:
        parents = torch.tensor(self.parents, dtype=torch.int64)
        bufs = tree_buffers_ref(parents, self.max_depth)
        T = len(self)
        # Unpack the ancestor mask from the paths: node i sees exactly the nodes on its path.
        dense = torch.zeros(T, T, dtype=torch.bool)
        rows = torch.arange(T)[:, None].expand_as(bufs.retrieve)
        on_path = bufs.retrieve >= 0
        dense[rows[on_path], bufs.retrieve[on_path]] = True
        return TreeTensors(
            parents=parents,
            depth=bufs.depth.to(torch.int64),
            head_row=torch.tensor([len(p) - 1 for p in self.choices], dtype=torch.int64),
            rank=torch.tensor([p[-1] for p in self.choices], dtype=torch.int64),
            mask=bufs.mask,
            dense_mask=dense,
            retrieve=bufs.retrieve,
            paths=bufs.retrieve[bufs.is_leaf].contiguous(),
        )


__all__ = ["MC_SIM_7B_63", "Tree", "TreeTensors"]
