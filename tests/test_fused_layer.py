"""The fused decode layer (ln_qkv, tree_attention_proj, ln_fc_gelu, linear_residual: four
launches) against the eager layer, a whole model against the eager model, and greedy decoding with the
fused layers against ntp with the same kernels.

On CPU the kernels run in Triton's interpreter (tests/conftest.py), fp32 and fp16.
"""

import types

import pytest
import torch

from _fused import DEV, check_close
from _tiny import config, random_prompts
from mtpkern.generation import generate
from mtpkern.layers import Attn, Block
from mtpkern.models import GPT2, MedusaModel, MTPModel
from mtpkern.ops.tree_attention import dense_tree_mask, pack_tree_mask

pytest.importorskip("triton")


def _random_tree(T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        mask[i] |= mask[int(torch.randint(0, i, (1,), generator=g))]
    return mask


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (biases and LayerNorm affines too, which GPT-2's init zeroes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def _layer_pair(block, x, cache_k, cache_v, prefix: int, tree: torch.Tensor):
    """(eager output, eager caches), (fused output, fused caches) for one layer's tree step."""
    from mtpkern.layers import KVCache

    T = x.shape[1]
    slots = torch.arange(prefix, prefix + T, device=DEV)
    prefix_len = torch.tensor(prefix, device=DEV)
    packed = pack_tree_mask(tree).to(DEV)
    outs = []
    for fused in (False, True):
        cache = KVCache.__new__(KVCache)
        cache.k, cache.v = cache_k.clone(), cache_v.clone()
        if fused:
            attn = Attn(cache, slots, tree_mask=packed, prefix_len=prefix_len)
        else:
            attn = Attn(cache, slots, mask=dense_tree_mask(prefix_len, packed, prefix + T))
        outs.append((block(x, attn, 1), cache))
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T, prefix", [(1, 0), (1, 127), (5, 40), (17, 111), (64, 64)])
@torch.inference_mode()
def test_layer_equals_eager(T, prefix, dtype):
    cfg = config()  # D = 64, 4 heads, context 128
    block = _randomise(Block(cfg), seed=T).to(DEV, dtype)
    g = torch.Generator().manual_seed(prefix)
    x = (2 * torch.randn(1, T, cfg.n_embd, generator=g)).to(DEV, dtype)
    cache = torch.randn(2, 2, 1, cfg.n_head, cfg.n_positions, cfg.head_dim, generator=g).to(DEV, dtype)
    (out_e, cache_e), (out_f, cache_f) = _layer_pair(block, x, cache[0], cache[1], prefix, _random_tree(T, prefix))
    if dtype == torch.float32:
        check_close(out_f, out_e, what="layer output")
        for name in ("k", "v"):
            check_close(getattr(cache_f, name), getattr(cache_e, name), what=f"{name} cache")
    else:  # both in fp16 against the fp32 layer: the fused one may err at most twice as much
        block32 = block.float()
        (ref, cache_r), _ = _layer_pair(block32, x.float(), cache[0].float(), cache[1].float(), prefix,
                                        _random_tree(T, prefix))
        check_close(out_f, ref, out_e, "layer output")
        for name in ("k", "v"):
            check_close(getattr(cache_f, name), getattr(cache_r, name), getattr(cache_e, name), f"{name} cache")


@pytest.mark.parametrize("model_type", ["gpt2", "mtp", "medusa"])
@torch.inference_mode()
def test_whole_model_tree_step_equals_eager(model_type):
    """Prefill eagerly, then one 17-node tree step through every layer (and every MTP head
    block), fused vs eager: hidden states and the whole KV cache agree."""
    from mtpkern.core import prefill
    from mtpkern.steps import _Forward
    from mtpkern.tree import Tree

    cfg = config(n_layer=3)
    torch.manual_seed(0)
    model = {"gpt2": lambda: GPT2(cfg), "mtp": lambda: MTPModel(cfg.__class__(**{**cfg.to_dict(), "n_heads": 3})),
             "medusa": lambda: MedusaModel(cfg.__class__(**{**cfg.to_dict(), "n_heads": 3}))}[model_type]()
    model = _randomise(model, seed=1).to(DEV).eval()
    heads = model.n_heads
    tree = Tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [2], [3], [0, 2], [4], [5], [0, 0, 1], [1, 1],
                 [2, 0], [0, 3], [0, 0, 0, 0]])
    tt = tree.tensors(DEV)
    T = tt.depth.shape[0]
    prompt = torch.tensor(random_prompts(1, seed=3, min_len=30, max_len=30)[0], device=DEV)
    tokens = torch.randint(0, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(4)).to(DEV)
    results = []
    for fused in (False, True):
        cache = model.new_cache(1, cfg.n_positions)
        prefill(model, cache, prompt, heads=heads)
        p = torch.tensor(len(prompt), device=DEV)
        engine = types.SimpleNamespace(model=model, cache=cache, fused=fused, device=DEV, decode_weights=None)
        forward = _Forward(engine, T)
        h0, carry = forward(tokens[None], p, len(prompt), cache, tt.depth, tt.dense_mask, tt.mask)
        h0, carry = h0[0], carry[0]
        # The draft heads over a 4-node accepted path (MTP: its head blocks, fused one by
        # one or eagerly as one batch, writing their own cache layers).
        chain = Tree.chain(3).tensors(DEV)
        attn = _Forward(engine, 4).attn(p, len(prompt), cache, chain.dense_mask, chain.mask)
        drafts = model.draft_hidden(carry[[0, 1, 3, 5]][None], heads - 1, attn)
        results.append(((h0, carry, drafts), cache))
    (h_e, c_e), (h_f, c_f) = results
    check_close(h_f[0], h_e[0], what="head 0 hidden states")
    check_close(h_f[1], h_e[1], what="draft heads' carry")
    if heads > 1:
        check_close(h_f[2], h_e[2], what="draft heads' hidden states")
    check_close(c_f.k, c_e.k, what="k cache")
    check_close(c_f.v, c_e.v, what="v cache")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["medusa", "mtp"])
def test_greedy_with_fused_layers_is_ntp(strategy, medusa_model, mtp_model):
    """Speculative greedy decoding through the fused layers gives exactly the tokens of ntp
    through the same kernels (and of eager ntp)."""
    model = medusa_model if strategy == "medusa" else mtp_model
    for prompt in random_prompts(2, seed=5):
        ntp = generate(model, prompt, max_new_tokens=10, strategy="ntp", kernels="fused")
        spec = generate(model, prompt, max_new_tokens=10, strategy=strategy, kernels="fused")
        eager = generate(model, prompt, max_new_tokens=10, strategy="ntp", kernels="eager")
        assert spec.tokens == ntp.tokens == eager.tokens, (strategy, prompt)
        assert max(spec.accept_lengths) > 1, "the heads accepted nothing: the test shows nothing"


@pytest.fixture(scope="module")
def medusa_model():
    from _tiny import tiny_medusa

    return tiny_medusa()


@pytest.fixture(scope="module")
def mtp_model():
    from _tiny import tiny_mtp

    return tiny_mtp()


def test_eager_kernels_never_reach_the_fused_layer(monkeypatch, medusa_model):
    """kernels="eager" keeps today's per-op layer (and "fused" does reach the fused one)."""
    calls = []
    real = Block.fused_decode
    monkeypatch.setattr(Block, "fused_decode", lambda self, *a: calls.append(1) or real(self, *a))
    prompt = random_prompts(1, seed=6)[0]
    generate(medusa_model, prompt, max_new_tokens=4, strategy="medusa", kernels="eager")
    assert not calls
    generate(medusa_model, prompt, max_new_tokens=4, strategy="medusa", kernels="fused")
    assert calls


@pytest.mark.parametrize("strategy, rows_per_step", [("ntp", 0), ("medusa", 1), ("mtp", 0)])
def test_final_norm_is_in_the_logits_kernel(strategy, rows_per_step, medusa_model, mtp_model):
    """With fused kernels a greedy step runs no LayerNorm over its tree tokens: the logits kernel
    normalises head 0 in its prologue (a MEDUSA step normalises the one accepted row its heads
    start from; MTP's draft heads start from the trunk and end in their own norms), and the
    tokens equal eager ntp's."""
    model = mtp_model if strategy == "mtp" else medusa_model
    norm = model.final_norm
    calls = []
    real = type(norm).forward
    prompt = random_prompts(1, seed=8)[0]
    eager = generate(model, prompt, max_new_tokens=8, strategy="ntp", kernels="eager")
    try:
        norm.forward = lambda x: calls.append(x.shape[-2]) or real(norm, x)
        out = generate(model, prompt, max_new_tokens=8, strategy=strategy, kernels="fused")
    finally:
        del norm.forward
    assert out.tokens == eager.tokens
    # The prompt's pass: one norm over the prompt (MTP: every head's, batched in one call).
    step_rows = calls[1:]
    if strategy == "ntp":
        assert step_rows == []  # no norm call at all after the prompt
    elif strategy == "medusa":
        assert step_rows == [1] * len(out.accept_lengths)  # one row per step, never the tree
    else:  # MTP: each draft head's over the accepted path (head 0's rows never: the drafts start from the trunk)
        depth = model.n_heads - 1
        assert step_rows == [depth + 1] * depth * len(out.accept_lengths), calls


# ---------------------------------------------------------------- the GEMV path (DOT=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, block_m", [(1, 1), (3, 4)])
def test_gemv_path_of_every_layer_kernel(monkeypatch, dtype, M, block_m):
    """The decode-layer kernels with ``DOT=False`` (products summed on the FMA units, the
    block-size sweep's GEMV variant) against the fp32 references: widths that do not divide
    into the tiles, a split K, strided inputs."""
    import importlib

    from _fused import ATOL, rand, strided

    g = torch.Generator().manual_seed(M)
    D, H, S = 48, 3, 40
    gemv = dict(DOT=False, BLOCK_M=block_m, BLOCK_N=8, BLOCK_K=32, SPLIT_K=2, num_warps=4, num_stages=2)
    mods = {n: importlib.import_module(f"mtpkern.ops.{n}") for n in ("ln_qkv", "ln_fc_gelu", "linear_residual")}
    for mod in mods.values():
        monkeypatch.setattr(mod, "blocks", lambda *a, **k: dict(gemv))
    x = strided(rand(g, 1, M, D, dtype=dtype))
    lnw, lnb = 1 + rand(g, D, scale=0.1, dtype=dtype), rand(g, D, scale=0.1, dtype=dtype)
    tol = dict(atol=ATOL[dtype], rtol=1e-5 if dtype == torch.float32 else 1e-2)

    w, b = rand(g, 3 * D, D, scale=0.2, dtype=dtype), rand(g, 3 * D, scale=0.1, dtype=dtype)
    caches = [torch.zeros(1, H, S, D // H, dtype=dtype, device=DEV) for _ in range(4)]
    slots = torch.arange(5, 5 + M, device=DEV)
    q = mods["ln_qkv"].ln_qkv(x, lnw, lnb, w, b, caches[0], caches[1], slots, backend="triton")
    q_ref = mods["ln_qkv"].ln_qkv_ref(x, lnw, lnb, w, b, caches[2], caches[3], slots)
    torch.testing.assert_close(q.float(), q_ref.float(), **tol)
    torch.testing.assert_close(caches[0].float(), caches[2].float(), **tol)
    torch.testing.assert_close(caches[1].float(), caches[3].float(), **tol)

    w, b = rand(g, 4 * D + 5, D, scale=0.2, dtype=dtype), rand(g, 4 * D + 5, scale=0.1, dtype=dtype)
    h = mods["ln_fc_gelu"].ln_fc_gelu(x, lnw, lnb, w, b, backend="triton")
    torch.testing.assert_close(h.float(), mods["ln_fc_gelu"].ln_fc_gelu_ref(x, lnw, lnb, w, b).float(), **tol)

    xk, r = rand(g, 1, M, 4 * D + 5, dtype=dtype), rand(g, 1, M, D, dtype=dtype)
    w, b = rand(g, D, 4 * D + 5, scale=0.1, dtype=dtype), rand(g, D, scale=0.1, dtype=dtype)
    out = mods["linear_residual"].linear_residual(xk, w, b, r, backend="triton")
    torch.testing.assert_close(out.float(), mods["linear_residual"].linear_residual_ref(xk, w, b, r).float(), **tol)


def test_a_fused_layer_is_four_ops_of_one_launch_each():
    """The decode layer's launch budget: ``Block.fused_decode`` calls ln_qkv, tree_attention_proj,
    ln_fc_gelu and linear_residual (each one kernel launch) and otherwise only views, so a
    layer is four launches (the issue's target), at T = 1 and for a tree."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mtpkern.layers import KVCache

    views = {"view", "transpose", "_unsafe_view", "alias", "as_strided", "slice", "select", "t", "unsqueeze"}

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(f"{func.namespace}.{func.__name__.split('.')[0]}")
            return func(*args, **(kwargs or {}))

    cfg = config()
    block = _randomise(Block(cfg), 3).to(DEV)
    for T in (1, 5):
        cache = KVCache(1, 1, cfg.n_head, 32, cfg.n_embd // cfg.n_head, dtype=torch.float32, device=DEV)
        attn = Attn(cache, torch.arange(7, 7 + T, device=DEV), tree_mask=pack_tree_mask(_random_tree(T, 1)).to(DEV),
                    prefix_len=torch.tensor(7, device=DEV))
        x = torch.randn(1, T, cfg.n_embd, device=DEV)
        with torch.no_grad(), Calls() as calls:
            block.fused_decode(x, attn, 0)
        kernels = [op for op in calls.ops if op.startswith("mtpkern.")]
        assert kernels == ["mtpkern.ln_qkv", "mtpkern.tree_attention_proj", "mtpkern.ln_fc_gelu",
                           "mtpkern.linear_residual"], calls.ops
        # besides them, views, and on CPU tensors ln_qkv's check of the slots on the host (free
        # there; skipped on a GPU, where it would sync)
        host_check = {"lt", "ge", "bitwise_or", "any", "_local_scalar_dense"} if DEV == "cpu" else set()
        others = [op for op in calls.ops if op.startswith("aten.") and op[5:] not in views | host_check]
        assert not others, calls.ops
