"""The Llama family's blocks: RMSNorm, rotary positions, grouped-query attention and the SwiGLU MLP.

Maths (Touvron et al. 2023; Llama 3's RoPE scaling; Qwen2's q/k/v biases), matching
transformers' ``LlamaForCausalLM``:

    rms(x)   = x / sqrt(mean(x^2) + eps) * g
    rope(x)  = x * cos(p w) + rotate_half(x) * sin(p w),  w_i = theta^(-2i / Dh) (Llama 3 rescales w)
    attn     = softmax(rope(q) rope(k)^T / sqrt(Dh)) v, query head h reading KV head h // (H / H_kv)
    mlp(x)   = W_down (silu(W_gate x) * (W_up x))

Q, K and V are one projection (``c_attn``: [H Dh + 2 H_kv Dh, D]) and gate and up another
(``c_fc``: [2 I, D]); ``mtpkern.hf_io`` splits them for transformers' layout. The KV cache holds
the H_kv KV heads. A block takes its rotary (cos, sin) from the model, computed once per
forward at each token's own position (tree nodes: prefix + depth). ``decode_llama_block`` is the
block as a plain function of its tensors, the CPU's fast path, like GPT-2's ``decode_block``.
With a fused ``Attn`` (``tree_mask`` / ``prefix_len``: ``kernels="fused"``) a block runs its
fused decode layer instead (``LlamaBlock.fused_decode``: four Triton launches).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtpkern.config import LlamaConfig
from mtpkern.cpu_matmul import Matmul
from mtpkern.layers import Attn, write_kv
from mtpkern.ops.linear_residual import linear_residual
from mtpkern.ops.rms_qkv_rope import rms_qkv_rope
from mtpkern.ops.rms_swiglu import rms_swiglu
from mtpkern.ops.tree_attention import tree_attention_gqa_proj


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 as transformers does."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def inv_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """The rotary frequencies w [Dh / 2] in fp32, Llama 3's scaling applied when configured."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv
    factor, low, high, old = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                              s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)  # long wavelengths: divided by factor
    smooth = (old / wavelen - low) / (high - low)
    mid = (wavelen >= old / high) & (wavelen <= old / low)  # between: interpolated
    return torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


class Rotary:
    """The rotary tables of one model: (cos, sin) at given positions, [1 or B, 1, T, Dh]. The
    frequencies stay fp32 whatever the model's dtype (a plain attribute, not a buffer)."""

    def __init__(self, cfg: LlamaConfig):
        self.inv = inv_frequencies(cfg)

    def __call__(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv.device != pos.device:
            self.inv = self.inv.to(pos.device)
        freqs = pos.float()[..., None] * self.inv  # [T, Dh/2] or [B, T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        emb = emb[None, None] if pos.dim() == 1 else emb[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, Dh] rotated: x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _attend(q, k, v, attn: Attn | None, layer: int, grouped: bool) -> torch.Tensor:
    if attn is None:  # training / scoring: causal over the whole sequence
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
    assert attn.mask is not None, "Attn: eager attention needs a mask (a fused Attn runs LlamaBlock.fused_decode)"
    kc, vc = write_kv(attn, layer, k, v)
    s = attn.mask.shape[-1]
    return F.scaled_dot_product_attention(q, kc[:, :, :s], vc[:, :, :s], attn_mask=attn.mask, enable_gqa=grouped)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, q + 2 * kv, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(q, cfg.n_embd, bias=cfg.o_bias)

    def forward(self, x, attn: Attn | None, layer: int, rope) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hk, Dh = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * Dh, Hk * Dh, Hk * Dh], dim=2)
        q = apply_rope(q.view(B, T, H, Dh).transpose(1, 2), *rope)
        k = apply_rope(k.view(B, T, Hk, Dh).transpose(1, 2), *rope)
        v = v.view(B, T, Hk, Dh).transpose(1, 2)
        y = _attend(q, k, v, attn, layer, H != Hk)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * Dh))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 2 * cfg.intermediate_size, bias=False)  # gate; up
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.attn = LlamaAttention(cfg)
        self.ln_2 = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, attn: Attn | None = None, layer: int = 0, rope=None):
        assert rope is not None, "a Llama block needs its rotary (cos, sin)"
        if attn is not None and attn.tree_mask is not None:
            return self.fused_decode(x, attn, layer, rope)
        x = x + self.attn(self.ln_1(x), attn, layer, rope)
        return x + self.mlp(self.ln_2(x))

    def fused_decode(self, x, attn: Attn, layer: int, rope):
        """This block on the decode path in four fused kernels, the same maths as ``forward``:
        RMSNorm + QKV (+ bias) + rotary at each token's position + the K/V cache write;
        grouped-query tree attention (each KV head read once for its query heads) + the output
        projection (+ bias) + residual; RMSNorm + gate/up + SiLU * up; the down projection +
        residual."""
        a, m = self.attn, self.mlp
        B, T, _ = x.shape
        assert attn.tree_mask is not None and attn.prefix_len is not None, "Attn: fused decoding needs both"
        kc, vc = attn.cache.k[layer], attn.cache.v[layer]
        cos, sin = rope  # [B or 1, 1, T, Dh]
        q = rms_qkv_rope(x, self.ln_1.weight, a.c_attn.weight, a.c_attn.bias, cos[:, 0], sin[:, 0], kc, vc,
                         attn.slots, eps=self.ln_1.eps)
        x = tree_attention_gqa_proj(q.view(B, T, a.n_head, a.head_dim).transpose(1, 2), kc, vc, attn.prefix_len,
                                    attn.tree_mask, a.c_proj.weight, a.c_proj.bias, x)
        h = rms_swiglu(x, self.ln_2.weight, m.c_fc.weight, eps=self.ln_2.eps)
        return linear_residual(h, m.c_proj.weight, None, x)

    def decode_weights(self) -> LlamaDecodeWeights:
        return LlamaDecodeWeights.of(self)


class LlamaDecodeWeights(NamedTuple):
    """A ``LlamaBlock``'s tensors as ``decode_llama_block`` reads them, each matrix a
    :class:`Matmul` of the parameter."""

    ln1_w: torch.Tensor
    qkv: Matmul
    qkv_b: torch.Tensor | None
    o: Matmul
    o_b: torch.Tensor | None
    ln2_w: torch.Tensor
    fc: Matmul
    proj: Matmul
    n_head: int
    n_kv_head: int
    head_dim: int
    eps: float

    @classmethod
    def of(cls, block: LlamaBlock) -> LlamaDecodeWeights:
        a, m = block.attn, block.mlp
        return cls(block.ln_1.weight, Matmul(a.c_attn.weight), a.c_attn.bias, Matmul(a.c_proj.weight), a.c_proj.bias,
                   block.ln_2.weight, Matmul(m.c_fc.weight), Matmul(m.c_proj.weight), a.n_head, a.n_kv_head,
                   a.head_dim, block.ln_1.eps)


def decode_llama_block(x: torch.Tensor, w: LlamaDecodeWeights, attn: Attn, layer: int, rope) -> torch.Tensor:
    """``LlamaBlock.forward(x, attn, layer, rope)`` on the decode path (a dense mask), as a
    function of the block's tensors."""
    B, T, D = x.shape
    H, Hk, Dh = w.n_head, w.n_kv_head, w.head_dim
    x = x.reshape(B * T, D)
    qkv = w.qkv(rms_norm(x, w.ln1_w, w.eps), w.qkv_b).reshape(B, T, H + 2 * Hk, Dh).transpose(1, 2)
    q, k, v = qkv.split([H, Hk, Hk], dim=1)
    y = _attend(apply_rope(q, *rope), apply_rope(k, *rope), v, attn, layer, H != Hk)
    y = y.transpose(1, 2).reshape(B * T, H * Dh)
    x = w.o(y, x if w.o_b is None else x + w.o_b)
    gate, up = w.fc(rms_norm(x, w.ln2_w, w.eps)).chunk(2, dim=-1)
    return w.proj(F.silu(gate) * up, x).reshape(B, T, D)
