"""The Triton launchers work on the GPU machines' torch 2.11 / triton 3.6 as on CI's newer stack
(mtpkern/ops/_triton_compat.py): compiled on a GPU, in the interpreter on a CPU."""

import pytest
import torch

from mtpkern.ops import _backend

pytestmark = pytest.mark.skipif(not _backend.HAS_TRITON, reason="triton is not installed")
DEVICE = "cpu" if _backend.triton_interpret() else "cuda"


def _kernel():
    import triton
    import triton.language as tl

    from mtpkern.ops import _triton_compat  # noqa: F401 - the interpreter fix applies on import

    @triton.jit
    def sum_blocks(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n, BLOCK):  # a loop bound from a scalar argument
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr, tl.sum(acc, axis=0))

    return sum_blocks


@pytest.mark.skipif(not _backend.triton_interpret(), reason="checks the interpreter's kernel objects")
def test_wrap_triton_hands_back_the_interpreters_kernel():
    from mtpkern.ops._triton_compat import wrap_triton

    kernel = _kernel()
    assert wrap_triton(kernel) is kernel


@pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no GPU and no interpreter")
@pytest.mark.parametrize("n", [1, 16, 37])
def test_kernel_loops_over_a_scalar_argument(n):
    from mtpkern.ops._triton_compat import wrap_triton

    x, out = torch.arange(n, dtype=torch.float32, device=DEVICE), torch.zeros(1, device=DEVICE)
    wrap_triton(_kernel())[(1,)](x, out, n, BLOCK=16)
    assert out.item() == n * (n - 1) / 2
