"""rms_swiglu (the Llama family's RMSNorm + gate/up projections + SiLU(gate) * up) against its
fp32 reference and the eager model's maths, in the interpreter on CPU (fp32 / fp16)."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from _fused import DEV, check_close, gpu_blocks, rand, strided
from mtpkern.llama import rms_norm
from mtpkern.ops.rms_swiglu import rms_swiglu, rms_swiglu_ref

blocks_of = importlib.import_module("mtpkern.ops._rms_linear")  # pair_blocks reads its blocks

EPS = 1e-5


def _inputs(B, T, D, I, dtype, seed=0):  # noqa: E741 - the MLP's intermediate size
    g = torch.Generator().manual_seed(seed)
    x = rand(g, B, T, D, scale=2.0, dtype=dtype) - 0.2
    return x, 1 + rand(g, D, scale=0.1, dtype=dtype), rand(g, 2 * I, D, scale=2 * D**-0.5, dtype=dtype)


def _check(x, g, w):
    h = rms_swiglu(x, g, w, eps=EPS, backend="triton")
    ref = rms_swiglu_ref(x, g, w, EPS)
    eager = None
    if x.dtype != torch.float32:  # SwiGLU.forward's maths in this dtype
        gate, up = F.linear(rms_norm(x, g, EPS), w).chunk(2, dim=-1)
        eager = F.silu(gate) * up
    check_close(h, ref, eager, "h")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B, T", [(1, 1), (1, 3), (3, 7)])
@pytest.mark.parametrize("D, I", [(48, 40), (64, 96), (32, 1)])
def test_matches_reference(D, I, B, T, dtype):  # noqa: E741
    _check(*_inputs(B, T, D, I, dtype, seed=D + T))


def test_non_contiguous_inputs():
    x, g, w = _inputs(2, 3, 48, 40, torch.float32, seed=1)
    _check(strided(x), g, w.T.contiguous().T)


def test_gpu_blocks_in_the_interpreter(monkeypatch):
    """The GPU's 16-wide column blocks and K steps, several column blocks."""
    if DEV == "cuda":
        pytest.skip("on a GPU the other tests run these blocks")
    gpu_blocks(monkeypatch, blocks_of)
    for dtype in (torch.float32, torch.float16):
        _check(*_inputs(1, 5, 160, 72, dtype, seed=2))


@pytest.mark.parametrize("bad, error, message", [
    (dict(w=torch.zeros(41, 48)), ValueError, r"weight must be \[2I, D\]"),
    (dict(w=torch.zeros(80, 40)), ValueError, "x must have 40 features"),
    (dict(g=torch.zeros(47)), ValueError, r"ln_weight must have shape \[48\]"),
    (dict(g=torch.zeros(48, dtype=torch.float16)), TypeError, "ln_weight.dtype"),
    (dict(x=torch.zeros(3, 48)), ValueError, "x must be 3-D"),
    (dict(eps=-1.0), ValueError, "eps must be positive"),
])
@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_bad_input(bad, error, message, backend):
    x, g, w = (t.cpu() for t in _inputs(1, 3, 48, 40, torch.float32))
    args = {"x": x, "g": g, "w": w, "eps": EPS, **bad}
    with pytest.raises(error, match=message):
        rms_swiglu(*list(args.values())[:3], eps=args["eps"], backend=backend if DEV == "cpu" or backend == "eager" else None)
    if backend == "triton":  # the registered op checks its own inputs
        with pytest.raises(error, match=message):
            torch.ops.mtpkern.rms_swiglu(*args.values())


def test_opcheck():
    x, g, w = _inputs(1, 3, 48, 40, torch.float32)
    kwargs = {} if DEV == "cuda" else {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
    torch.library.opcheck(torch.ops.mtpkern.rms_swiglu.default, (x, g, w, EPS), **kwargs)
