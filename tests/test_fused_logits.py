"""fused_logits against its fp32 reference: top-k, argmax, lse, entropy and target logit.

On CPU the Triton kernels run in the interpreter (fp32 / fp16, small shapes plus one GPT-2
vocabulary); bf16 and the large shapes run on a GPU only.
"""

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtpkern.ops.fused_logits import LogitsStats, fused_logits, fused_logits_ref, logits_stats

from _errors import assert_one_error, errors_of

# the module itself (mtpkern.ops re-exports the function under the module's name)
fl_mod = importlib.import_module("mtpkern.ops.fused_logits")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = 1e-3  # small absolute slack on top of the low-precision rule below


def _inputs(R, V, D, dtype, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(R, D, generator=g) / D**0.25
    weight = torch.randn(V, D, generator=g) / D**0.25
    return hidden.to(device, dtype), weight.to(device, dtype)


def _max_err(a: LogitsStats, b: LogitsStats) -> float:
    return max(
        (x - y).abs().max().item()
        for x, y in ((a.topk_values, b.topk_values), (a.lse, b.lse), (a.entropy, b.entropy))
    )


def assert_stats_close(out: LogitsStats, ref: LogitsStats, z: torch.Tensor, tol: float):
    """``out`` matches ``ref`` (both from logits ``z`` [R, V] in fp32) to within ``tol``.

    Indices are checked through the logits they pick, so near-ties that swap under rounding
    do not fail the test, while a wrong index does.
    """
    R, k = ref.topk_indices.shape
    assert out.topk_values.shape == (R, k) and out.topk_values.dtype == torch.float32
    assert out.topk_indices.shape == (R, k) and out.topk_indices.dtype == torch.int64
    for name in ("argmax", "lse", "entropy", "target_logit"):
        assert getattr(out, name).shape == (R,), name
    kw = dict(atol=tol, rtol=0, equal_nan=True)
    torch.testing.assert_close(out.topk_values, ref.topk_values, **kw, msg=lambda m: f"topk_values: {m}")
    picked = z.gather(1, out.topk_indices)
    torch.testing.assert_close(picked, ref.topk_values, **kw, msg=lambda m: f"logits at topk_indices: {m}")
    assert all(len(set(row.tolist())) == k for row in out.topk_indices), "repeated top-k index"
    assert torch.equal(out.argmax, out.topk_indices[:, 0])
    torch.testing.assert_close(out.lse, ref.lse, **kw, msg=lambda m: f"lse: {m}")
    torch.testing.assert_close(out.entropy, ref.entropy, **kw, msg=lambda m: f"entropy: {m}")
    torch.testing.assert_close(out.target_logit, ref.target_logit, **kw, msg=lambda m: f"target_logit: {m}")


def _check(hidden, weight, k, target=None, scale=1.0):
    """Kernel vs fp32 reference; low precision may err at most twice as much as eager PyTorch
    in the same dtype (logits materialised in that dtype) plus ATOL."""
    out = fused_logits(hidden, weight, k, target, scale=scale, backend="triton")
    ref = fused_logits_ref(hidden, weight, k, target, scale=scale)
    z = scale * (hidden.float() @ weight.float().T)
    if hidden.dtype == torch.float32:
        tol = 1e-4 * max(1.0, z.abs().max().item())
    else:
        eager = logits_stats((hidden @ weight.T).float() * scale, k, target)
        tol = 2 * _max_err(eager, ref) + ATOL
    assert_stats_close(out, ref, z, tol)
    return out, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "R, V, D, k",
    [(1, 97, 32, 1), (3, 97, 48, 5), (6, 300, 64, 10), (64, 257, 16, 10), (6, 3000, 16, 64)],
)
def test_matches_reference(R, V, D, k, dtype):
    hidden, weight = _inputs(R, V, D, dtype)
    target = torch.randint(-1, V, (R,), generator=torch.Generator().manual_seed(1)).to(DEV)
    _check(hidden, weight, k, target, scale=0.7)


def test_gpt2_vocabulary():
    hidden, weight = _inputs(6, 50257, 16, torch.float32, seed=2)
    target = torch.tensor([0, 50256, -1, 12345, 7, -1], device=DEV)
    _check(hidden, weight, 10, target)


def test_merge_in_several_steps(monkeypatch):
    # Few candidate keys per merge step: the running top-k and lse merge across steps.
    monkeypatch.setattr(fl_mod, "_MERGE_KEYS", 16)
    hidden, weight = _inputs(3, 5000, 16, torch.float32, seed=3)
    assert fl_mod._config(3, 5000, 10)["NB"] > fl_mod._config(3, 5000, 10)["BLOCK_B"]
    _check(hidden, weight, 10, torch.tensor([4999, 0, 2500], device=DEV))


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_hidden(layout):
    R, V, D = 6, 200, 32
    _, weight = _inputs(R, V, D, torch.float32)
    base = torch.randn(D, R, device=DEV) if layout == "transposed" else torch.randn(R, 2 * D, device=DEV)
    hidden = base.T if layout == "transposed" else base[:, ::2]
    assert not hidden.is_contiguous()
    _check(hidden, weight, 5)


def test_ties_resolve_to_the_first_index():
    # Small integers: exact logits with many ties. argmax must be the first maximum (like
    # torch.argmax) and equal values in the top-k come in increasing index order.
    g = torch.Generator().manual_seed(4)
    hidden = torch.randint(-2, 3, (5, 8), generator=g).float().to(DEV)
    weight = torch.randint(-2, 3, (300, 8), generator=g).float().to(DEV)
    weight[[17, 150, 299]] = 3.0  # an exact three-way tie for the first rows' maximum
    hidden[:2] = 1.0
    out = fused_logits(hidden, weight, 10, backend="triton")
    z = hidden @ weight.T
    assert torch.equal(out.argmax, z.argmax(dim=-1))
    assert out.topk_indices[:2, :3].tolist() == [[17, 150, 299]] * 2
    values, order = torch.sort(z, dim=-1, descending=True, stable=True)
    assert torch.equal(out.topk_values, values[:, :10])
    assert torch.equal(out.topk_indices, order[:, :10])


def test_target_logit_and_probability():
    R, V, D = 4, 97, 32
    hidden, weight = _inputs(R, V, D, torch.float32, seed=5)
    out = fused_logits(hidden, weight, 3, None, backend="triton")
    assert out.target_logit.isnan().all()
    target = torch.tensor([5, -1, V, 96], device=DEV)  # -1 and V are no target: NaN
    out = fused_logits(hidden, weight, 3, target, backend="triton")
    assert out.target_logit.isnan().tolist() == [False, True, True, False]
    p = torch.softmax(hidden @ weight.T, dim=-1)
    torch.testing.assert_close((out.target_logit - out.lse).exp()[[0, 3]], p[[0, 3], [5, 96]])


def test_eager_backend_is_the_reference():
    hidden, weight = _inputs(3, 97, 16, torch.float32)
    out = fused_logits(hidden, weight, 4, backend="eager")
    ref = fused_logits_ref(hidden, weight, 4)
    for a, b in zip(out, ref):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


@settings(max_examples=6, deadline=None)
@given(
    R=st.integers(1, 8),
    V=st.integers(1, 400),
    D=st.integers(1, 40),
    k=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(R, V, D, k, seed):
    hidden, weight = _inputs(R, V, D, torch.float32, seed=seed)
    target = torch.randint(-1, V, (R,), generator=torch.Generator().manual_seed(seed)).to(DEV)
    _check(hidden, weight, min(k, V), target, scale=0.5)


def _errors(hidden, weight, k, target=None, scale=1.0):
    """The error of each way of calling the op: the public function with each backend, and the
    registered op directly (the Triton path, and on CPU tensors without the interpreter its
    eager path)."""
    calls = {
        "eager": lambda: fused_logits(hidden, weight, k, target, scale=scale, backend="eager"),
        "triton": lambda: fused_logits(hidden, weight, k, target, scale=scale, backend="triton"),
        "op": lambda: torch.ops.mtpkern.fused_logits(hidden, weight, k, target, scale),
    }
    if not fl_mod._backend.triton_usable(hidden.device):
        del calls["triton"]
    return errors_of(calls)


def _assert_one_error(errors, error, match):
    assert_one_error(errors, error, match, "fused_logits")


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda h, w: (h, w.half()), TypeError, "weight is float16 but hidden is float32"),
        (lambda h, w: (h.int(), w.int()), TypeError, "hidden must be float32, float16 or bfloat16, got int32"),
        (lambda h, w: (h[None], w), ValueError, "hidden must be 2-D"),
        (lambda h, w: (h, w[:, :-1]), ValueError, "disagree on D"),
        (lambda h, w: (h[:0], w), ValueError, "empty input"),
        (lambda h, w: (h, w.to("meta")), ValueError, "weight is on"),
    ],
)
def test_bad_tensors(make, error, match):
    hidden, weight = make(*_inputs(3, 97, 16, torch.float32))
    _assert_one_error(_errors(hidden, weight, 5), error, match)


@pytest.mark.parametrize("k", [0, 65, 98, 2.0])
def test_bad_k(k):
    hidden, weight = _inputs(3, 97, 16, torch.float32)
    if isinstance(k, float):  # the op's schema takes an int: only the public function sees a float
        with pytest.raises(ValueError, match="fused_logits: k must be"):
            fused_logits(hidden, weight, k)
        return
    _assert_one_error(_errors(hidden, weight, k), ValueError, "k must be an int in [1, min(64, V=97)]")


def test_k_above_the_vocabulary_is_refused_by_the_op():
    """torch.ops.mtpkern.fused_logits with k > V used to return indices outside the vocabulary."""
    hidden, weight = _inputs(2, 5, 16, torch.float32)
    _assert_one_error(_errors(hidden, weight, 8), ValueError, "got 8")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_bad_scale(scale):
    hidden, weight = _inputs(3, 97, 16, torch.float32)
    _assert_one_error(_errors(hidden, weight, 5, scale=scale), ValueError, "scale must be a finite number")


@pytest.mark.parametrize(
    "target, error, match",
    [
        (torch.zeros(3), TypeError, "target must be int32 or int64, got float32"),
        (torch.zeros(4, dtype=torch.long), ValueError, "target must have shape"),
        (torch.zeros(3, dtype=torch.long, device="meta"), ValueError, "target is on"),
    ],
)
def test_bad_target(target, error, match):
    hidden, weight = _inputs(3, 97, 16, torch.float32, device="cpu")
    _assert_one_error(_errors(hidden, weight, 5, target), error, match)


# ----------------------------------------------------------------------------- NaN contract


def _every_backend(hidden, weight, k, target=None):
    outs = {"eager": fused_logits(hidden, weight, k, target, backend="eager")}
    if fl_mod._backend.triton_usable(hidden.device):
        outs["triton"] = fused_logits(hidden, weight, k, target, backend="triton")
    return outs


@pytest.mark.parametrize("V", [97, 2500])  # one and several V blocks (the NaN's block merged in)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_weight_row_poisons_every_row_not_argmax(V, dtype):
    """A NaN weight row makes every row's logits hold a NaN: NaN stats and -1 indices, never
    the NaN's column as a valid-looking argmax (torch.argmax would pick it)."""
    hidden, weight = _inputs(4, V, 16, dtype)
    weight[V // 3] = float("nan")
    target = torch.tensor([0, 1, V // 3, V - 1], device=hidden.device)
    for name, out in _every_backend(hidden, weight, 5, target).items():
        assert torch.equal(out.argmax, torch.full_like(out.argmax, -1)), name
        assert (out.topk_indices == -1).all(), name
        for field in ("topk_values", "lse", "entropy", "target_logit"):
            assert getattr(out, field).isnan().all(), (name, field)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_hidden_row_poisons_only_that_row(dtype):
    hidden, weight = _inputs(3, 2500, 16, dtype)
    hidden[1, 4] = float("nan")
    target = torch.tensor([5, 6, 7], device=hidden.device)
    clean = fused_logits_ref(hidden[[0, 2]], weight, 5, target[[0, 2]])
    for name, out in _every_backend(hidden, weight, 5, target).items():
        assert out.argmax[1] == -1 and (out.topk_indices[1] == -1).all(), name
        assert out.lse[1].isnan() and out.entropy[1].isnan() and out.target_logit[1].isnan(), name
        assert out.topk_values[1].isnan().all(), name
        assert torch.equal(out.argmax[[0, 2]], clean.argmax), name
        assert torch.equal(out.topk_indices[[0, 2]], clean.topk_indices), name
        assert out.lse[[0, 2]].isfinite().all() and out.target_logit[[0, 2]].isfinite().all(), name


@pytest.mark.parametrize("V", [97, 2500])
def test_all_zero_logits_give_argmax_zero(V):
    """Zero hidden rows: every logit is 0 (or -0.0), and argmax is index 0 in every backend,
    as documented; lse = entropy = log V."""
    hidden, weight = _inputs(2, V, 16, torch.float32)
    hidden.zero_()
    for name, out in _every_backend(hidden, weight, 4).items():
        assert torch.equal(out.argmax, torch.zeros_like(out.argmax)), name
        assert torch.equal(out.topk_values, torch.zeros_like(out.topk_values)), name
        if name == "triton":  # its ties go to the lower index (torch.topk leaves tie order open)
            assert torch.equal(out.topk_indices, torch.arange(4, device=hidden.device).expand(2, 4))
        torch.testing.assert_close(out.lse, torch.full_like(out.lse, math.log(V)))
        torch.testing.assert_close(out.entropy, torch.full_like(out.entropy, math.log(V)))


def test_opcheck_kernel():
    hidden, weight = _inputs(3, 97, 32, torch.float32)
    target = torch.tensor([1, 0, 96], device=DEV)  # valid targets: NaN never compares equal
    # The interpreter's kernels cannot be traced by AOT dispatch (wrap_triton hands them back
    # unwrapped); on a GPU every check runs.
    utils = None if DEV == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(torch.ops.mtpkern.fused_logits.default, (hidden, weight, 5, target, 0.5), **kwargs)


def test_opcheck_cpu_reference_path(monkeypatch):
    # CPU tensors without the interpreter: the op runs the eager reference.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight = _inputs(3, 97, 32, torch.float32, device="cpu")
    target = torch.tensor([1, 0, 96])
    args = (hidden, weight, 5, target, 0.5)
    torch.library.opcheck(torch.ops.mtpkern.fused_logits.default, args)
    ref = fused_logits_ref(hidden, weight, 5, target, scale=0.5)
    for a, b in zip(torch.ops.mtpkern.fused_logits(*args), ref):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- GPU only


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("R", [1, 6, 64, 128])
def test_cuda_gpt2_shapes(R, dtype):
    hidden, weight = _inputs(R, 50257, 768, dtype, seed=R)
    target = torch.randint(-1, 50257, (R,), device="cuda")
    _check(hidden, weight, 10, target)
    _check(hidden, weight, 64)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_small(dtype):
    hidden, weight = _inputs(3, 97, 48, dtype)
    _check(hidden, weight, 5, torch.tensor([3, -1, 96], device="cuda"))


@needs_cuda
def test_cuda_graph_replay():
    hidden, weight = _inputs(6, 50257, 768, torch.float16)
    static_h = hidden.clone()
    fused_logits(static_h, weight, 10)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_logits(static_h, weight, 10)
    new_h, _ = _inputs(6, 50257, 768, torch.float16, seed=9)
    static_h.copy_(new_h)
    graph.replay()
    ref = fused_logits(new_h, weight, 10)
    assert torch.equal(out.topk_indices, ref.topk_indices)
    torch.testing.assert_close(out.lse, ref.lse)


@needs_cuda
def test_cuda_torch_compile():
    hidden, weight = _inputs(6, 50257, 768, torch.float16)
    compiled = torch.compile(lambda h, w: fused_logits(h, w, 10), fullgraph=True)
    out, ref = compiled(hidden, weight), fused_logits(hidden, weight, 10)
    assert torch.equal(out.topk_indices, ref.topk_indices)
    torch.testing.assert_close(out.entropy, ref.entropy)


# ----------------------------------------------------------------------------- final LayerNorm prologue


def _norm(D, dtype, seed=7, device=DEV):
    g = torch.Generator().manual_seed(seed)
    return ((1 + 0.3 * torch.randn(D, generator=g)).to(device, dtype), (0.2 * torch.randn(D, generator=g)).to(device, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("R, V, D, k", [(1, 97, 32, 1), (5, 300, 48, 5), (17, 257, 40, 10), (70, 130, 16, 3)])
def test_norm_prologue_matches_layer_norm_then_logits(R, V, D, k, dtype):
    """fused_logits(h, W, norm=(g, b)) == the stats of LayerNorm(h) @ W.T: the model's final norm
    folded into the kernel, over awkward R and D (not multiples of the blocks), off-centre rows."""
    hidden, weight = _inputs(R, V, D, dtype)
    hidden = (hidden.float() * 3 + 1.5).to(dtype)  # a mean and scale for the norm to remove
    g, b = _norm(D, dtype)
    target = torch.randint(-1, V, (R,), generator=torch.Generator().manual_seed(1)).to(DEV)
    out = fused_logits(hidden, weight, k, target, norm_weight=g, norm_bias=b, eps=1e-5, backend="triton")
    ref = fused_logits_ref(hidden, weight, k, target, norm_weight=g, norm_bias=b, eps=1e-5)
    normed = torch.nn.functional.layer_norm(hidden.float(), (D,), g.float(), b.float(), 1e-5)
    z = normed.to(dtype).float() @ weight.float().T
    if dtype == torch.float32:
        tol = 1e-4 * max(1.0, z.abs().max().item())
    else:  # eager fp16: LayerNorm in fp16, then the fp16 matmul
        eager_h = torch.nn.functional.layer_norm(hidden, (D,), g, b, 1e-5)
        tol = 2 * _max_err(logits_stats((eager_h @ weight.T).float(), k, target), ref) + ATOL
    assert_stats_close(out, ref, z, tol)


def test_norm_prologue_non_contiguous_hidden():
    hidden, weight = _inputs(6, 97, 32, torch.float32)
    wide = torch.zeros(6, 64, device=DEV)
    wide[:, ::2] = hidden
    g, b = _norm(32, torch.float32)
    out = fused_logits(wide[:, ::2], weight, 4, norm_weight=g, norm_bias=b, backend="triton")
    ref = fused_logits_ref(hidden, weight, 4, norm_weight=g, norm_bias=b)
    torch.testing.assert_close(out.topk_values, ref.topk_values, atol=1e-4, rtol=0)
    assert torch.equal(out.argmax, ref.argmax)


@pytest.mark.parametrize("kw, error, match", [
    (lambda g, b: dict(norm_weight=g), ValueError, "norm_weight and norm_bias come together"),
    (lambda g, b: dict(norm_weight=g[:-1], norm_bias=b[:-1]), ValueError, r"norm_weight must have shape \[D\] = \[32\]"),
    (lambda g, b: dict(norm_weight=g.double(), norm_bias=b.double()), TypeError, "norm_weight is float64"),
    (lambda g, b: dict(norm_weight=g, norm_bias=b, eps=0.0), ValueError, "eps must be a finite number > 0"),
    (lambda g, b: dict(norm_weight=g, norm_bias=b, eps=float("nan")), ValueError, "eps must be a finite number > 0"),
])
def test_norm_bad_inputs(kw, error, match):
    hidden, weight = _inputs(3, 97, 32, torch.float32)
    g, b = _norm(32, torch.float32)
    with pytest.raises(error, match=match):
        fused_logits(hidden, weight, 4, **kw(g, b))
    with pytest.raises(error, match=match):  # the registered op checks them itself
        torch.ops.mtpkern.fused_logits(hidden, weight, 4, None, 1.0, **kw(g, b))


@pytest.mark.parametrize("half", ["norm_weight", "norm_bias"])
def test_norm_reference_refuses_half_a_norm(half):
    """The eager reference names a LayerNorm given without its weight or bias (it failed on
    ``None.float()`` before, or dropped a lone bias)."""
    hidden, weight = _inputs(3, 97, 32, torch.float32)
    g, b = _norm(32, torch.float32)
    with pytest.raises(ValueError, match="norm_weight and norm_bias come together"):
        fused_logits_ref(hidden, weight, 4, **{half: g if half == "norm_weight" else b})


def test_norm_opcheck():
    hidden, weight = _inputs(3, 97, 32, torch.float32)
    g, b = _norm(32, torch.float32)
    target = torch.tensor([1, 0, 96], device=DEV)  # no target gives NaN target logits, never equal to themselves
    utils = None if DEV == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(torch.ops.mtpkern.fused_logits.default, (hidden, weight, 5, target, 1.0, g, b, 1e-5),
                          **kwargs)
