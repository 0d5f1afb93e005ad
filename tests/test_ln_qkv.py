"""ln_qkv (LayerNorm + QKV projection, K and V into the cache) against its fp32 reference.

On CPU the Triton kernel runs in the interpreter (fp32 / fp16, D = 64 with 4 heads, a few
wider cases); bf16 and GPT-2's width run on a GPU only.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from _fused import DEV, T_VALUES, check_close, gpu_blocks, rand, strided, transposed
from mtpkern.ops.ln_qkv import ln_qkv, ln_qkv_ref

qkv_mod = importlib.import_module("mtpkern.ops.ln_qkv")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(B, T, D, H, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = rand(g, B, T, D, scale=3.0, dtype=dtype) + 0.5
    params = dict(ln_weight=1 + rand(g, D, scale=0.1, dtype=dtype), ln_bias=rand(g, D, scale=0.1, dtype=dtype),
                  weight=rand(g, 3 * D, D, scale=D**-0.5, dtype=dtype), bias=rand(g, 3 * D, scale=0.1, dtype=dtype))
    # A recognisable cache: every slot the op must not write keeps its value.
    cache = rand(g, 2, B, H, S, D // H, dtype=dtype)
    return x, params, cache[0], cache[1]


def _check(x, p, k_cache, v_cache, slots, eps=1e-5):
    """Kernel vs reference: q, and both caches in full (written slots and untouched ones)."""
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q = ln_qkv(x, **p, k_cache=k_cache, v_cache=v_cache, slots=slots, eps=eps, backend="triton")
    q_ref = ln_qkv_ref(x, **p, k_cache=k_ref, v_cache=v_ref, slots=slots, eps=eps)
    eager = None
    if x.dtype != torch.float32:  # what the eager model computes in this dtype
        D = x.shape[-1]
        eager = F.linear(F.layer_norm(x, (D,), p["ln_weight"], p["ln_bias"], eps), p["weight"], p["bias"])
    B, T, D = x.shape
    H = k_cache.shape[1]
    check_close(q, q_ref, None if eager is None else eager[..., :D], "q")
    for name, out, ref, part in (("k", k_cache, k_ref, 1), ("v", v_cache, v_ref, 2)):
        e = None if eager is None else eager[..., part * D : (part + 1) * D].reshape(B, T, H, -1).transpose(1, 2)
        written = out[:, :, slots]
        check_close(written, ref[:, :, slots], e, f"{name} at the slots")
        others = torch.ones(out.shape[2], dtype=torch.bool, device=out.device)
        others[slots] = False
        assert torch.equal(out[:, :, others], ref[:, :, others]), f"{name}_cache changed outside the slots"
    return q


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", T_VALUES)
def test_matches_reference(T, dtype):
    S = 160
    for prefix in sorted({0, (S - T) // 2, S - T}):  # up to the end of the context
        x, p, kc, vc = _inputs(1, T, 64, 4, S, dtype, seed=T + prefix)
        _check(x, p, kc, vc, torch.arange(prefix, prefix + T, device=DEV))


@pytest.mark.parametrize("B, T, D, H", [(2, 5, 64, 4), (1, 17, 256, 4), (1, 5, 768, 12), (1, 3, 96, 3)])
def test_wider_shapes_and_batches(B, T, D, H):
    x, p, kc, vc = _inputs(B, T, D, H, 40, torch.float32, seed=D)
    slots = [9, 3, 30, 31, 0, 39, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22][:T]  # any order, any gaps
    _check(x, p, kc, vc, torch.tensor(slots, device=DEV))


def test_non_contiguous_inputs_and_cache():
    B, T, D, H, S = 2, 5, 64, 4, 32
    x, p, _, _ = _inputs(B, T, D, H, S, torch.float32, seed=3)
    p["weight"] = transposed(p["weight"])
    g = torch.Generator().manual_seed(4)
    k = rand(g, B, S, H, D // H).transpose(1, 2)  # [B, H, S, Dh] views of a [B, S, H, Dh] buffer
    v = rand(g, B, S, H, D // H).transpose(1, 2)
    _check(strided(x), p, k, v, torch.arange(7, 7 + T, device=DEV))


def test_layer_cache_view_and_int32_slots():
    """The model passes one layer of the [L, B, H, S, Dh] cache; the other layers stay untouched."""
    x, p, _, _ = _inputs(1, 5, 64, 4, 24, torch.float32, seed=5)
    g = torch.Generator().manual_seed(5)
    cache = rand(g, 2, 3, 1, 4, 24, 16)
    before = cache.clone()
    _check(x, p, cache[0, 1], cache[1, 1], torch.arange(10, 15, device=DEV, dtype=torch.int32))
    for layer in (0, 2):
        assert torch.equal(cache[:, layer], before[:, layer])


def test_gpu_blocks_in_the_interpreter(monkeypatch):
    """The GPU's 16-wide column blocks and K steps (fp32: 32, fp16: 128), several row blocks."""
    if DEV == "cuda":
        pytest.skip("on a GPU the other tests run these blocks")
    gpu_blocks(monkeypatch, qkv_mod)
    for dtype in (torch.float32, torch.float16):
        x, p, kc, vc = _inputs(1, 17, 256, 4, 40, dtype, seed=7)
        _check(x, p, kc, vc, torch.arange(20, 37, device=DEV))


@pytest.mark.parametrize("bad, error, message", [
    (dict(slots=torch.tensor([0, 1, 40])), ValueError, r"slots\[2\] = 40 is outside the cache's 40 slots"),
    (dict(slots=torch.tensor([0, -1, 2])), ValueError, r"slots\[1\] = -1"),
    (dict(slots=torch.tensor([0, 1])), ValueError, "slots must be an int"),
    (dict(slots=torch.tensor([0.0, 1, 2])), ValueError, "slots must be an int"),
    (dict(weight=torch.zeros(64, 64)), ValueError, r"weight must be \[3D, D\]"),
    (dict(bias=torch.zeros(64)), ValueError, r"bias must have shape \[192\]"),
    (dict(ln_weight=torch.zeros(64, dtype=torch.float16)), TypeError, "ln_weight.dtype"),
    (dict(x=torch.zeros(3, 64)), ValueError, r"x must be 3-D"),
    (dict(x=torch.zeros(1, 3, 32)), ValueError, "x must have 64 features"),
    (dict(k_cache=torch.zeros(1, 4, 40, 8)), ValueError, r"k_cache must be \[B=1, H, S, Dh\]"),
    (dict(eps=0.0), ValueError, "eps must be positive"),
])
@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_bad_input(bad, error, message, backend):
    x, p, kc, vc = _inputs(1, 3, 64, 4, 40, torch.float32)
    args = dict(x=x.cpu(), **{k: v.cpu() for k, v in p.items()}, k_cache=kc.cpu(), v_cache=vc.cpu(),
                slots=torch.arange(3), eps=1e-5)
    args.update(bad)
    with pytest.raises(error, match=message):
        ln_qkv(**args, backend=backend if DEV == "cpu" or backend == "eager" else None)
    if backend == "triton":  # the registered op checks its own inputs
        with pytest.raises(error, match=message):
            torch.ops.mtpkern.ln_qkv(*args.values())


def test_opcheck_cpu_reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, p, kc, vc = (t.cpu() if isinstance(t, torch.Tensor) else t for t in _inputs(1, 3, 64, 4, 16, torch.float32))
    p = {k: v.cpu() for k, v in p.items()}
    args = (x, *p.values(), kc, vc, torch.arange(4, 7), 1e-5)
    torch.library.opcheck(torch.ops.mtpkern.ln_qkv.default, args)


def test_opcheck_kernel():
    x, p, kc, vc = _inputs(1, 3, 64, 4, 16, torch.float32)
    args = (x, *p.values(), kc, vc, torch.arange(4, 7, device=DEV), 1e-5)
    # The interpreter's kernels cannot be traced by AOT dispatch; on a GPU every check runs.
    kwargs = {} if DEV == "cuda" else {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
    torch.library.opcheck(torch.ops.mtpkern.ln_qkv.default, args, **kwargs)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 16, 64, 128])
def test_cuda_gpt2_width(T, dtype):
    S = 1024
    x, p, kc, vc = _inputs(1, T, 768, 12, S, dtype, seed=T)
    _check(x, p, kc, vc, torch.arange(S - T, S, device=DEV))



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_slots_per_batch_row(dtype):
    """slots [B, T]: each batch row writes its K and V at its own slots (rows of a batch drift
    apart), every other slot untouched; q as with shared slots."""
    B, T, S = 3, 5, 40
    x, p, kc, vc = _inputs(B, T, 64, 4, S, dtype, seed=11)
    slots = torch.tensor([[9, 10, 11, 12, 13], [0, 1, 2, 3, 4], [35, 36, 37, 38, 39]], device=DEV)
    k_ref, v_ref = kc.clone(), vc.clone()
    q = ln_qkv(x, **p, k_cache=kc, v_cache=vc, slots=slots, backend="triton")
    q_ref = ln_qkv_ref(x, **p, k_cache=k_ref, v_cache=v_ref, slots=slots)
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(q.float(), q_ref.float(), atol=atol, rtol=1e-3)
    for out, ref in ((kc, k_ref), (vc, v_ref)):
        torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=1e-3)  # every slot, written or not
    for b in range(B):  # the reference itself: row b alone at its slots
        k_one, v_one = _inputs(B, T, 64, 4, S, dtype, seed=11)[2:]
        ln_qkv_ref(x[b:b + 1], **p, k_cache=k_one[b:b + 1], v_cache=v_one[b:b + 1], slots=slots[b])
        assert torch.equal(k_ref[b], k_one[b]) and torch.equal(v_ref[b], v_one[b]), b
    with pytest.raises(ValueError, match=r"slots\[2, 4\] = 40 is outside the cache's 40 slots"):
        ln_qkv(x.cpu(), **{k: v.cpu() for k, v in p.items()}, k_cache=kc.cpu(), v_cache=vc.cpu(), slots=slots.cpu() + 1,
               backend="eager")
    with pytest.raises(ValueError, match=r"slots must be an int \[T\] = \[5\] \(or per batch row \[B, T\] = \[3, 5\]\)"):
        ln_qkv(x, **p, k_cache=kc, v_cache=vc, slots=slots[:2])
