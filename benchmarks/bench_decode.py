"""Decode speed of ntp / mtp / medusa on the same models and prompts, against transformers.

For every model family: our ``ntp`` (eager; with CUDA graphs on CUDA), the model's own
speculative strategy (default kernels; fused kernels on CPU with ``--fused``; CUDA graphs on
CUDA), and ``transformers`` ``generate`` (greedy, dynamic cache; its static cache with
``--hf-static``) on the weights of the next-token path. Each case holds one ``Decoder`` for
all its prompts, as a user does (its cache, tree and CUDA graphs made once, by the warm-up
prompt), is synchronised, and is reported as the median over prompts of tokens/s, with the mean accepted length, target forward passes per token, and the
speedup over our ``ntp`` of the same model and over ``transformers`` (dynamic cache).
Speculative models run their hand trees, ``auto`` (the calibrated tree; the default tree,
with a warning, for a model without calibration) and ``dynamic``. The step-cost curve (time
of one greedy step against its tree tokens T, the cost model's own measurement) is printed,
kept in the JSON and, with ``--plot``, drawn. The JSON is written case by case; a failing
case is recorded and the others still run.

``--sampling 0.7,1.0`` (issue 26) times sampling instead: per speculative model and temperature,
``ntp`` sampling (the baseline), rejection sampling on a chain, on a tree (MEDUSA's default tree,
``3,2,1`` for MTP) and on ``dynamic``, and typical acceptance on the same trees, every case drawing
from a ``torch.Generator`` seeded with ``--seed``; and at temperature 0 greedy acceptance on the
same shapes, whose top-k drafts set against the sampled drafts' accepted length what sampling
them costs (``mtpkern.bench.sampling_study``).

Models: ``--model DIR`` (a checkpoint of any family: prompts from ``--data`` through its
tokenizer, every case stopping at its EOS like ``mtpkern eval``); otherwise, on CUDA, a random GPT-2 124M
shape with MTP and MEDUSA heads (accepted lengths then measure a random model, not trained
heads); on CPU, the tiny models of ``tests/_tiny.py``, trained for a few seconds on a periodic
pattern, so acceptance is real. Fused kernels on CPU run in Triton's interpreter, so they are
only timed there with ``--fused``.

    python benchmarks/bench_decode.py --device cpu --threads 1 --prompts 8 --json out.json --plot step_cost.png
    python benchmarks/bench_decode.py --device cpu --threads 1 --model demo_out/medusa --sampling 0.7,1.0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from mtpkern.bench import (batch_study, bench_models, bench_prompts, decoder_run, format_sampling, sampling_study,
                           step_cost_curve, time_case)
from mtpkern.plots import ntp_of
from mtpkern.eval import device_info, hf_decoder
from mtpkern.runtime import resolve_device, resolve_dtype


def tiny_trained_models():
    """({strategy: model}, the _tiny module): the tests' tiny GPT-2, MEDUSA and MTP models."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import _tiny

    return {"ntp": _tiny.tiny_gpt2(), "medusa": _tiny.tiny_medusa(), "mtp": _tiny.tiny_mtp()}, _tiny


def load_models(args, device, dtype):
    """(models by strategy, prompts as [1, T] tensors, a note on the weights)."""
    g = torch.Generator().manual_seed(0)
    if args.model:
        from mtpkern.hf_io import load_model

        model = load_model(args.model, device=device, dtype=dtype).eval()
        kind = model.config.model_type
        models = {"ntp": model} if kind == "gpt2" else {"ntp": model, kind: model}
        # Prompts from --data through the checkpoint's tokenizer, so the heads see what they
        # were trained on (random token ids would measure acceptance on noise).
        prompts = bench_prompts(model, args.prompts, args.prompt_len, args.model, data=args.data)
        # ... and they stop at the tokenizer's EOS, as a user's decode does: past its answer a
        # fine-tuned model writes what it was never trained on, and acceptance means nothing.
        args.eos = getattr(model.config, "eos_token_id", None)
        return models, prompts, f"checkpoint {args.model}, prompts from {args.data}, stopping at EOS"
    elif device.type == "cuda":
        models = bench_models(None, quick=False, device=device, dtype=dtype)
        note = "random GPT-2 124M shape: accepted lengths measure a random model, not trained heads"
    else:
        models, tiny = tiny_trained_models()
        models = {k: m.to(device=device, dtype=dtype) for k, m in models.items()}
        prompts = [torch.tensor([p], device=device) for p in tiny.random_prompts(args.prompts, seed=11, min_len=16)]
        return models, prompts, "tiny models trained on a periodic pattern (tests/_tiny.py)"
    V = models["ntp"].config.vocab_size
    prompts = [torch.randint(0, V, (1, args.prompt_len), generator=g).to(device) for _ in range(args.prompts)]
    return models, prompts, note


HAND_TREES = {"mtp": ["chain:1", "chain:2", None, "2,1,1", "3,2,1"], "medusa": ["chain:2", None, "4,2,1", "3,2,2"]}


def cases(models: dict, device: torch.device, fused_on_cpu: bool, prefix_cache: bool = True):
    """(name, model, strategy family, Decoder kwargs): our ntp, then per speculative model
    its hand trees (None: the default tree), ``auto`` and ``dynamic``, every one with the
    decoder's default kernels (on the CPU eager attention and the C++ verification); fused
    kernels on CPU with ``fused_on_cpu``, CUDA graphs on CUDA."""
    cuda = device.type == "cuda"
    out = []
    for family, model in models.items():
        out.append((f"{family}: ntp", model, family, dict(strategy="ntp")))
        if cuda:
            out.append((f"{family}: ntp cuda_graph", model, family, dict(strategy="ntp", cuda_graph=True)))
        if family == "ntp":
            continue
        depth = model.n_heads - 1
        trees = [t for t in HAND_TREES[family] if t is None or _fits(t, depth)] + ["auto", "dynamic"]
        # dynamic trees at auto's node budget too: the two selection rules at equal cost
        auto_nodes = _auto_nodes(model, family)
        if auto_nodes:
            trees.append(f"dynamic:{auto_nodes}")
        for tree in trees:
            label = f"{family}: {family} tree={tree or 'default'}"
            out.append((label, model, family, dict(strategy=family, tree=tree)))
            if fused_on_cpu and not cuda:
                out.append((label + " fused", model, family, dict(strategy=family, tree=tree, kernels="fused")))
            if cuda:
                out.append((label + " cuda_graph", model, family, dict(strategy=family, tree=tree, cuda_graph=True)))
    return [(name, model, family, dict(kw, prefix_cache=prefix_cache)) for name, model, family, kw in out]


def _auto_nodes(model, family: str) -> int | None:
    """Draft nodes of the tree ``auto`` picks for ``model`` (None without calibration)."""
    import warnings

    from mtpkern.autotree import has_calibration, resolve_options
    from mtpkern.options import DecodeOptions

    if not has_calibration(model):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return len(resolve_options(model, DecodeOptions(family, tree="auto")).tree) - 1


def _fits(spec: str, depth: int) -> bool:
    from mtpkern.tree import Tree

    return Tree.parse(spec).max_depth <= depth


def _print_batch(batch: dict, sizes: list[int]) -> None:
    print("| model: strategy | " + " | ".join(f"B={b} tokens/s" for b in sizes) + " | " +
          " | ".join(f"B={b} vs ntp" for b in sizes) + " | speed-up kept (of the smallest B's) |")
    print("| --- |" + " ---: |" * (2 * len(sizes) + 1))
    for family, strategies in batch.items():
        for strategy, by_b in strategies.items():
            ntp = strategies[ntp_of(strategy)]  # with graphs: over ntp with graphs
            tps = [by_b[str(b)]["tokens_per_second"] for b in sizes]
            vs = [by_b[str(b)]["tokens_per_second"] / ntp[str(b)]["tokens_per_second"] for b in sizes]
            # the speed-up over ntp at B, as a share of the speed-up at the smallest B
            kept = "" if strategy == ntp_of(strategy) else ", ".join(f"B={b} {v / vs[0]:.0%}" for b, v in zip(sizes[1:], vs[1:]))
            print(f"| {family}: {strategy} | " + " | ".join(f"{t:.1f}" for t in tps) + " | " +
                  " | ".join(f"{v:.2f}x" for v in vs) + f" | {kept} |")


def _temperatures(text: str) -> list[float]:
    try:
        temps = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        temps = []
    if not temps or min(temps) <= 0:
        raise SystemExit(f"--sampling: temperatures > 0, e.g. 0.7,1.0, got {text!r}")
    return temps


def _sampling(args, models: dict, prompts: list, report: dict, device) -> dict:
    """--sampling: the sampling study (mtpkern.bench.sampling_study), its tables and the JSON."""
    temps = _temperatures(args.sampling)
    with torch.inference_mode():
        report["sampling"] = sampling_study(models, prompts, temps, args.max_new_tokens, args.eos, device,
                                            seed=args.seed)
    report["seed"] = args.seed
    print(f"device: {report['device']}\nweights: {report['weights']}\n{len(prompts)} prompts, {args.max_new_tokens} "
          f"new tokens, median tokens/s over prompts, {torch.get_num_threads()} threads, seed {args.seed}\n")
    print(format_sampling(report["sampling"]))
    _write_json(args.json, report)
    return report


def _write_json(path, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2, default=str))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 (default fp16 on CUDA, fp32 on CPU)")
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: see the module docstring)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32, help="random prompts' length (random weights)")
    ap.add_argument("--data", default="synthetic", help="where a --model checkpoint's prompts come from")
    ap.add_argument("--fused", action="store_true", help="also time fused kernels on CPU (Triton interpreter)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (tiny models run fastest on 1)")
    ap.add_argument("--hf-static", action="store_true",
                    help="also time transformers with its static cache (slow: it compiles itself)")
    ap.add_argument("--step-cost", default="1,2,4,8,16,32,64", help="tree sizes T of the step-cost curve")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="prefill every prompt whole (default: each decoder reuses what a prompt shares with the last)")
    ap.add_argument("--json", default=None, help="the report, written case by case")
    ap.add_argument("--plot", default=None, help="a PNG of the step-cost curve (with --batch: of the batch study)")
    ap.add_argument("--batch", default=None,
                    help="batch sizes, e.g. 1,4,16: time batched decoding (mtpkern.batch) at each instead of the "
                         "batch-1 cases: tokens/s and what survives of the speed-up")
    ap.add_argument("--sampling", default=None,
                    help="temperatures, e.g. 0.7,1.0: instead of the greedy cases, ntp sampling against rejection "
                         "sampling (chain, tree, dynamic) and typical acceptance per speculative model (issue 26)")
    ap.add_argument("--seed", type=int, default=0, help="--sampling: every case's torch.Generator seed")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    args.eos = None  # random weights and the tiny models decode exactly max_new_tokens
    models, prompts, note = load_models(args, device, dtype)
    n = args.max_new_tokens
    report = dict(device=device_info(device, dtype), weights=note, max_new_tokens=n, prompts=len(prompts),
                  threads=torch.get_num_threads(), prefix_cache=not args.no_prefix_cache, cases={}, step_cost={})
    results = report["cases"]
    if args.sampling:
        return _sampling(args, models, prompts, report, device)
    if args.batch:
        sizes = sorted({int(b) for b in args.batch.split(",") if b.strip()})
        if not sizes or sizes[0] < 1:
            raise SystemExit(f"--batch: batch sizes >= 1, got {args.batch!r}")
        with torch.inference_mode():
            report["batch"] = batch_study(models, prompts, sizes, n, args.eos, device, cuda_graph=device.type == "cuda")
        print(f"device: {report['device']}\nweights: {note}\n{n} new tokens, {torch.get_num_threads()} threads\n")
        _print_batch(report["batch"], sizes)
        if args.plot:
            from mtpkern.plots import plot_batch

            report["plot"] = plot_batch(report["batch"], args.plot,
                                        title=f"Batched decoding on {report['device']['name']}")
        _write_json(args.json, report)
        return report

    def save():
        _write_json(args.json, report)

    def run(name, family, fn):
        try:
            results[name] = dict(fn(), family=family)
        except Exception as e:  # noqa: BLE001 - a case that cannot run is reported, not fatal
            results[name] = dict(error=f"{type(e).__name__}: {e}".strip().splitlines()[0][:200], family=family)
        save()
        print(f"{name}: {results[name]}", file=sys.stderr)

    with torch.inference_mode():
        for name, model, family, kw in cases(models, device, args.fused, prefix_cache=not args.no_prefix_cache):
            run(name, family, lambda m=model, kw=kw: time_case(
                decoder_run(m, max_new_tokens=n, eos_token_id=args.eos, **kw), prompts, device))
        for family, model in models.items():
            hf_cases = [("dynamic", False)] + ([("static", True)] if args.hf_static else [])
            for label, static in hf_cases:
                run(f"{family}: transformers {label}", family, lambda m=model, static=static: time_case(
                    hf_decoder(m, n, args.eos, static_cache=static), prompts, device, warmup=2 if static else 1))
        sizes = [int(t) for t in args.step_cost.split(",") if t.strip()]
        for family, model in models.items():
            if family == "ntp":
                continue
            for graph in (False, True) if device.type == "cuda" else (False,):
                label = f"{family}" + (" cuda_graph" if graph else "")
                try:
                    report["step_cost"][label] = step_cost_curve(model, cuda_graph=graph, sizes=sizes)
                except Exception as e:  # noqa: BLE001
                    report["step_cost"][label] = dict(error=f"{type(e).__name__}: {e}".strip().splitlines()[0][:200])
                save()
    for name, r in results.items():
        if "tokens_per_second" not in r:
            continue
        ours = results.get(f"{r['family']}: ntp", {}).get("tokens_per_second")
        hf = results.get(f"{r['family']}: transformers dynamic", {}).get("tokens_per_second")
        r["speedup_vs_ntp"] = r["tokens_per_second"] / ours if ours else None
        r["speedup_vs_hf"] = r["tokens_per_second"] / hf if hf else None

    info = report["device"]
    print(f"device: {info}\nweights: {note}\n{len(prompts)} prompts, {n} new tokens, median over prompts, "
          f"{torch.get_num_threads()} threads\n")
    print("| case | tokens/s | mean accepted | fwd passes / token | vs our ntp | vs transformers |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | |")
            continue
        acc = f"{r['mean_accept_length']:.2f}" if "mean_accept_length" in r else "-"
        fpt = f"{r['forward_passes_per_token']:.2f}" if "forward_passes_per_token" in r else "-"
        vs_ntp = f"{r['speedup_vs_ntp']:.2f}x" if r.get("speedup_vs_ntp") else "-"
        vs_hf = f"{r['speedup_vs_hf']:.2f}x" if r.get("speedup_vs_hf") else "-"
        print(f"| {name} | {r['tokens_per_second']:.1f} | {acc} | {fpt} | {vs_ntp} | {vs_hf} |")
    curves = {k: v for k, v in report["step_cost"].items() if isinstance(v, list)}
    for label, curve in curves.items():
        print(f"\nstep cost ({label}): " + ", ".join(f"T={p['T']} {p['step_us']:.0f} us" for p in curve))
    if args.plot and curves:
        from mtpkern.plots import plot_step_cost

        report["plot"] = plot_step_cost(curves, args.plot, title=f"Step cost on {info['name']} ({info['dtype']})")
    save()
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
