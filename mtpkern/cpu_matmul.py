"""How the decode path multiplies a weight matrix on a CPU: in the layout measured fastest for
that kind of matrix, the number of rows and the dtype.

A decode step multiplies N rows (one per tree token and batch row) by each weight W [out, in].
A CPU BLAS picks its kernel from the shapes and strides, and at a few rows two ways to compute
``x @ W.T`` differ by up to 5x, in an order that changes with N, with the matrix, and from one
CPU or BLAS to another (MKL on a 2-core AMD EPYC, SmolLM2-135M's unembedding [49152, 576],
``copy`` against ``flip``: 4.0 ms against 8.3 ms at 1 row, 24.8 ms against 5.0 ms at 4 rows):

- ``copy``: ``x @ Wt`` with a contiguous transposed copy Wt [in, out], kept beside W;
- ``flip``: ``(W @ x.T).T`` with W as stored (the result made contiguous).

``MTPKERN_CPU_MATMUL=auto`` (the default) times both the first time a kind of matrix meets a row
count (rounded up to a power of two; with its dtype and thread count) in this process, and keeps
``flip`` where it is at least ``FLIP_GAIN`` (1.2) times faster, else ``copy``. Above
``TIMED_ROWS`` (128) rows, a prefill's, a product is plain ``x @ W.T``, never timed. A kind is
the group :func:`share_layout` makes, such as every block's QKV projection: it is timed as a step
multiplies it, each layer's matrix in turn, so each is read from memory as in a step (a matrix
timed alone stays in the cache, and a 30-layer model's step then ran 20% slower at one row).
A choice is kept in ``$MTPKERN_CACHE/cpu_matmul.json`` (beside the step costs, default
``~/.cache/mtpkern``), keyed by the CPU's model name and thread count, the torch version, the
matrices' shape, number and dtype and the row count, so a later process on the machine reads it
instead of timing; delete the file to time again. ``copy`` or ``flip`` pins one layout for
every product up to 128 rows. Each computes the same product, up to floating-point rounding. On other devices a ``Matmul`` is ``x @ W.T``.
"""

from __future__ import annotations

import json
import os
import time

import torch

from mtpkern.runtime import cache_dir, device_name, dtype_name, read_cache, write_cache

LAYOUTS = ("copy", "flip")
ENV = "MTPKERN_CPU_MATMUL"
_ROUND_S = 2e-3  # each timing round runs the product for at least this long
# ``flip`` is chosen only where its product is this much faster: the timing sees the product
# alone, and on a small model, where the two are within ~10% of each other, the copy was the
# faster in whole steps (the demo's MTP model: 1.5-1.7 ms against 1.9-2.1 ms at 2 tokens).
FLIP_GAIN = 1.2
# Row counts up to this are timed, rounded up to a power of two (a decode step's tree tokens
# times its batch rows: at most 8 timings per kind); above it (a prefill) a product is plain
# ``x @ W.T``: at 128-752 rows the layouts were within 15% of each other (SmolLM2's matrices).
TIMED_ROWS = 128
CACHE_FILE = "cpu_matmul.json"
CACHE_SCHEMA = "mtpkern.cpu_matmul/1"
_chosen: dict[tuple, str] = {}


def forced_layout() -> str | None:
    """The layout ``MTPKERN_CPU_MATMUL`` pins, or None for ``auto`` (or unset)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value == "auto":
        return None
    if value not in LAYOUTS:
        raise ValueError(f"{ENV}={value!r} is not one of auto, {', '.join(LAYOUTS)}")
    return value


def _product(x: torch.Tensor, w: torch.Tensor, wt: torch.Tensor | None, add: torch.Tensor | None) -> torch.Tensor:
    """``add + x @ w.T``: with the copy ``wt`` [in, out] when given, else flipped."""
    if wt is not None:
        return x @ wt if add is None else torch.addmm(add, x, wt)
    if add is None:
        return (w @ x.t()).t().contiguous()
    return torch.addmm(add.t() if add.dim() == 2 else add[:, None], w, x.t()).t().contiguous()


def _seconds(fn) -> float:
    """The best of three rounds' time per call of ``fn`` (after two calls to warm up)."""
    fn()
    fn()
    best = float("inf")
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            spent = time.perf_counter() - start
            if spent >= _ROUND_S:
                break
        best = min(best, spent / calls)
    return best


def choose(weights: list[torch.Tensor], rows: int) -> str:
    """The layout to multiply ``rows`` rows by each of ``weights`` (one kind of matrix, [out, in]
    each, taken in turn as a step takes them) in on a CPU (see the module doc): ``plain`` above
    ``TIMED_ROWS``, else the pinned layout or the one timed at ``rows`` rounded up to a power of two
    (in this process, or before on this machine: the cache file)."""
    if rows > TIMED_ROWS:
        return "plain"
    forced = forced_layout()
    if forced is not None:
        return forced
    rows = 1 << (rows - 1).bit_length()
    w = weights[0]
    key = (tuple(w.shape), len(weights), rows, w.dtype, torch.get_num_threads())
    if key not in _chosen:
        path, name = cache_dir() / CACHE_FILE, _cache_name(key)
        table = read_cache(path, CACHE_SCHEMA)
        if table.get(name) not in LAYOUTS:  # none yet, or damaged: time it and keep the choice
            table[name] = _timed_choice(weights, rows)
            write_cache(path, CACHE_SCHEMA, table, "CPU product layout")
        _chosen[key] = table[name]
    return _chosen[key]


def _cache_name(key: tuple) -> str:
    """The cache file's name of an in-process key: what the choice was measured on, too."""
    shape, n, rows, dtype, _ = key  # the thread count is in the CPU's name
    return json.dumps(dict(cpu=device_name(torch.device("cpu")), torch=torch.__version__, shape=list(shape),
                           matrices=n, rows=rows, dtype=dtype_name(dtype)), sort_keys=True)


def _timed_choice(weights: list[torch.Tensor], rows: int) -> str:
    """``flip`` where it multiplies ``rows`` rows by each of ``weights`` ``FLIP_GAIN`` times
    faster than the copies do, else ``copy``."""
    with torch.no_grad():
        x = torch.randn(rows, weights[0].shape[1], dtype=weights[0].dtype)
        copies = [v.detach().t().contiguous() for v in weights]
        times = {"copy": _seconds(lambda: [_product(x, v, c, None) for v, c in zip(weights, copies)]),
                 "flip": _seconds(lambda: [_product(x, v, None, None) for v in weights])}
    return "flip" if times["copy"] > FLIP_GAIN * times["flip"] else "copy"


class Matmul:
    """``add + x @ W.T`` for a weight W [out, in] (a parameter, read as it is at each call), in
    the layout :func:`choose` picks for its kind and x's row count on a CPU, decided at the first
    call with that row count. A ``copy`` is made on first use and kept: build a new ``Matmul``
    after W changes in place."""

    __slots__ = ("w", "group", "_copy", "_layouts")

    def __init__(self, w: torch.Tensor):
        self.w = w.detach()
        self.group: list[Matmul] = [self]  # the matrices timed together (share_layout)
        self._copy: torch.Tensor | None = None
        self._layouts: dict[int, str] = {}

    def __repr__(self) -> str:
        return f"Matmul({list(self.w.shape)}, copy={self._copy is not None})"

    def _copied(self) -> torch.Tensor:
        if self._copy is None:
            with torch.no_grad():
                self._copy = self.w.t().contiguous()
        return self._copy

    def layout(self, rows: int) -> str:
        """The layout of a product with ``rows`` rows (``plain`` off the CPU: ``x @ W.T``)."""
        if rows not in self._layouts:
            on_cpu = self.w.device.type == "cpu"
            self._layouts[rows] = choose([m.w for m in self.group], rows) if on_cpu else "plain"
        return self._layouts[rows]

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, in], ``add`` [N, out] or [out] (a bias, a residual): [N, out]."""
        layout = self._layouts.get(x.shape[0]) or self.layout(x.shape[0])
        if layout == "plain":
            return x @ self.w.t() if add is None else torch.addmm(add, x, self.w.t())
        return _product(x, self.w, self._copied() if layout == "copy" else None, add)

    def weight(self, rows: int) -> torch.Tensor:
        """W [out, in] in the layout of a product with ``rows`` rows: a transposed view of the
        copy (``copy``), else as stored. The extension's ``accept_greedy``
        multiplies in the layout of the weight it is given."""
        return self._copied().t() if self.layout(rows) == "copy" else self.w


def share_layout(matmuls: list[Matmul]) -> None:
    """Make ``matmuls`` (one kind of matrix of equal shapes, in the order a step multiplies
    them, such as every block's QKV projection) one group: timed together, one layout."""
    shapes = {tuple(m.w.shape) for m in matmuls}
    if len(shapes) > 1:
        raise ValueError(f"share_layout: the matrices have different shapes {sorted(shapes)}")
    for m in matmuls:
        m.group = matmuls
