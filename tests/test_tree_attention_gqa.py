"""tree_attention_gqa (grouped-query tree attention, the Llama family's) and
tree_attention_gqa_proj (the same with the output projection, bias and residual) against their fp32
reference and against eager SDPA with ``enable_gqa`` over a dense mask, in the interpreter on
CPU (fp32 / fp16): head dims 8 and 64, query / KV heads 4/2, 9/3 and 4/4, T = 1, 3, 7 tree
tokens after prefixes of 0, 5 and 33 slots, batch 1 and 3 (a prefix length per row), the
flash-decoding split, and one program per KV head (each KV head read once for its query heads).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from _fused import DEV, check_close, rand
from mtpkern.ops.linear_residual import linear_residual_ref
from mtpkern.ops.tree_attention import (
    dense_tree_mask, pack_tree_mask, tree_attention_gqa, tree_attention_gqa_proj, tree_attention_gqa_proj_ref,
    tree_attention_gqa_ref,
)

ta = importlib.import_module("mtpkern.ops.tree_attention")
HEADS = [(8, 4, 2), (64, 9, 3), (8, 4, 4)]  # (Dh, H, H_kv)
S = 48


def _tree(T: int) -> torch.Tensor:
    """A tree of T nodes: node i's parent is (i - 1) // 2; each node sees its ancestors and itself."""
    mask = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        mask[i] |= mask[(i - 1) // 2]
    return mask


def _inputs(B, T, Dh, H, Hk, dtype, prefix, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = rand(g, B, T, H, Dh, dtype=dtype).transpose(1, 2)  # the model's view of rms_qkv_rope's output
    k, v = rand(g, B, Hk, S, Dh, scale=1.5, dtype=dtype), rand(g, B, Hk, S, Dh, dtype=dtype)
    return dict(q=q, k_cache=k, v_cache=v, prefix_len=torch.as_tensor(prefix, device=DEV),
                tree_mask=pack_tree_mask(_tree(T)).to(DEV))


def _eager(a):
    """The eager model's attention in the inputs' dtype: SDPA, grouped heads, a dense mask."""
    visible = dense_tree_mask(a["prefix_len"], a["tree_mask"], S)
    visible = visible[:, None] if visible.dim() == 3 else visible
    return F.scaled_dot_product_attention(a["q"], a["k_cache"], a["v_cache"], attn_mask=visible,
                                          enable_gqa=a["q"].shape[1] != a["k_cache"].shape[1])


def _check(a):
    out = tree_attention_gqa(**a, backend="triton")
    ref = tree_attention_gqa_ref(**a)
    check_close(out, ref, None if a["q"].dtype == torch.float32 else _eager(a), "attention")
    if a["q"].dtype == torch.float32:  # the reference is eager's maths
        check_close(_eager(a), ref, what="eager SDPA vs the reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prefix", [0, 5, 33])
@pytest.mark.parametrize("T", [1, 3, 7])
@pytest.mark.parametrize("Dh, H, Hk", HEADS)
def test_matches_reference(Dh, H, Hk, T, prefix, dtype):
    _check(_inputs(1, T, Dh, H, Hk, dtype, prefix, seed=Dh + T + prefix))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Dh, H, Hk", HEADS)
def test_batch_rows_with_their_own_prefix(Dh, H, Hk, dtype):
    _check(_inputs(3, 7, Dh, H, Hk, dtype, [0, 5, 33], seed=Dh))


@pytest.mark.parametrize("splits", [2, 3])
def test_flash_decoding_splits(monkeypatch, splits):
    """The prefix split over several programs per KV head (the GPU's path at T = 1), merged in
    split order."""
    monkeypatch.setattr(ta, "_prefix_splits", lambda heads, S, T: splits)
    for Dh, H, Hk in HEADS:
        for B, prefix in ((1, 33), (3, [0, 5, 33])):
            _check(_inputs(B, 3, Dh, H, Hk, torch.float32, prefix, seed=splits))


def test_one_program_per_kv_head(monkeypatch):
    """9 query heads over 3 KV heads: the grid has B * 3 programs per token block, each reading
    its KV head's tiles once for its 3 query heads, where one program per query head would
    read every KV head 3 times."""
    if DEV == "cuda":
        pytest.skip("records the interpreter's launches")
    grids = []
    real = ta.wrap_triton

    def recording(kernel):
        launcher = real(kernel)
        return lambda grid: (grids.append(grid), launcher[grid])[1]

    class Recorder:
        def __init__(self, kernel):
            self.kernel = recording(kernel)

        def __getitem__(self, grid):
            return self.kernel(grid)

    monkeypatch.setattr(ta, "wrap_triton", Recorder)
    _check(_inputs(2, 3, 64, 9, 3, torch.float32, [4, 20]))
    assert grids == [(1, 2 * 3)], grids


def _proj_inputs(a, bias: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, T, Dh = a["q"].shape
    N, dtype = 24, a["q"].dtype
    return dict(weight=rand(g, N, H * Dh, scale=(H * Dh) ** -0.5, dtype=dtype),
                bias=rand(g, N, scale=0.3, dtype=dtype) if bias else None, residual=rand(g, B, T, N, dtype=dtype))


def _check_proj(a, p):
    out = tree_attention_gqa_proj(**a, **p, backend="triton")
    ref = tree_attention_gqa_proj_ref(**a, **p)
    eager = None
    if a["q"].dtype != torch.float32:  # eager's attention, its output projection and residual in fp16
        B, H, T, Dh = a["q"].shape
        y = _eager(a).transpose(1, 2).reshape(B, T, H * Dh)
        eager = p["residual"] + torch.nn.functional.linear(y, p["weight"], p["bias"])
    check_close(out, ref, eager, "projected attention")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T, prefix", [(1, 0), (3, 5), (7, 33), (20, 5)])
@pytest.mark.parametrize("Dh, H, Hk", HEADS)
def test_proj_matches_reference(Dh, H, Hk, T, prefix, bias, dtype):
    """T = 20 with 2 and 3 query heads per KV head: several row blocks (4 tokens each)."""
    a = _inputs(1, T, Dh, H, Hk, dtype, prefix, seed=T)
    _check_proj(a, _proj_inputs(a, bias, seed=Dh))


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("Dh, H, Hk", HEADS)
def test_proj_batches_and_splits(monkeypatch, splits, Dh, H, Hk):
    """Batch rows at their own prefixes, the prefix split or not: the projection's last KV-head
    program of each row block sums every query head; the reference is the attention then
    linear_residual's reference."""
    monkeypatch.setattr(ta, "_prefix_splits", lambda heads, S, T: splits)
    a = _inputs(3, 7, Dh, H, Hk, torch.float32, [0, 5, 33], seed=splits)
    p = _proj_inputs(a, True)
    _check_proj(a, p)
    B, _, T, _ = a["q"].shape
    two = linear_residual_ref(tree_attention_gqa_ref(**a).transpose(1, 2).reshape(B, T, H * Dh), **p)
    check_close(tree_attention_gqa_proj_ref(**a, **p), two, what="reference = attention then projection")


def test_nan_contract():
    """A non-finite V in a slot a row cannot see changes nothing; one it sees makes it NaN."""
    a = _inputs(1, 3, 8, 4, 2, torch.float32, 5)
    a["v_cache"][0, 1, 30] = float("nan")  # past the tree: nobody sees it
    a["v_cache"][0, 0, 6] = float("inf")  # tree node 1 (slot 5 + 1), seen by node 1 only (node 2's parent is 0)
    out = tree_attention_gqa(**a, backend="triton")
    assert out[0, :2, 1].isnan().all() and out[0, 2:].isfinite().all() and out[0, :, [0, 2]].isfinite().all()
    check_close(out.nan_to_num(), tree_attention_gqa_ref(**a).nan_to_num())


@pytest.mark.parametrize("change, error, match", [
    (lambda a: {"k_cache": a["k_cache"][:, :, :, :4], "v_cache": a["v_cache"][:, :, :, :4]}, ValueError,
     "with H a multiple of H_kv"),
    (lambda a: {"q": a["q"][:, :3]}, ValueError, "with H a multiple of H_kv"),
    (lambda a: {"q": torch.zeros(1, 4, 3, 130), "k_cache": torch.zeros(1, 2, S, 130),
                "v_cache": torch.zeros(1, 2, S, 130)}, ValueError, "head dim must be 1 to 128, got 130"),
    (lambda a: {"prefix_len": torch.tensor(S - 2)}, ValueError, "prefix_len = 46 out of range"),
    (lambda a: {"k_cache": a["k_cache"].half()}, TypeError, "k_cache is float16 but q is float32"),
])
@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_bad_inputs(change, error, match, backend):
    a = {k: v.cpu() for k, v in _inputs(1, 3, 8, 4, 2, torch.float32, 5).items()}
    a.update(change(a))
    with pytest.raises(error, match=match):
        tree_attention_gqa(**a, backend=backend if DEV == "cpu" or backend == "eager" else None)
    if backend == "triton":  # the registered op checks its own inputs
        with pytest.raises(error, match=match):
            torch.ops.mtpkern.tree_attention_gqa(*a.values(), 0.5)


def test_proj_bad_inputs():
    a = {k: v.cpu() for k, v in _inputs(1, 3, 8, 4, 2, torch.float32, 5).items()}
    p = {k: v.cpu() for k, v in _proj_inputs(a, True).items()}
    for change, match in ((dict(weight=p["weight"][:, :16]), r"weight must be \[N, H \* Dh\] = \[N, 32\]"),
                          (dict(bias=p["bias"][:5]), r"bias must have shape \[24\]"),
                          (dict(residual=p["residual"][:, :2]), r"residual must be \[B, T, N\]")):
        args = {**p, **change}
        for call in (lambda: tree_attention_gqa_proj(**a, **args, backend="triton" if DEV == "cpu" else None),
                     lambda: tree_attention_gqa_proj(**a, **args, backend="eager"),
                     lambda: torch.ops.mtpkern.tree_attention_gqa_proj(*a.values(), 0.5, *args.values())):
            with pytest.raises(ValueError, match=match):
                call()


def test_opcheck():
    a = _inputs(1, 3, 8, 4, 2, torch.float32, 5)
    kwargs = {} if DEV == "cuda" else {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
    torch.library.opcheck(torch.ops.mtpkern.tree_attention_gqa.default, (*a.values(), 8**-0.5), **kwargs)
    p = _proj_inputs(a, False)
    torch.library.opcheck(torch.ops.mtpkern.tree_attention_gqa_proj.default, (*a.values(), 8**-0.5, *p.values()),
                          **kwargs)
