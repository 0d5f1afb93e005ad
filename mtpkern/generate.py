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

from mtpkern.decoder import (
    ACCEPTANCE,
    KERNELS,
    STRATEGIES,
    Decoder,
    GenerationResult,
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
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` ([T] or [1, T]; batch 1):
    ``Decoder(model, strategy, ...).generate(input_ids, ...)``; see :class:`Decoder` for
    ``strategy``, ``tree`` (a Tree, choices, a spec, "auto", "dynamic"), ``acceptance``,
    ``kernels`` and ``cuda_graph``. The output ends at the first ``eos_token_id`` (included)
    and never exceeds max_new_tokens.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    decoder = Decoder(model, strategy, tree=tree, kernels=kernels, cuda_graph=cuda_graph, acceptance=acceptance,
                      temperature=temperature, top_k=top_k, top_p=top_p, typical_epsilon=typical_epsilon,
                      typical_alpha=typical_alpha)
    return decoder.generate(input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, generator=generator)


__all__ = [
    "GenerationResult", "Decoder", "generate", "prefill", "speculative_sample", "sampling_probs", "default_tree",
    "STRATEGIES", "ACCEPTANCE", "KERNELS",
]
