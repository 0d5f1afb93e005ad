"""Candidate verification at the GPT-2 decode shape: 42 paths of depth 5 in a 64-node tree."""

import pytest
import torch

from mtpkern.ops import _backend
from mtpkern.ops.verify import verify_greedy, verify_greedy_ref, verify_typical, verify_typical_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _backend.HAS_CUDA_EXT, reason="needs the built extension")]

T, P, DEPTH, VOCAB = 64, 42, 5, 50257


def inputs():
    gen = torch.Generator().manual_seed(0)
    paths = torch.randint(1, T, (P, DEPTH + 1), generator=gen)
    paths[:, 0] = 0
    tokens = torch.randint(0, VOCAB, (T,), generator=gen)
    argmax = torch.randint(0, VOCAB, (T,), generator=gen)
    argmax[paths[7, :3]] = tokens[paths[7, 1:4]]  # row 7 accepts three drafts
    prob, entropy = torch.rand(T, generator=gen), torch.rand(T, generator=gen) * 4
    return [x.cuda() for x in (tokens, argmax, prob, entropy, paths)]


# Read tokens, argmax (and prob, entropy) at every path entry, the paths; write 3 scalars and tokens.
BYTES = P * (DEPTH + 1) * (8 + 8 + 8) + (3 + DEPTH + 1) * 8


def test_verify_greedy(benchmark, bench_against):
    tokens, argmax, _, _, paths = inputs()
    bench_against(benchmark, lambda: verify_greedy(tokens, argmax, paths, backend="cuda"),
                  lambda: verify_greedy_ref(tokens, argmax, paths), bytes_moved=BYTES, T=T, paths=P, depth=DEPTH)


def test_verify_typical(benchmark, bench_against):
    tokens, argmax, prob, entropy, paths = inputs()
    bench_against(benchmark, lambda: verify_typical(tokens, argmax, prob, entropy, paths, backend="cuda"),
                  lambda: verify_typical_ref(tokens, argmax, prob, entropy, paths),
                  bytes_moved=BYTES + P * (DEPTH + 1) * 8, T=T, paths=P, depth=DEPTH)
