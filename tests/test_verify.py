"""verify_greedy / verify_typical: references on hand-made cases and against a naive loop; kernels against them."""

import math

import pytest
import torch

from mtpkern.ops import _backend
from mtpkern.ops.tree_mask import tree_buffers_ref
from mtpkern.ops.verify import verify_greedy, verify_greedy_ref, verify_typical, verify_typical_ref

from _errors import assert_one_error, errors_of

needs_ext = pytest.mark.skipif(not _backend.HAS_CUDA_EXT, reason="the C++ extension mtpkern._C is not built")
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _backend.HAS_CUDA_EXT),
                               reason="needs a CUDA GPU and the built extension")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Tree 0 -> {1, 2}, 1 -> {3, 4}, 2 -> {5}; node i carries token 10 + i; paths are the leaf rows.
TOKENS = torch.arange(10, 16)
PATHS = torch.tensor([[0, 1, 3], [0, 1, 4], [0, 2, 5]])


def argmax_with(**preds):
    """target_argmax of the hand-made tree: 99 (matches nothing) except the given nodes."""
    out = torch.full((6,), 99)
    for node, tok in preds.items():
        out[int(node[1:])] = tok
    return out


def as_lists(r):
    return [int(r.accept_len), int(r.best_path), int(r.last_node), r.tokens.tolist()]


def naive_verify(tokens, argmax, paths, accepted):
    """The rules as a plain loop; accepted(parent, node) decides one in-range draft."""
    T = len(tokens)
    best, best_n = 0, -1
    for p, row in enumerate(paths):
        n = 0
        while n + 1 < len(row) and 0 <= row[n] < T and 0 <= row[n + 1] < T and accepted(row[n], row[n + 1]):
            n += 1
        if n > best_n:
            best, best_n = p, n
    row = paths[best]
    bonus = argmax[row[best_n]] if 0 <= row[best_n] < T else -1
    out = [tokens[row[j + 1]] for j in range(best_n)] + [bonus]
    return [best_n, best, row[best_n], out + [-1] * (len(row) - len(out))]


def random_case(T, seed, vocab=3):
    """A random tree, a subset of its root-to-node rows as paths, tokens from a tiny vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, T)]
    buf = tree_buffers_ref(torch.tensor(parents), max_depth=T)
    depth = int(buf.depth.max())
    rows = torch.randperm(T, generator=gen)[: max(1, T // 2)]
    paths = buf.retrieve[rows, : depth + 1].contiguous()
    tokens = torch.randint(0, vocab, (T,), generator=gen)
    argmax = torch.randint(0, vocab, (T,), generator=gen)
    prob = torch.rand(T, generator=gen)
    entropy = torch.rand(T, generator=gen) * 4
    return tokens, argmax, prob, entropy, paths


# ---------------------------------------------------------------- greedy reference, hand-made

def test_all_rejected():
    r = verify_greedy_ref(TOKENS, argmax_with(), PATHS)
    assert as_lists(r) == [0, 0, 0, [99, -1, -1]]
    assert all(t.dtype == torch.int64 for t in r) and r.accept_len.shape == ()


def test_full_accept_on_one_row():
    r = verify_greedy_ref(TOKENS, argmax_with(n0=11, n1=14, n4=77), PATHS)
    assert as_lists(r) == [2, 1, 4, [11, 14, 77]]


def test_tie_goes_to_the_smaller_row():
    r = verify_greedy_ref(TOKENS, argmax_with(n0=11, n1=0), PATHS)  # rows 0 and 1 both accept node 1
    assert as_lists(r) == [1, 0, 1, [11, 0, -1]]


def test_padding_is_never_accepted():
    paths = torch.tensor([[0, 2, -1, -1], [0, 1, 3, -1]])
    r = verify_greedy_ref(TOKENS, argmax_with(n0=12, n2=42), paths)
    assert as_lists(r) == [1, 0, 2, [12, 42, -1, -1]]
    r = verify_greedy_ref(TOKENS, argmax_with(n0=11, n1=13, n3=5), paths)
    assert as_lists(r) == [2, 1, 3, [11, 13, 5, -1]]


def test_out_of_range_entries_are_rejected_not_read():
    # A draft at node 100 (or whose parent is 100) is not accepted; a bad root gives bonus -1.
    paths = torch.tensor([[0, 100, 3], [-7, 1, 3]])
    r = verify_greedy_ref(TOKENS, argmax_with(n0=11, n1=13), paths)
    assert as_lists(r) == [0, 0, 0, [11, -1, -1]]
    r = verify_greedy_ref(TOKENS, argmax_with(n0=11), torch.tensor([[-7, 1]]))
    assert as_lists(r) == [0, 0, -7, [-1, -1]]


def test_root_only_paths():
    r = verify_greedy_ref(TOKENS, argmax_with(n0=3), torch.tensor([[0], [0]]))
    assert as_lists(r) == [0, 0, 0, [3]]


# ---------------------------------------------------------------- typical reference, hand-made

def test_typical_threshold():
    # Entropy 0: threshold min(0.09, 0.3) = 0.09. Entropy 5: 0.3 * exp(-5) = 0.0020.
    prob = torch.full((6,), 0.05)
    entropy = torch.zeros(6)
    r = verify_typical_ref(TOKENS, argmax_with(n0=7), prob, entropy, PATHS)
    assert as_lists(r) == [0, 0, 0, [7, -1, -1]]
    entropy[[2, 5]] = 5.0  # confident-enough drafts at nodes 2 and 5
    r = verify_typical_ref(TOKENS, argmax_with(n5=8), prob, entropy, PATHS)
    assert as_lists(r) == [2, 2, 5, [12, 15, 8]]
    r = verify_typical_ref(TOKENS, argmax_with(n3=8), prob, torch.zeros(6), PATHS, epsilon=0.01)
    assert as_lists(r) == [2, 0, 3, [11, 13, 8]]  # epsilon caps the threshold: every draft passes, row 0 wins


# ---------------------------------------------------------------- references against a naive loop

@pytest.mark.parametrize("T,seed", [(1, 0), (2, 1), (7, 2), (64, 3), (97, 4), (64, 5)])
def test_greedy_reference_matches_naive_loop(T, seed):
    tokens, argmax, _, _, paths = random_case(T, seed)
    want = naive_verify(tokens.tolist(), argmax.tolist(), paths.tolist(),
                        lambda parent, node: tokens[node] == argmax[parent])
    assert as_lists(verify_greedy_ref(tokens, argmax, paths)) == want


@pytest.mark.parametrize("T,seed", [(1, 0), (7, 2), (64, 3), (97, 4)])
def test_typical_reference_matches_naive_loop(T, seed):
    tokens, argmax, prob, entropy, paths = random_case(T, seed)
    eps, alpha = 0.3, 0.9  # large enough that both branches of the min decide some drafts
    want = naive_verify(tokens.tolist(), argmax.tolist(), paths.tolist(),
                        lambda parent, node: prob[node] > min(eps, alpha * math.exp(-entropy[node])))
    assert as_lists(verify_typical_ref(tokens, argmax, prob, entropy, paths, eps, alpha)) == want


def test_reference_rejects_bad_input():
    with pytest.raises(ValueError, match="paths"):
        verify_greedy_ref(TOKENS, TOKENS, PATHS[0])
    with pytest.raises(ValueError, match="target_argmax"):
        verify_greedy_ref(TOKENS, TOKENS[:3], PATHS)
    with pytest.raises(TypeError, match="node_prob"):
        verify_typical_ref(TOKENS, TOKENS, torch.zeros(6, dtype=torch.float64), torch.zeros(6), PATHS)


# ---------------------------------------------------------------- a batch of trees: one launch, every row

def _batch(B, T, seed):
    """B rows of one tree shape: different tokens and predictions per row."""
    _, _, _, _, paths = random_case(T, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randint(0, 3, (B, T), generator=gen), torch.randint(0, 3, (B, T), generator=gen),
            torch.rand(B, T, generator=gen), torch.rand(B, T, generator=gen) * 4, paths)


BATCH_BACKENDS = ["eager"] + (["cuda"] if _backend.HAS_CUDA_EXT else [])


@pytest.mark.parametrize("backend", BATCH_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,T,seed", [(1, 7, 0), (5, 64, 1), (33, 97, 2), (4, 1, 3)])
def test_batch_rows_equal_single_trees(backend, device, B, T, seed):
    """[B, T] inputs give, row by row, what each row gives alone (greedy and typical), with a
    leading B on every output; the 1-D tree stays 0-d."""
    tokens, argmax, prob, entropy, paths = (t.to(device) for t in _batch(B, T, seed))
    got = verify_greedy(tokens, argmax, paths, backend=backend)
    assert got.accept_len.shape == (B,) and got.tokens.shape == (B, paths.shape[1])
    for b in range(B):
        assert as_lists(VerifyRow(got, b)) == as_lists(verify_greedy_ref(tokens[b], argmax[b], paths))
    got = verify_typical(tokens, argmax, prob, entropy, paths, epsilon=0.3, alpha=0.9, backend=backend)
    for b in range(B):
        assert as_lists(VerifyRow(got, b)) == as_lists(
            verify_typical_ref(tokens[b], argmax[b], prob[b], entropy[b], paths, 0.3, 0.9))
    assert any(int(a) > 0 for a in got.accept_len) or T == 1  # some drafts pass


def VerifyRow(r, b):
    return type(r)(*(t[b] for t in r))


@needs_ext
def test_batch_opcheck():
    tokens, argmax, prob, entropy, paths = _batch(3, 9, 4)
    torch.library.opcheck(torch.ops.mtpkern.verify_greedy.default, (tokens, argmax, paths))
    torch.library.opcheck(torch.ops.mtpkern.verify_typical.default, (tokens, argmax, prob, entropy, paths, 0.1, 0.3))


# ---------------------------------------------------------------- one exception contract, one NaN contract

BACKENDS = ["eager"] + (["cuda"] if _backend.HAS_CUDA_EXT else [])  # cuda: the C++ kernels (here on CPU)
PROB = torch.full((6,), 0.5)
ENTROPY = torch.zeros(6)


def _greedy_calls(tokens, argmax, paths):
    calls = {b: (lambda b=b: verify_greedy(tokens, argmax, paths, backend=b)) for b in BACKENDS}
    calls["op"] = lambda: torch.ops.mtpkern.verify_greedy(tokens, argmax, paths)
    return calls


def _typical_calls(tokens, argmax, prob, entropy, paths, eps, alpha):
    calls = {b: (lambda b=b: verify_typical(tokens, argmax, prob, entropy, paths, epsilon=eps, alpha=alpha,
                                            backend=b)) for b in BACKENDS}
    calls["op"] = lambda: torch.ops.mtpkern.verify_typical(tokens, argmax, prob, entropy, paths, eps, alpha)
    return calls


@pytest.mark.parametrize("change, error, match", [
    (dict(tokens=TOKENS.int()), TypeError, "tree_tokens must be int64, got int32"),
    (dict(tokens=TOKENS[None, None]), ValueError, "tree_tokens must be 1-D [T] or 2-D [B, T], got shape [1, 1, 6]"),
    (dict(tokens=TOKENS[None]), ValueError, "target_argmax has shape [6] but tree_tokens has shape [1, 6]"),
    (dict(tokens=torch.zeros(0, 6, dtype=torch.long), argmax=torch.zeros(0, 6, dtype=torch.long)),
     ValueError, "the batch is empty (tree_tokens [0, 6])"),
    (dict(tokens=TOKENS[:0], argmax=TOKENS[:0]), ValueError, "the tree has no nodes"),
    (dict(argmax=TOKENS.float()), TypeError, "target_argmax must be int64, got float32"),
    (dict(argmax=torch.arange(12)[::2]), ValueError, "target_argmax must be contiguous"),
    (dict(argmax=TOKENS[:5]), ValueError, "target_argmax has 5 entries but tree_tokens has 6"),
    (dict(paths=PATHS.int()), TypeError, "paths must be int64, got int32"),
    (dict(paths=PATHS[0]), ValueError, "paths must be 2-D [P, max_depth + 1], got shape [3]"),
    (dict(paths=PATHS.t()), ValueError, "paths must be contiguous"),
    (dict(paths=PATHS[:0]), ValueError, "paths must have at least one row and column, got [0, 3]"),
    (dict(paths=PATHS.to("meta")), ValueError, "paths is on meta but the other inputs are on cpu"),
])
def test_greedy_one_error_in_every_backend(change, error, match):
    a = dict(tokens=TOKENS, argmax=argmax_with(n0=11), paths=PATHS) | change
    assert_one_error(errors_of(_greedy_calls(a["tokens"], a["argmax"], a["paths"])), error, match, "verify_greedy")


@pytest.mark.parametrize("change, error, match", [
    (dict(tokens=TOKENS.int()), TypeError, "tree_tokens must be int64, got int32"),
    (dict(prob=PROB.double()), TypeError, "node_prob must be float32, got float64"),
    (dict(entropy=ENTROPY[:5]), ValueError, "node_prob and parent_entropy need one entry per node, tree_tokens' shape [6]"),
    (dict(eps=float("nan")), ValueError, "epsilon must be finite and non-negative, got nan"),
    (dict(eps=-0.5), ValueError, "epsilon must be finite and non-negative, got -0.5"),
    (dict(eps=float("inf")), ValueError, "epsilon must be finite and non-negative, got inf"),
    (dict(alpha=float("nan")), ValueError, "alpha must be finite and non-negative, got nan"),
    (dict(alpha=-1.0), ValueError, "alpha must be finite and non-negative, got -1"),
    (dict(alpha=-float("inf")), ValueError, "alpha must be finite and non-negative, got -inf"),
])
def test_typical_one_error_in_every_backend(change, error, match):
    a = dict(tokens=TOKENS, argmax=argmax_with(n0=11), prob=PROB, entropy=ENTROPY, paths=PATHS,
             eps=0.09, alpha=0.3) | change
    errors = errors_of(_typical_calls(*a.values()))
    assert_one_error(errors, error, match, "verify_typical")


@pytest.mark.parametrize("backend", BACKENDS)
def test_typical_nan_never_accepts(backend):
    """A NaN probability or entropy rejects its draft in every backend (C++'s fminf used to drop
    a NaN threshold and accept)."""
    prob = torch.full((6,), 0.5)
    entropy = torch.zeros(6)
    r = verify_typical(TOKENS, argmax_with(n2=7), prob, entropy, PATHS, backend=backend)
    assert as_lists(r) == [2, 0, 3, [11, 13, 99]]  # every draft passes, row 0 wins
    entropy[[1, 2]] = float("nan")  # nodes 1 and 2: every path's first draft
    r = verify_typical(TOKENS, argmax_with(n0=7), prob, entropy, PATHS, backend=backend)
    assert as_lists(r) == [0, 0, 0, [7, -1, -1]]
    prob[3] = float("nan")
    entropy[[1, 2]] = 0.0
    r = verify_typical(TOKENS, argmax_with(n4=8), prob, entropy, PATHS, backend=backend)
    assert as_lists(r) == [2, 1, 4, [11, 14, 8]]  # node 3 rejected: row 1 wins


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_nan_logits_row_accepts_nothing_below_it(backend):
    """fused_logits gives argmax -1 for a NaN logits row: nothing below that node is accepted,
    and -1 (not a token) is the bonus where that node is the last accepted one."""
    argmax = argmax_with(n0=11, n1=-1, n2=12)
    r = verify_greedy(TOKENS, argmax, PATHS, backend=backend)
    assert as_lists(r) == [1, 0, 1, [11, -1, -1]]


# ---------------------------------------------------------------- the extension's kernels

@needs_ext
@pytest.mark.parametrize("T,seed", [(1, 0), (2, 1), (7, 2), (64, 3), (97, 4), (300, 6)])
def test_cpu_kernels_match_references(T, seed):
    tokens, argmax, prob, entropy, paths = random_case(T, seed)
    paths[0, -1] = -1 if paths.shape[1] > 1 else paths[0, -1]  # some padding
    assert as_lists(verify_greedy(tokens, argmax, paths, backend="cuda")) == as_lists(
        verify_greedy_ref(tokens, argmax, paths))
    got = verify_typical(tokens, argmax, prob, entropy, paths, epsilon=0.3, alpha=0.9, backend="cuda")
    assert as_lists(got) == as_lists(verify_typical_ref(tokens, argmax, prob, entropy, paths, 0.3, 0.9))


@needs_ext
def test_cpu_kernel_on_hand_made_edge_cases():
    cases = [
        (argmax_with(n0=11, n1=0), PATHS),  # tie
        (argmax_with(n0=11, n1=13), torch.tensor([[0, 100, 3], [-7, 1, 3]])),  # out-of-range entries
        (argmax_with(n0=11), torch.tensor([[-7, 1]])),  # bad root: bonus -1
        (argmax_with(n0=3), torch.tensor([[0], [0]])),  # root-only paths
    ]
    for argmax, paths in cases:
        assert as_lists(verify_greedy(TOKENS, argmax, paths, backend="cuda")) == as_lists(
            verify_greedy_ref(TOKENS, argmax, paths))


@needs_ext
def test_boundary_checks():
    g, t = torch.ops.mtpkern.verify_greedy, torch.ops.mtpkern.verify_typical
    prob = torch.rand(6)
    with pytest.raises(TypeError, match="tree_tokens must be int64"):
        g(TOKENS.int(), TOKENS, PATHS)
    with pytest.raises(TypeError, match="paths must be int64"):
        g(TOKENS, TOKENS, PATHS.int())
    with pytest.raises(ValueError, match="paths must be 2-D"):
        g(TOKENS, TOKENS, PATHS[0])
    with pytest.raises(ValueError, match="paths must be contiguous"):
        g(TOKENS, TOKENS, PATHS.t())
    with pytest.raises(ValueError, match="target_argmax has 5"):
        g(TOKENS, TOKENS[:5], PATHS)
    with pytest.raises(ValueError, match="at least one row"):
        g(TOKENS, TOKENS, PATHS[:0])
    with pytest.raises(TypeError, match="node_prob must be float32"):
        t(TOKENS, TOKENS, prob.double(), prob, PATHS, 0.09, 0.3)
    with pytest.raises(ValueError, match="one entry per node"):
        t(TOKENS, TOKENS, prob[:5], prob[:5], PATHS, 0.09, 0.3)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="paths is on cpu"):
            g(TOKENS.cuda(), TOKENS.cuda(), PATHS)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    tokens, argmax, prob, entropy, paths = (x.to(device) for x in random_case(13, 7))
    torch.library.opcheck(torch.ops.mtpkern.verify_greedy, (tokens, argmax, paths))
    torch.library.opcheck(torch.ops.mtpkern.verify_typical, (tokens, argmax, prob, entropy, paths, 0.3, 0.9))


@needs_gpu
@pytest.mark.parametrize("T,seed", [(1, 0), (64, 3), (97, 4), (1000, 8)])
def test_cuda_kernels_match_references(T, seed):
    tokens, argmax, prob, entropy, paths = (x.cuda() for x in random_case(T, seed))
    assert as_lists(verify_greedy(tokens, argmax, paths)) == as_lists(verify_greedy_ref(tokens, argmax, paths))
    got = verify_typical(tokens, argmax, prob, entropy, paths, epsilon=0.3, alpha=0.9)
    assert as_lists(got) == as_lists(verify_typical_ref(tokens, argmax, prob, entropy, paths, 0.3, 0.9))
    bad = torch.tensor([[0, 10**9, -5], [-3, 2, 1]], device="cuda")  # never dereferenced
    assert as_lists(verify_greedy(tokens, argmax, bad)) == as_lists(verify_greedy_ref(tokens, argmax, bad))


@needs_gpu
def test_cuda_graph_replay():
    tokens, argmax, _, _, paths = (x.cuda() for x in random_case(64, 3))
    verify_greedy(tokens, argmax, paths)  # warm up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = verify_greedy(tokens, argmax, paths)
    for seed in range(3):
        new_tokens, new_argmax, _, _, _ = random_case(64, 3 + 100 * seed)
        tokens.copy_(new_tokens)
        argmax.copy_(new_argmax)
        graph.replay()
        assert as_lists(out) == as_lists(verify_greedy_ref(tokens, argmax, paths))
