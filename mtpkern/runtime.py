"""The runtime vocabulary, written once: devices, dtype names, synchronised timing, peak memory,
and the per-machine cache of measurements.

Everything in the package that resolves a device name, parses a dtype name, times device work
or reads peak memory goes through this module, so the CLI, the trainer, the evaluation, the
benchmarks and the examples agree on the names, the messages and the clocks. Nothing here
touches CUDA at import time.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"

# Canonical names first; the short forms are accepted everywhere a dtype is named.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> the process's GPU (``local_rank`` under torchrun) if CUDA is available, else
    the CPU; ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as given. A CUDA device without CUDA, or an
    index past the GPUs present, is a ``ValueError`` with one message for every command."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}: expected {DEVICE_NAMES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"unsupported device {name!r}: expected {DEVICE_NAMES}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device cuda:{index} does not exist ({torch.cuda.device_count()} GPUs)")
    return torch.device("cuda", index)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """A dtype from its name (``float32``/``fp32``, ``float16``/``fp16``, ``bfloat16``/``bf16``)
    or a ``torch.dtype``; ``None``: float16 on CUDA, float32 elsewhere."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"unsupported dtype {name}: expected one of {', '.join(DTYPES)}")
        return name
    if name is None:
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).replace("torch.", "")


def cache_dir() -> Path:
    """Where measurements of this machine are kept (step costs, CPU product layouts):
    ``$MTPKERN_CACHE``, else ``~/.cache/mtpkern``."""
    return Path(os.environ.get("MTPKERN_CACHE") or Path.home() / ".cache" / "mtpkern")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with torch's thread count: what a measurement
    kept in the cache was taken on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def read_cache(path: Path, schema: str) -> dict:
    """The table a cache file holds; empty where there is none yet, or it is damaged or of
    another schema (it is only a cache: measuring again rebuilds it)."""
    try:
        table = json.loads(path.read_text())
        return table if isinstance(table, dict) and table.pop("schema", None) == schema else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def write_cache(path: Path, schema: str, table: dict, what: str) -> None:
    """Replace the cache file by ``table`` in one step (written beside it, then renamed); a
    folder that cannot be written is a warning naming ``what`` the cache holds and the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"schema": schema, **table}, indent=2))
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not write the {what} cache {path}: {e}", stacklevel=3)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    torch.get_device_module(device).synchronize(device)


def now(device: torch.device | str) -> float:
    """``time.perf_counter()`` after the device's queued work has finished."""
    synchronize(device)
    return time.perf_counter()


def timed(fn: Callable, device: torch.device | str):
    """``(fn(), seconds)``, the device synchronised before and after: wall time of the work."""
    t0 = now(device)
    out = fn()
    return out, now(device) - t0


def time_us(fn: Callable, device: torch.device | str, iters: int, warmup: int = 1) -> float:
    """Median microseconds of ``iters`` calls of ``fn()``, each synchronised, after ``warmup``
    calls. Host and device time together: the latency a caller sees."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[1] for _ in range(iters)) * 1e6


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new CUDA peak (the CPU's peak RSS cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> tuple[int, str]:
    """``(bytes, kind)``: the CUDA allocator's peak since the last reset, or on the CPU the
    process's peak resident set size so far (``kind`` says which)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"  # KiB on Linux
