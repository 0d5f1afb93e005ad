"""tree_attention against its fp32 reference, and the packed tree-mask format bit by bit.

On CPU the Triton kernel runs in the interpreter (fp32 / fp16, small shapes); bf16, GPT-2
shapes and CUDA-graph replay run on a GPU only.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mtpkern.ops import _backend
from mtpkern.ops.tree_attention import (
    dense_tree_mask,
    pack_tree_mask,
    tree_attention,
    tree_attention_ref,
    unpack_tree_mask,
)

from _errors import assert_one_error, errors_of

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def random_tree(T: int, seed: int = 0) -> torch.Tensor:
    """bool [T, T] ancestor-or-self mask of a random tree whose node i has a parent < i."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        parent = int(torch.randint(0, i, (1,), generator=g))
        mask[i] |= mask[parent]
    return mask


def _inputs(B, H, T, Dh, S, dtype, seed=0, device=DEV):
    """q as the model makes it ([B, T, H, Dh].transpose(1, 2)) and a random cache."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dh, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(B, H, S, Dh, generator=g).to(device, dtype)
    v = torch.randn(B, H, S, Dh, generator=g).to(device, dtype)
    return q, k, v


def dense_mask(prefix: int, tree: torch.Tensor, S: int) -> torch.Tensor:
    """bool [T, S] from the unpacked tree, independently of the op's code: the prefix, then
    the tree's own block, then nothing."""
    T = tree.shape[0]
    mask = torch.zeros(T, S, dtype=torch.bool, device=tree.device)
    mask[:, :prefix] = True
    mask[:, prefix : prefix + T] = tree
    return mask


def _check(q, k, v, prefix: int, tree: torch.Tensor, scale=None):
    """Kernel vs fp32 reference; low precision may err at most twice as much as eager
    attention in the same dtype plus a small atol."""
    packed = pack_tree_mask(tree).to(q.device)
    prefix_len = torch.tensor(prefix, device=q.device)
    out = tree_attention(q, k, v, prefix_len, packed, scale=scale, backend="triton")
    ref = tree_attention_ref(q, k, v, prefix_len, packed, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    if q.dtype == torch.float32:
        tol = ATOL[q.dtype]
    else:
        S, Dh = k.shape[2], q.shape[-1]
        mask = dense_mask(prefix, tree.to(q.device), S)
        scores = (q @ k.transpose(-1, -2)) * (Dh**-0.5 if scale is None else scale)
        eager = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
        tol = 2 * (eager.float() - ref.float()).abs().max().item() + ATOL[q.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0)
    return out


# ----------------------------------------------------------------------------- mask format


def test_hand_written_four_node_tree():
    # 0 is the root; 1 and 2 are its children; 3 is a child of 1.
    tree = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool
    )
    packed = pack_tree_mask(tree)
    assert packed.dtype == torch.int32
    assert packed.tolist() == [[0b0001], [0b0011], [0b0101], [0b1011]]
    for i in range(4):
        for j in range(4):
            assert bool((int(packed[i, 0]) >> j) & 1) == bool(tree[i, j]), (i, j)
    assert torch.equal(unpack_tree_mask(packed, 4), tree)


def test_bit_31_is_the_sign_bit():
    chain = torch.ones(33, 33, dtype=torch.bool).tril()
    packed = pack_tree_mask(chain)
    assert packed.shape == (33, 2)
    assert packed[31].tolist() == [-1, 0]  # 32 bits set: 0xFFFFFFFF as int32
    assert packed[32].tolist() == [-1, 1]
    assert packed[30].tolist() == [2**31 - 1, 0]
    assert torch.equal(unpack_tree_mask(packed, 33), chain)


@pytest.mark.parametrize("T", [1, 5, 31, 32, 33, 64, 65, 100])
def test_pack_unpack_round_trip(T):
    mask = torch.rand(T, T, generator=torch.Generator().manual_seed(T)) < 0.5
    packed = pack_tree_mask(mask)
    assert packed.shape == (T, (T + 31) // 32)
    assert torch.equal(unpack_tree_mask(packed, T), mask)


def test_pack_unpack_bad_input():
    with pytest.raises(ValueError, match="square"):
        pack_tree_mask(torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.bool"):
        pack_tree_mask(torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"\[40, 2\]"):
        unpack_tree_mask(torch.zeros(40, 1, dtype=torch.int32), 40)


def test_reference_matches_sdpa_with_a_dense_mask():
    q, k, v = _inputs(1, 2, 5, 16, 48, torch.float32, device="cpu")
    tree = random_tree(5, seed=1)
    mask = dense_mask(37, tree, 48)
    assert torch.equal(dense_tree_mask(torch.tensor([37]), pack_tree_mask(tree), 48), mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = tree_attention_ref(q, k, v, torch.tensor(37), pack_tree_mask(tree))
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B, H, T, Dh, prefix, S",
    [
        (1, 2, 1, 16, 0, 8),
        (1, 2, 5, 16, 1, 8),
        (2, 3, 5, 32, 37, 48),
        (1, 2, 63, 16, 37, 128),
        (1, 1, 65, 32, 0, 65),
        (1, 1, 7, 64, 100, 120),
    ],
)
def test_matches_reference(B, H, T, Dh, prefix, S, dtype):
    q, k, v = _inputs(B, H, T, Dh, S, dtype, seed=T)
    _check(q, k, v, prefix, random_tree(T, seed=prefix))


def test_general_mask_and_scale():
    # Not a tree: random bits, some rows seeing later tokens, each row seeing itself.
    T = 33
    bits = torch.rand(T, T, generator=torch.Generator().manual_seed(0)) < 0.3
    mask = bits | torch.eye(T, dtype=torch.bool)
    q, k, v = _inputs(1, 2, T, 32, 60, torch.float32)
    _check(q, k, v, 20, mask, scale=0.3)


def test_chain_mask_is_causal_prefill():
    T = 65
    q, k, v = _inputs(1, 2, T, 32, 80, torch.float32, seed=3)
    out = _check(q, k, v, 0, torch.ones(T, T, dtype=torch.bool).tril())
    causal = F.scaled_dot_product_attention(q, k[:, :, :T], v[:, :, :T], is_causal=True)
    torch.testing.assert_close(out, causal, atol=1e-5, rtol=1e-5)


def test_non_contiguous_cache_and_query():
    B, H, T, Dh, S = 1, 2, 5, 16, 40
    g = torch.Generator().manual_seed(6)
    k = torch.randn(B, S, H, Dh, generator=g).to(DEV).transpose(1, 2)  # [B, H, S, Dh] view
    v = torch.randn(B, S, H, Dh, generator=g).to(DEV).transpose(1, 2)
    q = torch.randn(B, H, Dh, T, generator=g).to(DEV).transpose(2, 3)  # Dh not innermost
    _check(q, k, v, 11, random_tree(T, seed=6))


def test_slots_past_the_tree_are_never_read():
    T, prefix, S = 5, 9, 32
    q, k, v = _inputs(1, 2, T, 16, S, torch.float32)
    packed = pack_tree_mask(random_tree(T)).to(DEV)
    prefix_len = torch.tensor(prefix, device=DEV)
    ref = tree_attention_ref(q, k, v, prefix_len, packed)
    k[:, :, prefix + T :] = float("nan")
    v[:, :, prefix + T :] = float("nan")
    out = tree_attention(q, k, v, prefix_len, packed, backend="triton")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(), (1,)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_prefix_len_forms(shape, dtype):
    prefix_len = torch.full(shape, 7, dtype=dtype)
    q, k, v = _inputs(1, 1, 3, 16, 16, torch.float32)
    packed = pack_tree_mask(random_tree(3)).to(DEV)
    out = tree_attention(q, k, v, prefix_len.to(DEV), packed, backend="triton")
    ref = tree_attention_ref(q, k, v, torch.tensor(7, device=DEV), packed)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_output_layout_makes_the_model_reshape_free():
    q, k, v = _inputs(2, 3, 5, 16, 16, torch.float32)
    out = tree_attention(q, k, v, torch.tensor(4, device=DEV), pack_tree_mask(random_tree(5)).to(DEV))
    assert out.shape == (2, 3, 5, 16)
    assert out.transpose(1, 2).is_contiguous()


def test_eager_backend_is_the_reference():
    q, k, v = _inputs(1, 2, 5, 16, 16, torch.float32)
    args = (q, k, v, torch.tensor(3, device=DEV), pack_tree_mask(random_tree(5)).to(DEV))
    assert torch.equal(tree_attention(*args, backend="eager"), tree_attention_ref(*args))


@settings(max_examples=6, deadline=None)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    T=st.integers(1, 40),
    Dh=st.sampled_from([16, 32]),
    prefix=st.integers(0, 50),
    extra=st.integers(0, 10),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(B, H, T, Dh, prefix, extra, seed):
    q, k, v = _inputs(B, H, T, Dh, prefix + T + extra, torch.float32, seed=seed)
    _check(q, k, v, prefix, random_tree(T, seed=seed))


# ----------------------------------------------------------------------------- bad input


def _good(device=DEV):
    q, k, v = _inputs(1, 2, 5, 16, 16, torch.float32, device=device)
    return dict(q=q, k_cache=k, v_cache=v, prefix_len=torch.tensor(3, device=device),
                tree_mask=pack_tree_mask(random_tree(5)).to(device))


def _errors(args, scale=None):
    """The error of each way of calling the op: the public function with each backend, and the
    registered op directly (on CPU tensors also without the interpreter, its eager path)."""
    args = dict(args)
    op_scale = 0.25 if scale is None else scale

    def op():
        return torch.ops.mtpkern.tree_attention(*args.values(), op_scale)

    def op_without_interpreter():
        with pytest.MonkeyPatch.context() as m:
            m.setenv("TRITON_INTERPRET", "0")
            return op()

    calls = {
        "eager": lambda: tree_attention(**args, scale=scale, backend="eager"),
        "triton": lambda: tree_attention(**args, scale=scale, backend="triton"),
        "op": op,
    }
    if args["q"].device.type == "cpu":
        calls["op, no interpreter"] = op_without_interpreter
    if not _backend.triton_usable(args["q"].device):
        del calls["triton"]
    return errors_of(calls)


def _assert_one_error(errors, error, match):
    assert_one_error(errors, error, match, "tree_attention")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {"q": a["q"][0]}, ValueError, "q must be 4-D"),
        (lambda a: {"k_cache": a["k_cache"].half()}, TypeError, "k_cache is float16 but q is float32"),
        (lambda a: {"q": a["q"].int()}, TypeError, "q must be float32, float16 or bfloat16, got int32"),
        (lambda a: {"v_cache": a["v_cache"][:, :, :8]}, ValueError, "differ"),
        (lambda a: {n: a[n][:, :1] for n in ("k_cache", "v_cache")}, ValueError, "does not match"),
        (lambda a: {k: a[k][..., :8] for k in ("q", "k_cache", "v_cache")}, ValueError, "head dim"),
        (lambda a: {"tree_mask": a["tree_mask"][:, :0]}, ValueError, "[5, 1]"),
        (lambda a: {"tree_mask": a["tree_mask"].long()}, TypeError, "tree_mask must be int32"),
        (lambda a: {"prefix_len": torch.tensor(2.7, device=DEV)}, TypeError,
         "prefix_len must be int32 or int64, got float32"),
        (lambda a: {"prefix_len": torch.tensor([3, 4, 5], device=DEV)}, ValueError,
         "prefix_len must be 0-d, [1] or one per batch row [1], got shape [3]"),
        (lambda a: {"prefix_len": torch.tensor([[3, 4]], device=DEV)}, ValueError, "got shape [1, 2]"),
        (lambda a: {"tree_mask": a["tree_mask"].to("meta")}, ValueError, "tree_mask is on"),
    ],
)
def test_bad_inputs(change, error, match):
    args = _good()
    args.update(change(args))
    _assert_one_error(_errors(args), error, match)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_bad_scale(scale):
    _assert_one_error(_errors(_good(), scale=scale), ValueError, "scale must be a finite number")


@pytest.mark.parametrize("prefix", [-1, 12])  # S - T = 11
def test_prefix_len_out_of_range(prefix):
    """The registered op used to read past the cache (values around 1e29 on CPU)."""
    args = _good(device="cpu")
    args["prefix_len"] = torch.tensor(prefix)
    _assert_one_error(_errors(args), ValueError, f"prefix_len = {prefix} out of range: need 0 <= prefix_len <= S - T = 11")


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prefix", [-1, 12, 2**40])
def test_kernel_refuses_out_of_range_prefix_len_with_nan(force_splits, prefix, dtype, splits):
    """What the kernel does with a P no host check saw (a GPU tensor): it reads nothing (2**40
    would read far past the cache) and writes NaN to every row, on both paths (one kernel, and
    the split prefix). The launcher is called directly: the op checks a CPU P on the host."""
    import importlib

    if not _backend.triton_usable(torch.device(DEV)):
        pytest.skip("needs Triton (a GPU or the interpreter)")
    ta = importlib.import_module("mtpkern.ops.tree_attention")
    force_splits(splits)
    args = _good()
    args.update({n: args[n].to(dtype) for n in ("q", "k_cache", "v_cache")})
    args["prefix_len"] = torch.tensor(prefix, device=DEV)
    out = ta._launch(*args.values(), 0.25)
    assert out.shape == args["q"].shape and out.isnan().all()
    args["prefix_len"] = torch.tensor(3, device=DEV)  # the same launch with a good P is finite
    assert ta._launch(*args.values(), 0.25).isfinite().all()


@needs_cuda
@pytest.mark.parametrize("prefix", [-1, 12, 2**40])
def test_cuda_prefix_len_out_of_range_gives_nan(prefix):
    """On a GPU the value is not checked on the host (no sync): the kernel refuses with NaN rows."""
    args = _good()
    args["prefix_len"] = torch.tensor(prefix, device="cuda")
    assert torch.ops.mtpkern.tree_attention(*args.values(), 0.25).isnan().all()


# ----------------------------------------------------------------------------- NaN contract
# Each test runs the Triton kernel both ways: one kernel (splits = 1) and the flash-decoding
# split prefix with 3 splits (see force_splits below).


def _every_backend(q, k, v, prefix, mask):
    args = (q, k, v, torch.tensor(prefix, device=q.device), pack_tree_mask(mask).to(q.device))
    outs = {"eager": tree_attention(*args, backend="eager"), "op": torch.ops.mtpkern.tree_attention(*args, 0.25)}
    if _backend.triton_usable(q.device):
        outs["triton"] = tree_attention(*args, scale=0.25, backend="triton")
    if q.device.type == "cpu":
        with pytest.MonkeyPatch.context() as m:
            m.setenv("TRITON_INTERPRET", "0")
            outs["op, no interpreter"] = torch.ops.mtpkern.tree_attention(*args, 0.25)
    return outs


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nonfinite_v_in_slots_a_row_cannot_see_changes_nothing(force_splits, dtype, bad, splits):
    """NaN / inf in V slots a row cannot see (masked tree slots and slots >= P + T) leave that
    row exactly as with clean values; rows that see the slot become NaN (and so does a row
    that sees a NaN K)."""
    force_splits(splits)
    T, P, S = 5, 3, 16
    q, k, v = _inputs(1, 2, T, 16, S, dtype)
    mask = torch.eye(T, dtype=torch.bool)
    mask[:, 0] = True  # every node sees node 0 (the root); node 3 is seen by node 3 only
    clean = tree_attention_ref(q, k, v, torch.tensor(P, device=DEV), pack_tree_mask(mask).to(DEV))
    v = v.clone()
    v[:, :, P + 3, 1] = bad  # tree node 3
    v[:, :, P + T + 2] = bad  # an unused slot
    k = k.clone()
    k[:, :, P + 2, 0] = float("nan")  # tree node 2's K: masked for every row but row 2
    for name, out in _every_backend(q, k, v, P, mask).items():
        others = [0, 1, 4]
        torch.testing.assert_close(out[:, :, others].float(), clean[:, :, others].float(),
                                   atol=ATOL[dtype], rtol=0, msg=name)
        assert out[:, :, 3].isnan().all(), name  # sees its own non-finite V
        assert out[:, :, 2].isnan().all(), name  # sees its own non-finite K


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_query_row_gives_nan_row(force_splits, dtype, splits):
    force_splits(splits)
    T, P = 6, 20
    q, k, v = _inputs(1, 2, T, 16, 40, dtype)
    mask = random_tree(T)
    clean = tree_attention_ref(q, k, v, torch.tensor(P, device=DEV), pack_tree_mask(mask).to(DEV))
    q = q.clone()
    q[0, 1, 4, 7] = float("nan")
    for name, out in _every_backend(q, k, v, P, mask).items():
        assert out[0, 1, 4].isnan().all(), name
        keep = torch.ones_like(out, dtype=torch.bool)
        keep[0, 1, 4] = False
        torch.testing.assert_close(out[keep].float(), clean[keep].float(), atol=ATOL[dtype], rtol=0, msg=name)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nonfinite_prefix_v_poisons_every_row(force_splits, dtype, splits):
    """Slot 65 is in the second prefix block (with 3 splits: the middle split, which neither
    reads the tree nor merges in the interpreter's program order)."""
    force_splits(splits)
    T, P = 4, 70  # two prefix blocks in the kernel
    q, k, v = _inputs(1, 1, T, 16, 80, dtype)
    v = v.clone()
    v[0, 0, 65, 3] = float("inf")
    for name, out in _every_backend(q, k, v, P, random_tree(T)).items():
        assert out.isnan().all(), name


@pytest.mark.parametrize("splits", [1, 3])
def test_row_that_sees_nothing_is_zeros(force_splits, splits):
    force_splits(splits)
    T = 3
    q, k, v = _inputs(1, 1, T, 16, 8, torch.float32)
    mask = torch.eye(T, dtype=torch.bool)
    mask[1, 1] = False  # an invalid mask: row 1 sees nothing (P = 0)
    for name, out in _every_backend(q, k, v, 0, mask).items():
        assert torch.equal(out[0, 0, 1], torch.zeros(16, device=DEV)), name
        assert out[0, 0, [0, 2]].isfinite().all(), name


def test_opcheck_kernel():
    a = _good()
    args = (a["q"], a["k_cache"], a["v_cache"], a["prefix_len"], a["tree_mask"], 0.25)
    # The interpreter's kernels cannot be traced by AOT dispatch (wrap_triton hands them back
    # unwrapped); on a GPU every check runs.
    utils = None if DEV == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(torch.ops.mtpkern.tree_attention.default, args, **kwargs)


def test_opcheck_cpu_reference_path(monkeypatch):
    # CPU tensors without the interpreter: the op runs the eager reference.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = _good(device="cpu")
    args = (a["q"], a["k_cache"], a["v_cache"], a["prefix_len"], a["tree_mask"], 0.25)
    torch.library.opcheck(torch.ops.mtpkern.tree_attention.default, args)
    ref = tree_attention_ref(*args[:5], scale=0.25)
    torch.testing.assert_close(torch.ops.mtpkern.tree_attention(*args), ref, atol=0, rtol=0)


# ----------------------------------------------------------------------------- GPU only


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "T, Dh, prefix, S",
    [(64, 64, 512, 1024), (64, 64, 2048, 2112), (63, 128, 37, 128), (6, 64, 0, 64), (1024, 64, 0, 1024)],
)
def test_cuda_shapes(T, Dh, prefix, S, dtype):
    q, k, v = _inputs(1, 12, T, Dh, S, dtype, seed=T)
    tree = torch.ones(T, T, dtype=torch.bool).tril() if T > 64 else random_tree(T, seed=prefix)
    _check(q, k, v, prefix, tree)


@needs_cuda
def test_cuda_graph_replay_with_a_new_prefix_len():
    T, S = 64, 1024
    q, k, v = _inputs(1, 12, T, 64, S, torch.float16)
    packed = pack_tree_mask(random_tree(T)).cuda()
    prefix_len = torch.tensor(100, device="cuda")
    tree_attention(q, k, v, prefix_len, packed)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tree_attention(q, k, v, prefix_len, packed)
    for prefix in (512, 0, S - T):
        prefix_len.fill_(prefix)
        graph.replay()
        ref = tree_attention_ref(q, k, v, prefix_len, packed)
        torch.testing.assert_close(out.float(), ref.float(), atol=5e-3, rtol=0)


@needs_cuda
def test_cuda_torch_compile():
    q, k, v = _inputs(1, 12, 64, 64, 1024, torch.float16)
    args = (q, k, v, torch.tensor(512, device="cuda"), pack_tree_mask(random_tree(64)).cuda())
    compiled = torch.compile(tree_attention, fullgraph=True)
    torch.testing.assert_close(compiled(*args), tree_attention(*args), atol=0, rtol=0)


# ----------------------------------------------------------------------------- flash-decoding split


@pytest.fixture
def force_splits(monkeypatch):
    """Run the split-prefix kernel with ``n`` splits (the interpreter otherwise never splits)."""
    import importlib

    ta = importlib.import_module("mtpkern.ops.tree_attention")

    def force(n):
        monkeypatch.setattr(ta, "_prefix_splits", lambda heads, S, T: n)

    return force


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B, H, T, Dh, prefix, S, splits",
    [
        (1, 2, 1, 16, 300, 320, 4),  # decoding: one token over a long prefix
        (1, 2, 1, 16, 0, 8, 3),  # no prefix: every split but the last sees nothing
        (1, 2, 5, 32, 37, 48, 8),  # more splits than prefix blocks
        (2, 3, 17, 16, 130, 160, 3),  # two query blocks, batch 2
        (1, 1, 64, 64, 96, 160, 2),
    ],
)
def test_split_prefix_matches_reference(force_splits, B, H, T, Dh, prefix, S, splits, dtype):
    force_splits(splits)
    q, k, v = _inputs(B, H, T, Dh, S, dtype, seed=T + prefix)
    out = _check(q, k, v, prefix, random_tree(T, seed=prefix))
    from mtpkern.ops._decode_linear import split_counters

    assert not split_counters(q.device, 1).any(), "a split counter was left non-zero"
    packed = pack_tree_mask(random_tree(T, seed=prefix)).to(DEV)
    again = tree_attention(q, k, v, torch.tensor(prefix, device=DEV), packed, backend="triton")
    assert torch.equal(again, out), "the split merge is not deterministic"


def test_split_prefix_non_contiguous_and_row_that_sees_nothing(force_splits):
    force_splits(3)
    B, H, T, Dh, S = 1, 2, 5, 16, 140
    g = torch.Generator().manual_seed(8)
    k = torch.randn(B, S, H, Dh, generator=g).to(DEV).transpose(1, 2)
    v = torch.randn(B, S, H, Dh, generator=g).to(DEV).transpose(1, 2)
    q = torch.randn(B, H, Dh, T, generator=g).to(DEV).transpose(2, 3)
    _check(q, k, v, 100, random_tree(T, seed=8))
    # prefix 0 and a mask row with no bit: that row outputs zeros, like the one-kernel path
    tree = random_tree(T, seed=9)
    tree[2] = False
    out = _check(q, k, v, 0, tree)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))


def test_prefix_splits_on_the_gpu(monkeypatch):
    """The GPU's choice: GPT-2's 12 heads over its 1024-slot context split 8 ways (96 programs
    of >= 128 slots at T = 1), the same for every tree of up to 64 tokens; short caches and
    long prefills never split."""
    import importlib

    ta = importlib.import_module("mtpkern.ops.tree_attention")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ta._prefix_splits(12, 1024, 1) == 8 == ta._prefix_splits(12, 1024, 64)
    assert ta._prefix_splits(12, 255, 1) == 1
    assert ta._prefix_splits(128, 1024, 1) == 1
    assert ta._prefix_splits(12, 1024, 65) == 1


@needs_cuda
def test_cuda_reference_makes_no_host_sync():
    """The eager reference is what the kernel is timed against: on a GPU it must not sync."""
    args = _good(device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = tree_attention_ref(**args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, tree_attention_ref(**_good(device="cpu")).cuda(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- a prefix length per batch row


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 5, 33])
def test_a_prefix_length_per_batch_row(dtype, T):
    """Rows of a batch at different prefix lengths (one of them 0), one call: each row as the
    same call on that row alone with its own prefix length; both kernels (split and not)."""
    import importlib

    ta = importlib.import_module("mtpkern.ops.tree_attention")  # the package re-exports the function's name
    B, H, Dh, S = 3, 2, 16, 70
    q, k, v = _inputs(B, H, T, Dh, S, dtype, seed=T)
    packed = pack_tree_mask(random_tree(T, seed=T)).to(DEV)
    prefixes = torch.tensor([9, 0, S - T], device=DEV)
    ref = tree_attention_ref(q, k, v, prefixes, packed)
    for b in range(B):
        alone = tree_attention_ref(q[b:b + 1], k[b:b + 1], v[b:b + 1], prefixes[b], packed)
        assert torch.equal(ref[b:b + 1], alone), b
    for splits in (1, 3):
        ta_splits = ta._prefix_splits
        ta._prefix_splits = lambda *a, n=splits: n
        try:
            out = tree_attention(q, k, v, prefixes, packed, backend="triton")
        finally:
            ta._prefix_splits = ta_splits
        torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[dtype], rtol=1e-3 if dtype != torch.float32 else 0)
    bad = torch.tensor([9, 0, S - T + 1])  # row 2's tree would end past the cache
    with pytest.raises(ValueError, match=rf"prefix_len = {S - T + 1} out of range: .* \(batch row 2\)"):
        tree_attention_ref(q.cpu(), k.cpu(), v.cpu(), bad, packed.cpu())
