"""The decoding core, for one prompt and for many: a step per strategy with a batch dimension,
its forward pass, the draft heads, the decode loop, CUDA graphs.

A batch's state is a :class:`Rows`: for each of its B rows the root (the next token, chosen
but not yet cached), the drafts, the prefix length (cached tokens) and whether it still
decodes, all on the device, plus each row's random stream. Every strategy is a step with one
interface (``begin(rows, states)`` after the prefill, ``body(rows, prefix_host)`` per step)
whose output is one int64 tensor [B, 1 + emit], row b ``[n, t_1 .. t_n, -1 ...]``: the tokens
row b emits. The decode loop (``StepEngine.decode``) reads it with one host sync per step and
knows nothing else of the strategy. ``StepEngine`` holds a step with its cache, graphs and
weights, and runs or times it; the cost model (``mtpkern.costmodel``) times it, the planner
plans ``auto`` trees from those times, and the engines on top (``mtpkern.Decoder``, one
prompt; ``mtpkern.BatchDecoder``, many) prefill and run the loop.

- ``_NTPStep`` (``ntp``): the root alone; its head-0 logits choose the next root.
- ``_TreeStep`` (``mtp``, ``medusa``, greedy or typical acceptance): the root and a tree of
  draft tokens (the heads' top-k at the last accepted position, see ``mtpkern.tree``) in one
  pass, each node at position ``prefix + depth`` and attending to the prefix and its
  ancestors. Head 0 at each node says what the model itself would decode after it; greedy
  verification keeps the longest root-to-leaf path whose drafts all agree with it, plus the
  model's own next token (the new root). The accepted path's K/V move into place
  (``kv_compact_``), and the heads at the last accepted node give the next drafts: the pass
  that verifies also proposes (Stern et al. 2018; Gloeckle et al. 2024; Cai et al. 2024).
  The tree is fixed (a ``Tree``), or ``dynamic`` (one row): chosen per step from the heads'
  own probabilities (below).
- ``_ChainSamplingStep`` (chains, temperature > 0, acceptance ``rejection``): speculative
  sampling (Leviathan et al. 2023; Chen et al. 2023), which keeps the target's distribution,
  each row from its own stream.
- ``_TreeSamplingStep`` (other trees, static or dynamic, acceptance ``rejection``): recursive
  rejection sampling over a tree of drafts sampled without replacement (``verify_rejection``),
  which keeps it too.

Greedy speculative decoding emits exactly the tokens greedy ``ntp`` emits: a draft is kept
only where it equals the model's own argmax given the same prefix, whatever the tree. Rows
accept different numbers of tokens per step, so their cache positions drift apart: each row
writes its tree at its own slots and positions, with its own prefix length.

Dynamic trees (EAGLE-2's rule, Li et al. 2024, on the heads of the model itself): node
``(r1, ..., rd)`` scores ``prod_i p_i(r_i)``, the product of the draft heads' probabilities
along its path; a step verifies the N best nodes. A child never scores above its parent, so
the N best form a tree; they are found level by level (the best N of each level's children
of the previous level's best N) with fixed shapes, and the tree's mask, depths and paths are
built on the device by the ``tree_buffers`` op, so a CUDA graph still fits.

One row (an engine of ``rows=1``, ``mtpkern.Decoder``) has a CPU fast path: the blocks run as
functions of their tensors (``Attn.weights``), the attention mask is additive and only updated,
MTP's head blocks run batched in the verification pass, greedy verification is one call
(``accept_greedy``) and the KV compaction takes scalars. Many rows run the same parts with a
per-row mask (eager attention) or per-row prefix lengths (the fused kernels).

CUDA graphs (``cuda_graph=True``): deterministic steps (greedy, typical) are captured whole
(forward, logits, verification, KV compaction, next drafts), once per batch size, and replayed
per step; sampling steps, and dynamic trees without the C++ extension (the eager
``tree_buffers`` syncs), replay the forward pass alone. Captures happen on the first
``generate`` and are kept by the engine; ``reset_graphs()`` drops them (after the weights move).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch
from torch import nn

from mtpkern.core import (
    Logits, dynamic_tree, eager_tree_mask, level_sizes, sample_drafts,
    verify_greedy_rows, weights_stamp,
)
from mtpkern.cpu_matmul import Matmul
from mtpkern.graphs import CapturedCall
from mtpkern.inputs import RowOutput, check_room
from mtpkern.layers import Attn, KVCache
from mtpkern.ops.fused_logits import MAX_K
from mtpkern.ops.kv_compact import kv_compact_
from mtpkern.ops.tree_mask import tree_buffers
from mtpkern.ops.verify import accept_greedy, verify_typical
from mtpkern.ops.verify_sampled import verify_rejection
from mtpkern.options import DecodeOptions
from mtpkern.runtime import now
from mtpkern.sampling import sample_tree_drafts, speculative_sample_device
from mtpkern.tree import Tree, TreeTensors

# ----------------------------------------------------------------------------- state


class Rows:
    """The decoding state of B rows on the device, which every step updates in place under a
    CUDA graph (so that the graph replays on these very tensors): the roots [B], the drafts
    [B, n, k] (their log-probabilities for a dynamic tree), the prefix lengths [B] (``at``: row
    0's as a 0-d view, the one-row path's), whether each row still decodes [B], the rows of
    the engine's cache it uses, and per row a random stream and rejection sampling's draft
    distributions."""

    def __init__(self, engine: StepEngine, B: int):
        dev, step = engine.device, engine.step
        self.B = B
        n, k = max(step.heads - 1, 1), step.k
        self.root = torch.zeros(B, dtype=torch.long, device=dev)
        self.topk = torch.zeros(B, n, k, dtype=torch.long, device=dev)
        self.logp = torch.zeros(B, n, k, dtype=torch.float32, device=dev)
        self.prefix = torch.zeros(B, dtype=torch.long, device=dev)
        self.at = self.prefix[0]
        self.active = torch.ones(B, dtype=torch.bool, device=dev)
        cache = engine.cache
        self.cache = cache if B == cache.k.shape[1] else KVCache.from_tensors(cache.k[:, :B], cache.v[:, :B])
        self.index = torch.arange(B, device=dev)
        self.generators: list[torch.Generator | None] = [None] * B
        self.q: list[torch.Tensor | None] = [None] * B  # rejection sampling: each row's draft distributions [n, V]
        self.tree_q: torch.Tensor | None = None  # rejection sampling on a tree: the heads' distributions [B, n, V]
        self.tree_drafts: torch.Tensor | None = None  # and the sampled tree's tokens [B, T] (the root's -1)
        self.in_place = False  # set while a CUDA graph captures or replays a step on this state

    def set(self, name: str, value: torch.Tensor) -> None:
        """``name`` becomes ``value``: copied into the kept tensor under a graph, else rebound."""
        if self.in_place:
            getattr(self, name).copy_(value)
        else:
            setattr(self, name, value)


# ----------------------------------------------------------------------------- forward passes


class _Forward:
    """One forward pass of every row's T tree tokens at cache slots prefix + i and positions
    prefix + depth[i], returning head 0's hidden states [B, T, D] (what verification needs)
    and the carry the draft heads start from (``_Drafts``).

    One row with a host prefix (eager attention, no CUDA graph) keeps one additive mask
    [T, cache] and only updates it: the slots that joined the prefix since the last step turn
    on, and the tree's own block is rewritten, instead of rebuilding the whole mask per step.
    Otherwise the mask is built on the device (``eager_tree_mask``, per row); fused kernels read
    the packed mask and the prefix lengths directly.
    """

    def __init__(self, engine: StepEngine, T: int, final_norm: bool = True, heads: int = 1):
        self.engine, self.model, self.fused = engine, engine.model, engine.fused
        self.final_norm, self.heads = final_norm, heads
        self.offsets = torch.arange(T, device=engine.device)
        max_len = engine.cache.max_len
        # Additive (0 / -inf, the model's dtype), which SDPA adds as it is; a bool mask it would
        # convert in every layer.
        self.mask = torch.full((T, max_len), -math.inf, dtype=engine.model.dtype, device=engine.device)
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

    def attn(self, prefix: torch.Tensor, prefix_host: int | None, cache: KVCache, dense, packed) -> Attn:
        """How T new tokens at slots prefix + i attend: to the prefix and, among themselves,
        as ``dense`` (bool [T, T]) / ``packed`` (its bit-packed rows) say. ``prefix``: 0-d (one
        row) or [B]; ``prefix_host``: the longest row's prefix on the host, or None (a graph)."""
        T = dense.shape[0]
        one = prefix.dim() == 0
        slots = prefix + self.offsets if one else prefix[:, None] + self.offsets
        if self.fused:
            return Attn(cache, slots, tree_mask=packed, prefix_len=prefix)
        weights = self.engine.decode_weights
        if prefix_host is None or not one:
            span = cache.max_len if prefix_host is None else prefix_host + T
            mask = eager_tree_mask(dense, prefix, span)
            return Attn(cache, slots, mask=mask if one else mask[:, None], weights=weights)
        p = prefix_host
        if p > self.mask_prefix:
            self.mask[:, self.mask_prefix:p] = 0.0
        self.mask[:, p:p + T] = self._block(dense)
        self.mask_prefix = p
        return Attn(cache, slots, mask=self.mask[:, :p + T], weights=weights)

    def __call__(self, tokens, prefix: torch.Tensor, prefix_host: int | None, cache: KVCache, depth, dense, packed):
        """tokens [B, T] -> (h0 [B, T, D], carry)."""
        attn = self.attn(prefix, prefix_host, cache, dense, packed)
        pos = prefix + depth if prefix.dim() == 0 else prefix[:, None] + depth
        if self.heads > 1:  # MTP, one row: every head over every node (``MTPModel.decode_heads``), [heads, T, D]
            hs = self.model.decode_heads(tokens, pos, attn, self.heads - 1)
            return hs[0][None], hs
        return self.model.decode_hidden(tokens, pos, attn, final_norm=self.final_norm)


def parallel_heads(engine: StepEngine) -> bool:
    """Whether an MTP model's draft heads run in the verification pass (one row, eager attention)."""
    return engine.model.draft_on_path and not engine.fused and engine.single


class _Drafts:
    """The draft heads' hidden states [B, n, D] where the next drafts come from: each row's
    last accepted node.

    MEDUSA's heads are a function of that node's hidden state alone. MTP's heads are blocks
    with KV caches of their own. With one row and eager attention they run in the
    verification pass itself, over every tree node beside head 0 (``parallel``: the forward's
    carry holds every head's states, and the drafts are its row at the last accepted node; the
    K/V of rejected nodes are moved away by the compaction or overwritten, like the trunk's).
    Otherwise they run after it, over each row's accepted path alone (R = depth + 1 rows,
    written at slots prefix + i, causal among themselves; rows past the accepted length write
    slots the next step overwrites before it reads them): there a verification pass costs
    head 0 alone."""

    def __init__(self, engine: StepEngine, n: int, normed: bool = True):
        self.engine, self.model, self.n, self.normed = engine, engine.model, n, normed
        self.parallel = parallel_heads(engine) and n > 0
        self.on_path = engine.model.draft_on_path and n > 0 and not self.parallel
        self.stack = None  # MEDUSA: the heads' stacked weights, fetched once per generation (refresh)
        if self.on_path:
            tt = Tree.chain(n).tensors(engine.device)
            self.rows = _Forward(engine, n + 1)
            self.causal = (tt.dense_mask, tt.mask)

    def reset(self) -> None:
        if self.on_path:
            self.rows.reset()

    def refresh(self) -> None:
        """Fetch what the heads read (the engine calls it when a generation starts)."""
        if self.n and not (self.on_path or self.parallel) and hasattr(self.model, "head_stack"):
            self.stack = self.model.head_stack(self.n)

    def __call__(self, s: Rows, h0, carry, path, accept_len, last_node, prefix_host) -> torch.Tensor:
        """Draft heads 1..n at each row's last accepted node, from the step's head-0 states h0
        [B, T, D] and carry, the accepted paths [B, n + 1] (padded with -1), accepted lengths
        and last nodes [B]."""
        if self.parallel:  # one row: carry [heads, T, D]
            return carry[1:].index_select(1, last_node.view(1))[:, 0][None]
        if self.on_path:
            return self._on_path(s, carry, path, accept_len, prefix_host)
        h = h0[0].index_select(0, last_node.view(1)) if s.B == 1 else h0[s.index, last_node]  # [B, D]
        if not self.normed:  # the verification's logits kernel applied the final norm itself
            h = self.model.final_norm(h)
        # MEDUSA's heads start from head 0's normalised state
        return self.model.heads_at(h, self.n, self.stack).transpose(0, 1)

    def _on_path(self, s: Rows, carry, path, accept_len, prefix_host) -> torch.Tensor:
        model, n = self.model, self.n
        if self.engine.single:  # one row: the n head blocks grouped into one (a CPU pays per op)
            attn = self.rows.attn(s.at, prefix_host, s.cache, *self.causal)
            x = carry[0].index_select(0, path[0].clamp(min=0))[None]
            return model.draft_hidden(x, n, attn, accept_len.view(()))[None]
        attn = self.rows.attn(s.prefix, prefix_host, s.cache, *self.causal)
        x = carry[s.index[:, None], path.clamp(min=0)]  # [B, R, D]
        return torch.stack([model.head_forward(j, x, attn)[s.index, accept_len] for j in range(1, n + 1)], 1)


# ----------------------------------------------------------------------------- steps


class _Step:
    """One decoding strategy over the rows of a :class:`Rows`. ``begin(s, states)`` takes each
    row's prompt's last hidden states [B, heads, D] and sets its first root and drafts;
    ``body(s, prefix_host)`` runs one step. Outputs are int64 [B, 1 + emit]: per row n, then
    the n emitted tokens, then padding. The state is updated in place under a CUDA graph."""

    T: int  # cache slots a step writes per row
    logits_norm = True  # head 0 only goes through fused_logits (which can apply the final norm)
    heads: int  # heads the forward pass computes
    emit: int  # most tokens one step emits
    k = 1  # drafts per head
    graphable: bool  # body is free of host syncs and host randomness

    def __init__(self, engine: StepEngine):
        self.engine, self.model, self.single = engine, engine.model, engine.single
        # With fused kernels the verification's logits kernel applies the final norm in its
        # prologue (no launch of its own), where the step reads head 0 through it alone and the
        # norm is a LayerNorm (the kernel's prologue; the Llama family's RMSNorm runs before it).
        self.normed = not (engine.fused and self.logits_norm and isinstance(engine.model.final_norm, nn.LayerNorm))
        self.forward: _Forward | _GraphedForward = self.new_forward()
        self.drafter = _Drafts(engine, self.heads - 1, normed=self.normed)
        # One row's greedy steps with eager logits verify in one call (``accept_greedy``: on
        # the CPU the extension's kernel; logits, argmax, best path and output otherwise take a
        # dozen ops).
        self.one_call = engine.single and not engine.fused and engine.acceptance == "greedy" and not engine.sampling

    def new_forward(self) -> _Forward:
        heads = self.heads if self.heads > 1 and parallel_heads(self.engine) else 1
        return _Forward(self.engine, self.T, final_norm=self.normed, heads=heads)

    def start(self, s: Rows, prefixes: list[int]) -> None:
        """Every row decodes from its prefix length (the prompt's tokens in its cache row)."""
        if self.single:
            s.at.fill_(prefixes[0])
        else:
            s.prefix.copy_(torch.tensor(prefixes))
        s.active.fill_(True)
        self.forward.reset()
        self.drafter.reset()

    def begin(self, s: Rows, states: torch.Tensor) -> None:
        raise NotImplementedError

    def body(self, s: Rows, prefix_host: int | None) -> torch.Tensor:
        raise NotImplementedError

    def _prefix(self, s: Rows) -> torch.Tensor:
        return s.at if self.single else s.prefix

    def _forward(self, s: Rows, tokens, prefix_host, tree):
        return self.forward(tokens, self._prefix(s), prefix_host, s.cache, *tree)

    def _sample(self, s: Rows, h: torch.Tensor) -> torch.Tensor:
        """One token [B] from head 0's distribution at each row's state h [B, D], from its stream."""
        p = self.engine.logits.probs(h, 0, self.engine.options)  # [B, V]
        return torch.cat([torch.multinomial(p[b : b + 1], 1, generator=s.generators[b])[0] for b in range(s.B)])

    def _finish(self, s: Rows, count: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Each row's next root (its last emitted token) and prefix (a finished row stays where
        it ended), from the accepted counts [B] and the emitted tokens [B, emit]; the output."""
        root = tokens[:, 0] if tokens.shape[1] == 1 else tokens.gather(1, (count - 1)[:, None])[:, 0]
        s.set("root", root)
        if self.single:
            s.at += count[0]
        else:
            s.prefix.add_(torch.where(s.active, count, 0))
        return torch.cat([count[:, None], tokens], 1)


class _NTPStep(_Step):
    emit = 1

    def __init__(self, engine: StepEngine):
        self.T, self.heads = 1, 1
        self.logits_norm = not engine.sampling  # sampling reads the full logits
        super().__init__(engine)
        self.graphable = not engine.sampling
        one = torch.ones(1, 1, dtype=torch.bool, device=engine.device)
        self.tree = (torch.zeros(1, dtype=torch.long, device=engine.device), one, one.int())
        self.count = torch.ones(engine.rows, dtype=torch.long, device=engine.device)
        self.paths = torch.zeros(1, 1, dtype=torch.long, device=engine.device)  # the one-node tree's one path

    def _next(self, s: Rows, h: torch.Tensor, normed: bool = True) -> torch.Tensor:  # [B, D] -> [B]
        if self.engine.sampling:
            return self._sample(s, h)
        return self.engine.logits.argmax0(h, normed)

    def begin(self, s, states):
        s.set("root", self._next(s, states[:, 0]))

    def body(self, s, prefix_host):
        h0, _ = self._forward(s, s.root[:, None], prefix_host, self.tree)
        if self.one_call:
            accepted = accept_greedy(h0[0], self.engine.logits.weight0(self.T), s.root, self.paths,
                                     backend=self.engine.ops_backend)
            s.set("root", accepted.root)
            s.at += 1
            return accepted.out[None]
        return self._finish(s, self.count[: s.B], self._next(s, h0[:, 0], self.normed)[:, None])


class _TreeStep(_Step):
    """Greedy or typical verification of a tree of drafts: a fixed ``Tree``, or ``dynamic``
    (``n_nodes`` chosen per step; one row)."""

    def __init__(self, engine: StepEngine, tree: Tree | None, n_nodes: int = 0):
        model, dev = engine.model, engine.device
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
        super().__init__(engine)
        self.graphable = True

    def _drafts(self, s: Rows, d: torch.Tensor) -> None:  # the draft heads' states [B, n, D]
        lp, ids = self.engine.logits.heads_topk(d, self.k, logprobs=not self.static)
        s.set("topk", ids)
        if lp is not None:
            s.set("logp", lp)

    def begin(self, s, states):
        s.set("root", self.engine.logits.argmax0(states[:, 0]))
        self._drafts(s, states[:, 1:])

    def _candidates(self, s: Rows):
        """(tokens [B, T], (depth, dense, packed), paths, parents) of this step's tree."""
        if self.static:
            flat = s.topk.view(s.B, -1)
            drafts = flat if self.flat_is_all else flat.index_select(1, self.flat)
            return torch.cat([s.root[:, None], drafts], 1), self.tree, self.paths, self.parents
        parents, drafts = dynamic_tree(s.logp[0], s.topk[0], self.T - 1, self.level_sizes)
        buf = tree_buffers(parents, self.depth_max, check=False, backend=self.engine.ops_backend)
        T = parents.shape[0]
        dense = torch.zeros(T, T, dtype=torch.bool, device=parents.device)
        dense.scatter_(1, buf.retrieve.clamp(min=0), True)  # -1 padding points at the root, an ancestor anyway
        # Every node's root path is a candidate row: the deepest accepted row is a leaf's or
        # one of equal length with the same tokens, so the result equals the leaves' alone.
        return torch.cat([s.root, drafts])[None], (buf.depth, dense, buf.mask), buf.retrieve, parents

    def _verify(self, tokens, h0, paths, parents):
        """(accepted drafts [B], accepted paths [B, D + 1], last nodes [B], emitted tokens [B, D + 1])."""
        e = self.engine
        B, T = tokens.shape
        if e.acceptance == "greedy":
            target = e.logits.argmax0(h0.reshape(B * T, -1), self.normed).view(B, T)
            return verify_greedy_rows(tokens, target, paths, e.ops_backend)
        o = e.options  # p(node | parent) and the parent's entropy, both at the sampling temperature
        target, node_prob, parent_entropy = e.logits.typical(h0, tokens, parents, o.temperature, self.normed)
        res = verify_typical(tokens, target, node_prob, parent_entropy, paths, epsilon=o.typical_epsilon,
                             alpha=o.typical_alpha, backend=e.ops_backend)
        return res.accept_len, paths[res.best_path], res.last_node, res.tokens

    def body(self, s, prefix_host):
        e = self.engine
        tokens, tree, paths, parents = self._candidates(s)
        h0, carry = self._forward(s, tokens, prefix_host, tree)  # [B, T, D]
        if self.one_call:  # one row, greedy, eager logits: one call (accept_greedy)
            return self._accept_one(s, tokens, h0, carry, paths, prefix_host)
        accept_len, path, last_node, emitted = self._verify(tokens, h0, paths, parents)
        count = accept_len + 1
        if not self.chain:  # each row's accepted nodes' K/V to the slots after its prefix, one call
            e.compact(s, path, count)
        self._drafts(s, self.drafter(s, h0, carry, path, accept_len, last_node, prefix_host))
        return self._finish(s, count, emitted)

    def _accept_one(self, s: Rows, tokens, h0, carry, paths, prefix_host) -> torch.Tensor:
        """One row's greedy step after its forward pass, verified by ``accept_greedy``."""
        out, root, last_node, best_path = accept_greedy(h0[0], self.engine.logits.weight0(self.T), tokens[0], paths,
                                                        backend=self.engine.ops_backend)
        count = out[:1]
        # index_select, not paths[best]: indexing with a 0-d tensor calls .item(). A chain's
        # accepted path is its first nodes, already in place; only MTP's head blocks over the
        # accepted path (fused kernels) read it there, with the accepted length.
        on_path = self.drafter.on_path
        path = paths.index_select(0, best_path.view(1)) if not self.chain or on_path else None
        if not self.chain:
            assert path is not None  # made above for every tree but a chain
            self.engine.compact(s, path, count)
        accept_len = count - 1 if on_path else None
        self._drafts(s, self.drafter(s, h0, carry, path, accept_len, last_node, prefix_host))
        s.set("root", root)
        s.at += count[0]
        return out[None]


class _ChainSamplingStep(_Step):
    """Speculative sampling over each row's chain: root, drafts [n] (sampled from q [n, V])."""

    logits_norm = False  # it samples from the full logits

    def __init__(self, engine: StepEngine, tree: Tree):
        n = tree.max_depth
        self.T, self.heads, self.emit = n + 1, n + 1, n + 1
        super().__init__(engine)
        self.graphable = False  # it draws from host-held generators
        one = torch.ones(n + 1, n + 1, dtype=torch.bool, device=engine.device).tril()
        tt = tree.tensors(engine.device)
        self.tree = (tt.depth, one, tt.mask)
        self.path = torch.arange(n + 1, device=engine.device)

    def _drafts(self, s: Rows, d: torch.Tensor) -> None:  # the draft heads' states [B, n, D]
        q = self.engine.logits.heads_probs(d, self.engine.options)  # [B, n, V]
        for b in range(s.B):
            s.q[b], s.topk[b, :, 0] = q[b], sample_drafts(q[b], s.generators[b])

    def begin(self, s, states):
        s.set("root", self._sample(s, states[:, 0]))
        self._drafts(s, states[:, 1:])

    def body(self, s, prefix_host):
        tokens = torch.cat([s.root[:, None], s.topk[:, :, 0]], 1)
        h0, carry = self._forward(s, tokens, prefix_host, self.tree)
        p = self.engine.logits.probs(h0, 0, self.engine.options)  # [B, n + 1, V]
        drawn = [speculative_sample_device(p[b], s.q[b], s.topk[b, :, 0], s.generators[b]) for b in range(s.B)]
        accept_len = torch.stack([a.view(()) for a, _ in drawn])
        out = torch.stack([t for _, t in drawn])
        # The chain's nodes 0..a are accepted and already in place.
        path = self.path.expand(s.B, -1)
        self._drafts(s, self.drafter(s, h0, carry, path, accept_len, accept_len, prefix_host))
        return self._finish(s, accept_len + 1, out)


class _TreeSamplingStep(_Step):
    """Rejection sampling over a tree of sampled drafts (``verify_rejection``: SpecInfer's
    multi-step speculative sampling with drafts drawn without replacement, Jeon et al. 2024),
    which keeps the target's distribution whatever the tree.

    The drafts are sampled, not the heads' top-k: each node's children are drawn without
    replacement from its depth's head distribution at the last accepted position
    (``sample_tree_drafts``; temperature, top-k and top-p applied to the heads as to the
    target), so that the node's proposal distribution is known to the verification. The tree's
    shape is the given ``Tree``'s (its ranks are not used), or, for a dynamic tree (one row),
    the shape of EAGLE-2's best nodes by the heads' probabilities at the temperature in use: a
    function of those distributions alone, chosen before any draft is drawn, so the scheme
    stays exact. Every row draws its drafts and its verification's uniforms from its own
    stream, so a row decodes as it would alone."""

    logits_norm = False  # it samples from the full logits

    def __init__(self, engine: StepEngine, tree: Tree | None, n_nodes: int = 0):
        if tree is not None:
            n = tree.max_depth
            self.T = len(tree)
            tt = tree.tensors(engine.device)
            self.shape = (tt.parents, list(tree.parents), tt.depth.tolist(), (tt.depth, tt.dense_mask, tt.mask))
        else:  # dynamic: the shape per step (_dynamic_shape)
            n = engine.model.n_heads - 1
            k = min(n_nodes, MAX_K, engine.model.config.vocab_size)
            self.level_sizes = level_sizes(n_nodes, k, n)
            self.T, self.k_dynamic = 1 + min(n_nodes, sum(self.level_sizes)), k
        self.static = tree is not None
        self.heads, self.emit, self.max_depth = n + 1, n + 1, n
        super().__init__(engine)
        self.graphable = False  # it draws from host-held generators

    def _dynamic_shape(self, q: torch.Tensor) -> tuple:
        """(parents, their host list, depths' host list, (depth, dense, packed)) of the best
        nodes by path probability under one row's head distributions q [n, V]."""
        top = q.topk(self.k_dynamic, dim=-1)
        parents, _ = dynamic_tree(top.values.clamp_min(1e-30).log(), top.indices, self.T - 1, self.level_sizes)
        buf = tree_buffers(parents, self.max_depth, check=False, backend=self.engine.ops_backend)
        T = parents.shape[0]
        dense = torch.zeros(T, T, dtype=torch.bool, device=parents.device)
        dense.scatter_(1, buf.retrieve.clamp(min=0), True)
        return parents, parents.tolist(), buf.depth.tolist(), (buf.depth, dense, buf.mask)

    def _drafts(self, s: Rows, d: torch.Tensor) -> None:  # the draft heads' states [B, n, D]
        q = self.engine.logits.heads_probs(d[:, : self.max_depth], self.engine.options)  # [B, n, V]
        if not self.static:
            self.shape = self._dynamic_shape(q[0])
        _, parent_list, depth_list, _ = self.shape
        s.tree_q = q
        s.tree_drafts = torch.stack([sample_tree_drafts(q[b], parent_list, depth_list, s.generators[b])
                                     for b in range(s.B)])

    def begin(self, s, states):
        s.set("root", self._sample(s, states[:, 0]))
        self._drafts(s, states[:, 1:])

    def body(self, s, prefix_host):
        assert s.tree_drafts is not None and s.tree_q is not None  # begin() drew them
        B, T = s.B, self.T
        parents, _, _, tree = self.shape
        tokens = torch.cat([s.root[:, None], s.tree_drafts[:, 1:]], 1)
        h0, carry = self._forward(s, tokens, prefix_host, tree)
        p = self.engine.logits.probs(h0, 0, self.engine.options)  # [B, T, V]
        uniforms = torch.stack([torch.rand(T, generator=s.generators[b], device=tokens.device) for b in range(B)])
        draft_row = (tree[0] - 1).clamp(min=0)  # node t's proposal: head depth(t)'s distribution
        res = verify_rejection(tokens, p, s.tree_q, draft_row, parents, self.max_depth,
                               uniforms=uniforms, backend=self.engine.ops_backend)
        self.engine.compact(s, res.path, res.n_emitted)  # each row's accepted nodes after its prefix
        self._drafts(s, self.drafter(s, h0, carry, res.path, res.accept_len, res.last_node, prefix_host))
        return self._finish(s, res.n_emitted, res.tokens)


# ----------------------------------------------------------------------------- CUDA graphs


class _GraphedForward:
    """A step's forward pass alone, replayed from a CUDA graph captured, per batch size, on
    its first call (whose warm-up writes the very K/V the call itself writes)."""

    def __init__(self, forward: _Forward | _GraphedForward, device: torch.device):
        self.forward, self.device = forward, device
        self.graphs: dict[int, CapturedCall] = {}

    def reset(self) -> None:
        pass

    def __call__(self, tokens, prefix, prefix_host, cache, depth, dense, packed):
        B = tokens.shape[0]
        if B not in self.graphs:
            self.graphs[B] = CapturedCall(lambda t, p, d, m, k: self.forward(t, p, None, cache, d, m, k),
                                          (tokens, prefix, depth, dense, packed), self.device)
        return self.graphs[B](tokens, prefix, depth, dense, packed)


# ----------------------------------------------------------------------------- the engine


class StepEngine:
    """The core under :class:`mtpkern.Decoder` (``rows=1``) and :class:`mtpkern.BatchDecoder`
    (``rows`` = its largest batch): one model, its cache of ``rows`` rows, one step (a strategy
    over a given ``Tree``, or a dynamic tree with one row), the rows' states and CUDA graphs per
    batch size, the CPU's decode weights, and the decode loop. It runs and times steps
    (``run_step``, ``time_step``: the cost model's measurement) and knows nothing of planning:
    ``options.tree`` must not be ``"auto"``."""

    def __init__(self, model, options: DecodeOptions, rows: int = 1):
        self.options = opts = options
        opts.check_model(model)
        self._cached: tuple[list[int], list] | None = None  # the Decoder's prefix cache; None once slots change
        self.model, self.strategy, self.acceptance = model, opts.strategy, opts.acceptance
        self.kernels, self.cuda_graph = opts.kernels, opts.cuda_graph
        self.temperature = opts.temperature
        self.tree, dynamic_nodes = opts.static_tree(model)
        self.dynamic = dynamic_nodes > 0
        self.rows, self.single = rows, rows == 1
        self.device = model.device
        self.fused = opts.fused_on(self.device, model)
        self.ops_backend = opts.ops_backend
        self.sampling = opts.sampling
        self.logits = Logits(model, self.fused)
        self.cache = model.new_cache(rows, model.config.n_positions)
        # Eager attention runs the blocks as functions of their tensors (``Attn.weights``),
        # rebuilt when a parameter's storage (copies: or its version) changes.
        self.decode_weights: list | None = None
        self._weights_key: list | None = None
        self.step = self._make_step(dynamic_nodes)
        self._states: dict[int, Rows] = {}  # per batch size, kept (a graph replays on them)
        self._graphs: dict[int, CapturedCall] = {}  # whole steps, per batch size
        self._graph_weights: list[int] | None = None
        self._refresh_weights(self._weight_stamp())

    def _make_step(self, dynamic_nodes: int) -> _Step:
        if self.strategy == "ntp":
            return _NTPStep(self)
        if self.acceptance == "rejection":
            if self.tree is not None and self.tree.is_chain:
                return _ChainSamplingStep(self, self.tree)
            return _TreeSamplingStep(self, self.tree, dynamic_nodes)
        return _TreeStep(self, self.tree, dynamic_nodes)

    @property
    def tree_nodes(self) -> int:
        """Tokens one step verifies (the root included)."""
        return self.step.T

    def __repr__(self) -> str:
        tree = f"dynamic:{self.step.T - 1}" if self.dynamic else self.tree
        return (f"{type(self).__name__}({type(self.model).__name__}, strategy={self.strategy!r}, tree={tree}, "
                f"kernels={self.kernels!r}, cuda_graph={self.cuda_graph})")

    def state(self, B: int) -> Rows:
        """The state of batches of B rows (kept: a CUDA graph captured on it replays on it)."""
        if B not in self._states:
            self._states[B] = Rows(self, B)
        return self._states[B]

    def _weight_stamp(self) -> list:
        # Inference tensors keep no version counter: their storage alone identifies them.
        return [(p.data_ptr(), None if p.is_inference() else p._version) for p in self.model.parameters()]

    def _refresh_weights(self, stamp: list) -> None:
        self.step.drafter.refresh()
        if self.fused:
            return
        # On a CPU a Matmul may keep a copy (cpu_matmul), stale after an in-place update; elsewhere
        # it reads the parameter itself.
        key = stamp if self.device.type == "cpu" else [ptr for ptr, _ in stamp]
        if key != self._weights_key:
            with torch.no_grad():
                self.decode_weights = self.model.decode_weights()
                # On a CPU the unembedding too (its logits over T rows), in float32 (what the
                # logits are in; a half-precision model's is converted once, not at every step).
                cpu = self.device.type == "cpu" and self.logits.shared
                self.logits.unembed = Matmul(self.model.unembed_weight.detach().float()) if cpu else None
            self._weights_key = key
            self._graph_weights = None  # a captured graph read the old ones (and their copies): capture again

    def compact(self, s: Rows, path: torch.Tensor, count: torch.Tensor) -> None:
        """``kv_compact_``: each row's accepted path [B, R] (its first count[b] nodes) to the
        slots after its prefix, in one call (one row: scalars; many: over the whole cache, its
        rows past this batch and finished rows moving nothing)."""
        cache = self.cache
        if self.single:
            kv_compact_(cache.k, cache.v, path[0], s.at, count.view(()), backend=self.ops_backend)
            return
        B, prefix, count = s.B, s.prefix, torch.where(s.active, count, 0)
        if B < self.rows:
            path = torch.cat([path, path.new_full((self.rows - B, path.shape[1]), -1)])
            prefix = torch.cat([prefix, prefix.new_zeros(self.rows - B)])
            count = torch.cat([count, count.new_zeros(self.rows - B)])
        kv_compact_(cache.k, cache.v, path.contiguous(), prefix, count, backend=self.ops_backend)

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
        self._graphs, self._graph_weights = {}, None
        for s in self._states.values():
            s.in_place = False
        self.step.forward = self.step.new_forward()

    def _graph_weights_now(self) -> list[int]:
        """Where the tensors a capture reads live: the model's, and on a CPU the engine's
        float32 unembedding. ``_refresh_weights`` drops the stamp when it rebuilds the engine's
        weights (on a CPU, their ``Matmul`` copies go with them)."""
        unembed = self.logits.unembed
        return weights_stamp(self.model, unembed.w if unembed is not None else None)

    def _prepare_graphs(self, B: int) -> Rows:
        """The state of B rows, with the graph of its whole step captured (or the forward
        pass's graphs set to capture on their first call), before the prefill: on a state
        that is harmless to run (prefix 0, zero tokens, every row finished), whose warm-up
        writes slots the prefill writes again and moves nothing."""
        weights = self._graph_weights_now()
        if weights != self._graph_weights:
            self.reset_graphs()
            self._graph_weights = weights
        s = self.state(B)
        if s.in_place:
            return s
        self._cached = None  # the warm-up runs below write cache slots from 0
        step = self.step
        step.start(s, [0] * B)
        s.active.fill_(False)
        s.in_place = True
        if self.whole_step_graph:
            self._graphs[B] = CapturedCall(lambda: step.body(s, None), (), self.device)
        elif not isinstance(step.forward, _GraphedForward):
            step.forward = _GraphedForward(step.forward, self.device)
        return s

    # -- decoding ----------------------------------------------------------------------

    def _run_step(self, s: Rows, prefix_host: int) -> torch.Tensor:
        if self.cuda_graph and self.whole_step_graph:
            graph = self._graphs.get(s.B)
            if graph is None:
                raise RuntimeError("the step's CUDA graph was never captured: generate() and run_step() capture it")
            return graph()
        return self.step.body(s, None if self.cuda_graph else prefix_host)

    def begin_rows(self, B: int) -> Rows:
        """The state a generation of B rows runs on, after refreshing what the step reads
        (before any graph capture: a capture reads the weights it finds)."""
        self._refresh_weights(self._weight_stamp())
        return self._prepare_graphs(B) if self.cuda_graph else self.state(B)

    def decode(self, s: Rows, rows: list[RowOutput], prefixes: list[int]) -> tuple[list[float], list[int]]:
        """The decode loop: steps until every row is done (its EOS or its budget), one host
        sync per step. ``prefixes``: each row's cached tokens after its prefill. Returns the
        step times and each row's final prefix length."""
        prefixes, T, max_len = list(prefixes), self.step.T, self.cache.max_len
        step_times: list[float] = []
        while not all(r.done for r in rows):
            ts = time.perf_counter()
            for r, p in zip(rows, prefixes):
                if not r.done:
                    check_room(max_len, p, T)
            host = self._run_step(s, max(prefixes)).tolist()  # the step's one host sync
            finished = False
            for b, (r, h) in enumerate(zip(rows, host)):
                if not r.done:
                    prefixes[b] += h[0]  # the root and the accepted drafts are now in the cache
                    finished |= r.step(h)
            if finished and not self.single:  # finished rows stay where they ended from the next step on
                s.active.copy_(torch.tensor([not r.done for r in rows]))
            step_times.append(time.perf_counter() - ts)
        return step_times, prefixes

    # -- cost model --------------------------------------------------------------------

    @torch.inference_mode()
    def run_step(self, prefix_len: int) -> list[int]:
        """One decoding step of row 0 over ``prefix_len`` cached tokens, as the decode loop runs
        it (host sync included), for timing: the cache contents are garbage, the root and drafts
        are those of the previous call (zero hidden states the first time). Returns its output."""
        step = self.step
        if prefix_len + step.T > self.cache.max_len:
            raise ValueError(f"prefix_len {prefix_len} + {step.T} tree nodes exceeds the cache of "
                             f"{self.cache.max_len} slots")
        self._cached = None  # the step writes garbage into the cache
        first = not getattr(self, "_timing_state", False)  # the first timed step: not on every one
        s = self.begin_rows(1) if first else self._prepare_graphs(1) if self.cuda_graph else self.state(1)
        if first:
            step.start(s, [prefix_len])
            step.begin(s, torch.zeros(1, step.heads, self.model.config.n_embd, dtype=self.model.dtype,
                                      device=self.device))
            self._timing_state = True
        step.start(s, [prefix_len])
        return self._run_step(s, prefix_len).tolist()[0]

    @torch.inference_mode()
    def time_step(self, *, prefix_len: int = 64, iters: int = 10, warmup: int = 2) -> float:
        """Median seconds of ``run_step(prefix_len)``: one decoding step of this engine (its
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
        """The parts of one tree step of row 0 over ``prefix_len`` cached tokens, each a call of
        no arguments on the step's own shapes, from a running decode's state (zero hidden
        states, random tokens), for profiling (``mtpkern.bench.step_breakdown``):

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
        s = self.state(1)
        tokens = torch.randint(0, self.model.config.vocab_size, (1, T), device=device)
        step.start(s, [prefix_len])
        step.begin(s, torch.zeros(1, step.heads, self.model.config.n_embd, dtype=self.model.dtype, device=device))
        tree_bufs = step._candidates(s)[1]
        verify = step.forward

        def forward():
            return verify(tokens, step._prefix(s), prefix_len, s.cache, *tree_bufs)

        h0, carry = forward()  # also puts the mask in a running decode's state

        def run():
            s.at.fill_(prefix_len)
            return self._run_step(s, prefix_len).tolist()[0]

        def rest():
            step.forward = _Outputs(h0, carry)  # type: ignore[assignment]  # the same call and reset
            try:
                return run()
            finally:
                step.forward = verify

        path = torch.arange(step.heads, device=device).clamp(max=T - 1)[None]
        last = torch.full((1,), min(step.heads, T) - 1, device=device)

        def draft_heads():
            return step.drafter(s, h0, carry, path, last, last, prefix_len)

        separate = step.heads > 1 and not step.drafter.parallel
        return dict(step=run, forward=forward, logits=lambda: self.logits.argmax0(h0[0], step.normed),
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


__all__ = ["Rows", "StepEngine", "parallel_heads"]
