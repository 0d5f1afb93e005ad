"""Batched verification of a speculative tree's candidate paths: one launch, no host sync.

Inputs for a tree of T nodes (node 0 = the root, the last accepted token):
  tree_tokens    int64 [T]      the token at each node
  target_argmax  int64 [T]      the target model's argmax at each node (its prediction for a child)
  paths          int64 [P, Dp1] candidate paths root..leaf (rows of TreeBuffers.retrieve), -1 padded
A batch of B sequences sharing one tree shape passes [B, T] node inputs (``node_prob`` and
``parent_entropy`` too) and gets each output with a leading B: one launch for every row
(``mtpkern.batch``); a 1-D tree is the batch of one, with 0-d outputs.
Dp1 = max_depth + 1. Entries outside [0, T) (padding or bad input) are never dereferenced: a draft
on such an entry, or whose parent entry is such, is simply not accepted.

Kernels: ``csrc/verify_api.cpp`` and ``csrc/cuda/verify.cu`` (ops ``mtpkern::verify_greedy`` and
``mtpkern::verify_typical``). ``mtpkern::accept_greedy`` (``csrc/accept_api.cpp``, CPU) runs a
greedy step's whole verification from head 0's hidden states: logits, argmax, best path and the
step's output in one call (its CUDA side is the eager reference: there a step is one CUDA
graph). Every backend checks its inputs with the same checks (``_check``
here mirrors ``check_verify`` in ``csrc/mtpkern.h``): one exception type and message per bad input.
``epsilon`` and ``alpha`` must be finite and non-negative.

NaN contract (every backend): a NaN never makes a draft pass. In typical acceptance a draft
whose ``node_prob`` or ``parent_entropy`` is NaN (NaN logits upstream) is rejected. In greedy
acceptance a NaN logits row reaches verification as ``target_argmax = -1`` (``fused_logits``'
NaN contract), which no draft token equals, so its children are rejected, and ``-1`` is the bonus
token if that node is the last accepted one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mtpkern.ops import _backend
from mtpkern.ops._checks import check_nonnegative_finite, check_rows, check_same_device, check_vector
from mtpkern.runtime import dtype_name


class VerifyResult(NamedTuple):
    """One tree's results; a batch's carry a leading B ([B], [B, max_depth + 1])."""

    accept_len: Tensor  # int64 0-d: number of accepted draft tokens, 0..max_depth
    best_path: Tensor  # int64 0-d: the chosen row of `paths`
    last_node: Tensor  # int64 0-d: paths[best_path, accept_len], the node whose target logits give the next token
    tokens: Tensor  # int64 [max_depth + 1]: the accepted draft tokens then the next (bonus) token, then -1 padding


def _check(tree_tokens: Tensor, target_argmax: Tensor, paths: Tensor, op: str) -> None:
    """``check_verify`` of csrc/mtpkern.h: the same checks, order, types and messages."""
    check_rows(tree_tokens, op, "tree_tokens", torch.int64)
    check_rows(target_argmax, op, "target_argmax", torch.int64)
    T = tree_tokens.shape[-1]
    if T < 1:
        raise ValueError(f"{op}: the tree has no nodes")
    if tree_tokens.shape[0] < 1:
        raise ValueError(f"{op}: the batch is empty (tree_tokens {list(tree_tokens.shape)})")
    if tree_tokens.dim() == 1 and target_argmax.dim() == 1:
        if target_argmax.shape[0] != T:
            raise ValueError(f"{op}: target_argmax has {target_argmax.shape[0]} entries but tree_tokens has {T}")
    elif target_argmax.shape != tree_tokens.shape:
        raise ValueError(f"{op}: target_argmax has shape {list(target_argmax.shape)} but tree_tokens has shape "
                         f"{list(tree_tokens.shape)}")
    _check_paths(paths, op)
    check_same_device(tree_tokens, target_argmax, op, "target_argmax")
    check_same_device(tree_tokens, paths, op, "paths")


def _check_paths(paths: Tensor, op: str) -> None:
    """``check_paths`` of csrc/mtpkern.h."""
    if paths.dim() != 2:
        raise ValueError(f"{op}: paths must be 2-D [P, max_depth + 1], got shape {list(paths.shape)}")
    if paths.dtype != torch.int64:
        raise TypeError(f"{op}: paths must be int64, got {dtype_name(paths.dtype)}")
    if not paths.is_contiguous():
        raise ValueError(f"{op}: paths must be contiguous")
    if paths.shape[0] < 1 or paths.shape[1] < 1:
        raise ValueError(f"{op}: paths must have at least one row and column, got {list(paths.shape)}")
    if paths.shape[0] >= 2**31:
        raise ValueError(f"{op}: too many paths")


FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_float_matrix(t: Tensor, op: str, name: str, shape: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D {shape}, got shape {list(t.shape)}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {dtype_name(t.dtype)}")


def _check_accept(hidden: Tensor, weight: Tensor, tree_tokens: Tensor, paths: Tensor) -> None:
    """``check_accept_greedy`` of csrc/mtpkern.h."""
    op = "accept_greedy"
    _check_float_matrix(hidden, op, "hidden", "[T, D]")
    _check_float_matrix(weight, op, "weight", "[V, D]")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{op}: weight has {weight.shape[1]} columns but hidden has D = {hidden.shape[1]}")
    if weight.shape[0] < 1:
        raise ValueError(f"{op}: weight has no rows (an empty vocabulary)")
    check_vector(tree_tokens, op, "tree_tokens", torch.int64)
    if tree_tokens.shape[0] < 1:
        raise ValueError(f"{op}: the tree has no nodes")
    if tree_tokens.shape[0] != hidden.shape[0]:
        raise ValueError(f"{op}: tree_tokens has {tree_tokens.shape[0]} entries but hidden has {hidden.shape[0]} rows")
    _check_paths(paths, op)
    check_same_device(hidden, weight, op, "weight")
    check_same_device(hidden, tree_tokens, op, "tree_tokens")
    check_same_device(hidden, paths, op, "paths")


def _check_typical(tree_tokens: Tensor, node_prob: Tensor, parent_entropy: Tensor, epsilon, alpha) -> None:
    """``check_verify_typical`` of csrc/mtpkern.h."""
    op = "verify_typical"
    check_rows(node_prob, op, "node_prob", torch.float32)
    check_rows(parent_entropy, op, "parent_entropy", torch.float32)
    if node_prob.shape != tree_tokens.shape or parent_entropy.shape != tree_tokens.shape:
        raise ValueError(f"{op}: node_prob and parent_entropy need one entry per node, tree_tokens' shape "
                         f"{list(tree_tokens.shape)}")
    check_same_device(tree_tokens, node_prob, op, "node_prob")
    check_same_device(tree_tokens, parent_entropy, op, "parent_entropy")
    check_nonnegative_finite(epsilon, op, "epsilon")
    check_nonnegative_finite(alpha, op, "alpha")


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
    if tree_tokens.dim() == 2:  # a batch: every row on its own
        return _stack([verify_greedy_ref(t, a, paths) for t, a in zip(tree_tokens, target_argmax)])
    step_ok, safe = _in_tree(paths, tree_tokens.shape[0])
    ok = step_ok & (tree_tokens[safe[:, 1:]] == target_argmax[safe[:, :-1]])
    return _choose(ok, tree_tokens, target_argmax, paths)


def _stack(rows: list[VerifyResult]) -> VerifyResult:
    return VerifyResult(*(torch.stack(parts) for parts in zip(*rows)))


def verify_typical_ref(tree_tokens: Tensor, target_argmax: Tensor, node_prob: Tensor, parent_entropy: Tensor,
                       paths: Tensor, epsilon: float = 0.09, alpha: float = 0.3) -> VerifyResult:
    """Eager reference of MEDUSA typical acceptance, in fp32. With n = paths[p, d]:

        draft d >= 1 of row p passes  iff  node_prob[n] > min(epsilon, alpha * exp(-parent_entropy[n]))

    node_prob[n] is the target probability of tree_tokens[n] under its parent's distribution and
    parent_entropy[n] that distribution's entropy. Rows, ties and tokens as in greedy; the bonus
    token is target_argmax[last_node]. A NaN threshold or probability rejects the draft.
    """
    _check(tree_tokens, target_argmax, paths, "verify_typical")
    _check_typical(tree_tokens, node_prob, parent_entropy, epsilon, alpha)
    if tree_tokens.dim() == 2:  # a batch: every row on its own
        return _stack([verify_typical_ref(*row, paths, epsilon, alpha)
                       for row in zip(tree_tokens, target_argmax, node_prob, parent_entropy)])
    step_ok, safe = _in_tree(paths, tree_tokens.shape[0])
    # clamp keeps a NaN threshold NaN, and nothing is > NaN: such drafts are rejected.
    node_ok = node_prob > torch.clamp(alpha * torch.exp(-parent_entropy), max=epsilon)
    return _choose(step_ok & node_ok[safe[:, 1:]], tree_tokens, target_argmax, paths)


class AcceptResult(NamedTuple):
    """One greedy step's outcome (``accept_greedy``)."""

    out: Tensor  # int64 [1 + max_depth + 1]: n = accepted drafts + 1, then VerifyResult.tokens (n emitted tokens first)
    root: Tensor  # int64 [1]: the bonus token, the next step's root (out[n])
    last_node: Tensor  # int64 0-d: the last accepted node
    best_path: Tensor  # int64 0-d: the chosen row of `paths`


def accept_greedy_ref(hidden: Tensor, weight: Tensor, tree_tokens: Tensor, paths: Tensor) -> AcceptResult:
    """Eager reference: head 0's float32 logits ``hidden @ weight.T`` [T, V], their argmax (-1 on a
    row holding NaN; ties to the first maximum), greedy verification of ``paths``, and the step's
    output."""
    _check_accept(hidden, weight, tree_tokens, paths)
    top, arg = (hidden.float() @ weight.float().T).max(-1)
    target = torch.where(top.isnan(), -1, arg)
    res = verify_greedy_ref(tree_tokens, target, paths)
    out = torch.cat([(res.accept_len + 1).view(1), res.tokens])
    return AcceptResult(out, res.tokens.gather(0, res.accept_len.view(1)), res.last_node, res.best_path)


# ---------------------------------------------------------------- registration

OUT = "(Tensor accept_len, Tensor best_path, Tensor last_node, Tensor tokens)"
GREEDY_SCHEMA = f"(Tensor tree_tokens, Tensor target_argmax, Tensor paths) -> {OUT}"
TYPICAL_SCHEMA = (f"(Tensor tree_tokens, Tensor target_argmax, Tensor node_prob, Tensor parent_entropy, "
                  f"Tensor paths, float epsilon, float alpha) -> {OUT}")
ACCEPT_SCHEMA = ("(Tensor hidden, Tensor weight, Tensor tree_tokens, Tensor paths) -> "
                 "(Tensor out, Tensor root, Tensor last_node, Tensor best_path)")

if not _backend.HAS_CUDA_EXT:  # the extension defines the ops in C++; otherwise the references are their kernels
    torch.library.define("mtpkern::verify_greedy", GREEDY_SCHEMA)
    torch.library.impl("mtpkern::verify_greedy", ("CPU", "CUDA"), lambda *a: tuple(verify_greedy_ref(*a)))
    torch.library.define("mtpkern::verify_typical", TYPICAL_SCHEMA)
    torch.library.impl("mtpkern::verify_typical", ("CPU", "CUDA"), lambda *a: tuple(verify_typical_ref(*a)))
    torch.library.define("mtpkern::accept_greedy", ACCEPT_SCHEMA)
    torch.library.impl("mtpkern::accept_greedy", ("CPU", "CUDA"), lambda *a: tuple(accept_greedy_ref(*a)))
else:  # the extension's kernel is the CPU one; on a GPU the reference runs
    torch.library.impl("mtpkern::accept_greedy", "CUDA", lambda *a: tuple(accept_greedy_ref(*a)))


def _verify_outputs(tree_tokens, paths):
    lead = tuple(tree_tokens.shape[:-1])  # () for one tree, (B,) for a batch
    return (paths.new_empty(lead), paths.new_empty(lead), paths.new_empty(lead),
            paths.new_empty(lead + (paths.shape[1],)))


# The fake implementations run the same checks (they read no values), so meta and fake tensors
# fail like real ones.
@torch.library.register_fake("mtpkern::verify_greedy")
def _verify_greedy_fake(tree_tokens, target_argmax, paths):
    _check(tree_tokens, target_argmax, paths, "verify_greedy")
    return _verify_outputs(tree_tokens, paths)


@torch.library.register_fake("mtpkern::verify_typical")
def _verify_typical_fake(tree_tokens, target_argmax, node_prob, parent_entropy, paths, epsilon, alpha):
    _check(tree_tokens, target_argmax, paths, "verify_typical")
    _check_typical(tree_tokens, node_prob, parent_entropy, epsilon, alpha)
    return _verify_outputs(tree_tokens, paths)


@torch.library.register_fake("mtpkern::accept_greedy")
def _accept_greedy_fake(hidden, weight, tree_tokens, paths):
    _check_accept(hidden, weight, tree_tokens, paths)
    return (paths.new_empty(1 + paths.shape[1]), paths.new_empty(1), paths.new_empty(()), paths.new_empty(()))


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
    # Before dispatch: a non-number would otherwise meet the C++ op's schema first.
    check_nonnegative_finite(epsilon, "verify_typical", "epsilon")
    check_nonnegative_finite(alpha, "verify_typical", "alpha")
    if _backend.pick(paths.device, ("cuda", "eager"), backend) == "eager":
        return verify_typical_ref(tree_tokens, target_argmax, node_prob, parent_entropy, paths, epsilon, alpha)
    return VerifyResult(*torch.ops.mtpkern.verify_typical(tree_tokens, target_argmax, node_prob, parent_entropy,
                                                          paths, epsilon, alpha))


def accept_greedy(hidden: Tensor, weight: Tensor, tree_tokens: Tensor, paths: Tensor, *,
                  backend: str | None = None) -> AcceptResult:
    """A greedy step's verification from head 0's hidden states [T, D] (final-normed) and its
    unembedding ``weight`` [V, D]; see :func:`accept_greedy_ref`. On the CPU the extension's kernel
    does it in one call."""
    if _backend.pick(paths.device, ("cuda", "eager"), backend) == "eager":
        return accept_greedy_ref(hidden, weight, tree_tokens, paths)
    return AcceptResult(*torch.ops.mtpkern.accept_greedy(hidden, weight, tree_tokens, paths))
