"""Rejection sampling on trees keeps the model's distribution (issue 26), through the engines.

``acceptance="rejection"`` on a tree of width 3 and depth 2: drafts sampled without replacement
from the heads, verified by ``verify_rejection``. The joint distribution of the first three new
tokens (the prefill's root, then the first tree step's two) is compared with the exact one,
computed from the model's softmax over a 6-token vocabulary, by a chi-square test at a 1e-4
false-alarm rate (fixed seeds: deterministic). Each case also shows the test can fail: the same
samples are far from the distribution that takes the second token from the first draft head.
MEDUSA and MTP, on GPT-2 and on a Llama (grouped KV heads, rotary positions at each tree node),
temperature 0.7 and 1.0, top-k and top-p, one row and batches, heads both poor (random) and good
(fitted to the model's own distribution two tokens ahead).
"""

import pytest
import torch

from mtpkern.batch import BatchDecoder
from mtpkern.config import GPT2Config, LlamaConfig
from mtpkern.generation import generate
from mtpkern.models import GPT2, Llama, MedusaModel, MTPModel
from mtpkern.sampling import sampling_probs
from mtpkern.tree import Tree
from test_rejection_sampling import assert_differs, assert_matches

V = 6
PROMPT = [1, 4, 2]
TREE = Tree([[0], [1], [2], [0, 0], [0, 1], [1, 0]])  # width 3, depth 2


def _base(n_layer: int) -> GPT2:
    torch.manual_seed(0)
    base = GPT2(GPT2Config.tiny(vocab_size=V, n_embd=32, n_layer=n_layer, n_head=2, n_positions=32))
    with torch.no_grad():
        base.wte.weight.mul_(3.0)  # peaked but not one-hot
    return base


def _llama(n_layer: int) -> Llama:
    torch.manual_seed(0)
    base = Llama(LlamaConfig.tiny(vocab_size=V, n_embd=32, n_layer=n_layer, n_head=4, n_kv_head=2,
                                  intermediate_size=48, n_positions=32))
    with torch.no_grad():
        base.wte.weight.normal_(0.0, 1.0)  # every layer's input varies with the token
        base.unembed_weight.normal_(0.0, 0.3)  # peaked but not one-hot
    return base


def _poor(model):
    """Random draft heads: drafts both accepted and rejected."""
    with torch.no_grad():
        for p in (model.medusa if isinstance(model, MedusaModel) else model.heads[1:]).parameters():
            p.normal_(0.0, 1.0)
    return model.eval()


def _good(model: MedusaModel) -> MedusaModel:
    """MEDUSA heads fitted (a few hundred Adam steps) to the model's own sampling distribution at
    each head's distance, on sequences the model samples: drafts mostly accepted."""
    torch.manual_seed(1)
    with torch.no_grad():
        seqs = torch.stack([torch.tensor(generate(model, PROMPT, max_new_tokens=12, temperature=1.0).tokens)
                            for _ in range(64)])
        seqs = torch.cat([torch.tensor(PROMPT).expand(64, -1), seqs], 1)
        target = torch.softmax(model.base(seqs).logits[:, :, 0], -1)  # p(x_{t+1} | x_<=t) [N, L, V]
    opt = torch.optim.Adam(model.medusa.parameters(), lr=0.03)
    for _ in range(300):
        h = model(seqs, logits=True).logits  # [N, L, J, V]
        loss = sum(-(target[:, j:] * torch.log_softmax(h[:, :-j, j], -1)).sum(-1).mean() for j in (1, 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def models():
    medusa = MedusaModel.from_base(_base(1), n_heads=3)
    good = MedusaModel.from_base(_base(1), n_heads=3)
    return {"medusa": _poor(medusa), "mtp": _poor(MTPModel.from_base(_base(3), n_heads=3)), "good": _good(good),
            "llama medusa": _poor(MedusaModel.from_base(_llama(1), n_heads=3)),
            "llama mtp": _poor(MTPModel.from_base(_llama(3), n_heads=3))}


def _probs(model, seq, temperature, top_k, top_p, head=0):
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, -1, head]
    return sampling_probs(logits[None], temperature, top_k, top_p)[0]


def exact_triple(model, temperature, top_k=0, top_p=1.0, second_from_head=False) -> torch.Tensor:
    """P(t1, t2, t3) [V, V, V] of plain sampling; or, ``second_from_head``, with t2 drawn from
    draft head 1 at the prompt (what keeping every first draft would give)."""
    out = torch.zeros(V, V, V, dtype=torch.float64)
    p1 = _probs(model, PROMPT, temperature, top_k, top_p).double()
    q1 = _probs(model, PROMPT, temperature, top_k, top_p, head=1).double()
    for a in range(V):
        p2 = q1 if second_from_head else _probs(model, PROMPT + [a], temperature, top_k, top_p).double()
        for b in range(V):
            if p1[a] * p2[b] > 0:
                out[a, b] = p1[a] * p2[b] * _probs(model, PROMPT + [a, b], temperature, top_k, top_p).double()
    return out


def _check(model, counts, accepts, temperature, kw, what, need=(1, 3)):
    assert set(need) <= accepts, f"{what}: drafts should be rejected and accepted, saw {sorted(accepts)}"
    exact = exact_triple(model, temperature, **kw)
    assert_matches(counts, exact, what)
    assert_differs(counts, exact_triple(model, temperature, second_from_head=True, **kw), f"{what} vs first drafts")


@pytest.mark.parametrize("name, strategy, temperature, kw", [
    ("medusa", "medusa", 1.0, {}),
    ("medusa", "medusa", 0.7, dict(top_k=4)),
    ("mtp", "mtp", 1.0, dict(top_p=0.8)),
    ("mtp", "mtp", 0.7, {}),
    ("good", "medusa", 0.7, {}),
    ("llama medusa", "medusa", 1.0, dict(top_p=0.9)),
    ("llama mtp", "mtp", 0.7, dict(top_k=4)),
])
def test_tree_rejection_sampling_in_batches_keeps_the_distribution(models, name, strategy, temperature, kw):
    model = models[name]
    dec = BatchDecoder(model, strategy, acceptance="rejection", temperature=temperature, tree=TREE, max_batch=500,
                       **kw)
    assert type(dec.step).__name__ == "_TreeSamplingStep"
    counts, accepts = torch.zeros(V, V, V), set()
    for rep in range(12):
        gens = [torch.Generator().manual_seed(10_000 * rep + b) for b in range(500)]
        for res in dec.generate([PROMPT] * 500, max_new_tokens=3, generator=gens):
            counts[res.tokens[0], res.tokens[1], res.tokens[2]] += 1
            accepts.add(res.accept_lengths[0])
    _check(model, counts, accepts, temperature, kw, f"{name} T={temperature} {kw}")


@pytest.mark.parametrize("name, strategy, tree, kw", [
    ("medusa", "medusa", TREE, dict(top_p=0.9)),
    ("mtp", "mtp", "dynamic:4", {}),  # the tree's shape chosen per step from the heads
    ("llama mtp", "mtp", TREE, {}),
])
def test_tree_rejection_sampling_one_row_keeps_the_distribution(models, name, strategy, tree, kw):
    """One row (``mtpkern.generate``, the one-row path): a hand tree with top-p, and a dynamic tree."""
    model = models[name]
    g = torch.Generator().manual_seed(3)
    counts, accepts = torch.zeros(V, V, V), set()
    for _ in range(3000):
        res = generate(model, PROMPT, max_new_tokens=3, strategy=strategy, acceptance="rejection", temperature=1.0,
                       tree=tree, generator=g, **kw)
        counts[res.tokens[0], res.tokens[1], res.tokens[2]] += 1
        accepts.add(res.accept_lengths[0])
    # (a dynamic tree of 4 nodes over 6 tokens may keep no depth-2 node: its drafts accepted in full are 1 or 2)
    _check(model, counts, accepts, 1.0, kw, f"one row, {tree}", need=(1, 3) if tree is TREE else (1, 2))


def test_a_row_decodes_as_it_would_alone_and_good_heads_accept_more(models):
    """Each row draws from its own stream: a batch row gives the tokens of that row decoded alone
    with the same generator seed. Fitted heads accept more drafts per step than random ones."""
    model = models["medusa"]
    dec = BatchDecoder(model, "medusa", acceptance="rejection", temperature=1.0, tree=TREE, max_batch=4)
    rows = dec.generate([PROMPT, [3, 3], [5, 0, 1, 2], PROMPT], max_new_tokens=8,
                        generator=[torch.Generator().manual_seed(s) for s in range(4)])
    for s, (prompt, row) in enumerate(zip([PROMPT, [3, 3], [5, 0, 1, 2], PROMPT], rows)):
        alone = generate(model, prompt, max_new_tokens=8, strategy="medusa", acceptance="rejection", temperature=1.0,
                         tree=TREE, generator=torch.Generator().manual_seed(s))
        assert alone.tokens == row.tokens
    mean = {}
    for name in ("medusa", "good"):
        dec = BatchDecoder(models[name], "medusa", acceptance="rejection", temperature=0.7, tree=TREE, max_batch=500)
        res = dec.generate([PROMPT] * 500, max_new_tokens=12, generator=torch.Generator().manual_seed(5))
        steps = [a for r in res for a in r.accept_lengths]
        mean[name] = sum(steps) / len(steps)
    # a width-3 tree over 6 tokens accepts often even from random heads: the margin is small
    assert mean["good"] > mean["medusa"] + 0.05, mean
