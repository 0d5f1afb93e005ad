"""mtpkern: multi-token prediction, MEDUSA heads and speculative decoding kernels for GPT-2."""

from mtpkern.checkpoint import CheckpointError
from mtpkern.config import GPT2Config
from mtpkern.hf_io import load_model, to_hf
from mtpkern.layers import Attn, KVCache
from mtpkern.models import GPT2, MedusaModel, MTPModel, SpeculativeLM
from mtpkern.tree import MC_SIM_7B_63, Tree

# `mtpkern.generate(...)` is the engine's entry point; the module stays importable as
# `from mtpkern.generate import ...`.
from mtpkern.decoder import Decoder, GenerationResult  # noqa: E402  isort: skip
from mtpkern.generate import generate  # noqa: E402  isort: skip
from mtpkern.batch import BatchDecoder  # noqa: E402  isort: skip

__version__ = "0.1.0"

__all__ = [
    "GPT2", "GPT2Config", "MTPModel", "MedusaModel", "SpeculativeLM", "KVCache", "Attn", "load_model", "to_hf",
    "CheckpointError", "Tree", "MC_SIM_7B_63", "generate", "GenerationResult", "Decoder",
    "BatchDecoder",
]
