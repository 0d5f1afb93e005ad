"""Fused linear cross-entropy, forward + backward (gradients of hidden and weight), against eager
PyTorch materialising the logits (``F.cross_entropy(hidden @ weight.T)``, what the trainer's
``--loss plain`` does).

GPU: GPT-2's unembedding (D = 768, V = 50257) for 4096 rows (batch 8 x 512) in fp16 / bf16,
with the peak memory of each (the fused op's point). CPU: the chunked PyTorch path the op runs
on CPU tensors, at a smaller shape, one thread, with the same comparison.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from mtpkern.ops.linear_cross_entropy import linear_cross_entropy
from mtpkern.runtime import peak_memory, reset_peak_memory, time_us

D, V = 768, 50257


def _inputs(N, D, V, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(V, D, device=device, dtype=dtype, generator=gen) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device, generator=gen)
    return hidden, weight, labels


def _fused(hidden, weight, labels):
    return lambda: torch.autograd.grad(linear_cross_entropy(hidden, weight, labels), [hidden, weight])


def _eager(hidden, weight, labels):
    return lambda: torch.autograd.grad(F.cross_entropy((hidden @ weight.T).float(), labels), [hidden, weight])


def _peak_mib(fn, device) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    reset_peak_memory(device)
    fn()
    return round((peak_memory(device)[0] - before) / 2**20, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_linear_cross_entropy(benchmark, bench_against, dtype):
    N = 4096
    device = torch.device("cuda")
    hidden, weight, labels = _inputs(N, D, V, dtype, device)
    fused, eager = _fused(hidden, weight, labels), _eager(hidden, weight, labels)
    benchmark.extra_info["fused_peak_mib"] = _peak_mib(fused, device)
    benchmark.extra_info["eager_peak_mib"] = _peak_mib(eager, device)
    # The weight read and its gradient written once, the rows read and their gradient written:
    # the least any implementation moves (the chunks re-read the weight; the logits stay in L2
    # only in the ideal). 3 matmuls of 2 N V D flops each.
    bytes_moved = 2 * V * D * 2 + 2 * N * D * 2 + N * 8
    # The op checks its labels on the host (one sync): it is timed without a CUDA graph.
    bench_against(benchmark, fused, eager, bytes_moved=bytes_moved,
                  N=N, D=D, V=V, dtype=str(dtype), tflop=round(3 * 2 * N * V * D / 1e12, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("log2_elements", [22, 24, 26])
def test_linear_cross_entropy_chunk_size(benchmark, bench_against, monkeypatch, log2_elements):
    """fp16 at 4096 rows with 2**e fp32 logits per chunk (64, 256, 1024 rows): launches and
    dL/dW rewrites per chunk against the chunk's memory."""
    lce = importlib.import_module("mtpkern.ops.linear_cross_entropy")
    monkeypatch.setattr(lce, "_CHUNK_ELEMENTS", 2**log2_elements)
    N, device = 4096, torch.device("cuda")
    hidden, weight, labels = _inputs(N, D, V, torch.float16, device)
    fused, eager = _fused(hidden, weight, labels), _eager(hidden, weight, labels)
    benchmark.extra_info["fused_peak_mib"] = _peak_mib(fused, device)
    bench_against(benchmark, fused, eager, bytes_moved=2 * V * D * 2 + 2 * N * D * 2 + N * 8, N=N, D=D, V=V,
                  chunk_rows=lce._chunk_rows(N, V))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU case runs on machines with a GPU")
def test_linear_cross_entropy_cpu(benchmark):
    """The CPU path (chunked PyTorch reference) against eager, one thread, 512 rows x D 256."""
    N, Dc = 512, 256
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hidden, weight, labels = _inputs(N, Dc, V, torch.float32, device)
        fused, eager = _fused(hidden, weight, labels), _eager(hidden, weight, labels)
        eager_us = time_us(eager, device, iters=3)
        fused_us = time_us(fused, device, iters=3)
        benchmark.extra_info.update(N=N, D=Dc, V=V, dtype="float32", threads=1, eager_median_us=round(eager_us),
                                    fused_median_us=round(fused_us), speedup_vs_eager=round(eager_us / fused_us, 3))
        benchmark.pedantic(fused, rounds=3, iterations=1)
    finally:
        torch.set_num_threads(threads)
