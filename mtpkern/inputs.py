"""What the engines take and give, checked once for one prompt and for many: prompts,
``max_new_tokens``, ``eos_token_id``, generators, the context's room, and a row's output
(``RowOutput``: tokens up to EOS or ``max_new_tokens``, NaN refused). Every error names the
argument and, in a batch, the prompt."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


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


class RowOutput:
    """One prompt's output as steps emit it: tokens up to its first EOS (included) or
    ``max_new_tokens``; a -1 (the ops' mark of NaN logits) is an error, never a token."""

    def __init__(self, max_new_tokens: int, eos_token_id: int | None, label: str = ""):
        self.max_new_tokens, self.eos, self.label = max_new_tokens, eos_token_id, label
        self.tokens: list[int] = []
        self.accepted: list[int] = []  # tokens accepted per step
        self.done = False

    def emit(self, chunk) -> bool:
        """Append tokens up to EOS / max_new_tokens; True when the row is done."""
        for t in chunk:
            if t < 0:
                raise ValueError(f"{self.label}the model's logits are NaN at generated token {len(self.tokens)}: "
                                 "no token can be chosen (its weights, or the hidden states they produce, "
                                 "hold NaN or inf)")
            self.tokens.append(t)
            if t == self.eos or len(self.tokens) == self.max_new_tokens:
                self.done = True
                break
        return self.done

    def step(self, host_row: list[int]) -> bool:
        """A step's output row ``[n, t_1 .. t_n, ...]``: record n and emit its tokens."""
        n = host_row[0]
        self.accepted.append(n)
        return self.emit(host_row[1 : 1 + n])


def check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


def check_context(prompt_len: int, max_new_tokens: int, tree_nodes: int, context: int, name: str = "prompt") -> None:
    """The cache slots a generation needs fit the model's context: the last step starts with
    at most max_new_tokens - 1 tokens emitted (its root not yet cached) and writes
    ``tree_nodes`` slots."""
    need = prompt_len + max_new_tokens + tree_nodes - 2
    if need <= context:
        return
    over = need - context
    what = f"{name} ({prompt_len} tokens) + max_new_tokens ({max_new_tokens})"
    what += f" + tree ({tree_nodes} nodes)" if tree_nodes > 1 else ""
    hint = (f"lower max_new_tokens to at most {max_new_tokens - over}" if max_new_tokens > over
            else "shorten the prompt")
    raise ValueError(f"{what} needs {need} cache slots, {over} more than the model's context of {context}; {hint}")


def check_room(max_len: int, prefix_len: int, T: int) -> None:
    """Writing T tokens at slot ``prefix_len`` fits a cache of ``max_len`` slots."""
    if prefix_len + T > max_len:
        raise RuntimeError(
            f"KV cache overflow: writing {T} tokens at slot {prefix_len} needs {prefix_len + T} slots "
            f"but the cache has {max_len}"
        )


def as_ids(input_ids) -> torch.Tensor:
    """``input_ids`` as a tensor: text, or anything torch cannot read as numbers, is a TypeError."""
    if isinstance(input_ids, (str, bytes)) or (
            isinstance(input_ids, (list, tuple)) and any(isinstance(t, (str, bytes)) for t in input_ids)):
        raise TypeError("input_ids is text, not token ids: tokenize it first, e.g. with "
                        "mtpkern.load_tokenizer(checkpoint)(text)['input_ids']")
    try:
        return torch.as_tensor(input_ids)
    except (TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TypeError(f"input_ids must be token ids (a list of ints or an integer tensor), got a "
                        f"{type(input_ids).__name__} that torch cannot read as one ({reason})") from None


def prompt_ids(input_ids, vocab_size: int, device) -> torch.Tensor:
    """One prompt ([T] or [1, T] token ids in the vocabulary) as int64 [T] on ``device``."""
    ids = as_ids(input_ids)
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


def batch_prompts(prompts, attention_mask, vocab_size: int, device, max_batch: int) -> list[torch.Tensor]:
    """A batch of prompts (a list of sequences, a [B, T] tensor, or a padded batch with its
    ``attention_mask``), each checked as ``prompt_ids`` checks one."""
    if attention_mask is not None:
        prompts = split_padded(prompts, attention_mask)
    elif isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"a batch of prompts is a list of sequences or a [B, T] tensor, got shape "
                             f"{tuple(prompts.shape)}")
        prompts = list(prompts)
    elif not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)):
        hint = (": text must be tokenized first, e.g. with mtpkern.load_tokenizer(checkpoint)(texts)['input_ids']"
                if isinstance(prompts, (str, bytes)) else "")
        raise TypeError(f"prompts must be a list of token sequences or a [B, T] tensor, got "
                        f"{type(prompts).__name__}{hint}")
    if len(prompts) == 0:
        raise ValueError("no prompts: the batch is empty")
    if len(prompts) > max_batch:
        raise ValueError(f"{len(prompts)} prompts, but this decoder's cache holds {max_batch} rows "
                         f"(BatchDecoder(..., max_batch={len(prompts)}))")
    out = []
    for b, p in enumerate(prompts):
        try:
            out.append(prompt_ids(p, vocab_size, device))
        except (TypeError, ValueError) as e:
            raise type(e)(f"prompt {b}: {e}") from None
    return out


def _length(seq):
    """The length of one prompt of a list, or None for an item that has none."""
    if isinstance(seq, (list, tuple)) or (isinstance(seq, torch.Tensor) and seq.dim() > 0):
        return len(seq)
    return None


def split_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """The prompts of a padded batch: row b's tokens where ``attention_mask[b]`` is 1. Padding
    may sit on either side of a row, never between its tokens."""
    if isinstance(input_ids, (list, tuple)) and len({_length(p) for p in input_ids}) > 1:
        raise ValueError("attention_mask goes with a padded [B, T] batch of input_ids (a tensor, or lists of one "
                         "length): prompts of different lengths need no attention_mask, pass the list alone")
    ids = as_ids(input_ids)
    try:
        mask = torch.as_tensor(attention_mask)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"attention_mask must be a [B, T] tensor (or lists) of 0 and 1, got a "
                         f"{type(attention_mask).__name__} torch cannot read as one") from None
    if ids.dim() != 2:
        raise ValueError(f"input_ids with an attention_mask must be [B, T], got shape {tuple(ids.shape)}")
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} and input_ids {tuple(ids.shape)} differ in shape")
    if mask.dtype == torch.bool:
        mask = mask.long()
    if mask.dtype.is_floating_point or mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
    return [_row_tokens(ids[b], mask[b], b) for b in range(ids.shape[0])]


def _row_tokens(ids: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    on = mask.nonzero().view(-1)
    if on.numel() == 0:
        raise ValueError(f"row {b} of attention_mask is all padding: the prompt is empty")
    if int(on[-1] - on[0]) + 1 != on.numel():
        raise ValueError(f"row {b} of attention_mask has padding between real tokens (a hole at position "
                         f"{int(on[0]) + int((on.diff() > 1).nonzero()[0]) + 1}): pad on the left or the right only")
    return ids[on]


def eos_id(eos_token_id, vocab_size: int) -> int | None:
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


def check_generator(generator, device: torch.device) -> None:
    """A generator must be a ``torch.Generator`` on the model's device: torch draws from a
    generator on the device it samples on."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    where = torch.device(generator.device)
    if where.type != device.type or (None not in (where.index, device.index) and where.index != device.index):
        raise ValueError(f"the generator is on {where} but the model is on {device}: "
                         f"pass torch.Generator(device={str(device)!r})")


def row_generators(generator, B: int, device) -> list[torch.Generator]:
    """One random stream per row, from ``generator``: a list of B generators (one per row, each
    as batch 1 would draw from it), or one ``torch.Generator`` (or None: torch's global one, so
    ``torch.manual_seed`` makes a batch reproducible) that seeds fresh ones."""
    if generator is None or isinstance(generator, torch.Generator):
        if generator is not None:
            check_generator(generator, device)
        where = generator.device if generator is not None else "cpu"
        seeds = torch.randint(0, 2**62, (B,), generator=generator, device=where).tolist()
        return [torch.Generator(device).manual_seed(s) for s in seeds]
    if not hasattr(generator, "__iter__"):
        raise TypeError(f"generator must be a torch.Generator (the rows' streams are seeded from it) or a list "
                        f"of them, one per prompt, got {type(generator).__name__}")
    generators = list(generator)
    if len(generators) != B:
        raise ValueError(f"{len(generators)} generators for {B} prompts: give one per prompt")
    for b, g in enumerate(generators):
        try:
            check_generator(g, device)
        except (TypeError, ValueError) as e:
            raise type(e)(f"generator {b}: {e}") from None
    if len({id(g) for g in generators}) != B:
        raise ValueError("the rows need independent random streams: give a different generator to each prompt")
    return generators


__all__ = ["GenerationResult", "RowOutput", "split_padded", "check_max_new_tokens", "check_context", "check_room",
           "as_ids", "prompt_ids", "batch_prompts", "eos_id", "check_generator", "row_generators"]
