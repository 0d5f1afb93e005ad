"""A CPU stand-in for the ``torch.cuda`` graph and stream primitives, with a capture's contract.

The engines reach their device's primitives through ``torch.get_device_module(device)``
(``torch.cuda`` for a CUDA model). ``install(monkeypatch)`` gives ``torch.cpu`` the CUDA ones
it lacks (``CUDAGraph``, ``graph``, ``device``) and replaces its ``Stream``, ``current_stream``,
``stream``, ``Event`` and ``synchronize``, so that the engines' real graph code runs on a CPU
model. Nothing of mtpkern's is replaced: this fakes torch's seam only.

What a capture does here, as on a GPU:
- it **records** every ATen / custom op the captured code dispatches (a ``TorchDispatchMode``),
  and ``replay()`` runs them again, writing each result into the very tensors the capture
  returned: the graph's outputs and intermediates live in memory of its own (the "pool");
- nothing the capture runs takes effect: tensors allocated before the capture that the captured
  code writes are restored afterwards, and the capture's own outputs hold garbage (NaN, -1)
  until the first replay, as a GPU leaves them;
- it **refuses host synchronisation**: ``.item()``, ``int()`` / ``float()`` / ``bool()`` of a
  tensor, ``.tolist()``, ``.numpy()``, ops whose output shape depends on the data
  (``nonzero``, ``masked_select``, ...), ``torch.tensor(host data)`` (a host-to-device copy),
  ``synchronize()`` of the device, a stream or an event: each raises ``CaptureError``;
- the graph holds tensors from before the capture by their **memory only** (a weak reference to
  the storage, its offset, sizes and strides, as a GPU graph holds pointers): replaying after
  such a tensor was freed, or resized to other memory, raises ``CaptureError``. The caller must
  copy new inputs into the static buffers the capture read, and read the outputs it returned.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten


class CaptureError(RuntimeError):
    """Something a CUDA graph capture cannot do (host sync, freed or reallocated memory)."""


# Ops that make the host wait for the device (their result, or their output's shape, is data).
_SYNCING = {
    aten._local_scalar_dense.default: "reads a tensor's value on the host (.item(), int(), float(), bool(), if t:)",
    aten.nonzero.default: "nonzero's output shape depends on the data",
    aten.masked_select.default: "masked_select's output shape depends on the data",
    aten.equal.default: "torch.equal returns a host bool",
    aten.is_nonzero.default: "reads a tensor's truth value on the host",
    aten.lift_fresh.default: "torch.tensor(host data) copies from the host",
}
for _name in ("_unique2", "unique_dim", "unique_consecutive", "repeat_interleave"):
    for _overload in getattr(aten, _name).overloads():
        _SYNCING[getattr(getattr(aten, _name), _overload)] = f"{_name}'s output shape depends on the data"

_STATE = {"capturing": None}  # the CUDAGraph being captured, if any


def _refuse_if_capturing(what: str) -> None:
    if _STATE["capturing"] is not None:
        raise CaptureError(f"{what} inside a CUDA graph capture: the host would wait for the device")


# ----------------------------------------------------------------------------- recording


@dataclass
class _Held:
    """A tensor from before the capture, held by its memory as a GPU graph holds a pointer."""

    storage: StorageWeakRef
    ptr: int
    nbytes: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> _Held:
        s = t.untyped_storage()
        return cls(StorageWeakRef(s), s.data_ptr(), s.nbytes(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)

    def tensor(self) -> torch.Tensor:
        if self.storage.expired():
            raise CaptureError(f"a tensor the graph captured ({self.dtype}, {list(self.size)}) was freed after the "
                               "capture: a replay would use memory that is no longer its own")
        storage = torch.UntypedStorage._new_with_weak_ptr(self.storage.cdata)
        if storage.data_ptr() != self.ptr or storage.nbytes() != self.nbytes:
            raise CaptureError(f"a tensor the graph captured ({self.dtype}, {list(self.size)}) was reallocated "
                               "after the capture: the graph still reads its old memory")
        return torch.empty(0, dtype=self.dtype).set_(storage, self.offset, self.size, self.stride)


@dataclass
class _Op:
    func: torch._ops.OpOverload
    args: tuple
    kwargs: dict
    fresh: list  # per output: the tensor if it lives in memory the op allocated (the pool), else None


def _storages(values) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)}


def _fresh_outputs(out, inputs: set[int]) -> list:
    """The op's outputs in new memory (not views of, or the same tensors as, its inputs), judged
    by memory rather than by the schema: ``aten.to`` may or may not return its input."""
    return [t if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs else None
            for t in tree_flatten(out)[0]]


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors ``func`` writes in place (``Tensor(a!)`` arguments)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = kwargs.get(arg.name) if arg.kwarg_only or i >= len(args) else args[i]
        out += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return out


class _Recorder(TorchDispatchMode):
    """Runs and records a capture's ops; keeps what existed before it unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []
        self.pool: set[int] = set()  # data pointers of the storages the capture allocated
        self.saved: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}

    def _hold(self, value):
        if not isinstance(value, torch.Tensor) or value.untyped_storage().data_ptr() in self.pool:
            return value
        return _Held.of(value)

    def _save(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.data_ptr() not in self.pool and s.data_ptr() not in self.saved:
            self.saved[s.data_ptr()] = (s, s.clone())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCING:
            raise CaptureError(f"{func} inside a CUDA graph capture: {_SYNCING[func]}")
        for t in _written(func, args, kwargs):
            self._save(t)
        out = func(*args, **kwargs)
        fresh = _fresh_outputs(out, _storages((args, kwargs)))
        self.pool |= {t.untyped_storage().data_ptr() for t in fresh if t is not None}
        self.ops.append(_Op(func, tree_map(self._hold, args), tree_map(self._hold, kwargs), fresh))
        return out

    def finish(self) -> None:
        """Undo the capture's writes to older tensors; its own outputs hold garbage."""
        for storage, copy in self.saved.values():
            storage.copy_(copy)
        self.saved.clear()
        for op in self.ops:
            for t in op.fresh:
                if t is not None:
                    t.untyped_storage().fill_(0xFF)  # NaN in floats, -1 in integers


def _resolve(value):
    return value.tensor() if isinstance(value, _Held) else value


# ----------------------------------------------------------------------------- the primitives


class CUDAGraph:
    """``torch.cuda.CUDAGraph`` on the CPU: records a capture, replays it."""

    def __init__(self, keep_graph: bool = False) -> None:
        self.ops: list[_Op] | None = None
        self.pool: set[int] = set()
        self.replays = 0

    def replay(self) -> None:
        if self.ops is None:
            raise CaptureError("replay() of a CUDA graph that was never captured")
        _refuse_if_capturing("replay() of another graph")
        with torch.inference_mode(torch.is_inference_mode_enabled()):
            for op in self.ops:
                try:
                    args, kwargs = tree_map(_resolve, op.args), tree_map(_resolve, op.kwargs)
                except CaptureError as e:
                    raise CaptureError(f"{e} (an input of {op.func})") from None
                if not any(t is not None for t in op.fresh) and not _written(op.func, args, kwargs):
                    continue  # a view: it shares the memory it was taken from
                new = tree_flatten(op.func(*args, **kwargs))[0]
                for old, t in zip(op.fresh, new):
                    if old is not None:
                        old.copy_(t)
        self.replays += 1

    def reset(self) -> None:
        self.ops, self.pool = None, set()

    def pool_handle(self):
        return id(self)


@contextlib.contextmanager
def _no_host_reads():
    """``.tolist()`` and ``.numpy()`` read memory without dispatching an op: refuse them too."""
    saved = torch.Tensor.tolist, torch.Tensor.numpy

    def refuse(name):
        def method(self, *args, **kwargs):
            raise CaptureError(f"Tensor.{name}() inside a CUDA graph capture: the host would wait for the device")
        return method

    torch.Tensor.tolist, torch.Tensor.numpy = refuse("tolist"), refuse("numpy")
    try:
        yield
    finally:
        torch.Tensor.tolist, torch.Tensor.numpy = saved


@contextlib.contextmanager
def graph(cuda_graph: CUDAGraph, pool=None, stream=None, capture_error_mode: str = "global"):
    """``torch.cuda.graph``: the ops run inside are recorded into ``cuda_graph``, not run for good."""
    if _STATE["capturing"] is not None:
        raise CaptureError("a CUDA graph capture inside another capture")
    recorder = _Recorder()
    _STATE["capturing"] = cuda_graph
    try:
        with _no_host_reads(), recorder:
            yield cuda_graph
    finally:
        _STATE["capturing"] = None
        recorder.finish()
    cuda_graph.ops, cuda_graph.pool = recorder.ops, recorder.pool


class Stream:
    """``torch.cuda.Stream``: ordering is trivial on the CPU; waiting on the host is refused in a capture."""

    def __init__(self, device=None, priority: int = 0) -> None:
        self.device, self.waited_on = device, []

    def wait_stream(self, other: Stream) -> None:
        self.waited_on.append(other)

    def wait_event(self, event: Event) -> None:
        self.waited_on.append(event)

    def synchronize(self) -> None:
        _refuse_if_capturing("Stream.synchronize()")

    def query(self) -> bool:
        _refuse_if_capturing("Stream.query()")
        return True


_DEFAULT_STREAM = Stream()
_CURRENT = [_DEFAULT_STREAM]


def current_stream(device=None) -> Stream:
    return _CURRENT[-1]


@contextlib.contextmanager
def stream(s: Stream | None):
    _CURRENT.append(s if s is not None else _CURRENT[-1])
    try:
        yield
    finally:
        _CURRENT.pop()


@contextlib.contextmanager
def device(d):
    yield


class Event:
    """``torch.cuda.Event``: host timestamps; synchronising on it is refused in a capture."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.time: float | None = None

    def record(self, s: Stream | None = None) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        _refuse_if_capturing("Event.synchronize()")

    def query(self) -> bool:
        _refuse_if_capturing("Event.query()")
        return True

    def elapsed_time(self, end: Event) -> float:
        if self.time is None or end.time is None:
            raise RuntimeError("Event.elapsed_time() of an event that was never recorded")
        return (end.time - self.time) * 1000.0


def synchronize(device=None) -> None:
    _refuse_if_capturing("synchronize()")


def is_current_stream_capturing() -> bool:
    return _STATE["capturing"] is not None


PRIMITIVES = dict(CUDAGraph=CUDAGraph, graph=graph, Stream=Stream, current_stream=current_stream, stream=stream,
                  device=device, Event=Event, synchronize=synchronize,
                  is_current_stream_capturing=is_current_stream_capturing)


def install(monkeypatch) -> None:
    """Give ``torch.cpu`` (``torch.get_device_module("cpu")``) the CUDA graph and stream primitives."""
    for name, value in PRIMITIVES.items():
        monkeypatch.setattr(torch.cpu, name, value, raising=False)
