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
  target_probs  float32 [T, V]   p at every node
  draft_probs   float32 [Q, V]   proposal rows
  draft_row     int64 [T]        node t's token was drawn from draft_probs[draft_row[t]] minus its
                                 earlier siblings (siblings share a row; MEDUSA/MTP: depth - 1)
  parents       int64 [T]        the tree's parents (-1 for the root), children in index order
  uniforms      float32 [T]      u_t for node t's test, u_0 for the final draw
  max_depth     int              at most this many drafts are accepted; outputs have max_depth + 1
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mtpkern.ops import _backend
from mtpkern.ops._checks import check_rows, check_same_device, check_vector


class RejectionResult(NamedTuple):
    """One tree's results; a batch's carry a leading B."""

    accept_len: Tensor  # int64 0-d: accepted drafts, 0..max_depth
    last_node: Tensor  # int64 0-d: the last accepted node (0 = the root)
    path: Tensor  # int64 [max_depth + 1]: nodes root..last_node, then -1 (kv_compact_'s path)
    tokens: Tensor  # int64 [max_depth + 1]: accepted drafts, the sampled token, then -1
    n_emitted: Tensor  # int64 0-d: emitted tokens, accept_len + 1 (kv_compact_'s count for path)


OP = "verify_rejection"


def _check(tree_tokens, target_probs, draft_probs, draft_row, parents, uniforms, max_depth) -> None:
    check_rows(tree_tokens, OP, "tree_tokens", torch.int64)
    T, lead = tree_tokens.shape[-1], list(tree_tokens.shape[:-1])
    if T < 1 or (lead and lead[0] < 1):
        raise ValueError(f"{OP}: the tree has no nodes or the batch is empty (tree_tokens {list(tree_tokens.shape)})")
    for t, name in ((target_probs, "target_probs"), (draft_probs, "draft_probs")):
        if t.dim() != tree_tokens.dim() + 1 or list(t.shape[:-2]) != lead:
            raise ValueError(f"{OP}: {name} must be {lead + ['N', 'V']}, got shape {list(t.shape)}")
        if t.dtype != torch.float32:
            raise TypeError(f"{OP}: {name} must be float32, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{OP}: {name} must be contiguous")
    if target_probs.shape[-2] != T or target_probs.shape[-1] < 1:
        raise ValueError(f"{OP}: target_probs needs {T} rows of V >= 1, got shape {list(target_probs.shape)}")
    if draft_probs.shape[-1] != target_probs.shape[-1] or draft_probs.shape[-2] < 1:
        raise ValueError(f"{OP}: draft_probs must have rows of V = {target_probs.shape[-1]}, got {list(draft_probs.shape)}")
    for t, name in ((draft_row, "draft_row"), (parents, "parents")):
        check_vector(t, OP, name, torch.int64)
        if t.shape[0] != T:
            raise ValueError(f"{OP}: {name} has {t.shape[0]} entries but the tree has {T} nodes")
    check_rows(uniforms, OP, "uniforms", torch.float32)
    if uniforms.shape != tree_tokens.shape:
        raise ValueError(f"{OP}: uniforms has shape {list(uniforms.shape)} but tree_tokens has {list(tree_tokens.shape)}")
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or not 0 <= max_depth < 4096:
        raise ValueError(f"{OP}: max_depth must be an int in [0, 4096), got {max_depth!r}")
    for t, name in ((target_probs, "target_probs"), (draft_probs, "draft_probs"), (draft_row, "draft_row"),
                    (parents, "parents"), (uniforms, "uniforms")):
        check_same_device(tree_tokens, t, OP, name)


# ---------------------------------------------------------------- eager reference

def _draw(r: Tensor, u: float) -> int:
    """Inverse CDF: the first y with r(y) > 0 and cumsum(r)(y) > u * sum(r); the last y with
    r(y) > 0 if rounding leaves none; -1 when sum(r) is not finite and positive."""
    c = r.cumsum(0)
    tot = float(c[-1])
    if not (tot > 0 and tot < float("inf")):
        return -1
    hit = ((c > u * tot) & (r > 0)).nonzero()
    return int(hit[0]) if len(hit) else int((r > 0).nonzero()[-1])


def _row_ref(tokens, p, q, draft_row, kids, u, max_depth):
    """One row's walk (host lists for the structure, fp32 tensors for the distributions)."""
    V, Q = p.shape[-1], q.shape[0]
    cur, path, r = 0, [0], p[0]
    out: list[int] = []
    while len(out) < max_depth:
        accepted, rem = False, 1.0  # rem: q mass left after the rejected siblings  # q mass left after removing the rejected siblings' tokens
        for c in kids[cur]:
            x, row = tokens[c], draft_row[c]
            qx = float(q[row, x]) if 0 <= x < V and 0 <= row < Q else 0.0
            if not qx > 0:
                continue  # never proposed: skipped
            qi = qx / max(rem, qx)
            if u[c] * qi < float(r[x]):
                cur, r, accepted = c, p[c], True
                path.append(c)
                out.append(x)
                break
            new = (r - q[row] / torch.maximum(torch.tensor(rem), q[row])).clamp_min(0.0)
            z = float(new.sum())
            if z > 1e-6:  # otherwise r == q_i up to rounding and the rejection had probability ~0
                r = new / z
            rem -= qx
        if not accepted:
            break
    return path, out + [_draw(r, u[0])]


def verify_rejection_ref(tree_tokens: Tensor, target_probs: Tensor, draft_probs: Tensor, draft_row: Tensor,
                         parents: Tensor, uniforms: Tensor, max_depth: int) -> RejectionResult:
    """Eager reference (fp32; reads the structure on the host): the module docstring's rule."""
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
        nodes, out = _row_ref(toks[b].tolist(), p[b].float().cpu(), q[b].float().cpu(), rows, kids,
                              u[b].tolist(), max_depth)
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

# No C++/CUDA kernel yet: the reference is the op's kernel on every device.
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
    ([T] or [B, T]) are drawn with ``generator`` on the tensors' device unless given."""
    if uniforms is None:
        uniforms = torch.rand(tree_tokens.shape, generator=generator, device=tree_tokens.device)
    args = (tree_tokens, target_probs, draft_probs, draft_row, parents, uniforms, max_depth)
    if _backend.pick(tree_tokens.device, ("eager",), backend) == "eager":
        return verify_rejection_ref(*args)
    return RejectionResult(*torch.ops.mtpkern.verify_rejection(*args))  # pragma: no cover - no kernel yet
