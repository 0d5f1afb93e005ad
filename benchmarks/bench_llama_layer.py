"""The Llama family's decode layer at SmolLM2-135M's shape (576 wide, 9 query heads and 3 KV heads
of 64, SwiGLU 1536), fp16, one tree step of T tokens over 512 cached ones: the fused layer
(rms_qkv_rope, tree_attention_gqa_proj, rms_swiglu, linear_residual: four launches) against the
eager block with a dense tree mask (what the model runs without the kernels). T = 1 is the ntp
step; 16 and 64 are tree steps. Correctness: tests/test_llama_fused.py."""

import pytest
import torch

from mtpkern.config import LlamaConfig
from mtpkern.layers import Attn, KVCache
from mtpkern.llama import LlamaBlock, Rotary
from mtpkern.ops.tree_attention import dense_tree_mask, pack_tree_mask

pytestmark = pytest.mark.gpu

PREFIX = 512
SMOLLM2 = dict(n_embd=576, n_head=9, n_kv_head=3, intermediate_size=1536, n_positions=PREFIX + 64)


def _tree(T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [T, T], depth [T]) of the tree whose node i has the parent (i - 1) // 2."""
    mask = torch.eye(T, dtype=torch.bool)
    depth = torch.zeros(T, dtype=torch.long)
    for i in range(1, T):
        mask[i] |= mask[(i - 1) // 2]
        depth[i] = depth[(i - 1) // 2] + 1
    return mask, depth


def layer_step(T: int, device: str, dtype: torch.dtype):
    """(fused, eager): callables running one LlamaBlock's tree step of T tokens over PREFIX cached
    ones, each on its own copy of the KV cache."""
    cfg = LlamaConfig.tiny(vocab_size=49152, **SMOLLM2)
    torch.manual_seed(0)
    block = LlamaBlock(cfg).to(device, dtype).eval()
    x = torch.randn(1, T, cfg.n_embd, device=device, dtype=dtype)
    kv = torch.randn(2, 1, 1, cfg.n_kv_head, cfg.n_positions, cfg.n_embd // cfg.n_head, device=device, dtype=dtype)
    mask, depth = _tree(T)
    prefix = torch.tensor(PREFIX, device=device)
    slots = prefix + torch.arange(T, device=device)
    rope = Rotary(cfg)(prefix + depth.to(device), dtype)
    packed = pack_tree_mask(mask).to(device)
    fused_attn = Attn(KVCache.from_tensors(kv[0].clone(), kv[1].clone()), slots, tree_mask=packed, prefix_len=prefix)
    dense = dense_tree_mask(prefix, packed, PREFIX + T)
    eager_attn = Attn(KVCache.from_tensors(kv[0].clone(), kv[1].clone()), slots, mask=dense)
    return (lambda: block(x, fused_attn, 0, rope)), (lambda: block(x, eager_attn, 0, rope))


@pytest.mark.parametrize("T", [1, 16, 64])
@torch.inference_mode()
def test_llama_layer(benchmark, bench_against, T):
    fused, eager = layer_step(T, "cuda", torch.float16)
    cfg = LlamaConfig.tiny(vocab_size=49152, **SMOLLM2)
    D, F, Dh = cfg.n_embd, cfg.intermediate_size, cfg.n_embd // cfg.n_head
    weights = D * (D + 2 * cfg.n_kv_head * Dh) + D * D + 3 * D * F  # qkv, o, gate + up, down
    kv_bytes = 2 * cfg.n_kv_head * (PREFIX + T) * Dh
    bench_against(benchmark, fused, eager, bytes_moved=2 * (weights + kv_bytes + 2 * T * D),
                  T=T, prefix=PREFIX, model="SmolLM2-135M layer", dtype="float16")
