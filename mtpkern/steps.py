"""The single-row decoding core: a step per strategy, its forward pass, draft heads, CUDA graphs.

Every strategy is a step with one interface (``begin`` after the prefill, ``body`` per step)
whose output is one int64 tensor ``[n, t_1 .. t_n, -1 ...]``: the tokens the step emits. The
decode loop (:class:`mtpkern.Decoder`) reads it with one host sync per step and knows nothing
else of the strategy. ``StepEngine`` holds a step with its cache, graphs and weights, and runs
or times it; the cost model (``mtpkern.costmodel``) times it, the planner plans ``auto`` trees
from those times, and ``Decoder`` runs the generation loop on top.

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

import contextlib
import math
import time
from typing import Callable

import torch

from mtpkern.core import (
    Logits, dynamic_tree, eager_tree_mask, head_probs, level_sizes, sample_drafts, typical_stats, weights_stamp,
)
from mtpkern.graphs import CapturedCall
from mtpkern.layers import Attn
from mtpkern.ops.fused_logits import MAX_K
from mtpkern.ops.kv_compact import kv_compact_
from mtpkern.ops.tree_mask import tree_buffers
from mtpkern.ops.verify import accept_greedy, verify_greedy, verify_typical
from mtpkern.options import DecodeOptions
from mtpkern.runtime import now
from mtpkern.sampling import speculative_sample_device
from mtpkern.tree import Tree, TreeTensors

# ----------------------------------------------------------------------------- forward passes


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

    def __init__(self, dec: StepEngine, T: int, final_norm: bool = True, heads: int = 1):
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


def parallel_heads(dec: StepEngine) -> bool:
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

    def __init__(self, dec: StepEngine, depth: int, n: int, normed: bool = True):
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

    def __init__(self, dec: StepEngine):
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

    def _forward_heads(self, dec: StepEngine) -> int:
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

    def __init__(self, dec: StepEngine):
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
            probs = head_probs(dec.model, h, 0, dec.temperature, dec.options.top_k, dec.options.top_p)
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

    def __init__(self, dec: StepEngine, tree: Tree | None, n_nodes: int = 0):
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
            self.level_sizes = level_sizes(n_nodes, self.k, self.depth_max)
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
                node_prob, parent_entropy = typical_stats(h0[parents[1:]], tokens[1:], dec.model.head_weight(0),
                                                          dec.temperature, dec.logits_backend,
                                                          dec.logits.norm(self.normed))
                res = verify_typical(tokens, target, node_prob, parent_entropy, paths,
                                     epsilon=dec.options.typical_epsilon, alpha=dec.options.typical_alpha,
                                     backend=dec.ops_backend)
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


class _ChainSamplingStep(_Step):
    """Speculative sampling over the chain root, drafts [n] (sampled from q [n, V])."""

    logits_norm = False  # it samples from the full logits

    def __init__(self, dec: StepEngine, tree: Tree):
        n = tree.max_depth
        self.T, self.heads, self.emit = n + 1, n + 1, n + 1
        super().__init__(dec)
        self.graphable = False  # it draws from a host-held generator
        one = torch.ones(n + 1, n + 1, dtype=torch.bool, device=dec.device).tril()
        tt = tree.tensors(dec.device)
        self.tree = (tt.depth, one, tt.mask)
        self.path = torch.arange(n + 1, device=dec.device)

    def _probs(self, h, j):
        o = self.dec.options
        return head_probs(self.dec.model, h, j, o.temperature, o.top_k, o.top_p)

    def _drafts(self, d):  # the draft heads' states [heads - 1, D] at the last accepted position
        self.q, self.drafts = sample_drafts(self.dec.model, d, self.dec.options, self.dec.generator)

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


class StepEngine:
    """The single-row core under :class:`mtpkern.Decoder`: one model, its cache, one step (a
    strategy over a given ``Tree``, or a dynamic tree), its CUDA graphs, the CPU's decode
    weights. It runs and times steps (``run_step``, ``time_step``: the cost model's
    measurement) and knows nothing of planning: ``options.tree`` must not be ``"auto"``."""

    def __init__(self, model, options: DecodeOptions):
        self.options = opts = options
        opts.check_model(model)
        self._cached: tuple[list[int], list] | None = None  # the Decoder's prefix cache; None once slots change
        self.model, self.strategy, self.acceptance = model, opts.strategy, opts.acceptance
        self.kernels, self.cuda_graph = opts.kernels, opts.cuda_graph
        self.temperature = opts.temperature
        self.tree, dynamic_nodes = opts.static_tree(model)
        self.dynamic = dynamic_nodes > 0
        self.device = model.device
        self.fused = opts.fused_on(self.device)
        self.logits_backend = None if self.fused else "eager"
        self.ops_backend = opts.ops_backend
        self.sampling = opts.sampling
        self.generator: torch.Generator | None = None
        self.logits = Logits(model, self.fused)
        self.cache = model.new_cache(1, model.config.n_positions)
        # Eager attention runs the blocks as functions of their tensors (``Attn.weights``),
        # rebuilt when a parameter's storage (copies: or its version) changes.
        self.decode_weights: list | None = None
        self._weights_key: list | None = None
        self.step = self._make_step(dynamic_nodes)
        self._graph: CapturedCall | None = None
        self._graph_weights: list[int] | None = None
        self._contiguous_weights = self.device.type == "cpu" and self.step.T > 1
        self._refresh_weights(self._weight_stamp())

    def _make_step(self, dynamic_nodes: int) -> _Step:
        if self.strategy == "ntp":
            return _NTPStep(self)
        if self.acceptance == "rejection":
            assert self.tree is not None  # static_tree gives rejection sampling a chain
            return _ChainSamplingStep(self, self.tree)
        return _TreeStep(self, self.tree, dynamic_nodes)

    @property
    def tree_nodes(self) -> int:
        """Tokens one step verifies (the root included)."""
        return self.step.T

    def __repr__(self) -> str:
        tree = f"dynamic:{self.step.T - 1}" if self.dynamic else self.tree
        return (f"{type(self).__name__}({type(self.model).__name__}, strategy={self.strategy!r}, tree={tree}, "
                f"kernels={self.kernels!r}, cuda_graph={self.cuda_graph})")

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
        return weights_stamp(self.model, *(self.decode_weights or []), self.logits.unembed_t)

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

    # -- profiling hooks ---------------------------------------------------------------

    @torch.inference_mode()
    def step_parts(self, prefix_len: int) -> dict:
        """The parts of one tree step over ``prefix_len`` cached tokens, each a call of no
        arguments on the step's own shapes, from a running decode's state (zero hidden states,
        random tokens), for profiling (``mtpkern.bench.step_breakdown``):

        ``step``: the whole step as the decode loop runs it (its host sync included);
        ``forward``: the verification pass; ``logits``: head 0's argmax at every node;
        ``draft_heads``: the draft heads' pass a fully accepted path runs (None where they run
        inside the verification pass); ``rest``: the step with its verification pass replaced by
        one that returns that pass's outputs (everything but that pass). Call them under
        ``torch.inference_mode``."""
        step = self.step
        if not isinstance(step, _TreeStep):
            raise TypeError(f"step_parts profiles a tree step; this engine runs {type(step).__name__}")
        device, T = self.device, step.T
        tokens = torch.randint(0, self.model.config.vocab_size, (T,), device=device)
        step.begin(torch.zeros(step.heads, self.model.config.n_embd, dtype=self.model.dtype, device=device), prefix_len)
        tree_bufs = step._candidates()[1]
        verify = step.forward

        def forward():
            return verify(tokens, step.prefix, prefix_len, *tree_bufs)

        h0, carry = forward()  # also puts the mask in a running decode's state

        def run():
            step.prefix.fill_(prefix_len)
            return self._run_step(prefix_len).tolist()

        def rest():
            step.forward = _Outputs(h0, carry)  # type: ignore[assignment]  # the same call and reset
            try:
                return run()
            finally:
                step.forward = verify

        path = torch.arange(step.heads, device=device).clamp(max=T - 1)
        last = torch.tensor(min(step.heads, T) - 1, device=device)

        def draft_heads():
            return step.drafter(h0, carry, path, last, last, step.prefix, prefix_len)

        separate = step.heads > 1 and not step.drafter.parallel
        return dict(step=run, forward=forward, logits=lambda: self.logits.argmax0(h0, step.normed),
                    draft_heads=draft_heads if separate else None, rest=rest)

    @contextlib.contextmanager
    def hooked_passes(self, hook: Callable[[Callable], Callable]):
        """Within the block, the step's forward passes (verification and draft heads) run as
        ``hook(pass)``, a function of the same arguments: a profiler's hook (``mtpkern.bench``
        times the share of a decode spent outside them)."""
        step = self.step
        forward, drafter = step.forward, step.drafter
        step.forward = _Wrapped(forward, hook(forward))  # type: ignore[assignment]
        step.drafter = _Wrapped(drafter, hook(drafter))  # type: ignore[assignment]
        try:
            yield self
        finally:
            step.forward, step.drafter = forward, drafter


class _Outputs:
    """A step's forward pass that returns given outputs (``StepEngine.step_parts``)."""

    def __init__(self, *outputs):
        self.outputs = outputs

    def __call__(self, *args):
        return self.outputs

    def reset(self) -> None:
        pass


class _Wrapped:
    """``obj`` with its call replaced by ``call`` (its other attributes kept)."""

    def __init__(self, obj, call):
        self._obj, self._call = obj, call

    def __call__(self, *args):
        return self._call(*args)

    def __getattr__(self, name):
        return getattr(self._obj, name)


__all__ = ["StepEngine", "parallel_heads"]
