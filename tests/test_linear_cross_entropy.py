"""linear_cross_entropy against the unfused loss (``F.cross_entropy`` on materialised fp32
logits): the loss and every gradient, over awkward shapes, reductions, bias or not; and the
trainer's objectives with the fused and the plain loss (``TrainConfig.loss``, ``--loss``).

On CPU the Triton kernel runs in the interpreter (fp32 / fp16, small D, one GPT-2 vocabulary);
with TRITON_INTERPRET=0 the op runs its chunked PyTorch reference, tested here too.
"""

import importlib
import json

import pytest
import torch
import torch.nn.functional as F

from mtpkern.cli import main as cli_main
from mtpkern.config import GPT2Config
from mtpkern.models import GPT2, MedusaModel, MTPModel
from mtpkern.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_accumulate_, linear_cross_entropy_ref
from mtpkern.train import TrainConfig, evaluate_heads, medusa_loss, mtp_loss_and_backward, mtp_loss_naive, ntp_loss, train

lce_mod = importlib.import_module("mtpkern.ops.linear_cross_entropy")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100


def _inputs(N, V, D, dtype, *, bias=False, seed=0, device=DEV, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g) / D**0.25
    weight = torch.randn(V, D, generator=g) / D**0.25
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[ignore_every - 1 :: ignore_every] = IGNORE
    leaf = lambda t: None if t is None else t.to(device, dtype).requires_grad_()  # noqa: E731
    return leaf(hidden), leaf(weight), labels.to(device), leaf(b)


def _loss_and_grads(fn, hidden, weight, labels, bias, reduction, seed=1):
    """fn's loss and the gradients of <loss, R> (R a fixed random tensor) w.r.t. the inputs."""
    loss = fn(hidden, weight, labels, bias, reduction)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed)).to(loss.device)
    wrt = [t for t in (hidden, weight, bias) if t is not None]
    return [loss.detach().float(), *(g.float() for g in torch.autograd.grad(loss, wrt, upstream.to(loss.dtype)))]


def fused(hidden, weight, labels, bias, reduction):
    return linear_cross_entropy(hidden, weight, labels, IGNORE, reduction, bias)


def unfused(hidden, weight, labels, bias, reduction):
    """Eager PyTorch: the logits materialised (in the inputs' dtype, then fp32, like the trainer)."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels.long(), ignore_index=IGNORE, reduction=reduction)


def _fp32(*ts):
    return [None if t is None else t.detach().float().requires_grad_() for t in ts]


NAMES = ("loss", "grad_hidden", "grad_weight", "grad_bias")


def check(hidden, weight, labels, bias, reduction):
    """Fused vs the fp32 unfused loss; fp16 may err at most twice as much as eager fp16, plus a
    small absolute slack."""
    out = _loss_and_grads(fused, hidden, weight, labels, bias, reduction)
    h32, w32, b32 = _fp32(hidden, weight, bias)
    ref = _loss_and_grads(unfused, h32, w32, labels, b32, reduction)
    if hidden.dtype == torch.float32:
        tols = [1e-5 * max(1.0, r.abs().max().item()) for r in ref]
    else:
        eager = _loss_and_grads(unfused, hidden, weight, labels, bias, reduction)
        tols = [2 * (e - r).abs().max().item() + 2e-3 * max(1.0, r.abs().max().item()) for e, r in zip(eager, ref)]
    for name, o, r, tol in zip(NAMES, out, ref, tols):
        assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} vs {tuple(r.shape)}"
        torch.testing.assert_close(o, r, atol=tol, rtol=0, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(autouse=True)
def interpret_kernel_on_cpu(monkeypatch):
    """This file tests the Triton kernel: run it in the interpreter on CPU tensors (the automatic
    choice keeps CPU training on the chunked reference)."""
    monkeypatch.setattr(lce_mod, "INTERPRET_ON_CPU", True)


@pytest.fixture
def small_chunks(monkeypatch):
    """16-row chunks at these vocabularies, so N runs over several chunks and a partial last one."""
    monkeypatch.setattr(lce_mod, "_CHUNK_ELEMENTS", 2**12)
    monkeypatch.setattr(lce_mod, "_CPU_CHUNK_ELEMENTS", 2**12)
    assert lce_mod._chunk_rows(1000, 300) == lce_mod._chunk_rows(1000, 300, cpu=True) == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N, V, D", [(1, 97, 16), (37, 300, 24), (50, 257, 8)])
def test_matches_unfused(N, V, D, reduction, bias, dtype, small_chunks):
    check(*_inputs(N, V, D, dtype, bias=bias, seed=N), reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpt2_vocabulary(dtype):
    hidden, weight, labels, _ = _inputs(5, 50257, 8, dtype, seed=2)
    labels[:] = torch.tensor([0, 50256, IGNORE, 12345, 7])
    check(hidden, weight, labels, None, "mean")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_chunk_with_every_label_ignored(reduction, small_chunks):
    hidden, weight, labels, bias = _inputs(40, 300, 16, torch.float32, bias=True, seed=3)
    labels[16:32] = IGNORE  # the whole second chunk
    check(hidden, weight, labels, bias, reduction)
    loss = linear_cross_entropy(hidden, weight, labels, reduction="none")
    assert torch.all(loss[16:32] == 0)


def test_every_label_ignored_is_nan_like_torch():
    hidden, weight, labels, _ = _inputs(6, 97, 8, torch.float32)
    labels[:] = IGNORE
    assert linear_cross_entropy(hidden, weight, labels).isnan()
    assert F.cross_entropy(hidden @ weight.T, labels).isnan()
    loss = linear_cross_entropy(hidden, weight, labels, reduction="sum")
    loss.backward()
    assert loss.item() == 0 and not hidden.grad.any() and not weight.grad.any()


def test_no_rows():
    hidden, weight, labels, _ = _inputs(0, 97, 8, torch.float32)
    assert linear_cross_entropy(hidden, weight, labels, reduction="sum").item() == 0
    assert linear_cross_entropy(hidden, weight, labels, reduction="none").shape == (0,)


def test_non_contiguous_hidden_and_int32_labels():
    _, weight, labels, _ = _inputs(9, 97, 16, torch.float32)
    base = torch.randn(9, 32, device=DEV)
    hidden = base[:, ::2].requires_grad_()
    assert not hidden.is_contiguous()
    check(hidden, weight, labels.int(), None, "mean")


def test_frozen_weight_gets_no_gradient():
    hidden, weight, labels, _ = _inputs(8, 97, 16, torch.float32)
    weight.requires_grad_(False)
    linear_cross_entropy(hidden, weight, labels).backward()
    assert weight.grad is None and hidden.grad is not None


def test_no_grad_needs_no_gradient_buffers(monkeypatch):
    hidden, weight, labels, _ = _inputs(8, 97, 16, torch.float32)
    seen = []
    real = lce_mod.linear_cross_entropy_ref
    monkeypatch.setattr(lce_mod, "linear_cross_entropy_ref", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    with torch.no_grad():
        linear_cross_entropy(hidden, weight, labels)
    assert seen == [None]  # no row gradients: the kernel writes no gradient, no matmul for it


def test_hits_are_top1_and_top5():
    hidden, weight, labels, _ = _inputs(64, 97, 4, torch.float32, seed=5)
    with torch.no_grad():
        z = hidden @ weight.T
        labels[:8] = z[:8].argmax(1)  # some certain top-1 hits
        labels[8:12] = z[8:12].topk(4).indices[:, 3]  # top-5 but not top-1
        loss, hits = linear_cross_entropy(hidden, weight, labels, return_hits=True)
    valid = labels != IGNORE
    top = z[valid].topk(5).indices
    expect = [(top[:, 0] == labels[valid]).sum().item(), (top == labels[valid, None]).any(1).sum().item()]
    assert hits.tolist() == expect and expect[0] >= 8 and expect[1] >= expect[0] + 4
    torch.testing.assert_close(loss, F.cross_entropy(z, labels))


def test_reference_path_matches_kernel(monkeypatch, small_chunks):
    """TRITON_INTERPRET=0 on CPU: the op runs the chunked PyTorch reference."""
    if DEV != "cpu":
        pytest.skip("CPU tensors run the reference; this test compares it with the interpreter")
    args = _inputs(37, 300, 16, torch.float32, bias=True, seed=7)
    kernel = _loss_and_grads(fused, *args, "mean")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ref = _loss_and_grads(fused, *args, "mean")
    for name, a, b in zip(NAMES, kernel, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_reference_never_holds_more_than_a_chunk(monkeypatch, small_chunks):
    """The CPU path's logits come C rows at a time (the memory the CPU benchmark relies on)."""
    shapes = []
    real = lce_mod._cross_entropy_rows_ref
    monkeypatch.setattr(lce_mod, "_cross_entropy_rows_ref", lambda z, *a: shapes.append(tuple(z.shape)) or real(z, *a))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, labels, _ = _inputs(37, 300, 16, torch.float32, device="cpu")
    linear_cross_entropy(hidden, weight, labels).backward()
    assert shapes == [(16, 300), (16, 300), (5, 300)]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gradcheck_float64(reduction, bias, small_chunks):
    hidden, weight, labels, b = _inputs(20, 13, 5, torch.float64, bias=bias, device="cpu", ignore_every=3)
    inputs = (hidden, weight) + ((b,) if bias else ())
    fn = lambda h, w, *bb: linear_cross_entropy(h, w, labels, IGNORE, reduction, bb[0] if bb else None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("interpret", ["1", "0"], ids=["kernel", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck(reduction, interpret, monkeypatch):
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    hidden, weight, labels, bias = _inputs(7, 50, 8, torch.float32, bias=True)
    torch.library.opcheck(torch.ops.mtpkern.linear_cross_entropy.default,
                          (hidden, weight, labels, bias, IGNORE, reduction, True, True, True))
    grad_rows = torch.randn(7, device=DEV)
    torch.library.opcheck(torch.ops.mtpkern.linear_cross_entropy_backward.default,
                          (hidden.detach(), weight.detach(), labels, bias.detach(), IGNORE, grad_rows, True, True, True))


def test_retained_graph_backward_twice():
    """The forward's gradients are scaled in place only when the graph is freed after the
    backward: a retained graph gives the same gradients every time."""
    hidden, weight, labels, _ = _inputs(8, 97, 16, torch.float32)
    loss = linear_cross_entropy(hidden, weight, labels)
    first = torch.autograd.grad(0.5 * loss, [hidden, weight], retain_graph=True)
    second = torch.autograd.grad(3.0 * loss, [hidden, weight])
    for a, b in zip(first, second):
        torch.testing.assert_close(6 * a, b)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(hidden=lambda h: h[None]), ValueError, "hidden must be 2-D"),
        (dict(weight=lambda w: w[:, :-1]), ValueError, "disagree on D"),
        (dict(weight=lambda w: w.half()), TypeError, "weight.dtype"),
        (dict(hidden=lambda h: h.int(), weight=lambda w: w.int()), TypeError, "hidden.dtype"),
        (dict(labels=lambda y: y.float()), TypeError, "labels.dtype"),
        (dict(labels=lambda y: y[:-1]), ValueError, "labels must have shape"),
        (dict(labels=lambda y: y.clone().fill_(97)), ValueError, r"labels must lie in \[0, 97\)"),
        (dict(labels=lambda y: y.clone().fill_(-1)), ValueError, "labels must lie in"),
        (dict(bias=lambda b: torch.zeros(96, device=DEV)), ValueError, "bias must have shape"),
        (dict(bias=lambda b: torch.zeros(97, device=DEV).half()), TypeError, "bias.dtype"),
        (dict(labels=lambda y: y.to("meta")), ValueError, "labels is on"),
        (dict(ignore_index=5), ValueError, "ignore_index=5 is a class"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(weight=lambda w: w[:0]), ValueError, "empty weight"),
    ],
)
def test_bad_inputs(change, error, match):
    """The registered op checks its own inputs: the same errors through the public function and
    through torch.ops directly."""
    hidden, weight, labels, _ = _inputs(4, 97, 8, torch.float32)
    hidden, weight = hidden.detach(), weight.detach()
    args = dict(hidden=hidden, weight=weight, labels=labels, bias=None, ignore_index=IGNORE, reduction="mean")
    for name, value in change.items():
        args[name] = value(args[name]) if callable(value) else value
    with pytest.raises(error, match=match):
        linear_cross_entropy(**args)
    with pytest.raises(error, match=match):
        torch.ops.mtpkern.linear_cross_entropy(*args.values(), False, False, False)


def test_reference_docstring_path_returns_per_row_losses():
    hidden, weight, labels, _ = _inputs(10, 97, 8, torch.float32, device="cpu")
    loss, rank, *grads = linear_cross_entropy_ref(hidden.detach(), weight.detach(), labels)
    expect = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(loss, expect.detach())
    assert grads == [None, None, None] and torch.all(rank[labels == IGNORE] == -1)


# ----------------------------------------------------------------------------- GPU only


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 300, 1024])
def test_cuda_gpt2_shapes(N, dtype):
    check(*_inputs(N, 50257, 768, dtype, seed=N), "mean")


@needs_cuda
def test_cuda_autocast_bf16_gradients_reach_fp32_weights():
    hidden, weight, labels, _ = _inputs(64, 50257, 768, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    ref = F.cross_entropy((hidden.detach() @ weight.detach().T).float(), labels)
    torch.testing.assert_close(loss.detach(), ref, atol=3e-2, rtol=0)


# ----------------------------------------------------------------------------- the trainer


def _models():
    torch.manual_seed(0)
    base = GPT2(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=3, n_head=2))
    # MEDUSA heads with their own projections: each head's weight, not only the tied one
    return {"ntp": base, "mtp": MTPModel.from_base(base, n_heads=3),
            "medusa": MedusaModel.from_base(base, n_heads=4, proj=True)}


def _objective_step(objective, model, idx, labels, fused):
    """One objective's loss and backward, as the trainer runs it; returns the loss."""
    if objective == "ntp":
        loss = ntp_loss(model, idx, labels, fused=fused)[0]
    elif objective == "mtp-naive":
        loss = mtp_loss_naive(model, idx, labels, fused=fused)
    elif objective == "medusa":
        loss = medusa_loss(model, idx, labels, [1.0, 0.8, 0.64], fused=fused)[0]
    else:
        return mtp_loss_and_backward(model, idx, labels, scale=2.5, fused=fused)[0]
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("objective", ["ntp", "mtp-naive", "mtp-efficient", "medusa"])
def test_trainer_losses_and_gradients_fused_match_plain(objective):
    model = _models()[objective.split("-")[0]].train()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 97, (3, 19), generator=g)
    labels = idx.clone()
    labels[:, :4] = IGNORE
    labels[1, -5:] = IGNORE
    results = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        loss = _objective_step(objective, model, idx, labels, fused)
        results[fused] = loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (plain, plain_grads), (fused, fused_grads) = results[False], results[True]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_evaluate_heads_fused_matches_plain():
    model = _models()["mtp"]
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 97, (4, 23), generator=g)
    labels = idx.clone()
    labels[:, :5] = IGNORE
    batches = [{"input_ids": idx, "labels": labels}]
    plain = evaluate_heads(model, batches, "cpu", fused=False)
    fused = evaluate_heads(model, batches, "cpu", fused=True)
    assert fused["n_tokens"] == plain["n_tokens"]
    assert fused["acc_top1"] == plain["acc_top1"] and fused["acc_top5"] == plain["acc_top5"]
    assert fused["head_loss"] == pytest.approx(plain["head_loss"], rel=1e-5)


def test_train_loss_flag(tmp_path):
    """``--loss plain`` on the command line and ``loss="fused"`` (the default) in a TrainConfig
    train the same model to the same logged losses."""
    common = ["--config", "tiny", "--data", "synthetic", "--data-limit", "200", "--steps", "3", "--batch-size", "4",
              "--max-len", "128", "--eval-every", "100", "--device", "cpu", "--no-progress"]
    assert cli_main(["train", "mtp", "--out", str(tmp_path / "plain"), "--n-heads", "2", "--loss", "plain", *common]) == 0
    assert json.loads((tmp_path / "plain" / "train_config.json").read_text())["loss"] == "plain"
    cfg = TrainConfig(objective="mtp", out=str(tmp_path / "fused"), config="tiny", data="synthetic", data_limit=200,
                      steps=3, batch_size=4, max_len=128, eval_every=100, device="cpu", n_heads=2, progress=False)
    assert cfg.loss == "fused"
    train(cfg)

    def losses(run):
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [r["head_losses"] for r in map(json.loads, lines) if r["kind"] == "train"]

    plain, fused = losses("plain"), losses("fused")  # one record: the mean of the 3 steps
    assert len(plain) == len(fused) == 1 and len(plain[0]) == 2
    assert fused[0] == pytest.approx(plain[0], rel=1e-4)
    with pytest.raises(ValueError, match="unknown loss 'chunked'"):
        TrainConfig(objective="ntp", out=str(tmp_path / "x"), loss="chunked")


def test_cpu_training_keeps_the_reference_unless_the_kernel_is_forced(monkeypatch):
    """Automatic choice on CPU tensors: the chunked reference, even under the interpreter (so
    CPU training never interprets the kernel); MTPKERN_BACKEND=triton forces the kernel there."""
    if not lce_mod._backend.triton_interpret():
        pytest.skip("needs Triton's interpreter")
    monkeypatch.setattr(lce_mod, "INTERPRET_ON_CPU", False)
    calls = []
    real = lce_mod._launch
    monkeypatch.setattr(lce_mod, "_launch", lambda *a, **k: calls.append(1) or real(*a, **k))
    h, w, y = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    ref = torch.nn.functional.cross_entropy(h @ w.T, y)
    torch.testing.assert_close(linear_cross_entropy(h, w, y), ref)
    assert calls == []
    monkeypatch.setenv("MTPKERN_BACKEND", "triton")
    torch.testing.assert_close(linear_cross_entropy(h, w, y), ref)
    assert calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N, V, D", [(1, 97, 16), (37, 300, 24)])
def test_accumulate_adds_the_weight_gradient_in_place(N, V, D, dtype, small_chunks):
    """linear_cross_entropy_accumulate_: the summed loss and dL/dhidden of grad_scale * sum CE,
    and dL/dweight added onto what grad_weight already held."""
    hidden, weight, labels, _ = _inputs(N, V, D, dtype)
    scale = 0.37
    start = torch.randn(V, D, generator=torch.Generator().manual_seed(3)).to(DEV)
    acc = start.clone()
    loss, grad_h = linear_cross_entropy_accumulate_(hidden, weight, labels, acc, torch.tensor(scale))
    h32, w32 = _fp32(hidden, weight)
    ref = unfused(h32, w32, labels, None, "sum")
    ref_h, ref_w = torch.autograd.grad(ref * scale, (h32, w32))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.float(), ref.detach(), atol=tol * max(1.0, ref.abs().item()), rtol=0)
    torch.testing.assert_close(grad_h.float(), ref_h, atol=tol, rtol=0)
    assert grad_h.dtype == dtype and acc.dtype == torch.float32
    torch.testing.assert_close(acc - start, ref_w, atol=tol, rtol=0)


@pytest.mark.parametrize("interpret", ["1", "0"], ids=["kernel", "reference"])
def test_accumulate_opcheck(interpret, monkeypatch):
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    hidden, weight, labels, _ = _inputs(7, 50, 8, torch.float32)
    acc = torch.zeros(50, 8, device=DEV)
    torch.library.opcheck(torch.ops.mtpkern.linear_cross_entropy_accumulate_.default,
                          (hidden.detach(), weight.detach(), labels, IGNORE, torch.tensor(0.5), acc))


@pytest.mark.parametrize("acc, match", [
    (lambda w: torch.zeros(w.shape[0] + 1, w.shape[1]), r"grad_weight must be float32 \(51, 8\)"),
    (lambda w: torch.zeros(w.shape, dtype=torch.float16), "grad_weight must be float32"),
    (lambda w: torch.zeros(w.shape[1], w.shape[0]).T, "grad_weight must be contiguous"),
])
def test_accumulate_bad_inputs(acc, match):
    hidden, weight, labels, _ = _inputs(7, 51, 8, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy_accumulate_(hidden, weight, labels, acc(weight), 1.0)
    with pytest.raises(ValueError, match="grad_scale must be a 0-d tensor"):
        linear_cross_entropy_accumulate_(hidden, weight, labels, torch.zeros(51, 8), torch.ones(2))


def test_mtp_efficient_fused_accumulates_over_micro_batches():
    """Two micro-batches into the same .grad (gradient accumulation): the fused memory-efficient
    MTP order adds into the unembedding's existing gradient exactly as autograd does."""
    model = _models()["mtp"].train()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 97, (2, 17), generator=g) for _ in range(2)]
    grads = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        for idx in batches:
            mtp_loss_and_backward(model, idx, idx.clone(), scale=0.5, fused=fused)
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_chunk_sizes():
    """The CPU reference takes 32 MiB of logits per chunk (fewer rewrites of dL/dW), the Triton
    launcher 256 MiB (fewer launches): 128 and 1024 rows at GPT-2's vocabulary, and never more
    rows than there are."""
    assert lce_mod._chunk_rows(4096, 50257, cpu=True) == 128
    assert lce_mod._chunk_rows(4096, 50257) == 1024
    assert lce_mod._chunk_rows(300, 50257) == 300
