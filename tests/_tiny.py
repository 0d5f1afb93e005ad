"""Tiny models trained on a periodic pattern, so their heads really agree with the base.

Random heads only ever exercise the one-token path of speculative decoding; these models are
trained for a few hundred Adam steps (seconds on a CPU) on sequences that walk one of a few
fixed cycles of tokens. The cycles share tokens, so the next token depends on more than the
last one, and the heads (which look further ahead) learn the pattern less well than the base:
acceptance is high but not total. Each model is built once per process; ``tests/conftest.py``
hands them to tests as the fixtures ``gpt2_model``, ``medusa_model`` and ``mtp_model``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mtpkern.data import synthetic_records, train_tokenizer
from mtpkern.config import GPT2Config
from mtpkern.models import GPT2, MedusaModel, MTPModel

VOCAB = 64
N_CYCLES = 6
CYCLE_LEN = 12
SEQ_LEN = 36
N_DRAFT_HEADS = 3


def config(**kw) -> GPT2Config:
    base = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=VOCAB - 1)
    base.update(kw)
    return GPT2Config.tiny(vocab_size=VOCAB, **base)


@functools.lru_cache(maxsize=None)
def cycles() -> torch.Tensor:
    """[N_CYCLES, CYCLE_LEN] token cycles, drawn with replacement (cycles share tokens). The
    last token id (the EOS of ``config``) only appears in cycle 0, so greedy outputs can hit it."""
    g = torch.Generator().manual_seed(1234)
    c = torch.randint(0, VOCAB - 1, (N_CYCLES, CYCLE_LEN), generator=g)
    c[0, CYCLE_LEN // 2] = VOCAB - 1
    return c


def pattern_batch(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, length] windows of random cycles at random phases, 5% of tokens replaced by noise."""
    c = cycles()
    which = torch.randint(0, N_CYCLES, (batch,), generator=generator)
    phase = torch.randint(0, CYCLE_LEN, (batch,), generator=generator)
    idx = (phase[:, None] + torch.arange(length)) % CYCLE_LEN
    x = c[which[:, None], idx]
    noise = torch.rand(batch, length, generator=generator) < 0.05
    return torch.where(noise, torch.randint(0, VOCAB, (batch, length), generator=generator), x)


def random_prompts(n: int, seed: int = 0, min_len: int = 3, max_len: int = 20) -> list[list[int]]:
    """n prompts: pattern windows of random lengths, every fourth one pure random tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        if i % 4 == 3:
            out.append(torch.randint(0, VOCAB, (length,), generator=g).tolist())
        else:
            out.append(pattern_batch(1, length, g)[0].tolist())
    return out


def _heads_loss(logits: torch.Tensor, x: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Mean cross-entropy of heads j >= first; head j at t predicts x[t + j + 1]."""
    J, L = logits.shape[2], x.shape[1]
    losses = [
        F.cross_entropy(logits[:, : L - j - 1, j].reshape(-1, VOCAB), x[:, j + 1 :].reshape(-1))
        for j in range(first, J)
    ]
    return torch.stack(losses).mean()


def _train(model, steps: int, first_head: int = 0, lr: float = 1e-2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these matrices are too small to share: one thread is several times faster
    try:
        model.train()
        for _ in range(steps):
            x = pattern_batch(16, SEQ_LEN, g)
            loss = _heads_loss(model(x).logits, x, first_head)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@functools.lru_cache(maxsize=None)
def tiny_gpt2() -> GPT2:
    torch.manual_seed(0)
    return _train(GPT2(config()), steps=120)


@functools.lru_cache(maxsize=None)
def tiny_medusa() -> MedusaModel:
    """The trained tiny GPT-2 as a frozen base, with MEDUSA heads trained on top of it."""
    model = MedusaModel.from_base(tiny_gpt2(), n_heads=1 + N_DRAFT_HEADS)
    return _train(model, steps=80, first_head=1, seed=1)


@functools.lru_cache(maxsize=None)
def tiny_mtp() -> MTPModel:
    """The trained tiny GPT-2's first block as the trunk and 1 + N_DRAFT_HEADS head blocks
    (copies of its last block), trained jointly."""
    return _train(MTPModel.from_base(tiny_gpt2(), n_heads=1 + N_DRAFT_HEADS), steps=80, seed=2)


def assert_same_greedy_tokens(model, prompt, got: list[int], want: list[int], tol: float = 1e-3) -> None:
    """``got == want``; on a GPU, where the two paths' kernels round differently (cuBLAS picks
    other kernels for 1-row and T-row products, fused kernels sum in other orders), they may
    instead part at a near-tie: at the first differing token, the model's top two next-token
    logits (on the agreed prefix) must lie within ``tol`` (relative) of each other."""
    if got == want:
        return
    device = next(model.parameters()).device
    assert device.type == "cuda", f"greedy outputs differ on {device}:\n{got}\n{want}"
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    with torch.no_grad():
        z = model(torch.tensor([list(prompt) + want[:i]], device=device), heads=1).logits[0, -1, 0].float()
    top = z.topk(2).values
    gap = float(top[0] - top[1])
    assert gap <= tol * max(1.0, float(top[0].abs())), (
        f"outputs part at token {i} where the top two logits are {gap:.3g} apart: more than rounding\n{got}\n{want}")


def save_random_medusa(directory, *, records: int = 100, n_positions: int = 128, n_layer: int = 1):
    """A random 2-head MEDUSA checkpoint with a tokenizer trained on synthetic records, saved in
    ``directory`` (no run around it): what CLI tests load."""
    tok = train_tokenizer(synthetic_records(records, seed=0), vocab_size=300)
    torch.manual_seed(0)
    base = GPT2(GPT2Config.tiny(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=n_layer, n_head=2,
                                eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    MedusaModel.from_base(base, n_heads=3).save_pretrained(directory, tokenizer=tok)
    return directory
