"""Decoder(prefix_cache=True): a prompt that shares a prefix with the last generation (its prompt
and its output) prefills only the rest, gives the tokens a fresh decoder gives, and the cache is
dropped whenever it could be stale (weights changed or replaced, run_step, a failed generation)."""

import pytest
import torch

from _tiny import random_prompts
from mtpkern import Decoder
from mtpkern.core import prefill

MAX_NEW = 16
TEMPLATE = random_prompts(1, seed=3, min_len=12, max_len=12)[0]  # a shared "system prompt"
QUERIES = random_prompts(8, seed=4, min_len=2, max_len=9)


def prompts():
    return [TEMPLATE + q for q in QUERIES]


def spec(strategy):
    return dict(tree="2,1") if strategy == "medusa" else {}


def model_of(strategy, gpt2_model, mtp_model, medusa_model):
    return {"ntp": gpt2_model, "mtp": mtp_model, "medusa": medusa_model}[strategy]


@pytest.mark.parametrize("strategy", ["ntp", "mtp", "medusa"])
def test_shared_prefix_is_reused_and_tokens_are_unchanged(strategy, gpt2_model, mtp_model, medusa_model):
    model = model_of(strategy, gpt2_model, mtp_model, medusa_model)
    cached = Decoder(model, strategy, **spec(strategy))
    plain = Decoder(model, strategy, prefix_cache=False, **spec(strategy))
    reused = []
    for p in prompts():
        a, b = cached.generate(p, max_new_tokens=MAX_NEW), plain.generate(p, max_new_tokens=MAX_NEW)
        assert a.tokens == b.tokens, p
        assert b.reused_prompt_tokens == 0
        reused.append(a.reused_prompt_tokens)
    assert reused[0] == 0  # nothing cached before the first prompt
    # Later prompts share at least the template (more when two queries start alike), never
    # their own last token.
    assert all(len(TEMPLATE) <= r < len(p) for r, p in zip(reused[1:], prompts()[1:])), reused


@pytest.mark.parametrize("strategy", ["ntp", "mtp", "medusa"])
def test_a_conversation_reuses_the_previous_output(strategy, gpt2_model, mtp_model, medusa_model):
    """Turn 2 = turn 1's prompt + its output + a new message: the prompt and the output come
    from the cache, but the last emitted token when no step wrote its K/V (the model's own next
    token after the last accepted drafts; a step cut at max_new_tokens wrote it)."""
    model = model_of(strategy, gpt2_model, mtp_model, medusa_model)
    dec = Decoder(model, strategy, **spec(strategy))
    first = dec.generate(prompts()[0], max_new_tokens=MAX_NEW)
    turn2 = prompts()[0] + first.tokens + QUERIES[1]
    out = dec.generate(turn2, max_new_tokens=MAX_NEW)
    whole = len(prompts()[0]) + len(first.tokens)
    assert whole - 1 <= out.reused_prompt_tokens <= whole
    assert out.tokens == Decoder(model, strategy, prefix_cache=False, **spec(strategy)).generate(
        turn2, max_new_tokens=MAX_NEW).tokens


def test_an_output_cut_at_eos_is_not_trusted_past_it(medusa_model):
    """A step that accepted tokens past EOS wrote their K/V, but the output stops at EOS: only
    the prompt and the output (but its last token) count as cached."""
    dec = Decoder(medusa_model, "medusa", tree="2,1")
    ref = dec.generate(prompts()[0], max_new_tokens=MAX_NEW)
    eos = ref.tokens[3]
    cut = dec.generate(prompts()[0], max_new_tokens=MAX_NEW, eos_token_id=eos)
    assert cut.tokens == ref.tokens[: ref.tokens.index(eos) + 1]
    cached_tokens, _ = dec._cached
    whole = prompts()[0] + cut.tokens
    assert cached_tokens == whole[: len(cached_tokens)] and len(cached_tokens) >= len(whole) - 1
    out = dec.generate(prompts()[0] + ref.tokens, max_new_tokens=4)  # ref goes on past EOS
    assert out.reused_prompt_tokens == len(cached_tokens)


def test_weights_changed_in_place_drop_the_cache(gpt2_model):
    import copy

    model = copy.deepcopy(gpt2_model)
    dec = Decoder(model, "ntp")
    p = prompts()[0]
    dec.generate(p, max_new_tokens=MAX_NEW)
    assert dec.generate(p, max_new_tokens=MAX_NEW).reused_prompt_tokens == len(p) - 1
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight.mul_(1.5)  # a training step would do the same: new version, same storage
    out = dec.generate(p, max_new_tokens=MAX_NEW)
    assert out.reused_prompt_tokens == 0
    assert out.tokens == Decoder(model, "ntp", prefix_cache=False).generate(p, max_new_tokens=MAX_NEW).tokens


def test_replaced_weights_drop_the_cache_and_the_decode_weights(gpt2_model):
    """load_state_dict(assign=True) puts new tensors in place: the cache and the blocks' decode
    weights (views of the old tensors) are both rebuilt."""
    import copy

    model = copy.deepcopy(gpt2_model)
    dec = Decoder(model, "ntp")
    p = prompts()[1]
    dec.generate(p, max_new_tokens=MAX_NEW)
    state = {k: v.clone() * (1.2 if k.endswith("c_proj.weight") else 1.0) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    out = dec.generate(p, max_new_tokens=MAX_NEW)
    assert out.reused_prompt_tokens == 0
    assert out.tokens == Decoder(model, "ntp", prefix_cache=False).generate(p, max_new_tokens=MAX_NEW).tokens


def test_run_step_and_a_failed_generation_drop_the_cache(medusa_model):
    dec = Decoder(medusa_model, "medusa", tree="2,1")
    p = prompts()[2]
    dec.generate(p, max_new_tokens=MAX_NEW)
    dec.run_step(len(p))  # writes garbage into the cache
    assert dec.generate(p, max_new_tokens=MAX_NEW).reused_prompt_tokens == 0
    with pytest.raises(ValueError, match="context"):  # rejected before anything runs: cache kept
        dec.generate(p, max_new_tokens=10_000)
    assert dec.generate(p, max_new_tokens=MAX_NEW).reused_prompt_tokens == len(p) - 1
    real = dec.step.body

    def failing(rows, prefix_host):
        raise RuntimeError("boom")

    dec.step.body = failing
    with pytest.raises(RuntimeError, match="boom"):
        dec.generate(p, max_new_tokens=MAX_NEW)
    dec.step.body = real
    assert dec.generate(p, max_new_tokens=MAX_NEW).reused_prompt_tokens == 0


def test_refresh_and_bad_arguments(gpt2_model):
    dec = Decoder(gpt2_model, "ntp")
    p = prompts()[3]
    dec.generate(p, max_new_tokens=4)
    dec.refresh()
    assert dec.generate(p, max_new_tokens=4).reused_prompt_tokens == 0
    assert "prefix_cache=True" in repr(dec)
    with pytest.raises(TypeError, match="prefix_cache must be True or False"):
        Decoder(gpt2_model, "ntp", prefix_cache="yes")
    cache = gpt2_model.new_cache(1, 32)
    with pytest.raises(ValueError, match=r"prefill start 5 must be in \[0, 5\)"):
        prefill(gpt2_model, cache, torch.arange(5), heads=1, start=5)
