"""The model family's configuration: one dataclass for GPT-2, MTP and MEDUSA, read and written as
a Hugging Face GPT-2 ``config.json`` with the family's own fields under ``"mtpkern"``.

A config is checked field by field when it is built, so that a bad ``config.json`` is reported
by the name of its field (``load_model`` adds the file's) and never from deep inside a layer.

``n_heads`` counts every prediction head, the next-token head included: 1 for GPT-2, the head
blocks of MTP, 1 + the MEDUSA heads of MEDUSA. The ``"mtpkern"`` section of a ``config.json``
carries ``"format": CONFIG_FORMAT``; one without it was written before format 2, when a MEDUSA
config's ``n_heads`` counted its MEDUSA heads alone, and is read as such (one head more).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from mtpkern.checkpoint import CheckpointError

# A checkpoint directory holds these two files (and, optionally, a tokenizer and calibration.json).
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_TYPES = ("gpt2", "mtp", "medusa")
# The "mtpkern" section's format. 1 (no "format" key, before this one): a MEDUSA config's
# n_heads counted the MEDUSA heads only. 2: n_heads counts every head, the next-token head included.
CONFIG_FORMAT = 2


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # The family: "gpt2", "mtp" or "medusa", and their heads.
    model_type: str = "gpt2"
    # Every prediction head, the next-token head (head 0) included: gpt2 1; mtp its head blocks;
    # medusa 1 + its MEDUSA heads (so n_heads - 1 draft heads for both).
    n_heads: int = 1
    medusa_layers: int = 1  # residual blocks per MEDUSA head
    medusa_proj: bool = False  # per-head unembedding instead of the shared one

    def __post_init__(self):
        for f in fields(self):  # a config read from JSON can hold anything: name the field
            value, kind = getattr(self, f.name), _FIELD_KINDS[f.name]
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{f.name} must be a non-negative integer, got {value!r}")
            if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{f.name} must be a positive number, got {value!r}")
            if kind in (str, bool) and not isinstance(value, kind):
                raise ValueError(f"{f.name} must be a {kind.__name__}, got {value!r}")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {self.model_type!r}")
        if self.n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {self.n_heads}")
        if self.model_type == "medusa" and self.n_heads < 2:
            raise ValueError(f"a MEDUSA model needs n_heads >= 2 (n_heads counts every head: the next-token head "
                             f"and at least one MEDUSA head), got {self.n_heads}")
        if self.model_type == "mtp" and self.n_layer < 2:
            raise ValueError("an MTP model needs n_layer >= 2 (a trunk and a head block)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def tiny(cls, vocab_size: int = 2048, **kw) -> GPT2Config:
        """A CPU-sized config for tests and the demo."""
        base: dict[str, Any] = dict(n_positions=256, n_embd=128, n_layer=4, n_head=4)
        base.update(kw)
        return cls(vocab_size=vocab_size, **base)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPT2Config:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf_dict(self) -> dict:
        """A Hugging Face GPT-2 config dict, with our family fields under "mtpkern"."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": True,
            "mtpkern": {
                "format": CONFIG_FORMAT,
                "model_type": self.model_type,
                "n_heads": self.n_heads,
                "medusa_layers": self.medusa_layers,
                "medusa_proj": self.medusa_proj,
            },
        }

    @classmethod
    def from_hf_dict(cls, d: dict) -> GPT2Config:
        """Read a Hugging Face GPT-2 config dict; reject variants this implementation lacks. An
        ``"mtpkern"`` section without ``"format"`` (written before format 2) is converted: a
        MEDUSA config's ``n_heads`` counted its MEDUSA heads alone."""
        unsupported = {
            "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
            "scale_attn_weights": (True,),
            "scale_attn_by_inverse_layer_idx": (False,),
            "reorder_and_upcast_attn": (False,),
            "tie_word_embeddings": (True,),
        }
        for key, ok in unsupported.items():
            if key in d and d[key] not in ok:
                raise CheckpointError(f"GPT-2 config {key}={d[key]!r} is not supported (need one of {ok})")
        if d.get("n_inner") is not None and d.get("n_inner") != 4 * d.get("n_embd", 0):
            raise CheckpointError(f"GPT-2 config n_inner={d['n_inner']} is not supported (need 4 * n_embd)")
        extra = d.get("mtpkern", {})
        if not isinstance(extra, dict):
            raise ValueError(f"the field 'mtpkern' must be an object, got {extra!r}")
        for key in ("vocab_size", "n_embd", "n_layer", "n_head"):
            if key not in d:
                raise ValueError(f"the field {key!r} is missing")
        family = {k: v for k, v in extra.items() if k in ("model_type", "n_heads", "medusa_layers", "medusa_proj")}
        if _section_format(extra) < 2 and family.get("model_type") == "medusa" and _is_int(family.get("n_heads")):
            family["n_heads"] += 1  # format 1 counted the MEDUSA heads, not the next-token head
        eos = d.get("eos_token_id", 50256)
        return cls(
            vocab_size=d["vocab_size"],
            n_positions=d.get("n_positions", d.get("n_ctx", 1024)),
            n_embd=d["n_embd"],
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            bos_token_id=d.get("bos_token_id", eos) if d.get("bos_token_id") is not None else eos,
            eos_token_id=eos if eos is not None else 50256,
            **family,
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _section_format(extra: dict) -> int:
    """The format of a config's "mtpkern" section: 1 without the key (written before format 2)."""
    fmt = extra.get("format", 1)
    if not _is_int(fmt) or fmt < 1:
        raise ValueError(f"the field 'mtpkern.format' must be a positive integer, got {fmt!r}")
    if fmt > CONFIG_FORMAT:
        raise ValueError(f"the field 'mtpkern.format' is {fmt}: written by a newer mtpkern "
                         f"(this one reads formats 1 to {CONFIG_FORMAT}); upgrade mtpkern")
    return fmt


_FIELD_KINDS = {"vocab_size": int, "n_positions": int, "n_embd": int, "n_layer": int, "n_head": int,
                "layer_norm_epsilon": float, "bos_token_id": int, "eos_token_id": int, "model_type": str,
                "n_heads": int, "medusa_layers": int, "medusa_proj": bool}
