"""Input checks shared by the ops' eager references, written to match ``csrc/mtpkern.h``.

The C++ ops (``tree_buffers``, ``verify_greedy``, ``verify_typical``, ``kv_compact_``) check
their inputs in C++; their eager references run these checks, in the same order and with the
same exception types and messages, so one bad input fails the same way in every backend:
``TypeError`` for a wrong dtype, ``ValueError`` for a wrong shape, device, layout or value.
Shapes print as ``[2, 3]`` and dtypes as ``int64``, as C++ prints them. The checks read no
tensor values (they run on fake tensors too).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from mtpkern.runtime import dtype_name


def check_vector(t: Tensor, op: str, name: str, dtype: torch.dtype) -> None:
    """1-D, of ``dtype``, contiguous (``check_vector`` in C++)."""
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got shape {list(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype_name(dtype)}, got {dtype_name(t.dtype)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def check_rows(t: Tensor, op: str, name: str, dtype: torch.dtype) -> None:
    """[T] or [B, T], of ``dtype``, contiguous (``check_rows`` in C++)."""
    if t.dim() not in (1, 2):
        raise ValueError(f"{op}: {name} must be 1-D [T] or 2-D [B, T], got shape {list(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype_name(dtype)}, got {dtype_name(t.dtype)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def check_same_device(a: Tensor, b: Tensor, op: str, name: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{op}: {name} is on {b.device} but the other inputs are on {a.device}")


def check_nonnegative_finite(value, op: str, name: str) -> None:
    """A finite number >= 0 (C++ prints a double as ``%g`` does)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{op}: {name} must be finite and non-negative, got {float(value):g}")


def values_on_host(t: Tensor) -> bool:
    """Whether a check may read ``t``'s values for free: a real CPU tensor, outside a graph
    capture (where reading a value is a host sync, which a capture forbids)."""
    if t.device.type != "cpu" or is_fake(t):
        return False
    capturing = getattr(torch.get_device_module(t.device), "is_current_stream_capturing", None)
    return capturing is None or not capturing()
