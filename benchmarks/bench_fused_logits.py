"""Fused multi-head logits at GPT-2's shape (D = 768, V = 50257, fp16): 6 rows (MTP heads at
one position) and 64 rows (a MEDUSA tree), against eager PyTorch materialising the logits
(``logits_stats(hidden @ weight.T)``: matmul, top-k, logsumexp, entropy). Target on an H100
(ANCHORS.md): <= 35 us for 6 rows, where eager takes 155 us."""

import pytest
import torch

from mtpkern.ops.fused_logits import fused_logits, logits_stats

pytestmark = pytest.mark.gpu

D, V, K = 768, 50257, 10


@pytest.mark.parametrize("R", [6, 64])
def test_fused_logits(benchmark, bench_against, R):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(R, D, device="cuda", dtype=torch.float16, generator=gen)
    weight = torch.randn(V, D, device="cuda", dtype=torch.float16, generator=gen) * 0.02
    target = torch.randint(0, V, (R,), device="cuda", generator=gen)
    # The weight dominates: read once. Plus the rows, targets and the six small outputs.
    bytes_moved = V * D * 2 + R * D * 2 + R * 8 + R * (K * 12 + 4 * 4 + 8)
    bench_against(
        benchmark,
        lambda: fused_logits(hidden, weight, K, target, backend="triton"),
        lambda: logits_stats(hidden @ weight.T, K, target),
        bytes_moved=bytes_moved,
        R=R, D=D, V=V, k=K, dtype="float16",
    )
