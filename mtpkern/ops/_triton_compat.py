"""What the Triton launchers need from torch and Triton, on every version the package supports.

The GPU machines run torch 2.11 / triton 3.6, CI runs torch 2.14 / triton 3.8; both must pass.

- ``wrap_triton``: under ``TRITON_INTERPRET=1``, ``@triton.jit`` builds an interpreter object
  that torch 2.11's ``torch.library.wrap_triton`` refuses ("only works on functions annotated
  with triton.jit"), where torch 2.14's hands it back unchanged. Here it is handed back on
  every version; compiled kernels still go through torch's wrapper (looked up at call time).
- triton < 3.7's interpreter turns a scalar kernel argument into a one-element 1-D array and
  ``int()``s it in ``range(0, n, BLOCK)``, which numpy >= 2.4 refuses ("only 0-dimensional
  arrays can be converted to Python scalars"); triton 3.7 squeezes the array first. Importing
  this module under the interpreter applies that fix to older Triton.
"""

from __future__ import annotations

import torch

from mtpkern.ops import _backend


def _is_interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported Triton has it
        return False
    return isinstance(kernel, InterpretedFunction)


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, or the kernel itself when the interpreter built it."""
    if _is_interpreted(kernel):
        return kernel
    return torch.library.wrap_triton(kernel)


def _patch_old_interpreter_index() -> None:
    import triton
    from triton.runtime import interpreter

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if (major, minor) >= (3, 7) or patch_tensor is None or getattr(patch_tensor, "_mtpkern", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        # The scope restores attributes last-in first-out, so this one is undone first.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._mtpkern = True  # type: ignore[attr-defined]  # a mark on the function: patch once
    interpreter._patch_lang_tensor = patched


def _install() -> None:
    if _backend.HAS_TRITON and _backend.triton_interpret():
        _patch_old_interpreter_index()


_install()
