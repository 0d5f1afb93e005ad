"""The model families' configurations: ``GPT2Config`` for GPT-2 and ``LlamaConfig`` for the
Llama family (Llama 2 and 3, Mistral, Qwen2, SmolLM), each one dataclass for the base model and
its MTP and MEDUSA heads, read and written as the Hugging Face ``config.json`` of the base
architecture with our own fields under ``"mtpkern"`` (a Llama's section names its family).

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

    family = "gpt2"  # the architecture of the base model (LlamaConfig: "llama")

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


# ----------------------------------------------------------------------------- the Llama family

LLAMA_MODEL_TYPES = ("llama", "mtp", "medusa")
# transformers' model_type -> its architecture; the three share Llama's maths (Qwen2: q/k/v biases)
LLAMA_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    """The Llama family: RMSNorm, rotary positions (``rope_theta``; Llama 3's ``rope_scaling``),
    a SwiGLU MLP, grouped-query attention (``n_kv_head`` KV heads for ``n_head`` query heads),
    optional q/k/v biases (Qwen2) and tied or untied embeddings. The sizes keep GPT-2's names
    (``n_embd``, ``n_layer``, ``n_head``, ``n_positions``) so that the engines read one kind of
    config; ``hf_model_type`` is the transformers architecture it came from and exports to."""

    vocab_size: int = 32000
    n_positions: int = 2048
    n_embd: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32
    head_dim: int = 0  # 0: n_embd // n_head
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or Llama 3's {"rope_type": "llama3", factor, ...}
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # Llama's attention_bias puts one on the output projection too
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    hf_model_type: str = "llama"
    model_type: str = "llama"
    n_heads: int = 1
    medusa_layers: int = 1
    medusa_proj: bool = False

    family = "llama"

    def __post_init__(self):
        for f in fields(self):
            value, kind = getattr(self, f.name), _LLAMA_KINDS.get(f.name, _FIELD_KINDS.get(f.name))
            if f.name in ("bos_token_id", "eos_token_id") and value is None:
                continue
            _check_kind(f.name, value, kind)
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_kv_head", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.head_dim:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {self.head_dim}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.hf_model_type not in LLAMA_ARCHITECTURES:
            raise ValueError(f"hf_model_type must be one of {', '.join(LLAMA_ARCHITECTURES)}, got {self.hf_model_type!r}")
        if self.rope_scaling is not None:
            self.rope_scaling = _llama3_rope(self.rope_scaling)
        if self.model_type not in LLAMA_MODEL_TYPES:
            raise ValueError(f"unknown model_type {self.model_type!r} for the Llama family")
        _check_heads(self)

    @classmethod
    def tiny(cls, vocab_size: int = 2048, **kw) -> LlamaConfig:
        """A CPU-sized config for tests."""
        base: dict[str, Any] = dict(n_positions=256, n_embd=64, n_layer=2, n_head=4, n_kv_head=2,
                                    intermediate_size=96)
        base.update(kw)
        return cls(vocab_size=vocab_size, **base)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf_dict(self) -> dict:
        """The transformers config dict of ``hf_model_type``, with our family fields under "mtpkern"."""
        d: dict[str, Any] = {
            "model_type": self.hf_model_type,
            "architectures": [LLAMA_ARCHITECTURES[self.hf_model_type]],
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.n_positions,
            "hidden_size": self.n_embd,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.hf_model_type == "llama":
            d.update(attention_bias=self.qkv_bias, mlp_bias=False)
        elif self.hf_model_type == "mistral":
            d.update(sliding_window=None)
        else:
            d.update(use_sliding_window=False, sliding_window=None)
        d["mtpkern"] = {"format": CONFIG_FORMAT, "family": "llama", "model_type": self.model_type,
                        "n_heads": self.n_heads, "medusa_layers": self.medusa_layers, "medusa_proj": self.medusa_proj}
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> LlamaConfig:
        """Read a transformers Llama, Mistral or Qwen2 config dict; a feature this implementation
        lacks (a sliding window, another RoPE type, experts, another activation) is an error."""
        hf_type = d.get("model_type")
        if hf_type not in LLAMA_ARCHITECTURES:
            raise ValueError(f"model_type {hf_type!r} is not of the Llama family ({', '.join(LLAMA_ARCHITECTURES)})")
        _refuse_llama_features(d, hf_type)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in d:
                raise ValueError(f"the field {key!r} is missing")
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"the field 'rope_parameters' must be an object, got {rope!r}")
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        extra = d.get("mtpkern", {})
        if not isinstance(extra, dict):
            raise ValueError(f"the field 'mtpkern' must be an object, got {extra!r}")
        _section_format(extra)
        family = {k: v for k, v in extra.items() if k in ("model_type", "n_heads", "medusa_layers", "medusa_proj")}
        qwen = hf_type == "qwen2"
        theta: Any = d.get("rope_theta", rope.get("rope_theta", 10000.0))  # checked by __post_init__
        return cls(
            vocab_size=d["vocab_size"], n_positions=d.get("max_position_embeddings", 2048), n_embd=d["hidden_size"],
            n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"],
            n_kv_head=d.get("num_key_value_heads") or d["num_attention_heads"], head_dim=d.get("head_dim") or 0,
            intermediate_size=d["intermediate_size"], rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta, rope_scaling=scaling,
            qkv_bias=qwen or bool(d.get("attention_bias", False)), o_bias=bool(d.get("attention_bias", False)),
            tie_word_embeddings=d.get("tie_word_embeddings", False), bos_token_id=_first(d.get("bos_token_id")),
            eos_token_id=_first(d.get("eos_token_id")), hf_model_type=hf_type, **family,
        )


def _first(token_id):
    """A token id, or the first of a list of them (Llama 3 lists several end-of-sequence ids)."""
    return token_id[0] if isinstance(token_id, list) and token_id else token_id


def _check_kind(name: str, value, kind) -> None:
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)
                          or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if kind in (str, bool) and not isinstance(value, kind):
        raise ValueError(f"{name} must be a {kind.__name__}, got {value!r}")
    if kind is dict and value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be an object or null, got {value!r}")


def _check_heads(cfg) -> None:
    """The checks of the heads that both families share."""
    if cfg.n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {cfg.n_heads}")
    if cfg.model_type == "medusa" and cfg.n_heads < 2:
        raise ValueError(f"a MEDUSA model needs n_heads >= 2 (n_heads counts every head: the next-token head "
                         f"and at least one MEDUSA head), got {cfg.n_heads}")
    if cfg.model_type == "mtp" and cfg.n_layer < 2:
        raise ValueError("an MTP model needs n_layer >= 2 (a trunk and a head block)")


def _llama3_rope(scaling: dict) -> dict | None:
    """Llama 3's rope scaling, checked: the only RoPE type besides the default one we implement."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None  # a "default" scaling is no scaling
    if kind != "llama3":
        raise ValueError(f"rope_scaling of type {kind!r} is not supported (only Llama 3's 'llama3')")
    missing = [k for k in LLAMA3_ROPE_KEYS if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise ValueError(f"rope_scaling 'llama3' needs the numbers {', '.join(missing)}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError("rope_scaling 'llama3' needs high_freq_factor > low_freq_factor")
    return {"rope_type": "llama3", **{k: scaling[k] for k in LLAMA3_ROPE_KEYS}}


def _refuse_llama_features(d: dict, hf_type: str) -> None:
    """A one-line error for every feature of these architectures that this implementation lacks."""
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (the Llama family's SwiGLU uses 'silu')")
    if d.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    if any(d.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")):
        raise ValueError("mixture-of-experts layers are not supported")
    if hf_type == "mistral" and d.get("sliding_window") is not None:
        raise ValueError(f"sliding_window={d['sliding_window']} is not supported (Mistral with sliding_window null only)")
    if hf_type == "qwen2" and d.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported (Qwen2 with full attention only)")
    if d.get("pretraining_tp", 1) not in (1, None):
        raise ValueError(f"pretraining_tp={d['pretraining_tp']} is not supported")
    rope = d.get("rope_parameters") or {}
    if isinstance(rope, dict) and rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor is not supported")


_LLAMA_KINDS = {"n_kv_head": int, "head_dim": int, "intermediate_size": int, "rms_norm_eps": float,
                "rope_theta": float, "rope_scaling": dict, "qkv_bias": bool, "o_bias": bool,
                "tie_word_embeddings": bool, "hf_model_type": str}
