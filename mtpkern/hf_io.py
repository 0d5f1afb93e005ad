"""Checkpoints in and out: our safetensors + ``config.json`` directories, and Hugging Face GPT-2.

Our checkpoint is a Hugging Face GPT-2 directory whose ``config.json`` carries the family's
fields under ``"mtpkern"`` (``GPT2Config.to_hf_dict``), so a GPT-2 we write loads in
``transformers`` too; ``SpeculativeLM.save_pretrained`` writes it. ``load_model`` reads either
kind, and ``to_hf`` turns a ``GPT2`` into a ``transformers`` model (parity checks, baselines).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from mtpkern.calibration import attach_calibration
from mtpkern.checkpoint import CheckpointError, is_local, require_file, resolve_checkpoint
from mtpkern.config import CONFIG_NAME, WEIGHTS_NAME, GPT2Config
from mtpkern.models import GPT2, MODEL_CLASSES, MedusaModel, SpeculativeLM
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


def to_hf(model: GPT2):
    """The same weights as a transformers GPT2LMHeadModel (for parity checks and baselines)."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    if not isinstance(model, GPT2):
        raise TypeError(f"to_hf takes a GPT2, got {type(model).__name__}; pass model.base for MEDUSA")
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
               expect: type[SpeculativeLM] = SpeculativeLM) -> SpeculativeLM:
    """Load any model of the family from a directory written by ``save_pretrained`` (or the run
    directory of ``mtpkern train`` that holds it), or a Hugging Face GPT-2 checkpoint (directory
    or hub name) as a ``GPT2``. A bad config is a ``CheckpointError`` naming the file and field.
    ``calibration``: attach the directory's ``calibration.json`` as ``model.calibration`` (checked
    against the weights; see ``mtpkern.calibrate``), or ignore it (False). ``dtype``: a floating
    ``torch.dtype``, or a name as the CLI takes it (``"bfloat16"``, ``"bf16"``, ...); None keeps
    float32. ``expect``: the class the caller needs (``GPT2``, ``MTPModel``, ``MedusaModel``); a
    checkpoint of another kind is a ``CheckpointError`` that names both."""
    model = _load_any(name_or_dir, device=device, dtype=dtype, calibration=calibration)
    if not isinstance(model, expect):
        raise CheckpointError(f"{name_or_dir!r} holds a {type(model).__name__}, not a {expect.__name__}")
    return model


def _load_any(name_or_dir, *, device, dtype, calibration: bool) -> SpeculativeLM:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        dtype = resolve_dtype(dtype)  # a name; anything else is a one-line ValueError
    if is_local(name_or_dir):
        path = resolve_checkpoint(name_or_dir)[0]
        cfg_file = require_file(path, CONFIG_NAME)
        try:
            raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{cfg_file} must hold a JSON object, got {type(raw).__name__}")
        try:  # checked here so a bad field is named, not reported from deep inside transformers
            GPT2Config.from_hf_dict(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{cfg_file} is not a valid config: {e}") from None
        if "mtpkern" in raw:
            return _load_ours(path, raw, device=device, dtype=dtype, calibration=calibration)
        name_or_dir = path
    return _load_hf_gpt2(name_or_dir, device=device, dtype=dtype)


def _load_ours(path: Path, raw: dict, *, device, dtype, calibration: bool = True) -> SpeculativeLM:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        cfg = GPT2Config.from_hf_dict(raw)
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
