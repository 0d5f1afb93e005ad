"""mtpkern: multi-token prediction, MEDUSA heads and speculative decoding kernels for GPT-2."""

from mtpkern.checkpoint import CheckpointError
from mtpkern.model import GPT2, Attn, GPT2Config, KVCache, MedusaModel, MTPModel, load_model, to_hf
from mtpkern.tree import MC_SIM_7B_63, Tree

# `mtpkern.generate(...)` is the engine's entry point; the module stays importable as
# `from mtpkern.generate import ...`.
from mtpkern.decoder import Decoder, GenerationResult  # noqa: E402  isort: skip
from mtpkern.generate import generate  # noqa: E402  isort: skip
from mtpkern.batch import BatchDecoder  # noqa: E402  isort: skip

__version__ = "0.1.0"

__all__ = [
    "GPT2", "GPT2Config", "MTPModel", "MedusaModel", "KVCache", "Attn", "load_model", "to_hf",
    "CheckpointError", "Tree", "MC_SIM_7B_63", "generate", "GenerationResult", "Decoder",
    "BatchDecoder",
]
