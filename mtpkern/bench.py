"""End-to-end decode benchmark: our engine against ``transformers`` ``generate``, batch 1.

On the GPT-2 124M shape (or a given checkpoint) it times greedy decoding of the same prompts
with every configuration of the engine (:func:`mtpkern.generate`):

* ``ntp/eager`` and ``ntp/cuda_graph`` (CUDA only),
* ``mtp/eager``, ``mtp/fused``, ``medusa/eager``, ``medusa/fused`` (eager reference ops with a
  dense attention mask, or the fused kernels), and their ``+cuda_graph`` variants on CUDA,
* ``hf/dynamic`` and (opt-in, ``hf_static``: it compiles itself, minutes on a CPU)
  ``hf/static``: ``transformers`` ``generate`` on the same next-token weights with its
  default dynamic cache and with ``cache_implementation="static"``.

Every case decodes exactly ``max_new_tokens`` tokens (no EOS), after a warm-up run (two for
``hf/static``, which compiles itself on its first call), with the device synchronised around
every call. Reported per case, as medians over prompts: tokens/s (new tokens / wall time of
the call, prefill included), the engine's step time (its own synchronised per-step timings),
mean accepted length and target forward passes per token.

The breakdown of one speculative step (the whole step against its forward pass: the share
of bookkeeping) and the step-cost curve (step time against tree tokens T, the cost model's
measurement) come with it; see :func:`step_breakdown` and :func:`step_cost_curve`.

With random weights (no ``model_dir``) fresh heads copy the base (MTP heads start as its last
block, MEDUSA heads as the identity), so every draft is the base's own next token, and the
accepted length only says how often a random model's greedy output repeats itself. Those
numbers measure the engine: its cost per step, and the ceiling its speculative paths reach
when drafts are accepted. Real acceptance, and real speedups, need trained heads
(``model_dir``).
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mtpkern.autotree import has_calibration, resolve_options
from mtpkern.batch import BatchDecoder
from mtpkern.checkpoint import resolve_checkpoint, write_text_atomic
from mtpkern.config import GPT2Config
from mtpkern.costmodel import time_step
from mtpkern.data import format_prompt, load_records, load_tokenizer
from mtpkern.decoder import Decoder
from mtpkern.eval import device_info, eval_tree, hf_decoder
from mtpkern.graphs import graphs_available
from mtpkern.hf_io import load_model
from mtpkern.models import GPT2, MedusaModel, MTPModel
from mtpkern.ops import _backend
from mtpkern.ops.kv_compact import kv_compact_
from mtpkern.ops.verify import verify_greedy
from mtpkern.options import DecodeOptions, default_tree
from mtpkern.plots import GRAPHED, ntp_of
from mtpkern.runtime import now, resolve_device, resolve_dtype, synchronize, time_us, timed
from mtpkern.tree import Tree

SCHEMA = "mtpkern.bench/1"
MTP_HEADS = 4  # Gloeckle et al.'s n = 4
MEDUSA_HEADS = 4


def bench_models(model_dir=None, *, quick: bool, device, dtype) -> dict:
    """``{"ntp": model, "mtp": model, "medusa": model}`` for the strategies to time.

    Without ``model_dir``: a random GPT-2 (124M shape, or the tiny config when ``quick``)
    with MTP heads and MEDUSA heads built on it. With one: that checkpoint for ``ntp`` and
    its own strategy.
    """
    if model_dir is not None:
        model = load_model(resolve_checkpoint(model_dir)[0], device=device, dtype=dtype).eval()
        kind = model.config.model_type
        return {"ntp": model} if kind == "gpt2" else {"ntp": model, kind: model}
    torch.manual_seed(0)
    cfg = GPT2Config.tiny(vocab_size=512, n_layer=2, bos_token_id=511, eos_token_id=511) if quick else GPT2Config()
    base = GPT2(cfg).to(device=device, dtype=dtype).eval()
    return {"ntp": base, "mtp": MTPModel.from_base(base, n_heads=MTP_HEADS).eval(),
            "medusa": MedusaModel.from_base(base, n_heads=1 + MEDUSA_HEADS).eval()}


def bench_prompts(model, n: int, prompt_len: int, model_dir=None, data: str = "synthetic") -> list[torch.Tensor]:
    """Real prompts (from ``data``, tokenised by the checkpoint's tokenizer) for a trained
    checkpoint, so acceptance is real; seeded random token ids for random weights."""
    ckpt = resolve_checkpoint(model_dir)[0] if model_dir is not None else None
    if ckpt is not None and (ckpt / "tokenizer.json").is_file():
        tok = load_tokenizer(ckpt)
        records = load_records(data, seed=1, limit=max(n, 1) * 4)
        ids = [tok(format_prompt(r["query"]), add_special_tokens=False)["input_ids"] for r in records]
        return [torch.tensor([i], device=model.device) for i in ids[:n]]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(model.device)
            for _ in range(n)]


def engine_cases(models: dict, device) -> list[tuple[str, object, dict]]:
    """``(name, model, generate kwargs)`` for every engine configuration to time."""
    graphs = graphs_available(device)  # the graphed cases wherever the device captures graphs (CUDA)
    cases: list[tuple[str, object, dict]] = [("ntp/eager", models["ntp"], dict(strategy="ntp", kernels="eager"))]
    if graphs:
        cases.append(("ntp/cuda_graph", models["ntp"], dict(strategy="ntp", kernels="eager", cuda_graph=True)))
    for strategy in ("mtp", "medusa"):
        if strategy not in models:
            continue
        model = models[strategy]
        kw: dict[str, Any] = dict(strategy=strategy)
        if strategy == "medusa" and not has_calibration(model):
            # random or uncalibrated heads: one small fixed tree; a calibrated checkpoint decodes
            # with its own `auto` tree, as the decoder's default
            kw["tree"] = eval_tree(model.n_heads - 1)
        cases += [(f"{strategy}/eager", model, dict(kw, kernels="eager")),
                  (f"{strategy}/fused", model, dict(kw, kernels="fused"))]
        if graphs:
            cases.append((f"{strategy}/fused+cuda_graph", model, dict(kw, kernels="fused", cuda_graph=True)))
    return cases


def decoder_run(model, *, max_new_tokens: int, eos_token_id: int | None = None, **engine):
    """``run(ids)`` for :func:`time_case`: one :class:`mtpkern.Decoder` built here and held
    for every prompt, as a user holds one (``engine``: its keyword arguments, ``strategy``
    included). Its cache, tree tensors and CUDA graphs are made once: the graphs are captured
    by the first call (``time_case``'s warm-up), not once per timed prompt as one
    ``generate`` call per prompt would."""
    prefix_cache = engine.pop("prefix_cache", True)
    dec = Decoder(model, resolve_options(model, DecodeOptions(**engine)), prefix_cache=prefix_cache)

    def run(ids):
        return dec.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)

    run.decoder = dec  # type: ignore[attr-defined]  # time_case empties its prefix cache after the warm-up
    return run


def time_case(run, prompts, device, *, warmup: int = 1) -> dict:
    """Median tokens/s and latency of ``run(ids)`` over ``prompts``; engine stats when ``run``
    returns a GenerationResult."""
    for _ in range(warmup):
        run(prompts[0])
    if hasattr(run, "decoder"):  # the first timed prompt finds nothing cached, as in a fresh decoder
        run.decoder.refresh()
    tps, lat, steps, accept, fpt = [], [], [], [], []
    for ids in prompts:
        out, dt = timed(lambda: run(ids), device)
        tokens = out if isinstance(out, list) else out.tokens
        tps.append(len(tokens) / dt)
        lat.append(dt)
        if not isinstance(out, list):
            steps.extend(out.step_times)
            accept.extend(out.accept_lengths)
            fpt.append((1 + out.num_steps) / len(tokens))
    res = dict(tokens_per_second=statistics.median(tps), latency_s=statistics.median(lat))
    if not isinstance(out, list):
        res.update(step_time_us=statistics.median(steps) * 1e6 if steps else None,
                   mean_accept_length=statistics.fmean(accept) if accept else 1.0,
                   forward_passes_per_token=statistics.median(fpt))
    return res


def batch_study(models: dict, prompts: list, sizes: list[int], n: int, eos, device, *,
                cuda_graph: bool = False) -> dict:
    """``{family: {strategy: {B: {tokens_per_second, mean_accept_length}}}}``: each model's own
    ``ntp`` and its speculative strategy through :class:`mtpkern.batch.BatchDecoder` (one per
    B, held for all its batches), over batches of B prompts (the prompts cycled to fill the
    largest B), all rows' tokens over the wall time; one warm-up batch first (which also
    captures the CUDA graphs). ``cuda_graph``: each strategy also replayed from CUDA graphs,
    as ``<strategy>+graph``."""
    rows = [p.view(-1) for p in prompts]
    pool = [rows[i % len(rows)] for i in range(max(len(rows), max(sizes)))]
    out: dict = {}
    for family, model in models.items():
        strategies = ["ntp"] + ([family] if family != "ntp" else [])
        if family == "ntp" and len(models) > 1:
            continue  # the speculative families' models carry their own ntp
        for strategy, graph in [(s, g) for g in ((False, True) if cuda_graph else (False,)) for s in strategies]:
            name = strategy + (GRAPHED if graph else "")
            for B in sizes:
                dec = BatchDecoder(model, strategy, max_batch=B, cuda_graph=graph)
                dec.generate(pool[:B], max_new_tokens=n, eos_token_id=eos)
                tokens, accepted, t0 = 0, [], now(device)
                for i in range(0, len(pool) - B + 1, B):
                    for r in dec.generate(pool[i : i + B], max_new_tokens=n, eos_token_id=eos):
                        tokens += len(r.tokens)
                        accepted += r.accept_lengths
                dt = now(device) - t0
                out.setdefault(family, {}).setdefault(name, {})[str(B)] = dict(
                    tokens_per_second=tokens / dt, mean_accept_length=sum(accepted) / max(1, len(accepted)))
    return out


SAMPLING_HAND_TREE = "3,2,1"  # MTP's tree in the sampling study (MEDUSA: its default tree)


def sampling_trees(model, family: str) -> dict[str, Any]:
    """``{label: tree spec}``: the draft shapes the sampling study decodes ``model`` with: a
    chain over every draft head, the family's tree (MEDUSA's default tree; the hand tree
    ``3,2,1`` for MTP, cut to the model's heads) and ``dynamic``."""
    drafts = model.n_heads - 1
    if family == "medusa":
        tree = default_tree(model, "medusa")  # acceptance='rejection' alone would default to the chain
        label = f"default tree ({len(tree) - 1} drafts)"
    else:
        tree = Tree.from_widths([int(w) for w in SAMPLING_HAND_TREE.split(",")][:drafts])
        label = ",".join(SAMPLING_HAND_TREE.split(",")[:drafts])
    return {f"chain:{drafts}": Tree.chain(drafts), label: tree, "dynamic": "dynamic"}


def sampling_cases(model, family: str, temperature: float) -> list[tuple[str, DecodeOptions]]:
    """``(name, options)`` at ``temperature``: ``ntp`` sampling, then rejection sampling on
    every shape of :func:`sampling_trees` and typical acceptance on its trees (not the chain).
    At temperature 0: greedy ``ntp`` and greedy acceptance on every shape, whose drafts are the
    heads' top-k (the reference for what sampled drafts cost)."""
    cases = [("ntp", DecodeOptions("ntp", temperature=temperature))]
    for label, tree in sampling_trees(model, family).items():
        if temperature == 0:
            cases.append((f"greedy {label}", DecodeOptions(family, tree=tree)))
            continue
        cases.append((f"rejection {label}", DecodeOptions(family, tree=tree, acceptance="rejection",
                                                           temperature=temperature)))
        if not label.startswith("chain"):
            cases.append((f"typical {label}", DecodeOptions(family, tree=tree, acceptance="typical",
                                                             temperature=temperature)))
    return cases


def sampling_run(model, options: DecodeOptions, *, max_new_tokens: int, eos_token_id: int | None, seed: int):
    """``run(ids)`` for :func:`time_case`: one held :class:`Decoder` that draws, where it samples,
    from one ``torch.Generator`` seeded with ``seed`` when the run is made (the warm-up included),
    so every case starts from the same stream and a run repeats itself."""
    dec = Decoder(model, resolve_options(model, options))
    gen = torch.Generator(device=dec.device).manual_seed(seed) if options.sampling else None

    def run(ids):
        return dec.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, generator=gen)

    run.decoder = dec  # type: ignore[attr-defined]
    return run


def sampling_study(models: dict, prompts: list, temperatures: list[float], n: int, eos, device, *,
                   seed: int = 0) -> dict:
    """``{family: {temperature: {case: {tokens_per_second, mean_accept_length, speedup_vs_ntp}}}}``
    (or ``{"error": ...}`` for a case that failed): each speculative model's cases of
    :func:`sampling_cases` at temperature 0 (greedy, top-k drafts) and at each of
    ``temperatures``, batch 1, timed as :func:`time_case` times (median tokens/s over
    ``prompts``, one warm-up), the speed-up against ``ntp`` at the same temperature."""
    out: dict = {}
    for family, model in models.items():
        if family == "ntp":
            continue  # each speculative model carries its own ntp
        for T in [0.0, *temperatures]:
            table = out.setdefault(family, {}).setdefault(str(T), {})
            for name, options in sampling_cases(model, family, T):
                _measure(table, name, lambda: None, lambda: time_case(  # a failing build is recorded too
                    sampling_run(model, options, max_new_tokens=n, eos_token_id=eos, seed=seed), prompts, device))
            ntp = table["ntp"].get("tokens_per_second")
            for r in table.values():
                if "tokens_per_second" in r and ntp:
                    r["speedup_vs_ntp"] = r["tokens_per_second"] / ntp
    return out


def format_sampling(study: dict) -> str:
    """The sampling study as two markdown tables: every case (tokens/s, accepted length,
    speed-up over ``ntp`` at its temperature), then per draft shape the accepted length of
    greedy acceptance on top-k drafts at temperature 0 against rejection sampling (sampled
    drafts) and typical acceptance (top-k drafts) at each temperature."""
    lines = ["| model: case | temperature | tokens/s | accepted length | vs ntp at its temperature |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for family, by_t in study.items():
        for T, cases in by_t.items():
            for name, r in cases.items():
                if "error" in r:
                    lines.append(f"| {family}: {name} | {T} | failed: {r['error']} | | |")
                    continue
                lines.append(f"| {family}: {name} | {T} | {r['tokens_per_second']:.1f} | "
                             f"{r['mean_accept_length']:.2f} | {r.get('speedup_vs_ntp', 0):.2f}x |")
    return "\n".join(lines + ["", *_draft_cost_table(study)]) + "\n"


def _draft_cost_table(study: dict) -> list[str]:
    """Accepted length per draft shape: greedy on top-k drafts (temperature 0) against rejection
    (sampled drafts) and typical (top-k drafts) at each temperature."""
    temps = [T for T in next(iter(study.values()), {}) if float(T) > 0]
    lines = ["| model: drafts | greedy, top-k drafts, T=0 | " +
             " | ".join(f"rejection, sampled drafts, T={T} | typical, top-k drafts, T={T}" for T in temps) + " |",
             "| --- |" + " ---: |" * (1 + 2 * len(temps))]

    def acc(family, T, name):
        r = study[family].get(T, {}).get(name, {})
        return f"{r['mean_accept_length']:.2f}" if "mean_accept_length" in r else "-"

    for family, by_t in study.items():
        for name in by_t.get("0.0", {}):
            if not name.startswith("greedy "):
                continue
            shape = name[len("greedy "):]
            cells = [acc(family, "0.0", name)] + [acc(family, T, f"{kind} {shape}") for T in temps
                                                  for kind in ("rejection", "typical")]
            lines.append(f"| {family}: {shape} | " + " | ".join(cells) + " |")
    return lines


STEP_COST_T = (1, 2, 4, 8, 16, 32, 64)  # tree tokens per step for the step-cost curve


def step_breakdown(model, tree, *, prefix_len: int, kernels: str, iters: int = 20, prompts=None,
                   max_new_tokens: int = 32) -> dict:
    """Median microseconds of one greedy decoding step of ``mtpkern.Decoder`` with
    ``prefix_len`` cached tokens, and of its parts, each timed alone on the step's shapes:

    * ``step_us``: the whole step as the decode loop runs it, in a running decode's state (its
      one host sync included);
    * ``forward_us``: the model's forward passes: head 0 over the tree's T tokens, plus the
      draft heads where the next drafts come from (``draft_heads_us``: MEDUSA's heads on one
      node; MTP's head blocks run inside the verification pass with eager attention, over the
      accepted path with fused kernels);
    * ``logits_us``: head 0's logits and argmax at every node (the LM head the verification
      needs, which an NTP step pays for one row);
    * ``bookkeeping_us``: everything else (logits, candidates, verification, KV compaction,
      next drafts, the sync), timed directly: the same step with its verification forward
      replaced by one that returns its outputs, less the draft heads. ``bookkeeping_share`` =
      bookkeeping / step, the issue's measure of a lean step, and
      ``bookkeeping_share_beyond_lm_head`` counts the LM head as part of the forward pass;
    * with ``prompts``, ``in_decode_share``: the same share measured inside real decoding (the
      steps' wall time outside the model's forward passes, the draft heads included, over the
      steps of decoding ``prompts``), where the parts share the caches as they do in use.
    """
    strategy = model.config.model_type
    dec = Decoder(model, strategy, tree=tree, kernels=kernels)
    with torch.inference_mode():
        parts = dec.step_parts(prefix_len)  # a TypeError for an engine without a tree step
        T, device = dec.tree_nodes, dec.device
        step_us = time_us(parts["step"], device, iters)
        verify_us = time_us(parts["forward"], device, iters)
        logits_us = time_us(parts["logits"], device, iters)
        drafts_us = time_us(parts["draft_heads"], device, iters) if parts["draft_heads"] is not None else 0.0
        rest_us = time_us(parts["rest"], device, iters)
    bookkeeping_us = max(0.0, rest_us - drafts_us)
    out = dict(step_us=step_us, forward_us=verify_us + drafts_us, draft_heads_us=drafts_us, logits_us=logits_us,
               bookkeeping_us=bookkeeping_us, bookkeeping_share=bookkeeping_us / step_us,
               bookkeeping_share_beyond_lm_head=max(0.0, bookkeeping_us - logits_us) / step_us,
               tree_nodes=T, prefix_len=prefix_len, kernels=kernels)
    if prompts:
        out["in_decode_share"] = _in_decode_share(Decoder(model, strategy, tree=tree, kernels=kernels), prompts,
                                                  max_new_tokens)
    return out


def _in_decode_share(dec, prompts, max_new_tokens: int) -> float:
    """Share of the decode steps' wall time spent outside the forward passes (verification and
    draft heads), decoding ``prompts`` after one warm-up; each pass synchronised."""
    device = dec.device
    inside = [0.0]

    def timed(fn):
        def call(*args):
            synchronize(device)
            t0 = time.perf_counter()
            out = fn(*args)
            synchronize(device)
            inside[0] += time.perf_counter() - t0
            return out
        return call

    with dec.hooked_passes(timed), torch.inference_mode():
        dec.generate(prompts[0].view(-1), max_new_tokens=max_new_tokens)
        inside[0], total = 0.0, 0.0
        for ids in prompts:
            total += sum(dec.generate(ids.view(-1), max_new_tokens=max_new_tokens).step_times)
    return max(0.0, 1.0 - inside[0] / total) if total > 0 else 0.0


def verify_compact_backends(model, tree, *, prefix_len: int, iters: int = 200) -> dict:
    """Median microseconds of greedy verification and KV compaction on ``model``'s device,
    shapes of one step of ``tree``: the eager references against the C++ extension's kernels
    (on the CPU its C++ CPU kernels), the measurement behind the decoder's choice of the
    extension for them. Empty without the extension."""
    if not _backend.HAS_CUDA_EXT:
        return {}
    device = model.device
    tt = tree.tensors(device)
    T = len(tree)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (T,), generator=g).to(device)
    target = torch.randint(0, model.config.vocab_size, (T,), generator=g).to(device)
    cache = model.new_cache(1, prefix_len + T)
    path = tt.paths[-1].contiguous()
    prefix, count = torch.tensor(prefix_len, device=device), (path >= 0).sum()
    out = {}
    with torch.inference_mode():
        for name, backend in (("eager", "eager"), ("extension", "cuda")):
            out[f"verify_{name}_us"] = time_us(lambda: verify_greedy(tokens, target, tt.paths, backend=backend),
                                               device, iters)
            out[f"kv_compact_{name}_us"] = time_us(
                lambda: kv_compact_(cache.k, cache.v, path, prefix, count, backend=backend), device, iters)
    return dict(out, tree_nodes=T)


def step_cost_curve(model, *, kernels: str = "auto", cuda_graph: bool = False, sizes=STEP_COST_T,
                    prefix_len: int = 64, iters: int = 10) -> list[dict]:
    """``[{"T", "step_us"}]``: the median time of one greedy step against its tree tokens T,
    measured as the cost model measures it (:func:`mtpkern.costmodel.time_step`)."""
    room = model.config.n_positions - prefix_len
    return [dict(T=T, step_us=time_step(model, T, kernels=kernels, cuda_graph=cuda_graph, prefix_len=prefix_len,
                                        iters=iters) * 1e6)
            for T in sizes if T <= room]


def format_bench(report: dict) -> str:
    dev = report["device"]
    lines = [f"Device: {dev['name']} ({dev['type']}, {dev['dtype']}); torch {dev['torch']}, "
             f"transformers {dev['transformers']}. Batch 1, {report['settings']['max_new_tokens']} new tokens, "
             f"median over {report['settings']['prompts']} prompts. {report['weights']}",
             "",
             "| case | tokens/s | latency (s) | step time (us) | accepted length | forward passes / token "
             "| speedup vs ntp/eager |",
             "|---|---|---|---|---|---|---|"]
    base = report["cases"].get("ntp/eager", {}).get("tokens_per_second")
    for name, c in report["cases"].items():
        if "error" in c:
            lines.append(f"| {name} | failed: {c['error']} | | | | | |")
            continue

        def f(key, spec):
            return "" if c.get(key) is None else f"{c[key]:{spec}}"

        speed = f"{c['tokens_per_second'] / base:.2f}x" if base else ""
        lines.append(f"| {name} | {c['tokens_per_second']:.1f} | {c['latency_s']:.3f} | {f('step_time_us', '.0f')} "
                     f"| {f('mean_accept_length', '.2f')} | {f('forward_passes_per_token', '.2f')} | {speed} |")
    for kernels, b in report.get("step_breakdown", {}).items():
        if "error" in b:
            lines.append(f"\nMEDUSA step breakdown ({kernels}): failed: {b['error']}")
        else:
            lines.append(f"\nMEDUSA step breakdown ({kernels}, {b['tree_nodes']} nodes over {b['prefix_len']} "
                         f"cached): step {b['step_us']:.0f} us, forward {b['forward_us']:.0f} us, head-0 logits "
                         f"{b['logits_us']:.0f} us; everything but the forward {b['bookkeeping_share']:.0%} of the "
                         f"step ({b['bookkeeping_share_beyond_lm_head']:.0%} beyond the LM head; the step less "
                         f"its forward timed alone: {1 - b['forward_us'] / b['step_us']:.0%}"
                         + (f"; inside real decoding: {b['in_decode_share']:.0%}" if "in_decode_share" in b else "")
                         + ")")
    vc = report.get("verify_compact") or {}
    if "error" in vc:
        lines.append(f"\nVerification / KV compaction backends: failed: {vc['error']}")
    elif vc:
        lines.append(f"\nVerification / KV compaction ({vc['tree_nodes']} nodes): eager {vc['verify_eager_us']:.0f} / "
                     f"{vc['kv_compact_eager_us']:.0f} us, C++ extension {vc['verify_extension_us']:.0f} / "
                     f"{vc['kv_compact_extension_us']:.0f} us")
    batched = report.get("batched")
    if batched and "error" in batched:
        lines.append(f"\nBatched decoding: failed: {batched['error']}")
    elif batched:
        for family, strategies in batched.items():
            for strategy, by_b in strategies.items():
                ntp = strategies.get(ntp_of(strategy), {})
                cells = [f"B={b} {v['tokens_per_second']:.1f}" + (
                    f" ({v['tokens_per_second'] / ntp[b]['tokens_per_second']:.2f}x its ntp)"
                    if strategy != ntp_of(strategy) and b in ntp else "") for b, v in by_b.items()]
                lines.append(f"\nBatched decoding ({family} model, {strategy}, tokens/s): " + ", ".join(cells))
    for name, curve in report.get("step_cost", {}).items():
        if isinstance(curve, dict):
            lines.append(f"\nStep cost ({name}): failed: {curve['error']}")
        else:
            points = ", ".join(f"T={p['T']} {p['step_us']:.0f} us" for p in curve)
            lines.append(f"\nStep cost ({name}, greedy step vs tree tokens T): {points}")
    return "\n".join(lines) + "\n"


def _error(e: Exception) -> dict:
    return {"error": f"{type(e).__name__}: {e}".strip().splitlines()[0][:200]}


def run_bench(device: str = "cuda", json_path=None, model_dir=None, max_new_tokens: int = 128,
              prompts: int = 5, prompt_len: int = 32, quick: bool = False, dtype: str | None = None,
              data: str = "synthetic", progress: bool = True, hf_static: bool = False, batch_sizes=()) -> dict:
    """Time every case (module docstring), the MEDUSA step breakdown and the step-cost curve,
    and return the report; print the table, and write the JSON to ``json_path`` if given,
    case by case (a run cut short keeps what it measured).

    ``quick``: a tiny random model (2 layers, 128 wide), for a CPU smoke run. ``dtype``
    default: float16 on CUDA, float32 on CPU. ``batch_sizes`` (e.g. ``(1, 4, 16)``): also the
    tokens/s of batched decoding (:func:`batch_study`) at each. ``hf_static``: also time ``transformers`` with
    its static cache (slow: it compiles itself). A case that raises is recorded with its
    error and the others still run (one broken kernel must not cost the whole GPU session).
    """
    if max_new_tokens < 1 or prompts < 1 or prompt_len < 1:
        raise ValueError(f"max_new_tokens, prompts and prompt_len must be >= 1, "
                         f"got {max_new_tokens}, {prompts}, {prompt_len}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    models = bench_models(model_dir, quick=quick, device=dev, dtype=dt)
    ids = bench_prompts(models["ntp"], prompts, prompt_len, model_dir, data)
    report = _new_report(models, ids, dev, dt, model_dir=model_dir, quick=quick, max_new_tokens=max_new_tokens,
                         prompts=prompts)
    save = functools.partial(_save_report, report, json_path)
    iters = 2 if quick else 20
    with torch.inference_mode():
        cases = _timed_cases(models, dev, max_new_tokens=max_new_tokens, hf_static=hf_static)
        for name, make_run, warmup in tqdm(cases, desc="bench", disable=not progress, file=sys.stderr):
            _measure(report["cases"], name, save, lambda: time_case(make_run(), ids, dev, warmup=warmup))
        if "medusa" in models:
            _medusa_step_study(report, save, models["medusa"], ids, dev, max_new_tokens=max_new_tokens, iters=iters,
                               quick=quick)
        _step_cost_curves(report, save, models, dev, quick=quick, iters=iters)
        if batch_sizes:
            _measure(report, "batched", save, lambda: batch_study(models, ids, list(batch_sizes), max_new_tokens, None,
                                                                  dev, cuda_graph=dev.type == "cuda"))
    print(format_bench(report))
    save()
    return report


def _new_report(models: dict, ids: list[torch.Tensor], dev: torch.device, dt: torch.dtype, *, model_dir, quick: bool,
                max_new_tokens: int, prompts: int) -> dict[str, Any]:
    """The report before any measurement: the device, the weights and the settings."""
    weights = ("Trained weights from the given checkpoint: accepted lengths are real." if model_dir else
               "Random weights: the heads copy the base, so accepted lengths reflect how often a random model "
               "repeats itself; this measures the engine (step cost, ceiling), not trained heads.")
    settings = dict(max_new_tokens=max_new_tokens, prompts=prompts, prompt_len=ids[0].shape[1],
                    model=str(model_dir) if model_dir else ("tiny" if quick else "gpt2-124M"),
                    n_params=models["ntp"].num_parameters())
    return dict(schema=SCHEMA, device=device_info(dev, dt), weights=weights, settings=settings,
                cases={}, step_breakdown={}, step_cost={})


def _save_report(report: dict, json_path) -> None:
    """The report so far, as JSON at ``json_path`` (when given), replaced atomically."""
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json_path, json.dumps(report, indent=2))


def _measure(table: dict, key: str, save: Callable[[], None], measure: Callable[[], Any]) -> None:
    """``table[key] = measure()``, or the error it raised (the other measurements still run);
    then the report is saved."""
    try:
        table[key] = measure()
    except Exception as e:  # noqa: BLE001 - record it and measure the rest
        table[key] = _error(e)
    save()


def _timed_cases(models: dict, dev: torch.device, *, max_new_tokens: int,
                 hf_static: bool) -> list[tuple[str, Callable[[], Any], int]]:
    """``(name, make_run, warm-up runs)``: the engine's cases, then ``transformers``'."""
    cases: list[tuple[str, Callable[[], Any], int]] = [
        (name, functools.partial(decoder_run, m, max_new_tokens=max_new_tokens, **kw), 1)
        for name, m, kw in engine_cases(models, dev)]
    cases.append(("hf/dynamic", lambda: hf_decoder(models["ntp"], max_new_tokens, None), 1))
    if hf_static:
        cases.append(("hf/static", lambda: hf_decoder(models["ntp"], max_new_tokens, None, static_cache=True), 2))
    return cases


def _medusa_step_study(report: dict, save: Callable[[], None], medusa, ids: list[torch.Tensor], dev: torch.device,
                       *, max_new_tokens: int, iters: int, quick: bool) -> None:
    """The MEDUSA step breakdown (per kernels setting) and the verification / KV compaction backends."""
    # The tree the model decodes with: a calibrated checkpoint's own (auto), else the small fixed one.
    medusa_tree = (resolve_options(medusa, DecodeOptions("medusa")).tree
                   if has_calibration(medusa)
                   else eval_tree(medusa.n_heads - 1))
    prefix_len = ids[0].shape[1] + max_new_tokens // 2
    for kernels in ("eager", "fused") if dev.type == "cuda" else ("auto", "eager"):  # auto is fused on CUDA
        _measure(report["step_breakdown"], kernels, save, lambda: step_breakdown(
            medusa, medusa_tree, prefix_len=prefix_len, kernels=kernels, iters=iters, prompts=ids,
            max_new_tokens=max_new_tokens))
    _measure(report, "verify_compact", save, lambda: verify_compact_backends(
        medusa, eval_tree(medusa.n_heads - 1), prefix_len=prefix_len, iters=20 if quick else 200))


def _step_cost_curves(report: dict, save: Callable[[], None], models: dict, dev: torch.device, *, quick: bool,
                      iters: int) -> None:
    """The step-cost curve of each speculative model, also replayed from CUDA graphs on CUDA."""
    for strategy in ("medusa", "mtp"):
        if strategy not in models:
            continue
        for graph in (False, True) if dev.type == "cuda" else (False,):
            name = f"{strategy}/auto" + ("+cuda_graph" if graph else "")
            _measure(report["step_cost"], name, save, lambda: step_cost_curve(
                models[strategy], cuda_graph=graph, sizes=STEP_COST_T[:5] if quick else STEP_COST_T, iters=iters))
