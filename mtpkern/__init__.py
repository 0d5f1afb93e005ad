"""mtpkern: multi-token prediction, MEDUSA heads and speculative decoding kernels for GPT-2."""

__version__ = "0.1.0"
