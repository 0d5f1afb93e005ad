"""tree_attention_proj (tree attention with the output projection, its bias and the residual in
one kernel) against its fp32 reference: every T of the decode path, prefixes up to the cache's
end, prefix lengths per batch row, the split-prefix kernel, non-contiguous inputs, the NaN
contract, bad inputs and the registration. On CPU the kernel runs in Triton's interpreter (fp32
and fp16); bf16 and GPT-2 shapes run on a GPU."""

import importlib

import pytest
import torch

from _errors import assert_one_error, errors_of
from _fused import DEV, T_VALUES, check_close, strided, transposed
from mtpkern.ops.tree_attention import pack_tree_mask, tree_attention_proj, tree_attention_proj_ref

ta = importlib.import_module("mtpkern.ops.tree_attention")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_tree(T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        mask[i] |= mask[int(torch.randint(0, i, (1,), generator=g))]
    return mask


def _inputs(B, H, T, Dh, S, N, dtype, prefix, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0: (s * torch.randn(*shape, generator=g)).to(DEV, dtype)  # noqa: E731
    C = H * Dh
    return dict(
        q=r(B, T, H, Dh).transpose(1, 2), k_cache=r(B, H, S, Dh), v_cache=r(B, H, S, Dh),
        prefix_len=torch.as_tensor(prefix, device=DEV), tree_mask=pack_tree_mask(random_tree(T, seed)).to(DEV),
        weight=r(N, C, s=C ** -0.5), bias=r(N, s=0.1), residual=r(B, T, N),
    )


def _eager(a: dict) -> torch.Tensor:
    """The eager model's computation in the inputs' dtype: SDPA over the dense mask, then the
    projection and the residual add (what low precision's tolerance is measured against)."""
    q, k, v = a["q"], a["k_cache"], a["v_cache"]
    B, H, T, Dh = q.shape
    visible = ta.dense_tree_mask(a["prefix_len"], a["tree_mask"], k.shape[2])
    visible = visible[:, None] if visible.dim() == 3 else visible
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    return a["residual"] + torch.nn.functional.linear(y.transpose(1, 2).reshape(B, T, H * Dh), a["weight"], a["bias"])


def _check(a: dict, what: str = ""):
    out = tree_attention_proj(**a, backend="triton")
    ref = tree_attention_proj_ref(**a)
    assert out.dtype == a["q"].dtype
    check_close(out, ref, None if out.dtype == torch.float32 else _eager(a), what)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", T_VALUES)
def test_every_tree_size_to_the_end_of_the_cache(dtype, T):
    S = 160
    a = _inputs(1, 2, T, 16, S, 40, dtype, prefix=S - T, seed=T)  # the last tree slot is the cache's last
    _check(a, f"T={T}")
    _check(dict(a, prefix_len=torch.tensor(0, device=DEV)), f"T={T} P=0")


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B, H, T, Dh, S, N", [(2, 3, 5, 32, 96, 24), (3, 2, 17, 16, 128, 70), (1, 4, 1, 64, 64, 33)])
def test_batches_with_a_prefix_per_row_and_split_prefixes(monkeypatch, splits, dtype, B, H, T, Dh, S, N):
    monkeypatch.setattr(ta, "_prefix_splits", lambda heads, S, T: splits)
    prefix = torch.tensor([S - T - 3 * b for b in range(B)]) if B > 1 else torch.tensor(S - T)
    _check(_inputs(B, H, T, Dh, S, N, dtype, prefix), f"B={B} splits={splits}")


def test_non_contiguous_residual_weight_and_query():
    a = _inputs(2, 2, 5, 16, 64, 48, torch.float32, prefix=torch.tensor([40, 11]))
    plain = tree_attention_proj(**a, backend="triton")
    odd = dict(a, residual=strided(a["residual"]), weight=transposed(a["weight"]),
               q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)[..., :].clone().transpose(2, 3).contiguous().transpose(2, 3))
    assert not odd["q"].is_contiguous() and not odd["weight"].is_contiguous()
    torch.testing.assert_close(tree_attention_proj(**odd, backend="triton"), plain, atol=1e-6, rtol=0)
    check_close(plain, tree_attention_proj_ref(**a))


def test_equals_tree_attention_then_linear_residual():
    """The op is the two ops it replaces (``Block.fused_decode``'s earlier path)."""
    from mtpkern.ops import linear_residual, tree_attention

    a = _inputs(2, 4, 6, 16, 80, 64, torch.float32, prefix=torch.tensor([50, 9]))
    y = tree_attention(a["q"], a["k_cache"], a["v_cache"], a["prefix_len"], a["tree_mask"], backend="triton")
    B, H, T, Dh = a["q"].shape
    two = linear_residual(y.transpose(1, 2).reshape(B, T, H * Dh), a["weight"], a["bias"], a["residual"],
                          backend="triton")
    check_close(tree_attention_proj(**a, backend="triton"), two)


@pytest.mark.parametrize("splits", [1, 3])
def test_nan_contract(monkeypatch, splits):
    """A row whose attention is NaN (its query, or a non-finite V it sees) is NaN after the
    projection; the other rows are not touched; an out-of-range prefix length on the kernel
    path gives NaN rows, never values read past the cache."""
    monkeypatch.setattr(ta, "_prefix_splits", lambda heads, S, T: splits)
    a = _inputs(1, 2, 4, 16, 64, 24, torch.float32, prefix=30)
    a["q"] = a["q"].clone()
    a["q"][0, 1, 2] = float("nan")  # head 1's query of token 2
    out = tree_attention_proj(**a, backend="triton")
    assert out[0, 2].isnan().all() and out[0, [0, 1, 3]].isfinite().all()
    check_close(out[0, [0, 1, 3]], tree_attention_proj_ref(**a)[0, [0, 1, 3]])
    b = _inputs(1, 2, 4, 16, 64, 24, torch.float32, prefix=30)
    b["v_cache"][0, 0, 50] = float("inf")  # a slot past the tree: no row sees it
    assert tree_attention_proj(**b, backend="triton").isfinite().all()


def test_counters_are_reset_between_calls(monkeypatch):
    """The heads' last-arriving program resets its row block's counter: calls in a row (and
    with the split kernel's counters in front of them) give the same result."""
    monkeypatch.setattr(ta, "_prefix_splits", lambda heads, S, T: 2)
    a = _inputs(2, 3, 3, 16, 64, 20, torch.float32, prefix=torch.tensor([20, 33]))
    first = tree_attention_proj(**a, backend="triton")
    for _ in range(2):
        torch.testing.assert_close(tree_attention_proj(**a, backend="triton"), first, atol=0, rtol=0)


def _good(device=DEV):
    return _inputs(1, 2, 5, 16, 32, 24, torch.float32, prefix=8, seed=1) if device == DEV else {
        k: v.cpu() for k, v in _inputs(1, 2, 5, 16, 32, 24, torch.float32, prefix=8, seed=1).items()}


def _errors(a: dict) -> dict:
    calls = {
        "op": lambda: torch.ops.mtpkern.tree_attention_proj(a["q"], a["k_cache"], a["v_cache"], a["prefix_len"],
                                                            a["tree_mask"], 0.25, a["weight"], a["bias"],
                                                            a["residual"]),
        "triton": lambda: tree_attention_proj(**a, backend="triton"),
        "eager": lambda: tree_attention_proj(**a, backend="eager"),
    }
    return errors_of(calls)


@pytest.mark.parametrize("change, error, match", [
    (lambda a: {"weight": a["weight"][:, :-1]}, ValueError, "weight must be [N, H * Dh] = [N, 32]"),
    (lambda a: {"weight": a["weight"][0]}, ValueError, "weight must be 2-D"),
    (lambda a: {"bias": a["bias"][:-1]}, ValueError, "bias must have shape [24]"),
    (lambda a: {"residual": a["residual"][:, :-1]}, ValueError, "residual must be [B, T, N] = [1, 5, 24]"),
    (lambda a: {"residual": a["residual"].half()}, TypeError, "residual is float16 but q is float32"),
    (lambda a: {"weight": a["weight"].to("meta")}, ValueError, "weight is on meta"),
    (lambda a: {"weight": a["weight"][:0], "bias": a["bias"][:0], "residual": a["residual"][..., :0]}, ValueError,
     "weight has no output rows (N = 0)"),
])
def test_bad_inputs(change, error, match):
    a = _good()
    a.update(change(a))
    assert_one_error(_errors(a), error, match, "tree_attention_proj")


def test_the_attentions_own_checks_apply():
    a = _good()
    a["tree_mask"] = a["tree_mask"].long()
    errors = _errors(a)
    assert len(set(errors.values())) == 1 and "tree_mask must be int32" in next(iter(errors.values()))[1]


def test_opcheck():
    a = _good()
    args = (a["q"], a["k_cache"], a["v_cache"], a["prefix_len"], a["tree_mask"], 0.25, a["weight"], a["bias"],
            a["residual"])
    utils = None if DEV == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.mtpkern.tree_attention_proj.default, args,
                          **({} if utils is None else {"test_utils": utils}))


def test_opcheck_cpu_reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = _good(device="cpu")
    args = (a["q"], a["k_cache"], a["v_cache"], a["prefix_len"], a["tree_mask"], 0.25, a["weight"], a["bias"],
            a["residual"])
    torch.library.opcheck(torch.ops.mtpkern.tree_attention_proj.default, args)
    ref = tree_attention_proj_ref(*args[:5], *args[6:], scale=0.25)
    torch.testing.assert_close(torch.ops.mtpkern.tree_attention_proj(*args), ref, atol=0, rtol=0)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 16, 64, 128])
def test_gpt2_shapes_on_the_gpu(dtype, T):
    """GPT-2's layer (12 heads of 64, width 768) over a 1024-slot cache: at T <= 64 the prefix
    is split over programs (flash-decoding), at 128 it is not."""
    a = _inputs(1, 12, T, 64, 1024, 768, dtype, prefix=1024 - T - 5)
    _check(a, f"T={T}")
