"""The engine's eager decode path: blocks as functions of their tensors (``decode_block`` through
``Attn.weights``) and MTP's heads batched into the verification pass (``MTPModel.decode_heads``)
compute what the modules compute, K/V included, and the decoder takes them exactly where it
should."""

import copy

import pytest
import torch

import mtpkern.models as model_mod
from _tiny import random_prompts
from mtpkern import Decoder
from mtpkern.layers import Attn, decode_block

PROMPTS = random_prompts(6, seed=8)


def tree_mask(T: int, prefix: int, seed: int) -> torch.Tensor:
    """bool [T, prefix + T]: the prefix, each token itself, and a random set of earlier tokens."""
    g = torch.Generator().manual_seed(seed)
    own = torch.rand(T, T, generator=g) < 0.5
    own = (own.tril(-1) | torch.eye(T, dtype=torch.bool))
    return torch.cat([torch.ones(T, prefix, dtype=torch.bool), own], 1)


@pytest.mark.parametrize("T, prefix", [(1, 0), (1, 9), (3, 5), (8, 17), (13, 1)])
def test_decode_block_is_the_block(gpt2_model, T, prefix):
    model = gpt2_model
    D = model.config.n_embd
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(T + prefix))
    slots = torch.arange(prefix, prefix + T)
    mask = tree_mask(T, prefix, seed=T)
    ref_cache, cache = model.new_cache(1, 40), model.new_cache(1, 40)
    for c in (ref_cache, cache):  # the same garbage in the prefix slots
        g = torch.Generator().manual_seed(0)
        c.k.copy_(torch.randn(c.k.shape, generator=g))
        c.v.copy_(torch.randn(c.v.shape, generator=g))
    weights = model.decode_weights()
    with torch.inference_mode():
        for layer, block in enumerate(model.h):
            want = block(x, Attn(ref_cache, slots, mask=mask), layer)
            got = decode_block(x, weights[layer], Attn(cache, slots, mask=mask), layer)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k, ref_cache.k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache.v, ref_cache.v, rtol=1e-6, atol=1e-6)


def test_weights_in_attn_switch_the_path_only_where_it_applies(gpt2_model, monkeypatch):
    """Inference with a dense mask takes decode_block (one sequence, or a batch with slots per
    row) and computes what the modules compute, K/V included; autograd and the fused kernels'
    inputs keep the modules."""
    model = gpt2_model
    calls = []
    real = model_mod.decode_block
    monkeypatch.setattr(model_mod, "decode_block", lambda *a: calls.append(1) or real(*a))
    ids, pos = torch.tensor([[3, 4, 5]]), torch.arange(3)
    mask = torch.ones(3, 3, dtype=torch.bool).tril()
    weights = model.decode_weights()
    with torch.inference_mode():
        fast = model.decode_hidden(ids, pos, Attn(model.new_cache(1, 8), pos, mask=mask, weights=weights))[0]
        slow = model.decode_hidden(ids, pos, Attn(model.new_cache(1, 8), pos, mask=mask))[0]
    assert len(calls) == model.config.n_layer
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    # A batch of two rows, each at its own slots, with its own mask.
    rows = torch.tensor([[3, 4, 5], [7, 8, 9]])
    slots = torch.tensor([[0, 1, 2], [4, 5, 6]])
    bmask = torch.zeros(2, 1, 3, 7, dtype=torch.bool)
    bmask[0, 0, :, :3] = mask
    bmask[1, 0, :, :4] = True  # row 1 sees 4 earlier slots (garbage, the same in both caches), then its tokens
    bmask[1, 0, :, 4:7] = mask
    caches = [model.new_cache(2, 8), model.new_cache(2, 8)]
    for c in caches:
        g = torch.Generator().manual_seed(3)
        c.k.copy_(torch.randn(c.k.shape, generator=g))
        c.v.copy_(torch.randn(c.v.shape, generator=g))
    calls.clear()
    with torch.inference_mode():
        fast = model.decode_hidden(rows, slots, Attn(caches[0], slots, mask=bmask, weights=weights))[0]
        slow = model.decode_hidden(rows, slots, Attn(caches[1], slots, mask=bmask))[0]
    assert len(calls) == model.config.n_layer
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0].k, caches[1].k)
    torch.testing.assert_close(caches[0].v, caches[1].v)
    calls.clear()
    with torch.enable_grad():
        model.decode_hidden(ids, pos, Attn(model.new_cache(1, 8), pos, mask=mask, weights=weights))
    assert calls == []


def test_the_batch_decoder_takes_the_functional_path(gpt2_model, medusa_model, monkeypatch):
    """BatchDecoder with eager attention: every block of the prefill and of every step through
    decode_block, and each row's tokens those of decoding it alone."""
    from mtpkern import BatchDecoder

    calls = []
    real = model_mod.decode_block
    monkeypatch.setattr(model_mod, "decode_block", lambda *a: calls.append(1) or real(*a))
    for model, strategy, kw in ((gpt2_model, "ntp", {}), (medusa_model, "medusa", dict(tree="2,1"))):
        calls.clear()
        outs = BatchDecoder(model, strategy, max_batch=3, **kw).generate(PROMPTS[:3], max_new_tokens=10)
        assert calls, strategy
        for prompt, out in zip(PROMPTS[:3], outs):
            assert out.tokens == Decoder(model, strategy, **kw).generate(prompt, max_new_tokens=10).tokens


def test_decode_heads_is_every_head_block(mtp_model):
    """All heads at every row in one batch equal each head's own block over the trunk, and
    write the same K/V into every head's cache."""
    model = mtp_model
    n = model.n_heads - 1
    T, prefix = 5, 7
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    pos, slots = torch.arange(prefix, prefix + T), torch.arange(prefix, prefix + T)
    mask = tree_mask(T, prefix, seed=2)
    ref_cache, cache = model.new_cache(1, 24), model.new_cache(1, 24)
    with torch.inference_mode():
        ref_attn = Attn(ref_cache, slots, mask=mask)
        h = model.trunk_forward(ids, pos, ref_attn)
        want = torch.stack([model.head_forward(k, h, ref_attn)[0] for k in range(n + 1)])
        got = model.decode_heads(ids, pos, Attn(cache, slots, mask=mask, weights=model.decode_weights()), n)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.k, ref_cache.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.v, ref_cache.v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ntp", "mtp", "medusa"])
def test_the_cpu_decoder_takes_the_functional_path(strategy, gpt2_model, mtp_model, medusa_model, monkeypatch):
    """kernels="auto" / "eager" on the CPU: every block of every step through decode_block, MTP's
    heads in the verification pass (no second pass over the accepted path); the tokens equal
    the module path's."""
    model = {"ntp": gpt2_model, "mtp": mtp_model, "medusa": medusa_model}[strategy]
    kw = dict(tree="2,1") if strategy == "medusa" else {}
    calls = []
    real = model_mod.decode_block
    monkeypatch.setattr(model_mod, "decode_block", lambda *a: calls.append(a[3]) or real(*a))
    for kernels in ("auto", "eager"):
        dec = Decoder(model, strategy, kernels=kernels, **kw)
        if strategy == "mtp":
            assert dec.step.forward.heads == model.n_heads and not dec.step.drafter.on_path
        slow = Decoder(model, strategy, kernels=kernels, **kw)
        slow._refresh_weights = lambda stamp: None  # the module path: no decode weights
        slow.decode_weights = None
        for prompt in PROMPTS:
            calls.clear()
            out = dec.generate(prompt, max_new_tokens=12)
            trunk = model.config.n_layer - (1 if strategy == "mtp" else 0)  # MTP's head blocks are batched
            assert len(calls) == trunk * (1 + out.num_steps), (kernels, len(calls))
            calls.clear()
            assert slow.generate(prompt, max_new_tokens=12).tokens == out.tokens
            assert calls == []


def test_the_fused_decoder_keeps_its_kernels(mtp_model):
    dec = Decoder(copy.deepcopy(mtp_model), "mtp", kernels="fused")
    assert dec.decode_weights is None and dec.step.forward.heads == 1 and dec.step.drafter.on_path
