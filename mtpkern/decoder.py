"""The decoding engine a user holds: one model, one static KV cache, one tree, its CUDA graphs.

``Decoder(model, strategy=..., tree=..., kernels=..., cuda_graph=...)`` is built once and
decodes many prompts (``decoder.generate(ids, max_new_tokens=...)``); ``mtpkern.generate`` is
the one-call convenience on top of it. The state of a generation is explicit and lives on the
device: the cache, ``prefix`` (how many tokens the cache holds), the *root* (the next token,
already chosen but not yet in the cache) and the drafts the heads proposed for after it.

Every strategy is a step with one interface (``begin`` after the prefill, ``body`` per step)
whose output is one int64 tensor ``[n, t_1 .. t_n, -1 ...]``: the tokens the step emits. The
decode loop reads it with one host sync per step and knows nothing else of the strategy:

- ``_NTPStep`` (``ntp``): the root alone; its head-0 logits choose the next root.
- ``_TreeStep`` (``mtp``, ``medusa``, greedy or typical acceptance): the root and a tree of
  draft tokens (the heads' top-k at the last accepted position, see ``mtpkern.tree``) in one
  pass, each node at position ``prefix + depth`` and attending to the prefix and its
  ancestors. Head 0 at each node says what the model itself would decode after it; greedy
  verification keeps the longest root-to-leaf path whose drafts all agree with it, plus the
  model's own next token (the new root). The accepted path's K/V move into place
  (``kv_compact_``), and the heads at the last accepted node give the next drafts: the pass
  that verifies also proposes (Stern et al. 2018; Gloeckle et al. 2024; Cai et al. 2024).
  The tree is fixed (a ``Tree``), or ``dynamic``: chosen per step from the heads' own
  probabilities (below).
- ``_ChainSamplingStep`` (chains, temperature > 0, acceptance ``rejection``): speculative
  sampling (Leviathan et al. 2023; Chen et al. 2023), which keeps the target's distribution.

Greedy speculative decoding emits exactly the tokens greedy ``ntp`` emits: a draft is kept
only where it equals the model's own argmax given the same prefix, whatever the tree.

Dynamic trees (EAGLE-2's rule, Li et al. 2024, on the heads of the model itself): node
``(r1, ..., rd)`` scores ``prod_i p_i(r_i)``, the product of the draft heads' probabilities
along its path; a step verifies the N best nodes. A child never scores above its parent, so
the N best form a tree; they are found level by level (the best N of each level's children
of the previous level's best N) with fixed shapes, and the tree's mask, depths and paths are
built on the device by the ``tree_buffers`` op, so a CUDA graph still fits.

Prefix cache (``prefix_cache=True``): the decoder keeps the K/V of its last generation and
prefills only the part of a new prompt that differs from the tokens they belong to (the prompt
and the output but its last token, which no step wrote), at least the prompt's last token.

On the CPU (eager attention) a step issues few operations: the blocks run as functions of their
tensors (``Attn.weights``), the attention mask is additive and only updated, MTP's head blocks run
batched in the verification pass, and greedy verification is one call (``accept_greedy``).

CUDA graphs (``cuda_graph=True``): deterministic steps (greedy, typical) are captured whole
(forward, logits, verification, KV compaction, next drafts) and replayed per step; sampling
steps, and dynamic trees without the C++ extension (the eager ``tree_buffers`` syncs),
replay the forward pass alone. Captures happen on the first ``generate`` and
are kept by the decoder; ``decoder.reset_graphs()`` drops them (after the weights move).
"""

from __future__ import annotations

import math
import operator
import time
import warnings
from dataclasses import dataclass, field

import torch

from mtpkern.graphs import CapturedCall, graphs_available
from mtpkern.model import GPT2, Attn, KVCache, MedusaModel, MTPModel
from mtpkern.ops import _backend
from mtpkern.ops.fused_logits import MAX_K, fused_logits
from mtpkern.ops.kv_compact import kv_compact_
from mtpkern.ops.tree_mask import tree_buffers
from mtpkern.ops.verify import accept_greedy, verify_greedy, verify_typical
from mtpkern.runtime import now
from mtpkern.sampling import sampling_probs, speculative_sample_device
from mtpkern.tree import MC_SIM_7B_63, Tree, TreeTensors

STRATEGIES = ("ntp", "mtp", "medusa")
ACCEPTANCE = ("greedy", "typical", "rejection")
KERNELS = ("auto", "eager", "fused")
DYNAMIC_NODES = 16  # tree="dynamic": draft nodes per step unless "dynamic:N" says otherwise


@dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens (an EOS that ended the output included)
    num_steps: int  # target forward passes after the prefill
    accept_lengths: list[int]  # tokens the verifier accepted per step (drafts + its own token),
    #                            before truncation at EOS / max_new_tokens
    step_times: list[float] = field(default_factory=list)  # seconds per step, synchronised
    prefill_time: float = 0.0
    total_time: float = 0.0
    reused_prompt_tokens: int = 0  # prompt tokens whose K/V the prefix cache supplied (not prefilled)

    @property
    def mean_accept_length(self) -> float:
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.total_time if self.total_time > 0 else 0.0

    @property
    def forwards_per_token(self) -> float:
        """Target forward passes (the prefill included) per generated token."""
        return (1 + self.num_steps) / len(self.tokens) if self.tokens else 0.0


# ----------------------------------------------------------------------------- forward passes


def prefill(model, cache: KVCache, input_ids: torch.Tensor, *, heads: int, start: int = 0,
            weights: list | None = None) -> torch.Tensor:
    """Run the prompt [P] through the model at slots start..P-1 and return the hidden states
    of its last position [heads, D] (the other positions only fill the cache). Slots
    0..start-1 must already hold the K/V of ``input_ids[:start]`` (a reused prefix: see
    ``Decoder(prefix_cache=...)``); the new positions attend to them. ``weights``: the model's
    ``decode_weights()``, for its blocks' functional path (``Attn.weights``)."""
    P = input_ids.shape[0]
    _check_room(cache, 0, P)
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


def _check_room(cache: KVCache, prefix_len: int, T: int) -> None:
    if prefix_len + T > cache.max_len:
        raise RuntimeError(
            f"KV cache overflow: writing {T} tokens at slot {prefix_len} needs {prefix_len + T} slots "
            f"but the cache has {cache.max_len}"
        )


def eager_tree_mask(dense: torch.Tensor, prefix: torch.Tensor, span: int) -> torch.Tensor:
    """bool [T, span]: every slot below prefix, and tree node j (slot prefix + j) where
    dense[i, j]. Built on the device from a tensor prefix, so a CUDA graph can replay it."""
    T = dense.shape[0]
    rel = torch.arange(span, device=dense.device) - prefix
    in_tree = (rel >= 0) & (rel < T)
    return (rel < 0)[None, :] | (dense[:, rel.clamp(0, T - 1)] & in_tree[None, :])


class _Forward:
    """One forward pass of T tree tokens at cache slots prefix + i and positions prefix +
    depth[i], returning head 0's hidden states [T, D] (what verification needs) and the carry
    [T, D] the draft heads start from (``_Drafts``).

    Eager attention with a host prefix (no CUDA graph) keeps one additive mask [T, cache] and
    only updates it: the slots that joined the prefix since the last step turn on, and the tree's
    own block is rewritten, instead of rebuilding the whole mask per step. With a device
    prefix (inside a CUDA graph) the mask is built on the device (``eager_tree_mask``); fused
    kernels read the packed mask and the prefix directly.
    """

    def __init__(self, dec: Decoder, T: int, final_norm: bool = True, heads: int = 1):
        self.dec, self.model, self.cache, self.fused = dec, dec.model, dec.cache, dec.fused
        self.final_norm, self.heads = final_norm, heads
        self.offsets = torch.arange(T, device=dec.device)
        # Additive (0 / -inf, the model's dtype), which SDPA adds as it is; a bool mask it would
        # convert in every layer.
        self.mask = torch.full((T, self.cache.max_len), -math.inf, dtype=dec.model.dtype, device=dec.device)
        self.mask_prefix = 0  # slots [0, mask_prefix) of self.mask are on
        # (dense, its additive block): a static tree's is made once
        self._tree: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset(self) -> None:
        self.mask_prefix = 0
        self.mask.fill_(-math.inf)

    def _block(self, dense: torch.Tensor) -> torch.Tensor:
        if self._tree is None or self._tree[0] is not dense:
            self._tree = (dense, torch.zeros(dense.shape, dtype=self.mask.dtype, device=dense.device)
                          .masked_fill_(~dense, -math.inf))
        return self._tree[1]

    def attn(self, prefix: torch.Tensor, prefix_host: int | None, dense, packed) -> Attn:
        """How T new tokens at slots prefix + i attend: to the prefix and, among themselves,
        as ``dense`` (bool [T, T]) / ``packed`` (its bit-packed rows) say."""
        T = dense.shape[0]
        slots = prefix + self.offsets
        if self.fused:
            attn = Attn(self.cache, slots, tree_mask=packed, prefix_len=prefix)
        elif prefix_host is None:
            attn = Attn(self.cache, slots, mask=eager_tree_mask(dense, prefix, self.cache.max_len),
                        weights=self.dec.decode_weights)
        else:
            p = prefix_host
            if p > self.mask_prefix:
                self.mask[:, self.mask_prefix:p] = 0.0
            self.mask[:, p:p + T] = self._block(dense)
            self.mask_prefix = p
            attn = Attn(self.cache, slots, mask=self.mask[:, :p + T], weights=self.dec.decode_weights)
        return attn

    def __call__(self, tokens, prefix: torch.Tensor, prefix_host: int | None, depth, dense, packed):
        attn = self.attn(prefix, prefix_host, dense, packed)
        if self.heads > 1:  # MTP, every head over every node (``MTPModel.decode_heads``): carry [heads, T, D]
            hs = self.model.decode_heads(tokens[None], prefix + depth, attn, self.heads - 1)
            return hs[0], hs
        h0, carry = self.model.decode_hidden(tokens[None], prefix + depth, attn, final_norm=self.final_norm)
        return h0[0], carry[0]


def parallel_heads(dec: Decoder) -> bool:
    """Whether an MTP model's draft heads run in the verification pass (eager attention)."""
    return dec.model.draft_on_path and not dec.fused


class _Drafts:
    """The draft heads' hidden states where the next drafts come from: the last accepted node.

    MEDUSA's heads are a function of that node's hidden state alone. MTP's heads are blocks
    with KV caches of their own. With eager attention they run in the verification pass itself,
    over every tree node beside head 0 (``parallel``: the forward's carry holds every head's
    states, and the drafts are its row at the last accepted node; the K/V of rejected nodes
    are moved away by the compaction or overwritten, like the trunk's). With the fused kernels
    they run after it, over the accepted path alone (R = depth + 1 rows, written at slots
    prefix + i, causal among themselves; rows past the accepted length write slots the next
    step overwrites before it reads them): there a verification pass costs head 0 alone."""

    def __init__(self, dec: Decoder, depth: int, n: int, normed: bool = True):
        self.model, self.n, self.normed = dec.model, n, normed
        self.parallel = parallel_heads(dec) and n > 0
        self.on_path = dec.model.draft_on_path and n > 0 and not self.parallel
        self.stack = None  # MEDUSA: the heads' stacked weights, fetched once per generation (refresh)
        if self.on_path:
            tt = Tree.chain(depth).tensors(dec.device)
            self.rows = _Forward(dec, depth + 1)
            self.causal = (tt.dense_mask, tt.mask)

    def reset(self) -> None:
        if self.on_path:
            self.rows.reset()

    def refresh(self) -> None:
        """Fetch what the heads read (the decoder calls it when a generation starts)."""
        if self.n and not (self.on_path or self.parallel) and hasattr(self.model, "head_stack"):
            self.stack = self.model.head_stack(self.n)

    def __call__(self, h0, carry, path, accept_len, last_node, prefix, prefix_host) -> torch.Tensor:
        """[n, D]: draft heads 1..n at the last accepted node."""
        last = last_node.view(1)
        if self.parallel:
            return carry[1:].index_select(1, last)[:, 0]
        if self.on_path:
            attn = self.rows.attn(prefix, prefix_host, *self.causal)
            return self.model.draft_hidden(carry.index_select(0, path.clamp(min=0))[None], self.n, attn, accept_len)
        h = h0.index_select(0, last)
        if not self.normed:  # the verification's logits kernel applied the final norm itself
            h = self.model.final_norm(h)
        # MEDUSA's heads start from head 0's normalised state
        return self.model.heads_at(h, self.n, self.stack)[:, 0]


class _Logits:
    """The heads' logits statistics a step needs, in float32: eager (one matmul and a
    reduction: greedy decoding needs no entropy or logsumexp) or the fused kernel."""

    def __init__(self, model, fused: bool):
        self.model, self.fused = model, fused
        self.shared = all(model.head_weight(j) is model.unembed_weight for j in range(model.n_heads))
        self.unembed_t: torch.Tensor | None = None  # float32 [D, V] contiguous, kept by the decoder

    def _z(self, h, j):
        if self.unembed_t is not None:  # every head shares it
            return torch.mm(h.float(), self.unembed_t)
        return h.float() @ self.model.head_weight(j).float().T

    def weight0(self) -> torch.Tensor:
        """Head 0's unembedding [V, D] in the layout its logits multiply fastest (the kept
        contiguous copy, transposed back, where there is one)."""
        return self.unembed_t.t() if self.unembed_t is not None else self.model.head_weight(0)

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


# ----------------------------------------------------------------------------- steps


class _Step:
    """One decoding strategy. ``begin(hidden, prefix)`` takes the prompt's last hidden states
    [heads, D] and returns the first output; ``body(prefix_host)`` runs one step. Outputs are
    int64 [1 + emit]: n, then the n emitted tokens, then padding. The state (root, drafts,
    device prefix) is updated in place, so a CUDA graph can capture ``body``."""

    T: int  # cache slots a step writes
    logits_norm = True  # head 0 only goes through fused_logits (which can apply the final norm)
    heads: int  # heads the forward pass computes
    emit: int  # most tokens one step emits
    graphable: bool  # body is free of host syncs and host randomness

    def __init__(self, dec: Decoder):
        self.dec = dec
        self.prefix = torch.zeros((), dtype=torch.long, device=dec.device)
        # With fused kernels the verification's logits kernel applies the final norm in its
        # prologue (no launch of its own), where the step reads head 0 through it alone.
        self.normed = not (dec.fused and self.logits_norm)
        self.forward: _Forward | _GraphedForward = _Forward(dec, self.T, final_norm=self.normed,
                                                            heads=self._forward_heads(dec))
        self.drafter = _Drafts(dec, self.heads - 1, self.heads - 1, normed=self.normed)
        self.in_place = False  # set while a CUDA graph is captured or replayed
        # Greedy steps with eager logits verify in one call (``accept_greedy``: on the CPU the
        # extension's kernel; logits, argmax, best path and output otherwise take a dozen ops).
        self.one_call = not dec.fused and dec.acceptance == "greedy" and not dec.sampling

    def _forward_heads(self, dec: Decoder) -> int:
        return self.heads if self.heads > 1 and parallel_heads(dec) else 1

    def _set(self, name: str, value: torch.Tensor) -> None:
        if self.in_place:
            getattr(self, name).copy_(value)
        else:
            setattr(self, name, value)

    def begin(self, hidden: torch.Tensor, prefix: int) -> torch.Tensor:
        raise NotImplementedError

    def body(self, prefix_host: int | None) -> torch.Tensor:
        raise NotImplementedError

    def _start(self, prefix: int) -> None:
        self.prefix.fill_(prefix)
        self.forward.reset()
        self.drafter.reset()


class _NTPStep(_Step):
    emit = 1

    def __init__(self, dec: Decoder):
        self.T, self.heads = 1, 1
        self.logits_norm = not dec.sampling  # sampling reads the full logits
        super().__init__(dec)
        self.graphable = not dec.sampling
        one = torch.ones(1, 1, dtype=torch.bool, device=dec.device)
        self.tree = (torch.zeros(1, dtype=torch.long, device=dec.device), one, one.int())
        self.root = torch.zeros(1, dtype=torch.long, device=dec.device)
        self.count = torch.ones(1, dtype=torch.long, device=dec.device)
        self.paths = torch.zeros(1, 1, dtype=torch.long, device=dec.device)  # the one-node tree's one path

    def _next(self, h, normed: bool = True):  # head-0 hidden states [1, D] -> [1]
        dec = self.dec
        if dec.sampling:
            probs = sampling_probs(dec.model.head_logits(h, 0), dec.temperature, dec.top_k, dec.top_p)
            return torch.multinomial(probs, 1, generator=dec.generator)[:, 0]
        return dec.logits.argmax0(h, normed)

    def begin(self, hidden, prefix):
        self._start(prefix)
        self._set("root", self._next(hidden[:1]))
        return torch.cat([self.count, self.root])

    def body(self, prefix_host):
        h0, _ = self.forward(self.root, self.prefix, prefix_host, *self.tree)
        if self.one_call:
            accepted = accept_greedy(h0, self.dec.logits.weight0(), self.root, self.paths, backend=self.dec.ops_backend)
            self._set("root", accepted.root)
            self.prefix += 1
            return accepted.out
        self._set("root", self._next(h0, self.normed))
        self.prefix += 1
        return torch.cat([self.count, self.root])


class _TreeStep(_Step):
    """Greedy or typical verification of a tree of drafts: a fixed ``Tree``, or ``dynamic``
    (``n_nodes`` chosen per step)."""

    def __init__(self, dec: Decoder, tree: Tree | None, n_nodes: int = 0):
        model, dev = dec.model, dec.device
        self.static = tree is not None
        if tree is not None:
            self.depth_max, self.k = tree.max_depth, tree.topk
            self.T = len(tree)
            tt: TreeTensors = tree.tensors(dev)
            self.tree = (tt.depth, tt.dense_mask, tt.mask)
            self.paths, self.parents = tt.paths, tt.parents
            self.chain = tree.is_chain
            self.flat = tt.head_row * self.k + tt.rank  # node i + 1's entry of the flattened top-k
            # A chain of top-1 drafts takes the flattened top-k as it is.
            self.flat_is_all = self.flat.tolist() == list(range(self.depth_max * self.k))
        else:
            self.depth_max = model.n_heads - 1
            self.k = min(n_nodes, MAX_K, model.config.vocab_size)
            self.level_sizes = _level_sizes(n_nodes, self.k, self.depth_max)
            self.T = 1 + min(n_nodes, sum(self.level_sizes))
            self.chain = False
        self.heads = 1 + self.depth_max
        self.emit = 1 + self.depth_max
        super().__init__(dec)
        self.graphable = True
        self.root = torch.zeros(1, dtype=torch.long, device=dev)
        self.topk = torch.zeros(self.depth_max, self.k, dtype=torch.long, device=dev)
        self.logp = torch.zeros(self.depth_max, self.k, dtype=torch.float32, device=dev)

    def _drafts(self, d):  # the draft heads' states [n, D]
        lp, ids = self.dec.logits.draft_topk(d, self.k, logprobs=not self.static)
        self._set("topk", ids)
        if lp is not None:
            self._set("logp", lp)

    def begin(self, hidden, prefix):
        self._start(prefix)
        self._set("root", self.dec.logits.argmax0(hidden[:1]))
        self._drafts(hidden[1:])
        return torch.cat([torch.ones_like(self.root), self.root])

    def _candidates(self):
        """(tokens [T], (depth, dense, packed), paths, parents) of this step's tree."""
        if self.static:
            drafts = self.topk.view(-1) if self.flat_is_all else self.topk.view(-1).index_select(0, self.flat)
            return torch.cat([self.root, drafts]), self.tree, self.paths, self.parents
        parents, drafts = dynamic_tree(self.logp, self.topk, self.T - 1, self.level_sizes)
        buf = tree_buffers(parents, self.depth_max, check=False, backend=self.dec.ops_backend)
        T = parents.shape[0]
        dense = torch.zeros(T, T, dtype=torch.bool, device=parents.device)
        dense.scatter_(1, buf.retrieve.clamp(min=0), True)  # -1 padding points at the root, an ancestor anyway
        # Every node's root path is a candidate row: the deepest accepted row is a leaf's or
        # one of equal length with the same tokens, so the result equals the leaves' alone.
        return torch.cat([self.root, drafts]), (buf.depth, dense, buf.mask), buf.retrieve, parents

    def body(self, prefix_host):
        dec = self.dec
        tokens, tree, paths, parents = self._candidates()
        h0, carry = self.forward(tokens, self.prefix, prefix_host, *tree)  # [T, D] each
        if self.one_call:  # greedy, eager logits: one call (accept_greedy)
            accepted = accept_greedy(h0, dec.logits.weight0(), tokens, paths, backend=dec.ops_backend)
            out, root, last_node, best_path = accepted
            count = out[:1]
        else:
            target = dec.logits.argmax0(h0, self.normed)
            if dec.acceptance == "greedy":
                res = verify_greedy(tokens, target, paths, backend=dec.ops_backend)
            else:
                # p(node | parent) and the parent's entropy, both at the sampling temperature.
                stats = fused_logits(h0[parents[1:]], dec.model.head_weight(0), 1, tokens[1:],
                                     scale=1.0 / dec.temperature, backend=dec.logits_backend,
                                     **dec.logits.norm(self.normed))
                one, zero = stats.lse.new_ones(1), stats.lse.new_zeros(1)
                node_prob = torch.cat([one, torch.exp(stats.target_logit - stats.lse)])
                parent_entropy = torch.cat([zero, stats.entropy])
                res = verify_typical(tokens, target, node_prob, parent_entropy, paths,
                                     epsilon=dec.typical_epsilon, alpha=dec.typical_alpha, backend=dec.ops_backend)
            count = (res.accept_len + 1).view(1)
            out, root = torch.cat([count, res.tokens]), res.tokens.gather(0, res.accept_len.view(1))
            last_node, best_path = res.last_node, res.best_path
        # index_select, not paths[best]: indexing with a 0-d tensor calls .item(). A chain's
        # accepted path is its first nodes, already in place; only MTP's head blocks over the
        # accepted path (fused kernels) read it there, with the accepted length.
        on_path = self.drafter.on_path
        path = paths.index_select(0, best_path.view(1)).view(-1) if not self.chain or on_path else None
        if not self.chain:
            assert path is not None  # made above for every tree but a chain
            kv_compact_(dec.cache.k, dec.cache.v, path, self.prefix, count.view(()), backend=dec.ops_backend)
        accept_len = count[0] - 1 if on_path else None
        self._drafts(self.drafter(h0, carry, path, accept_len, last_node, self.prefix, prefix_host))
        self._set("root", root)
        self.prefix += count[0]
        return out


def _level_sizes(n_nodes: int, k: int, depth: int) -> list[int]:
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


class _ChainSamplingStep(_Step):
    """Speculative sampling over the chain root, drafts [n] (sampled from q [n, V])."""

    logits_norm = False  # it samples from the full logits

    def __init__(self, dec: Decoder, tree: Tree):
        n = tree.max_depth
        self.T, self.heads, self.emit = n + 1, n + 1, n + 1
        super().__init__(dec)
        self.graphable = False  # it draws from a host-held generator
        one = torch.ones(n + 1, n + 1, dtype=torch.bool, device=dec.device).tril()
        tt = tree.tensors(dec.device)
        self.tree = (tt.depth, one, tt.mask)
        self.path = torch.arange(n + 1, device=dec.device)

    def _probs(self, h, j):
        dec = self.dec
        return sampling_probs(dec.model.head_logits(h, j), dec.temperature, dec.top_k, dec.top_p)

    def _drafts(self, d):  # the draft heads' states [heads - 1, D] at the last accepted position
        self.q = torch.cat([self._probs(d[j - 1:j], j) for j in range(1, self.heads)])
        self.drafts = torch.multinomial(self.q, 1, generator=self.dec.generator)[:, 0]

    def begin(self, hidden, prefix):
        self._start(prefix)
        self.root = torch.multinomial(self._probs(hidden[:1], 0), 1, generator=self.dec.generator)[:, 0]
        self._drafts(hidden[1:])
        return torch.cat([torch.ones_like(self.root), self.root])

    def body(self, prefix_host):
        tokens = torch.cat([self.root, self.drafts])
        h0, carry = self.forward(tokens, self.prefix, prefix_host, *self.tree)
        p = self._probs(h0, 0)
        a, out = speculative_sample_device(p, self.q, self.drafts, self.dec.generator)
        # The chain's nodes 0..a are accepted and already in place.
        self._drafts(self.drafter(h0, carry, self.path, a, a, self.prefix, prefix_host))
        self.root = out.gather(0, a.view(1))
        self.prefix += a + 1
        return torch.cat([(a + 1).view(1), out])


# ----------------------------------------------------------------------------- CUDA graphs


class _GraphedForward:
    """A step's forward pass alone, replayed from a CUDA graph captured on its first call
    (whose warm-up writes the very K/V the call itself writes)."""

    def __init__(self, forward: _Forward | _GraphedForward, device: torch.device):
        self.forward, self.device = forward, device
        self.graph: CapturedCall | None = None

    def reset(self) -> None:
        pass

    def __call__(self, tokens, prefix, prefix_host, depth, dense, packed):
        if self.graph is None:
            self.graph = CapturedCall(lambda t, p, d, m, k: self.forward(t, p, None, d, m, k),
                                    (tokens, prefix, depth, dense, packed), self.device)
        return self.graph(tokens, prefix, depth, dense, packed)


# ----------------------------------------------------------------------------- the engine


def default_tree(model, strategy: str, acceptance: str = "greedy") -> Tree:
    """mtp, and rejection sampling: a chain over every draft head (blockwise parallel
    decoding). medusa: MEDUSA's ``mc_sim_7b_63`` tree, cut to the model's number of MEDUSA
    heads and to the vocabulary."""
    drafts = model.n_heads - 1
    if strategy == "mtp" or acceptance == "rejection":
        return Tree.chain(drafts)
    top = min(10, model.config.vocab_size)
    return Tree([p for p in MC_SIM_7B_63 if len(p) <= drafts and max(p) < top])


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)


def _calibrate_module():
    try:
        from mtpkern import calibrate
    except ImportError:
        return None
    return calibrate


def has_calibration(model) -> bool:
    """Whether ``model`` carries head-acceptance calibration (``mtpkern calibrate``)."""
    calibrate = _calibrate_module()
    check = getattr(calibrate, "has_calibration", None)
    if check is not None:
        return bool(check(model))
    return getattr(model, "calibration", None) is not None


def auto_tree(model, strategy: str, acceptance: str, *, kernels: str, cuda_graph: bool) -> Tree:
    """The calibrated tree for this model on this device (``mtpkern.calibrate.auto_tree``),
    else the default tree, saying so once."""
    calibrate = _calibrate_module()
    tree = None
    if calibrate is not None and hasattr(calibrate, "auto_tree"):
        tree = calibrate.auto_tree(model, device=model.device, dtype=model.dtype, kernels=kernels,
                                   cuda_graph=cuda_graph)
    else:
        _warn_once("tree='auto' needs mtpkern.calibrate, which this install lacks; using the default tree")
    return tree if tree is not None else default_tree(model, strategy, acceptance)


TREE_KINDS = "'chain:3', '4,2,1', 'mc_sim_7b_63', 'auto', 'dynamic' or 'dynamic:N'"


def _resolve_tree(model, strategy: str, tree, acceptance: str, kernels: str, cuda_graph: bool):
    """(a Tree or None, dynamic node budget or 0)."""
    if strategy == "ntp":
        if tree is not None:
            raise ValueError("tree applies to strategy 'mtp' or 'medusa', not 'ntp'")
        return None, 0
    if tree is None and acceptance != "rejection" and has_calibration(model):
        tree = "auto"
    if isinstance(tree, str):
        spec = tree.strip().lower()
        if not spec:
            raise ValueError(f"the tree spec is empty: give one ({TREE_KINDS}), or None for the default tree")
        if spec == "auto":
            tree = auto_tree(model, strategy, acceptance, kernels=kernels, cuda_graph=cuda_graph)
        elif spec == "dynamic" or spec.startswith("dynamic:"):
            if acceptance == "rejection":
                raise ValueError("acceptance 'rejection' is implemented for chains of drafts only, not dynamic trees")
            return None, _dynamic_nodes(spec, model)
        else:
            tree = Tree.parse(tree)
    elif tree is None:
        tree = default_tree(model, strategy, acceptance)
    elif not isinstance(tree, Tree):
        if not isinstance(tree, (list, tuple)):
            raise TypeError(f"tree must be a Tree, a list of paths like [[0], [1], [0, 0]], a spec ({TREE_KINDS}) "
                            f"or None, got {type(tree).__name__}")
        tree = Tree(tree)
    if len(tree) == 1:
        raise ValueError("the tree has no draft nodes; use strategy='ntp'")
    tree.check(n_heads=model.n_heads - 1, topk=min(MAX_K, model.config.vocab_size))
    return tree, 0


def _dynamic_nodes(spec: str, model) -> int:
    if spec == "dynamic":
        return DYNAMIC_NODES
    text = spec[len("dynamic:"):]
    try:
        n = int(text)
    except ValueError:
        n = 0
    limit = model.config.n_positions - 2
    if not 1 <= n <= limit:
        raise ValueError(f"tree {spec!r}: the node budget must be an int in [1, {limit}], got {text!r}")
    return n


def _as_ids(input_ids) -> torch.Tensor:
    """``input_ids`` as a tensor: text, or anything torch cannot read as numbers, is a TypeError."""
    if isinstance(input_ids, (str, bytes)) or (
            isinstance(input_ids, (list, tuple)) and any(isinstance(t, (str, bytes)) for t in input_ids)):
        raise TypeError("input_ids is text, not token ids: tokenize it first, e.g. with "
                        "mtpkern.data.load_tokenizer(checkpoint)(text)['input_ids']")
    try:
        return torch.as_tensor(input_ids)
    except (TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TypeError(f"input_ids must be token ids (a list of ints or an integer tensor), got a "
                        f"{type(input_ids).__name__} that torch cannot read as one ({reason})") from None


def _prompt(input_ids, vocab_size: int, device) -> torch.Tensor:
    ids = _as_ids(input_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(
                f"input_ids has batch size {ids.shape[0]}: a Decoder decodes one sequence at a time (batch 1); "
                "mtpkern.BatchDecoder or mtpkern.generate decode a batch"
            )
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be [T] or [1, T], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("the prompt is empty: generate needs at least one input token")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must hold integer token ids, got {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size})")
    return ids.to(device=device, dtype=torch.long)


def _eos_id(eos_token_id, vocab_size: int) -> int | None:
    """``eos_token_id`` as an int of the vocabulary, or None (no end-of-sequence token): an id
    outside it can never be emitted, and every generation would run to max_new_tokens."""
    if eos_token_id is None:
        return None
    try:
        if isinstance(eos_token_id, bool):
            raise TypeError
        eos = operator.index(eos_token_id)
    except TypeError:
        raise TypeError(f"eos_token_id must be an int token id (or None), got {eos_token_id!r}") from None
    if not 0 <= eos < vocab_size:
        raise ValueError(f"eos_token_id {eos} is outside the vocabulary [0, {vocab_size}): "
                         "the model can never emit it, so it would never stop generation")
    return eos


def _check_generator(generator, device: torch.device) -> None:
    """A generator must be a ``torch.Generator`` on the model's device: torch draws from a
    generator on the device it samples on."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    where = torch.device(generator.device)
    if where.type != device.type or (None not in (where.index, device.index) and where.index != device.index):
        raise ValueError(f"the generator is on {where} but the model is on {device}: "
                         f"pass torch.Generator(device={str(device)!r})")


def _check_args(model, strategy, acceptance, kernels, temperature, top_k, top_p, cuda_graph):
    if not isinstance(model, (GPT2, MTPModel, MedusaModel)):
        raise TypeError(f"model must be a GPT2, MTPModel or MedusaModel, got {type(model).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "mtp" and not (isinstance(model, MTPModel) and model.n_heads > 1):
        raise ValueError(f"strategy 'mtp' needs an MTPModel with at least 2 heads, got a {_describe(model)}")
    if strategy == "medusa" and not isinstance(model, MedusaModel):
        raise ValueError(f"strategy 'medusa' needs a MedusaModel, got a {_describe(model)}")
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"unknown acceptance {acceptance!r}; choose one of {', '.join(ACCEPTANCE)}")
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
    _check_sampling(temperature, top_k, top_p)
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be True or False, got {cuda_graph!r}")
    if strategy != "ntp":
        if acceptance == "greedy" and temperature > 0:
            raise ValueError(
                "acceptance 'greedy' decodes deterministically; with temperature > 0 use "
                "acceptance='rejection' (chains) or 'typical'"
            )
        if acceptance in ("typical", "rejection") and temperature == 0:
            raise ValueError(f"acceptance {acceptance!r} samples: it needs temperature > 0 (or use 'greedy')")
        if acceptance != "rejection" and (top_k or top_p < 1.0):
            raise ValueError("top_k / top_p apply to sampling: strategy 'ntp' or acceptance 'rejection'")
    if cuda_graph and not graphs_available(model.device):
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {model.device}")


def _check_sampling(temperature, top_k, top_p) -> None:
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not number(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no limit), got {top_k!r}")


def _describe(model) -> str:
    return f"{type(model).__name__} with {model.n_heads} head(s)"


class Decoder:
    """The decoding engine for one model: cache, tree, CUDA graphs; decodes many prompts.

    strategy: "ntp" (one token per forward; on an MTP or MEDUSA model, its next-token head
        alone), "mtp" (self-speculation with an MTPModel's heads) or "medusa" (a MedusaModel's
        heads).
    tree: a ``Tree``, MEDUSA choices, a spec for ``Tree.parse`` ("chain:3", "4,2,1"),
        "auto" (the calibrated tree for this device: ``mtpkern.calibrate``), "dynamic" or
        "dynamic:N" (N draft nodes chosen per step from the heads' probabilities). Default:
        "auto" when the model carries calibration, else ``default_tree``.
    temperature 0 is greedy. With temperature > 0: "ntp" samples (top_k, top_p); speculative
        strategies need acceptance "rejection" (chains; exactly the target's distribution) or
        "typical" (MEDUSA's rule: accept while p(token) > min(epsilon, alpha * exp(-entropy)),
        the next root being the model's argmax).
    kernels: "eager" (every op's eager reference, dense-mask attention), "fused" (the fused
        ops and tree attention) or "auto" (fused on CUDA; on the CPU eager logits and
        attention with the C++ extension's verification and KV compaction, when built).
    cuda_graph: replay steps from CUDA graphs (CUDA only; see the module docstring).
    prefix_cache: keep the K/V of the last generation (its prompt and output) and prefill only
        what a new prompt does not share with them: a prompt template, a system prompt or a
        conversation's earlier turns are computed once (the last prompt token always runs).
        Dropped when the weights change (a new storage or an in-place update: tensors made
        under ``torch.inference_mode`` keep no version, so after changing those in place call
        ``refresh()``), by ``run_step`` and by a CUDA graph capture.

    On the CPU a speculative decoder keeps a contiguous transposed copy of each block's four
    matrices and of the unembedding (the layout its BLAS multiplies fastest at T >= 2 rows;
    measured on the demo model, a 5-token step 5% faster), so it holds those weights twice; ``ntp`` multiplies one row,
    fastest through views of the parameters themselves, and copies nothing.
    Greedy acceptance is lossless: the tokens equal greedy "ntp" of the same model.
    """

    def __init__(self, model, strategy: str = "ntp", *, tree=None, kernels: str = "auto",
                 cuda_graph: bool = False, acceptance: str = "greedy", temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, typical_epsilon: float = 0.09, typical_alpha: float = 0.3,
                 prefix_cache: bool = True):
        _check_args(model, strategy, acceptance, kernels, temperature, top_k, top_p, cuda_graph)
        if not isinstance(prefix_cache, bool):
            raise TypeError(f"prefix_cache must be True or False, got {prefix_cache!r}")
        self.prefix_cache = prefix_cache
        self._cached: tuple[list[int], list] | None = None  # (tokens in slots 0.., weight stamp)
        self.model, self.strategy, self.acceptance = model, strategy, acceptance
        self.kernels, self.cuda_graph = kernels, cuda_graph
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, top_p
        self.typical_epsilon, self.typical_alpha = typical_epsilon, typical_alpha
        self.tree, dynamic_nodes = _resolve_tree(model, strategy, tree, acceptance, kernels, cuda_graph)
        if acceptance == "rejection" and self.tree is not None and not self.tree.is_chain:
            raise ValueError("acceptance 'rejection' is implemented for chains of drafts only, not trees")
        self.dynamic = dynamic_nodes > 0
        self.device = model.device
        self.fused = kernels == "fused" or (kernels == "auto" and self.device.type == "cuda")
        self.logits_backend = None if self.fused else "eager"
        # Verification and KV compaction: the C++ kernels wherever built (they beat the eager
        # references on the CPU too: benchmarks/bench_decode.py), the references for "eager".
        self.ops_backend = "eager" if kernels == "eager" else ("cuda" if _backend.HAS_CUDA_EXT else None)
        # Typical acceptance samples nothing: its drafts are top-k and its next root the argmax.
        self.sampling = temperature > 0 and (strategy == "ntp" or acceptance == "rejection")
        self.generator: torch.Generator | None = None
        self.logits = _Logits(model, self.fused)
        self.cache = model.new_cache(1, model.config.n_positions)
        # Eager attention runs the blocks as functions of their tensors (``Attn.weights``),
        # rebuilt when a parameter's storage (copies: or its version) changes.
        self.decode_weights: list | None = None
        self._weights_key: list | None = None
        if strategy == "ntp":
            self.step: _Step = _NTPStep(self)
        elif acceptance == "rejection":
            self.step = _ChainSamplingStep(self, self.tree)
        else:
            self.step = _TreeStep(self, self.tree, dynamic_nodes)
        self._graph: CapturedCall | None = None
        self._graph_weights: list[int] | None = None
        self._contiguous_weights = self.device.type == "cpu" and self.step.T > 1
        self._refresh_weights(self._weight_stamp())

    @property
    def tree_nodes(self) -> int:
        """Tokens one step verifies (the root included)."""
        return self.step.T

    def __repr__(self) -> str:
        tree = f"dynamic:{self.step.T - 1}" if self.dynamic else self.tree
        return (f"Decoder({type(self.model).__name__}, strategy={self.strategy!r}, tree={tree}, "
                f"kernels={self.kernels!r}, cuda_graph={self.cuda_graph}, prefix_cache={self.prefix_cache})")

    # -- prefix cache ------------------------------------------------------------------

    def refresh(self) -> None:
        """Forget the cached K/V (the next prompt is prefilled whole) and rebuild the blocks'
        decode weights: needed only after weights made under ``torch.inference_mode`` change in
        place, which leaves no trace the decoder could see."""
        self._cached = None
        self._weights_key = None
        self._refresh_weights(self._weight_stamp())

    def _weight_stamp(self) -> list:
        # Inference tensors keep no version counter: their storage alone identifies them.
        return [(p.data_ptr(), None if p.is_inference() else p._version) for p in self.model.parameters()]

    def _refresh_weights(self, stamp: list) -> None:
        self.step.drafter.refresh()
        if self.fused:
            return
        key = stamp if self._contiguous_weights else [ptr for ptr, _ in stamp]  # views follow in-place updates
        if key != self._weights_key:
            with torch.no_grad():
                self.decode_weights = self.model.decode_weights(contiguous=self._contiguous_weights)
                # The unembedding too (its logits over T rows), in float32 (what the logits are in).
                self.logits.unembed_t = (self.model.unembed_weight.detach().float().t().contiguous()
                                         if self._contiguous_weights and self.logits.shared else None)
            self._weights_key = key

    def _reusable(self, ids: list[int], stamp: list) -> int:
        """How many leading tokens of the prompt ``ids`` the cache already holds (at most all
        but the last: the prefill needs the last position's hidden states)."""
        if not self.prefix_cache or self._cached is None:
            return 0
        tokens, cached_stamp = self._cached
        if cached_stamp != stamp:
            self._cached = None
            return 0
        n = 0
        for a, b in zip(tokens, ids[:-1]):
            if a != b:
                break
            n += 1
        return n

    # -- CUDA graphs -------------------------------------------------------------------

    @property
    def whole_step_graph(self) -> bool:
        """Whether a CUDA graph replays the whole step (else only its forward pass): a step
        without host randomness whose ops never sync (the extension's kernels; the eager
        references of verification and compaction too, but not the dynamic tree's buffers)."""
        return self.step.graphable and (self.ops_backend == "cuda" or not self.dynamic)

    def reset_graphs(self) -> None:
        """Drop the captured graphs (they read the weights at the addresses they were captured
        with: after ``model.to()`` or ``load_state_dict(assign=True)``, capture again)."""
        self._graph, self._graph_weights = None, None
        self.step.in_place = False
        self.step.forward = _Forward(self, self.step.T, final_norm=self.step.normed,
                                     heads=self.step._forward_heads(self))

    def _graph_weights_now(self) -> list[int]:
        """Where the tensors a capture reads live: the model's, and the decoder's own copies
        of them (the CPU's contiguous decode weights), which ``refresh`` may rebuild."""
        own = [*(self.decode_weights or []), self.logits.unembed_t]
        tensors = (*self.model.parameters(), *self.model.buffers(), *torch.utils._pytree.tree_leaves(own))
        return [t.data_ptr() for t in tensors if isinstance(t, torch.Tensor)]

    def _prepare_graphs(self) -> None:
        weights = self._graph_weights_now()
        if weights == self._graph_weights:
            return
        self.reset_graphs()
        self._graph_weights = weights
        self._cached = None  # the warm-up runs below write cache slots from 0
        step = self.step
        # Capture on a state that is harmless to run: prefix 0 and zero tokens. The prefill
        # that follows overwrites the slots the warm-up wrote, and begin() sets the state.
        step._start(0)
        step.in_place = True
        if self.whole_step_graph:
            self._graph = CapturedCall(lambda: step.body(None), (), self.device)
            return
        step.forward = _GraphedForward(step.forward, self.device)

    # -- decoding ----------------------------------------------------------------------

    def _run_step(self, prefix_host: int) -> torch.Tensor:
        if self.cuda_graph and self.whole_step_graph:
            if self._graph is None:
                raise RuntimeError("the step's CUDA graph was never captured: generate() and run_step() capture it")
            return self._graph()
        return self.step.body(None if self.cuda_graph else prefix_host)

    @torch.inference_mode()
    def generate(self, input_ids, *, max_new_tokens: int, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> GenerationResult:
        """Decode up to ``max_new_tokens`` tokens after ``input_ids`` ([T] or [1, T]; batch 1).
        The output ends at the first ``eos_token_id`` (included)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if generator is not None:
            _check_generator(generator, self.device)
        model, step = self.model, self.step
        eos_token_id = _eos_id(eos_token_id, model.config.vocab_size)
        ids = _prompt(input_ids, model.config.vocab_size, self.device)
        P0, T = ids.shape[0], step.T
        # The last step starts with at most max_new_tokens - 1 tokens emitted (its root not yet
        # cached) and writes T slots.
        need = P0 + max_new_tokens + T - 2
        ctx = model.config.n_positions
        if need > ctx:
            over = need - ctx
            what = f"prompt ({P0} tokens) + max_new_tokens ({max_new_tokens})"
            what += f" + tree ({T} nodes)" if self.strategy != "ntp" else ""
            hint = (f"lower max_new_tokens to at most {max_new_tokens - over}" if max_new_tokens > over
                    else "shorten the prompt")
            raise ValueError(f"{what} needs {need} cache slots, {over} more than the model's context of {ctx}; {hint}")
        self.generator = generator
        self._timing_state = False
        prompt, stamp = ids.tolist(), self._weight_stamp()
        self._refresh_weights(stamp)  # before the graphs: a capture reads the weights it finds
        if self.cuda_graph:
            self._prepare_graphs()
        reuse = self._reusable(prompt, stamp)
        self._cached = None  # until this generation ends: an error leaves the cache unknown
        out: list[int] = []
        accept_lengths: list[int] = []
        step_times: list[float] = []

        def emit(chunk) -> bool:
            """Append tokens up to EOS / max_new_tokens; True when generation is over."""
            for t in chunk:
                if t < 0:
                    raise ValueError(f"the model's logits are NaN at generated token {len(out)}: no token can be chosen "
                                     "(its weights, or the hidden states they produce, hold NaN or inf)")
                out.append(t)
                if t == eos_token_id or len(out) == max_new_tokens:
                    return True
            return False

        t0 = now(self.device)
        h = prefill(model, self.cache, ids, heads=step.heads, start=reuse, weights=self.decode_weights)  # [heads, D]
        first = step.begin(h, P0).tolist()
        done = emit(first[1:2])
        prefill_time = time.perf_counter() - t0
        prefix = P0
        while not done:
            ts = time.perf_counter()
            _check_room(self.cache, prefix, T)
            host = self._run_step(prefix).tolist()  # the step's one host sync
            n = host[0]
            prefix += n  # the root and the accepted drafts are now in the cache
            accept_lengths.append(n)
            done = emit(host[1 : 1 + n])
            step_times.append(time.perf_counter() - ts)
        total = time.perf_counter() - t0
        self.generator = None
        if self.prefix_cache:  # slots 0..prefix-1 hold the prompt and the output but its last token
            self._cached = ((prompt + out)[:min(prefix, P0 + len(out))], self._weight_stamp())
        return GenerationResult(out, len(step_times), accept_lengths, step_times, prefill_time, total, reuse)

    # -- cost model --------------------------------------------------------------------

    @torch.inference_mode()
    def run_step(self, prefix_len: int) -> list[int]:
        """One decoding step over ``prefix_len`` cached tokens, as the decode loop runs it (host
        sync included), for timing: the cache contents are garbage, the root and drafts are
        those of the previous call (zero hidden states the first time). Returns the output."""
        step = self.step
        if prefix_len + step.T > self.cache.max_len:
            raise ValueError(f"prefix_len {prefix_len} + {step.T} tree nodes exceeds the cache of "
                             f"{self.cache.max_len} slots")
        self._cached = None  # the step writes garbage into the cache
        first = not getattr(self, "_timing_state", False)  # the first timed step: not on every one
        if first:
            self._refresh_weights(self._weight_stamp())
        if self.cuda_graph:
            self._prepare_graphs()
        if first:
            h = torch.zeros(step.heads, self.model.config.n_embd, dtype=self.model.dtype, device=self.device)
            step.begin(h, prefix_len)
            self._timing_state = True
        step._start(prefix_len)
        return self._run_step(prefix_len).tolist()

    @torch.inference_mode()
    def time_step(self, *, prefix_len: int = 64, iters: int = 10, warmup: int = 2) -> float:
        """Median seconds of ``run_step(prefix_len)``: one decoding step of this decoder (its
        tree's T tokens over ``prefix_len`` cached ones), synchronised."""
        times = []
        for i in range(warmup + iters):
            t0 = now(self.device)
            self.run_step(prefix_len)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2]


def step_cost_tree(n_nodes: int, n_draft_heads: int, topk: int = 10) -> Tree:
    """A tree of ``n_nodes`` nodes (the root included) over ``n_draft_heads`` heads and ranks
    below ``topk``, for timing steps by size: the paths in order of (rank sum, depth, ranks),
    a shape close to what acceptance-driven trees look like."""
    if n_nodes < 2:
        raise ValueError(f"a tree to time needs at least 2 nodes, got {n_nodes}")
    import itertools

    paths: list[tuple[int, ...]] = []
    budget = n_nodes - 1
    for total in itertools.count():
        level = [p for d in range(1, n_draft_heads + 1)
                 for p in itertools.product(range(min(topk, total + 1)), repeat=d) if sum(p) == total]
        for p in sorted(level, key=lambda p: (len(p), p)):
            if len(paths) < budget and (len(p) == 1 or p[:-1] in paths):
                paths.append(p)
        if len(paths) >= budget or total > budget + n_draft_heads * topk:
            break
    if len(paths) < budget:
        raise ValueError(f"no tree of {n_nodes} nodes over {n_draft_heads} heads and top-{topk}")
    return Tree([list(p) for p in paths])


def time_step(model, n_nodes: int, *, kernels: str = "auto", cuda_graph: bool = False, prefix_len: int = 64,
              iters: int = 10) -> float:
    """Median seconds of one greedy decoding step of ``n_nodes`` tree tokens (1 = ``ntp``) on
    ``model``'s device, dtype, ``kernels`` and ``cuda_graph`` setting: the cost model's
    measurement (``mtpkern.calibrate`` and ``benchmarks/bench_decode.py`` use it)."""
    if n_nodes == 1:
        dec = Decoder(model, "ntp", kernels=kernels, cuda_graph=cuda_graph)
    else:
        strategy = model.config.model_type
        if strategy not in ("mtp", "medusa"):
            raise ValueError(f"a {type(model).__name__} has no draft heads: it can only time n_nodes=1")
        tree = step_cost_tree(n_nodes, model.n_heads - 1, min(10, model.config.vocab_size))
        dec = Decoder(model, strategy, tree=tree, kernels=kernels, cuda_graph=cuda_graph)
    return dec.time_step(prefix_len=prefix_len, iters=iters)


__all__ = [
    "Decoder", "GenerationResult", "prefill", "default_tree", "dynamic_tree", "time_step", "step_cost_tree",
    "eager_tree_mask", "has_calibration", "auto_tree", "STRATEGIES", "ACCEPTANCE", "KERNELS", "DYNAMIC_NODES",
]
