"""Sampling distributions and speculative sampling, shared by the decoder and its callers.

``sampling_probs`` turns logits into the distribution ``ntp`` samples from (temperature,
top-k, nucleus). ``speculative_sample_device`` is speculative sampling of a chain of drafts
(Leviathan et al. 2023; Chen et al. 2023) written with device ops only, so a decoding step
needs no host sync; ``speculative_sample`` is the same rule with a host list as result.
"""

from __future__ import annotations

import torch


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) [R, V], restricted to the top_k tokens (0 = all) and to
    the nucleus: the smallest set of most likely tokens whose probability reaches top_p (the
    most likely token is always kept), renormalised."""
    z = logits.float() / temperature
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
        drop = (before >= top_p).scatter(-1, order, before >= top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def speculative_sample_device(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling of a chain, on the device (no host sync).

    p [n+1, V]: the target's distribution after the root and after each draft; q [n, V]: the
    draft distributions the n drafts were sampled from. Draft i is accepted with probability
    min(1, p_i(x_i) / q_i(x_i)); at the first rejection a the token is resampled from
    normalize(max(0, p_a - q_a)) and the chain stops; if all are accepted, a bonus token is
    sampled from p_n. Each emitted token is then distributed exactly as p given the prefix.

    Returns (a: 0-d int64, the number of accepted drafts; tokens: int64 [n+1], the accepted
    drafts, then the sampled token, then -1 padding).
    """
    n = drafts.numel()
    idx = torch.arange(n, device=p.device)
    u = torch.rand(n, device=p.device, generator=generator)
    accept = u * q[idx, drafts] < p[idx, drafts]
    a = accept.long().cumprod(0).sum()
    residual = (p[:n] - q).clamp_min(0.0)
    # p == q up to rounding: a rejection has probability ~0 and its residual is all rounding
    # noise; p itself is the right distribution then.
    residual = torch.where(residual.sum(-1, keepdim=True) > 1e-6, residual, p[:n])
    dist = torch.cat([residual, p[n:]]).index_select(0, a.view(1))  # [1, V]: row a
    x = torch.multinomial(dist, 1, generator=generator).view(1)
    j = torch.arange(n + 1, device=p.device)
    padded = torch.cat([drafts, drafts.new_full((1,), -1)])
    tokens = torch.where(j < a, padded, torch.where(j == a, x, -1))
    return a, tokens


def speculative_sample(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                       generator: torch.Generator | None = None) -> list[int]:
    """:func:`speculative_sample_device` as a host list: the accepted drafts followed by the
    one sampled token."""
    a, tokens = speculative_sample_device(p, q, drafts, generator)
    out = tokens.tolist()
    return out[: out.index(-1)] if -1 in out else out


def sample_tree_drafts(q: torch.Tensor, parents: list[int], depth: list[int],
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Draft tokens of a tree, each node's children drawn WITHOUT replacement (Jeon et al. 2024).

    q [B, D, V] (or [D, V]): row d-1 is the distribution depth-d nodes are drawn from (MEDUSA /
    MTP head d at the last accepted position, not conditioned on the path). ``parents`` and
    ``depth`` are the tree's host lists (``Tree.parents``; node 0 is the root). The children of
    each node, in the tree's order, are the first m keys of an exponential race q(y) / E_y
    (E ~ Exp(1), independent per parent): the order in which the race is won is sequential
    sampling without replacement from q (child i ~ q with children 1..i-1 removed, renormalised).
    Returns tokens int64 [B, T] ([T] for 2-D q), the root's entry -1 (the caller's root token).
    Node t's proposal is q[depth[t] - 1] minus its earlier siblings: ``verify_rejection``'s
    ``draft_row`` is ``depth - 1``.
    """
    single = q.dim() == 2
    qb = q[None] if single else q
    T = len(parents)
    tokens = torch.full((qb.shape[0], T), -1, dtype=torch.int64, device=q.device)
    kids: dict[int, list[int]] = {}
    for t in range(1, T):
        kids.setdefault(parents[t], []).append(t)
    if kids:
        owners = sorted(kids)
        m = max(len(v) for v in kids.values())
        rows = qb[:, [depth[o] for o in owners]].float()  # [B, P, V]: each parent's children's q
        race = -torch.rand(rows.shape, device=q.device, generator=generator).clamp_min(1e-38).log()
        order = torch.topk(rows / race, min(m, rows.shape[-1]), dim=-1).indices  # [B, P, m]
        for i, o in enumerate(owners):
            for j, c in enumerate(kids[o][: order.shape[-1]]):
                tokens[:, c] = order[:, i, j]
    return tokens[0] if single else tokens


__all__ = ["sample_tree_drafts", "sampling_probs", "speculative_sample", "speculative_sample_device"]
