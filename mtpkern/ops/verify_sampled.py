"""Lossless verification of a sampled speculative tree: recursive rejection sampling.

The scheme is SpecInfer's multi-step speculative sampling (Miao et al. 2024) with drafts drawn
without replacement (recursive rejection sampling, Jeon et al. 2024). At a node whose target
distribution is p (head 0 there, after temperature, top-k and top-p), the residual r starts as
p and the node's children x_1..x_m (tree order, drawn without replacement from one q by
``mtpkern.sampling.sample_tree_drafts``) are tried in turn: child i, drawn from
q_i = q without x_1..x_(i-1), renormalised, is accepted when u_i * q_i(x_i) < r(x_i) (probability
min(1, r(x_i) / q_i(x_i))), and the walk moves to it (r = its own p). Otherwise
r = norm(max(0, r - q_i)). When every child is rejected (or the node is a leaf, or max_depth
drafts were accepted), the next token is drawn from r by inverse CDF with u_0.

Why it is exact (induction on m): a child accepted with token y has probability
q_i(y) min(1, r(y)/q_i(y)) = min(q_i, r)(y); a rejection has probability
beta = sum max(0, r - q_i), after which, whatever x_i was, the remaining children (drawn without
replacement from q_(i+1), a fixed distribution given x_i) emit norm(max(0, r - q_i)) by
induction. In total min(q_i, r) + max(0, r - q_i) = r. A child's own children are drawn
independently of everything above, so by the chain rule every emitted token is distributed as
the target's sampling distribution given its prefix. A rejection implies r(x_i) <= q_i(x_i), so the
new residual has no mass on rejected tokens and removed tokens need no bookkeeping beyond the
removed mass. A child with q_i(x) = 0 (beyond q's support, or a token outside [0, V)) is skipped:
it was never really proposed. See docs/sampling.md.

Inputs (one tree, or a batch of B rows sharing one tree shape, with a leading B):
  tree_tokens   int64 [T]        node tokens (node 0, the root, is not read)
  target_probs  float [T, V]     p at every node (float32, float16 or bfloat16; V < 2^23)
  draft_probs   float [Q, V]     proposal rows, of target_probs' dtype
  draft_row     int64 [T]        node t's token was drawn from draft_probs[draft_row[t]] minus its
                                 earlier siblings (siblings share a row; MEDUSA/MTP: depth - 1)
  parents       int64 [T]        the tree's parents (-1 for the root), children in index order
  uniforms      float32 [T]      u_t for node t's test, u_0 for the final draw
  max_depth     int              at most this many drafts are accepted; outputs have max_depth + 1

Random stream (what makes the backends agree): every uniform a row can need is drawn up front,
one per node, ``uniforms = torch.rand(tree_tokens.shape, generator=generator)`` on the tensors'
device (so no host sync), and the kernels read them in a fixed order: u_t only for node t's
test, u_0 only for the final draw. Whatever the walk, row b's results depend on nothing but
uniforms[b]; the same generator state (or the same ``uniforms``) gives the same tokens.

Arithmetic (what makes them agree bit for bit): a probability enters as the integer weight
W = floor(w * 2^40), so every sum over the vocabulary is an exact int64 sum, the same in any
order (the CPU loop, the CUDA block's reduction, torch.sum). With r = R / Z (R: the residual's
weights, Z = sum R) and q_i = Q / M (M = the row's mass minus the rejected siblings' weights):
the test is (u * Q(x)) * Z < R(x) * M in double; a rejection makes R(y) =
floor((R(y) / Z - Q(y) / M) * 2^40) where positive, else 0 (each quotient and product rounded
once, in double: no fused multiply-add); the final draw is the first y whose inclusive prefix
sum of R exceeds floor(u_0 * Z). The scheme is then exact for the weights, which differ from p
and q by less than 2^-40 per token. A target row holding a value outside [0, 1] (NaN included)
has no mass: nothing below it is accepted and the drawn token is -1; a draft row that does
proposes nothing (its children are skipped, which keeps the output exact). Kernels:
``csrc/verify_rejection_api.cpp`` (CPU) and ``csrc/cuda/verify_rejection.cu`` (one block per
batch row, one launch).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from mtpkern.ops import _backend
from mtpkern.ops._checks import check_rows, check_same_device, check_vector
from mtpkern.runtime import dtype_name


class RejectionResult(NamedTuple):
    """One tree's results; a batch's carry a leading B."""

    accept_len: Tensor  # int64 0-d: accepted drafts, 0..max_depth
    last_node: Tensor  # int64 0-d: the last accepted node (0 = the root)
    path: Tensor  # int64 [max_depth + 1]: nodes root..last_node, then -1 (kv_compact_'s path)
    tokens: Tensor  # int64 [max_depth + 1]: accepted drafts, the sampled token, then -1
    n_emitted: Tensor  # int64 0-d: emitted tokens, accept_len + 1 (kv_compact_'s count for path)


OP = "verify_rejection"
PROB_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_VOCAB = 2**23  # V < 2^23 keeps every int64 sum of weights (at most V * 2^40) below 2^63
SCALE = 2.0**40  # a probability's weight is floor(p * 2^40)


def _check(tree_tokens, target_probs, draft_probs, draft_row, parents, uniforms, max_depth) -> None:
    """``check_verify_rejection`` of csrc/mtpkern.h: the same checks, order, types and messages."""
    check_rows(tree_tokens, OP, "tree_tokens", torch.int64)
    T, lead = tree_tokens.shape[-1], list(tree_tokens.shape[:-1])
    if T < 1 or (lead and lead[0] < 1):
        raise ValueError(f"{OP}: the tree has no nodes or the batch is empty (tree_tokens {list(tree_tokens.shape)})")
    dims = f"[{lead[0]}, N, V]" if lead else "[N, V]"
    for t, name in ((target_probs, "target_probs"), (draft_probs, "draft_probs")):
        if t.dim() != tree_tokens.dim() + 1 or list(t.shape[:-2]) != lead:
            raise ValueError(f"{OP}: {name} must have shape {dims} (tree_tokens has shape "
                             f"{list(tree_tokens.shape)}), got {list(t.shape)}")
        if t.dtype not in PROB_DTYPES:
            raise TypeError(f"{OP}: {name} must be float32, float16 or bfloat16, got {dtype_name(t.dtype)}")
        if not t.is_contiguous():
            raise ValueError(f"{OP}: {name} must be contiguous")
    if draft_probs.dtype != target_probs.dtype:
        raise TypeError(f"{OP}: draft_probs is {dtype_name(draft_probs.dtype)} but target_probs is "
                        f"{dtype_name(target_probs.dtype)}")
    V = target_probs.shape[-1]
    if target_probs.shape[-2] != T or V < 1:
        raise ValueError(f"{OP}: target_probs needs {T} rows of V >= 1, got shape {list(target_probs.shape)}")
    if V >= MAX_VOCAB:
        raise ValueError(f"{OP}: a vocabulary of {V} is too large (at most {MAX_VOCAB - 1})")
    if draft_probs.shape[-1] != V or draft_probs.shape[-2] < 1:
        raise ValueError(f"{OP}: draft_probs must have rows of V = {V}, got {list(draft_probs.shape)}")
    for t, name in ((draft_row, "draft_row"), (parents, "parents")):
        check_vector(t, OP, name, torch.int64)
        if t.shape[0] != T:
            raise ValueError(f"{OP}: {name} has {t.shape[0]} entries but the tree has {T} nodes")
    check_rows(uniforms, OP, "uniforms", torch.float32)
    if uniforms.shape != tree_tokens.shape:
        raise ValueError(f"{OP}: uniforms has shape {list(uniforms.shape)} but tree_tokens has "
                         f"{list(tree_tokens.shape)}")
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or not 0 <= max_depth < 4096:
        raise ValueError(f"{OP}: max_depth must be an int in [0, 4096), got {max_depth!r}")
    for t, name in ((target_probs, "target_probs"), (draft_probs, "draft_probs"), (draft_row, "draft_row"),
                    (parents, "parents"), (uniforms, "uniforms")):
        check_same_device(tree_tokens, t, OP, name)


# ---------------------------------------------------------------- eager reference

def _weights(w: Tensor) -> tuple[Tensor, int]:
    """A probability row as int64 weights floor(w * 2^40) and its exact mass; the mass is 0 when
    any entry lies outside [0, 1] (NaN included): such a row has no mass."""
    w = w.double()
    ok = (w >= 0) & (w <= 1)
    W = torch.where(ok, (w * SCALE).floor(), 0.0).long()
    return W, int(W.sum()) if bool(ok.all()) else 0


def _accepts(u: float, qx: int, M: int, rx: int, Z: int) -> bool:
    """u q_i(x) < r(x) as (u * qx) * Z < rx * M in double (kernels.h's rejection_accepts)."""
    return u * float(qx) * float(Z) < float(rx) * float(M)


def _residual(R: Tensor, Z: int, Q: Tensor, M: int) -> Tensor:
    """Weights of max(0, R / Z - Q / M): each quotient rounded once in double, then floor(d * 2^40)."""
    # Full tensors, not scalars: a division by a scalar may become a multiplication by its reciprocal.
    d = (R.double() / torch.full_like(R, float(Z), dtype=torch.float64)
         - Q.double() / torch.full_like(Q, float(M), dtype=torch.float64))
    return torch.where(d > 0, (d * SCALE).floor(), 0.0).long()


def _draw(R: Tensor, Z: int, u: float) -> int:
    """Inverse CDF: the first y whose inclusive prefix sum of R exceeds floor(u * Z) (clamped into
    [0, Z - 1]); -1 when Z = 0."""
    if Z <= 0:
        return -1
    t = u * float(Z)
    th = 0 if not t > 0 else Z - 1 if t >= 9.0e18 else min(math.floor(t), Z - 1)
    return int(torch.searchsorted(R.cumsum(0), torch.tensor([th]), right=True)[0])


def _row_ref(tokens, p, q, draft_row, kids, u, max_depth):
    """One row's walk (host lists for the structure, int64 weights for the distributions)."""
    V, Q = p.shape[-1], q.shape[0]
    cur, path = 0, [0]
    R, Z = _weights(p[0])
    out: list[int] = []
    masses: dict[int, tuple[Tensor, int]] = {}  # draft row -> (weights, mass)
    while len(out) < max_depth and Z > 0:
        accepted, removed = -1, 0  # removed: the proposal mass of the rejected siblings
        for c in kids[cur]:
            x, row = tokens[c], draft_row[c]
            if not (0 <= x < V and 0 <= row < Q):
                continue  # never proposed
            if row not in masses:
                masses[row] = _weights(q[row])
            W, S = masses[row]
            qx = int(W[x])
            if S <= 0 or qx <= 0:
                continue  # beyond q's support (or an invalid row): never proposed
            M = max(S - removed, qx)
            if _accepts(u[c], qx, M, int(R[x]), Z):
                accepted = c
                break
            new = _residual(R, Z, W, M)
            z = int(new.sum())
            if z > 0:  # otherwise r == q_i up to rounding and the rejection had probability ~0
                R, Z = new, z
            removed += qx
        if accepted < 0:
            break
        cur = accepted
        path.append(cur)
        out.append(tokens[cur])
        R, Z = _weights(p[cur])
    return path, out + [_draw(R, Z, u[0])]


def verify_rejection_ref(tree_tokens: Tensor, target_probs: Tensor, draft_probs: Tensor, draft_row: Tensor,
                         parents: Tensor, uniforms: Tensor, max_depth: int) -> RejectionResult:
    """Eager reference (on the host, in int64 weights and double): the module docstring's rule and
    arithmetic, which the C++ and CUDA kernels follow to the bit."""
    _check(tree_tokens, target_probs, draft_probs, draft_row, parents, uniforms, max_depth)
    single = tree_tokens.dim() == 1
    toks, p, q, u = (x[None] if single else x for x in (tree_tokens, target_probs, draft_probs, uniforms))
    par, rows = parents.tolist(), draft_row.tolist()
    kids: list[list[int]] = [[] for _ in par]
    for t in range(1, len(par)):
        if 0 <= par[t] < t:
            kids[par[t]].append(t)
    B, D1 = toks.shape[0], max_depth + 1
    path = torch.full((B, D1), -1, dtype=torch.int64)
    tokens = torch.full((B, D1), -1, dtype=torch.int64)
    for b in range(B):
        nodes, out = _row_ref(toks[b].tolist(), p[b].cpu(), q[b].cpu(), rows, kids, u[b].tolist(), max_depth)
        path[b, : len(nodes)] = torch.tensor(nodes)
        tokens[b, : len(out)] = torch.tensor(out)
    n = (path >= 0).sum(1) - 1
    res = RejectionResult(n, path.gather(1, n[:, None])[:, 0], path, tokens, n + 1)
    dev = tree_tokens.device
    return RejectionResult(*(x[0].to(dev) if single else x.to(dev) for x in res))


# ---------------------------------------------------------------- registration

SCHEMA = ("(Tensor tree_tokens, Tensor target_probs, Tensor draft_probs, Tensor draft_row, Tensor parents, "
          "Tensor uniforms, int max_depth) -> (Tensor accept_len, Tensor last_node, Tensor path, Tensor tokens, "
          "Tensor n_emitted)")

if not _backend.HAS_CUDA_EXT:  # the extension defines the op in C++; otherwise the reference is its kernel
    torch.library.define(f"mtpkern::{OP}", SCHEMA)
    torch.library.impl(f"mtpkern::{OP}", ("CPU", "CUDA"), lambda *a: tuple(verify_rejection_ref(*a)))


@torch.library.register_fake(f"mtpkern::{OP}")
def _verify_rejection_fake(tree_tokens, target_probs, draft_probs, draft_row, parents, uniforms, max_depth):
    _check(tree_tokens, target_probs, draft_probs, draft_row, parents, uniforms, max_depth)
    lead = tuple(tree_tokens.shape[:-1])
    e = tree_tokens.new_empty
    return e(lead), e(lead), e(lead + (max_depth + 1,)), e(lead + (max_depth + 1,)), e(lead)


# ---------------------------------------------------------------- public function

def verify_rejection(tree_tokens: Tensor, target_probs: Tensor, draft_probs: Tensor, draft_row: Tensor,
                     parents: Tensor, max_depth: int, *, generator: torch.Generator | None = None,
                     uniforms: Tensor | None = None, backend: str | None = None) -> RejectionResult:
    """Recursive rejection sampling of a sampled tree; see the module docstring. The uniforms
    ([T] or [B, T]) are drawn with ``generator`` on the tensors' device unless given; the C++
    (CPU) and CUDA kernels and the eager reference give the same results for the same uniforms."""
    if uniforms is None:
        uniforms = torch.rand(tree_tokens.shape, generator=generator, device=tree_tokens.device)
    args = (tree_tokens, target_probs, draft_probs, draft_row, parents, uniforms, max_depth)
    if _backend.pick(tree_tokens.device, ("cuda", "eager"), backend) == "eager":
        return verify_rejection_ref(*args)
    return RejectionResult(*torch.ops.mtpkern.verify_rejection(*args))
