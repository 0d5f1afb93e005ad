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
* **Calibration for sampling** (:func:`calibrate_sampling`, ``mtpkern calibrate --temperature
  T``): rejection sampling draws each node's children without replacement from its head's
  distribution at T (with top-k / top-p) and tries them in turn against the target's residual
  (``mtpkern.ops.verify_rejection``), so what a tree is worth depends on T. On a continuation
  the model samples at T, at every position t and depth d, with q the distribution of draft
  head d at t and r the target's at the depth-(d-1) node t + d (the sampled path taken as the
  accepted one), ``accept[d][i]`` averages the probability that the i-th child drawn from q is
  accepted (its earlier siblings rejected): :func:`sampled_acceptance`, exact for the first
  child (``sum min(q, r)``) and an unbiased estimate for the others. It is stored per
  temperature in ``calibration.json`` (``Calibration.sampling``); ``tree="auto"`` with
  ``acceptance="rejection"`` plans from the table nearest its temperature.

This module is the command: :func:`calibrate`, :func:`calibrate_checkpoint` (``mtpkern
calibrate``), :func:`plan_tree` and :func:`auto_tree` (``tree="auto"``). The names of the three
layers are re-exported here.
"""

from __future__ import annotations

import math
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
    temperature_key,
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
from mtpkern.options import DecodeOptions
from mtpkern.planner import (
    StepCost,
    TreePlan,
    best_first_nodes,
    best_sampled_trees,
    check_budget,
    check_curve,
    max_draft_nodes,
    optimise_tree,
    optimise_tree_depths,
    simulate_steps,
    simulated_accept_length,
)
from mtpkern.runtime import resolve_device, resolve_dtype
from mtpkern.sampling import sampling_probs
from mtpkern.tree import Tree


@torch.inference_mode()
def calibrate(model, prompts: Sequence, *, max_new_tokens: int = 64, eos_token_id: int | None = None,
              topk: int = TOPK, source: dict | None = None) -> Calibration:
    """Measure ``accept[d][r]`` on ``prompts`` (token id lists or tensors; see the module
    docstring). Each prompt is decoded greedily (the model's own speculative strategy over a
    chain, whose tokens equal greedy next-token decoding), then one causal forward pass over prompt +
    continuation gives every head's top-k at every generated position."""
    kind = model.config.model_type
    _check_calibrate_args(model, prompts, topk)
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


def sampled_acceptance(q: torch.Tensor, r: torch.Tensor, width: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """For rows of a head distribution ``q`` [R, V] and a target (residual) distribution ``r``
    [R, V]: entry [., i] of the result [R, width] has expectation the probability that the
    i-th child drawn without replacement from q is accepted by recursive rejection sampling
    against r, the children before it rejected (the scheme of ``verify_rejection``).

    One history per row, Rao-Blackwellised: child i, drawn from q_i (q without the earlier
    children, renormalised), is accepted with probability ``a_i = sum min(q_i, r_i)`` given the
    history, so the entry is ``a_i * prod_(j<i) (1 - a_j)``; after a rejection the residual is
    ``norm(max(0, r_i - q_i))``, whatever token was rejected, and the rejected token is drawn
    from ``max(0, q_i - r_i)`` (its law given a rejection), which is all the next child needs.
    Exact for i = 0; for i > 0 an average over the drawn histories."""
    q, r = q.double(), r.double()
    removed = torch.zeros_like(q, dtype=torch.bool)
    reach = torch.ones(q.shape[0], dtype=torch.float64, device=q.device)
    out = []
    for _ in range(width):
        qi = q.masked_fill(removed, 0.0)
        qi = qi / qi.sum(-1, keepdim=True).clamp_min(1e-300)  # all zero once q's support is used up
        a = torch.minimum(qi, r).sum(-1).clamp(0.0, 1.0)
        out.append(reach * a)
        c = (qi - r).clamp_min(0.0).cumsum(-1)  # the rejected token: inverse CDF of max(0, q_i - r_i)
        none = c[:, -1:] <= 0  # no rejection possible (a = 1) or nothing left to draw
        u = torch.rand(c.shape[0], 1, generator=generator, dtype=c.dtype, device=c.device) * c[:, -1:]
        y = torch.searchsorted(c, u, right=True).clamp(max=c.shape[1] - 1)
        removed.scatter_(1, y, removed.gather(1, y) | ~none)
        r = (r - qi).clamp_min(0.0)
        r = r / r.sum(-1, keepdim=True).clamp_min(1e-300)
        reach = reach * (1.0 - a)
    return torch.stack(out, 1)


@torch.inference_mode()
def calibrate_sampling(model, prompts: Sequence, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
                       max_new_tokens: int = 64, eos_token_id: int | None = None, topk: int = TOPK,
                       samples: int = 4, generator: torch.Generator | None = None) -> dict:
    """The acceptance of sampled drafts at ``temperature`` (and ``top_k`` / ``top_p``) on
    ``prompts``: each is continued by the model's own sampling, then one forward pass gives
    every head's distribution at every position and :func:`sampled_acceptance` (``samples``
    histories per position) the table (see the module docstring). Returns the table for
    ``Calibration.add_sampling``."""
    _check_calibrate_args(model, prompts, topk)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"a sampling calibration needs a temperature > 0, got {temperature!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    D, K = draft_depth(model), min(topk, model.config.vocab_size, 10)
    sums = torch.zeros(D, K, dtype=torch.float64)
    positions = [0] * D
    for i, prompt in enumerate(prompts):
        ids = _prompt_ids(prompt, i, model.device)
        room = model.config.n_positions - ids.numel() - D - 1
        if ids.numel() == 0 or room < 1:
            continue
        out = generate(model, ids, max_new_tokens=min(max_new_tokens, room), strategy="ntp", temperature=temperature,
                       top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator)
        assert not isinstance(out, list)  # one prompt: one result, not a batch's list
        seq = torch.cat([ids, torch.tensor(out.tokens, device=ids.device, dtype=torch.long)])
        P, L = ids.numel(), seq.numel()
        hidden = model(seq[None], heads=D + 1, logits=False).hidden[0]  # [L, D + 1, dim]

        def probs(rows: slice, j: int) -> torch.Tensor:
            return sampling_probs(model.head_logits(hidden[rows, j], j), temperature, top_k, top_p)

        for d in range(1, D + 1):
            n = L - P - d  # positions t = P-1 .. L-d-2, whose depth-(d-1) node t + d has a next token
            if n <= 0:
                break
            q, r = probs(slice(P - 1, P - 1 + n), d), probs(slice(P - 1 + d, P - 1 + d + n), 0)
            acc = sampled_acceptance(q.repeat(samples, 1), r.repeat(samples, 1), K, generator)
            sums[d - 1] += acc.sum(0).cpu() / samples
            positions[d - 1] += n
    if not any(positions):
        raise ValueError("no prompt to calibrate on: none was given, or none leaves room to decode")
    accept = [[float(min(1.0, c / n)) if n else 0.0 for c in row] for row, n in zip(sums.tolist(), positions)]
    return dict(temperature=float(temperature), top_k=top_k, top_p=float(top_p), accept=accept,
                positions=positions, samples=samples)


def _check_calibrate_args(model, prompts, topk) -> None:
    kind = model.config.model_type
    if kind not in ("mtp", "medusa") or draft_depth(model) < 1:
        raise ValueError(f"calibration needs an MTP or MEDUSA model with draft heads, got a {kind} model "
                         f"with {model.n_heads} head(s)")
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
                         base=None, temperatures: Sequence[float] = (), top_k: int = 0, top_p: float = 1.0,
                         seed: int = 0) -> dict:
    """``mtpkern calibrate``: calibrate a run or checkpoint on its held-out data, write
    ``calibration.json`` beside the weights, measure the step cost, choose the tree, and (with
    ``measure``) decode held-out prompts with it and with ``ntp`` to set the prediction beside
    what happens. ``temperatures``: also measure sampled drafts at each (with ``top_k`` /
    ``top_p``; :func:`calibrate_sampling`, seeded by ``seed``) and plan a tree per temperature;
    the tables of other temperatures in a calibration of this same model are kept. Returns the
    report (printed by :func:`format_report`). ``path`` may be a MEDUSA head directory
    (``mtpkern.heads_io``) on its config's base, or on ``base`` where given (the tokenizer is
    then the base's); ``base`` for anything else is a one-line error."""
    check_base_use([path], base)
    for T in temperatures:  # bad sampling settings are refused before any work
        DecodeOptions("ntp", temperature=T, top_k=top_k, top_p=top_p)
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
    generator = torch.Generator(model.device).manual_seed(seed)
    cal.sampling = _kept_sampling(ckpt, model)
    for T in temperatures:
        cal.add_sampling(calibrate_sampling(model, fit, temperature=T, top_k=top_k, top_p=top_p,
                                            max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                            generator=generator))
    saved = cal.save(ckpt)
    model = model.to(dt)
    plan = plan_tree(model, kernels=kernels, cuda_graph=cuda_graph, max_nodes=max_nodes, calibration=cal)
    cost = step_cost(model, kernels=kernels, cuda_graph=cuda_graph)
    decode = dict(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, kernels=kernels,
                  cuda_graph=cuda_graph)
    sampling_plans = {temperature_key(T): _sampling_plan(model, cal, check if measure else None, max_nodes,
                                                         dict(temperature=T, top_k=top_k, top_p=top_p), generator,
                                                         decode)
                      for T in temperatures}
    return dict(checkpoint=str(ckpt), calibration_file=str(saved), calibration=cal.to_dict(),
                step_cost=dict(sizes=cost.sizes, seconds=cost.seconds, **cost.key, cache=str(cache_dir())),
                plan=plan.to_dict(), measured=measure_tree(model, plan.tree, check, **decode) if measure else None,
                sampling_plans=sampling_plans)


def _sampling_plan(model, cal: Calibration, prompts, max_nodes, how: dict, generator, decode: dict) -> dict:
    """The tree planned for sampling at ``how`` (temperature, top_k, top_p), and, given
    ``prompts``, what rejection sampling with it measures there."""
    plan = plan_tree(model, kernels=decode["kernels"], cuda_graph=decode["cuda_graph"], max_nodes=max_nodes,
                     calibration=cal, temperature=how["temperature"])
    got = None if prompts is None else measure_tree(model, plan.tree, prompts, sampling=how, generator=generator,
                                                     **decode)
    return dict(plan.to_dict(), measured=got)


def _kept_sampling(ckpt, model) -> dict:
    """The sampled-draft tables of the calibration already in ``ckpt``, if it was measured on
    this very model (a damaged file, or one of another model, keeps nothing)."""
    try:
        old = load_calibration(ckpt, model)
    except CalibrationError:
        return {}
    return dict(old.sampling) if old is not None else {}


def measure_tree(model, tree: Tree, prompts, *, max_new_tokens: int, eos_token_id: int | None = None,
                 kernels: str = "auto", cuda_graph: bool = False, sampling: dict | None = None,
                 generator: torch.Generator | None = None) -> dict:
    """Mean accepted length and tokens/s (new tokens / decode time after the prefill, summed
    over prompts) of greedy decoding with ``tree``, and of ``ntp`` for the speedup; one
    untimed warm-up each. ``sampling`` (temperature, top_k, top_p): sampling instead, the tree
    verified by rejection sampling, drawn from ``generator``."""
    how = dict(sampling or {}, generator=generator)
    accept = dict(acceptance="rejection") if sampling else {}
    out = {}
    for name, kw in (("ntp", dict(strategy="ntp", **how)),
                     ("tree", dict(strategy=model.config.model_type, tree=tree, **how, **accept))):
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
    for key, sp in report.get("sampling_plans", {}).items():
        table = cal.sampling[key]
        heads = ", ".join(f"h{d + 1} {sum(row):.2f}" for d, row in enumerate(table["accept"]))
        lines.append(f"temperature {key} (top-k {table['top_k']}, top-p {table['top_p']:g}): sampled drafts "
                     f"accepted per draft head (any child): {heads}; tree: {sp['nodes']} nodes, depth {sp['depth']}, "
                     f"predicted accepted length {sp['predicted_accept_length']:.2f}, "
                     f"speedup {sp['predicted_speedup_vs_ntp']:.2f}x: {sp['tree']}")
        if sp.get("measured") is not None:
            lines.append(f"  measured ({sp['measured']['n_prompts']} held-out prompts, rejection sampling): accepted "
                         f"length {sp['measured']['accept_length']:.2f}, speedup {sp['measured']['speedup_vs_ntp']:.2f}x")
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
    "calibrate", "calibrate_after_training", "calibrate_checkpoint", "calibrate_records", "calibrate_sampling",
    "format_report", "held_out_prompts", "measure_tree", "sampled_acceptance",
    # re-exported: mtpkern.calibration
    "CALIBRATION_NAME", "SCHEMA", "TOPK", "Calibration", "CalibrationError", "attach_calibration", "draft_depth",
    "fingerprint", "load_calibration", "temperature_key",
    # re-exported: mtpkern.costmodel
    "COST_ROUNDS", "COST_SCHEMA", "COST_SIZES", "cache_dir", "cost_depths", "cost_key", "device_name", "step_cost",
    "time_tree_step", "timing_tree",
    # re-exported: mtpkern.planner
    "StepCost", "TreePlan", "best_first_nodes", "best_sampled_trees", "check_budget", "check_curve",
    "max_draft_nodes", "optimise_tree", "optimise_tree_depths", "simulate_steps", "simulated_accept_length",
]
