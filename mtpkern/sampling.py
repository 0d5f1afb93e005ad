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


__all__ = ["sampling_probs", "speculative_sample", "speculative_sample_device"]
