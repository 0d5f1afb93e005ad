"""mtpkern: multi-token prediction, MEDUSA heads and speculative decoding kernels for GPT-2."""

from mtpkern.checkpoint import CheckpointError
from mtpkern.config import GPT2Config, LlamaConfig
from mtpkern.data import format_prompt, load_tokenizer
from mtpkern.hf_io import load_model, to_hf
from mtpkern.heads_io import export_heads
from mtpkern.layers import Attn, KVCache
from mtpkern.models import GPT2, Llama, MedusaModel, MTPModel, SpeculativeLM
from mtpkern.tree import MC_SIM_7B_63, Tree

from mtpkern.options import DecodeOptions
from mtpkern.inputs import GenerationResult
from mtpkern.decoder import Decoder
from mtpkern.batch import BatchDecoder
from mtpkern.autotree import auto_tree
from mtpkern.generation import generate

__version__ = "0.1.0"

__all__ = [
    "GPT2", "GPT2Config", "Llama", "LlamaConfig", "MTPModel", "MedusaModel", "SpeculativeLM", "KVCache", "Attn",
    "load_model", "to_hf", "export_heads",
    "CheckpointError", "Tree", "MC_SIM_7B_63", "generate", "GenerationResult", "Decoder",
    "BatchDecoder", "DecodeOptions", "auto_tree", "load_tokenizer", "format_prompt",
]
