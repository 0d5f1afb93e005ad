"""Checkpoints in and out: our safetensors + ``config.json`` directories, and Hugging Face GPT-2.

Our checkpoint is a Hugging Face GPT-2 directory whose ``config.json`` carries the family's
fields under ``"mtpkern"`` (``GPT2Config.to_hf_dict``), so a GPT-2 we write loads in
``transformers`` too; ``SpeculativeLM.save_pretrained`` writes it. ``load_model`` reads either
kind, and ``to_hf`` turns a ``GPT2`` into a ``transformers`` model (parity checks, baselines).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn

from mtpkern.calibration import attach_calibration
from mtpkern.checkpoint import CheckpointError, is_local, require_file, resolve_checkpoint
from mtpkern.config import CONFIG_NAME, LLAMA_ARCHITECTURES, WEIGHTS_NAME, GPT2Config, LlamaConfig
from mtpkern.gguf_io import read_gguf
from mtpkern.heads_io import is_head_dir, read_heads
from mtpkern.models import GPT2, MODEL_CLASSES, Llama, MedusaModel, SpeculativeLM
from mtpkern.runtime import resolve_dtype

# transformers' GPT-2 stores Conv1D weights as [in, out]; ours are nn.Linear [out, in].
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_state_from_hf(hf_state: dict) -> dict:
    """Map a transformers GPT2LMHeadModel state dict onto ours."""
    out = {}
    for k, v in hf_state.items():
        if k == "lm_head.weight" or k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # tied to wte / causal-mask buffers of old checkpoints
        name = k[len("transformer.") :] if k.startswith("transformer.") else k
        if name.endswith(_CONV1D):
            v = v.t()
        out[name] = v.contiguous()
    return out


def gpt2_state_to_hf(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        out["transformer." + k] = v.t().contiguous() if k.endswith(_CONV1D) else v
    out["lm_head.weight"] = state["wte.weight"]
    return out


# The Llama family: ours fuses q/k/v (``c_attn``) and gate/up (``c_fc``); transformers keeps them apart.
_LLAMA_NAMES = {"input_layernorm.weight": "ln_1.weight", "post_attention_layernorm.weight": "ln_2.weight",
                "self_attn.o_proj.weight": "attn.c_proj.weight", "self_attn.o_proj.bias": "attn.c_proj.bias",
                "mlp.down_proj.weight": "mlp.c_proj.weight"}
_LLAMA_FUSED = {"attn.c_attn.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                "attn.c_attn.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
                "mlp.c_fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}


def llama_state_from_hf(hf_state: dict, cfg: LlamaConfig) -> dict:
    """Map a transformers Llama / Mistral / Qwen2 state dict onto ours (``mtpkern.llama``)."""
    out = {"wte.weight": hf_state["model.embed_tokens.weight"], "ln_f.weight": hf_state["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = hf_state["lm_head.weight"]
    for i in range(cfg.n_layer):
        pre = f"model.layers.{i}."
        for theirs, ours in _LLAMA_NAMES.items():
            if pre + theirs in hf_state:
                out[f"h.{i}.{ours}"] = hf_state[pre + theirs]
        for ours, parts in _LLAMA_FUSED.items():
            if pre + parts[0] in hf_state:
                out[f"h.{i}.{ours}"] = torch.cat([hf_state[pre + k] for k in parts])
    return {k: v.contiguous() for k, v in out.items()}


def llama_state_to_hf(state: dict, cfg: LlamaConfig) -> dict:
    """Our Llama state dict in transformers' layout (the inverse of ``llama_state_from_hf``)."""
    out = {"model.embed_tokens.weight": state["wte.weight"], "model.norm.weight": state["ln_f.weight"],
           "lm_head.weight": state["wte.weight" if cfg.tie_word_embeddings else "lm_head.weight"]}
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        pre = f"model.layers.{i}."
        for theirs, ours in _LLAMA_NAMES.items():
            if f"h.{i}.{ours}" in state:
                out[pre + theirs] = state[f"h.{i}.{ours}"]
        for ours, parts in _LLAMA_FUSED.items():
            if f"h.{i}.{ours}" in state:
                sizes = [q, kv, kv] if len(parts) == 3 else [cfg.intermediate_size] * 2
                out.update({pre + k: t.contiguous() for k, t in zip(parts, state[f"h.{i}.{ours}"].split(sizes))})
    return out


def _llama_to_hf(model: Llama):
    import transformers

    cfg = cast(LlamaConfig, model.config)
    d = cfg.to_hf_dict()
    d.pop("mtpkern")
    arch = getattr(transformers, d.pop("architectures")[0])
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    hf = arch(hf_cfg).to(model.dtype)
    missing, unexpected = hf.load_state_dict(llama_state_to_hf(model.state_dict(), cfg), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch converting to transformers: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf.to(model.device).eval()


def to_hf(model: GPT2):
    """The same weights as a transformers model (for parity checks and baselines): a
    GPT2LMHeadModel, or for the Llama family its own architecture (``LlamaForCausalLM``,
    ``MistralForCausalLM``, ``Qwen2ForCausalLM``)."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    if not isinstance(model, GPT2):
        raise TypeError(f"to_hf takes a base model (GPT2 or Llama), got {type(model).__name__}; "
                        "pass model.base for MEDUSA")
    if isinstance(model, Llama):
        return _llama_to_hf(model)
    d = model.config.to_hf_dict()
    d.pop("mtpkern")
    d.pop("model_type")
    d.pop("architectures")
    # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), which mypy reads as
    # the unbound method (self first)
    hf = GPT2LMHeadModel(HFConfig(**d)).to(model.dtype)  # type: ignore[arg-type]
    missing, unexpected = hf.load_state_dict(gpt2_state_to_hf(model.state_dict()), strict=False)
    bad = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if bad or unexpected:
        raise RuntimeError(f"state dict mismatch converting to transformers: missing {bad}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.to(model.device).eval()


def load_model(name_or_dir, *, device=None, dtype=None, calibration: bool = True,
               expect: type[SpeculativeLM] = SpeculativeLM, base=None) -> SpeculativeLM:
    """Load any model of the family from a directory written by ``save_pretrained`` (or the run
    directory of ``mtpkern train`` that holds it), or a Hugging Face GPT-2 checkpoint (directory
    or hub name) as a ``GPT2``. A bad config is a ``CheckpointError`` naming the file and field.
    ``calibration``: attach the directory's ``calibration.json`` as ``model.calibration`` (checked
    against the weights; see ``mtpkern.calibrate``), or ignore it (False). ``dtype``: a floating
    ``torch.dtype``, or a name as the CLI takes it (``"bfloat16"``, ``"bf16"``, ...); None keeps
    float32. ``expect``: the class the caller needs (``GPT2``, ``MTPModel``, ``MedusaModel``); a
    checkpoint of another kind is a ``CheckpointError`` that names both. A MEDUSA head directory
    (FasterDecoding/Medusa's or vLLM's layout, ``mtpkern.heads_io``) loads on its config's base,
    or on ``base`` (a name or directory) where given."""
    model = _load_any(name_or_dir, device=device, dtype=dtype, calibration=calibration, base=base)
    if not isinstance(model, expect):
        raise CheckpointError(f"{name_or_dir!r} holds a {type(model).__name__}, not a {expect.__name__}")
    return model


def _load_any(name_or_dir, *, device, dtype, calibration: bool, base=None) -> SpeculativeLM:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        dtype = resolve_dtype(dtype)  # a name; anything else is a one-line ValueError
    if str(name_or_dir).lower().endswith(".gguf"):  # llama.cpp's format: the Llama family, dequantised
        return _load_gguf(Path(name_or_dir), device=device, dtype=dtype)
    if is_local(name_or_dir):
        path = resolve_checkpoint(name_or_dir)[0]
        cfg_file = require_file(path, CONFIG_NAME)
        try:
            raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{cfg_file} must hold a JSON object, got {type(raw).__name__}")
        if is_head_dir(raw):  # MEDUSA heads in another tool's layout, on a base of ours or transformers'
            heads = read_heads(path, raw, base=base, load_base=lambda b: _load_any(b, device=None, dtype=None,
                                                                                   calibration=False))
            if calibration:
                attach_calibration(heads, path)
            return heads.to(device=device, dtype=dtype).eval()
        try:  # checked here so a bad field is named, not reported from deep inside transformers
            config_class(raw, cfg_file).from_hf_dict(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{cfg_file} is not a valid config: {e}") from None
        if "mtpkern" in raw:
            return _load_ours(path, raw, device=device, dtype=dtype, calibration=calibration)
        if raw.get("model_type") in LLAMA_ARCHITECTURES:
            return _load_hf_llama(path, raw, device=device, dtype=dtype)
        name_or_dir = path
    return _load_hf_gpt2(name_or_dir, device=device, dtype=dtype)


def config_class(raw: dict, source) -> type[GPT2Config] | type[LlamaConfig]:
    """The config class of a ``config.json``'s family: its "mtpkern" section's ``family`` (GPT-2
    when absent: written before the Llama family), else its transformers ``model_type``. A
    section whose family contradicts the architecture (heads saved for another family) is a
    ``CheckpointError`` naming ``source``."""
    extra = raw.get("mtpkern")
    hf_type = raw.get("model_type", "gpt2")
    family = extra.get("family", "gpt2") if isinstance(extra, dict) else ("llama" if hf_type in LLAMA_ARCHITECTURES
                                                                           else "gpt2")
    if family not in ("gpt2", "llama"):
        raise CheckpointError(f"{source}: unknown model family {family!r} in its 'mtpkern' section")
    if (family == "llama") != (hf_type in LLAMA_ARCHITECTURES):
        raise CheckpointError(f"{source}: its 'mtpkern' section says family {family!r} but the architecture is "
                              f"{hf_type!r}: heads saved for one family cannot sit on a base of another")
    return LlamaConfig if family == "llama" else GPT2Config


def _load_ours(path: Path, raw: dict, *, device, dtype, calibration: bool = True) -> SpeculativeLM:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        cfg = config_class(raw, path / CONFIG_NAME).from_hf_dict(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME} is not a valid mtpkern config: {e}") from None
    weights = require_file(path, WEIGHTS_NAME)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt or truncated: {e}") from None
    model = MODEL_CLASSES[cfg.model_type](cfg)
    _load_state(model, state, weights)
    if isinstance(model, MedusaModel):
        model.freeze_base()
    if calibration:  # before the cast: the fingerprint reads the weights as saved
        attach_calibration(model, path)
    return model.to(device=device, dtype=dtype).eval()


def _load_state(model: nn.Module, state: dict, source) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        raise CheckpointError(f"{source} does not match its config: " + ", ".join(parts))
    model.load_state_dict(state)


def _load_hf_gpt2(name_or_dir, *, device, dtype) -> GPT2:
    try:
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(str(name_or_dir), torch_dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; name the source
        where = "" if Path(name_or_dir).exists() else " (no such local directory; tried the Hugging Face hub)"
        raise CheckpointError(f"could not load GPT-2 checkpoint {str(name_or_dir)!r}{where}: {e}") from None
    cfg = GPT2Config.from_hf_dict(hf.config.to_dict())
    model = GPT2(cfg)
    _load_state(model, gpt2_state_from_hf(hf.state_dict()), name_or_dir)
    return model.to(device=device, dtype=dtype).eval()


def _load_hf_llama(path: Path, raw: dict, *, device, dtype) -> Llama:
    """A transformers ``save_pretrained`` directory of the Llama family, read with safetensors
    (no model class of transformers built)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        cfg = LlamaConfig.from_hf_dict(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME} is not a valid config: {e}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors weights (save the model with safe_serialization)")
    state: dict = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f} is corrupt or truncated: {e}") from None
    try:
        ours = llama_state_from_hf(state, cfg)
    except KeyError as e:
        raise CheckpointError(f"{path}: the weights lack {e}") from None
    return load_llama_state(cfg, ours, path, device=device, dtype=dtype)


def _load_gguf(path: Path, *, device, dtype) -> Llama:
    if not path.is_file():
        raise CheckpointError(f"no such GGUF file: {str(path)!r}")
    raw, state = read_gguf(path)
    try:
        cfg = LlamaConfig.from_hf_dict(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its config is not supported: {e}") from None
    return load_llama_state(cfg, llama_state_from_hf(state, cfg), path, device=device, dtype=dtype)


def load_llama_state(cfg: LlamaConfig, state: dict, source, *, device, dtype) -> Llama:
    """A ``Llama`` of ``cfg`` holding ``state`` (ours), checked against it (``source`` named)."""
    model = Llama(cfg)
    _load_state(model, {k: v.float() for k, v in state.items()}, source)
    return model.to(device=device, dtype=dtype).eval()
