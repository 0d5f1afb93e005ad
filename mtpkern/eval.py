"""Evaluate checkpoints: quality, decoding speed, memory and training cost, compared fairly.

For each checkpoint (a run directory written by :func:`mtpkern.train.train`, or a bare
checkpoint directory), on a validation split it did not train on:

* quality: validation loss and perplexity of the next-token path (response tokens only:
  prompt and padding excluded), top-1 / top-5 accuracy of every head j against token
  t + j + 1 (both from :func:`mtpkern.metrics.evaluate_heads`), BLEU (sacrebleu, corpus level)
  of the greedy generated solutions against the reference responses, and exact-match
  accuracy of the final answer (``The answer is: N``, compared numerically); the solutions
  come from batched decoding (:class:`mtpkern.batch.BatchDecoder`, the model's own
  speculative strategy, ``quality_batch`` prompts at a time), every row of which is
  token-identical to greedy batch-1 decoding (``agrees_with_batch_1`` checks it on the
  prompts the speed runs decode one at a time);
* speed, through the one engine (:class:`mtpkern.decoder.Decoder`) for every strategy, plus
  ``transformers`` ``generate`` on the same next-token weights, over the first
  ``speed_samples`` prompts: one warm-up generation per strategy, then every prompt timed
  with the device synchronised before and after; tokens/s
  = new tokens / wall time of the whole call (prefill included, the same for every
  strategy and for ``transformers``), medians over prompts;
* memory: peak CUDA memory allocated while decoding (peak reset per model), or on CPU the
  peak resident set size of the *process* (``getrusage``; it never goes down, so it covers
  everything loaded before); training peak memory and time per epoch from the run's logs.

Perplexity is always that of the next-token path. For MEDUSA-1 that path is the frozen base
model, and the report says so: MEDUSA-1 heads cannot change it. MEDUSA-2 fine-tunes it, so the
report adds the original base's perplexity and answer accuracy beside the new backbone's.

JSON schema (``schema == "mtpkern.eval/1"``)::

    device:   {type, name, torch, transformers, dtype}
    settings: {max_samples, speed_samples, max_new_tokens, kernels, cuda_graph, hf_baseline, batch_sizes,
               prefix_cache}
    models: [ {
      name, path (checkpoint dir), model_type ("gpt2"|"llama"|"mtp"|"medusa"), objective (the run's:
      "ntp"|"mtp"|"medusa"|"medusa2"), medusa_proj (MEDUSA heads with their own unembedding),
      n_heads (J), n_params,
      primary: the strategy of the table row ("ntp" | "mtp" | "medusa"),
      validation: {source, seed, val_fraction, limit, n_records, held_out (bool), note},
      quality: {val_loss, ppl, ppl_of (which path), head_top1 [J], head_top5 [J],
                bleu (0-100), answer_accuracy (0-1), n_samples,
                decoded_with {strategy, tree, batch, seconds, agrees_with_batch_1},
                original_base? (medusa2 runs: {path, val_loss, ppl, answer_accuracy} of the
                frozen base they started from, on the same split and prompts; None values and
                an ``error`` when it can no longer be loaded)},
      speed: {<strategy>: {tokens_per_second, latency_s, new_tokens, mean_accept_length,
                          forward_passes_per_token, speedup_theoretical, speedup_vs_ntp,
                          speedup_vs_hf, agrees_with_ntp, accept_lengths [int], tree?,
                          reused_prompt_tokens, prompt_tokens (means per prompt: the prefix cache)},
              hf: {tokens_per_second, latency_s, new_tokens, agrees_with_ntp, weights} | null},
      memory: {decode_peak_bytes, kind ("cuda_max_memory_allocated" | "process_peak_rss")},
      training: {wall_time_s, peak_memory_bytes, time_per_epoch_s, curve {step, loss,
                 head_losses?}} | null,
      calibration: {accept [draft head][rank], positions [draft head], summary} | null
    } ]
    files: {json, table, plots [png paths]}

Speeds are medians over prompts; ``speedup_theoretical`` is the mean accepted length (tokens
per target forward pass, the bound a speculative step with free drafting would reach);
``forward_passes_per_token`` = (1 prefill + decode steps) / new tokens; ``agrees_with_ntp``
= the fraction of prompts whose tokens equal our greedy ``ntp`` (1.0 for a lossless engine
in fp32).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mtpkern.batch import BatchDecoder
from mtpkern.checkpoint import CheckpointError, check_report_path, resolve_checkpoint, write_text_atomic
from mtpkern.data import SFTDataset, collate, load_tokenizer, prompt_ids, reference
from mtpkern.decoder import Decoder
from mtpkern.autotree import resolve_options
from mtpkern.options import DecodeOptions
from mtpkern.heads_io import check_base_use, is_head_directory, tokenizer_source
from mtpkern.hf_io import load_model, to_hf
from mtpkern.metrics import answer_accuracy, bleu, evaluate_heads
from mtpkern.models import GPT2, MedusaModel, base_class
from mtpkern.plots import plots_folder_is_ours, write_plots
from mtpkern.rundir import read_run, training_summary, validation_records
from mtpkern.runtime import dtype_name, now, peak_memory, reset_peak_memory, resolve_device, resolve_dtype, timed
from mtpkern.tree import Tree

SCHEMA = "mtpkern.eval/1"
FAMILY_NAMES = {"gpt2": "GPT-2", "llama": "Llama"}
# the first line of every table we write: a later run may replace a file that starts with it
TABLE_MARK = "<!-- written by mtpkern eval: its next run with the same report file replaces this table -->"


# ----------------------------------------------------------------------------- inputs


def device_info(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    return dict(type=device.type, name=name, torch=torch.__version__,
                transformers=transformers.__version__, dtype=dtype_name(dtype))


# ----------------------------------------------------------------------------- decoding


def role(kind: str) -> str:
    """A ``model_type``'s role in the report: ``"base"`` (a GPT-2 or Llama-family model alone),
    ``"mtp"`` or ``"medusa"``."""
    return kind if kind in ("mtp", "medusa") else "base"


def strategies_for(model) -> list[str]:
    """Our next-token baseline first, then the model's own speculative strategy."""
    return {"base": ["ntp"], "mtp": ["ntp", "mtp"], "medusa": ["ntp", "medusa"]}[role(model.config.model_type)]


def eval_tree(n_medusa_heads: int):
    """A small tree over the heads: top-4 at depth 1, top-2 at depth 2, top-1 below (at most
    4 + 8 + 8 + ... nodes), cut to the number of heads."""
    widths = [4, 2] + [1] * max(0, n_medusa_heads - 2)
    return Tree.from_widths(widths[:n_medusa_heads])


def next_token_model(model) -> GPT2:
    """A base model of ``model``'s family (``GPT2`` or ``Llama``) with exactly the weights of its
    next-token path (head 0), for the ``transformers`` baseline: the model itself, MEDUSA's base,
    or MTP's trunk followed by its head-0 block (a base model of the same depth: the inverse of
    ``MTPModel.from_base``)."""
    kind = role(model.config.model_type)
    if kind == "base":
        return model
    if kind == "medusa":
        return model.base
    cfg = replace(model.config, model_type=model.config.family, n_heads=1)
    base = base_class(cfg)(cfg).to(device=model.device, dtype=model.dtype)
    trunk = len(model.trunk)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("trunk."):
            state["h." + key[len("trunk."):]] = value
        elif key.startswith("heads.0."):
            state[f"h.{trunk}." + key[len("heads.0."):]] = value
        elif not key.startswith("heads."):
            state[key] = value  # embeddings, the final norm, a Llama's untied unembedding
    base.load_state_dict(state)
    return base.eval()


def _strip_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


def hf_decoder(model, max_new_tokens: int, eos_token_id: int | None, *, static_cache: bool = False):
    """``run(ids [1, T]) -> new token ids``: greedy ``transformers`` ``generate`` on the
    weights of ``model``'s next-token path. ``eos_token_id=None`` decodes exactly
    ``max_new_tokens`` tokens; ``static_cache`` uses ``cache_implementation="static"``."""
    hf = to_hf(next_token_model(model))
    hf.generation_config.eos_token_id = eos_token_id  # None: never stop early
    hf.generation_config.pad_token_id = 0 if eos_token_id is None else eos_token_id
    extra = dict(cache_implementation="static") if static_cache else {}

    def run(ids):
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, **extra)
        return out[0, ids.shape[1]:].tolist()

    return run


def decoders_for(model, *, kernels: str = "auto", cuda_graph: bool = False, tree=None,
                 prefix_cache: bool = True) -> dict:
    """One ``mtpkern.Decoder`` per strategy of ``model``, built once and reused over prompts
    (as a user holds one). The speculative strategy's tree: ``tree``, else the decoder's
    default (``auto`` when the checkpoint carries calibration, else ``default_tree``)."""
    def options(s: str) -> DecodeOptions:
        opts = DecodeOptions(s, tree=None if s == "ntp" else tree, kernels=kernels, cuda_graph=cuda_graph)
        return resolve_options(model, opts)

    return {s: Decoder(model, options(s), prefix_cache=prefix_cache) for s in strategies_for(model)}


def decode_prompts(model, prompts: list[torch.Tensor], *, max_new_tokens: int, eos_token_id: int | None,
                   kernels: str = "auto", cuda_graph: bool = False, hf_baseline: bool = True,
                   progress: bool = True, desc: str = "", decoders: dict | None = None) -> dict:
    """Greedy-decode every prompt with each strategy of ``model`` (and ``transformers``).

    Returns ``{strategy: {"tokens": [[int]], "times": [s], "steps": [int],
    "accept_lengths": [int]}}`` (``"hf"`` without steps; speculative strategies also
    ``"tree"``, the tree decoded with). Each strategy first decodes ``prompts[0]`` once
    untimed (warm-up: allocator, kernel caches, CUDA graph capture). ``decoders``: from
    :func:`decoders_for` (built here when not given).
    """
    device = model.device
    decoders = decoders or decoders_for(model, kernels=kernels, cuda_graph=cuda_graph)
    runners = {}
    for strategy, dec in decoders.items():
        runners[strategy] = lambda ids, dec=dec: dec.generate(ids, max_new_tokens=max_new_tokens,
                                                              eos_token_id=eos_token_id)
    if hf_baseline:
        runners["hf"] = hf_decoder(model, max_new_tokens, eos_token_id)

    runs: dict[str, dict[str, Any]] = {
        name: {"tokens": [], "times": [], "steps": [], "accept_lengths": [], "reused": [], "prompt_tokens": []}
        for name in runners}
    for strategy, dec in decoders.items():
        if strategy != "ntp":
            runs[strategy]["tree"] = f"dynamic:{dec.tree_nodes - 1}" if dec.dynamic else repr(dec.tree)
    with torch.inference_mode():
        for run in runners.values():
            run(prompts[0])
        for dec in decoders.values():  # the first timed prompt finds nothing cached, as in a fresh decoder
            dec.refresh()
        for ids in tqdm(prompts, desc=desc or "decode", disable=not progress, file=sys.stderr):
            for name, run in runners.items():
                out, seconds = timed(lambda: run(ids), device)
                r = runs[name]
                r["times"].append(seconds)
                if name == "hf":
                    r["tokens"].append(out)
                else:
                    r["tokens"].append(list(out.tokens))
                    r["steps"].append(out.num_steps)
                    r["accept_lengths"].extend(out.accept_lengths)
                    r["reused"].append(out.reused_prompt_tokens)
                    r["prompt_tokens"].append(ids.numel())
    return runs


def batched_throughput(model, decoders: dict, prompts: list[torch.Tensor], runs: dict, sizes, *,
                       max_new_tokens: int, eos_token_id: int | None) -> dict:
    """``{strategy: {B: {"tokens_per_second", "agrees_with_batch_1"}}}``: every prompt decoded
    B at a time by :class:`mtpkern.batch.BatchDecoder` (greedy, the decoder's own static tree,
    kernels and CUDA-graph setting), all rows' tokens over the wall time after one warm-up
    batch, and whether every row's tokens equal the batch-1 run's. A dynamic tree decodes batch
    1 only: skipped."""
    rows = [p.view(-1) for p in prompts]
    out: dict[str, dict] = {}
    with torch.inference_mode():
        for strategy, dec in decoders.items():
            if getattr(dec, "dynamic", False):
                out[strategy] = {"skipped": "dynamic trees decode one prompt at a time"}
                continue
            for B in sizes:  # a cache for the prompts there are, however large the size asked
                bd = BatchDecoder(model, strategy, tree=None if strategy == "ntp" else dec.tree,
                                  max_batch=max(1, min(B, len(rows))), kernels=dec.kernels,
                                  cuda_graph=dec.cuda_graph and dec.fused)
                bd.generate(rows[:B], max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
                tokens, t0 = [], now(model.device)
                for i in range(0, len(rows), B):
                    tokens += [r.tokens for r in bd.generate(rows[i : i + B], max_new_tokens=max_new_tokens,
                                                             eos_token_id=eos_token_id)]
                dt = now(model.device) - t0
                out.setdefault(strategy, {})[str(B)] = dict(
                    tokens_per_second=sum(len(t) for t in tokens) / dt,
                    agrees_with_batch_1=sum(t == list(r) for t, r in zip(tokens, runs[strategy]["tokens"])) / len(rows))
    return out


def decode_batched(model, strategy: str, prompts: list[torch.Tensor], *, batch: int, max_new_tokens: int,
                   eos_token_id: int | None, tree=None, kernels: str = "auto", cuda_graph: bool = False) -> list[list[int]]:
    """Greedy tokens of every prompt, decoded ``batch`` at a time by one
    :class:`mtpkern.batch.BatchDecoder`."""
    rows = [p.view(-1) for p in prompts]
    batch = max(1, min(batch, len(rows)))
    with torch.inference_mode():
        dec = BatchDecoder(model, strategy, tree=tree, max_batch=batch, kernels=kernels, cuda_graph=cuda_graph)
        return [r.tokens for i in range(0, len(rows), batch)
                for r in dec.generate(rows[i : i + batch], max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)]


def solve_batched(model, decoders: dict, prompts: list[torch.Tensor], runs: dict, *, batch: int,
                  max_new_tokens: int, eos_token_id: int | None) -> tuple[list[list[int]], dict]:
    """The greedy solutions of every prompt for the quality metrics, decoded ``batch`` at a time
    by :class:`mtpkern.batch.BatchDecoder` with the model's own speculative strategy (its
    decoder's static tree; ``ntp`` where that tree is dynamic), and how: strategy, tree, batch,
    seconds, and ``agrees_with_batch_1``, the fraction of the prompts decoded one at a time
    (``runs``, the first ones) whose batched tokens equal batch-1 ``ntp``'s."""
    strategy = strategies_for(model)[-1]
    dec = decoders[strategy]
    if getattr(dec, "dynamic", False):
        strategy, dec = "ntp", decoders["ntp"]
    tree = None if strategy == "ntp" else dec.tree
    batch = max(1, min(batch, len(prompts)))
    t0 = now(model.device)
    tokens = decode_batched(model, strategy, prompts, tree=tree, batch=batch, kernels=dec.kernels,
                            cuda_graph=dec.cuda_graph and dec.fused, max_new_tokens=max_new_tokens,
                            eos_token_id=eos_token_id)
    seconds = now(model.device) - t0
    single = runs["ntp"]["tokens"]
    agree = sum(a == list(b) for a, b in zip(tokens, single)) / max(1, len(single))
    return tokens, dict(strategy=strategy, tree=None if tree is None else repr(tree), batch=batch,
                        seconds=seconds, agrees_with_batch_1=agree)


def speed_summary(runs: dict, eos_token_id: int | None) -> dict:
    """Medians and ratios of :func:`decode_prompts`' raw runs (see the module docstring)."""

    def tps(r):
        return statistics.median(len(t) / s for t, s in zip(r["tokens"], r["times"]))

    ntp = runs["ntp"]
    ntp_tokens = [_strip_eos(t, eos_token_id) for t in ntp["tokens"]]
    ntp_tps = tps(ntp)
    hf_tps = tps(runs["hf"]) if "hf" in runs else None
    out: dict[str, dict | None] = {}  # "hf": None without that baseline
    for name, r in runs.items():
        s = dict(tokens_per_second=tps(r), latency_s=statistics.median(r["times"]),
                 new_tokens=sum(len(t) for t in r["tokens"]),
                 agrees_with_ntp=sum(_strip_eos(t, eos_token_id) == ref
                                     for t, ref in zip(r["tokens"], ntp_tokens)) / len(ntp_tokens))
        if name != "hf":
            accept = r["accept_lengths"]
            mean_accept = statistics.fmean(accept) if accept else 1.0
            s.update(mean_accept_length=mean_accept,
                     reused_prompt_tokens=statistics.fmean(r["reused"]) if r["reused"] else 0.0,
                     prompt_tokens=statistics.fmean(r["prompt_tokens"]) if r["prompt_tokens"] else 0.0,
                     forward_passes_per_token=(len(r["steps"]) + sum(r["steps"])) / max(1, s["new_tokens"]),
                     speedup_theoretical=mean_accept,
                     speedup_vs_ntp=s["tokens_per_second"] / ntp_tps,
                     speedup_vs_hf=s["tokens_per_second"] / hf_tps if hf_tps else None,
                     accept_lengths=accept)
        out[name] = s
    out.setdefault("hf", None)
    return out


# ----------------------------------------------------------------------------- one model


def evaluate_checkpoint(path, *, data: str | None = None, device: torch.device, dtype: torch.dtype,
                        max_samples: int = 16, max_new_tokens: int = 64, max_batches: int | None = None,
                        batch_size: int = 8, kernels: str = "auto", cuda_graph: bool = False,
                        prefix_cache: bool = True,
                        hf_baseline: bool = True, progress: bool = True, batch_sizes=(),
                        speed_samples: int | None = None, quality_batch: int = 16, base=None) -> dict:
    """Quality, speed, memory and training cost of one checkpoint (one entry of ``models``);
    with ``batch_sizes``, also the throughput of batched decoding at each (``batched``).
    Quality over ``max_samples`` prompts decoded ``quality_batch`` at a time; speed over the
    first ``speed_samples`` of them (default: all) decoded one at a time. ``base``: the base of a
    MEDUSA head directory (``mtpkern.heads_io``; ignored for anything else), whose tokenizer is
    then the base's."""
    ckpt, run = resolve_checkpoint(path)
    train_config, log, summary = read_run(run)
    name = (run or ckpt).name
    val, val_info = scored_records(train_config, data)
    heads_base = base if is_head_directory(ckpt) else None
    model = load_model(ckpt, device=device, dtype=dtype, base=heads_base).eval()
    tokenizer = load_tokenizer(tokenizer_source(ckpt, heads_base))
    loader = _validation_loader(val, tokenizer, model, train_config, batch_size)
    heads = evaluate_heads(model, loader, device, max_batches=max_batches)  # the trainer's own metric code
    # Generation: the same prompts for every strategy.
    decoders = decoders_for(model, kernels=kernels, cuda_graph=cuda_graph, prefix_cache=prefix_cache)
    samples, prompts = fitting_prompts(val, tokenizer, model, decoders, max_new_tokens=max_new_tokens,
                                       max_samples=max_samples, name=name)
    eos = tokenizer.eos_token_id
    timed_prompts = prompts[:speed_samples] if speed_samples else prompts
    reset_peak_memory(device)
    runs = decode_prompts(model, timed_prompts, max_new_tokens=max_new_tokens, eos_token_id=eos, kernels=kernels,
                          cuda_graph=cuda_graph, hf_baseline=hf_baseline, progress=progress, desc=name,
                          decoders=decoders)
    peak, peak_kind = peak_memory(device)
    batched = None
    if batch_sizes:
        batched = batched_throughput(model, decoders, timed_prompts, runs, batch_sizes,
                                     max_new_tokens=max_new_tokens, eos_token_id=eos)
    solutions, decoded_with = solve_batched(model, decoders, prompts, runs, batch=quality_batch,
                                            max_new_tokens=max_new_tokens, eos_token_id=eos)
    texts = [tokenizer.decode(_strip_eos(t, eos), skip_special_tokens=True) for t in solutions]
    refs = [reference(rec) for rec in samples]
    kind = model.config.model_type
    objective = (train_config or {}).get("objective", "ntp" if role(kind) == "base" else kind)
    quality = _quality(kind, heads, texts, refs, decoded_with)
    if objective == "medusa2":
        assert train_config is not None  # that objective is read from it
        quality["ppl_of"] = "the MEDUSA-2 backbone (head 0), fine-tuned with the heads"
        quality["original_base"] = original_base_quality(train_config["base"], loader, prompts, refs, tokenizer,
                                                         device=device, dtype=dtype, max_batches=max_batches,
                                                         max_new_tokens=max_new_tokens, kernels=kernels)
    return dict(
        name=name, path=str(ckpt), model_type=kind, objective=objective,
        medusa_proj=bool(model.config.medusa_proj), n_heads=model.n_heads, n_params=model.num_parameters(),
        primary=strategies_for(model)[-1], validation=val_info, quality=quality,
        speed=_speed_entry(runs, eos, kind, model.config.family), batched=batched,
        memory=dict(decode_peak_bytes=peak, kind=peak_kind), training=training_summary(log, summary),
        calibration=_calibration_entry(model),
    )


def scored_records(train_config: dict | None, data: str | None) -> tuple[list[dict], dict]:
    """The held-out records to score (see :func:`mtpkern.rundir.validation_records`), where
    self-distilled records are scored against the source's answers (their ``reference``)."""
    val, info = validation_records(train_config, data)
    if any("reference" in r for r in val):
        val = [dict(r, response=r["reference"]) if "reference" in r else r for r in val]
        info["note"] += "; self-distilled records: quality against the source's references"
    return val, info


def _validation_loader(val: list[dict], tokenizer, model, train_config: dict | None, batch_size: int):
    """Batches of the held-out split for every head's metrics, cut to the run's max_len."""
    max_len = min(model.config.n_positions, (train_config or {}).get("max_len", model.config.n_positions))
    return torch.utils.data.DataLoader(SFTDataset(val, tokenizer, max_len), batch_size=batch_size,
                                       collate_fn=lambda b: collate(b, tokenizer.pad_token_id))


def fitting_prompts(val: list[dict], tokenizer, model, decoders: dict, *, max_new_tokens: int, max_samples: int,
                    name: str) -> tuple[list[dict], list[torch.Tensor]]:
    """``(records, prompt ids [1, T])``: the first ``max_samples`` held-out prompts that leave
    room in the context for ``max_new_tokens`` and every decoder's draft slots; none is an error."""
    slack = max(d.tree_nodes for d in decoders.values())  # draft slots
    room = model.config.n_positions - max_new_tokens - slack
    samples, prompts = [], []
    for rec in val:
        ids = prompt_ids(tokenizer, rec)
        if len(ids) <= room:
            samples.append(rec)
            prompts.append(torch.tensor([ids], device=model.device))
        if len(prompts) == max_samples:
            break
    if not prompts:
        raise ValueError(f"{name}: no validation prompt fits the context of {model.config.n_positions} "
                         f"with max_new_tokens={max_new_tokens}; lower max_new_tokens")
    return samples, prompts


def _speed_entry(runs: dict, eos: int | None, kind: str, family: str) -> dict:
    """:func:`speed_summary` with the speculative strategies' trees and the baseline's weights."""
    speed = speed_summary(runs, eos)
    for strategy in ("mtp", "medusa"):
        if strategy in speed:
            speed[strategy]["tree"] = runs[strategy]["tree"]
    if speed["hf"] is not None:
        speed["hf"]["weights"] = {"base": "the model", "medusa": "the base",
                                  "mtp": f"trunk + head-0 block as a {FAMILY_NAMES[family]}"}[role(kind)]
    return speed


def _quality(kind: str, heads: dict, texts: list[str], refs: list[str], decoded_with: dict) -> dict:
    """The quality entry: every head's metrics, and BLEU and answer accuracy of ``texts``."""
    return dict(
        val_loss=heads["loss"], ppl=heads["ppl"],
        ppl_of={"base": "the model", "mtp": "head 0 (trunk + head-0 block)",
                "medusa": "the frozen base (head 0): MEDUSA-1 heads cannot change it"}[role(kind)],
        head_top1=heads["acc_top1"], head_top5=heads["acc_top5"],
        bleu=bleu(texts, refs), answer_accuracy=answer_accuracy(texts, refs), n_samples=len(texts),
        decoded_with=decoded_with,
    )


def _calibration_entry(model) -> dict | None:
    """The checkpoint's calibration.json (see mtpkern.calibrate), when it has one."""
    if model.calibration is None:
        return None
    cal = model.calibration
    return dict(accept=cal.accept, positions=cal.positions, summary=cal.summary())


def original_base_quality(base, loader, prompts, refs, tokenizer, *, device, dtype, max_batches, max_new_tokens,
                          kernels) -> dict:
    """The quality a MEDUSA-2 run traded: the original (frozen) base's validation loss,
    perplexity and greedy answer accuracy on the same split and prompts as the new backbone."""
    try:
        model = load_model(base, device=device, dtype=dtype).eval()
    except (CheckpointError, OSError) as e:  # moved or deleted since the run: say so, evaluate the rest
        return dict(path=str(base), val_loss=None, ppl=None, answer_accuracy=None, error=str(e).splitlines()[0])
    if isinstance(model, MedusaModel):
        model = model.base
    heads = evaluate_heads(model, loader, device, max_batches=max_batches)
    eos = tokenizer.eos_token_id
    outs = decode_batched(model, "ntp", prompts, batch=16, max_new_tokens=max_new_tokens, eos_token_id=eos,
                          kernels=kernels)
    texts = [tokenizer.decode(_strip_eos(list(t), eos), skip_special_tokens=True) for t in outs]
    return dict(path=str(base), val_loss=heads["loss"], ppl=heads["ppl"], answer_accuracy=answer_accuracy(texts, refs))


# ----------------------------------------------------------------------------- the report


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:{spec}}{suffix}"


def _mib(n) -> str:
    return _fmt(None if n is None else n / 2**20, ".0f", " MiB")


def format_table(report: dict) -> str:
    """The comparison as a markdown table, one row per model at its own strategy."""
    dev = report["device"]
    lines = [
        f"Device: {dev['name']} ({dev['type']}, {dev['dtype']}); torch {dev['torch']}, "
        f"transformers {dev['transformers']}. Greedy, batch 1, median over prompts.",
        "",
        "| model | strategy | tokens/s | speedup vs own NTP | speedup vs HF | accepted length "
        "| ppl (next-token path) | answer acc | BLEU | top-1 per head | peak mem (decode) | train time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        s, q, t = m["speed"][m["primary"]], m["quality"], m["training"] or {}
        medusa2 = m.get("objective") == "medusa2"
        ppl = _fmt(q["ppl"], ".2f") + (" (base)" if m["model_type"] == "medusa" and not medusa2 else "")
        kind = m.get("objective", m["model_type"]) if m["model_type"] == "medusa" else m["model_type"]
        kind += ", own projections" if m.get("medusa_proj") else ""
        lines.append(" | ".join([
            f"| {m['name']} ({kind})", m["primary"], _fmt(s["tokens_per_second"], ".1f"),
            _fmt(s["speedup_vs_ntp"], ".2f", "x"), _fmt(s["speedup_vs_hf"], ".2f", "x"),
            _fmt(s["mean_accept_length"], ".2f"), ppl, _fmt(q["answer_accuracy"], ".1%"),
            _fmt(q["bleu"], ".1f"), " / ".join(f"{a:.2f}" for a in q["head_top1"]),
            _mib(m["memory"]["decode_peak_bytes"]), _fmt(t.get("wall_time_s"), ".0f", " s"),
        ]) + " |")
    notes = [f"{m['name']} calibration: {m['calibration']['summary']}"
             for m in report["models"] if m.get("calibration")]
    for m in report["models"]:
        orig, how = m["quality"].get("original_base"), m["quality"].get("decoded_with")
        if orig:
            notes.append(f"{m['name']} (MEDUSA-2) trades quality: its backbone's ppl {_fmt(m['quality']['ppl'], '.2f')}, "
                         f"answer acc {_fmt(m['quality']['answer_accuracy'], '.1%')}; the original base "
                         f"({orig['path']}): ppl {_fmt(orig['ppl'], '.2f')}, answer acc {_fmt(orig['answer_accuracy'], '.1%')}")
        if how:
            notes.append(f"{m['name']}: BLEU and answer acc over {m['quality']['n_samples']} solutions decoded "
                         f"{how['batch']} at a time ({how['strategy']}, batched; "
                         f"{how['agrees_with_batch_1']:.0%} of the speed runs' prompts token-identical to batch-1 ntp)")
    for m in report["models"]:
        s = m["speed"][m["primary"]]
        if report.get("settings", {}).get("prefix_cache", True) and s.get("prompt_tokens"):
            notes.append(f"{m['name']}: prefix cache on: {s['reused_prompt_tokens']:.1f} of {s['prompt_tokens']:.1f} "
                         "prompt tokens per prompt reused from the previous one, the rest prefilled "
                         "(every strategy alike; `--no-prefix-cache` prefills all)")
    if report.get("settings", {}).get("prefix_cache", True) is False:
        notes.append("prefix cache off: every prompt prefilled whole")
    if any(m["memory"]["kind"] == "process_peak_rss" for m in report["models"]):
        notes.append("peak mem on CPU is the process's peak RSS so far (it includes earlier models)")
    if any(not m["validation"]["held_out"] for m in report["models"]):
        notes.append("some models were evaluated on a split they may have trained on (no train_config.json)")
    notes.append("speedup vs HF: `transformers` `generate` on the same next-token weights "
                 "(MTP: trunk + head 0 as a base model of its family)")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes] + _batched_table(report)) + "\n"


def _batched_table(report: dict) -> list[str]:
    """Throughput of batched decoding per model, strategy and batch size, when it was measured."""
    sizes = report.get("settings", {}).get("batch_sizes") or []
    rows = [(m["name"], s, by_b) for m in report["models"] for s, by_b in (m.get("batched") or {}).items()]
    if not sizes or not rows:
        return []
    out = ["", "Batched decoding (greedy, eager kernels; all rows' tokens over the wall time):", "",
           "| model | strategy | " + " | ".join(f"B={b} tokens/s" for b in sizes) + " | rows equal to batch 1 |",
           "|---|---|" + "---|" * (len(sizes) + 1)]
    for name, strategy, by_b in rows:
        if "skipped" in by_b:
            out.append(f"| {name} | {strategy} | " + " | ".join("-" for _ in sizes) + f" | {by_b['skipped']} |")
            continue
        agree = min(by_b[str(b)]["agrees_with_batch_1"] for b in sizes)
        out.append(f"| {name} | {strategy} | " + " | ".join(f"{by_b[str(b)]['tokens_per_second']:.1f}" for b in sizes)
                   + f" | {agree:.0%} |")
    return out


def evaluate(paths: list, *, data: str | None = None, json_path=None, device: str = "auto",
             dtype: str | None = None, max_samples: int = 16, max_new_tokens: int = 64,
             max_batches: int | None = None, batch_size: int = 8, kernels: str = "auto",
             cuda_graph: bool = False, hf_baseline: bool = True, plots: bool = True,
             progress: bool = True, batch_sizes=(), speed_samples: int | None = None,
             prefix_cache: bool = True, base=None) -> dict:
    """Evaluate every checkpoint in ``paths`` and write the JSON, the table and the plots.
    ``batch_sizes`` (e.g. ``(1, 4, 16)``): also the tokens/s of batched decoding at each.
    Quality comes from ``max_samples`` prompts decoded in batches (of the largest of
    ``batch_sizes``, else 16), speed from the first ``speed_samples`` (default: all) decoded
    one at a time. ``prefix_cache``: the decoders reuse the K/V of what a prompt shares with the
    previous one (``Decoder(prefix_cache=...)``; the table says how many tokens per prompt).

    ``paths``: run or checkpoint directories, or MEDUSA head directories (FasterDecoding's or
    vLLM's layout), on ``base`` where given (it applies to those only: given where no path is
    one, a one-line error). ``data``: the records to evaluate bare
    checkpoints on (runs use their own validation split). ``dtype``: "float32" /
    "float16" / "bfloat16" (default float32 on CPU, float16 on CUDA). The JSON goes to
    ``json_path`` (default ``eval.json`` in the current directory), the table next to it
    (``.md``) and the plots into ``<json stem>_plots/``; none of these replaces what eval did not
    write but ``json_path`` itself (see :func:`report_files`). Returns the report (schema in the
    module docstring).
    """
    if not paths:
        raise ValueError("evaluate needs at least one run or checkpoint directory")
    if max_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"max_samples and max_new_tokens must be >= 1, got {max_samples}, {max_new_tokens}")
    if speed_samples is not None and (isinstance(speed_samples, bool) or not isinstance(speed_samples, int)
                                      or speed_samples < 1):
        raise ValueError(f"speed_samples must be an int >= 1 (or None: every sample), got {speed_samples!r}")
    check_base_use(paths, base)
    asked = json_path
    json_path, table_path, plots_dir = report_files(asked, plots)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    models = [evaluate_checkpoint(p, data=data, device=dev, dtype=dt, max_samples=max_samples,
                                  max_new_tokens=max_new_tokens, max_batches=max_batches, batch_size=batch_size,
                                  kernels=kernels, cuda_graph=cuda_graph, hf_baseline=hf_baseline,
                                  progress=progress, batch_sizes=tuple(batch_sizes), speed_samples=speed_samples,
                                  quality_batch=max(batch_sizes, default=16), prefix_cache=prefix_cache, base=base)
              for p in paths]
    report = dict(schema=SCHEMA, device=device_info(dev, dt),
                  settings=dict(max_samples=max_samples, speed_samples=speed_samples, max_new_tokens=max_new_tokens,
                                kernels=kernels, cuda_graph=cuda_graph, hf_baseline=hf_baseline,
                                batch_sizes=list(batch_sizes), prefix_cache=prefix_cache),
                  models=models)
    report_files(asked, plots)  # again: the user may have put something there meanwhile
    json_path.parent.mkdir(parents=True, exist_ok=True)
    table = format_table(report)
    files: dict[str, Any] = dict(json=str(json_path), table=str(table_path), plots=[])
    if plots_dir is not None:
        files["plots"] = write_plots(report, plots_dir)
    report["files"] = files
    write_text_atomic(table_path, TABLE_MARK + "\n" + table)
    write_text_atomic(json_path, json.dumps(report, indent=2))
    print(table)
    return report


def report_files(json_path, plots: bool = True) -> tuple[Path, Path, Path | None]:
    """``(json, table, plots folder or None)`` of a report, once it is clear that writing them
    loses nothing: ``json_path`` was named and may be replaced, but the names derived from it
    (the ``.md`` table, the ``<stem>_plots/`` folder, and ``eval.json`` itself when no path was
    given) may only replace what eval wrote. Anything else is a one-line ``ValueError``."""
    given = str(json_path or "eval.json")
    path = Path(given)
    check_report_path(given)  # a folder, or a path under a file
    table = path.with_suffix(".md")
    folder = path.parent / f"{path.stem}_plots" if plots else None
    if path.suffix.lower() == ".md":
        raise ValueError(f"json_path (--json) {given} would hold both the JSON report and the table (the table goes "
                         f"beside the report, as .md): name the report file otherwise, e.g. {path.with_suffix('.json')}")
    if json_path is None and path.exists() and not _is_our_report(path):
        raise ValueError(f"{given} exists here and is not an mtpkern eval report: name the report file with "
                         "json_path= (--json)")
    if table.exists() and not table.is_file():
        raise ValueError(f"{table} exists and is not a file: the table goes there (beside the report, as .md); "
                         "name the report file otherwise")
    if table.exists() and not _is_our_table(table):
        raise ValueError(f"{table} exists and was not written by mtpkern eval: the table (beside the report, as "
                         ".md) would replace it; move it away or name the report file otherwise")
    if folder is not None and not plots_folder_is_ours(folder):
        raise ValueError(f"{folder} exists and was not written by mtpkern eval: the plots would go there; move it "
                         "away or name the report file otherwise")
    return path, table, folder


def _is_our_report(path: Path) -> bool:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and str(report.get("schema", "")).startswith("mtpkern.eval/")


def _is_our_table(path: Path) -> bool:
    """Whether ``path`` is a table eval wrote: its mark, or (written before the mark) the first
    line of format_table."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().rstrip("\n")
    except (OSError, UnicodeDecodeError):
        return False
    return first == TABLE_MARK or (first.startswith("Device: ") and "median over prompts" in first)
