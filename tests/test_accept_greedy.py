"""accept_greedy: a greedy step's verification from head 0's hidden states in one call. The
reference against logits + argmax + verify_greedy built by hand, the C++ CPU kernel against the
reference over awkward shapes, dtypes, layouts and trees, NaN rows, ties, one error per bad input."""

import pytest
import torch

from mtpkern.ops import _backend
from mtpkern.ops.tree_mask import tree_buffers_ref
from mtpkern.ops.verify import accept_greedy, accept_greedy_ref, verify_greedy_ref

from _errors import assert_one_error, errors_of

needs_ext = pytest.mark.skipif(not _backend.HAS_CUDA_EXT, reason="the C++ extension mtpkern._C is not built")
BACKENDS = ["eager"] + (["cuda"] if _backend.HAS_CUDA_EXT else [])  # cuda: the C++ kernel (here on CPU)


def case(T: int, V: int, D: int, seed: int, dtype=torch.float32, chain: bool = False, match: float = 0.7):
    """hidden [T, D], weight [V, D], a random tree's tokens and paths, the drafts equal to the
    fp32 argmax of their parent with probability ``match`` (so accept lengths vary)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g).to(dtype)
    weight = torch.randn(V, D, generator=g).to(dtype)
    parents = [-1] + [i - 1 if chain else int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)]
    buf = tree_buffers_ref(torch.tensor(parents), max_depth=T)
    paths = buf.retrieve[:, : int(buf.depth.max()) + 1].contiguous()
    target = (hidden.float() @ weight.float().T).argmax(-1)
    tokens = torch.randint(0, V, (T,), generator=g)
    keep = torch.rand(T, generator=g) < match
    for i in range(1, T):
        if keep[i]:
            tokens[i] = target[parents[i]]
    return hidden, weight, tokens, paths


def by_hand(hidden, weight, tokens, paths):
    z = hidden.float() @ weight.float().T
    target = torch.where(z.isnan().any(-1), -1, z.argmax(-1))
    r = verify_greedy_ref(tokens, target, paths)
    n = int(r.accept_len)
    return [n + 1] + r.tokens.tolist(), r.tokens[n].item(), int(r.last_node), int(r.best_path)


def as_lists(res):
    return res.out.tolist(), res.root.item(), int(res.last_node), int(res.best_path)


def test_hand_made_chain():
    hidden = torch.eye(3)  # node i's argmax is token i (weight = identity over 3 tokens)
    weight = torch.eye(3)
    paths = torch.tensor([[0, 1, 2]])
    # node 1 carries token 0 = argmax at node 0 (accepted); node 2 carries 2 != argmax at node 1 (= 1)
    res = accept_greedy_ref(hidden, weight, torch.tensor([2, 0, 2]), paths)
    assert as_lists(res) == ([2, 0, 1, -1], 1, 1, 0)


@pytest.mark.parametrize("T, V, D, seed, chain", [
    (1, 1, 1, 0, True), (1, 7, 3, 1, True), (2, 5, 4, 2, True), (5, 966, 128, 3, True), (5, 966, 128, 4, False),
    (17, 2051, 37, 5, False), (64, 300, 64, 6, False), (29, 3, 9, 7, False),
])
def test_reference_is_logits_argmax_and_verify(T, V, D, seed, chain):
    args = case(T, V, D, seed, chain=chain)
    assert as_lists(accept_greedy_ref(*args)) == by_hand(*args)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, V, D, seed, chain", [
    (1, 1, 1, 0, True), (1, 7, 3, 1, True), (2, 5, 4, 2, True), (5, 966, 128, 3, True), (5, 966, 128, 4, False),
    (17, 2051, 37, 5, False), (64, 300, 64, 6, False), (29, 3, 9, 7, False),
])
def test_cpu_kernel_matches_the_reference(dtype, T, V, D, seed, chain):
    """fp32 logits from any input dtype: the kernel and the reference see the same float32 logits
    (the product of the inputs converted to float32), so their argmax and results are equal."""
    args = case(T, V, D, seed, dtype=dtype, chain=chain)
    assert as_lists(accept_greedy(*args, backend="cuda")) == as_lists(accept_greedy_ref(*args))


@needs_ext
def test_weight_layouts_and_a_float32_weight_for_half_states():
    hidden, weight, tokens, paths = case(9, 500, 48, 11)
    want = as_lists(accept_greedy_ref(hidden, weight, tokens, paths))
    transposed_copy = weight.t().contiguous().t()  # the decoder's kept unembedding, [V, D] view of [D, V]
    assert as_lists(accept_greedy(hidden, transposed_copy, tokens, paths, backend="cuda")) == want
    sliced = torch.randn(500, 96)[:, ::2]
    sliced.copy_(weight)
    assert as_lists(accept_greedy(hidden, sliced, tokens, paths, backend="cuda")) == want
    h16 = hidden.half()
    assert (as_lists(accept_greedy(h16, weight, tokens, paths, backend="cuda"))
            == as_lists(accept_greedy_ref(h16, weight, tokens, paths)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_has_no_argmax_and_inf_is_a_value(backend):
    hidden, weight, tokens, paths = case(6, 40, 8, 12, chain=True, match=1.0)
    z = hidden @ weight.T
    assert as_lists(accept_greedy(hidden, weight, tokens, paths, backend=backend))[0][0] == 6  # all accepted
    hidden[2, 0] = float("nan")  # node 2's logits are NaN: its child (node 3) is rejected, bonus -1
    out, root, last, _ = as_lists(accept_greedy(hidden, weight, tokens, paths, backend=backend))
    assert out[:4] == [3, tokens[1].item(), tokens[2].item(), -1] and root == -1 and last == 2
    weight2 = torch.cat([weight, torch.zeros(1, 8)])
    hidden2 = hidden.clone()
    hidden2[2] = 1.0
    weight2[-1, 0] = float("inf")  # an infinite logit is a maximum like any other
    res = accept_greedy(hidden2, weight2, tokens, paths, backend=backend)
    assert res.out.tolist()[3] == 40 and int(res.last_node) == 2
    del z


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_first_maximum(backend):
    weight = torch.tensor([[0.0], [2.0], [2.0], [1.0]])
    res = accept_greedy(torch.ones(1, 1), weight, torch.tensor([3]), torch.zeros(1, 1, dtype=torch.long),
                        backend=backend)
    assert res.out.tolist() == [1, 1] and res.root.tolist() == [1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_path_entries_are_never_read(backend):
    hidden, weight, tokens, _ = case(4, 20, 8, 13, chain=True, match=1.0)
    paths = torch.tensor([[0, 1, 99, 2], [0, -5, 1, 2], [0, 1, 2, -1]])
    assert as_lists(accept_greedy(hidden, weight, tokens, paths, backend=backend)) == by_hand(
        hidden, weight, tokens, paths)


H, W, TOK, PATHS = torch.randn(3, 4), torch.randn(10, 4), torch.tensor([1, 2, 3]), torch.tensor([[0, 1, 2]])


def _calls(hidden, weight, tokens, paths):
    calls = {b: (lambda b=b: accept_greedy(hidden, weight, tokens, paths, backend=b)) for b in BACKENDS}
    calls["op"] = lambda: torch.ops.mtpkern.accept_greedy(hidden, weight, tokens, paths)
    return calls


@pytest.mark.parametrize("change, error, match", [
    (dict(hidden=H[0]), ValueError, "hidden must be 2-D [T, D], got shape [4]"),
    (dict(hidden=H.long()), TypeError, "hidden must be float32, float16 or bfloat16, got int64"),
    (dict(weight=W[None]), ValueError, "weight must be 2-D [V, D], got shape [1, 10, 4]"),
    (dict(weight=W.double()), TypeError, "weight must be float32, float16 or bfloat16, got float64"),
    (dict(weight=W[:, :3]), ValueError, "weight has 3 columns but hidden has D = 4"),
    (dict(weight=W[:0]), ValueError, "weight has no rows (an empty vocabulary)"),
    (dict(tokens=TOK.int()), TypeError, "tree_tokens must be int64, got int32"),
    (dict(tokens=TOK[None]), ValueError, "tree_tokens must be 1-D, got shape [1, 3]"),
    (dict(tokens=torch.arange(6)[::2]), ValueError, "tree_tokens must be contiguous"),
    (dict(hidden=H[:0], tokens=TOK[:0]), ValueError, "the tree has no nodes"),
    (dict(tokens=TOK[:2]), ValueError, "tree_tokens has 2 entries but hidden has 3 rows"),
    (dict(paths=PATHS.int()), TypeError, "paths must be int64, got int32"),
    (dict(paths=PATHS[0]), ValueError, "paths must be 2-D [P, max_depth + 1], got shape [3]"),
    (dict(paths=PATHS[:0]), ValueError, "paths must have at least one row and column, got [0, 3]"),
    (dict(paths=torch.tensor([[0, 1], [0, 2]]).t()), ValueError, "paths must be contiguous"),
    (dict(weight=W.to("meta")), ValueError, "weight is on meta but the other inputs are on cpu"),
    (dict(paths=PATHS.to("meta")), ValueError, "paths is on meta but the other inputs are on cpu"),
])
def test_one_error_in_every_backend(change, error, match):
    a = dict(hidden=H, weight=W, tokens=TOK, paths=PATHS) | change
    assert_one_error(errors_of(_calls(a["hidden"], a["weight"], a["tokens"], a["paths"])), error, match,
                     "accept_greedy")


@needs_ext
def test_opcheck_and_fake_tensors():
    args = case(7, 50, 16, 14)
    torch.library.opcheck(torch.ops.mtpkern.accept_greedy.default, args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in args]
        out = torch.ops.mtpkern.accept_greedy(*fake)
        assert [tuple(t.shape) for t in out] == [(1 + args[3].shape[1],), (1,), (), ()]
        with pytest.raises(ValueError, match="tree_tokens has 6 entries but hidden has 7 rows"):
            torch.ops.mtpkern.accept_greedy(fake[0], fake[1], fake[2][:6], fake[3])
