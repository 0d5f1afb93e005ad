"""CUDA graphs for the decode loop: a captured call replayed with new inputs.

The engines reach the device's graph and stream primitives through
``torch.get_device_module(device)`` (``torch.cuda`` for a CUDA model), never through
``torch.cuda`` by name, so the graph code is the same whatever module provides them; on the
CPU, where torch has no graphs, ``graphs_available`` says no and ``cuda_graph=True`` is refused.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any, Callable

import torch

__all__ = ["CapturedCall", "graphs_available", "no_collection"]


def graphs_available(device: torch.device) -> bool:
    """Whether ``device``'s torch module captures graphs (``torch.cuda`` does)."""
    return hasattr(torch.get_device_module(device), "CUDAGraph")


@contextlib.contextmanager
def no_collection():
    """Python's cyclic garbage collector off for a capture, after one collection first.

    Decoders that were dropped still hold their CUDA graphs until a collection frees them, and
    destroying a graph is not allowed while another is being captured: a collection that
    happens to run inside a capture invalidates it ("operation not permitted when stream is
    capturing", seen on an H200 in the decode benchmark's tenth decoder). torch no longer
    collects before a capture by itself (``torch.compiler.config.force_cudagraph_gc``)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class CapturedCall:
    """``fn(*inputs)`` captured in a CUDA graph, replayed with new inputs copied into static
    buffers (gpt-fast's recipe without the compiler). The warm-up runs execute ``fn`` for
    real: callers capture before they set up the state ``fn`` works on. A call returns the
    capture's own output tensors, which every replay rewrites."""

    def __init__(self, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], device: torch.device):
        cuda = torch.get_device_module(device)
        self.inputs = tuple(x.clone() for x in inputs)
        # A graph reads memory by address: keep alive what ``fn`` reads through its closure
        # (tensors only it refers to would otherwise be freed, and their memory reused).
        self.fn = fn
        # A capture records on the current device: make it the model's (cuda:1 while cuda:0 is
        # current would otherwise run the kernels eagerly and capture nothing).
        with cuda.device(device):
            stream = cuda.Stream(device)
            stream.wait_stream(cuda.current_stream(device))
            with cuda.stream(stream):
                for _ in range(2):  # lazy initialisation (cuBLAS handles, Triton compiles) outside the graph
                    fn(*self.inputs)
            cuda.current_stream(device).wait_stream(stream)
            self.graph = cuda.CUDAGraph()
            with no_collection(), cuda.graph(self.graph):
                self.out = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != len(self.inputs):
            raise TypeError(f"a graph captured with {len(self.inputs)} inputs was called with {len(inputs)}")
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        return self.out
