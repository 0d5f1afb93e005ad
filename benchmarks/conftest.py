"""Shared pytest-benchmark harness for the kernel benchmarks (``benchmarks/bench_*.py``).

Every benchmark times a kernel and the eager reference it replaces (imported from the op's
module, never re-implemented), the same way:

- device time: each call is captured once in a CUDA graph and replayed (so Triton's Python
  launch path and the op's checks cost nothing), between CUDA events, with L2 flushed before
  every sample (a 256 MiB write, as ``triton.testing.do_bench`` does: the tree-attention K/V
  would otherwise sit in an H200's 60 MB L2) and the GPU kept busy by a spin kernel while the
  host queues the work. A call that cannot be captured (the host-side ``tree_buffers_ref``)
  is timed the same way without the graph; ``timing`` in the results says which.
- host latency: wall time of one call, the device idle before it and no sync after it (what
  the host spends queueing the work), reported separately.

``extra_info`` of each benchmark holds both, per implementation, the speedup over eager
(device time) and the achieved GB/s against the op's napkin-maths minimum traffic.
pytest-benchmark's own statistics are the synchronised latency of a call as a caller sees it.

``--cases-json PATH`` rewrites PATH after every benchmark with the results so far, so a
timeout keeps what was measured. Without a CUDA GPU every benchmark skips, saying why.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

L2_FLUSH_BYTES = 256 * 2**20
SPIN_CYCLES = 1_000_000  # ~0.5 ms at H100/H200 clocks: longer than the host needs to queue a call
SAMPLES = 100
_CASES: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--cases-json", default=None,
                     help="rewrite this JSON file after every kernel benchmark with the results so far")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="kernel benchmarks time CUDA kernels: no CUDA GPU here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _capture(fn):
    """A CUDA graph of one call of ``fn`` (warmed up first), or None if it cannot be captured."""
    for _ in range(3):  # compiles, fills the allocator's caches
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # e.g. a host sync inside fn
        torch.cuda.synchronize()
        return None
    torch.cuda.synchronize()
    return graph


def device_us(fn, *, capture: bool = True, samples: int = SAMPLES) -> tuple[float, str]:
    """(median device microseconds of one call of ``fn``, "cuda_graph" or "events")."""
    graph = _capture(fn) if capture else None
    run = graph.replay if graph is not None else fn
    if graph is None:
        for _ in range(3):
            fn()
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(samples)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(samples)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        flush.zero_()
        torch.cuda._sleep(SPIN_CYCLES)  # the GPU waits here, not between the call's kernels
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)), (
        "cuda_graph" if graph is not None else "events")


def host_us(fn, samples: int = 50) -> float:
    """Median microseconds the host spends in one call (the device idle before it, no sync after)."""
    times = []
    for _ in range(samples):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def _write_cases(config) -> None:
    path = config.getoption("--cases-json")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps({"device": torch.cuda.get_device_name(), "cases": _CASES}, indent=1))
        tmp.replace(path)


@pytest.fixture
def bench_against(request):
    """Time ``fn`` against the eager ``ref`` and record both in ``benchmark.extra_info``.

    Usage: ``bench_against(benchmark, fn, ref, bytes_moved=..., ref_capture=True, **info)``.
    ``bytes_moved`` is the op's napkin-maths minimum traffic (what it must read and write), so
    ``gbps`` can be held against the GPU's bandwidth. ``ref_capture=False`` for a reference
    that syncs with the host (it cannot sit in a CUDA graph).
    """

    def run(benchmark, fn, ref, *, bytes_moved: int, ref_capture: bool = True, **info):
        kern_us, kern_timing = device_us(fn)
        ref_us, ref_timing = device_us(ref, capture=ref_capture)
        result = {
            **info,
            "kernel_device_us": round(kern_us, 2),
            "eager_device_us": round(ref_us, 2),
            "speedup_vs_eager": round(ref_us / kern_us, 3),
            "gbps": round(bytes_moved / (kern_us * 1e-6) / 1e9, 1),
            "eager_gbps": round(bytes_moved / (ref_us * 1e-6) / 1e9, 1),
            "kernel_host_us": round(host_us(fn), 2),
            "eager_host_us": round(host_us(ref), 2),
            "timing": {"kernel": kern_timing, "eager": ref_timing},
            "l2_flush_bytes": L2_FLUSH_BYTES,
            "device": torch.cuda.get_device_name(),
        }
        benchmark.extra_info.update(result)
        _CASES.append({"name": request.node.name, "file": request.node.path.name, **result})
        _write_cases(request.config)

        def timed():
            out = fn()
            torch.cuda.synchronize()
            return out

        return benchmark.pedantic(timed, rounds=50, iterations=1, warmup_rounds=5)

    return run
