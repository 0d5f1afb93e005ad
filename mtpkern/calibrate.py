"""Trees that fit the hardware: head acceptance on held-out data, step cost vs tree size, and
the tree that maximises expected tokens per second (Sequoia, Chen et al. 2024, measured here).

The command over three layers, each usable alone:

* **Calibration** (:func:`calibrate`): on held-out prompts, the model decodes greedily with its
  own next-token path; then, at every position of that continuation, draft head d's top-k
  (k = 10) is compared with the token the model itself decoded d positions later. Counted
  only where every shallower head's correct token was within its top-k (the positions a tree
  could reach at depth d), this gives ``accept[d][r]``: the probability that head d's rank-r
  candidate is the model's own token, given that the path above it was accepted. Saved beside
  the weights as ``calibration.json`` with a fingerprint of the model (type, heads, vocabulary,
  layer sizes, a hash of a few weights), so a file from another model is refused;
  ``mtpkern.load_model`` attaches it as ``model.calibration``.
  The file and its checks are :mod:`mtpkern.calibration` (a leaf the model loader imports);
  the measurement is :func:`calibrate` here.
* **Cost model** (:func:`~mtpkern.costmodel.step_cost`, :mod:`mtpkern.costmodel`): the time of
  one decoding step of the engine for 1 to 128 tree tokens, measured once per device and
  setting and cached.
* **Tree optimiser** (:func:`~mtpkern.planner.optimise_tree`,
  :func:`~mtpkern.planner.optimise_tree_depths`, :mod:`mtpkern.planner`): for every node
  budget n (and depth) the tree with the largest expected accepted length, then the one that
  maximises expected accepted length / step time (why best-first expansion is exact: there).

This module is the command: :func:`calibrate`, :func:`calibrate_checkpoint` (``mtpkern
calibrate``), :func:`plan_tree` and :func:`auto_tree` (``tree="auto"``). The names of the three
layers are re-exported here.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch

from mtpkern.autotree import auto_tree, has_calibration, plan_tree, resolve_options
from mtpkern.calibration import (
    CALIBRATION_NAME,
    SCHEMA,
    TOPK,
    Calibration,
    CalibrationError,
    attach_calibration,
    draft_depth,
    fingerprint,
    load_calibration,
)
from mtpkern.checkpoint import resolve_checkpoint
from mtpkern.costmodel import (
    COST_ROUNDS,
    COST_SCHEMA,
    COST_SIZES,
    cache_dir,
    cost_depths,
    cost_key,
    device_name,
    step_cost,
    time_tree_step,
    timing_tree,
)
from mtpkern.data import load_tokenizer, prompt_ids
from mtpkern.rundir import read_run, validation_records
from mtpkern.generation import generate
from mtpkern.heads_io import check_base_use, tokenizer_source
from mtpkern.hf_io import load_model
from mtpkern.planner import (
    StepCost,
    TreePlan,
    best_first_nodes,
    check_budget,
    check_curve,
    max_draft_nodes,
    optimise_tree,
    optimise_tree_depths,
    simulate_steps,
    simulated_accept_length,
)
from mtpkern.runtime import resolve_device, resolve_dtype
from mtpkern.tree import Tree


@torch.inference_mode()
def calibrate(model, prompts: Sequence, *, max_new_tokens: int = 64, eos_token_id: int | None = None,
              topk: int = TOPK, source: dict | None = None) -> Calibration:
    """Measure ``accept[d][r]`` on ``prompts`` (token id lists or tensors; see the module
    docstring). Each prompt is decoded greedily (the model's own speculative strategy over a
    chain, whose tokens equal greedy next-token decoding), then one causal forward pass over prompt +
    continuation gives every head's top-k at every generated position."""
    kind = model.config.model_type
    if kind not in ("mtp", "medusa") or draft_depth(model) < 1:
        raise ValueError(f"calibration needs an MTP or MEDUSA model with draft heads, got a {kind} model "
                         f"with {model.n_heads} head(s)")
    _check_calibrate_args(prompts, topk)
    D, K = draft_depth(model), min(topk, model.config.vocab_size, 10)  # one character per rank
    counts = torch.zeros(D, K, dtype=torch.long)
    positions = torch.zeros(D, dtype=torch.long)
    n_prompts, ranks = 0, []
    for i, prompt in enumerate(prompts):
        ids = _prompt_ids(prompt, i, model.device)
        P = ids.numel()
        room = model.config.n_positions - P - D - 1
        if P == 0 or room < 1:
            continue
        out = generate(model, ids, max_new_tokens=min(max_new_tokens, room), strategy=kind,
                       tree=Tree.chain(D), eos_token_id=eos_token_id)
        assert not isinstance(out, list)  # one prompt: one result, not a batch's list
        seq = torch.cat([ids, torch.tensor(out.tokens, device=ids.device, dtype=torch.long)])
        L = seq.numel()
        hidden = model(seq[None], heads=D + 1, logits=False).hidden[0]  # [L, D + 1, dim]
        reachable = torch.ones(L - P, dtype=torch.bool, device=ids.device)  # positions P-1 .. L-2
        table = torch.full((L - P, D), -1, dtype=torch.long)  # -1: past the end
        for d in range(1, D + 1):
            n = L - P - d  # positions t = P-1 .. L-d-2 have a token d + 1 ahead
            if n <= 0:
                break
            top = model.head_logits(hidden[P - 1 : P - 1 + n, d], d).topk(K, dim=-1).indices  # [n, K]
            hit = top == seq[P + d : P + d + n, None]  # the model's own token d positions after t+1
            rank = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(hit[:, 0], K, dtype=torch.long))
            ok = reachable[:n]
            counts[d - 1] += torch.bincount(rank[ok], minlength=K + 1)[:K].cpu()
            positions[d - 1] += int(ok.sum())
            reachable = reachable[:n] & (rank < K)
            table[:n, d - 1] = rank.cpu()
        ranks.append(["".join("." if r < 0 else "x" if r >= K else str(r) for r in row) for row in table.tolist()])
        n_prompts += 1
    if n_prompts == 0:
        raise ValueError(f"no prompt to calibrate on: none was given, or none leaves room to decode in the "
                         f"model's context of {model.config.n_positions} tokens")
    info = dict(source or {}, n_prompts=n_prompts, max_new_tokens=max_new_tokens)
    return Calibration(fingerprint(model), K, counts.tolist(), positions.tolist(), info, ranks)


def _check_calibrate_args(prompts, topk) -> None:
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts must be a list of token-id sequences (tokenize text first, e.g. with "
                        f"mtpkern.data.load_tokenizer(checkpoint)), got {type(prompts).__name__}")
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= TOPK:
        raise ValueError(f"topk must be an int in 1..{TOPK} (one character per rank), got {topk!r}")


def _prompt_ids(prompt, i: int, device) -> torch.Tensor:
    """Prompt i's token ids, 1-D: text, or ids that are not integers (which ``long()`` would
    truncate silently), are a TypeError."""
    try:
        ids = torch.as_tensor(prompt, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"prompt {i} must be token ids, a list of ints or an integer tensor (tokenize text first, "
                        f"e.g. with mtpkern.data.load_tokenizer(checkpoint)), got {type(prompt).__name__}") from None
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"prompt {i} must hold integer token ids, got {ids.dtype}")
    return ids.reshape(-1).long()


def held_out_prompts(records, tokenizer, model, *, max_samples: int, max_new_tokens: int) -> list[list[int]]:
    """Token ids of up to ``max_samples`` records' prompts that leave room to decode."""
    room = model.config.n_positions - max_new_tokens - draft_depth(model) - 1
    prompts = []
    for rec in records:
        ids = prompt_ids(tokenizer, rec)
        if 0 < len(ids) <= room:
            prompts.append(ids)
        if len(prompts) == max_samples:
            break
    return prompts


def calibrate_records(model, records, tokenizer, *, max_samples: int = 16, max_new_tokens: int = 48,
                      source: dict | None = None) -> Calibration:
    """:func:`calibrate` on the prompts of held-out records."""
    prompts = held_out_prompts(records, tokenizer, model, max_samples=max_samples, max_new_tokens=max_new_tokens)
    if not prompts:
        raise ValueError(f"no held-out prompt fits the context of {model.config.n_positions} tokens "
                         f"with max_new_tokens={max_new_tokens}")
    return calibrate(model, prompts, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                     source=source)


def calibrate_checkpoint(path, *, data: str | None = None, device: str = "auto", dtype: str | None = None,
                         max_samples: int = 32, max_new_tokens: int = 64, kernels: str = "auto",
                         cuda_graph: bool = False, max_nodes: int | None = None, measure: bool = True,
                         base=None) -> dict:
    """``mtpkern calibrate``: calibrate a run or checkpoint on its held-out data, write
    ``calibration.json`` beside the weights, measure the step cost, choose the tree, and (with
    ``measure``) decode held-out prompts with it and with ``ntp`` to set the prediction beside
    what happens. Returns the report (printed by :func:`format_report`). ``path`` may be a MEDUSA
    head directory (``mtpkern.heads_io``) on its config's base, or on ``base`` where given (the
    tokenizer is then the base's); ``base`` for anything else is a one-line error."""
    check_base_use([path], base)
    ckpt, run = resolve_checkpoint(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    train_config = read_run(run)[0]
    val, info = validation_records(train_config, data)
    # Loaded as saved (the fingerprint reads those weights) and without any old calibration.
    model = load_model(ckpt, device=dev, calibration=False, base=base).eval()
    if model.config.model_type not in ("mtp", "medusa"):
        raise ValueError(f"{ckpt} holds a {model.config.model_type} model: calibration needs MTP or MEDUSA heads")
    if max_nodes is not None:
        check_budget(max_nodes, max_draft_nodes(model))
    tokenizer = load_tokenizer(tokenizer_source(ckpt, base))
    prompts = held_out_prompts(val, tokenizer, model, max_samples=2 * max_samples, max_new_tokens=max_new_tokens)
    if not prompts:
        raise ValueError(f"no held-out prompt fits the context of {model.config.n_positions} tokens "
                         f"with max_new_tokens={max_new_tokens}; lower --max-new-tokens")
    fit, check = prompts[:max_samples], prompts[max_samples:] or prompts[:max_samples]
    cal = calibrate(model, fit, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, source=info)
    saved = cal.save(ckpt)
    model = model.to(dt)
    plan = plan_tree(model, kernels=kernels, cuda_graph=cuda_graph, max_nodes=max_nodes, calibration=cal)
    cost = step_cost(model, kernels=kernels, cuda_graph=cuda_graph)
    report = dict(checkpoint=str(ckpt), calibration_file=str(saved), calibration=cal.to_dict(),
                  step_cost=dict(sizes=cost.sizes, seconds=cost.seconds, **cost.key, cache=str(cache_dir())),
                  plan=plan.to_dict(), measured=None)
    if measure:
        report["measured"] = measure_tree(model, plan.tree, check, max_new_tokens=max_new_tokens,
                                          eos_token_id=tokenizer.eos_token_id, kernels=kernels, cuda_graph=cuda_graph)
    return report


def measure_tree(model, tree: Tree, prompts, *, max_new_tokens: int, eos_token_id: int | None = None,
                 kernels: str = "auto", cuda_graph: bool = False) -> dict:
    """Mean accepted length and tokens/s (new tokens / decode time after the prefill, summed
    over prompts) of greedy decoding with ``tree``, and of ``ntp`` for the speedup; one
    untimed warm-up each."""
    out = {}
    for name, kw in (("ntp", dict(strategy="ntp")), ("tree", dict(strategy=model.config.model_type, tree=tree))):
        runs = []
        for p in [prompts[0], *prompts]:  # the first: an untimed warm-up
            r = generate(model, torch.as_tensor(p, device=model.device), max_new_tokens=max_new_tokens,
                         eos_token_id=eos_token_id, kernels=kernels, cuda_graph=cuda_graph, **kw)
            assert not isinstance(r, list)  # one prompt: one result, not a batch's list
            runs.append(r)
        del runs[0]
        steps = [a for r in runs for a in r.accept_lengths]
        seconds = sum(sum(r.step_times) for r in runs)
        out[name] = dict(accept_length=sum(steps) / max(1, len(steps)),
                         tokens_per_second=sum(steps) / seconds if seconds > 0 else 0.0)
    return dict(accept_length=out["tree"]["accept_length"], tokens_per_second=out["tree"]["tokens_per_second"],
                ntp_tokens_per_second=out["ntp"]["tokens_per_second"],
                speedup_vs_ntp=out["tree"]["tokens_per_second"] / max(out["ntp"]["tokens_per_second"], 1e-12),
                n_prompts=len(prompts))


def format_report(report: dict) -> str:
    """The calibrate command's output: acceptance, step cost, the tree, predicted vs measured."""
    cal = Calibration.from_dict(report["calibration"])
    cost, plan, got = report["step_cost"], report["plan"], report["measured"]
    lines = [f"calibration: {report['calibration_file']}", f"  {cal.summary()}",
             f"step cost ({cost['device']}, {cost['dtype']}, kernels {cost['kernels']}, "
             f"cuda_graph {cost['cuda_graph']}): " + ", ".join(
                 f"T={T} {t * 1e3:.2f} ms" for T, t in zip(cost["sizes"], cost["seconds"])),
             f"tree: {plan['nodes']} nodes, depth {plan['depth']}, top-{plan['topk']}: {plan['tree']}",
             "| | accepted length | tokens/s (decode steps) | speedup vs ntp |", "|---|---|---|---|",
             f"| predicted | {plan['predicted_accept_length']:.2f} | {plan['predicted_tokens_per_second']:.1f} "
             f"| {plan['predicted_speedup_vs_ntp']:.2f}x |"]
    if got is not None:
        lines.append(f"| measured ({got['n_prompts']} held-out prompts) | {got['accept_length']:.2f} "
                     f"| {got['tokens_per_second']:.1f} | {got['speedup_vs_ntp']:.2f}x |")
    return "\n".join(lines)


def calibrate_after_training(model, records, tokenizer, checkpoint, *, source: dict | None = None) -> Path | None:
    """The end of ``mtpkern train mtp|medusa``: calibrate the trained model on its held-out
    records and write ``calibration.json`` into the checkpoint. A model that leaves no room to
    decode is skipped, not an error: training succeeded."""
    if model.config.model_type not in ("mtp", "medusa") or draft_depth(model) < 1 or not records:
        return None
    try:
        # A short calibration (12 prompts x 40 tokens) so training ends soon; `mtpkern
        # calibrate` measures more (32 x 64 by default).
        cal = calibrate_records(model.eval(), records, tokenizer, max_samples=12, max_new_tokens=40, source=source)
    except ValueError as e:
        warnings.warn(f"skipped calibration: {e}", stacklevel=2)
        return None
    return cal.save(checkpoint)


__all__ = [
    # re-exported: mtpkern.autotree
    "auto_tree", "has_calibration", "plan_tree", "resolve_options",
    # the command
    "calibrate", "calibrate_after_training", "calibrate_checkpoint", "calibrate_records", "format_report",
    "held_out_prompts", "measure_tree",
    # re-exported: mtpkern.calibration
    "CALIBRATION_NAME", "SCHEMA", "TOPK", "Calibration", "CalibrationError", "attach_calibration", "draft_depth",
    "fingerprint", "load_calibration",
    # re-exported: mtpkern.costmodel
    "COST_ROUNDS", "COST_SCHEMA", "COST_SIZES", "cache_dir", "cost_depths", "cost_key", "device_name", "step_cost",
    "time_tree_step", "timing_tree",
    # re-exported: mtpkern.planner
    "StepCost", "TreePlan", "best_first_nodes", "check_budget", "check_curve", "max_draft_nodes", "optimise_tree",
    "optimise_tree_depths", "simulate_steps", "simulated_accept_length",
]
