"""``generate``: decode one prompt or a batch in one call.

It runs the engine that fits: :class:`mtpkern.Decoder` for one prompt,
:class:`mtpkern.BatchDecoder` for many (each plans the calibrated ``"auto"`` tree for what it
runs). Hold an engine to decode many prompts without rebuilding it (and, with
``cuda_graph=True``, without capturing again). Greedy speculative decoding emits exactly the
tokens greedy ``ntp`` emits.
"""

from __future__ import annotations

import torch

from mtpkern.batch import BatchDecoder
from mtpkern.decoder import Decoder
from mtpkern.inputs import GenerationResult, check_generator, check_max_new_tokens, split_padded
from mtpkern.options import DecodeOptions, engine_options


@torch.inference_mode()
def generate(model, input_ids, *, max_new_tokens: int, options: DecodeOptions | None = None,
             eos_token_id: int | None = None, generator: torch.Generator | None = None, attention_mask=None,
             **keywords) -> GenerationResult | list[GenerationResult]:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids``. How: ``options`` (a
    :class:`mtpkern.DecodeOptions`) or its fields as keywords (``strategy``, ``tree``,
    ``acceptance``, ``temperature``, ``top_k``, ``top_p``, ``typical_epsilon``,
    ``typical_alpha``, ``kernels``, ``cuda_graph``); a tree of None or ``"auto"`` is the
    calibrated tree where the model carries calibration. The output ends at the first
    ``eos_token_id`` (included) and never exceeds max_new_tokens.

    One prompt ([T] or [1, T]) gives one :class:`GenerationResult`. A batch (a list of token
    sequences of any lengths, a [B, T] tensor with B > 1, or any ``input_ids`` with an
    ``attention_mask``, 1 on tokens and 0 on padding at either end) is decoded at once by
    :class:`mtpkern.BatchDecoder` (static trees): one result per prompt; greedy rows are
    token-identical to decoding each prompt alone, sampled rows draw from streams of their own,
    seeded from ``generator`` when one is given.
    """
    check_max_new_tokens(max_new_tokens)
    opts = engine_options(None, options, keywords, "generate")
    if generator is not None:
        check_generator(generator, model.device)
    if attention_mask is None and not _is_batch(input_ids):
        decoder = Decoder(model, opts)
        return decoder.generate(input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                generator=generator)
    # The prompts first: the batch's cache is sized by their number, never by an unchecked mask.
    prompts = split_padded(input_ids, attention_mask) if attention_mask is not None else input_ids
    n = len(prompts)
    dec = BatchDecoder(model, opts, max_batch=max(1, n))
    # one stream per row, seeded from the caller's generator
    return dec.generate(prompts, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, generator=generator)


def _is_batch(input_ids) -> bool:
    """A list of sequences, or a 2-D tensor of more than one row (a [1, T] tensor stays batch 1)."""
    if isinstance(input_ids, torch.Tensor):
        return input_ids.dim() == 2 and input_ids.shape[0] > 1
    return (isinstance(input_ids, (list, tuple)) and len(input_ids) > 0
            and isinstance(input_ids[0], (list, tuple, torch.Tensor)))


__all__ = ["generate"]
