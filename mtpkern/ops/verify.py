"""Batched verification of a speculative tree's candidate paths: one launch, no host sync.

Inputs for a tree of T nodes (node 0 = the root, the last accepted token):
  tree_tokens    int64 [T]      the token at each node
  target_argmax  int64 [T]      the target model's argmax at each node (its prediction for a child)
  paths          int64 [P, Dp1] candidate paths root..leaf (rows of TreeBuffers.retrieve), -1 padded
Dp1 = max_depth + 1. Entries outside [0, T) (padding or bad input) are never dereferenced: a draft
on such an entry, or whose parent entry is such, is simply not accepted.

Kernels: ``csrc/verify_api.cpp`` and ``csrc/cuda/verify.cu`` (ops ``mtpkern::verify_greedy`` and
``mtpkern::verify_typical``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mtpkern.ops import _backend


class VerifyResult(NamedTuple):
    accept_len: Tensor  # int64 0-d: number of accepted draft tokens, 0..max_depth
    best_path: Tensor  # int64 0-d: the chosen row of `paths`
    last_node: Tensor  # int64 0-d: paths[best_path, accept_len], the node whose target logits give the next token
    tokens: Tensor  # int64 [max_depth + 1]: the accepted draft tokens then the next (bonus) token, then -1 padding


def _check(tree_tokens: Tensor, target_argmax: Tensor, paths: Tensor, op: str) -> None:
    for name, t in (("tree_tokens", tree_tokens), ("target_argmax", target_argmax)):
        if t.dim() != 1 or t.dtype != torch.int64:
            raise ValueError(f"{op}: {name} must be 1-D int64, got {t.dtype} of shape {tuple(t.shape)}")
    if tree_tokens.numel() == 0 or target_argmax.shape != tree_tokens.shape:
        raise ValueError(f"{op}: tree_tokens and target_argmax need one entry per node, got "
                         f"{tuple(tree_tokens.shape)} and {tuple(target_argmax.shape)}")
    if paths.dim() != 2 or paths.dtype != torch.int64 or 0 in paths.shape:
        raise ValueError(f"{op}: paths must be non-empty 2-D int64, got {paths.dtype} of shape {tuple(paths.shape)}")


def _choose(ok: Tensor, tree_tokens: Tensor, target_argmax: Tensor, paths: Tensor) -> VerifyResult:
    """Pick the best row given ok[p, d-1] = "the draft at paths[p, d] passes on its own".

    accept[p] = max a such that ok[p, :a] are all true; best = the first row of largest accept;
    tokens = tree_tokens[paths[best, 1..a]], target_argmax[paths[best, a]], then -1.
    Written with gathers only, so it never syncs with the host.
    """
    T, Dp1 = tree_tokens.shape[0], paths.shape[1]
    accept = ok.long().cumprod(1).sum(1)  # leading accepted drafts of every row
    best = accept.argmax()  # the first maximum: ties go to the smaller row index
    n = accept.gather(0, best.view(1))
    row = paths.index_select(0, best.view(1)).view(Dp1)
    last = row.gather(0, n)
    safe = row.clamp(0, T - 1)
    drafts = torch.cat([tree_tokens[safe[1:]], safe.new_full((1,), -1)])  # drafts[j] = token of row[j + 1]
    bonus = torch.where((last >= 0) & (last < T), target_argmax[last.clamp(0, T - 1)], -1)
    j = torch.arange(Dp1, device=paths.device)
    tokens = torch.where(j < n, drafts, torch.where(j == n, bonus, -1))
    return VerifyResult(n.view(()), best, last.view(()), tokens)


def _in_tree(paths: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """(both entries of each parent -> child step lie in [0, T), the paths clamped into range)."""
    valid = (paths >= 0) & (paths < T)
    return valid[:, 1:] & valid[:, :-1], paths.clamp(0, T - 1)


def verify_greedy_ref(tree_tokens: Tensor, target_argmax: Tensor, paths: Tensor) -> VerifyResult:
    """Eager reference of greedy verification. With n_d = paths[p, d]:

        draft d >= 1 of row p passes  iff  tree_tokens[n_d] == target_argmax[n_{d-1}]
        accept[p] = number of leading passing drafts;  best = argmin over rows of (-accept[p], p)
    """
    _check(tree_tokens, target_argmax, paths, "verify_greedy")
    step_ok, safe = _in_tree(paths, tree_tokens.shape[0])
    ok = step_ok & (tree_tokens[safe[:, 1:]] == target_argmax[safe[:, :-1]])
    return _choose(ok, tree_tokens, target_argmax, paths)


def verify_typical_ref(tree_tokens: Tensor, target_argmax: Tensor, node_prob: Tensor, parent_entropy: Tensor,
                       paths: Tensor, epsilon: float = 0.09, alpha: float = 0.3) -> VerifyResult:
    """Eager reference of MEDUSA typical acceptance, in fp32. With n = paths[p, d]:

        draft d >= 1 of row p passes  iff  node_prob[n] > min(epsilon, alpha * exp(-parent_entropy[n]))

    node_prob[n] is the target probability of tree_tokens[n] under its parent's distribution and
    parent_entropy[n] that distribution's entropy. Rows, ties and tokens as in greedy; the bonus
    token is target_argmax[last_node].
    """
    _check(tree_tokens, target_argmax, paths, "verify_typical")
    for name, t in (("node_prob", node_prob), ("parent_entropy", parent_entropy)):
        if t.dtype != torch.float32 or t.shape != tree_tokens.shape:
            raise ValueError(f"verify_typical: {name} must be float32 [T], got {t.dtype} of shape {tuple(t.shape)}")
    step_ok, safe = _in_tree(paths, tree_tokens.shape[0])
    node_ok = node_prob > torch.clamp(alpha * torch.exp(-parent_entropy), max=epsilon)
    return _choose(step_ok & node_ok[safe[:, 1:]], tree_tokens, target_argmax, paths)


# ---------------------------------------------------------------- registration

OUT = "(Tensor accept_len, Tensor best_path, Tensor last_node, Tensor tokens)"
GREEDY_SCHEMA = f"(Tensor tree_tokens, Tensor target_argmax, Tensor paths) -> {OUT}"
TYPICAL_SCHEMA = (f"(Tensor tree_tokens, Tensor target_argmax, Tensor node_prob, Tensor parent_entropy, "
                  f"Tensor paths, float epsilon, float alpha) -> {OUT}")

if not _backend.HAS_CUDA_EXT:  # the extension defines the ops in C++; otherwise the references are their kernels
    torch.library.define("mtpkern::verify_greedy", GREEDY_SCHEMA)
    torch.library.impl("mtpkern::verify_greedy", ("CPU", "CUDA"), lambda *a: tuple(verify_greedy_ref(*a)))
    torch.library.define("mtpkern::verify_typical", TYPICAL_SCHEMA)
    torch.library.impl("mtpkern::verify_typical", ("CPU", "CUDA"), lambda *a: tuple(verify_typical_ref(*a)))


def _verify_fake(paths):
    return paths.new_empty(()), paths.new_empty(()), paths.new_empty(()), paths.new_empty(paths.shape[1])


torch.library.register_fake("mtpkern::verify_greedy", lambda tokens, argmax, paths: _verify_fake(paths))
torch.library.register_fake("mtpkern::verify_typical", lambda tokens, argmax, prob, ent, paths, eps, alpha:
                            _verify_fake(paths))


# ---------------------------------------------------------------- public functions

def verify_greedy(tree_tokens: Tensor, target_argmax: Tensor, paths: Tensor, *,
                  backend: str | None = None) -> VerifyResult:
    """Greedy (lossless) verification of every candidate path at once; see :func:`verify_greedy_ref`."""
    if _backend.pick(paths.device, ("cuda", "eager"), backend) == "eager":
        return verify_greedy_ref(tree_tokens, target_argmax, paths)
    return VerifyResult(*torch.ops.mtpkern.verify_greedy(tree_tokens, target_argmax, paths))


def verify_typical(tree_tokens: Tensor, target_argmax: Tensor, node_prob: Tensor, parent_entropy: Tensor,
                   paths: Tensor, *, epsilon: float = 0.09, alpha: float = 0.3,
                   backend: str | None = None) -> VerifyResult:
    """MEDUSA typical acceptance of every candidate path at once; see :func:`verify_typical_ref`."""
    if _backend.pick(paths.device, ("cuda", "eager"), backend) == "eager":
        return verify_typical_ref(tree_tokens, target_argmax, node_prob, parent_entropy, paths, epsilon, alpha)
    return VerifyResult(*torch.ops.mtpkern.verify_typical(tree_tokens, target_argmax, node_prob, parent_entropy,
                                                          paths, epsilon, alpha))
