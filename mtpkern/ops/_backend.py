"""Which implementation an op runs: the CUDA extension, Triton, or eager PyTorch.

Three switches, from the outside in, and how they relate:

* ``generate(..., kernels=)`` (and the CLI's ``--kernels``) chooses for a whole decode:
  ``"eager"`` passes ``backend="eager"`` to every op (and uses dense-mask attention);
  ``"fused"`` passes ``backend=None`` to every op, so each op's backend comes from
  ``MTPKERN_BACKEND`` or the automatic choice below; ``"auto"`` is ``"fused"`` on CUDA and
  ``"eager"`` elsewhere.
* ``backend=`` on one op call: ``None`` or ``"auto"`` (automatic), ``"eager"``, ``"triton"`` or
  ``"cuda"`` (the C++ extension ``mtpkern._C``, whose ops also carry C++ CPU kernels). An
  explicit ``backend=`` wins over ``MTPKERN_BACKEND``.
* ``MTPKERN_BACKEND=auto|eager|triton|cuda`` (environment) forces a backend on every op call
  made with ``backend=None``, for tests and debugging.

Automatic choice on CUDA tensors: the extension where it was built and the op has it, then
Triton, then the eager reference. CPU tensors run the eager reference, except under Triton's
interpreter (``TRITON_INTERPRET=1``), where Triton kernels run on the CPU for tests.

A forced backend (by ``backend=`` or ``MTPKERN_BACKEND``) that an op does not implement falls
back, once, to that op's automatic choice (``tree_attention`` has no C++ kernel, ``verify_greedy``
no Triton one): forcing ``triton`` means "Triton where there is a Triton kernel". A forced
backend the op implements but this machine cannot run (``cuda`` without the built extension,
``triton`` on CPU tensors without the interpreter) is an error, never a silent fallback.

Nothing here touches ``torch.cuda`` at import time.
"""

from __future__ import annotations

import importlib.util
import os

BACKENDS = ("eager", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

try:  # the extension is optional at build and import time
    from mtpkern import _C  # type: ignore[attr-defined]  # noqa: F401  # compiled, no stub

    HAS_CUDA_EXT = True
except ImportError:  # pragma: no cover - depends on the build
    HAS_CUDA_EXT = False

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    """The backend named by ``MTPKERN_BACKEND``, or None (unset, empty or ``auto``).
    Unknown names are an error."""
    name = os.environ.get("MTPKERN_BACKEND", "").strip().lower()
    if name not in _CHOICES + ("",):
        raise ValueError(f"MTPKERN_BACKEND={name!r} is not one of {', '.join(_CHOICES)}")
    return None if name in ("", "auto") else name


def triton_usable(device) -> bool:
    """Whether a Triton kernel can run on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    dev_type = device.type if hasattr(device, "type") else str(device)
    return dev_type == "cuda" or triton_interpret()


def _automatic(device, available: tuple[str, ...]) -> str:
    dev_type = device.type if hasattr(device, "type") else str(device)
    if "cuda" in available and HAS_CUDA_EXT and dev_type == "cuda":
        return "cuda"
    if "triton" in available and triton_usable(device):
        return "triton"
    return "eager"


def pick(device, available: tuple[str, ...], backend: str | None = None) -> str:
    """Choose the backend for one call (see the module docstring).

    ``available`` lists the backends the op implements (always including "eager").
    ``backend`` (an explicit argument) wins over ``MTPKERN_BACKEND``, which wins over the
    automatic choice. A forced backend the op lacks falls back to the op's automatic choice;
    one the op has but the machine cannot run is an error.
    """
    if backend is not None and backend not in _CHOICES:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(_CHOICES)}")
    choice = forced_backend() if backend is None else backend
    if choice is None or choice == "auto" or choice not in available:
        return _automatic(device, available)
    if choice == "cuda" and not HAS_CUDA_EXT:
        # "cuda" names the C++ extension; its ops also carry C++ CPU kernels (used by the CPU
        # tests of the extension's input checks), so CPU tensors are allowed here.
        raise RuntimeError("backend 'cuda' needs the built extension mtpkern._C (see setup.py)")
    if choice == "triton" and not triton_usable(device):
        raise RuntimeError("backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1")
    return choice
