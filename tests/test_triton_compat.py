"""The Triton launchers work on the GPU machines' torch 2.11 / triton 3.6 as on CI's newer stack
(mtpkern/ops/_triton_compat.py): compiled on a GPU, in the interpreter on a CPU."""

import ast
from pathlib import Path

import pytest
import torch

import mtpkern
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


# ----------------------------------------------------------------------------- one wrapper

_COMPAT = Path(mtpkern.__file__).parent / "ops" / "_triton_compat.py"


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _direct_wrap_triton(source: str) -> list:
    """Line numbers where ``source`` reaches torch's ``wrap_triton`` itself: ``torch.library.wrap_triton``,
    ``library.wrap_triton`` or ``from torch.library import wrap_triton``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "wrap_triton":
            if _dotted(node.value).split(".")[-1] == "library":
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("library"):
            if any(alias.name == "wrap_triton" for alias in node.names):
                lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("source, found", [
    ("torch.library.wrap_triton(k)[grid](x)", [1]),
    ("import torch.library as library\nf = library.wrap_triton", [2]),
    ("from torch.library import wrap_triton", [1]),
    ("from mtpkern.ops._triton_compat import wrap_triton\nwrap_triton(k)[grid](x)", []),
    ("torch.library.triton_op('a::b', mutates_args=())", []),
])
def test_the_check_finds_direct_calls(source, found):
    assert _direct_wrap_triton(source) == found


def test_only_the_compat_module_calls_torchs_wrap_triton():
    """Every launcher goes through ``_triton_compat.wrap_triton``: torch 2.11's own refuses the
    interpreter's kernels, which failed 113 tests on the GPU machines' stack."""
    offenders = [
        f"{path.relative_to(_COMPAT.parents[2])}:{line}"
        for path in sorted(Path(mtpkern.__file__).parent.rglob("*.py")) if path != _COMPAT
        for line in _direct_wrap_triton(path.read_text())
    ]
    assert not offenders, f"use mtpkern.ops._triton_compat.wrap_triton instead: {offenders}"
