"""The Llama family's fused decode layer (rms_qkv_rope, tree_attention_gqa_proj, rms_swiglu,
linear_residual: four launches) against the eager block, a whole model's tree step
against the eager model, and greedy decoding through the fused layers against eager decoding.

On CPU the kernels run in Triton's interpreter (tests/conftest.py), fp32 and fp16.
"""

import pytest
import torch

from _fused import DEV, check_close, rand
from mtpkern import BatchDecoder, Decoder, MedusaModel, MTPModel
from mtpkern.config import LlamaConfig
from mtpkern.layers import Attn, KVCache
from mtpkern.llama import LlamaBlock, Rotary
from mtpkern.models import Llama
from mtpkern.ops.linear_residual import linear_residual, linear_residual_ref
from mtpkern.ops.tree_attention import dense_tree_mask, pack_tree_mask

pytest.importorskip("triton")

HEADS = [(8, 4, 2), (64, 9, 3), (8, 4, 4)]  # (Dh, H, H_kv)


def _tree(T: int) -> torch.Tensor:
    """Node i's parent is (i - 1) // 2 (depths 0, 1, 1, 2, 2, 2, 2)."""
    mask = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        mask[i] |= mask[(i - 1) // 2]
    return mask


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: norms near 1, weights and biases of std 0.1 (nothing zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return module


def _block(Dh, H, Hk, bias: bool) -> tuple[LlamaBlock, LlamaConfig]:
    cfg = LlamaConfig.tiny(n_embd=40, n_head=H, n_kv_head=Hk, head_dim=Dh, intermediate_size=56,
                           n_positions=48, qkv_bias=bias, o_bias=bias, rope_theta=100.0)
    return _randomise(LlamaBlock(cfg), seed=Dh + H), cfg


def _layer_pair(block, cfg, x, cache, prefix, T):
    """(eager output, eager cache), (fused output, fused cache) of one layer's tree step; prefix
    an int (every row) or a list (a prefix per batch row)."""
    B = x.shape[0]
    depth = torch.tensor([0, 1, 1, 2, 2, 2, 2][:T], device=DEV)
    p = torch.as_tensor(prefix, device=DEV)
    per_row = p.dim() == 1
    slots = (p[:, None] if per_row else p) + torch.arange(T, device=DEV)
    rope = Rotary(cfg)((p[:, None] if per_row else p) + depth, x.dtype)
    packed = pack_tree_mask(_tree(T)).to(DEV)
    outs = []
    for fused in (False, True):
        c = KVCache.from_tensors(cache[0].clone(), cache[1].clone())
        if fused:
            attn = Attn(c, slots, tree_mask=packed, prefix_len=p)
        else:
            dense = dense_tree_mask(p, packed, int(p.max()) + T)
            attn = Attn(c, slots, mask=dense[:, None] if per_row else dense)
        outs.append((block(x, attn, 1, rope), c))
    assert B == 1 or per_row
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T, prefix", [(1, 0), (3, 5), (7, 33), (3, [0, 5, 33])])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("Dh, H, Hk", HEADS)
@torch.inference_mode()
def test_layer_equals_eager(Dh, H, Hk, bias, T, prefix, dtype):
    """The fused layer's output and the whole KV cache (two layers; the step writes layer 1)
    against the eager block; in fp16 both against the fp32 block, the fused layer's error at
    most twice eager's."""
    block, cfg = _block(Dh, H, Hk, bias)
    block = block.to(DEV, dtype)
    B = 3 if isinstance(prefix, list) else 1
    g = torch.Generator().manual_seed(T)
    x = rand(g, B, T, cfg.n_embd, scale=2.0, dtype=dtype)
    cache = rand(g, 2, 2, B, Hk, cfg.n_positions, Dh, dtype=dtype)
    (out_e, c_e), (out_f, c_f) = _layer_pair(block, cfg, x, cache, prefix, T)
    if dtype == torch.float32:
        check_close(out_f, out_e, what="layer output")
        check_close(c_f.k, c_e.k, what="k cache")
        check_close(c_f.v, c_e.v, what="v cache")
        return
    (ref, c_r), _ = _layer_pair(block.float(), cfg, x.float(), cache.float(), prefix, T)
    check_close(out_f, ref, out_e, "layer output")
    check_close(c_f.k, c_r.k, c_e.k, "k cache")
    check_close(c_f.v, c_r.v, c_e.v, "v cache")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_residual_without_bias(dtype):
    """Llama's down projection (and its output projection without ``o_bias``): no bias."""
    g = torch.Generator().manual_seed(0)
    x, w, r = rand(g, 3, 7, 56, dtype=dtype), rand(g, 40, 56, scale=0.2, dtype=dtype), rand(g, 3, 7, 40, dtype=dtype)
    out = linear_residual(x, w, None, r, backend="triton")
    eager = None if dtype == torch.float32 else r + x @ w.T
    check_close(out, linear_residual_ref(x.float(), w.float(), None, r.float()), eager, "down projection")
    with pytest.raises(ValueError, match=r"bias must have shape \[40\]"):
        linear_residual(x, w, w[0, :39], r)


def _model(kind: str):
    cfg = LlamaConfig.tiny(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_kv_head=2, intermediate_size=48,
                           n_positions=96, qkv_bias=True)
    torch.manual_seed(0)
    base = _randomise(Llama(cfg), seed=1)
    if kind == "mtp":  # draft heads as copies of the last layer: their drafts are sometimes accepted
        return MTPModel.from_base(base, n_heads=3).to(DEV).eval()
    if kind == "medusa":
        return _randomise(MedusaModel.from_base(base, n_heads=3), seed=2).to(DEV).eval()
    return base.to(DEV).eval()


def _attn(cache, prefix: int, tree: torch.Tensor, fused: bool) -> Attn:
    """How T tree tokens at slots prefix + i attend: the fused kernels' packed mask, or eager's dense one."""
    T = tree.shape[0]
    slots = torch.arange(prefix, prefix + T, device=DEV)
    p, packed = torch.tensor(prefix, device=DEV), pack_tree_mask(tree).to(DEV)
    if fused:
        return Attn(cache, slots, tree_mask=packed, prefix_len=p)
    return Attn(cache, slots, mask=dense_tree_mask(p, packed, prefix + T))


@pytest.mark.parametrize("kind", ["llama", "mtp", "medusa"])
@torch.inference_mode()
def test_whole_model_tree_step_equals_eager(kind):
    """Prefill eagerly, then one 7-node tree step through every layer (``decode_hidden``) and
    the draft heads over a 3-node accepted path (MTP: its head blocks, in their own cache
    layers), fused vs eager: hidden states and the whole KV cache agree."""
    from mtpkern.core import prefill

    model = _model(kind)
    tree = _tree(7)
    depth = tree.sum(1).to(DEV) - 1
    prompt = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(3)).to(DEV)
    tokens = torch.randint(0, 96, (7,), generator=torch.Generator().manual_seed(4)).to(DEV)
    P, results = len(prompt), []
    for fused in (False, True):
        cache = model.new_cache(1, 96)
        prefill(model, cache, prompt, heads=model.n_heads)
        h0, carry = model.decode_hidden(tokens[None], P + depth, _attn(cache, P, tree, fused))
        path = torch.tensor([0, 1, 3], device=DEV)  # root, its first child, that child's first child
        chain = torch.ones(3, 3, dtype=torch.bool).tril()
        drafts = model.draft_hidden(carry[:, path], model.n_heads - 1, _attn(cache, P, chain, fused))
        results.append(((h0, carry, drafts), cache))
    (h_e, c_e), (h_f, c_f) = results
    check_close(h_f[0], h_e[0], what="head 0 hidden states")
    check_close(h_f[1], h_e[1], what="draft heads' carry")
    if model.n_heads > 1:
        check_close(h_f[2], h_e[2], what="draft heads' hidden states")
    check_close(c_f.k, c_e.k, what="k cache")
    check_close(c_f.v, c_e.v, what="v cache")


@pytest.mark.parametrize("strategy", ["ntp", "mtp", "medusa"])
def test_greedy_fused_decoding_equals_eager(strategy):
    """Greedy decoding of a tiny random Llama through the fused layers (and its MTP and MEDUSA
    heads' trees) gives exactly the tokens of eager decoding."""
    model = _model({"ntp": "llama"}.get(strategy, strategy))
    accepted = []
    for prompt in ([5, 9, 2, 77, 31], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]):
        eager = Decoder(model, strategy, kernels="eager").generate(torch.tensor(prompt), max_new_tokens=10)
        fused = Decoder(model, strategy, kernels="fused").generate(torch.tensor(prompt), max_new_tokens=10)
        assert fused.tokens == eager.tokens, (strategy, prompt)
        accepted += fused.accept_lengths
    if strategy != "ntp":  # some steps accepted drafts (the fused caches' compaction ran)
        assert max(accepted) > 1, accepted


@pytest.mark.slow  # about 25 s each on a 2-core CPU
@pytest.mark.parametrize("strategy", ["mtp", "medusa"])
def test_fused_batches_equal_eager_decoding(strategy):
    """BatchDecoder through the fused layers (each row's K/V at its own slots, its rotary at
    its own positions, its own prefix length in the attention) gives every row the tokens of
    eager decoding alone."""
    model = _model(strategy)
    prompts = [[5, 9, 2, 77, 31], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41]]
    want = [Decoder(model, strategy, kernels="eager").generate(torch.tensor(p), max_new_tokens=8).tokens
            for p in prompts]
    got = BatchDecoder(model, strategy, kernels="fused", max_batch=4).generate(prompts, max_new_tokens=8)
    assert [g.tokens for g in got] == want
