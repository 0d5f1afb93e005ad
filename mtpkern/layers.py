"""The building blocks of the model family and the state they decode with.

``KVCache`` is the preallocated static cache; ``Attn`` says how new tokens attend to it. The
forward pass serves both training (causal SDPA over the whole sequence, ``attn=None``) and
decoding: K/V written at explicit slots, explicit position ids and an arbitrary boolean mask over
cache + new tokens (tree verification), or the packed tree mask of the fused tree-attention
kernel (``Block.fused_decode``). ``decode_block`` is the same block as a plain function of its
tensors (``DecodeWeights``), the CPU's fast path. ``ResBlock`` and ``MedusaHead`` are MEDUSA's
head blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtpkern.config import GPT2Config, LlamaConfig
from mtpkern.cpu_matmul import Matmul
from mtpkern.ops.linear_residual import linear_residual
from mtpkern.ops.ln_fc_gelu import ln_fc_gelu
from mtpkern.ops.ln_qkv import ln_qkv
from mtpkern.ops.tree_attention import tree_attention, tree_attention_proj

# ----------------------------------------------------------------------------- decoding state


class KVCache:
    """One preallocated K and V tensor for all layers: [n_layers, B, H, max_len, head_dim].

    Slots are written at explicit indices by the forward pass; nothing here grows.
    ``KVCache(n_layers, batch, n_head, max_len, head_dim, dtype=, device=)`` allocates a zeroed
    cache (``SpeculativeLM.new_cache`` sizes one for a model); ``KVCache.from_tensors(k, v)``
    wraps tensors that already exist, such as some batch rows of a larger cache, so that writes
    through it land in them.
    """

    k: torch.Tensor
    v: torch.Tensor

    def __init__(self, n_layers: int, batch: int, n_head: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def from_tensors(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """A cache over the given K and V, [n_layers, B, H, max_len, head_dim] each, without a copy
        (views stay views). A one-row view: ``KVCache.from_tensors(c.k[:, b : b + 1], c.v[:, b : b + 1])``."""
        if k.dim() != 5 or k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
            raise ValueError(f"KVCache.from_tensors needs K and V of one 5-d shape, dtype and device, got "
                             f"{tuple(k.shape)} {k.dtype} {k.device} and {tuple(v.shape)} {v.dtype} {v.device}")
        cache = cls.__new__(cls)  # the one place that skips the allocation of __init__
        cache.k, cache.v = k, v
        return cache

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
        (``SpeculativeLM.decode_weights()``): the blocks then run as plain functions of them
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
    """A ``Block``'s tensors as ``decode_block`` reads them, each matrix a :class:`Matmul` of the
    parameter (on a CPU, in the layout measured fastest at the step's row count)."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv: Matmul
    qkv_b: torch.Tensor
    o: Matmul
    o_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc: Matmul
    fc_b: torch.Tensor
    proj: Matmul
    proj_b: torch.Tensor
    n_head: int
    eps: float

    @classmethod
    def of(cls, block: Block) -> DecodeWeights:
        a, m = block.attn, block.mlp
        return cls(block.ln_1.weight, block.ln_1.bias, Matmul(a.c_attn.weight), a.c_attn.bias, Matmul(a.c_proj.weight),
                   a.c_proj.bias, block.ln_2.weight, block.ln_2.bias, Matmul(m.c_fc.weight), m.c_fc.bias,
                   Matmul(m.c_proj.weight), m.c_proj.bias, a.n_head, block.ln_1.eps)


def decode_block(x: torch.Tensor, w: DecodeWeights, attn: Attn, layer: int) -> torch.Tensor:
    """``Block.forward(x, attn, layer)`` on the decode path (x [B, T, D], a dense mask), as a
    function of the block's tensors: 13 ops and no module calls (one more per cache write with
    slots per batch row)."""
    B, T, D = x.shape
    x = x.reshape(B * T, D)
    qkv = w.qkv(F.layer_norm(x, (D,), w.ln1_w, w.ln1_b, w.eps), w.qkv_b)
    q, k, v = qkv.reshape(B, T, 3, w.n_head, D // w.n_head).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, Dh]
    kc, vc = write_kv(attn, layer, k, v)
    assert attn.mask is not None, "Attn: decode_block needs a mask"
    s = attn.mask.shape[-1]
    y = F.scaled_dot_product_attention(q, kc[:, :, :s], vc[:, :, :s], attn_mask=attn.mask)
    x = w.o(y.transpose(1, 2).reshape(B * T, D), x + w.o_b)
    h = F.gelu(w.fc(F.layer_norm(x, (D,), w.ln2_w, w.ln2_b, w.eps), w.fc_b), approximate="tanh")
    return w.proj(h, x + w.proj_b).reshape(B, T, D)


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


class MedusaHead(nn.Module):
    def __init__(self, config: GPT2Config | LlamaConfig):  # either family: only its sizes
        super().__init__()
        self.blocks = nn.Sequential(*(ResBlock(config.n_embd) for _ in range(config.medusa_layers)))
        self.proj = nn.Linear(config.n_embd, config.vocab_size, bias=False) if config.medusa_proj else None

    def forward(self, x):
        return self.blocks(x)

