"""Backend selection: ``backend=``, ``MTPKERN_BACKEND`` and ``generate(kernels=)``.

A forced backend an op lacks must fall back to that op's automatic choice (it used to recurse
forever); every op and a whole ``generate`` are run with the variable set to every value.
"""

import copy

import pytest
import torch

from mtpkern.generation import generate
from mtpkern.ops import _backend
from mtpkern.ops.fused_logits import fused_logits, fused_logits_ref
from mtpkern.ops.kv_compact import kv_compact_, kv_compact_ref_
from mtpkern.ops.tree_attention import tree_attention, tree_attention_ref
from mtpkern.ops.tree_mask import tree_buffers, tree_buffers_ref
from mtpkern.ops.verify import verify_greedy, verify_greedy_ref, verify_typical, verify_typical_ref

from _tiny import random_prompts

CPU = torch.device("cpu")
FORCED = ["eager", "triton", "cuda", "auto"]
# Where every backend can run: Triton needs CUDA tensors unless the interpreter is on (CPU CI).
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_ext = pytest.mark.skipif(not _backend.HAS_CUDA_EXT, reason="needs the built extension mtpkern._C")
needs_interp = pytest.mark.skipif(not _backend.triton_interpret(), reason="needs TRITON_INTERPRET=1 on CPU")


# ---------------------------------------------------------------- pick


@needs_interp
@needs_ext
@pytest.mark.parametrize("forced, available, expected", [
    ("triton", ("cuda", "eager"), "eager"),  # the op lacks Triton: its automatic choice on CPU
    ("cuda", ("triton", "eager"), "triton"),  # the op lacks C++: Triton (interpreter)
    ("cuda", ("cuda", "eager"), "cuda"),  # the C++ CPU kernels
    ("triton", ("triton", "eager"), "triton"),
    ("eager", ("triton", "eager"), "eager"),
    ("auto", ("cuda", "eager"), "eager"),
    ("auto", ("triton", "eager"), "triton"),
])
def test_forced_backend_an_op_lacks_falls_back_once(monkeypatch, forced, available, expected):
    monkeypatch.setenv("MTPKERN_BACKEND", forced)
    assert _backend.pick(CPU, available) == expected
    monkeypatch.delenv("MTPKERN_BACKEND")
    assert _backend.pick(CPU, available, forced) == expected


def test_explicit_backend_wins_over_the_variable(monkeypatch):
    monkeypatch.setenv("MTPKERN_BACKEND", "triton")
    assert _backend.pick(CPU, ("triton", "eager"), "eager") == "eager"


def test_unknown_names_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend='gpu' is not one of auto, eager, triton, cuda"):
        _backend.pick(CPU, ("triton", "eager"), "gpu")
    monkeypatch.setenv("MTPKERN_BACKEND", "Tritonn")
    with pytest.raises(ValueError, match="MTPKERN_BACKEND='tritonn' is not one of"):
        _backend.pick(CPU, ("triton", "eager"))


@pytest.mark.skipif(_backend.triton_interpret(), reason="the interpreter runs Triton on CPU")
def test_triton_on_cpu_without_the_interpreter_is_an_error():
    with pytest.raises(RuntimeError, match="backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1"):
        _backend.pick(CPU, ("triton", "eager"), "triton")


# ---------------------------------------------------------------- every op under MTPKERN_BACKEND


def _tree():
    parents = torch.tensor([-1, 0, 0, 1, 1, 2])
    return parents, tree_buffers_ref(parents, 2)


@pytest.mark.parametrize("forced", FORCED)
def test_every_op_runs_under_the_variable(monkeypatch, forced):
    if forced == "cuda" and not _backend.HAS_CUDA_EXT:
        pytest.skip("needs the built extension mtpkern._C")
    monkeypatch.setenv("MTPKERN_BACKEND", forced)
    g = torch.Generator().manual_seed(0)

    h, w = torch.randn(5, 32, generator=g).to(DEV), torch.randn(97, 32, generator=g).to(DEV)
    target = torch.tensor([0, 5, 96, 3, 7], device=DEV)
    got, ref = fused_logits(h, w, 4, target), fused_logits_ref(h, w, 4, target)
    torch.testing.assert_close(got.topk_values, ref.topk_values, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax, ref.argmax)
    torch.testing.assert_close(got.lse, ref.lse, rtol=1e-5, atol=1e-5)

    parents, bufs = _tree()
    parents, bufs = parents.to(DEV), type(bufs)(*(t.to(DEV) for t in bufs))
    T = parents.numel()
    q = torch.randn(1, 2, T, 16, generator=g).to(DEV)
    k, v = torch.randn(1, 2, 16, 16, generator=g).to(DEV), torch.randn(1, 2, 16, 16, generator=g).to(DEV)
    P = torch.tensor(5, device=DEV)
    torch.testing.assert_close(tree_attention(q, k, v, P, bufs.mask), tree_attention_ref(q, k, v, P, bufs.mask),
                               rtol=1e-5, atol=1e-5)

    for got, ref in zip(tree_buffers(parents, 3), tree_buffers_ref(parents, 3)):
        assert torch.equal(got, ref)

    tokens = torch.tensor([9, 4, 2, 7, 1, 3], device=DEV)
    argmax = torch.tensor([4, 7, 3, 0, 0, 0], device=DEV)
    for got, ref in zip(verify_greedy(tokens, argmax, bufs.retrieve), verify_greedy_ref(tokens, argmax, bufs.retrieve)):
        assert torch.equal(got, ref)
    prob, ent = torch.rand(T, generator=g).to(DEV), torch.rand(T, generator=g).to(DEV)
    for got, ref in zip(verify_typical(tokens, argmax, prob, ent, bufs.retrieve),
                        verify_typical_ref(tokens, argmax, prob, ent, bufs.retrieve)):
        assert torch.equal(got, ref)

    kc, vc = torch.randn(2, 1, 2, 12, 4, generator=g).to(DEV), torch.randn(2, 1, 2, 12, 4, generator=g).to(DEV)
    kr, vr = kc.clone(), vc.clone()
    path, count = torch.tensor([0, 2, 5], device=DEV), torch.tensor(3, device=DEV)
    kv_compact_(kc, vc, path, P, count)
    kv_compact_ref_(kr, vr, path, P, count)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@pytest.mark.parametrize("forced", FORCED)
def test_generate_runs_under_the_variable(monkeypatch, medusa_model, mtp_model, forced):  # noqa: F811
    """A whole fused decode (tree attention, fused logits, verification, compaction) with the
    variable set gives the eager decode's tokens."""
    if forced == "cuda" and not _backend.HAS_CUDA_EXT:
        pytest.skip("needs the built extension mtpkern._C")
    prompt = random_prompts(1, seed=3)[0]
    medusa_model, mtp_model = (copy.deepcopy(m).to(DEV) for m in (medusa_model, mtp_model))
    runs = [(medusa_model, "medusa", "greedy"), (mtp_model, "mtp", "greedy"), (medusa_model, "medusa", "typical")]
    temperature = {"greedy": 0.0, "typical": 0.7}
    for model, strategy, acceptance in runs:
        kw = dict(max_new_tokens=5, strategy=strategy, acceptance=acceptance, temperature=temperature[acceptance])
        eager = generate(model, prompt, kernels="eager", **kw)
        monkeypatch.setenv("MTPKERN_BACKEND", forced)
        fused = generate(model, prompt, kernels="fused", **kw)
        monkeypatch.delenv("MTPKERN_BACKEND")
        assert fused.tokens == eager.tokens, (strategy, acceptance)
        assert fused.accept_lengths == eager.accept_lengths, (strategy, acceptance)
