"""GGUF files of the Llama family (llama.cpp's format): checked, then dequantised to fp32.

``check_gguf`` reads the header alone (the ``gguf`` package's memory-mapped reader: no tensor
data) and refuses, in one line naming the file, an architecture other than llama / mistral /
qwen2 or a tensor type that ``gguf`` cannot dequantise. ``read_gguf`` then lets transformers
dequantise the file into its own model (``from_pretrained(dir, gguf_file=...)``) and returns
its config dict and state dict, which ``mtpkern.hf_io`` maps onto ours. ``gguf`` is an optional
dependency (the ``real`` extra); without it a GGUF is a one-line error saying how to install it.
"""

from __future__ import annotations

from pathlib import Path

from mtpkern.checkpoint import CheckpointError

GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
PLAIN_TYPES = ("F32", "F16", "BF16")
MISSING = "reading a .gguf file needs the gguf package: pip install gguf (or pip install 'mtpkern[real]')"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError(MISSING) from None
    return gguf


def check_gguf(path: Path) -> str:
    """The file's architecture, after the checks above (header only)."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from None
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[-1]).decode() if field is not None else None
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported "
                              f"(the Llama family: {', '.join(GGUF_ARCHITECTURES)})")
    known = set(PLAIN_TYPES) | {t.name for t in gguf.quants._type_traits}
    bad = sorted({t.tensor_type.name for t in reader.tensors} - known)
    if bad:
        raise CheckpointError(f"{path}: GGUF tensor type(s) {', '.join(bad)} are not supported "
                              f"(the float types and the quantisations the gguf package dequantises)")
    return arch


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(transformers config dict, transformers state dict in fp32) of a checked GGUF file."""
    check_gguf(path)
    import torch
    from transformers import AutoModelForCausalLM

    try:
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; name the file
        raise CheckpointError(f"{path}: transformers could not read this GGUF: {e}") from None
    return hf.config.to_dict(), hf.state_dict()
