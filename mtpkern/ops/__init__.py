"""The decoding ops: one file per op (kernel, eager reference, launcher, registration, public function).

| op | kernel | what it replaces |
|---|---|---|
| ``fused_logits`` | Triton | LM head matmul + top-k + logsumexp + entropy, without the [R, V] logits |
| ``linear_cross_entropy`` | Triton | LM head + cross-entropy in training, without the [N, V] logits |
| ``tree_attention`` | Triton | SDPA over cache + tree with a dense float mask |
| ``tree_attention_gqa`` | Triton | the same with grouped KV heads (Llama family): each KV head read once for its query heads |
| ``tree_attention_gqa_proj`` | Triton | grouped-query tree attention, the output projection, its bias (if any) and the residual add |
| ``tree_attention_proj`` | Triton | the same attention and the output projection, its bias and the residual add |
| ``ln_qkv`` | Triton | LayerNorm 1, the QKV projection and the two ``index_copy_`` into the KV cache |
| ``rms_qkv_rope`` | Triton | Llama: RMSNorm 1, the QKV projection (+ bias), rotary at each token's position, the cache writes |
| ``linear_residual`` | Triton | a projection, its bias (if any) and the residual add (the MLP's down projection) |
| ``ln_fc_gelu`` | Triton | LayerNorm 2, the MLP's up projection, its bias and GELU |
| ``rms_swiglu`` | Triton | Llama: RMSNorm 2, the gate and up projections and SiLU(gate) * up |
| ``tree_buffers`` | C++/CUDA | building a tree's packed mask, depths and paths on the host |
| ``verify_greedy`` / ``verify_typical`` | C++/CUDA | argmax, compare, cumprod, best path, gather |
| ``verify_rejection`` | C++/CUDA | recursive rejection sampling of a sampled tree (drafts without replacement) |
| ``accept_greedy`` | C++ (CPU) | a greedy step's logits, argmax, verification and output: a dozen small ops |
| ``kv_compact_`` | C++/CUDA | per-layer index_select / index_copy of the accepted KV entries |

Every op is ``torch.ops.mtpkern.<name>`` with a fake implementation, and checks its own inputs
(one exception type and message per bad input in every backend); on CPU tensors it runs the
eager reference. ``MTPKERN_BACKEND=eager|triton|cuda`` forces a backend: ``_backend``'s
docstring relates it to ``backend=`` and ``generate(kernels=)``.
"""

from mtpkern.ops._backend import HAS_CUDA_EXT, HAS_TRITON, forced_backend
from mtpkern.ops.fused_logits import LogitsStats, fused_logits, fused_logits_ref
from mtpkern.ops.kv_compact import kv_compact_, kv_compact_ref_
from mtpkern.ops.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_accumulate_,
    linear_cross_entropy_ref,
)
from mtpkern.ops.linear_residual import linear_residual, linear_residual_ref
from mtpkern.ops.ln_fc_gelu import ln_fc_gelu, ln_fc_gelu_ref
from mtpkern.ops.ln_qkv import ln_qkv, ln_qkv_ref
from mtpkern.ops.rms_qkv_rope import rms_qkv_rope, rms_qkv_rope_ref
from mtpkern.ops.rms_swiglu import rms_swiglu, rms_swiglu_ref
from mtpkern.ops.tree_attention import (
    pack_tree_mask, tree_attention, tree_attention_gqa, tree_attention_gqa_proj, tree_attention_gqa_proj_ref,
    tree_attention_gqa_ref, tree_attention_proj, tree_attention_proj_ref, tree_attention_ref, unpack_tree_mask,
)
from mtpkern.ops.tree_mask import TreeBuffers, tree_buffers, tree_buffers_ref
from mtpkern.ops.verify import (
    AcceptResult, VerifyResult, accept_greedy, accept_greedy_ref, verify_greedy, verify_greedy_ref, verify_typical,
    verify_typical_ref,
)
from mtpkern.ops.verify_sampled import RejectionResult, verify_rejection, verify_rejection_ref

__all__ = [
    "HAS_CUDA_EXT", "HAS_TRITON", "forced_backend",
    "LogitsStats", "fused_logits", "fused_logits_ref",
    "kv_compact_", "kv_compact_ref_",
    "linear_cross_entropy", "linear_cross_entropy_accumulate_", "linear_cross_entropy_ref",
    "linear_residual", "linear_residual_ref", "ln_fc_gelu", "ln_fc_gelu_ref", "ln_qkv", "ln_qkv_ref",
    "rms_qkv_rope", "rms_qkv_rope_ref", "rms_swiglu", "rms_swiglu_ref",
    "pack_tree_mask", "unpack_tree_mask", "tree_attention", "tree_attention_ref", "tree_attention_gqa",
    "tree_attention_gqa_ref", "tree_attention_gqa_proj", "tree_attention_gqa_proj_ref", "tree_attention_proj",
    "tree_attention_proj_ref",
    "TreeBuffers", "tree_buffers", "tree_buffers_ref",
    "VerifyResult", "verify_greedy", "verify_greedy_ref", "verify_typical", "verify_typical_ref",
    "AcceptResult", "accept_greedy", "accept_greedy_ref",
    "RejectionResult", "verify_rejection", "verify_rejection_ref",
]
