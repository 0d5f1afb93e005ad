"""linear_residual (projection + bias + residual add, split K) against its fp32 reference.

On CPU the Triton kernel runs in the interpreter (fp32 / fp16, small widths, and the GPU's
split-K blocks once); bf16 and GPT-2's width run on a GPU only.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from _fused import DEV, T_VALUES, check_close, gpu_blocks, rand, strided, transposed
from mtpkern.ops._decode_linear import split_counters
from mtpkern.ops.linear_residual import linear_residual, linear_residual_ref

lr_mod = importlib.import_module("mtpkern.ops.linear_residual")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(B, T, K, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (rand(g, B, T, K, dtype=dtype), rand(g, N, K, scale=K**-0.5, dtype=dtype),
            rand(g, N, scale=0.1, dtype=dtype), rand(g, B, T, N, scale=3.0, dtype=dtype))


def _check(x, weight, bias, residual):
    out = linear_residual(x, weight, bias, residual, backend="triton")
    ref = linear_residual_ref(x, weight, bias, residual)
    eager = None if x.dtype == torch.float32 else residual + F.linear(x, weight, bias)
    check_close(out, ref, eager, "out")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("K", [64, 256])
def test_matches_reference(T, K, dtype):
    _check(*_inputs(1, T, K, 64, dtype, seed=T + K))


@pytest.mark.parametrize("B, T, K, N", [(2, 5, 64, 64), (1, 17, 1024, 256), (1, 3, 200, 96)])
def test_wider_shapes_and_batches(B, T, K, N):
    _check(*_inputs(B, T, K, N, torch.float32, seed=K))


def test_non_contiguous_inputs():
    x, w, b, r = _inputs(2, 5, 64, 64, torch.float32, seed=3)
    _check(strided(x), transposed(w), b, strided(r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B, T, K, N", [(1, 17, 1024, 256), (1, 1, 768, 48), (2, 3, 600, 40)])
def test_split_k_gpu_blocks_in_the_interpreter(monkeypatch, B, T, K, N, dtype):
    """The GPU's blocks: 16 or 32 columns, K split over programs and reduced by the last one, in
    split order; the counters are zero again afterwards (ready for the next launch or replay)."""
    if DEV == "cuda":
        pytest.skip("on a GPU the other tests run these blocks")
    gpu_blocks(monkeypatch, lr_mod)
    cfg = lr_mod.blocks(B * T, N, K, dtype, split_k=True)
    assert cfg["SPLIT_K"] > 1 and cfg["BLOCK_N"] in (16, 32), cfg
    args = _inputs(B, T, K, N, dtype, seed=K)
    first = _check(*args)
    assert not split_counters(torch.device(DEV), 1).any()
    assert torch.equal(linear_residual(*args, backend="triton"), first), "not deterministic"


def test_the_model_reshape_of_tree_attention_output():
    """x as the model passes it: tree attention's [B, T, H, Dh] buffer, seen as [B, T, D]."""
    x, w, b, r = _inputs(1, 5, 64, 64, torch.float32, seed=4)
    y = x.view(1, 5, 4, 16).transpose(1, 2)  # what tree_attention returns
    _check(y.transpose(1, 2).reshape(1, 5, 64), w, b, r)


@pytest.mark.parametrize("bad, error, message", [
    (dict(weight=torch.zeros(64, 32)), ValueError, "x must have 32 features"),
    (dict(bias=torch.zeros(63)), ValueError, r"bias must have shape \[64\]"),
    (dict(residual=torch.zeros(1, 4, 64)), ValueError, r"residual .* differ in \[B, T\]"),
    (dict(residual=torch.zeros(1, 3, 32)), ValueError, "residual must have 64 features"),
    (dict(residual=torch.zeros(1, 3, 64, dtype=torch.float16)), TypeError, "residual must be torch.float32"),
    (dict(x=torch.zeros(3, 64)), ValueError, "x must be 3-D"),
])
@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_bad_input(bad, error, message, backend):
    x, w, b, r = (t.cpu() for t in _inputs(1, 3, 64, 64, torch.float32))
    args = dict(x=x, weight=w, bias=b, residual=r)
    args.update(bad)
    with pytest.raises(error, match=message):
        linear_residual(**args, backend=backend if DEV == "cpu" or backend == "eager" else None)
    if backend == "triton":  # the registered op checks its own inputs
        with pytest.raises(error, match=message):
            torch.ops.mtpkern.linear_residual(*args.values())


def test_opcheck_cpu_reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.library.opcheck(torch.ops.mtpkern.linear_residual.default,
                          tuple(t.cpu() for t in _inputs(1, 3, 64, 64, torch.float32)))


def test_opcheck_kernel():
    kwargs = {} if DEV == "cuda" else {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
    torch.library.opcheck(torch.ops.mtpkern.linear_residual.default, _inputs(1, 3, 64, 64, torch.float32), **kwargs)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 16, 64, 128])
@pytest.mark.parametrize("K", [768, 3072])
def test_cuda_gpt2_width(T, K, dtype):
    args = _inputs(1, T, K, 768, dtype, seed=T)
    out = _check(*args)
    assert torch.equal(linear_residual(*args), out), "split-K reduction is not deterministic"


def test_split_counters_never_cache_a_fake_tensor():
    """While torch.compile traces a launcher, its counters must be fresh (fake) zeros, and the
    per-device buffer real launches share must stay a real tensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    real = split_counters(torch.device("cpu"), 8)
    with FakeTensorMode() as mode:
        fake = split_counters(torch.device("cpu"), 8, like=mode.from_tensor(torch.zeros(1)))
        assert is_fake(fake) and fake.shape == (8,)
    again = split_counters(torch.device("cpu"), 8)
    assert again is real and not is_fake(again)
