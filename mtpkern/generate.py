"""``generate``: decode one prompt in one call, on a ``Decoder`` built for it.

The engine itself (cache, tree, the three strategies' steps, CUDA graphs) is
:class:`mtpkern.decoder.Decoder`; hold one to decode many prompts without rebuilding it (and,
with ``cuda_graph=True``, without capturing again). Sampling helpers live in
:mod:`mtpkern.sampling`. Greedy speculative decoding emits exactly the tokens greedy ``ntp``
emits.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mtpkern.batch import BatchDecoder, split_padded
from mtpkern.decoder import (
    ACCEPTANCE,
    KERNELS,
    STRATEGIES,
    Decoder,
    GenerationResult,
    _check_generator,
    default_tree,
    prefill,
)
from mtpkern.sampling import sampling_probs, speculative_sample
from mtpkern.tree import Tree


@torch.inference_mode()
def generate(
    model,
    input_ids,
    *,
    max_new_tokens: int,
    strategy: str = "ntp",
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    acceptance: str = "greedy",
    tree: Tree | Sequence[Sequence[int]] | str | None = None,
    eos_token_id: int | None = None,
    cuda_graph: bool = False,
    generator: torch.Generator | None = None,
    kernels: str = "auto",
    typical_epsilon: float = 0.09,
    typical_alpha: float = 0.3,
    attention_mask=None,
) -> GenerationResult | list[GenerationResult]:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` ([T] or [1, T]; batch 1):
    ``Decoder(model, strategy, ...).generate(input_ids, ...)``; see :class:`Decoder` for
    ``strategy``, ``tree`` (a Tree, choices, a spec, "auto", "dynamic"), ``acceptance``,
    ``kernels`` and ``cuda_graph``. The output ends at the first ``eos_token_id`` (included)
    and never exceeds max_new_tokens.

    A batch (a list of token sequences of any lengths, a [B, T] tensor with B > 1, or any
    ``input_ids`` with an ``attention_mask``, 1 on tokens and 0 on padding at either end) is
    decoded at once by :class:`mtpkern.batch.BatchDecoder` (static trees): one
    result per prompt; greedy rows are token-identical to decoding each prompt alone, sampled
    rows draw from streams of their own, seeded from ``generator`` when one is given.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if generator is not None:
        _check_generator(generator, model.device)
    if attention_mask is not None or _is_batch(input_ids):
        # The prompts first: the batch's cache is sized by their number, never by an unchecked mask.
        prompts = split_padded(input_ids, attention_mask) if attention_mask is not None else input_ids
        n = len(prompts)
        dec = BatchDecoder(model, strategy, tree=tree, max_batch=max(1, n), acceptance=acceptance,
                           temperature=temperature, top_k=top_k, top_p=top_p, typical_epsilon=typical_epsilon,
                           typical_alpha=typical_alpha, kernels=kernels, cuda_graph=cuda_graph)
        gens = None
        if generator is not None and dec.sampling:  # one stream per row, seeded from the caller's generator
            seeds = torch.randint(0, 2**62, (n,), generator=generator, device=generator.device).tolist()
            gens = [torch.Generator(model.device).manual_seed(s) for s in seeds]
        return dec.generate(prompts, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, generators=gens)
    decoder = Decoder(model, strategy, tree=tree, kernels=kernels, cuda_graph=cuda_graph, acceptance=acceptance,
                      temperature=temperature, top_k=top_k, top_p=top_p, typical_epsilon=typical_epsilon,
                      typical_alpha=typical_alpha)
    return decoder.generate(input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, generator=generator)


def _is_batch(input_ids) -> bool:
    """A list of sequences, or a 2-D tensor of more than one row (a [1, T] tensor stays batch 1)."""
    if isinstance(input_ids, torch.Tensor):
        return input_ids.dim() == 2 and input_ids.shape[0] > 1
    return (isinstance(input_ids, (list, tuple)) and len(input_ids) > 0
            and isinstance(input_ids[0], (list, tuple, torch.Tensor)))


__all__ = [
    "GenerationResult", "Decoder", "generate", "prefill", "speculative_sample", "sampling_probs", "default_tree",
    "STRATEGIES", "ACCEPTANCE", "KERNELS",
]
