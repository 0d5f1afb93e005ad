"""Batched greedy decoding: many prompts at once, each row token-identical to decoding it alone.

``BatchDecoder(model, strategy, tree=..., max_batch=...)`` owns one static KV cache with a row
per prompt. Rows accept different numbers of tokens per step, so their cache positions drift
apart: every row keeps its own prefix length, and a step writes each row's tree tokens at that
row's own slots and positions, with a per-row attention mask (its prefix, then the tree's
ancestor mask). No padding token ever enters a row's cache as context: prompts of different
lengths are prefilled at once, right-padded, each from slot 0, a pad token seeing only its row's
tokens and its slots rewritten before any step reads them.

One step runs the model's forward pass once for all rows (the pass that costs: every weight is
read once per step, whatever B is), then verification (the ops' greedy rule), KV compaction
and the next drafts for all rows at once, and syncs with the host once. Verification accepts
exactly what batch-1 decoding accepts from the same drafts, so a row's tokens are the ones
greedy ``ntp`` gives for that prompt alone (the drafts themselves may round differently
from batch 1's, which can change how many are accepted, never the output). A row that reaches its EOS or
``max_new_tokens`` stops: its prefix stays where it is, and the remaining steps recompute its
last slots (a finished row costs what a masked row would) and discard them.

Sampling takes one random stream per row (``generator``: one per row, or one that seeds them):
``ntp`` sampling and rejection sampling (chains) draw row b's tokens from its stream exactly as batch-1 decoding draws
them from its generator, and typical acceptance (MEDUSA's rule, deterministic) runs the ops'
rule per row. The forward pass runs the fused decoder-layer kernels (``kernels="fused"``, the
default on CUDA: ``ln_qkv`` writes each row's K and V at its own slots, ``tree_attention`` reads
each row's prefix length) or eager attention with a per-row mask. Static trees (hand trees,
the default, ``auto``) for ``ntp``, ``mtp`` and ``medusa``; dynamic trees decode batch 1
(``mtpkern.Decoder``).

CUDA graphs (``cuda_graph=True``, fused kernels on CUDA): a batch's state (roots, drafts,
prefix lengths, which rows still decode) lives in device tensors that a step updates in place,
and a greedy or typical step (forward, logits, verification, KV compaction, next drafts) never
syncs, so the whole step is captured once per batch size B and replayed; sampling steps replay
their forward pass alone (each row draws from its own generator on the host side of the step).
"""

from __future__ import annotations

import time

import torch

from mtpkern.autotree import resolve_options
from mtpkern.core import (
    Logits, eager_tree_mask, head_probs, prefill, sample_drafts, typical_stats, verify_greedy_rows, weights_stamp,
)
from mtpkern.graphs import CapturedCall
from mtpkern.inputs import (
    GenerationResult, RowOutput, batch_prompts, check_context, check_max_new_tokens, eos_id, row_generators,
)
from mtpkern.layers import Attn, KVCache
from mtpkern.ops.kv_compact import kv_compact_
from mtpkern.ops.verify import verify_typical
from mtpkern.options import DecodeOptions, engine_options
from mtpkern.sampling import speculative_sample_device
from mtpkern.runtime import now
from mtpkern.tree import Tree

__all__ = ["BatchDecoder"]


class BatchDecoder:
    """Batched decoding of ``model`` for up to ``max_batch`` prompts per call, with the options of
    a :class:`mtpkern.DecodeOptions` (given whole, or as keywords: ``BatchDecoder(model, "medusa",
    tree=...)``) and a static tree (a ``Tree``, choices, a spec; ``"auto"``, or None on a model
    that carries calibration, is the calibrated tree for the fused kernels or eager attention
    this engine runs, planned once here by ``mtpkern.autotree``). No prefix cache: its rows would each need their own reusable prefix,
    and the rows of one call share nothing but the weights."""

    def __init__(self, model, strategy: str | DecodeOptions | None = None, *, options: DecodeOptions | None = None,
                 max_batch: int = 16, **keywords):
        opts = engine_options(strategy, options, keywords, "BatchDecoder")
        opts.check_model(model)
        # tree="auto" (or None on a calibrated model): planned for the kernels and graphs this runs
        self.options = opts = resolve_options(model, opts, batch=True)
        # the forward pass: the fused decoder-layer kernels with per-row slots and prefix
        # lengths (CUDA by default; Triton's interpreter on CPU), or eager attention with a
        # per-row mask
        self.kernels = opts.kernels
        self.fused = opts.fused_on(model.device)
        if opts.cuda_graph and not self.fused:
            raise ValueError("a batch replays CUDA graphs of the fused kernels (kernels='auto' or 'fused'); "
                             "kernels='eager' builds each step's attention mask on the host")
        self.cuda_graph = opts.cuda_graph
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        tree, dynamic = opts.static_tree(model)
        if dynamic:
            raise ValueError("batched decoding takes static trees (a hand tree, the default or 'auto'); "
                             "tree='dynamic' decodes one prompt at a time (mtpkern.Decoder)")
        self.model, self.strategy, self.tree, self.max_batch = model, opts.strategy, tree, max_batch
        self.acceptance, self.temperature = opts.acceptance, opts.temperature
        # ntp sampling and rejection sampling draw from each row's own generator; typical
        # acceptance draws nothing (top-k drafts, the argmax as the next root)
        self.sampling = opts.sampling
        dev = self.device = model.device
        cfg = model.config
        if tree is None:
            self.T, self.heads, self.k, self.chain = 1, 1, 1, True
            self.depth = torch.zeros(1, dtype=torch.long, device=dev)
            self.dense = torch.ones(1, 1, dtype=torch.bool, device=dev)
            self.packed = torch.ones(1, 1, dtype=torch.int32, device=dev)
        else:
            tt = tree.tensors(dev)
            self.T, self.heads, self.k, self.chain = len(tree), 1 + tree.max_depth, tree.topk, tree.is_chain
            self.depth, self.dense, self.paths, self.parents = tt.depth, tt.dense_mask, tt.paths, tt.parents
            self.packed = tt.mask
            self.flat = tt.head_row * self.k + tt.rank  # node i + 1's entry of a row's flattened top-k
        if model.draft_on_path and self.heads > 1:  # MTP's head blocks run over each row's accepted path
            self.path_mask = Tree.chain(self.heads - 1).tensors(dev).mask
        self.logits = Logits(model, fused=self.fused)  # head-0 argmax and draft top-k: fused_logits with fused kernels
        # verification: the extension's kernels wherever built (on CPU tensors too: a call for the
        # whole batch), else the eager rule
        self.ops_backend = opts.ops_backend
        self.logits_backend = None if self.fused else "eager"
        self.cache = KVCache(model.n_cache_layers, max_batch, cfg.n_head, cfg.n_positions, cfg.head_dim,
                             dtype=model.dtype, device=dev)
        self.offsets = torch.arange(self.T, device=dev)
        self._graphs: dict[int, tuple[_Rows, CapturedCall]] = {}  # whole steps, per batch size
        self._forward_graphs: dict[int, CapturedCall] = {}  # sampling steps' forward passes
        self._graph_weights: list[int] | None = None
        self._weights: list | None = None  # the blocks' decode weights (``Attn.weights``), per generation

    def __repr__(self) -> str:
        return (f"BatchDecoder({type(self.model).__name__}, strategy={self.strategy!r}, tree={self.tree!r}, "
                f"max_batch={self.max_batch}, kernels={self.kernels!r}, cuda_graph={self.cuda_graph})")

    # -- inputs ------------------------------------------------------------------------

    def _prompts(self, prompts, attention_mask, max_new_tokens: int) -> list[torch.Tensor]:
        ids = batch_prompts(prompts, attention_mask, self.model.config.vocab_size, self.device, self.max_batch)
        for b, p in enumerate(ids):
            check_context(p.shape[0], max_new_tokens, self.T, self.model.config.n_positions, f"prompt {b}")
        return ids

    # -- the parts of a step -----------------------------------------------------------

    def _mask(self, prefix: torch.Tensor) -> torch.Tensor:
        """bool [B, 1, T, S']: row b sees its slots below prefix[b] and, at prefix[b] + j, tree
        node j where the tree's ancestor mask says so."""
        return eager_tree_mask(self.dense, prefix, int(prefix.max()) + self.T)[:, None]

    def _drafts(self, h0, carry, path, accept_len, last_node, prefix, view) -> torch.Tensor:
        """Every row's next draft tokens [B, heads - 1, k] (the heads' top-k, as batch 1's)."""
        d = self._draft_hidden(h0, carry, path, accept_len, last_node, prefix, view)
        return self.logits.heads_topk(d, self.k)[1]

    def _draft_hidden(self, h0, carry, path, accept_len, last_node, prefix, view) -> torch.Tensor:
        """Every row's draft heads' states [B, heads - 1, D] at its last accepted node, from this
        step's head-0 states h0 and carry [B, T, D], the accepted paths [B, D + 1] (padded with
        -1), accepted lengths and last nodes [B] and the prefixes [B] the step started from."""
        model, n, B = self.model, self.heads - 1, h0.shape[0]
        rows = torch.arange(B, device=self.device)
        h = h0[rows, last_node]  # [B, D], final-normed
        if model.draft_on_path:  # MTP: the head blocks over each row's accepted path, in its own caches
            R = self.heads
            x = carry[rows[:, None], path.clamp(min=0)]  # [B, R, D]
            slots = prefix[:, None] + torch.arange(R, device=self.device)[None, :]
            if self.fused:  # the path is a chain after each row's prefix: tree attention, no mask, no sync
                attn = Attn(view, slots, tree_mask=self.path_mask, prefix_len=prefix)
                return torch.stack([model.head_forward(j, x, attn)[rows, accept_len] for j in range(1, n + 1)], 1)
            span = int(prefix.max()) + R
            rel = torch.arange(span, device=self.device)[None, None, :] - slots[:, :, None]  # [B, R, S']
            mask = (rel <= 0)[:, None]  # the prefix, and the path causally
            if B == 1:  # batch 1's own path: the n head blocks grouped into one (a CPU pays per op)
                attn = Attn(KVCache.from_tensors(self.cache.k[:, :1], self.cache.v[:, :1]), slots[0], mask=mask[0, 0])
                d = model.draft_hidden(x, n, attn, accept_len)[None]
            else:
                attn = Attn(view, slots, mask=mask, weights=self._weights)
                d = torch.stack([model.head_forward(j, x, attn)[rows, accept_len] for j in range(1, n + 1)], 1)
        else:
            d = model.heads_at(h, n).transpose(0, 1)  # [B, n, D]
        return d

    def _probs(self, h, j):
        o = self.options
        return head_probs(self.model, h, j, o.temperature, o.top_k, o.top_p)

    def _sample_drafts(self, d: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """Rejection sampling's drafts from one row's draft states d [n, D], as batch 1 draws
        them: (q [n, V], one token per head [n])."""
        return sample_drafts(self.model, d, self.options, gen)

    def _prefill(self, ids: list[torch.Tensor]) -> torch.Tensor:
        """Every prompt through the model at once, each at slots and positions 0 .. P_b - 1 of
        its row (right-padded to the longest: a pad query sees only its row's tokens, and the
        slots it writes past P_b are written again by the row's first steps before any step
        reads them). Returns each row's last-position states [B, heads, D] (head 0, then the
        draft heads), as batch 1's ``prefill`` does; a single prompt takes batch 1's own path."""
        model, dev, B = self.model, self.device, len(ids)
        if B == 1:
            return prefill(model, KVCache.from_tensors(self.cache.k[:, :1], self.cache.v[:, :1]), ids[0], heads=self.heads, weights=self._weights)[None]
        lengths = torch.tensor([int(t.shape[0]) for t in ids], device=dev)
        P = int(lengths.max())
        tokens = torch.zeros(B, P, dtype=torch.long, device=dev)
        for b, t in enumerate(ids):
            tokens[b, : t.shape[0]] = t
        pos = torch.arange(P, device=dev)
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        mask = (causal[None] & (pos[None, None, :] < lengths[:, None, None]))[:, None]  # [B, 1, P, P]
        view = KVCache.from_tensors(self.cache.k[:, :B], self.cache.v[:, :B])
        attn = Attn(view, pos[None].expand(B, P), mask=mask, weights=self._weights)
        h0, carry = model.decode_hidden(tokens, pos[None].expand(B, P), attn)
        rows, last = torch.arange(B, device=dev), lengths - 1
        h = h0[rows, last]  # [B, D]
        if self.heads == 1:
            return h[:, None]
        n = self.heads - 1
        if model.draft_on_path:  # MTP: the head blocks fill their caches over every prompt
            d = torch.stack([model.head_forward(j, carry, attn)[rows, last] for j in range(1, n + 1)], 1)
        else:
            d = model.heads_at(h, n).transpose(0, 1)
        return torch.cat([h[:, None], d], 1)

    def _compact(self, path: torch.Tensor, prefix: torch.Tensor, count: torch.Tensor) -> None:
        """``kv_compact_`` with a path, prefix length and count per row, over the whole cache
        (its rows past this batch move nothing)."""
        B, rows = path.shape[0], self.max_batch
        if B < rows:
            path = torch.cat([path, path.new_full((rows - B, path.shape[1]), -1)])
            prefix = torch.cat([prefix, prefix.new_zeros(rows - B)])
            count = torch.cat([count, count.new_zeros(rows - B)])
        kv_compact_(self.cache.k, self.cache.v, path.contiguous(), prefix, count, backend=self.ops_backend)

    def _verify_typical(self, tokens, target, h0):
        """Typical acceptance of every row in one ``verify_typical`` call: p(node | parent) and
        the parent's entropy at the sampling temperature, as batch 1 computes them."""
        o = self.options
        node_prob, parent_entropy = typical_stats(h0[:, self.parents[1:]], tokens[:, 1:], self.model.head_weight(0),
                                                  o.temperature, self.logits_backend)
        res = verify_typical(tokens, target, node_prob, parent_entropy, self.paths, epsilon=o.typical_epsilon,
                             alpha=o.typical_alpha, backend=self.ops_backend)
        return res.accept_len, self.paths[res.best_path], res.last_node, res.tokens

    def _verify(self, tokens, target):
        """Greedy verification of every row at once (``verify_greedy_rows``)."""
        return verify_greedy_rows(tokens, target, self.paths, self.ops_backend)

    # -- one step for every row, on the device state ----------------------------------

    def _tokens(self, s: _Rows) -> torch.Tensor:
        """Every row's tree tokens [B, T]: its root, then its drafts in tree order."""
        if self.T == 1:
            return s.root[:, None]
        return torch.cat([s.root[:, None], s.topk.view(s.B, -1).index_select(1, self.flat)], 1)

    def _forward_at(self, tokens: torch.Tensor, prefix: torch.Tensor, cache: KVCache):
        """The model over every row's T tokens at slots prefix[b] + i and positions prefix[b] +
        depth[i]: (head 0's states, the draft heads' carry), [B, T, D] each."""
        slots = prefix[:, None] + self.offsets[None, :]
        if self.fused:  # per-row slots and prefix lengths straight into the kernels: no mask, no sync
            attn = Attn(cache, slots, tree_mask=self.packed, prefix_len=prefix)
        else:
            attn = Attn(cache, slots, mask=self._mask(prefix), weights=self._weights)
        return self.model.decode_hidden(tokens, prefix[:, None] + self.depth[None, :], attn)

    def _advance(self, s: _Rows, count: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The next roots and prefixes (a finished row stays where it ended), in place; returns
        the step's output [B, 1 + emit]: each row's count, then its tokens."""
        s.root.copy_(out.gather(1, (count - 1)[:, None])[:, 0])
        s.prefix.add_(torch.where(s.active, count, 0))
        return torch.cat([count[:, None], out], 1)

    def _step(self, s: _Rows) -> torch.Tensor:
        """One greedy or typical step of every row: forward, head-0 argmax, verification, KV
        compaction, next drafts. No host sync with fused kernels (a CUDA graph captures it)."""
        B, T = s.B, self.T
        tokens = self._tokens(s)
        h0, carry = self._forward_at(tokens, s.prefix, s.cache)
        target = self.logits.argmax0(h0.reshape(B * T, -1)).view(B, T)
        if T == 1:
            return self._advance(s, torch.ones_like(s.root), target)
        if self.acceptance == "typical":
            accept_len, path, last, out = self._verify_typical(tokens, target, h0)
        else:
            accept_len, path, last, out = self._verify(tokens, target)
        count = accept_len + 1
        if not self.chain:  # each row's accepted nodes' K/V to the slots after its prefix, one call
            self._compact(path, s.prefix, torch.where(s.active, count, 0))
        s.topk.copy_(self._drafts(h0, carry, path, accept_len, last, s.prefix, s.cache))
        return self._advance(s, count, out)

    def _sampling_step(self, s: _Rows, gens: list, q: list) -> torch.Tensor:
        """One sampling step: ``ntp`` sampling, or rejection sampling along each row's chain,
        every row from its own stream (its forward pass replayed from a CUDA graph if asked)."""
        B, T = s.B, self.T
        tokens = self._tokens(s)
        if self.cuda_graph:
            graph = self._forward_graphs.get(B)
            if graph is None:
                cache = s.cache
                graph = self._forward_graphs[B] = CapturedCall(lambda t, p: self._forward_at(t, p, cache),
                                                             (tokens, s.prefix), self.device)
            h0, carry = graph(tokens, s.prefix)
        else:
            h0, carry = self._forward_at(tokens, s.prefix, s.cache)
        if T == 1:
            out = torch.stack([torch.multinomial(self._probs(h0[b, :1], 0), 1, generator=gens[b])[0] for b in range(B)])
            return self._advance(s, torch.ones_like(s.root), out)
        drawn = [speculative_sample_device(self._probs(h0[b], 0), q[b], s.topk[b, :, 0], gens[b]) for b in range(B)]
        accept_len = torch.stack([a.view(()) for a, _ in drawn])
        out = torch.stack([o for _, o in drawn])
        path = self.offsets[None, :].expand(B, T)
        d = self._draft_hidden(h0, carry, path, accept_len, accept_len, s.prefix, s.cache)
        for b in range(B):
            q[b], s.topk[b, :, 0] = self._sample_drafts(d[b], gens[b])
        return self._advance(s, accept_len + 1, out)

    # -- CUDA graphs -------------------------------------------------------------------

    def reset_graphs(self) -> None:
        """Drop the captured graphs (they read the weights at the addresses they were captured
        with: after ``model.to()`` or ``load_state_dict(assign=True)``, capture again)."""
        self._graphs, self._forward_graphs, self._graph_weights = {}, {}, None

    def _check_weights(self) -> None:
        weights = weights_stamp(self.model)
        if weights != self._graph_weights:
            self.reset_graphs()
            self._graph_weights = weights

    def _graphed_rows(self, B: int) -> tuple[_Rows, CapturedCall]:
        """The state of batches of B rows and the graph of their whole step, captured on the
        first batch of that size, before its prefill: with every row inactive at prefix 0, the
        capture's warm-up steps write slots the prefill and the first step write again, and
        move nothing."""
        if B not in self._graphs:
            s = _Rows(self, B)
            self._graphs[B] = (s, CapturedCall(lambda: self._step(s), (), self.device))
        return self._graphs[B]

    # -- decoding ----------------------------------------------------------------------

    def _generators(self, generator, B: int) -> list:
        """One random stream per row (``row_generators``); none where nothing is sampled."""
        return row_generators(generator, B, self.device) if self.sampling else [None] * B

    @torch.inference_mode()
    def generate(self, input_ids, *, max_new_tokens: int, eos_token_id: int | None = None,
                 attention_mask=None, generator=None) -> list[GenerationResult]:
        """Decode up to ``max_new_tokens`` tokens after each prompt of ``input_ids``: a list of
        token sequences (lists or 1-D tensors, any lengths) or a [B, T] tensor (with
        ``attention_mask`` [B, T], 1 on tokens, 0 on padding at either end). One
        :class:`GenerationResult` per prompt, in order; each row ends at its own first
        ``eos_token_id`` (included). Sampling draws each row from a stream of its own:
        ``generator`` is a list of them (row b draws from ``generator[b]`` as batch 1 would), or
        one ``torch.Generator`` that seeds them (default: torch's global generator)."""
        check_max_new_tokens(max_new_tokens)
        eos = eos_id(eos_token_id, self.model.config.vocab_size)
        ids = self._prompts(input_ids, attention_mask, max_new_tokens)
        B, dev = len(ids), self.device
        # Eager attention runs the blocks as functions of their tensors (views of the parameters).
        self._weights = None if self.fused else self.model.decode_weights()
        gens = self._generators(generator, B)
        graph = None
        if self.cuda_graph:
            self._check_weights()
            if not self.sampling:
                s, graph = self._graphed_rows(B)
        if graph is None:
            s = _Rows(self, B)
        rows = [RowOutput(max_new_tokens, eos, f"prompt {b}: ") for b in range(B)]
        t0 = now(dev)
        q = self._begin(s, ids, gens)
        first = s.root.tolist()
        for b in range(B):
            rows[b].emit(first[b : b + 1])
        prefill_time = time.perf_counter() - t0
        step_times: list[float] = []
        while not all(r.done for r in rows):
            ts = time.perf_counter()
            if graph is not None:
                out = graph()
            elif self.sampling:
                out = self._sampling_step(s, gens, q)
            else:
                out = self._step(s)
            host = out.tolist()  # the step's one host sync
            finished = False
            for r, h in zip(rows, host):
                if not r.done:
                    finished |= r.step(h)
            if finished:  # finished rows stay where they ended from the next step on
                s.active.copy_(torch.tensor([not r.done for r in rows]))
            step_times.append(time.perf_counter() - ts)
        total = time.perf_counter() - t0
        return [GenerationResult(r.tokens, len(r.accepted), r.accepted, step_times[: len(r.accepted)], prefill_time,
                                 total) for r in rows]

    def _begin(self, s: _Rows, ids: list[torch.Tensor], gens: list) -> list:
        """Prefill every row at once (prompts of any lengths, each from slot 0), then each row's
        first token and drafts, as batch-1 decoding makes them. Returns rejection sampling's
        draft distributions per row (None elsewhere)."""
        B = len(ids)
        q: list[torch.Tensor | None] = [None] * B  # rejection sampling: each row's draft distributions [n, V]
        first_states = self._prefill(ids)  # [B, heads, D]
        for b in range(B):
            h = first_states[b]
            if self.sampling:
                s.root[b] = torch.multinomial(self._probs(h[:1], 0), 1, generator=gens[b])[0, 0]
            else:
                s.root[b] = self.logits.argmax0(h[:1])[0]
            if self.acceptance == "rejection":
                q[b], s.topk[b, :, 0] = self._sample_drafts(h[1:], gens[b])
            elif self.heads > 1:
                s.topk[b] = self.logits.draft_topk(h[1:], self.k)[1]
        s.prefix.copy_(torch.tensor([int(p.shape[0]) for p in ids]))
        s.active.fill_(True)
        return q


class _Rows:
    """One batch's decoding state on the device, which every step updates in place (so that a
    CUDA graph replays the step on these very tensors): the roots (each row's next token,
    chosen but not yet cached) [B], the drafts [B, n, k], the prefix lengths [B], whether each
    row still decodes [B], and the rows of the cache the batch uses."""

    def __init__(self, dec: BatchDecoder, B: int):
        dev = dec.device
        self.B = B
        self.root = torch.zeros(B, dtype=torch.long, device=dev)
        self.topk = torch.zeros(B, max(dec.heads - 1, 1), dec.k, dtype=torch.long, device=dev)
        self.prefix = torch.zeros(B, dtype=torch.long, device=dev)
        self.active = torch.zeros(B, dtype=torch.bool, device=dev)
        self.cache = KVCache.from_tensors(dec.cache.k[:, :B], dec.cache.v[:, :B])
