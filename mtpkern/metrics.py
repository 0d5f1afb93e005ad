"""Metrics shared by training and evaluation: every head's validation loss and accuracy at its
true offset, corpus BLEU, and the accuracy of final answers.

Training logs :func:`evaluate_heads` at its eval steps; ``mtpkern eval`` reports the same
numbers (with the same code) beside BLEU and answer accuracy of the decoded solutions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mtpkern.data import IGNORE_INDEX, answers_match
from mtpkern.objectives import _unwrap, head_logits
from mtpkern.ops.linear_cross_entropy import linear_cross_entropy


@torch.no_grad()
def evaluate_heads(model, loader, device, max_batches: int | None = None, fused: bool = True) -> dict:
    """Validation metrics of every head at its true offset (head j vs token t + j + 1; labels
    -100 ignored): ``loss`` / ``ppl`` of the next-token path (head 0), and per head
    ``head_loss``, ``acc_top1``, ``acc_top5`` and ``n_tokens`` (lists of length J)."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    J = model.n_heads
    stats = torch.zeros(4, J, dtype=torch.float64, device=device)  # ce sum, top-1, top-5, count
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        idx = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        hidden = model(idx, logits=False).hidden
        T = labels.shape[1]
        for j in range(min(J, T - 1)):  # a head past the batch's length has nothing to score
            target = labels[:, j + 1 :]
            valid = target != IGNORE_INDEX
            stats[:3, j] += _head_eval_sums(model, hidden[:, : T - j - 1, j][valid], target[valid], j, fused)
            stats[3, j] += valid.sum()
    model.train(was_training)
    ce, top1, top5, count = stats.cpu().tolist()
    mean = [c / max(n, 1) for c, n in zip(ce, count)]
    return {
        "loss": mean[0],
        "ppl": math.exp(min(mean[0], 50.0)),
        "head_loss": mean,
        "acc_top1": [c / max(n, 1) for c, n in zip(top1, count)],
        "acc_top5": [c / max(n, 1) for c, n in zip(top5, count)],
        "n_tokens": [int(n) for n in count],
    }


def _head_eval_sums(model, hidden: torch.Tensor, target: torch.Tensor, j: int, fused: bool) -> torch.Tensor:
    """(sum of CE, top-1 hits, top-5 hits) of head j on hidden [N, D] against target [N]."""
    if fused:
        ce, hits = linear_cross_entropy(hidden, _unwrap(model).head_weight(j), target, IGNORE_INDEX, "sum",
                                        return_hits=True)
        return torch.cat([ce.reshape(1).double(), hits.double()])
    logits = head_logits(model, hidden, j)
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    ce = F.cross_entropy(logits, target, reduction="sum")
    return torch.stack([ce.double(), (top[:, 0] == target).sum().double(), (top == target[:, None]).any(-1).sum().double()])


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 4-grams, brevity penalty), 0-100."""
    import sacrebleu  # a third-party import of its own: only evaluation pays for it

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        raise ValueError("BLEU of zero sentences is undefined")
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def answer_accuracy(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions whose final answer (``The answer is: N``) equals the
    reference's numerically; a prediction without an answer counts as wrong."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("accuracy of zero answers is undefined")
    return sum(answers_match(p, r) for p, r in zip(predictions, references)) / len(predictions)


__all__ = ["answer_accuracy", "bleu", "evaluate_heads"]
