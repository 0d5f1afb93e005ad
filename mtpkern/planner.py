"""The tree optimiser, pure: an acceptance table (and calibrated continuations) and a step-cost
curve in, a :class:`~mtpkern.tree.Tree` out. No timing, no engine: the curve is measured by
:mod:`mtpkern.costmodel`, the acceptance by :mod:`mtpkern.calibrate`.

:func:`optimise_tree`, :func:`optimise_tree_depths`: for every node budget n (and depth) the
tree with the largest expected accepted length, then the one that maximises expected accepted
length / step time. :class:`StepCost` is the curve: seconds of one decoding step at a few tree
sizes, linear in between.

Why greedy best-first expansion is exact (the argument :func:`best_first_nodes` relies on).
Assumptions: (a) the event "head d's rank-r candidate is the model's own token" has
probability ``accept[d][r]`` given that the path above it was accepted, whatever the ranks on
that path (acceptance depends only on (depth, rank)); (b) every ``accept[d][r]`` lies in
[0, 1]. A node is the path of ranks (r1, ..., rd); its *score* is
``s(r1..rd) = accept[1][r1] * ... * accept[d][rd]``, the probability that its whole path is
accepted. At each depth exactly one token is the model's own, and the candidates of one head
are distinct tokens, so at most one node per depth has its whole path accepted, and the
number of accepted drafts equals the number of nodes whose path is accepted:
``E[accepted length] = 1 + sum of the scores of the tree's nodes`` (the 1 is the model's own
token, always emitted). A tree of n nodes is a prefix-closed set of n paths, so the best tree
of n nodes maximises a sum of node scores under prefix closure. By (b) a child never scores
above its parent; order nodes by (score descending, depth ascending, path ascending), and a
parent always precedes its children. The n first nodes of that order therefore form a
prefix-closed set, and no set of n nodes has a larger sum: they are the best n-node tree, and
best-first expansion from the root (a heap of the frontier) lists them in that order, so every
budget's optimum is a prefix of one list. Monotonicity in rank is not needed (ranks need not
be expanded in order), so noisy estimates are used as measured.

What the assumptions cost: heads err together (a hard position is hard for every head), and
decoding does not visit every position (a step skips the tokens it accepts, so easy stretches
count less than in an average over positions). The calibration therefore also keeps, for
every generated position, the rank of the model's own token in each head's top-k; the
candidates (the best-first trees, one per budget) are then scored by replaying greedy decoding
over those continuations (:func:`simulate_steps`), which is what decoding those prompts with
that tree does, step for step.

Sampled drafts (``acceptance="rejection"``, a calibration's ``sampling`` table). Under recursive
rejection sampling a node's children are drawn without replacement from their head and tried
in turn, so a child is known by its index among its siblings, not by a rank: a tree's node
(i1, ..., id) is the i_d-th child drawn below (i1, ..., i(d-1)), and only trees whose every node
has children 0..m-1 mean what they say (``Tree`` sorts siblings by their last entry, which
sampling then reads as the draw order). ``accept[d][i]`` is the probability that child i from
head d + 1 is accepted below an accepted node (its earlier siblings rejected). Again at most
one child of an accepted node is accepted, so ``E[accepted length] = 1 + sum of the nodes'
scores``, the score a product of ``accept`` along the path of sibling indices, under the same
assumption (a). Best-first expansion is no longer exact: ``accept[d][i]`` need not fall with i
(after a rejection, the residual can fit the head better), so :func:`best_sampled_trees`
solves the problem exactly by dynamic programming: ``F_d(n)``, the best sum of scores of n nodes
below a node whose children come from head d + 1, is the best over m children in draw order and
budgets n_1..n_m with ``sum(1 + n_i) = n`` of ``sum accept[d][i] (1 + F_(d+1)(n_i))``, a
knapsack over the children (O(depth * width * n^2)).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from mtpkern.tree import Tree


@dataclass
class StepCost:
    """Seconds of one decoding step at ``sizes`` tree tokens (1: a next-token step); linear in
    between."""

    sizes: list[int]
    seconds: list[float]
    key: dict = field(default_factory=dict)

    def __post_init__(self):
        check_curve(self.sizes, self.seconds)

    def __call__(self, T: float) -> float:
        s, t = self.sizes, self.seconds
        if not s[0] <= T <= s[-1]:
            raise ValueError(f"step cost is measured for 1..{s[-1]} tree tokens, not {T}")
        for i in range(1, len(s)):
            if T <= s[i]:
                w = (T - s[i - 1]) / (s[i] - s[i - 1])
                return t[i - 1] + w * (t[i] - t[i - 1])
        return t[0]

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]


def check_curve(sizes: Sequence[int], seconds: Sequence[float]) -> None:
    """ValueError unless ``seconds`` holds one finite, positive timing per size and the sizes
    rise strictly from 1 (a next-token step)."""
    if len(sizes) != len(seconds):
        raise ValueError(f"{len(sizes)} sizes but {len(seconds)} timings: a step cost needs one timing per size")
    if not sizes or sizes[0] != 1:
        raise ValueError(f"step cost sizes must start at 1 (a next-token step), got {list(sizes)}")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"step cost sizes must be strictly increasing, got {list(sizes)}")
    bad = next((t for t in seconds if not _positive_seconds(t)), None)
    if bad is not None:
        raise ValueError(f"step cost timings must be finite numbers of seconds > 0, got {bad!r}")


def _positive_seconds(t) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0


def _smooth(seconds: list[float]) -> list[float]:
    """The curve made non-decreasing (each timing at least the one before): it is a cost, and
    timing noise must never favour a bigger tree."""
    out = list(seconds)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1])
    return out


def best_first_nodes(accept: Sequence[Sequence[float]], limit: int) -> list[tuple[tuple[int, ...], float]]:
    """The ``limit`` best nodes of the infinite tree over ``accept`` [depth][rank], best first,
    as (path, score): for every n, the first n form the n-node tree with the largest expected
    accepted length (proof and assumptions in the module docstring). Deterministic: ties go
    to the shallower, then the lexicographically smaller path."""
    for row in accept:
        if any(not 0.0 <= p <= 1.0 for p in row):
            raise ValueError(f"acceptance probabilities must lie in [0, 1], got {list(row)}")
    heap: list[tuple[float, int, tuple[int, ...]]]  # (-score, depth, path)
    heap = [(-p, 1, (r,)) for r, p in enumerate(accept[0])] if accept else []
    heapq.heapify(heap)
    out: list[tuple[tuple[int, ...], float]] = []
    while heap and len(out) < limit:
        neg, depth, path = heapq.heappop(heap)
        out.append((path, -neg))
        if depth < len(accept):
            for r, p in enumerate(accept[depth]):
                heapq.heappush(heap, (neg * p, depth + 1, path + (r,)))
    return out


def simulate_steps(ranks: Sequence[Sequence[str]], tree: Tree | set) -> list[list[int]]:
    """Replay greedy decoding with ``tree`` over calibrated continuations: per prompt, the
    tokens each step emits (accepted drafts + the model's own token). A step at position t
    accepts the deepest tree path equal to the ranks of the model's own tokens at t, and the
    next step starts after them: exactly what decoding those prompts with ``tree`` does (the
    tokens are the model's own greedy ones), except that the last step of a generation may
    also accept drafts past the calibrated end."""
    return _replay(_parse_ranks(ranks), set(tree.choices) if isinstance(tree, Tree) else tree)


def _parse_ranks(ranks) -> list[list[tuple[int, ...]]]:
    return [[tuple(int(c) if c.isdigit() else -1 for c in row) for row in prompt] for prompt in ranks]


def _replay(rows_per_prompt, paths: set) -> list[list[int]]:
    out = []
    for rows in rows_per_prompt:
        steps, t = [], 0
        while t < len(rows):
            a = 0
            while a < len(rows[t]) and rows[t][: a + 1] in paths:
                a += 1
            steps.append(1 + a)
            t += 1 + a
        out.append(steps)
    return out


def _mean_step(steps: list[list[int]]) -> float:
    flat = [a for prompt in steps for a in prompt]
    return sum(flat) / len(flat) if flat else 1.0


def simulated_accept_length(ranks: Sequence[Sequence[str]], tree: Tree) -> float:
    """Mean tokens per step of :func:`simulate_steps`."""
    return _mean_step(simulate_steps(ranks, tree))


@dataclass
class TreePlan:
    """The chosen tree and what the models predict for it."""

    tree: Tree
    expected_accept_length: float  # tokens per step: accepted drafts + the model's own token
    step_time_s: float
    tokens_per_second: float
    ntp_tokens_per_second: float  # 1 / the cost of a one-token step
    curve: list[dict] = field(default_factory=list)  # every budget: nodes, accept length, step s, tok/s

    def to_dict(self) -> dict:
        return dict(tree=[list(p) for p in self.tree.choices], nodes=len(self.tree) - 1,
                    depth=self.tree.max_depth, topk=self.tree.topk,
                    predicted_accept_length=self.expected_accept_length, predicted_step_s=self.step_time_s,
                    predicted_tokens_per_second=self.tokens_per_second,
                    predicted_speedup_vs_ntp=self.tokens_per_second / self.ntp_tokens_per_second)


def max_draft_nodes(model) -> int:
    """The largest node budget the cache allows: one prompt token, the root and the drafts."""
    return model.config.n_positions - 2


def check_budget(max_nodes, limit: int) -> None:
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or not 1 <= max_nodes <= limit:
        raise ValueError(f"max_nodes (draft nodes per step) must be an int in 1..{limit} "
                         f"(the model's context less the root and one prompt token), got {max_nodes!r}")


def optimise_tree(accept: Sequence[Sequence[float]], cost: Callable[[int], float], *, max_tokens: int,
                  ranks: Sequence[Sequence[str]] | None = None, sampled: bool = False) -> TreePlan:
    """The tree maximising expected tokens/s = E[accepted length](n) / cost(n + 1) over node
    budgets n = 1 .. max_tokens - 1 (``cost`` takes the tree tokens T = n + 1, root included).
    Ties go to the smaller tree.

    With ``ranks`` (a calibration's continuations), the candidates are the same best-first
    trees, but each one's accepted length is replayed over those continuations
    (:func:`simulate_steps`) instead of taken from the independence model: decoding visits
    positions unevenly (a step skips what it accepts) and heads err together, which the
    product of averages misses. ``sampled``: ``accept`` is a table of sampled drafts (child
    index, not rank) and every budget's tree is :func:`best_sampled_trees`' (``ranks`` unused:
    they replay greedy decoding)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"max_tokens must be an int >= 2: a tree needs the root and one draft, got {max_tokens!r}")
    if sampled:
        values, tree_of = best_sampled_trees(accept, max_tokens - 1)
    else:
        values, tree_of = _best_first_trees(accept, max_tokens - 1, ranks)
    best: tuple[int, float, float, float] | None = None
    curve = []
    for n, expected in enumerate(values, start=1):
        seconds = _step_seconds(cost, n + 1)
        rate = expected / seconds
        curve.append(dict(nodes=n, accept_length=expected, step_s=seconds, tokens_per_second=rate))
        if best is None or rate > best[3]:
            best = (n, expected, seconds, rate)
    assert best is not None  # values is not empty
    n, expected, seconds, rate = best
    return TreePlan(tree_of(n), expected, seconds, rate, 1.0 / _step_seconds(cost, 1), curve)


def _best_first_trees(accept, limit: int, ranks) -> tuple[list[float], Callable[[int], Tree]]:
    """Expected accepted length of the best n-node tree for n = 1 .. (at most) ``limit``, and
    that tree: the first n best-first nodes (their length replayed over ``ranks`` if given)."""
    nodes = best_first_nodes(accept, limit)
    if not nodes:
        raise ValueError("no draft heads to build a tree from")
    rows = _parse_ranks(ranks) if ranks else None
    expected, values, chosen = 1.0, [], set()
    for path, score in nodes:
        expected += score
        chosen.add(path)
        if rows is not None:
            expected = _mean_step(_replay(rows, chosen))
        values.append(expected)
    return values, lambda n: Tree([list(p) for p, _ in nodes[:n]])


def best_sampled_trees(accept: Sequence[Sequence[float]], limit: int) -> tuple[list[float], Callable[[int], Tree]]:
    """For sampled drafts (``accept[d][i]``: child i from head d + 1 accepted below an accepted
    node): the expected accepted length of the best n-node tree for n = 1 .. (at most)
    ``limit``, and a function giving that tree, each node's children 0..m-1 (the dynamic
    programme of the module docstring; exact for any table). Ties go to fewer children."""
    for row in accept:
        if any(not 0.0 <= p <= 1.0 for p in row):
            raise ValueError(f"acceptance probabilities must lie in [0, 1], got {list(row)}")
    F: list[list[float]] = [[0.0] + [-math.inf] * limit]
    picks: list[list[list[int]]] = []
    widths: list[list[int]] = []
    for row in reversed(accept):  # the deepest head first: F_d needs F_(d+1)
        best, width, pick = _children_knapsack(row, F[0], limit)
        F.insert(0, best)
        picks.insert(0, pick)
        widths.insert(0, width)
    values = [1.0 + v for v in F[0][1:] if v > -math.inf]  # reachable budgets are 1..some n
    if not values:
        raise ValueError("no draft heads to build a tree from")
    return values, lambda n: Tree([list(p) for p in _sampled_paths(picks, widths, 0, n, ())])


def _children_knapsack(row: Sequence[float], below: list[float],
                       limit: int) -> tuple[list[float], list[int], list[list[int]]]:
    """One level of :func:`best_sampled_trees`: with ``below[k]`` the best value of k nodes
    under a child, the best value of n nodes made of children 0..m-1 and their subtrees, for
    every n (``best``), its number of children (``width``), and per child i and n the nodes
    under child i in the best set of children 0..i (``pick[i][n]``)."""
    G = [0.0] + [-math.inf] * limit  # children 0..i-1 placed, exactly n nodes
    best, width = list(G), [0] * (limit + 1)
    pick: list[list[int]] = []
    for i, a in enumerate(row):
        H, choice = [-math.inf] * (limit + 1), [-1] * (limit + 1)
        for n in range(1, limit + 1):
            for k in range(n):  # nodes under child i
                if G[n - 1 - k] > -math.inf and below[k] > -math.inf:
                    v = G[n - 1 - k] + a * (1.0 + below[k])
                    if v > H[n]:
                        H[n], choice[n] = v, k
        pick.append(choice)
        for n in range(1, limit + 1):
            if H[n] > best[n]:
                best[n], width[n] = H[n], i + 1
        G = H
    return best, width, pick


def _sampled_paths(picks, widths, d: int, n: int, prefix: tuple) -> list[tuple[int, ...]]:
    """The paths of the best n nodes below ``prefix`` (a depth-d node), rebuilt from the
    knapsack's choices: the last child takes its share, the earlier ones the rest."""
    out: list[tuple[int, ...]] = []
    rest = n
    for i in reversed(range(widths[d][n] if n else 0)):
        k = picks[d][i][rest]
        out += [prefix + (i,), *_sampled_paths(picks, widths, d + 1, k, prefix + (i,))]
        rest -= 1 + k
    return out


def _step_seconds(cost: Callable[[int], float], T: int) -> float:
    seconds = cost(T)
    if not _positive_seconds(seconds):
        raise ValueError(f"cost({T}) must be a finite number of seconds > 0, got {seconds!r}")
    return seconds


def optimise_tree_depths(accept: Sequence[Sequence[float]], costs: dict, *, max_tokens: int,
                         ranks: Sequence[Sequence[str]] | None = None, sampled: bool = False) -> TreePlan:
    """:func:`optimise_tree` when the step cost depends on the tree's depth too: ``costs[d]``
    is the cost of trees at most d deep. For every d the best trees of depth <= d are the
    best-first nodes of ``accept[:d]`` (``sampled``: :func:`best_sampled_trees`' trees of
    ``accept[:d]``); the best (depth, budget) wins, ties to the shallower."""
    best = None
    for d in sorted(costs):
        T = min(max_tokens, getattr(costs[d], "max_tokens", max_tokens))
        plan = optimise_tree(accept[:d], costs[d], max_tokens=T, ranks=ranks, sampled=sampled)
        if best is None or plan.tokens_per_second > best.tokens_per_second:
            best = plan
    if best is None:
        raise ValueError("no step cost to optimise against")
    return best


__all__ = [
    "StepCost", "TreePlan", "best_first_nodes", "best_sampled_trees", "check_budget", "check_curve", "max_draft_nodes", "optimise_tree",
    "optimise_tree_depths", "simulate_steps", "simulated_accept_length",
]
