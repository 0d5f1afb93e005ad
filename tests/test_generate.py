"""The decoding engine: greedy speculative decoding is lossless (token-identical to greedy NTP,
to transformers' generate and to a no-cache recomputation), with real multi-token acceptance
from tiny trained heads; EOS, max_new_tokens, input checks, typical acceptance, sampling."""

import functools

import pytest
import torch

from _tiny import VOCAB, assert_same_greedy_tokens, random_prompts
from mtpkern.core import prefill
from mtpkern.generation import generate
from mtpkern.inputs import GenerationResult
from mtpkern.sampling import sampling_probs
from mtpkern.hf_io import to_hf
from mtpkern.tree import Tree

N_PROMPTS = 20
MAX_NEW = 24
PROMPTS = random_prompts(N_PROMPTS, seed=7)


@functools.lru_cache(maxsize=None)
def _hf(gpt2):
    return to_hf(gpt2)


def hf_greedy(gpt2, prompt, max_new, eos=None) -> list[int]:
    hf = _hf(gpt2)
    hf.generation_config.eos_token_id = eos  # None: never stop early
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                          pad_token_id=0, eos_token_id=eos)
    return out[0, len(prompt):].tolist()


def recompute_greedy(model, prompt, max_new, eos=None) -> list[int]:
    """Greedy decoding without any cache: the whole sequence through the model every token."""
    seq, out = list(prompt), []
    with torch.no_grad():
        while len(out) < max_new:
            t = int(model(torch.tensor([seq]), heads=1).logits[0, -1, 0].argmax())
            seq.append(t)
            out.append(t)
            if t == eos:
                break
    return out


def eos_inside(result: GenerationResult) -> bool:
    """Whether the last step accepted more tokens than were emitted (the chunk was cut)."""
    return sum(result.accept_lengths) + 1 > len(result.tokens)


def check_lossless(model, strategy, tree, reference):
    """Every prompt, with and without EOS: the speculative tokens equal greedy ntp and the
    reference. Returns the mean accepted length and how many outputs were cut by EOS."""
    accepted, cut = [], 0
    for prompt in PROMPTS:
        ntp = generate(model, prompt, max_new_tokens=MAX_NEW)
        spec = generate(model, prompt, max_new_tokens=MAX_NEW, strategy=strategy, tree=tree)
        assert spec.tokens == ntp.tokens == reference(prompt, MAX_NEW, None), prompt
        assert len(spec.tokens) == MAX_NEW
        accepted += spec.accept_lengths
        # EOS: a token from the middle of the output ends it there.
        eos = ntp.tokens[MAX_NEW // 2]
        ntp_e = generate(model, prompt, max_new_tokens=MAX_NEW, eos_token_id=eos)
        spec_e = generate(model, prompt, max_new_tokens=MAX_NEW, strategy=strategy, tree=tree, eos_token_id=eos)
        expected = ntp.tokens[: ntp.tokens.index(eos) + 1]
        assert spec_e.tokens == ntp_e.tokens == expected == reference(prompt, MAX_NEW, eos), prompt
        cut += eos_inside(spec_e)
    return sum(accepted) / len(accepted), cut


@pytest.mark.parametrize("tree", [Tree.chain(3), None, Tree.from_widths([3, 2, 1])], ids=["chain", "mc_sim", "3x2x1"])
def test_medusa_greedy_is_lossless(medusa_model, tree):
    mean_accept, cut = check_lossless(
        medusa_model, "medusa", tree, lambda p, n, eos: hf_greedy(medusa_model.base, p, n, eos)
    )
    assert mean_accept >= 1.5, f"the trained heads should be accepted: mean accepted length {mean_accept:.2f}"
    assert cut > 0, "no EOS fell inside an accepted chunk"


@pytest.mark.parametrize("tree", [None, Tree.from_widths([2, 2, 1])], ids=["chain", "2x2x1"])
def test_mtp_greedy_is_lossless(mtp_model, tree):
    mean_accept, cut = check_lossless(mtp_model, "mtp", tree, functools.partial(recompute_greedy, mtp_model))
    assert mean_accept >= 1.5, f"the trained heads should be accepted: mean accepted length {mean_accept:.2f}"
    assert cut > 0, "no EOS fell inside an accepted chunk"


def test_ntp_matches_transformers(gpt2_model):
    for prompt in PROMPTS:
        res = generate(gpt2_model, prompt, max_new_tokens=MAX_NEW)
        assert res.tokens == hf_greedy(gpt2_model, prompt, MAX_NEW), prompt
        assert res.accept_lengths == [1] * (MAX_NEW - 1) and res.num_steps == MAX_NEW - 1


@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 11])
def test_max_new_tokens_is_never_overshot(medusa_model, mtp_model, max_new):
    prompt = PROMPTS[0]
    full = generate(medusa_model, prompt, max_new_tokens=16).tokens
    for model, strategy in ((medusa_model, "medusa"), (mtp_model, "mtp"), (medusa_model, "ntp")):
        res = generate(model, prompt, max_new_tokens=max_new, strategy=strategy)
        assert len(res.tokens) == max_new
        if model is medusa_model:
            assert res.tokens == full[:max_new]


def test_result_bookkeeping(medusa_model):
    res = generate(medusa_model, PROMPTS[1], max_new_tokens=MAX_NEW, strategy="medusa")
    assert res.num_steps == len(res.accept_lengths) == len(res.step_times) >= 1
    assert all(1 <= a <= 4 for a in res.accept_lengths)  # 3 draft heads + the model's own token
    assert sum(res.accept_lengths) + 1 >= len(res.tokens)  # the prefill gives the first token
    assert res.prefill_time > 0 and res.total_time >= res.prefill_time + sum(res.step_times) * 0.99
    assert res.tokens_per_second == pytest.approx(len(res.tokens) / res.total_time)
    assert res.forwards_per_token == pytest.approx((1 + res.num_steps) / len(res.tokens))


@pytest.mark.slow
def test_fused_kernels_match_eager(medusa_model, mtp_model):
    """On the GPU where there is one (the compiled kernels), else in Triton's interpreter."""
    pytest.importorskip("mtpkern.ops.tree_attention")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for model, strategy in ((medusa_model, "medusa"), (mtp_model, "mtp")):
        model.to(device)
        try:
            for prompt in PROMPTS[:2]:
                eager = generate(model, prompt, max_new_tokens=10, strategy=strategy, kernels="eager")
                fused = generate(model, prompt, max_new_tokens=10, strategy=strategy, kernels="fused")
                assert_same_greedy_tokens(model, prompt, fused.tokens, eager.tokens)
                if fused.tokens == eager.tokens:
                    assert fused.accept_lengths == eager.accept_lengths, (strategy, prompt)
        finally:
            model.cpu()


# ----------------------------------------------------------------------------- typical


def test_typical_that_accepts_nothing_is_greedy_ntp(medusa_model):
    # threshold min(epsilon, alpha * exp(-H)) = 1: no probability exceeds it, every step keeps
    # only the model's own argmax.
    for prompt in PROMPTS[:5]:
        ntp = generate(medusa_model, prompt, max_new_tokens=MAX_NEW)
        typ = generate(medusa_model, prompt, max_new_tokens=MAX_NEW, strategy="medusa", acceptance="typical",
                       temperature=0.7, typical_epsilon=1.0, typical_alpha=1e9)
        assert typ.tokens == ntp.tokens and set(typ.accept_lengths) == {1}


def test_typical_that_accepts_everything_follows_the_heads(medusa_model):
    # threshold ~0: every draft passes, so a chain step accepts all 3 drafts plus the model's
    # token, and the drafts are the heads' own top-1 tokens.
    prompt = PROMPTS[3]
    typ = generate(medusa_model, prompt, max_new_tokens=13, strategy="medusa", tree=Tree.chain(3),
                   acceptance="typical", temperature=1.0, typical_epsilon=1e-30, typical_alpha=1e-30)
    assert typ.accept_lengths == [4, 4, 4]
    # The first step's drafts are the heads' top-1 at the prompt's last position, where head j
    # predicts the token j after the root.
    with torch.no_grad():
        out = medusa_model(torch.tensor([prompt])).logits[0, -1]  # [heads, V]
    assert typ.tokens[:4] == out.argmax(-1).tolist()


# ----------------------------------------------------------------------------- sampling


def test_sampling_probs_top_p_and_top_k():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert sampling_probs(logits, 1.0).allclose(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert sampling_probs(logits, 1.0, top_p=0.7).allclose(torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert sampling_probs(logits, 1.0, top_p=0.5).equal(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert sampling_probs(logits, 1.0, top_k=3).allclose(torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    hot = sampling_probs(logits, 0.5)  # p ** 2, renormalised
    assert hot.allclose(torch.tensor([[0.25, 0.09, 0.0225, 0.0025]]) / 0.365)


def test_ntp_sampling_is_seeded_and_top_k_1_is_greedy(gpt2_model):
    prompt = PROMPTS[2]
    runs = [generate(gpt2_model, prompt, max_new_tokens=16, temperature=1.0,
                     generator=torch.Generator().manual_seed(s)).tokens for s in (0, 0, 1)]
    assert runs[0] == runs[1]
    greedy = generate(gpt2_model, prompt, max_new_tokens=16).tokens
    top1 = generate(gpt2_model, prompt, max_new_tokens=16, temperature=1.3, top_k=1,
                    generator=torch.Generator().manual_seed(3)).tokens
    assert top1 == greedy


# ----------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(input_ids=[[1, 2], [3, 4]], cuda_graph=True), ValueError, "cuda_graph=True needs the model on a CUDA"),
        (dict(input_ids=[[1, 2], [3, 4]], strategy="medusa", temperature=0.5), ValueError,
         "acceptance 'greedy' decodes deterministically"),
        (dict(input_ids=[]), ValueError, "prompt is empty"),
        (dict(input_ids=[1, VOCAB]), ValueError, f"token id {VOCAB} is outside"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be"),
        (dict(max_new_tokens=200), ValueError, r"lower max_new_tokens to at most 12\d"),
        (dict(strategy="beam"), ValueError, "unknown strategy"),
        (dict(strategy="mtp"), ValueError, "'mtp' needs an MTPModel"),
        (dict(acceptance="maybe"), ValueError, "unknown acceptance"),
        (dict(kernels="magic"), ValueError, "unknown kernels"),
        (dict(temperature=-0.1), ValueError, "temperature must be"),
        (dict(temperature=1.0, top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(temperature=1.0, top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(cuda_graph=True), ValueError, "cuda_graph=True needs the model on a CUDA device"),
        (dict(tree=Tree.chain(2)), ValueError, "tree applies to strategy"),
        (dict(strategy="medusa", tree=[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]), ValueError, "only 3 draft heads"),
        (dict(strategy="medusa", tree=[[0], [0]]), ValueError, "appears twice"),
        (dict(strategy="medusa", temperature=0.5), ValueError, "acceptance 'greedy' decodes deterministically"),
        (dict(strategy="medusa", acceptance="typical"), ValueError, "needs temperature > 0"),
    ],
)
def test_bad_input(medusa_model, kwargs, error, message):
    if torch.cuda.is_available() and kwargs.get("cuda_graph"):
        pytest.skip("cuda_graph is valid on this machine")
    args = dict(input_ids=[1, 2, 3], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        generate(medusa_model, **args)


def test_medusa_strategy_needs_medusa_heads(mtp_model, gpt2_model):
    with pytest.raises(ValueError, match="'medusa' needs a MedusaModel"):
        generate(mtp_model, [1, 2], max_new_tokens=2, strategy="medusa")
    with pytest.raises(ValueError, match="'mtp' needs an MTPModel"):
        generate(gpt2_model, [1, 2], max_new_tokens=2, strategy="mtp")


def test_writing_past_the_cache_raises(gpt2_model):
    cache = gpt2_model.new_cache(1, 4)
    with pytest.raises(RuntimeError, match="KV cache overflow"):
        prefill(gpt2_model, cache, torch.arange(5), heads=1)


# ----------------------------------------------------------------------------- CUDA graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("strategy", ["ntp", "medusa", "mtp"])
def test_cuda_graph_matches_eager(medusa_model, mtp_model, strategy):
    model = (mtp_model if strategy == "mtp" else medusa_model).cuda()
    try:
        for prompt in PROMPTS[:4]:
            for kernels in ("eager", "fused"):
                eager = generate(model, prompt, max_new_tokens=MAX_NEW, strategy=strategy, kernels=kernels)
                graph = generate(model, prompt, max_new_tokens=MAX_NEW, strategy=strategy, kernels=kernels,
                                 cuda_graph=True)
                assert_same_greedy_tokens(model, prompt, graph.tokens, eager.tokens)
    finally:
        model.cpu()
