"""Decode speed of ntp / mtp / medusa on the same models and prompts, against transformers.

For every model family: our ``ntp`` (eager; with CUDA graphs on CUDA), the model's own
speculative strategy (eager and fused kernels; fused + CUDA graphs on CUDA), and
``transformers`` ``generate`` (greedy, dynamic cache; static cache on CUDA) on the weights of
the next-token path. Each case is warmed up, synchronised, and reported as the median over
prompts of tokens/s, with the mean accepted length, target forward passes per token, and the
speedup over our ``ntp`` of the same model and over ``transformers`` (dynamic cache).

Models: ``--model DIR`` (a checkpoint of any family); otherwise, on CUDA, a random GPT-2 124M
shape with MTP and MEDUSA heads (accepted lengths then measure a random model, not trained
heads); on CPU, the tiny models of ``tests/_tiny.py``, trained for a few seconds on a periodic
pattern, so acceptance is real. Fused kernels on CPU run in Triton's interpreter, so they are
only timed there with ``--fused``.

    python benchmarks/bench_decode.py --device cpu --threads 1 --prompts 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from mtpkern.bench import bench_models, time_case
from mtpkern.eval import device_info, hf_decoder
from mtpkern.runtime import resolve_device, resolve_dtype
from mtpkern.generate import generate


def tiny_trained_models():
    """({strategy: model}, the _tiny module): the tests' tiny GPT-2, MEDUSA and MTP models."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import _tiny

    return {"ntp": _tiny.tiny_gpt2(), "medusa": _tiny.tiny_medusa(), "mtp": _tiny.tiny_mtp()}, _tiny


def load_models(args, device, dtype):
    """(models by strategy, prompts as [1, T] tensors, a note on the weights)."""
    g = torch.Generator().manual_seed(0)
    if args.model:
        from mtpkern.model import load_model

        model = load_model(args.model, device=device, dtype=dtype).eval()
        kind = model.config.model_type
        models = {"ntp": model} if kind == "gpt2" else {"ntp": model, kind: model}
        note = f"checkpoint {args.model}"
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


def cases(models: dict, device: torch.device, fused_on_cpu: bool):
    """(name, model, strategy family, generate kwargs)."""
    cuda = device.type == "cuda"
    out = []
    for family, model in models.items():
        out.append((f"{family}: ntp", model, family, dict(strategy="ntp", kernels="eager")))
        if cuda:
            out.append((f"{family}: ntp cuda_graph", model, family, dict(strategy="ntp", cuda_graph=True)))
        if family == "ntp":
            continue
        out.append((f"{family}: {family} eager", model, family, dict(strategy=family, kernels="eager")))
        if cuda or fused_on_cpu:
            out.append((f"{family}: {family} fused", model, family, dict(strategy=family, kernels="fused")))
        if cuda:
            out.append((f"{family}: {family} fused cuda_graph", model, family,
                        dict(strategy=family, kernels="fused", cuda_graph=True)))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 (default fp16 on CUDA, fp32 on CPU)")
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: see the module docstring)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32, help="random prompts' length (random weights)")
    ap.add_argument("--fused", action="store_true", help="also time fused kernels on CPU (Triton interpreter)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (tiny models run fastest on 1)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    models, prompts, note = load_models(args, device, dtype)
    n = args.max_new_tokens
    results = {}
    with torch.inference_mode():
        for name, model, family, kw in cases(models, device, args.fused):
            results[name] = dict(time_case(lambda x, m=model, kw=kw: generate(m, x, max_new_tokens=n, **kw),
                                           prompts, device), family=family)
        for family, model in models.items():
            hf_cases = [("dynamic", False)] + ([("static", True)] if device.type == "cuda" else [])
            for label, static in hf_cases:
                try:
                    r = time_case(hf_decoder(model, n, None, static_cache=static), prompts, device,
                                  warmup=2 if static else 1)
                    results[f"{family}: transformers {label}"] = dict(r, family=family)
                except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
                    results[f"{family}: transformers {label}"] = dict(error=f"{type(e).__name__}: {e}"[:200],
                                                                      family=family)
    for name, r in results.items():
        ours = results[f"{r['family']}: ntp"]["tokens_per_second"]
        hf = results[f"{r['family']}: transformers dynamic"].get("tokens_per_second")
        if "tokens_per_second" in r:
            r["speedup_vs_ntp"] = r["tokens_per_second"] / ours
            r["speedup_vs_hf"] = r["tokens_per_second"] / hf if hf else None

    info = device_info(device, dtype)
    print(f"device: {info}\nweights: {note}\n{len(prompts)} prompts, {n} new tokens, median over prompts\n")
    print("| case | tokens/s | mean accepted | fwd passes / token | vs our ntp | vs transformers |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | |")
            continue
        acc = f"{r['mean_accept_length']:.2f}" if "mean_accept_length" in r else "-"
        fpt = f"{r['forward_passes_per_token']:.2f}" if "forward_passes_per_token" in r else "-"
        vs_hf = f"{r['speedup_vs_hf']:.2f}x" if r.get("speedup_vs_hf") else "-"
        print(f"| {name} | {r['tokens_per_second']:.1f} | {acc} | {fpt} | {r['speedup_vs_ntp']:.2f}x | {vs_hf} |")
    report = dict(device=info, weights=note, max_new_tokens=n, prompts=len(prompts), cases=results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
