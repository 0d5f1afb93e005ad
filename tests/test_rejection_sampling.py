"""Speculative sampling keeps the target's distribution exactly: statistical tests.

The tests draw many samples with a fixed seed and compare the empirical distribution with
the exact one, computed from the model's softmax over a tiny vocabulary, by a chi-square
test at a 1e-4 false-alarm rate (the seeds are fixed, so the outcome is deterministic). Each
test also shows it could fail: the same samples are far from a plausible wrong answer.
"""

import math

import pytest
import torch

from mtpkern.generation import generate
from mtpkern.sampling import sampling_probs, speculative_sample
from mtpkern.config import GPT2Config
from mtpkern.models import GPT2, MedusaModel
from mtpkern.tree import Tree

V = 6
PROMPT = [1, 4, 2]


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper quantile of chi-square(df) at normal quantile z (Wilson-Hilferty; 3.719 ~ 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, pooling cells expected below 5 together."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    if ((obs > 0) & ~keep).any():
        return math.inf, 1  # a sample where the distribution has no mass
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


def assert_matches(counts, probs, what):
    stat, df = chi2(counts, probs)
    assert stat < chi2_critical(df), f"{what}: chi-square {stat:.1f} with {df} dof"


def assert_differs(counts, probs, what):
    stat, df = chi2(counts, probs)
    assert stat > chi2_critical(df), f"{what}: the test cannot tell these apart (chi-square {stat:.1f}, {df} dof)"


# ----------------------------------------------------------------------------- the rule itself


def test_speculative_sample_emits_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.6, 0.1, 0.2]])
    counts = torch.zeros(4)
    accepted = 0
    for _ in range(6000):
        draft = torch.multinomial(q[0], 1, generator=g)
        out = speculative_sample(p, q, draft, g)
        counts[out[0]] += 1
        accepted += len(out) == 2
    assert_matches(counts, p[0], "first token")
    assert_differs(counts, q[0], "first token vs the draft distribution")
    # acceptance probability = sum_x min(p(x), q(x)) = 0.1 + 0.2 + 0.1 + 0.1
    assert abs(accepted / 6000 - 0.5) < 0.03


def test_speculative_sample_edge_cases():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    # q == p: every draft is accepted, then the bonus comes from the last row.
    for _ in range(50):
        drafts = torch.multinomial(p[:2], 1, generator=g)[:, 0]
        assert speculative_sample(p, p[:2], drafts, g) == drafts.tolist() + [0]
    # a draft the target gives no mass is always rejected, and the correction is drawn from
    # max(0, p - q) (here only token 1 has p > q)
    q = torch.tensor([[0.3, 0.0, 0.7], [0.0, 0.0, 1.0]])
    for _ in range(50):
        assert speculative_sample(p, q, torch.tensor([2, 2]), g) == [1]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def peaky_medusa():
    """A random tiny MEDUSA model with peaked distributions and heads that disagree with the
    base often, so drafts are both accepted and rejected."""
    torch.manual_seed(0)
    base = GPT2(GPT2Config.tiny(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with torch.no_grad():
        base.wte.weight.mul_(3.0)  # peaked but not one-hot
    model = MedusaModel.from_base(base, n_heads=3)
    with torch.no_grad():
        for p in model.medusa.parameters():
            p.normal_(0.0, 1.0)
    return model.eval()


def target_probs(model, seq, temperature=1.0, top_p=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, -1, 0]
    return sampling_probs(logits[None], temperature, top_p=top_p)[0]


def exact_pair(model, temperature=1.0, top_p=1.0) -> torch.Tensor:
    """P(t1, t2) [V, V] under plain sampling from the target."""
    p1 = target_probs(model, PROMPT, temperature, top_p)
    return torch.stack([p1[a] * target_probs(model, PROMPT + [a], temperature, top_p) for a in range(V)])


def test_rejection_sampling_matches_plain_sampling(peaky_medusa):
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(V, V)
    first_accepts = []
    for _ in range(2000):
        res = generate(peaky_medusa, PROMPT, max_new_tokens=3, strategy="medusa", acceptance="rejection",
                       temperature=1.0, tree=Tree.chain(2), generator=g)
        counts[res.tokens[0], res.tokens[1]] += 1
        first_accepts.append(res.accept_lengths[0])
    assert set(first_accepts) == {1, 2, 3}, "drafts should be rejected, accepted, and accepted in full"
    exact = exact_pair(peaky_medusa)
    assert_matches(counts, exact, "(t1, t2)")
    # Power: keeping every draft would give t2 ~ MEDUSA head 1 at the prompt, which is wrong.
    with torch.no_grad():
        q1 = torch.softmax(peaky_medusa(torch.tensor([PROMPT])).logits[0, -1, 1], -1)
    assert_differs(counts, exact.sum(1, keepdim=True) * q1[None, :], "(t1, t2) vs accept-every-draft")


def test_top_p_masked_tokens_never_appear(peaky_medusa):
    g = torch.Generator().manual_seed(2)
    allowed = exact_pair(peaky_medusa, top_p=0.6) > 0
    assert allowed.sum() < V * V / 2, "top_p=0.6 should mask most pairs"
    seen = torch.zeros(V, V, dtype=torch.bool)
    for _ in range(400):
        res = generate(peaky_medusa, PROMPT, max_new_tokens=2, strategy="medusa", acceptance="rejection",
                       temperature=1.0, top_p=0.6, tree=Tree.chain(2), generator=g)
        seen[res.tokens[0], res.tokens[1]] = True
    assert not (seen & ~allowed).any(), f"masked pairs sampled: {(seen & ~allowed).nonzero().tolist()}"
    assert seen.sum() > 1


def test_batched_rejection_sampling_matches_plain_sampling(peaky_medusa):
    """The distribution test at B > 1: 2000 rows of one prompt, each with its own stream, in
    batches of 400 (``mtpkern.batch``)."""
    from mtpkern.batch import BatchDecoder

    dec = BatchDecoder(peaky_medusa, "medusa", acceptance="rejection", temperature=1.0, tree=Tree.chain(2),
                       max_batch=400)
    counts = torch.zeros(V, V)
    accepts = set()
    for rep in range(5):
        gens = [torch.Generator().manual_seed(10_000 * rep + b) for b in range(400)]
        for res in dec.generate([PROMPT] * 400, max_new_tokens=3, generator=gens):
            counts[res.tokens[0], res.tokens[1]] += 1
            accepts.add(res.accept_lengths[0])
    assert accepts == {1, 2, 3}
    exact = exact_pair(peaky_medusa)
    assert_matches(counts, exact, "(t1, t2), batched")
    with torch.no_grad():
        q1 = torch.softmax(peaky_medusa(torch.tensor([PROMPT])).logits[0, -1, 1], -1)
    assert_differs(counts, exact.sum(1, keepdim=True) * q1[None, :], "(t1, t2) vs accept-every-draft, batched")
