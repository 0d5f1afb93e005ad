"""The Decoder engine: dynamic and auto trees are lossless (token-identical to greedy ntp, with
trained and with perturbed random heads, with EOS), one decoder serves many prompts, a step
syncs with the host once, the dynamic tree is the best N paths, tree specs parse one way."""

import functools
import gc

import pytest
import torch

import mtpkern.autotree as autotree_mod
from _tiny import N_DRAFT_HEADS, random_prompts
from mtpkern import Decoder, generate
from mtpkern.core import dynamic_tree, level_sizes
from mtpkern.costmodel import step_cost_tree, time_step
from mtpkern.options import default_tree
from mtpkern.models import MedusaModel, MTPModel
from mtpkern.ops import _backend
from mtpkern.tree import Tree

N_PROMPTS = 20
MAX_NEW = 24
PROMPTS = random_prompts(N_PROMPTS, seed=21)


@functools.lru_cache(maxsize=None)
def perturbed(kind: str):
    """Heads that are neither trained nor copies of the base: the trained tiny GPT-2 with
    MEDUSA or MTP heads whose weights get random noise, so drafts are often wrong."""
    from _tiny import tiny_gpt2

    torch.manual_seed(5)
    base = tiny_gpt2()
    if kind == "medusa":
        model = MedusaModel.from_base(base, n_heads=1 + N_DRAFT_HEADS)
        params = model.medusa.parameters()
    else:
        model = MTPModel.from_base(base, n_heads=1 + N_DRAFT_HEADS)
        params = model.heads[1:].parameters()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def models(medusa_model, mtp_model):
    return [("medusa", medusa_model), ("mtp", mtp_model), ("medusa", perturbed("medusa")),
            ("mtp", perturbed("mtp"))]


def check_lossless(model, strategy, tree):
    """One decoder per setting, reused over every prompt, with and without EOS: the tokens
    equal greedy ntp's. Returns the mean accepted length."""
    ntp, spec = Decoder(model, "ntp"), Decoder(model, strategy, tree=tree)
    accepted = []
    for prompt in PROMPTS:
        ref = ntp.generate(prompt, max_new_tokens=MAX_NEW)
        out = spec.generate(prompt, max_new_tokens=MAX_NEW)
        assert out.tokens == ref.tokens, (strategy, tree, prompt)
        accepted += out.accept_lengths
        eos = ref.tokens[MAX_NEW // 2]
        expected = ref.tokens[: ref.tokens.index(eos) + 1]
        assert spec.generate(prompt, max_new_tokens=MAX_NEW, eos_token_id=eos).tokens == expected, prompt
    return sum(accepted) / len(accepted)


@pytest.mark.parametrize("tree", ["dynamic", "dynamic:5", "auto"])
def test_dynamic_and_auto_trees_are_lossless(medusa_model, mtp_model, tree):
    """("auto" without calibration is the default tree: its warning has a test of its own.)"""
    import warnings

    for i, (strategy, model) in enumerate(models(medusa_model, mtp_model)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            accept = check_lossless(model, strategy, tree)
        if i < 2:  # trained heads: drafts are really accepted
            assert accept > 1.5, (strategy, tree, accept)


def test_dynamic_tree_accepts_at_least_the_chain(medusa_model):
    """The dynamic tree of N nodes holds the top-1 chain whenever N >= the depth (the chain's
    nodes score highest at every depth), so it accepts at least as much per step."""
    chain = Decoder(medusa_model, "medusa", tree=Tree.chain(N_DRAFT_HEADS))
    dyn = Decoder(medusa_model, "medusa", tree=f"dynamic:{2 * N_DRAFT_HEADS}")
    a = [chain.generate(p, max_new_tokens=MAX_NEW) for p in PROMPTS[:8]]
    b = [dyn.generate(p, max_new_tokens=MAX_NEW) for p in PROMPTS[:8]]
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert sum(r.num_steps for r in b) <= sum(r.num_steps for r in a)


def test_dynamic_tree_is_the_best_paths():
    """dynamic_tree against brute force: every path of ranks < k up to depth D, the N best by
    summed log-probability (distinct random scores, so the answer is unique)."""
    import itertools

    g = torch.Generator().manual_seed(0)
    for D, k, N in [(1, 4, 3), (2, 3, 5), (3, 3, 9), (3, 2, 14), (4, 5, 12)]:
        logp = torch.log_softmax(torch.randn(D, 8, generator=g), -1).topk(k).values  # sorted per head
        ids = torch.arange(D * k).view(D, k) + 100  # token = 100 + d * k + rank: names its node
        sizes = level_sizes(N, k, D)
        parents, tokens = dynamic_tree(logp, ids, N, sizes)
        parents, tokens = parents.tolist(), tokens.tolist()
        assert len(parents) == N + 1 and all(0 <= p < i for i, p in enumerate(parents) if i)

        def path(node):  # the ranks root..node
            out = []
            while node:
                out.append((tokens[node - 1] - 100) % k)
                node = parents[node]
            return tuple(reversed(out))

        got = {path(i) for i in range(1, N + 1)}
        every = [p for d in range(1, D + 1) for p in itertools.product(range(k), repeat=d)]
        score = {p: sum(float(logp[i, r]) for i, r in enumerate(p)) for p in every}
        best = set(sorted(every, key=lambda p: -score[p])[:N])
        assert got == best, (D, k, N)
        for i in range(1, N + 1):  # each node's token is its depth's head's token at its rank
            p = path(i)
            assert tokens[i - 1] == int(ids[len(p) - 1, p[-1]])


def test_decoder_serves_many_prompts(medusa_model):
    """One decoder, prompts of different lengths in turn, some twice: each result equals a
    fresh generate() call, so nothing of one prompt leaks into the next."""
    dec = Decoder(medusa_model, "medusa", tree="3,2,1")
    order = [PROMPTS[i] for i in (0, 5, 1, 0, 9, 5)]
    for prompt in order:
        fresh = generate(medusa_model, prompt, max_new_tokens=MAX_NEW, strategy="medusa", tree=Tree.parse("3,2,1"))
        assert dec.generate(prompt, max_new_tokens=MAX_NEW).tokens == fresh.tokens
    assert dec.tree_nodes == len(Tree.parse("3,2,1"))


@pytest.mark.skipif(not _backend.HAS_CUDA_EXT, reason="the sync-free verification and compaction are the extension's")
@pytest.mark.parametrize("strategy, kw", [
    ("ntp", {}),
    ("medusa", dict(tree="3,2,1")),
    ("mtp", {}),
    ("medusa", dict(tree="dynamic:6")),
    ("medusa", dict(tree="2,2", acceptance="typical", temperature=0.7)),
    ("mtp", dict(acceptance="rejection", temperature=0.8)),
], ids=["ntp", "tree", "chain", "dynamic", "typical", "rejection"])
def test_one_host_sync_per_step(medusa_model, mtp_model, monkeypatch, strategy, kw):
    """Count every way a tensor's value reaches Python during the decode loop's steps."""
    model = mtp_model if strategy == "mtp" else medusa_model
    dec = Decoder(model, strategy, **kw)
    calls = []
    real_run = dec._run_step

    def run_step(rows, prefix):
        calls.append("step")
        return real_run(rows, prefix)

    def spy(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            calls.append(name)
            return real(self, *a, **k)
        return wrapper

    gen = torch.Generator().manual_seed(0)
    dec.generate(PROMPTS[0], max_new_tokens=4, generator=gen)  # warm-up
    monkeypatch.setattr(dec, "_run_step", run_step)
    for name in ("tolist", "item", "__int__", "__bool__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    prompt = torch.tensor(PROMPTS[3])
    out = dec.generate(prompt, max_new_tokens=MAX_NEW, generator=gen)
    monkeypatch.undo()
    steps = calls.count("step")
    assert steps == out.num_steps > 0
    # Per step exactly one tolist; before the loop: the prompt's range check (min and max)
    # and the first token's tolist.
    after_first_step = calls[calls.index("step"):]
    assert after_first_step == ["step", "tolist"] * steps, calls


def test_auto_without_calibration_falls_back_and_says_so(medusa_model, monkeypatch):
    monkeypatch.setattr(autotree_mod, "_warned_uncalibrated", False)
    with pytest.warns(UserWarning, match="tree='auto'"):
        dec = Decoder(medusa_model, "medusa", tree="auto")
    assert dec.tree == default_tree(medusa_model, "medusa")
    with _no_warning():
        Decoder(medusa_model, "medusa", tree="auto")  # once


class _no_warning:
    def __enter__(self):
        import warnings

        self.ctx = warnings.catch_warnings()
        self.ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        return False


def test_auto_is_the_default_with_calibration(medusa_model, monkeypatch):
    """With calibration, tree=None and tree="auto" take autotree.auto_tree's tree, asked for
    this model, kernels and graph setting (planned by the Decoder, above the core it runs)."""
    asked = []

    def auto_tree(model, *, kernels, cuda_graph, max_nodes=None):
        asked.append((model, kernels, cuda_graph))
        return Tree.chain(2)

    monkeypatch.setattr(autotree_mod, "auto_tree", auto_tree)
    monkeypatch.setattr(autotree_mod, "has_calibration", lambda model: True)
    assert Decoder(medusa_model, "medusa").tree == Tree.chain(2)
    assert Decoder(medusa_model, "medusa", tree="auto", kernels="eager").tree == Tree.chain(2)
    assert asked == [(medusa_model, "auto", False), (medusa_model, "eager", False)]
    assert Decoder(medusa_model, "medusa", tree="2,1").tree == Tree.parse("2,1")  # a given tree wins


@pytest.mark.parametrize("spec, message", [
    ("dynamic:0", "node budget"), ("dynamic:x", "node budget"), ("dynamic:100000", "node budget"),
    ("chain:0", "chain needs"), ("chain:x", "chain needs"), ("4;2", "not 'mc_sim_7b_63'"),
])
def test_bad_tree_specs(medusa_model, spec, message):
    with pytest.raises(ValueError, match=message) as info:
        Decoder(medusa_model, "medusa", tree=spec)
    assert "\n" not in str(info.value)


def test_generator_on_another_device(medusa_model):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU: a CPU generator with a CUDA model")
    model = medusa_model.cuda()
    try:
        with pytest.raises(ValueError, match="generator is on cpu"):
            generate(model, PROMPTS[0], max_new_tokens=4, temperature=0.5, generator=torch.Generator())
    finally:
        model.cpu()


def test_step_cost_tree_and_time_step(medusa_model, gpt2_model):
    for n in (2, 5, 17, 40):
        tree = step_cost_tree(n, N_DRAFT_HEADS)
        assert len(tree) == n and tree.max_depth <= N_DRAFT_HEADS
    for n in (1, 8):
        t = time_step(medusa_model, n, iters=3)
        assert 0 < t < 5
    with pytest.raises(ValueError, match="no draft heads"):
        time_step(gpt2_model, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("tree", ["3,2,1", "dynamic:6", None])
def test_whole_step_cuda_graph_matches_eager(medusa_model, mtp_model, tree):
    for strategy, model in (("medusa", medusa_model), ("mtp", mtp_model)):
        model = model.cuda()
        try:
            for kernels in ("auto", "eager"):
                graph = Decoder(model, strategy, tree=tree, kernels=kernels, cuda_graph=True)
                eager = Decoder(model, strategy, tree=tree, kernels=kernels)
                for prompt in PROMPTS[:6]:
                    assert (graph.generate(prompt, max_new_tokens=MAX_NEW).tokens
                            == eager.generate(prompt, max_new_tokens=MAX_NEW).tokens), (strategy, tree, kernels)
        finally:
            model.cpu()


def test_capture_runs_with_the_collector_off_after_a_collection():
    """A collection inside a CUDA-graph capture may destroy a dropped decoder's graph, which
    invalidates the capture: captures run after a collection, with the collector off."""
    from mtpkern.graphs import no_collection as _no_collection

    class Cycle:
        collected = False

        def __init__(self):
            self.me = self

        def __del__(self):
            Cycle.collected = True

    Cycle()  # unreachable, in a reference cycle: only the cyclic collector frees it
    assert gc.isenabled()
    with _no_collection():
        assert Cycle.collected and not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with _no_collection():
            pass
        assert not gc.isenabled()  # a caller's choice to keep it off is kept
    finally:
        gc.enable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captures_survive_dropped_decoders(medusa_model):
    """Decoders created and dropped one after another, the collector running at nearly every
    allocation: no capture may be invalidated by an old graph's destruction."""
    model = medusa_model.cuda()
    threshold = gc.get_threshold()
    gc.set_threshold(1)
    try:
        first = None
        for tree in ("chain:1", "chain:2", "3,2,1", None):
            out = Decoder(model, "medusa", tree=tree, kernels="auto", cuda_graph=True).generate(PROMPTS[0], max_new_tokens=8)
            first = first or out.tokens
            assert out.tokens == first, tree
    finally:
        gc.set_threshold(*threshold)
        model.cpu()


def test_dynamic_tree_with_fused_kernels(medusa_model, mtp_model):
    """The fused path (Triton's interpreter on CPU): log-probabilities from the fused logits
    kernel, the packed mask of a per-step tree through tree attention."""
    for strategy, model in (("medusa", medusa_model), ("mtp", mtp_model)):
        ntp = Decoder(model, "ntp", kernels="eager")
        fused = Decoder(model, strategy, tree="dynamic:6", kernels="fused")
        for prompt in PROMPTS[:2]:
            out = fused.generate(prompt, max_new_tokens=12)
            assert out.tokens == ntp.generate(prompt, max_new_tokens=12).tokens, (strategy, prompt)
            assert max(out.accept_lengths) > 1


@pytest.mark.parametrize("strategy", ["ntp", "mtp", "medusa"])
@pytest.mark.parametrize("kernels", ["eager", "fused"])
def test_nan_logits_are_a_clear_error_not_a_token(strategy, kernels, gpt2_model, mtp_model, medusa_model):
    """A model whose head-0 logits turn NaN (one NaN unembedding row) stops with a one-line error:
    no backend may turn NaN logits into a valid-looking token, or feed -1 to the embedding."""
    import copy

    model = copy.deepcopy({"ntp": gpt2_model, "mtp": mtp_model, "medusa": medusa_model}[strategy])
    with torch.no_grad():
        model.head_weight(0)[7] = float("nan")
    prompt = random_prompts(1, seed=3)[0]
    with pytest.raises(ValueError, match="logits are NaN at generated token 0"):
        generate(model, prompt, max_new_tokens=8, strategy=strategy, kernels=kernels)


@pytest.mark.parametrize("kind", ["mtp", "medusa"])
@pytest.mark.parametrize("tree", ["chain:3", "3,2,1"])
def test_draft_heads_see_what_a_full_forward_sees(kind, tree, medusa_model, mtp_model):
    """The next drafts come from the accepted nodes alone (MTP with eager attention: its head
    blocks run over every tree node in the verification pass, their K/V of rejected nodes moved
    away or overwritten; with fused kernels, over the accepted path): at every step, the draft
    heads' hidden states equal those of one causal forward pass over the whole decoded sequence
    at the last accepted position."""
    model = medusa_model if kind == "medusa" else mtp_model
    dec = Decoder(model, kind, tree=tree)
    drafts = dec.step._drafts
    accepted = []
    for prompt in PROMPTS[:4]:
        seen = []
        dec.step._drafts = lambda s, h: (seen.append(h[0].clone()), drafts(s, h))[1]
        out = dec.generate(prompt, max_new_tokens=MAX_NEW)
        assert len(seen) == 1 + len(out.accept_lengths)  # begin, then one per step
        seq = torch.tensor(list(prompt) + out.tokens)
        with torch.no_grad():
            full = model(seq[None], heads=dec.step.heads, logits=False).hidden[0]  # [L, J, D]
        pos = len(prompt) - 1
        for h, n in zip(seen, [0] + out.accept_lengths):
            pos += n
            if pos < len(seq):  # the last step may accept past max_new_tokens
                torch.testing.assert_close(h, full[pos, 1:], atol=2e-5, rtol=1e-4)
        accepted += out.accept_lengths
    assert len(set(accepted)) > 1  # short and long accepted paths both happened


def test_stacked_head_weights_follow_the_parameters():
    """The draft heads' stacked weights are refreshed when a head's parameters change in place."""
    model = perturbed("medusa")
    x = torch.randn(1, 2, model.config.n_embd)
    with torch.no_grad():
        before = model.draft_hidden(x, N_DRAFT_HEADS)
        model.medusa[0].blocks[0].linear.weight.add_(1.0)
        after = model.draft_hidden(x, N_DRAFT_HEADS)
        model.medusa[0].blocks[0].linear.weight.sub_(1.0)
        again = model.draft_hidden(x, N_DRAFT_HEADS)
    ref = torch.stack([model.medusa[k](x[0, -1]) for k in range(N_DRAFT_HEADS)])
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1:], after[1:])
    torch.testing.assert_close(again, ref)


def test_stacked_head_weights_follow_a_dtype_change():
    """After model.to(another dtype) the draft heads' stacked weights are rebuilt in that dtype
    (kept ones are only refreshed in place when shape, dtype and device all match)."""
    model = MedusaModel.from_base(perturbed("medusa").base, n_heads=1 + N_DRAFT_HEADS).eval()
    x = torch.randn(1, 2, model.config.n_embd)
    with torch.no_grad():
        model.draft_hidden(x, N_DRAFT_HEADS)
        model.to(torch.float64)
        out = model.draft_hidden(x.double(), N_DRAFT_HEADS)
    assert out.dtype == torch.float64
