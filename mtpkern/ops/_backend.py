"""Which implementation an op runs: the CUDA extension, Triton, or eager PyTorch.

Order of preference on CUDA tensors: the extension ``mtpkern._C`` where it was built, then
Triton, then the eager reference. CPU tensors always run the eager reference, except under
Triton's interpreter (``TRITON_INTERPRET=1``), where Triton kernels run on the CPU for tests.
``MTPKERN_BACKEND=eager|triton|cuda`` forces one backend, for tests and debugging.

Nothing here touches ``torch.cuda`` at import time.
"""

from __future__ import annotations

import importlib.util
import os

BACKENDS = ("eager", "triton", "cuda")

try:  # the extension is optional at build and import time
    from mtpkern import _C  # noqa: F401

    HAS_CUDA_EXT = True
except ImportError:  # pragma: no cover - depends on the build
    HAS_CUDA_EXT = False

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    """The backend named by ``MTPKERN_BACKEND``, or None. Unknown names are an error."""
    name = os.environ.get("MTPKERN_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"MTPKERN_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def triton_usable(device) -> bool:
    """Whether a Triton kernel can run on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    dev_type = device.type if hasattr(device, "type") else str(device)
    return dev_type == "cuda" or triton_interpret()


def pick(device, available: tuple[str, ...], backend: str | None = None) -> str:
    """Choose the backend for one call.

    ``available`` lists the backends the op implements (always including "eager").
    ``backend`` (an explicit argument) wins over ``MTPKERN_BACKEND``, which wins over the
    automatic choice. A forced backend the op or device cannot run is an error, never a
    silent fallback, so tests that force a backend test what they claim to.
    """
    choice = backend or forced_backend()
    dev_type = device.type if hasattr(device, "type") else str(device)
    if choice is not None and choice not in BACKENDS:
        raise ValueError(f"backend={choice!r} is not one of {', '.join(BACKENDS)}")
    if choice is None or choice == "auto":
        if "cuda" in available and HAS_CUDA_EXT and dev_type == "cuda":
            return "cuda"
        if "triton" in available and triton_usable(device):
            return "triton"
        return "eager"
    if choice not in available:
        # An op without that backend runs its best other implementation on that device.
        return pick(device, available, None) if choice != "eager" else "eager"
    if choice == "cuda" and not HAS_CUDA_EXT:
        # "cuda" names the C++ extension; its ops also carry C++ CPU kernels (used by the CPU
        # tests of the extension's input checks), so CPU tensors are allowed here.
        raise RuntimeError("backend 'cuda' needs the built extension mtpkern._C (see setup.py)")
    if choice == "triton" and not triton_usable(device):
        raise RuntimeError("backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1")
    return choice
