"""verify_rejection (mtpkern/ops/verify_sampled.py): recursive rejection sampling on trees.

Exactness: a tiny explicit "model" (a fixed table of target distributions per context over a
small vocabulary) decodes with sampled tree drafts, and the joint distribution of the first two
emitted tokens is compared by chi-square (tests/test_rejection_sampling.py's helpers) with the
model's own, computed exactly; the same samples are shown far from a wrong answer.
"""

import pytest
import torch

from mtpkern.ops.verify_sampled import verify_rejection, verify_rejection_ref
from mtpkern.sampling import sample_tree_drafts, sampling_probs
from mtpkern.tree import Tree
from tests.test_rejection_sampling import assert_differs, assert_matches

V = 5


def table(ctx, temperature, top_k=0, top_p=1.0):
    """p(. | ctx) of the tiny model: fixed logits per context, then the sampling transforms."""
    g = torch.Generator().manual_seed(hash(tuple(ctx)) % 2**31)
    logits = torch.randn(V, generator=g) * 1.5
    return sampling_probs(logits[None], temperature, top_k, top_p)[0]


def exact_pair(ctx, **kw):
    p1 = table(ctx, **kw)
    return torch.stack([p1[a] * table(ctx + [a], **kw) for a in range(V)])


def step(tree, ctxs, heads, g, bias=0.0, **kw):
    """One decoding step for each context: sampled drafts, then verify_rejection; the emitted tokens."""
    B, T = len(ctxs), len(tree)
    par = tree.parents
    depth = tree.tensors().depth.tolist()
    q = torch.stack([heads(c) for c in ctxs])  # [B, D, V]
    toks = sample_tree_drafts(q, par, depth, g)
    p = torch.empty(B, T, V)
    for b, c in enumerate(ctxs):
        for t in range(T):
            path = tree.tensors().retrieve[t].tolist()[1:depth[t] + 1]
            p[b, t] = table(c + [int(toks[b, n]) for n in path], **kw)
    if bias:  # an injected bias: 5 points of probability moved onto token 0 at every node
        p = (1 - bias) * p
        p[..., 0] += bias
    row = (tree.tensors().depth - 1).clamp_min(0)
    res = verify_rejection(toks, p, q, row, tree.tensors().parents, tree.max_depth, generator=g)
    return [r[: int(n)] for r, n in zip(res.tokens.tolist(), res.n_emitted)]


def sample_pairs(tree, heads, n, seed, bias=0.0, **kw):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V)
    outs = step(tree, [[1, 2]] * n, heads, g, bias, **kw)
    short = [i for i, o in enumerate(outs) if len(o) == 1]
    more = step(tree, [[1, 2, outs[i][0]] for i in short], heads, g, bias, **kw) if short else []
    for i, extra in zip(short, more):
        outs[i] = outs[i] + extra
    for o in outs:
        counts[o[0], o[1]] += 1
    return counts


N = 12000
CASES = [  # (sampling transforms, heads): good heads are close to p, poor ones are uniform-ish
    (dict(temperature=0.7, top_k=4, top_p=1.0), "good"),
    (dict(temperature=1.0, top_k=0, top_p=0.9), "poor"),
]


def heads_for(kind, kw):
    if kind == "good":
        return lambda c: torch.stack([table(c, **kw), table(c + [0], **kw)])
    return lambda c: sampling_probs(torch.tensor([[0.3, 0.0, -0.2, 0.1, 0.4], [0.0, 0.5, 0.0, -0.5, 0.2]]), 1.0)


@pytest.mark.parametrize("kw,kind", CASES)
def test_tree_rejection_sampling_is_exact(kw, kind):
    tree = Tree.from_widths([3, 2])  # width 3, depth 2
    counts = sample_pairs(tree, heads_for(kind, kw), N, 0, **kw)
    exact = exact_pair([1, 2], **kw)
    assert_matches(counts, exact, f"(t1, t2), {kind} heads")
    # Power: the same number of samples from a rule that moves 5 points of probability
    # onto one token fails.
    biased = sample_pairs(tree, heads_for(kind, kw), N, 1, bias=0.05, **kw)
    assert_differs(biased, exact, f"(t1, t2), {kind} heads, 5 points moved onto token 0")


def test_backends_and_edges():
    tree = Tree.from_widths([3])
    p = torch.tensor([[0.5, 0.5, 0.0]] * 4)
    q = torch.tensor([[0.0, 0.0, 1.0]])
    toks = torch.tensor([0, 2, 1, 0])
    res = verify_rejection_ref(toks, p, q, torch.zeros(4, dtype=torch.int64), tree.tensors().parents,
                               torch.rand(4), 1)
    # the only proposed draft (token 2) has no target mass: rejected; 1 and 0 were never proposed
    assert int(res.accept_len) == 0 and int(res.tokens[0]) in (0, 1) and int(res.n_emitted) == 1


def _inputs(B, T=4, V=3):
    tree = Tree.from_widths([T - 1]) if T > 1 else Tree([])
    lead = (B,) if B else ()
    g = torch.Generator().manual_seed(B + T + V)
    p = torch.softmax(torch.randn(lead + (T, V), generator=g), -1)
    q = torch.softmax(torch.randn(lead + (1, V), generator=g), -1)
    toks = torch.randint(0, V, lead + (T,), generator=g)
    u = torch.rand(lead + (T,), generator=g)
    return toks, p, q, torch.zeros(T, dtype=torch.int64), tree.tensors().parents, u, tree.max_depth


@pytest.mark.parametrize("B,T,V", [(0, 1, 1), (0, 4, 3), (5, 4, 97), (1, 1, 3), (5, 6, 1)])
def test_op_batch_and_single_rows_agree(B, T, V):
    args = _inputs(B, T, V)
    res = verify_rejection_ref(*args)
    op = torch.ops.mtpkern.verify_rejection(*args)
    for a, b in zip(res, op):
        assert torch.equal(a, b)
    if B:
        for b in range(B):
            row = verify_rejection_ref(args[0][b], args[1][b], args[2][b], *args[3:5], args[5][b], args[6])
            assert [int(row.accept_len), row.tokens.tolist()] == [int(res.accept_len[b]), res.tokens[b].tolist()]
    assert torch.equal(res.n_emitted, res.accept_len + 1)
    assert ((res.tokens >= 0) & (res.tokens < V)).sum(-1).eq(res.n_emitted).all()


@pytest.mark.parametrize("i,bad,kind", [
    (0, torch.zeros(4, dtype=torch.int32), TypeError),
    (1, torch.ones(4, 3, dtype=torch.float64), TypeError),
    (1, torch.ones(3, 3), ValueError),
    (2, torch.ones(1, 2), ValueError),
    (4, torch.zeros(3, dtype=torch.int64), ValueError),
    (5, torch.rand(3), ValueError),
    (6, -1, ValueError),
])
def test_input_checks_are_one_line_errors(i, bad, kind):
    args = list(_inputs(0))
    args[i] = bad
    with pytest.raises(kind) as err:
        verify_rejection_ref(*args)
    assert "\n" not in str(err.value) and str(err.value).startswith("verify_rejection: ")
