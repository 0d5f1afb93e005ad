"""ln_fc_gelu (LayerNorm + the MLP's up projection + bias + GELU) against its fp32 reference.

On CPU the Triton kernel runs in the interpreter (fp32 / fp16, D = 64, a few wider cases);
bf16 and GPT-2's width run on a GPU only.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from _fused import DEV, T_VALUES, check_close, gpu_blocks, rand, strided, transposed
from mtpkern.ops.ln_fc_gelu import ln_fc_gelu, ln_fc_gelu_ref

fc_mod = importlib.import_module("mtpkern.ops.ln_fc_gelu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(B, T, D, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = rand(g, B, T, D, scale=3.0, dtype=dtype) - 0.5
    return x, dict(ln_weight=1 + rand(g, D, scale=0.1, dtype=dtype), ln_bias=rand(g, D, scale=0.1, dtype=dtype),
                   weight=rand(g, N, D, scale=2 * D**-0.5, dtype=dtype), bias=rand(g, N, scale=0.5, dtype=dtype))


def _check(x, p, eps=1e-5):
    out = ln_fc_gelu(x, **p, eps=eps, backend="triton")
    ref = ln_fc_gelu_ref(x, **p, eps=eps)
    eager = None
    if x.dtype != torch.float32:
        h = F.linear(F.layer_norm(x, (x.shape[-1],), p["ln_weight"], p["ln_bias"], eps), p["weight"], p["bias"])
        eager = F.gelu(h, approximate="tanh")
    check_close(out, ref, eager, "h")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", T_VALUES)
def test_matches_reference(T, dtype):
    _check(*_inputs(1, T, 64, 256, dtype, seed=T))


@pytest.mark.parametrize("B, T, D, N", [(2, 5, 64, 256), (1, 17, 256, 1024), (1, 3, 96, 200)])
def test_wider_shapes_and_batches(B, T, D, N):
    _check(*_inputs(B, T, D, N, torch.float32, seed=D))


def test_non_contiguous_inputs():
    x, p = _inputs(2, 5, 64, 256, torch.float32, seed=3)
    p["weight"] = transposed(p["weight"])
    _check(strided(x), p)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy: exp(-2u) = inf
def test_gelu_tails():
    """Large pre-activations: GELU(z) -> z for z >> 0 and -> -0 for z << 0, without inf or NaN."""
    x, p = _inputs(1, 5, 64, 256, torch.float32, seed=4)
    p["bias"] = torch.linspace(-60, 60, 256, device=DEV)
    out = _check(x, p)
    assert torch.isfinite(out).all()


def test_gpu_blocks_in_the_interpreter(monkeypatch):
    if DEV == "cuda":
        pytest.skip("on a GPU the other tests run these blocks")
    gpu_blocks(monkeypatch, fc_mod)
    for dtype in (torch.float32, torch.float16):
        _check(*_inputs(1, 17, 256, 400, dtype, seed=7))


@pytest.mark.parametrize("bad, error, message", [
    (dict(weight=torch.zeros(256)), ValueError, r"weight must be 2-D"),
    (dict(bias=torch.zeros(64)), ValueError, r"bias must have shape \[256\]"),
    (dict(ln_bias=torch.zeros(32)), ValueError, r"ln_bias must have shape \[64\]"),
    (dict(weight=torch.zeros(256, 64, dtype=torch.float16)), TypeError, r"weight.dtype"),
    (dict(x=torch.zeros(1, 0, 64)), ValueError, "x is empty"),
    (dict(x=torch.zeros(1, 3, 64, dtype=torch.int64)), TypeError, "x.dtype must be float32"),
    (dict(eps=-1.0), ValueError, "eps must be positive"),
])
@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_bad_input(bad, error, message, backend):
    x, p = _inputs(1, 3, 64, 256, torch.float32)
    args = dict(x=x.cpu(), **{k: v.cpu() for k, v in p.items()}, eps=1e-5)
    args.update(bad)
    with pytest.raises(error, match=message):
        ln_fc_gelu(**args, backend=backend if DEV == "cpu" or backend == "eager" else None)
    if backend == "triton":  # the registered op checks its own inputs
        with pytest.raises(error, match=message):
            torch.ops.mtpkern.ln_fc_gelu(*args.values())


def test_opcheck_cpu_reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, p = _inputs(1, 3, 64, 256, torch.float32)
    torch.library.opcheck(torch.ops.mtpkern.ln_fc_gelu.default, (x.cpu(), *(v.cpu() for v in p.values()), 1e-5))


def test_opcheck_kernel():
    x, p = _inputs(1, 3, 64, 256, torch.float32)
    kwargs = {} if DEV == "cuda" else {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
    torch.library.opcheck(torch.ops.mtpkern.ln_fc_gelu.default, (x, *p.values(), 1e-5), **kwargs)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 16, 64, 128])
def test_cuda_gpt2_width(T, dtype):
    _check(*_inputs(1, T, 768, 3072, dtype, seed=T))
