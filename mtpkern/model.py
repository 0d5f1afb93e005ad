"""One GPT-2 model family: the base model, MTP heads and MEDUSA-1 heads.

Every model maps tokens to J prediction heads; head j at position t predicts token
t + j + 1. For ``GPT2`` J = 1. For ``MTPModel`` (Gloeckle et al. 2024) the heads are
transformer blocks on a shared trunk. For ``MedusaModel`` (Cai et al. 2024) head 0 is the
frozen base model and heads 1..n are MEDUSA's residual blocks, so MEDUSA head k (0-based)
predicts token t + k + 2. All heads share one final LayerNorm and the tied unembedding
(MEDUSA heads may have their own projection).

The forward pass serves both training (causal SDPA over the whole sequence) and decoding:
a preallocated static KV cache written at explicit slots, explicit position ids and an
arbitrary boolean mask over cache + new tokens (tree verification), or the packed tree mask
of the fused tree-attention kernel.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtpkern.calibration import attach_calibration
from mtpkern.checkpoint import CheckpointError, atomic_directory, is_local, require_file, resolve_checkpoint
from mtpkern.runtime import resolve_dtype

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_TYPES = ("gpt2", "mtp", "medusa")


# ----------------------------------------------------------------------------- config


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
    n_heads: int = 1  # mtp: transformer-block heads (head 0 included); medusa: MEDUSA heads
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
                "model_type": self.model_type,
                "n_heads": self.n_heads,
                "medusa_layers": self.medusa_layers,
                "medusa_proj": self.medusa_proj,
            },
        }

    @classmethod
    def from_hf_dict(cls, d: dict) -> GPT2Config:
        """Read a Hugging Face GPT-2 config dict; reject variants this implementation lacks."""
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
            **{k: v for k, v in extra.items() if k in ("model_type", "n_heads", "medusa_layers", "medusa_proj")},
        )


_FIELD_KINDS = {"vocab_size": int, "n_positions": int, "n_embd": int, "n_layer": int, "n_head": int,
                "layer_norm_epsilon": float, "bos_token_id": int, "eos_token_id": int, "model_type": str,
                "n_heads": int, "medusa_layers": int, "medusa_proj": bool}


# ----------------------------------------------------------------------------- decoding state


class KVCache:
    """One preallocated K and V tensor for all layers: [n_layers, B, H, max_len, head_dim].

    Slots are written at explicit indices by the forward pass; nothing here grows.
    """

    def __init__(self, n_layers, batch, n_head, max_len, head_dim, *, dtype, device):
        shape = (n_layers, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self):
        self.k.zero_()
        self.v.zero_()


@dataclass
class Attn:
    """How the new tokens attend during decoding.

    cache: the static KV cache; the new tokens' K/V are written at ``slots`` (int64 [T], or
        [B, T]: each batch row's own slots; then ``prefix_len`` is [B] with fused kernels).
    mask: bool [T, S'] over the first S' cache slots (True = attend), or [B, 1, T, S'] per row;
        eager attention.
    tree_mask / prefix_len: the fused kernels' inputs instead of ``mask``: every slot below
        ``prefix_len`` is visible, and tree token i sees tree token j (at slot prefix_len + j)
        iff bit j of row i of the packed int32 mask is set. With them every block runs its
        fused decode layer (``Block.fused_decode``), the path of ``kernels="fused"``.
    weights: with ``mask`` and no autograd, each block's tensors by cache layer
        (``_Family.decode_weights()``): the blocks then run as plain functions of them
        (``decode_block``), the same maths as ``Block.forward`` without a module call per
        layer. On a CPU a small model's step costs its op and call count, and this path is
        25-40% faster per block (the engine's CPU path: ``mtpkern.decoder``).
    """

    cache: KVCache
    slots: torch.Tensor
    mask: torch.Tensor | None = None
    tree_mask: torch.Tensor | None = None
    prefix_len: torch.Tensor | None = None
    weights: list | None = None


class ModelOutput(NamedTuple):
    hidden: torch.Tensor  # [B, T', J, D]: what each head multiplies with its unembedding
    logits: torch.Tensor | None  # [B, T', J, V], float


# ----------------------------------------------------------------------------- layers


def write_kv(attn: Attn, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """New tokens' K and V [B, H, T, Dh] into cache layer ``layer`` at ``attn.slots``; returns that
    layer's (K, V) caches [B, H, S, Dh]."""
    kc, vc = attn.cache.k[layer], attn.cache.v[layer]
    if attn.slots.dim() == 2:  # per-row slots [B, T] (batched decoding: rows drift apart)
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        kc[rows, :, attn.slots] = k.transpose(1, 2)
        vc[rows, :, attn.slots] = v.transpose(1, 2)
    else:
        kc.index_copy_(2, attn.slots, k)
        vc.index_copy_(2, attn.slots, v)
    return kc, vc


class SelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, attn: Attn | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if attn is None:
            # Training / scoring: causal over the whole sequence. Padding is on the right and
            # never changes causality (the loss ignores it).
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            kc, vc = write_kv(attn, layer, k, v)
            if attn.tree_mask is not None:
                from mtpkern.ops.tree_attention import tree_attention

                assert attn.prefix_len is not None, "Attn: a tree_mask needs its prefix_len"
                y = tree_attention(q, kc, vc, attn.prefix_len, attn.tree_mask)
            else:
                assert attn.mask is not None, "Attn: eager attention needs a mask"
                s = attn.mask.shape[-1]
                y = F.scaled_dot_product_attention(q, kc[:, :, :s], vc[:, :, :s], attn_mask=attn.mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, attn: Attn | None = None, layer: int = 0):
        if attn is not None and attn.tree_mask is not None:
            return self.fused_decode(x, attn, layer)
        x = x + self.attn(self.ln_1(x), attn, layer)
        return x + self.mlp(self.ln_2(x))

    def fused_decode(self, x, attn: Attn, layer: int):
        """This block on the decode path in four fused kernels (see ``docs/decode_step.md``);
        the same maths as ``forward``."""
        from mtpkern.ops import linear_residual, ln_fc_gelu, ln_qkv, tree_attention_proj

        a, m = self.attn, self.mlp
        B, T, C = x.shape
        assert attn.tree_mask is not None and attn.prefix_len is not None, "Attn: fused decoding needs both"
        kc, vc = attn.cache.k[layer], attn.cache.v[layer]
        q = ln_qkv(x, self.ln_1.weight, self.ln_1.bias, a.c_attn.weight, a.c_attn.bias, kc, vc, attn.slots,
                   eps=self.ln_1.eps)
        x = tree_attention_proj(q.view(B, T, a.n_head, C // a.n_head).transpose(1, 2), kc, vc, attn.prefix_len,
                                attn.tree_mask, a.c_proj.weight, a.c_proj.bias, x)
        h = ln_fc_gelu(x, self.ln_2.weight, self.ln_2.bias, m.c_fc.weight, m.c_fc.bias, eps=self.ln_2.eps)
        return linear_residual(h, m.c_proj.weight, m.c_proj.bias, x)


class DecodeWeights(NamedTuple):
    """A ``Block``'s tensors as ``decode_block`` reads them: the matrices transposed, [in, out],
    as views of the parameters (no copy: in-place updates show through) or as contiguous
    copies (``contiguous=True``: the layout a CPU's BLAS multiplies fastest at a few rows)."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv_wt: torch.Tensor
    qkv_b: torch.Tensor
    o_wt: torch.Tensor
    o_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc_wt: torch.Tensor
    fc_b: torch.Tensor
    proj_wt: torch.Tensor
    proj_b: torch.Tensor
    n_head: int
    eps: float

    @classmethod
    def of(cls, block: Block, contiguous: bool = False) -> DecodeWeights:
        a, m = block.attn, block.mlp

        def t(w):
            w = w.detach().t()
            return w.contiguous() if contiguous else w

        return cls(block.ln_1.weight, block.ln_1.bias, t(a.c_attn.weight), a.c_attn.bias, t(a.c_proj.weight),
                   a.c_proj.bias, block.ln_2.weight, block.ln_2.bias, t(m.c_fc.weight), m.c_fc.bias,
                   t(m.c_proj.weight), m.c_proj.bias, a.n_head, block.ln_1.eps)


def decode_block(x: torch.Tensor, w: DecodeWeights, attn: Attn, layer: int) -> torch.Tensor:
    """``Block.forward(x, attn, layer)`` on the decode path (x [B, T, D], a dense mask), as a
    function of the block's tensors: 13 ops and no module calls (one more per cache write with
    slots per batch row)."""
    B, T, D = x.shape
    x = x.reshape(B * T, D)
    qkv = torch.addmm(w.qkv_b, F.layer_norm(x, (D,), w.ln1_w, w.ln1_b, w.eps), w.qkv_wt)
    q, k, v = qkv.view(B, T, 3, w.n_head, D // w.n_head).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, Dh]
    kc, vc = write_kv(attn, layer, k, v)
    assert attn.mask is not None, "Attn: decode_block needs a mask"
    s = attn.mask.shape[-1]
    y = F.scaled_dot_product_attention(q, kc[:, :, :s], vc[:, :, :s], attn_mask=attn.mask)
    x = torch.addmm(x + w.o_b, y.transpose(1, 2).reshape(B * T, D), w.o_wt)
    h = F.gelu(torch.addmm(w.fc_b, F.layer_norm(x, (D,), w.ln2_w, w.ln2_b, w.eps), w.fc_wt), approximate="tanh")
    return torch.addmm(x + w.proj_b, h, w.proj_wt).view(B, T, D)


class ResBlock(nn.Module):
    """MEDUSA's head block: x + SiLU(W x + b). W and b start at zero, so a new head is the
    identity and first predicts what the base predicts."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + F.silu(self.linear(x))


# ----------------------------------------------------------------------------- the family


class _Family(nn.Module):
    """What the trainer and the decoding engine rely on, for every model of the family."""

    config: GPT2Config
    gradient_checkpointing: bool = False
    calibration = None  # head acceptance (mtpkern.calibration.Calibration), attached by load_model
    # Set by each model (MEDUSA: its base's token embedding; it overrides ``final_norm`` and
    # never calls ``embed``, which read the other two).
    wte: nn.Embedding
    wpe: nn.Embedding
    ln_f: nn.LayerNorm

    # number of prediction heads J; head j predicts token t + j + 1
    @property
    def n_heads(self) -> int:
        raise NotImplementedError

    # number of layers with a KV cache
    @property
    def n_cache_layers(self) -> int:
        raise NotImplementedError

    @property
    def unembed_weight(self) -> torch.Tensor:
        """The shared unembedding [V, D] (the tied token embedding)."""
        return self.wte.weight

    def head_weight(self, j: int) -> torch.Tensor:
        """The unembedding [V, D] of head j."""
        return self.unembed_weight

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def new_cache(self, batch: int, max_len: int, *, dtype=None, device=None) -> KVCache:
        cfg = self.config
        if max_len > cfg.n_positions:
            raise ValueError(f"a cache of {max_len} slots exceeds the model's context of {cfg.n_positions}")
        return KVCache(
            self.n_cache_layers, batch, cfg.n_head, max_len, cfg.head_dim,
            dtype=dtype or self.dtype, device=device or self.device,
        )

    def embed(self, idx: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        T = idx.shape[1]
        if pos is None:
            if T > self.config.n_positions:
                raise ValueError(
                    f"sequence of {T} tokens exceeds the model's context of {self.config.n_positions}"
                )
            pos = torch.arange(T, device=idx.device)
        return self.wte(idx) + self.wpe(pos)

    def cache_blocks(self) -> list[Block]:
        """The transformer blocks in KV-cache layer order."""
        raise NotImplementedError

    def decode_weights(self, contiguous: bool = False) -> list[DecodeWeights]:
        """Every cache layer's block tensors for ``Attn.weights``: build them again after a
        parameter is replaced (``.to()``, ``load_state_dict(assign=True)``), and, with
        ``contiguous`` copies, after it changes in place."""
        return [DecodeWeights.of(b, contiguous) for b in self.cache_blocks()]

    def _blocks(self, blocks, x, attn: Attn | None, first_layer: int):
        if attn is not None and attn.weights is not None and attn.mask is not None and not torch.is_grad_enabled():
            for i in range(len(blocks)):
                x = decode_block(x, attn.weights[first_layer + i], attn, first_layer + i)
            return x
        for i, block in enumerate(blocks):
            if self.gradient_checkpointing and self.training and attn is None:
                x = torch.utils.checkpoint.checkpoint(block, x, None, first_layer + i, use_reentrant=False)
            else:
                x = block(x, attn, first_layer + i)
        return x

    # -- the decoding engine's split of a step (mtpkern.decoder) ----------------------
    #
    # A speculative step verifies T tree tokens with head 0 alone (``decode_hidden``), then
    # runs the draft heads only where the next drafts come from (``draft_hidden``): MEDUSA's
    # heads on the last accepted node, MTP's head blocks on the accepted path (their KV
    # caches need every accepted position, never a rejected one).

    draft_on_path = False  # whether draft_hidden needs the whole accepted path (its KV caches)

    def decode_hidden(self, idx, pos, attn: Attn, *, final_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(head 0's hidden states [B, T, D], the carry ``draft_hidden`` starts from [B, T, D]).
        ``final_norm=False``: head 0's states before ``self.final_norm``, for a logits kernel
        that applies the norm in its prologue (``fused_logits(norm_weight=...)``)."""
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.LayerNorm:
        """The LayerNorm between head 0's last block and the unembedding."""
        return self.ln_f

    def draft_hidden(self, carry: torch.Tensor, n: int, attn: Attn | None = None,
                     row: torch.Tensor | None = None) -> torch.Tensor:
        """Draft heads 1..n's hidden states [n, D] at row ``row`` (a 0-d index; default the last)
        of the carry rows [1, R, D]. MTP's head blocks also write their K/V for every row, at
        cache slots ``attn.slots``."""
        return carry.new_zeros(0, carry.shape[2])

    def _stacked(self, key: str, groups, derive=None) -> list[torch.Tensor]:
        """``[torch.stack(g) for g in groups()]`` (each ``(tensors, transpose)``), passed through
        ``derive`` when given, kept between calls and refreshed in place when a parameter
        changes (its version or storage), so that a CUDA graph that captured them keeps reading
        the right memory. The check walks the kept tensors, not the modules: a few microseconds
        per call."""
        cache = self.__dict__.setdefault("_stacked_cache", {})
        hit = cache.get(key)
        # Inference tensors keep no version counter: their storage alone identifies them.
        stamp = lambda ts: [(t.data_ptr(), None if t.is_inference() else t._version) for t in ts]  # noqa: E731
        if hit is not None and stamp(hit[0]) == hit[1]:
            return hit[2]
        spec = groups()
        sources = [t for tensors, _ in spec for t in tensors]
        with torch.no_grad():
            fresh = [torch.stack([t.detach().T if tr else t.detach() for t in tensors]) for tensors, tr in spec]
            if derive is not None:
                fresh = [t.contiguous() for t in derive(*fresh)]
        if hit is not None and (torch.is_inference_mode_enabled() or not any(x.is_inference() for x in hit[2])):
            if [(x.shape, x.dtype, x.device) for x in hit[2]] == [(x.shape, x.dtype, x.device) for x in fresh]:
                with torch.no_grad():
                    for old, new in zip(hit[2], fresh):
                        old.copy_(new)
                fresh = hit[2]
        cache[key] = (sources, stamp(sources), fresh)
        return fresh

    def head_logits(self, hidden: torch.Tensor, j: int) -> torch.Tensor:
        """Head j's float logits [..., V] from its hidden states [..., D]."""
        return (hidden @ self.head_weight(j).T).float()

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., J, D] -> [..., J, V] float logits."""
        J = hidden.shape[-2]
        if all(self.head_weight(j) is self.unembed_weight for j in range(J)):
            return (hidden @ self.unembed_weight.T).float()
        return torch.stack([self.head_logits(hidden[..., j, :], j) for j in range(J)], dim=-2)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- persistence -----------------------------------------------------------------

    def save_pretrained(self, directory, tokenizer=None) -> None:
        """Write safetensors + config.json (+ the tokenizer) atomically into ``directory``."""
        with atomic_directory(directory) as tmp:
            self.write_files(tmp, tokenizer)

    def write_files(self, directory, tokenizer=None) -> None:
        """Write the checkpoint files into an existing directory (not atomic on its own: for
        callers that publish a larger checkpoint with ``atomic_directory`` themselves)."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_hf_dict(), f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, name_or_dir, *, device=None, dtype=None):
        model = load_model(name_or_dir, device=device, dtype=dtype)
        if not isinstance(model, cls):
            raise CheckpointError(
                f"{name_or_dir!r} holds a {type(model).__name__}, not a {cls.__name__}; use mtpkern.load_model"
            )
        return model


class GPT2(_Family):
    """GPT-2 (Radford et al. 2019) with tied embeddings, matching transformers' GPT2LMHeadModel."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.apply(_init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @property
    def n_heads(self) -> int:
        return 1

    @property
    def n_cache_layers(self) -> int:
        return self.config.n_layer

    def cache_blocks(self) -> list[Block]:
        return cast("list[Block]", list(self.h))  # nn.ModuleList types its items as Module

    def hidden_states(self, idx, pos=None, attn: Attn | None = None, final_norm: bool = True) -> torch.Tensor:
        """The final-normalised hidden states [B, T, D] (before the norm with ``final_norm=False``)."""
        x = self._blocks(self.h, self.embed(idx, pos), attn, 0)
        return self.ln_f(x) if final_norm else x

    def decode_hidden(self, idx, pos, attn: Attn, *, final_norm: bool = True):
        h = self.hidden_states(idx, pos, attn, final_norm)
        return h, h

    def forward(self, idx, pos=None, *, attn: Attn | None = None, heads: int | None = None,
                select: torch.Tensor | None = None, logits: bool = True) -> ModelOutput:
        h = self.hidden_states(idx, pos, attn)
        if select is not None:
            h = h.index_select(1, select)
        h = h.unsqueeze(2)
        return ModelOutput(h, self.unembed(h) if logits else None)


class MTPModel(_Family):
    """Multi-token prediction (Gloeckle et al. 2024): a shared trunk of L-1 blocks and n
    transformer-block heads; head k predicts token t + k + 1. One shared final norm and
    unembedding. Head k's block uses KV-cache layer (L - 1) + k."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        if config.model_type != "mtp":
            config = _replace(config, model_type="mtp")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.trunk = nn.ModuleList(Block(config) for _ in range(config.n_layer - 1))
        self.heads = nn.ModuleList(Block(config) for _ in range(config.n_heads))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.apply(_init_weights)

    @classmethod
    def from_base(cls, base: GPT2, n_heads: int = 4) -> MTPModel:
        """Trunk = the base's first L-1 blocks, head 0 = its last block, heads 1..n-1 start as
        copies of it: at initialisation head 0 reproduces the base exactly."""
        cfg = _replace(base.config, model_type="mtp", n_heads=n_heads)
        model = cls(cfg).to(device=base.device, dtype=base.dtype)
        L = base.config.n_layer
        model.wte.load_state_dict(base.wte.state_dict())
        model.wpe.load_state_dict(base.wpe.state_dict())
        model.ln_f.load_state_dict(base.ln_f.state_dict())
        for i in range(L - 1):
            model.trunk[i].load_state_dict(base.h[i].state_dict())
        for k in range(n_heads):
            model.heads[k].load_state_dict(base.h[L - 1].state_dict())
        return model

    @property
    def n_heads(self) -> int:
        return self.config.n_heads

    @property
    def n_cache_layers(self) -> int:
        return self.config.n_layer - 1 + self.config.n_heads

    def cache_blocks(self) -> list[Block]:
        return [*self.trunk, *self.heads]

    def trunk_forward(self, idx, pos=None, attn: Attn | None = None) -> torch.Tensor:
        """The shared trunk's output [B, T, D] (not normalised)."""
        return self._blocks(self.trunk, self.embed(idx, pos), attn, 0)

    def head_forward(self, k: int, h: torch.Tensor, attn: Attn | None = None, final_norm: bool = True) -> torch.Tensor:
        """Head k on the trunk output: the final-normalised hidden states [B, T, D] (before the
        norm with ``final_norm=False``)."""
        first = self.config.n_layer - 1 + k
        x = self._blocks(self.heads[k : k + 1], h, attn, first)
        return self.ln_f(x) if final_norm else x

    draft_on_path = True

    def decode_hidden(self, idx, pos, attn: Attn, *, final_norm: bool = True):
        h = self.trunk_forward(idx, pos, attn)
        return self.head_forward(0, h, attn, final_norm), h

    def draft_hidden(self, carry, n, attn=None, row=None):
        """Heads 1..n over the accepted path's trunk outputs: every row's K/V into the heads'
        caches, the rest of each block at ``row`` alone. With eager attention the n head blocks
        run as one batch (stacked weights, one op where n blocks would take n: on a CPU a block
        costs its op count); the fused kernels run them one by one."""
        if n == 0:
            return super().draft_hidden(carry, 0)
        row = (torch.full((), carry.shape[1] - 1, device=carry.device) if row is None else row).view(1)
        if attn.tree_mask is not None:
            return torch.cat([self.head_forward(k, carry, attn)[0].index_select(0, row) for k in range(1, n + 1)])
        return self._grouped_heads(carry, 1, n, attn, row)[:, 0]

    def decode_heads(self, idx, pos, attn: Attn, n: int) -> torch.Tensor:
        """Heads 0..n at every position at once, final-normed [1 + n, T, D] (eager attention,
        one sequence): the trunk, then the n + 1 head blocks as one batch over the same rows
        (their K/V into their caches at ``attn.slots``, under the same mask). A speculative step
        that verifies with head 0 gets the next drafts from the same pass, at the last accepted
        node: no second pass of the draft heads over the accepted path (the K/V of rejected
        nodes are moved away or overwritten like the trunk's, ``kv_compact_`` moves every layer)."""
        return self._grouped_heads(self.trunk_forward(idx, pos, attn), 0, n + 1, attn, None)

    def _grouped_heads(self, x: torch.Tensor, first_head: int, n: int, attn: Attn,
                       row: torch.Tensor | None) -> torch.Tensor:
        """Blocks heads[first_head .. first_head + n - 1] on the same input x [1, R, D] at once:
        K/V of every row into the cache, the states [n, 1, D] (final-normed) of ``row`` [1], or of
        every row [n, R, D] when ``row`` is None. Each LayerNorm's affine is folded into the
        projection after it (W diag(g) and b + W beta, kept with the stacked weights)."""
        R, D = x.shape[1], x.shape[2]
        H, eps = self.config.n_head, self.config.layer_norm_epsilon
        first = self.config.n_layer - 1 + first_head  # cache layer of the first head

        def groups():
            heads = list(self.heads[first_head : first_head + n])
            return [([get(b) for b in heads], t) for get, t in (
                (lambda b: b.ln_1.weight, False), (lambda b: b.ln_1.bias, False),
                (lambda b: b.attn.c_attn.weight, True), (lambda b: b.attn.c_attn.bias, False),
                (lambda b: b.attn.c_proj.weight, True), (lambda b: b.attn.c_proj.bias, False),
                (lambda b: b.ln_2.weight, False), (lambda b: b.ln_2.bias, False),
                (lambda b: b.mlp.c_fc.weight, True), (lambda b: b.mlp.c_fc.bias, False),
                (lambda b: b.mlp.c_proj.weight, True), (lambda b: b.mlp.c_proj.bias, False))]

        def fold(ln1w, ln1b, qkvw, qkvb, ow, ob, ln2w, ln2b, fcw, fcb, pw, pb):
            # (norm(x) g + beta) Wt + b = norm(x) (g[:, None] Wt) + (beta Wt + b)
            return (ln1w[:, :, None] * qkvw, (ln1b[:, None] @ qkvw) + qkvb[:, None], ow, ob[:, None],
                    ln2w[:, :, None] * fcw, (ln2b[:, None] @ fcw) + fcb[:, None], pw, pb[:, None])

        qkvw, qkvb, ow, ob, fcw, fcb, pw, pb = self._stacked(f"mtp{first_head}:{n}", groups, fold)
        qkv = torch.baddbmm(qkvb, F.layer_norm(x, (D,), eps=eps).expand(n, R, D), qkvw)
        q, k, v = (t.reshape(n, R, H, D // H).transpose(1, 2) for t in qkv.split(D, dim=2))
        kc, vc = attn.cache.k[first : first + n, 0], attn.cache.v[first : first + n, 0]
        kc.index_copy_(2, attn.slots, k)
        vc.index_copy_(2, attn.slots, v)
        assert attn.mask is not None, "Attn: the grouped heads need a mask (eager attention)"
        s = attn.mask.shape[-1]
        if row is None:
            y = F.scaled_dot_product_attention(q, kc[:, :, :s], vc[:, :, :s], attn_mask=attn.mask)  # [n, H, R, Dh]
            x = x + torch.baddbmm(ob, y.transpose(1, 2).reshape(n, R, D), ow)
        else:
            y = F.scaled_dot_product_attention(q.index_select(2, row), kc[:, :, :s], vc[:, :, :s],
                                               attn_mask=attn.mask.index_select(0, row))  # [n, H, 1, Dh]
            x = x.index_select(1, row) + torch.baddbmm(ob, y.transpose(1, 2).reshape(n, 1, D), ow)
        h = F.gelu(torch.baddbmm(fcb, F.layer_norm(x, (D,), eps=eps), fcw), approximate="tanh")
        return self.ln_f(x + torch.baddbmm(pb, h, pw))

    def forward(self, idx, pos=None, *, attn: Attn | None = None, heads: int | None = None,
                select: torch.Tensor | None = None, logits: bool = True) -> ModelOutput:
        heads = self.n_heads if heads is None else heads
        h = self.trunk_forward(idx, pos, attn)
        outs = []
        for k in range(heads):
            o = self.head_forward(k, h, attn)  # every position: the head's KV cache needs them all
            outs.append(o if select is None else o.index_select(1, select))
        hs = torch.stack(outs, dim=2)
        return ModelOutput(hs, self.unembed(hs) if logits else None)


class MedusaHead(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.blocks = nn.Sequential(*(ResBlock(config.n_embd) for _ in range(config.medusa_layers)))
        self.proj = nn.Linear(config.n_embd, config.vocab_size, bias=False) if config.medusa_proj else None

    def forward(self, x):
        return self.blocks(x)


class MedusaModel(_Family):
    """MEDUSA (Cai et al. 2024): a base GPT-2 plus n residual-block heads on its final hidden
    state; the base is frozen (MEDUSA-1) unless a MEDUSA-2 training unfreezes it. Head 0 is the base (token t + 1); MEDUSA head k (0-based) is head k + 1 and
    predicts token t + k + 2."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        if config.model_type != "medusa":
            config = _replace(config, model_type="medusa")
        self.config = config
        self.base = GPT2(_replace(config, model_type="gpt2", n_heads=1))
        self.medusa = nn.ModuleList(MedusaHead(config) for _ in range(config.n_heads))
        self.freeze_base()

    @classmethod
    def from_base(cls, base: GPT2, n_heads: int = 5, n_layers: int = 1, proj: bool = False) -> MedusaModel:
        cfg = _replace(base.config, model_type="medusa", n_heads=n_heads, medusa_layers=n_layers, medusa_proj=proj)
        model = cls(cfg).to(device=base.device, dtype=base.dtype)
        model.base.load_state_dict(base.state_dict())
        for head in cast("Iterable[MedusaHead]", model.medusa):  # nn.ModuleList types its items as Module
            if head.proj is not None:  # MEDUSA initialises a head's projection from the LM head
                head.proj.weight.data.copy_(base.unembed_weight.data)
        model.freeze_base()
        return model

    def freeze_base(self):
        for p in self.base.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not any(p.requires_grad for p in self.base.parameters()):
            self.base.eval()  # frozen (MEDUSA-1): never in training mode; MEDUSA-2 trains it
        return self

    @property
    def wte(self) -> nn.Embedding:  # type: ignore[override]  # read-only: the base owns the embedding
        return self.base.wte

    @property
    def n_heads(self) -> int:
        return 1 + self.config.n_heads

    @property
    def n_cache_layers(self) -> int:
        return self.config.n_layer

    def cache_blocks(self) -> list[Block]:
        return cast("list[Block]", list(self.base.h))  # nn.ModuleList types its items as Module

    def head_weight(self, j: int) -> torch.Tensor:
        proj = None if j == 0 else cast(MedusaHead, self.medusa[j - 1]).proj  # ModuleList items are typed Module
        return self.unembed_weight if proj is None else proj.weight

    def decode_hidden(self, idx, pos, attn: Attn, *, final_norm: bool = True):
        h = self.base.hidden_states(idx, pos, attn, final_norm)
        return h, h

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.base.ln_f

    def draft_hidden(self, carry, n, attn=None, row=None):
        """MEDUSA heads 1..n at one row of [1, R, D] at once: each residual layer is one batched
        matmul over the heads' stacked weights, [n, D]."""
        if n == 0:
            return super().draft_hidden(carry, 0)
        carry = carry[:, -1:] if row is None else carry.index_select(1, row.view(1))
        return self.heads_at(carry[0], n)[:, 0]

    def head_stack(self, n: int) -> list[torch.Tensor]:
        """Heads 1..n's residual layers as stacked (transposed weight [n, D, D], bias [n, D]) pairs,
        layer by layer, kept and refreshed in place when a parameter changes (``_stacked``)."""
        def groups():
            heads = cast("Iterable[MedusaHead]", self.medusa[:n])  # nn.ModuleList types its items as Module
            lin = [[cast(ResBlock, head.blocks[i]).linear for head in heads] for i in range(self.config.medusa_layers)]
            return [g for layer in lin for g in (([m.weight for m in layer], True), ([m.bias for m in layer], False))]

        return self._stacked(f"medusa{n}", groups)

    def heads_at(self, h: torch.Tensor, n: int, stacked: list[torch.Tensor] | None = None) -> torch.Tensor:
        """MEDUSA heads 1..n at every row of h [R, D] (final-normed): [n, R, D]. ``stacked``:
        ``head_stack(n)`` fetched by the caller (the decoder, once per generation)."""
        stacked = self.head_stack(n) if stacked is None else stacked
        x = h[None].expand(n, -1, -1)
        for w, b in zip(stacked[0::2], stacked[1::2]):
            x = x + F.silu(torch.baddbmm(b[:, None], x, w))
        return x

    def forward(self, idx, pos=None, *, attn: Attn | None = None, heads: int | None = None,
                select: torch.Tensor | None = None, logits: bool = True) -> ModelOutput:
        heads = self.n_heads if heads is None else heads
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.base.parameters())):
            h0 = self.base.hidden_states(idx, pos, attn)
        if select is not None:
            h0 = h0.index_select(1, select)
        hs = torch.stack([h0] + [self.medusa[k](h0) for k in range(heads - 1)], dim=2)
        return ModelOutput(hs, self.unembed(hs) if logits else None)


# ----------------------------------------------------------------------------- helpers


def _init_weights(module: nn.Module):
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def _replace(cfg: GPT2Config, **changes) -> GPT2Config:
    d = cfg.to_dict()
    d.update(changes)
    return GPT2Config(**d)


MODEL_CLASSES = {"gpt2": GPT2, "mtp": MTPModel, "medusa": MedusaModel}

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


def load_model(name_or_dir, *, device=None, dtype=None, calibration: bool = True) -> _Family:
    """Load any model of the family from a directory written by ``save_pretrained`` (or the run
    directory of ``mtpkern train`` that holds it), or a Hugging Face GPT-2 checkpoint (directory
    or hub name) as a ``GPT2``. A bad config is a ``CheckpointError`` naming the file and field.
    ``calibration``: attach the directory's ``calibration.json`` as ``model.calibration`` (checked
    against the weights; see ``mtpkern.calibrate``), or ignore it (False). ``dtype``: a floating
    ``torch.dtype``, or a name as the CLI takes it (``"bfloat16"``, ``"bf16"``, ...); None keeps
    float32."""
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


def _load_ours(path: Path, raw: dict, *, device, dtype, calibration: bool = True) -> _Family:
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
