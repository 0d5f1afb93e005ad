"""Batched decoding (``mtpkern.batch``): every greedy row token-identical to batch-1 greedy ntp
of that prompt alone, for ntp, mtp and medusa, chains and trees, with EOS mid-batch, B = 1, B
larger than the number of distinct prompts, prompts of mixed lengths (lists and a padded
tensor with a mask); sampled rows drawing from their own streams as batch 1 does; typical
acceptance per row; and the bad inputs."""

import pytest
import torch

from _tiny import random_prompts
from mtpkern import Decoder
from mtpkern.batch import BatchDecoder
from mtpkern.generation import generate
from mtpkern.inputs import split_padded

PROMPTS = random_prompts(24, seed=33, min_len=2, max_len=30)
MAX_NEW = 20


def _reference(model, prompts, eos=None):
    ntp = Decoder(model, "ntp")
    return [ntp.generate(p, max_new_tokens=MAX_NEW, eos_token_id=eos).tokens for p in prompts]


@pytest.mark.parametrize("strategy, tree", [("ntp", None), ("medusa", None), ("medusa", "chain:2"),
                                            ("medusa", "3,2,1"), ("mtp", None), ("mtp", "2,1,1")])
def test_batched_greedy_equals_each_prompt_alone(gpt2_model, medusa_model, mtp_model, strategy, tree):
    model = {"ntp": gpt2_model, "medusa": medusa_model, "mtp": mtp_model}[strategy]
    want = _reference(model, PROMPTS)
    dec = BatchDecoder(model, strategy, tree=tree, max_batch=len(PROMPTS))
    got = dec.generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert [r.tokens for r in got] == want
    if strategy != "ntp":
        assert max(max(r.accept_lengths) for r in got) > 1  # the drafts are accepted, not only the roots
    for r in got:
        assert sum(r.accept_lengths) >= len(r.tokens) - 1 and r.num_steps == len(r.accept_lengths)


@pytest.mark.parametrize("strategy", ["medusa", "mtp"])
def test_eos_mid_batch_and_rows_of_their_own_length(medusa_model, mtp_model, strategy):
    """Each row stops at its own EOS (a different token per row: the one its plain output has
    at a row-dependent position) while the others go on."""
    model = medusa_model if strategy == "medusa" else mtp_model
    prompts = PROMPTS[:12]
    full = _reference(model, prompts)
    dec = BatchDecoder(model, strategy, max_batch=12)
    for b, (p, ref) in enumerate(zip(prompts, full)):
        eos = ref[3 + b % 9]
        want = ref[: ref.index(eos) + 1]
        # the whole batch with this row's EOS: every row ends at its own first occurrence of it
        got = dec.generate(prompts, max_new_tokens=MAX_NEW, eos_token_id=eos)
        assert got[b].tokens == want
        for other, r in zip(full, got):
            assert r.tokens == (other[: other.index(eos) + 1] if eos in other else other)


def test_one_row_and_more_rows_than_distinct_prompts(medusa_model):
    want = _reference(medusa_model, PROMPTS[:3])
    dec = BatchDecoder(medusa_model, "medusa", max_batch=16)
    assert [r.tokens for r in dec.generate(PROMPTS[:1], max_new_tokens=MAX_NEW)] == want[:1]
    batch = [PROMPTS[i % 3] for i in range(16)]  # each prompt five or six times
    got = dec.generate(batch, max_new_tokens=MAX_NEW)
    assert [r.tokens for r in got] == [want[i % 3] for i in range(16)]
    # the decoder is reused: a later, smaller batch is unaffected by the rows it left in the cache
    assert [r.tokens for r in dec.generate(PROMPTS[1:3], max_new_tokens=MAX_NEW)] == want[1:3]


def test_padded_tensor_with_a_mask(medusa_model):
    prompts = PROMPTS[:5]
    width = max(len(p) for p in prompts) + 2
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        start = 0 if b % 2 else width - len(p)  # right padding on odd rows, left padding on even rows
        ids[b, start : start + len(p)] = torch.tensor(p)
        mask[b, start : start + len(p)] = 1
    got = generate(medusa_model, ids, attention_mask=mask, strategy="medusa", max_new_tokens=MAX_NEW)
    assert [r.tokens for r in got] == _reference(medusa_model, prompts)
    same = [PROMPTS[0], PROMPTS[0]]
    square = torch.tensor(same)
    assert [r.tokens for r in generate(medusa_model, square, strategy="medusa", max_new_tokens=8)] == [
        r.tokens for r in generate(medusa_model, same, strategy="medusa", max_new_tokens=8)]


def test_bad_inputs(medusa_model):
    dec = BatchDecoder(medusa_model, "medusa", max_batch=4)
    ctx = medusa_model.config.n_positions
    cases = [
        (lambda: dec.generate([[1, 2], []], max_new_tokens=4), ValueError, "prompt 1: the prompt is empty"),
        (lambda: dec.generate([[1, 2], [3] * (ctx - 2)], max_new_tokens=8), ValueError,
         f"prompt 1 ({ctx - 2} tokens) + max_new_tokens (8) + tree ("),
        (lambda: dec.generate([[1]] * 5, max_new_tokens=4), ValueError, "5 prompts, but this decoder's cache holds 4 rows"),
        (lambda: dec.generate([], max_new_tokens=4), ValueError, "no prompts"),
        (lambda: dec.generate([[1, 99999]], max_new_tokens=4), ValueError, "prompt 0: token id 99999 is outside"),
        (lambda: dec.generate([[1.5, 2.0]], max_new_tokens=4), TypeError, "prompt 0: input_ids must hold integer"),
        (lambda: dec.generate("hello", max_new_tokens=4), TypeError, "prompts must be a list of token sequences"),
        (lambda: dec.generate([[1, 2]], max_new_tokens=0), ValueError, "max_new_tokens must be an int >= 1"),
        (lambda: dec.generate(torch.ones(2, 3, dtype=torch.long), max_new_tokens=4,
                              attention_mask=torch.tensor([[1, 0, 1], [1, 1, 1]])), ValueError,
         "row 0 of attention_mask has padding between real tokens (a hole at position 1)"),
        (lambda: dec.generate(torch.ones(2, 3, dtype=torch.long), max_new_tokens=4,
                              attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]])), ValueError,
         "row 0 of attention_mask is all padding"),
        (lambda: dec.generate(torch.ones(2, 3, dtype=torch.long), max_new_tokens=4,
                              attention_mask=torch.ones(2, 4)), ValueError, "attention_mask (2, 4) and input_ids (2, 3)"),
        (lambda: dec.generate(torch.ones(2, 3, dtype=torch.long), max_new_tokens=4,
                              attention_mask=torch.full((2, 3), 2)), ValueError, "0 (padding) and 1 (token) only"),
        (lambda: BatchDecoder(medusa_model, "medusa", max_batch=0), ValueError, "max_batch must be an int >= 1"),
        (lambda: BatchDecoder(medusa_model, "medusa", tree="dynamic"), ValueError, "batched decoding takes static trees"),
        (lambda: BatchDecoder(medusa_model, "mtp"), ValueError, "strategy 'mtp' needs an MTPModel"),
        (lambda: BatchDecoder(medusa_model, "medusa", kernels="magic"), ValueError, "unknown kernels 'magic'"),
    ]
    for call, kind, match in cases:
        with pytest.raises(kind) as info:
            call()
        assert match in str(info.value) and "\n" not in str(info.value), (match, str(info.value))


def test_split_padded():
    ids = torch.tensor([[0, 5, 6], [7, 8, 0]])
    got = split_padded(ids, torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=torch.bool))
    assert [g.tolist() for g in got] == [[5, 6], [7, 8]]


def test_generate_takes_a_batch(medusa_model):
    """``mtpkern.generate`` with a list of prompts returns one result per prompt; a [1, T]
    tensor stays batch 1 (one result), and a Decoder refuses a batch, naming the engines that take one."""
    from mtpkern import generate

    got = generate(medusa_model, PROMPTS[:4], strategy="medusa", max_new_tokens=MAX_NEW)
    assert isinstance(got, list) and [r.tokens for r in got] == _reference(medusa_model, PROMPTS[:4])
    one = generate(medusa_model, torch.tensor([PROMPTS[0]]), strategy="medusa", max_new_tokens=MAX_NEW)
    assert one.tokens == got[0].tokens
    with pytest.raises(ValueError, match="mtpkern.BatchDecoder or mtpkern.generate decode a batch"):
        Decoder(medusa_model, "medusa").generate(torch.tensor([PROMPTS[0][:3], PROMPTS[1][:3]]), max_new_tokens=4)


@pytest.mark.parametrize("strategy", ["medusa", "mtp"])
def test_batches_of_one(medusa_model, mtp_model, strategy):
    """B = 1 takes batch 1's own drafting path (MTP's grouped head blocks): same tokens."""
    model = medusa_model if strategy == "medusa" else mtp_model
    dec = BatchDecoder(model, strategy, tree="2,1,1" if strategy == "mtp" else None, max_batch=1)
    want = _reference(model, PROMPTS[:6])
    got = [dec.generate([p], max_new_tokens=MAX_NEW)[0] for p in PROMPTS[:6]]
    assert [r.tokens for r in got] == want
    assert max(max(r.accept_lengths) for r in got) > 1


# ---------------------------------------------------------------- sampling, one stream per row


def test_each_row_samples_as_batch_one_from_its_generator(gpt2_model, medusa_model):
    """Row b with generator seed s draws the tokens batch 1 draws with seed s: ntp sampling
    (temperature, top-k, top-p) and MEDUSA's rejection sampling along a chain."""
    from mtpkern import generate

    prompts = PROMPTS[:6]
    for model, kw in ((gpt2_model, dict(strategy="ntp", temperature=0.9, top_k=20, top_p=0.95)),
                      (medusa_model, dict(strategy="medusa", acceptance="rejection", temperature=0.8))):
        want = [generate(model, p, max_new_tokens=MAX_NEW, generator=torch.Generator().manual_seed(100 + b), **kw).tokens
                for b, p in enumerate(prompts)]
        dec = BatchDecoder(model, max_batch=6, **kw)
        got = dec.generate(prompts, max_new_tokens=MAX_NEW,
                           generator=[torch.Generator().manual_seed(100 + b) for b in range(6)])
        assert [r.tokens for r in got] == want, kw
        if kw["strategy"] == "medusa":
            assert max(max(r.accept_lengths) for r in got) > 1
        # the same seeds in another order: the rows follow their own streams, not their positions
        again = dec.generate(prompts[::-1], max_new_tokens=MAX_NEW,
                             generator=[torch.Generator().manual_seed(105 - b) for b in range(6)])
        assert [r.tokens for r in again] == want[::-1]


def test_typical_acceptance_per_row(medusa_model):
    from mtpkern import generate

    kw = dict(strategy="medusa", acceptance="typical", temperature=0.7)
    want = [generate(medusa_model, p, max_new_tokens=MAX_NEW, **kw).tokens for p in PROMPTS[:8]]
    got = generate(medusa_model, PROMPTS[:8], max_new_tokens=MAX_NEW, **kw)
    assert [r.tokens for r in got] == want
    assert max(max(r.accept_lengths) for r in got) > 1


def test_generate_seeds_the_rows_from_its_generator(gpt2_model):
    from mtpkern import generate

    kw = dict(max_new_tokens=8, temperature=1.0)
    a = generate(gpt2_model, PROMPTS[:4], generator=torch.Generator().manual_seed(7), **kw)
    b = generate(gpt2_model, PROMPTS[:4], generator=torch.Generator().manual_seed(7), **kw)
    c = generate(gpt2_model, [PROMPTS[0]] * 4, generator=torch.Generator().manual_seed(7), **kw)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert len({tuple(r.tokens) for r in c}) > 1  # one prompt, four streams: not four copies


def test_generators_are_checked(gpt2_model, medusa_model):
    dec = BatchDecoder(gpt2_model, temperature=1.0, max_batch=4)
    g = torch.Generator().manual_seed(0)
    for gens, error, match in (([g], ValueError, "1 generators for 2 prompts"),
                               ([g, g], ValueError, "independent random streams"),
                               ([g, "seed"], TypeError, "generator 1: generator must be a torch.Generator, got str")):
        with pytest.raises(error, match=match):
            dec.generate(PROMPTS[:2], max_new_tokens=4, generator=gens)
    with pytest.raises(ValueError, match="batched decoding takes static trees"):
        BatchDecoder(medusa_model, "medusa", acceptance="rejection", temperature=1.0, tree="dynamic")


def test_verification_without_the_extension(monkeypatch, medusa_model):
    """Without the C++ kernels the batch is verified by the eager batched rule: same tokens."""
    from mtpkern.ops import _backend

    want = _reference(medusa_model, PROMPTS[:8])
    monkeypatch.setattr(_backend, "HAS_CUDA_EXT", False)
    got = BatchDecoder(medusa_model, "medusa", tree="3,2,1", max_batch=8).generate(PROMPTS[:8], max_new_tokens=MAX_NEW)
    assert [r.tokens for r in got] == want


@pytest.mark.slow
@pytest.mark.parametrize("strategy, tree", [("ntp", None), ("medusa", "3,2,1"), ("mtp", None)])
def test_fused_kernels_per_row(gpt2_model, medusa_model, mtp_model, strategy, tree):
    """kernels="fused": ln_qkv writes every row at its own slots, tree attention reads every
    row's prefix length (Triton's interpreter here): each row as batch-1 greedy decoding."""
    import copy

    from _tiny import assert_same_greedy_tokens

    model = {"ntp": gpt2_model, "medusa": medusa_model, "mtp": mtp_model}[strategy]
    model = copy.deepcopy(model).to("cuda" if torch.cuda.is_available() else "cpu")  # Triton needs CUDA tensors there
    prompts = PROMPTS[:5]
    dec = BatchDecoder(model, strategy, tree=tree, max_batch=5, kernels="fused")
    assert dec.fused and not BatchDecoder(model, strategy, tree=tree, kernels="eager").fused
    assert BatchDecoder(model, strategy, tree=tree).fused == (model.device.type == "cuda")  # "auto"
    got = dec.generate(prompts, max_new_tokens=10)
    for p, r in zip(prompts, got):
        want = Decoder(model, "ntp", kernels="eager").generate(p, max_new_tokens=10).tokens
        assert_same_greedy_tokens(model, p, r.tokens, want)  # on a GPU a near-tie may round either way
    if strategy != "ntp":  # the drafts (the logits kernel's top-k) are accepted, not only the roots
        assert max(max(r.accept_lengths) for r in got) > 1


# ---------------------------------------------------------------- CUDA graphs


def _fake_rows(mode, rows):
    """``rows`` (a ``mtpkern.steps.Rows``) with every tensor a fake one of ``mode``."""
    import copy

    from mtpkern.layers import KVCache

    fake = copy.copy(rows)
    for name in ("root", "topk", "logp", "prefix", "active", "index"):
        setattr(fake, name, mode.from_tensor(getattr(rows, name)))
    with mode:
        fake.at = fake.prefix[0]
    fake.cache = KVCache.from_tensors(mode.from_tensor(rows.cache.k), mode.from_tensor(rows.cache.v))
    return fake


@pytest.mark.parametrize("strategy, tree, kw", [("ntp", None, {}), ("medusa", "3,2,1", {}), ("mtp", None, {}),
                                                ("mtp", "2,1,1", {}),
                                                ("medusa", None, dict(acceptance="typical", temperature=0.7))])
def test_a_batch_step_never_syncs(gpt2_model, medusa_model, mtp_model, strategy, tree, kw):
    """What lets a CUDA graph capture the whole step: a step of many rows, with fused kernels
    or eager attention (its per-row mask built on the device), reads no device value on the
    host. Under a fake-tensor mode any such read (``.item()``, ``int(t)``, ``.tolist()``, a
    data-dependent shape) raises (``test_the_sync_check_fails_on_a_step_that_syncs``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import copy

    # a copy: under the fake mode the model would keep fake stacked weights (model._stacked)
    model = copy.deepcopy({"ntp": gpt2_model, "medusa": medusa_model, "mtp": mtp_model}[strategy])
    for kernels in ("fused", "eager"):
        dec = BatchDecoder(model, strategy, tree=tree, max_batch=3, kernels=kernels, **kw)
        rows = dec.state(3)
        rows.prefix.copy_(torch.tensor([5, 9, 2]))
        rows.active.fill_(True)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode, torch.inference_mode():
            out = dec.step.body(_fake_rows(mode, rows), None)
            assert out.shape == (3, 1 + dec.step.T if dec.step.T == 1 else 1 + dec.step.heads)


def test_the_sync_check_fails_on_a_step_that_syncs(medusa_model):
    """The check above can fail: a dynamic tree's step with the eager ``tree_buffers`` (which
    reads the tree's shape on the host, the one step no graph captures whole) raises under it."""
    import copy

    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    dec = Decoder(copy.deepcopy(medusa_model), "medusa", tree="dynamic:6", kernels="eager")
    assert not dec.whole_step_graph  # the engine knows: its graphs replay the forward pass alone
    rows = dec.state(1)
    rows.prefix.fill_(5)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.inference_mode(), pytest.raises(DataDependentOutputException):
        dec.step.body(_fake_rows(mode, rows), None)


# Graphed batches on this CPU, under a fake of torch's graph primitives: tests/test_graphs.py.


def test_graphed_batches_need_cuda(medusa_model):
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        BatchDecoder(medusa_model, "medusa", cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("strategy, tree", [("ntp", None), ("medusa", None), ("medusa", "3,2,1"), ("mtp", None)])
def test_cuda_graph_batches_on_the_gpu(gpt2_model, medusa_model, mtp_model, strategy, tree):
    import copy

    from _tiny import assert_same_greedy_tokens

    model = copy.deepcopy({"ntp": gpt2_model, "medusa": medusa_model, "mtp": mtp_model}[strategy]).cuda()
    graph = BatchDecoder(model, strategy, tree=tree, max_batch=12, cuda_graph=True)
    plain = BatchDecoder(model, strategy, tree=tree, max_batch=12)
    for prompts in (PROMPTS[:12], PROMPTS[12:17], PROMPTS[:12]):
        got = graph.generate(prompts, max_new_tokens=MAX_NEW)
        want = plain.generate(prompts, max_new_tokens=MAX_NEW)
        for p, a, b in zip(prompts, got, want):
            assert_same_greedy_tokens(model, p, a.tokens, b.tokens)
    assert sorted(graph._graphs) == [5, 12]


def test_one_generator_seeds_the_rows_as_generate_does(gpt2_model):
    """``generator`` is one name for one idea in both engines: a list gives each row its stream,
    one torch.Generator seeds them (what mtpkern.generate passes), reproducibly."""
    dec = BatchDecoder(gpt2_model, temperature=1.0, max_batch=4)
    a = dec.generate(PROMPTS[:3], max_new_tokens=6, generator=torch.Generator().manual_seed(7))
    b = generate(gpt2_model, PROMPTS[:3], max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(7))
    c = dec.generate(PROMPTS[:3], max_new_tokens=6, generator=torch.Generator().manual_seed(8))
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]
