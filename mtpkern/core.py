"""The decoding core: the parts of a step that both engines (``Decoder``, one prompt;
``BatchDecoder``, many) run, written once and, where a batch needs it, with a batch dimension.

- ``Logits``: the heads' logits statistics a step needs (head 0's argmax, the draft heads'
  top-k, sampling distributions, what typical acceptance reads), eager or through the fused
  kernel;
- ``prefill`` / ``prefill_rows``: one prompt / many prompts through the model into the cache;
- ``eager_tree_mask``: the attention mask of tree tokens after a prefix, per row;
- ``dynamic_tree``: the best draft nodes by path score (EAGLE-2's rule on the model's heads);
- ``sample_drafts``: one draft token from each draft head's distribution, for rejection sampling;
- ``verify_greedy_rows``: greedy verification of B rows at once;
- ``weights_stamp``: where the tensors a CUDA graph reads live.
"""

from __future__ import annotations

import torch

from mtpkern.cpu_matmul import Matmul
from mtpkern.inputs import check_room
from mtpkern.layers import Attn, KVCache
from mtpkern.ops.fused_logits import fused_logits
from mtpkern.ops.verify import verify_greedy
from mtpkern.sampling import sampling_probs


def prefill(model, cache: KVCache, input_ids: torch.Tensor, *, heads: int, start: int = 0,
            weights: list | None = None) -> torch.Tensor:
    """Run the prompt [P] through the model at slots start..P-1 and return the hidden states
    of its last position [heads, D] (the other positions only fill the cache). Slots
    0..start-1 must already hold the K/V of ``input_ids[:start]`` (a reused prefix: see
    ``Decoder(prefix_cache=...)``); the new positions attend to them. ``weights``: the model's
    ``decode_weights()``, for its blocks' functional path (``Attn.weights``)."""
    P = input_ids.shape[0]
    check_room(cache.max_len, 0, P)
    if not 0 <= start < P:
        raise ValueError(f"prefill start {start} must be in [0, {P}): at least the prompt's last token is run")
    # A causal mask through eager attention in every kernels mode: the tree kernel is made
    # for short trees over a long prefix, the prompt is the opposite. Row i (position
    # start + i) sees slots 0..start + i.
    pos = torch.arange(start, P, device=input_ids.device)
    causal = torch.ones(P - start, P, dtype=torch.bool, device=input_ids.device).tril(start)
    attn = Attn(cache, pos, mask=causal, weights=weights)
    if heads > 1 and model.draft_on_path:  # MTP: every head block over the prompt, as one batch
        return model.decode_heads(input_ids[None, start:], pos, attn, heads - 1)[:, -1]
    h0, carry = model.decode_hidden(input_ids[None, start:], pos, attn)
    last = h0[0, -1:]
    if heads == 1:
        return last
    return torch.cat([last, model.draft_hidden(last[None], heads - 1)])


def prefill_rows(model, cache: KVCache, ids: list[torch.Tensor], *, heads: int,
                 weights: list | None = None) -> torch.Tensor:
    """Every prompt of ``ids`` (1-D, any lengths) through the model at once, each at slots and
    positions 0 .. P_b - 1 of its cache row (right-padded to the longest: a pad query sees only
    its row's tokens, and the slots it writes past P_b are written again by the row's first
    steps before any step reads them). Returns each row's last-position states [B, heads, D]
    (head 0, then the draft heads), as ``prefill`` gives one prompt's; one prompt takes that
    path itself."""
    dev, B = ids[0].device, len(ids)
    if B == 1:
        return prefill(model, cache, ids[0], heads=heads, weights=weights)[None]
    lengths = torch.tensor([int(t.shape[0]) for t in ids], device=dev)
    P = int(lengths.max())
    check_room(cache.max_len, 0, P)
    tokens = torch.zeros(B, P, dtype=torch.long, device=dev)
    for b, t in enumerate(ids):
        tokens[b, : t.shape[0]] = t
    pos = torch.arange(P, device=dev)
    causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
    mask = (causal[None] & (pos[None, None, :] < lengths[:, None, None]))[:, None]  # [B, 1, P, P]
    attn = Attn(cache, pos[None].expand(B, P), mask=mask, weights=weights)
    h0, carry = model.decode_hidden(tokens, pos[None].expand(B, P), attn)
    rows, last = torch.arange(B, device=dev), lengths - 1
    h = h0[rows, last]  # [B, D]
    if heads == 1:
        return h[:, None]
    n = heads - 1
    if model.draft_on_path:  # MTP: the head blocks fill their caches over every prompt
        d = torch.stack([model.head_forward(j, carry, attn)[rows, last] for j in range(1, n + 1)], 1)
    else:
        d = model.heads_at(h, n).transpose(0, 1)
    return torch.cat([h[:, None], d], 1)


def eager_tree_mask(dense: torch.Tensor, prefix: torch.Tensor, span: int) -> torch.Tensor:
    """bool [..., T, span]: every slot below prefix, and tree node j (slot prefix + j) where
    dense[i, j]; ``prefix`` 0-d (one row: [T, span]) or [B] (a row each: [B, T, span]). Built
    on the device from tensors, so a CUDA graph can replay it."""
    T = dense.shape[0]
    rel = torch.arange(span, device=dense.device) - prefix.unsqueeze(-1)  # [..., span]
    in_tree = (rel >= 0) & (rel < T)
    tree = dense[:, rel.clamp(0, T - 1)].movedim(0, -2) & in_tree.unsqueeze(-2)
    return (rel < 0).unsqueeze(-2) | tree


def sample_drafts(q: torch.Tensor, generator) -> torch.Tensor:
    """Rejection sampling's drafts at one position: one token [n] drawn from each of the draft
    heads' distributions q [n, V] (``Logits.heads_probs``)."""
    return torch.multinomial(q, 1, generator=generator)[:, 0]


def verify_greedy_rows(tokens: torch.Tensor, target: torch.Tensor, paths: torch.Tensor, backend: str | None):
    """Greedy verification of B rows at once: (accepted drafts [B], the accepted path [B, D + 1],
    its last node [B], the emitted tokens [B, D + 1], whose first accepted + 1 are the output).
    The extension's kernel takes the whole batch in one call; without it, the same rule in a few
    batched tensor ops (the op's eager reference goes row by row)."""
    if backend == "cuda":
        res = verify_greedy(tokens, target, paths, backend="cuda")
        return res.accept_len, paths[res.best_path], res.last_node, res.tokens
    valid, safe = paths >= 0, paths.clamp(min=0)
    ok = valid[None, :, 1:] & (tokens[:, safe[:, 1:]] == target[:, safe[:, :-1]])  # [B, P, D]
    accept = ok.long().cumprod(-1).sum(-1)  # [B, P]
    best = accept.argmax(-1)  # the first longest path, as the ops choose
    accept_len = accept.gather(1, best[:, None])[:, 0]
    path = paths[best]  # [B, D + 1]
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    last = path[rows, accept_len]
    return accept_len, path, last, target[rows[:, None], path.clamp(min=0)]


def weights_stamp(model, *own) -> list[int]:
    """Where the tensors a CUDA graph capture reads live: the model's parameters and buffers,
    and ``own`` (an engine's copies of them, any nesting of lists)."""
    tensors = (*model.parameters(), *model.buffers(), *torch.utils._pytree.tree_leaves(list(own)))
    return [t.data_ptr() for t in tensors if isinstance(t, torch.Tensor)]


class Logits:
    """The heads' logits statistics a step needs, in float32: eager (one matmul and a
    reduction: greedy decoding needs no entropy or logsumexp) or the fused kernel."""

    def __init__(self, model, fused: bool):
        self.model, self.fused = model, fused
        self.shared = all(model.head_weight(j) is model.unembed_weight for j in range(model.n_heads))
        self.unembed: Matmul | None = None  # the float32 unembedding every head shares, kept by the decoder

    def _z(self, h, j):
        if self.unembed is not None:
            return self.unembed(h.float().reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], -1)
        return h.float() @ self.model.head_weight(j).float().T

    def probs(self, h: torch.Tensor, j: int, options) -> torch.Tensor:
        """Head j's sampling distribution [..., V] at states h [..., D] (``sampling_probs`` with
        ``options``' temperature, top-k and top-p), its logits through the decoder's float32
        unembedding where it keeps one (``unembed``, in the layout timed fastest on a CPU)."""
        z = self._z(h, j) if self.unembed is not None else self.model.head_logits(h, j)
        return sampling_probs(z, options.temperature, options.top_k, options.top_p)

    def heads_probs(self, d: torch.Tensor, options) -> torch.Tensor:
        """Draft heads 1..n's sampling distributions [B, n, V] at their states d [B, n, D]: one
        product for every row and head where the heads share the unembedding, one per head
        otherwise."""
        if self.shared:
            return self.probs(d, 1, options)
        return torch.stack([self.probs(d[:, j - 1], j, options) for j in range(1, d.shape[1] + 1)], 1)

    def weight0(self, rows: int) -> torch.Tensor:
        """Head 0's unembedding [V, D] in the layout its logits over ``rows`` rows multiply
        fastest (``Matmul.weight``), for ``accept_greedy``."""
        return self.unembed.weight(rows) if self.unembed is not None else self.model.head_weight(0)

    def norm(self, normed: bool) -> dict:
        """``fused_logits``' arguments that apply the final norm (none when ``h`` is normed)."""
        if normed:
            return {}
        ln = self.model.final_norm
        return dict(norm_weight=ln.weight, norm_bias=ln.bias, eps=ln.eps)

    def argmax0(self, h: torch.Tensor, normed: bool = True) -> torch.Tensor:
        """Head 0's argmax [R] from hidden states [R, D] (before the final norm: ``normed=False``,
        fused kernels only)."""
        if self.fused:
            return fused_logits(h, self.model.head_weight(0), 1, **self.norm(normed)).argmax
        # The ops' NaN contract: a row with a NaN logit has no argmax (-1), never a
        # valid-looking token. max() propagates NaN, so one reduction finds both.
        top, arg = self._z(h, 0).max(-1)
        return torch.where(top.isnan(), -1, arg)

    def typical(self, h: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, temperature: float,
                normed: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What typical acceptance reads for a tree of T tokens [B, T] with parents [T] (node 0
        the root, parent -1) from head 0's states h [B, T, D]: (head 0's argmax [B, T],
        p(node | parent) [B, T] and the parent's entropy [B, T], both at ``temperature``; the
        root gets 1 and 0). Eager: one product over the T states, read twice (the kept
        unembedding on a CPU); fused: the kernel over the T states, then over the parents'."""
        B, T = tokens.shape
        if self.fused:
            target = self.argmax0(h.reshape(B * T, -1), normed).view(B, T)
            stats = fused_logits(h[:, parents[1:]].reshape(-1, h.shape[-1]), self.model.head_weight(0), 1,
                                 tokens[:, 1:].reshape(-1), scale=1.0 / temperature, **self.norm(normed))
            logp_node, entropy = (stats.target_logit - stats.lse).view(B, -1), stats.entropy.view(B, -1)
        else:
            z = self._z(h, 0)  # [B, T, V]
            top, arg = z.max(-1)
            target = torch.where(top.isnan(), -1, arg)  # argmax0's NaN contract
            logp = torch.log_softmax(z[:, parents[1:]] / temperature, -1)  # [B, T - 1, V]
            logp_node = logp.gather(-1, tokens[:, 1:, None])[..., 0]
            entropy = -(logp.exp() * logp).sum(-1)
        node_prob = torch.cat([logp_node.new_ones(B, 1), logp_node.exp()], 1)
        return target, node_prob, torch.cat([entropy.new_zeros(B, 1), entropy], 1)

    def draft_topk(self, d: torch.Tensor, k: int, logprobs: bool = False):
        """(log-probabilities [n, k] or None, token ids [n, k]) of draft heads 1..n from their
        states at one position, d [n, hidden]: row j is head j + 1."""
        lp, ids = self.heads_topk(d[None], k, logprobs)
        return (None if lp is None else lp[0]), ids[0]

    def heads_topk(self, d: torch.Tensor, k: int, logprobs: bool = False):
        """(log-probabilities [B, n, k] or None, token ids [B, n, k]) of draft heads 1..n from
        their states d [B, n, hidden] at B positions (one per row of a batch): one logits call
        for every row and head where the unembedding is shared, one per head otherwise."""
        B, n = d.shape[0], d.shape[1]
        if self.fused:
            if self.shared:
                s = fused_logits(d.reshape(B * n, -1), self.model.unembed_weight, k)
                ids, lp = s.topk_indices.view(B, n, k), (s.topk_values - s.lse[:, None]).view(B, n, k)
            else:
                stats = [fused_logits(d[:, j].contiguous(), self.model.head_weight(j + 1), k) for j in range(n)]
                ids = torch.stack([s.topk_indices for s in stats], 1)
                lp = torch.stack([s.topk_values - s.lse[:, None] for s in stats], 1)
            return (lp if logprobs else None), ids
        if self.shared:
            z = self._z(d.reshape(B * n, -1), 1).view(B, n, -1)
        else:
            z = torch.stack([self._z(d[:, j], j + 1) for j in range(n)], 1)
        if k == 1 and not logprobs:  # a chain's drafts: max() is topk(1) for less
            return None, z.max(-1, keepdim=True).indices
        top = z.topk(k, dim=-1)
        return (top.values - z.logsumexp(-1, keepdim=True) if logprobs else None), top.indices


def level_sizes(n_nodes: int, k: int, depth: int) -> list[int]:
    """How many nodes of each depth a dynamic tree of n_nodes can use: at most n_nodes, and at
    most k times the previous level."""
    sizes, prev = [], 1
    for _ in range(depth):
        prev = min(n_nodes, prev * k)
        sizes.append(prev)
    return sizes


def dynamic_tree(logp: torch.Tensor, ids: torch.Tensor, n_nodes: int, level_sizes: list[int]):
    """The n_nodes best draft nodes by path score, as (parents int64 [1 + n_nodes], tokens
    int64 [n_nodes]), node 0 the root. logp / ids [D, k]: the top-k log-probabilities (sorted,
    descending) and token ids of draft heads 1..D at the last accepted position.

    score(r1..rd) = sum_i logp[i - 1, r_i]. Level d keeps the best level_sizes[d - 1] children
    of level d - 1's kept nodes (every node of the global best n_nodes is among its level's
    best n_nodes). The kept nodes of all levels, concatenated level by level, are sorted by
    score with a stable sort: a child never scores above its parent and comes later, so the
    first n_nodes hold every parent before its children (a topological order). Fixed shapes,
    no host sync.
    """
    dev = logp.device
    k = logp.shape[1]
    scores, tokens, parent = [logp[0, :level_sizes[0]]], [ids[0, :level_sizes[0]]], []
    parent.append(torch.full((level_sizes[0],), -1, dtype=torch.long, device=dev))
    offset = 0  # index of the previous level's first node in the concatenation
    for d in range(1, len(level_sizes)):
        prev = scores[-1]
        child = (prev[:, None] + logp[d][None, :]).view(-1)  # [n_prev * k]
        top = child.topk(level_sizes[d])
        scores.append(top.values)
        tokens.append(ids[d].index_select(0, top.indices % k))
        parent.append(offset + top.indices // k)
        offset += prev.shape[0]
    all_scores, all_tokens, all_parents = torch.cat(scores), torch.cat(tokens), torch.cat(parent)
    order = torch.sort(all_scores, descending=True, stable=True).indices[:n_nodes]
    node_of = torch.zeros(all_scores.shape[0], dtype=torch.long, device=dev)
    node_of[order] = torch.arange(1, n_nodes + 1, device=dev)
    par = all_parents.index_select(0, order)
    parents = torch.where(par >= 0, node_of.index_select(0, par.clamp(min=0)), 0)
    return torch.cat([parents.new_full((1,), -1), parents]), all_tokens.index_select(0, order)


__all__ = ["Logits", "prefill", "prefill_rows", "eager_tree_mask", "dynamic_tree", "level_sizes", "sample_drafts",
           "verify_greedy_rows", "weights_stamp"]
