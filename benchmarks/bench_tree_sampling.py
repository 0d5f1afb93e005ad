"""What sampling a tree's drafts (verify_rejection) costs in accepted length against top-k drafts.

On a tiny table "model" (tests/test_verify_sampled.py's: fixed logits per context over V tokens,
then temperature and top-k), for one step at a fixed context, the mean number of accepted drafts:
  sampled: drafts drawn without replacement from the heads, verified by recursive rejection sampling;
  top-k:   the heads' top tokens as drafts, the target's own sample accepted where it equals a child
           (also exact, since the drafts are deterministic).
Heads: "good" = the target's own distributions, "poor" = fixed logits unrelated to the target.
Run: python benchmarks/bench_tree_sampling.py
"""

import torch

from mtpkern.ops.verify_sampled import verify_rejection
from mtpkern.sampling import sample_tree_drafts
from mtpkern.tree import Tree
from tests.test_verify_sampled import V, heads_for, table


def _p(tree, ctx, toks, kw):
    depth = tree.tensors().depth.tolist()
    rows = [table(ctx + [int(toks[n]) for n in tree.tensors().retrieve[t].tolist()[1:depth[t] + 1]], **kw)
            for t in range(len(tree))]
    return torch.stack(rows)


def sampled_len(tree, heads, kw, n, g):
    ctx, depth = [1, 2], tree.tensors().depth
    q = heads(ctx)
    total = 0
    for _ in range(n):
        toks = sample_tree_drafts(q, tree.parents, depth.tolist(), g)
        res = verify_rejection(toks, _p(tree, ctx, toks, kw), q, (depth - 1).clamp_min(0), tree.tensors().parents,
                               tree.max_depth, generator=g)
        total += int(res.accept_len)
    return total / n


def topk_len(tree, heads, kw, n, g):
    ctx, q = [1, 2], heads([1, 2])
    toks = torch.tensor([-1] + [int(q[len(c) - 1].argsort(descending=True)[c[-1]]) for c in tree.choices])
    p, parents = _p(tree, ctx, toks, kw), tree.parents
    total = 0
    for _ in range(n):
        cur, acc = 0, 0
        while True:
            x = int(torch.multinomial(p[cur], 1, generator=g))
            hit = [c for c in range(1, len(tree)) if parents[c] == cur and int(toks[c]) == x]
            if not hit:
                break
            cur, acc = hit[0], acc + 1
        total += acc
    return total / n


def main(n=2000):
    g = torch.Generator().manual_seed(0)
    print(f"V={V}; mean accepted drafts per step over {n} steps")
    print("| tree | temperature, top-k | heads | sampled drafts | top-k drafts |")
    print("|---|---|---|---|---|")
    for widths in ([1, 1], [3, 2], [3, 3]):
        tree = Tree.from_widths(widths)
        for kw in (dict(temperature=0.7, top_k=4), dict(temperature=1.0, top_k=0)):
            for kind in ("good", "poor"):
                heads = heads_for(kind, kw)
                s, t = sampled_len(tree, heads, kw, n, g), topk_len(tree, heads, kw, n, g)
                print(f"| {widths} | {kw['temperature']}, {kw['top_k']} | {kind} | {s:.3f} | {t:.3f} |")


if __name__ == "__main__":

    main()
