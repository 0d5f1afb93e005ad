"""rms_qkv_rope (the Llama family's RMSNorm + QKV (+ bias) + rotary + K/V cache write) against
its fp32 reference and the eager model's maths.

On CPU the Triton kernel runs in the interpreter (fp32 / fp16): head dims 8 and 64, query / KV
heads 4/2, 9/3 and 4/4, T = 1, 3, 7, with and without the q/k/v bias, batch 1 and 3 (each row
at its own slots and positions).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from _fused import DEV, check_close, gpu_blocks, rand, strided
from mtpkern.config import LlamaConfig
from mtpkern.llama import Rotary, apply_rope, rms_norm
from mtpkern.ops.rms_qkv_rope import rms_qkv_rope, rms_qkv_rope_ref

blocks_of = importlib.import_module("mtpkern.ops._rms_linear")  # pair_blocks reads its blocks

HEADS = [(8, 4, 2), (64, 9, 3), (8, 4, 4)]  # (Dh, H, H_kv)
D, S, EPS = 48, 48, 1e-6


def _inputs(B, T, Dh, H, Hk, dtype, bias=True, seed=0, pos=None):
    g = torch.Generator().manual_seed(seed)
    N = (H + 2 * Hk) * Dh
    x = rand(g, B, T, D, scale=2.0, dtype=dtype) + 0.3
    p = dict(ln_weight=1 + rand(g, D, scale=0.1, dtype=dtype), weight=rand(g, N, D, scale=D**-0.5, dtype=dtype),
             bias=rand(g, N, scale=0.3, dtype=dtype) if bias else None)
    if pos is None:  # a tree's positions: prefix + depth
        pos = torch.tensor([5, 6, 6, 7, 7, 8, 9][:T], device=DEV)
    cfg = LlamaConfig.tiny(n_embd=D, n_head=H, n_kv_head=Hk, head_dim=Dh, rope_theta=100.0)
    cos, sin = (t[:, 0] for t in Rotary(cfg)(pos, dtype))  # [B or 1, T, Dh]
    cache = rand(g, 2, B, Hk, S, Dh, dtype=dtype)  # every slot the op must not write keeps its value
    return x, p, cos, sin, cache[0], cache[1]


def _eager(x, p, cos, sin, H, Hk, Dh):
    """What the eager model (``decode_llama_block``) computes, in x's dtype: q [B, T, H Dh], and
    k, v [B, H_kv, T, Dh]."""
    B, T, _ = x.shape
    y = F.linear(rms_norm(x, p["ln_weight"], EPS), p["weight"], p["bias"])
    q, k, v = y.view(B, T, H + 2 * Hk, Dh).transpose(1, 2).split([H, Hk, Hk], dim=1)
    c, s = cos[:, None], sin[:, None]
    return apply_rope(q, c, s).transpose(1, 2).reshape(B, T, H * Dh), apply_rope(k, c, s), v


def _check(x, p, cos, sin, kc, vc, slots):
    """Kernel vs reference (vs eager's own error in fp16): q, and both caches in full."""
    k_ref, v_ref = kc.clone(), vc.clone()
    q = rms_qkv_rope(x, **p, cos=cos, sin=sin, k_cache=kc, v_cache=vc, slots=slots, eps=EPS, backend="triton")
    q_ref = rms_qkv_rope_ref(x, **p, cos=cos, sin=sin, k_cache=k_ref, v_cache=v_ref, slots=slots, eps=EPS)
    B, Hk, Dh = kc.shape[0], kc.shape[1], kc.shape[3]
    H = p["weight"].shape[0] // Dh - 2 * Hk
    half = x.dtype != torch.float32
    e = _eager(x, p, cos, sin, H, Hk, Dh) if half else (None, None, None)
    check_close(q, q_ref, e[0], "q")
    rows = torch.arange(B, device=DEV)[:, None]
    at = slots.to(torch.int64) if slots.dim() == 2 else slots.to(torch.int64)[None].expand(B, -1)
    for name, out, ref, eager in (("k", kc, k_ref, e[1]), ("v", vc, v_ref, e[2])):
        written, want = out[rows, :, at], ref[rows, :, at]  # [B, T, H_kv, Dh]
        check_close(written, want, None if eager is None else eager.transpose(1, 2), f"{name} at the slots")
        untouched = torch.ones(B, S, dtype=torch.bool, device=DEV)
        untouched[rows, at] = False
        assert torch.equal(out.transpose(1, 2)[untouched], ref.transpose(1, 2)[untouched]), f"{name} written elsewhere"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", [1, 3, 7])
@pytest.mark.parametrize("Dh, H, Hk", HEADS)
def test_matches_reference(Dh, H, Hk, T, bias, dtype):
    x, p, cos, sin, kc, vc = _inputs(1, T, Dh, H, Hk, dtype, bias, seed=Dh + T)
    _check(x, p, cos, sin, kc, vc, torch.arange(33, 33 + T, device=DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Dh, H, Hk", HEADS)
def test_batch_rows_at_their_own_slots_and_positions(Dh, H, Hk, dtype):
    """B = 3, each row at its own prefix (0, 5, 33): slots [B, T], rotary [B, T, Dh]."""
    T = 3
    prefix = torch.tensor([0, 5, 33], device=DEV)
    depth = torch.tensor([0, 1, 1], device=DEV)
    x, p, cos, sin, kc, vc = _inputs(3, T, Dh, H, Hk, dtype, seed=Dh, pos=prefix[:, None] + depth)
    assert cos.shape == (3, T, Dh)
    _check(x, p, cos, sin, kc, vc, prefix[:, None] + torch.arange(T, device=DEV))


def test_non_contiguous_inputs():
    """x with batch and tokens swapped in memory and gaps (NaN) between features, a transposed
    weight, caches as views of a [B, S, H_kv, Dh] buffer, int32 slots."""
    x, p, cos, sin, _, _ = _inputs(2, 3, 8, 4, 2, torch.float32, seed=3)
    p["weight"] = p["weight"].T.contiguous().T
    g = torch.Generator().manual_seed(4)
    kc, vc = (rand(g, 2, S, 2, 8).transpose(1, 2) for _ in range(2))
    _check(strided(x), p, cos, sin, kc, vc, torch.arange(10, 13, device=DEV, dtype=torch.int32))


def test_gpu_blocks_in_the_interpreter(monkeypatch):
    """The GPU's 16-pair column blocks and K steps: several column blocks, each a mix of q, k
    and v heads' rotary pairs."""
    if DEV == "cuda":
        pytest.skip("on a GPU the other tests run these blocks")
    gpu_blocks(monkeypatch, blocks_of)
    for dtype in (torch.float32, torch.float16):
        x, p, cos, sin, kc, vc = _inputs(1, 5, 64, 9, 3, dtype, seed=9)
        _check(x, p, cos, sin, kc, vc, torch.arange(20, 25, device=DEV))


def _good():
    x, p, cos, sin, kc, vc = _inputs(1, 3, 8, 4, 2, torch.float32)
    args = dict(x=x, **p, cos=cos, sin=sin, k_cache=kc, v_cache=vc, slots=torch.arange(3, device=DEV), eps=EPS)
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.parametrize("bad, error, message", [
    (dict(weight=torch.zeros(70, D)), ValueError, r"must be \[\(H \+ 2 H_kv\) Dh, D\]"),
    (dict(weight=torch.zeros(40, D)), ValueError, "H a multiple of H_kv = 2"),  # H = 1 < H_kv
    (dict(bias=torch.zeros(63)), ValueError, r"bias must have shape \[64\]"),
    (dict(ln_weight=torch.zeros(D, dtype=torch.float16)), TypeError, "ln_weight.dtype"),
    (dict(cos=torch.zeros(1, 3, 4)), ValueError, r"cos must be \[B or 1, T, Dh\]"),
    (dict(sin=torch.zeros(1, 3, 8, dtype=torch.float16)), TypeError, "sin must be torch.float32"),
    (dict(x=torch.zeros(1, 3, 40)), ValueError, f"x must have {D} features"),
    (dict(k_cache=torch.zeros(1, 2, 40, 8)), ValueError, "differ"),
    (dict(slots=torch.tensor([0, 1, S])), ValueError, rf"slots\[2\] = {S} is outside the cache's {S} slots"),
    (dict(eps=0.0), ValueError, "eps must be positive"),
])
@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_bad_input(bad, error, message, backend):
    args = {**_good(), **bad}
    with pytest.raises(error, match=message):
        rms_qkv_rope(**args, backend=backend if DEV == "cpu" or backend == "eager" else None)
    if backend == "triton":  # the registered op checks its own inputs
        with pytest.raises(error, match=message):
            torch.ops.mtpkern.rms_qkv_rope(*args.values())


def test_opcheck():
    args = tuple(v.to(DEV) if isinstance(v, torch.Tensor) else v for v in _good().values())
    # The interpreter's kernels cannot be traced by AOT dispatch; on a GPU every check runs.
    kwargs = {} if DEV == "cuda" else {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
    torch.library.opcheck(torch.ops.mtpkern.rms_qkv_rope.default, args, **kwargs)
