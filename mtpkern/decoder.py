"""``Decoder``: the engine a user holds to decode one prompt at a time.

``Decoder(model, strategy, tree=..., kernels=..., cuda_graph=...)`` (or ``Decoder(model,
options)``) is built once and decodes many prompts (``decoder.generate(ids,
max_new_tokens=...)``); ``mtpkern.generate`` is the one-call convenience on top of it. The state
of a generation is explicit and lives on the device: the cache, ``prefix`` (how many tokens
the cache holds), the *root* (the next token, already chosen but not yet in the cache) and the
drafts the heads proposed for after it. The steps themselves are :mod:`mtpkern.steps`; this is
the generation loop, the prefix cache, and the planning of ``tree="auto"`` (``mtpkern.autotree``,
over the core the cost model times).

Prefix cache (``prefix_cache=True``): the decoder keeps the K/V of its last generation and
prefills only the part of a new prompt that differs from the tokens they belong to (the prompt
and the output but its last token, which no step wrote), at least the prompt's last token.
"""

from __future__ import annotations

import time

import torch

from mtpkern.autotree import resolve_options
from mtpkern.core import prefill
from mtpkern.inputs import (
    GenerationResult, RowOutput, check_context, check_generator, check_max_new_tokens, eos_id, prompt_ids,
)
from mtpkern.options import DecodeOptions, engine_options
from mtpkern.runtime import now
from mtpkern.steps import StepEngine


class Decoder(StepEngine):
    """The decoding engine for one prompt at a time: one model, its cache, a tree, CUDA graphs.

    ``Decoder(model, options)`` or ``Decoder(model, strategy, tree=..., ...)``: the options are a
    :class:`mtpkern.DecodeOptions` (strategy, tree, acceptance, sampling, kernels, cuda_graph),
    given whole or as keywords. A tree of ``"auto"``, or None on a model that carries
    calibration, is planned once here (``mtpkern.autotree.resolve_options``); the core under it
    (:class:`mtpkern.steps.StepEngine`) takes the planned ``Tree``.

    prefix_cache: keep the K/V of the last generation (its prompt and output) and prefill only
        what a new prompt does not share with them: a prompt template, a system prompt or a
        conversation's earlier turns are computed once (the last prompt token always runs).
        Dropped when the weights change (a new storage or an in-place update: tensors made
        under ``torch.inference_mode`` keep no version, so after changing those in place call
        ``refresh()``), by ``run_step`` and by a CUDA graph capture.

    On the CPU each of the blocks' matrices and the unembedding is multiplied in the layout
    measured fastest at the step's row count (``mtpkern.cpu_matmul``: a contiguous transposed
    copy, kept beside the weight, or the weight as stored; ``MTPKERN_CPU_MATMUL`` pins one),
    so a decoder may hold some weights twice. Greedy acceptance is lossless: the tokens equal
    greedy "ntp" of the same model.
    """

    def __init__(self, model, strategy: str | DecodeOptions | None = None, *, options: DecodeOptions | None = None,
                 prefix_cache: bool = True, **keywords):
        opts = engine_options(strategy, options, keywords, "Decoder")
        opts.check_model(model)
        if not isinstance(prefix_cache, bool):
            raise TypeError(f"prefix_cache must be True or False, got {prefix_cache!r}")
        super().__init__(model, resolve_options(model, opts))
        self.prefix_cache = prefix_cache

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

    @torch.inference_mode()
    def generate(self, input_ids, *, max_new_tokens: int, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> GenerationResult:
        """Decode up to ``max_new_tokens`` tokens after ``input_ids`` ([T] or [1, T]; batch 1).
        The output ends at the first ``eos_token_id`` (included)."""
        check_max_new_tokens(max_new_tokens)
        if generator is not None:
            check_generator(generator, self.device)
        model, step = self.model, self.step
        row = RowOutput(max_new_tokens, eos_id(eos_token_id, model.config.vocab_size))
        ids = prompt_ids(input_ids, model.config.vocab_size, self.device)
        P0 = ids.shape[0]
        check_context(P0, max_new_tokens, step.T, model.config.n_positions)
        self._timing_state = False
        prompt, stamp = ids.tolist(), self._weight_stamp()
        s = self.begin_rows(1)
        s.generators[0] = generator
        reuse = self._reusable(prompt, stamp)
        self._cached = None  # until this generation ends: an error leaves the cache unknown
        t0 = now(self.device)
        h = prefill(model, self.cache, ids, heads=step.heads, start=reuse, weights=self.decode_weights)  # [heads, D]
        step.start(s, [P0])
        step.begin(s, h[None])
        row.emit(s.root.tolist())
        prefill_time = time.perf_counter() - t0
        try:
            step_times, (prefix,) = self.decode(s, [row], [P0])
        finally:
            s.generators[0] = None
        total = time.perf_counter() - t0
        out = row.tokens
        if self.prefix_cache:  # slots 0..prefix-1 hold the prompt and the output but its last token
            self._cached = ((prompt + out)[:min(prefix, P0 + len(out))], self._weight_stamp())
        return GenerationResult(out, len(step_times), row.accepted, step_times, prefill_time, total, reuse)


__all__ = ["Decoder", "GenerationResult"]
