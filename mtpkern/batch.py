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
``ntp`` sampling and rejection sampling (chains and trees) draw row b's tokens from its stream exactly as batch-1 decoding draws
them from its generator, and typical acceptance (MEDUSA's rule, deterministic) runs the ops'
rule per row. The forward pass runs the fused decoder-layer kernels (``kernels="fused"``, the
default on CUDA: ``ln_qkv`` writes each row's K and V at its own slots, ``tree_attention`` reads
each row's prefix length) or eager attention with a per-row mask. Static trees (hand trees,
the default, ``auto``) for ``ntp``, ``mtp`` and ``medusa``; dynamic trees decode batch 1
(``mtpkern.Decoder``).

CUDA graphs (``cuda_graph=True``, on CUDA; fused kernels, or eager attention with its per-row
mask built on the device): a batch's state (roots, drafts,
prefix lengths, which rows still decode) lives in device tensors that a step updates in place,
and a greedy or typical step (forward, logits, verification, KV compaction, next drafts) never
syncs, so the whole step is captured once per batch size B and replayed; sampling steps replay
their forward pass alone (each row draws from its own generator on the host side of the step).

The steps, their state (``mtpkern.steps.Rows``), the graphs and the decode loop are the core's
(``mtpkern.steps.StepEngine``), the same as ``mtpkern.Decoder``'s: this engine prefills many
prompts at once and gives each its own random stream. With ``max_batch=1`` it runs the core's
one-row path (the CPU's fast path).
"""

from __future__ import annotations

import time

import torch

from mtpkern.autotree import resolve_options
from mtpkern.core import prefill_rows
from mtpkern.inputs import (
    GenerationResult, RowOutput, batch_prompts, check_context, check_max_new_tokens, eos_id, row_generators,
)
from mtpkern.options import DecodeOptions, engine_options
from mtpkern.runtime import now
from mtpkern.steps import StepEngine

__all__ = ["BatchDecoder"]


class BatchDecoder(StepEngine):
    """Batched decoding of ``model`` for up to ``max_batch`` prompts per call, with the options of
    a :class:`mtpkern.DecodeOptions` (given whole, or as keywords: ``BatchDecoder(model, "medusa",
    tree=...)``) and a static tree (a ``Tree``, choices, a spec; ``"auto"``, or None on a model
    that carries calibration, is the calibrated tree for the fused kernels or eager attention
    this engine runs, planned once here by ``mtpkern.autotree``).

    No prefix cache: it pays where one conversation comes back with a longer prompt, and a
    batch's rows would each need their own reusable prefix in their own cache row, matched per
    call against rows that may hold another prompt by then; the rows of one call share
    nothing but the weights. Decode one conversation at a time with ``mtpkern.Decoder`` for it."""

    def __init__(self, model, strategy: str | DecodeOptions | None = None, *, options: DecodeOptions | None = None,
                 max_batch: int = 16, **keywords):
        opts = engine_options(strategy, options, keywords, "BatchDecoder")
        opts.check_model(model)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if opts.static_tree(model)[1]:
            raise ValueError("batched decoding takes static trees (a hand tree, the default or 'auto'); "
                             "tree='dynamic' decodes one prompt at a time (mtpkern.Decoder)")
        # tree="auto" (or None on a calibrated model): planned for the kernels and graphs this runs
        super().__init__(model, resolve_options(model, opts, batch=True), rows=max_batch)
        self.max_batch = max_batch

    def __repr__(self) -> str:
        return (f"BatchDecoder({type(self.model).__name__}, strategy={self.strategy!r}, tree={self.tree!r}, "
                f"max_batch={self.max_batch}, kernels={self.kernels!r}, cuda_graph={self.cuda_graph})")

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
        ids = batch_prompts(input_ids, attention_mask, self.model.config.vocab_size, self.device, self.max_batch)
        for b, p in enumerate(ids):
            check_context(p.shape[0], max_new_tokens, self.step.T, self.model.config.n_positions, f"prompt {b}")
        B = len(ids)
        # one random stream per row; none where nothing is sampled
        gens: list[torch.Generator | None] = [*row_generators(generator, B, self.device)] if self.sampling else [None] * B
        s = self.begin_rows(B)
        rows = [RowOutput(max_new_tokens, eos, f"prompt {b}: ") for b in range(B)]
        lengths = [int(p.shape[0]) for p in ids]
        t0 = now(self.device)
        states = prefill_rows(self.model, s.cache, ids, heads=self.step.heads, weights=self.decode_weights)
        s.generators = gens
        self.step.start(s, lengths)
        self.step.begin(s, states)
        for r, root in zip(rows, s.root.tolist()):
            r.emit([root])
        prefill_time = time.perf_counter() - t0
        step_times, _ = self.decode(s, rows, lengths)
        total = time.perf_counter() - t0
        return [GenerationResult(r.tokens, len(r.accepted), r.accepted, step_times[: len(r.accepted)], prefill_time,
                                 total) for r in rows]
