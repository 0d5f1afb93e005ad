"""End-to-end decode benchmark: our engine against ``transformers`` ``generate``, batch 1.

On the GPT-2 124M shape (or a given checkpoint) it times greedy decoding of the same prompts
with every configuration of the engine (:func:`mtpkern.generate.generate`):

* ``ntp/eager`` and ``ntp/cuda_graph`` (CUDA only),
* ``mtp/eager``, ``mtp/fused``, ``medusa/eager``, ``medusa/fused`` (eager reference ops with a
  dense attention mask, or the fused kernels), and their ``+cuda_graph`` variants on CUDA,
* ``hf/dynamic`` and ``hf/static``: ``transformers`` ``generate`` on the same next-token
  weights with its default dynamic cache and with ``cache_implementation="static"``.

Every case decodes exactly ``max_new_tokens`` tokens (no EOS), after a warm-up run (two for
``hf/static``, which compiles itself on its first call), with the device synchronised around
every call. Reported per case, as medians over prompts: tokens/s (new tokens / wall time of
the call, prefill included), the engine's step time (its own synchronised per-step timings),
mean accepted length and target forward passes per token.

The breakdown of one speculative step (forward, verification, cache update) times the
engine's pieces one at a time on the shapes of a real step; see :func:`step_breakdown`.

With random weights (no ``model_dir``) fresh heads copy the base (MTP heads start as its last
block, MEDUSA heads as the identity), so every draft is the base's own next token, and the
accepted length only says how often a random model's greedy output repeats itself. Those
numbers measure the engine: its cost per step, and the ceiling its speculative paths reach
when drafts are accepted. Real acceptance, and real speedups, need trained heads
(``model_dir``).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mtpkern.checkpoint import resolve_checkpoint
from mtpkern.eval import device_info, eval_tree, hf_decoder
from mtpkern.runtime import resolve_device, resolve_dtype, timed

SCHEMA = "mtpkern.bench/1"
MTP_HEADS = 4  # Gloeckle et al.'s n = 4
MEDUSA_HEADS = 4


def bench_models(model_dir=None, *, quick: bool, device, dtype) -> dict:
    """``{"ntp": model, "mtp": model, "medusa": model}`` for the strategies to time.

    Without ``model_dir``: a random GPT-2 (124M shape, or the tiny config when ``quick``)
    with MTP heads and MEDUSA heads built on it. With one: that checkpoint for ``ntp`` and
    its own strategy.
    """
    from mtpkern.model import GPT2, GPT2Config, MedusaModel, MTPModel, load_model

    if model_dir is not None:
        model = load_model(resolve_checkpoint(model_dir)[0], device=device, dtype=dtype).eval()
        kind = model.config.model_type
        return {"ntp": model} if kind == "gpt2" else {"ntp": model, kind: model}
    torch.manual_seed(0)
    cfg = GPT2Config.tiny(vocab_size=512, n_layer=2, bos_token_id=511, eos_token_id=511) if quick else GPT2Config()
    base = GPT2(cfg).to(device=device, dtype=dtype).eval()
    return {"ntp": base, "mtp": MTPModel.from_base(base, n_heads=MTP_HEADS).eval(),
            "medusa": MedusaModel.from_base(base, n_heads=MEDUSA_HEADS).eval()}


def bench_prompts(model, n: int, prompt_len: int, model_dir=None, data: str = "synthetic") -> list[torch.Tensor]:
    """Real prompts (from ``data``, tokenised by the checkpoint's tokenizer) for a trained
    checkpoint, so acceptance is real; seeded random token ids for random weights."""
    ckpt = resolve_checkpoint(model_dir)[0] if model_dir is not None else None
    if ckpt is not None and (ckpt / "tokenizer.json").is_file():
        from mtpkern.data import format_prompt, load_records, load_tokenizer

        tok = load_tokenizer(ckpt)
        records = load_records(data, seed=1, limit=max(n, 1) * 4)
        ids = [tok(format_prompt(r["query"]), add_special_tokens=False)["input_ids"] for r in records]
        return [torch.tensor([i], device=model.device) for i in ids[:n]]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(model.device)
            for _ in range(n)]


def engine_cases(models: dict, device) -> list[tuple[str, object, dict]]:
    """``(name, model, generate kwargs)`` for every engine configuration to time."""
    cuda = device.type == "cuda"
    cases = [("ntp/eager", models["ntp"], dict(strategy="ntp", kernels="eager"))]
    if cuda:
        cases.append(("ntp/cuda_graph", models["ntp"], dict(strategy="ntp", kernels="eager", cuda_graph=True)))
    for strategy in ("mtp", "medusa"):
        if strategy not in models:
            continue
        model = models[strategy]
        kw = dict(strategy=strategy)
        if strategy == "medusa":
            kw["tree"] = eval_tree(model.config.n_heads)
        cases += [(f"{strategy}/eager", model, dict(kw, kernels="eager")),
                  (f"{strategy}/fused", model, dict(kw, kernels="fused"))]
        if cuda:
            cases.append((f"{strategy}/fused+cuda_graph", model, dict(kw, kernels="fused", cuda_graph=True)))
    return cases


def time_case(run, prompts, device, *, warmup: int = 1) -> dict:
    """Median tokens/s and latency of ``run(ids)`` over ``prompts``; engine stats when ``run``
    returns a GenerationResult."""
    for _ in range(warmup):
        run(prompts[0])
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


def _time_us(fn, device, iters: int) -> float:
    """Median microseconds of ``iters`` calls of ``fn()``, each synchronised, after one warm-up."""
    fn()
    return statistics.median(timed(fn, device)[1] for _ in range(iters)) * 1e6


def step_breakdown(model, tree, *, prefix_len: int, kernels: str, iters: int = 20) -> dict:
    """Median microseconds of the parts of one greedy MEDUSA tree step with ``prefix_len``
    cached tokens, each timed alone with the device synchronised around it:

    * ``forward_us``: the tree forward pass (``tree_step``: every node, every head);
    * ``verify_us``: head 0's argmax at every node plus ``verify_greedy`` over the paths;
    * ``cache_update_us``: ``kv_compact_`` of the deepest path into place;
    * ``draft_us``: the next drafts' top-k from the heads at the last accepted node.

    These are the engine's own functions (``mtpkern.generate``) on the shapes of a real step;
    their sum falls short of the measured step time by the engine's host work between them
    (candidate gathering, the one host sync per step, bookkeeping).
    """
    from mtpkern.generate import draft_topk, tree_step
    from mtpkern.ops.fused_logits import fused_logits
    from mtpkern.ops.kv_compact import kv_compact_
    from mtpkern.ops.verify import verify_greedy

    device, fused = model.device, kernels == "fused"
    backend = None if fused else "eager"
    tt = tree.tensors(device)
    T, heads = len(tree), 1 + tree.max_depth
    cache = model.new_cache(1, prefix_len + T)
    tokens = torch.randint(0, model.config.vocab_size, (T,), device=device)
    prefix = torch.tensor(prefix_len, device=device)
    path = tt.paths[-1]  # a deepest path: the most K/V to move
    count = (path >= 0).sum()

    def forward():
        return tree_step(model, cache, tokens, prefix, tt, heads=heads, span=prefix_len + T, fused=fused)

    def verify():
        target = fused_logits(hidden[:, 0], model.head_weight(0), 1, backend=backend).argmax
        return verify_greedy(tokens, target, tt.paths, backend=backend)

    with torch.inference_mode():
        hidden = forward()
        return dict(
            forward_us=_time_us(forward, device, iters),
            verify_us=_time_us(verify, device, iters),
            cache_update_us=_time_us(lambda: kv_compact_(cache.k, cache.v, path, prefix, count, backend=backend),
                                     device, iters),
            draft_us=_time_us(lambda: draft_topk(model, hidden[-1], tree.max_depth, tree.topk, backend),
                              device, iters),
            tree_nodes=T, prefix_len=prefix_len, kernels=kernels,
        )


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
                         f"cached): forward {b['forward_us']:.0f} us, verification {b['verify_us']:.0f} us, "
                         f"cache update {b['cache_update_us']:.0f} us, next drafts {b['draft_us']:.0f} us")
    return "\n".join(lines) + "\n"


def run_bench(device: str = "cuda", json_path=None, model_dir=None, max_new_tokens: int = 128,
              prompts: int = 5, prompt_len: int = 32, quick: bool = False, dtype: str | None = None,
              data: str = "synthetic", progress: bool = True) -> dict:
    """Time every case (module docstring) and return the report; write it as JSON to
    ``json_path`` if given, and print the table.

    ``quick``: a tiny random model (2 layers, 128 wide), for a CPU smoke run. ``dtype``
    default: float16 on CUDA, float32 on CPU. A case that raises is recorded with its error
    and the others still run (one broken kernel must not cost the whole GPU session).
    """
    if max_new_tokens < 1 or prompts < 1 or prompt_len < 1:
        raise ValueError(f"max_new_tokens, prompts and prompt_len must be >= 1, "
                         f"got {max_new_tokens}, {prompts}, {prompt_len}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    from mtpkern.generate import generate

    models = bench_models(model_dir, quick=quick, device=dev, dtype=dt)
    ids = bench_prompts(models["ntp"], prompts, prompt_len, model_dir, data)
    cases = [(name, (lambda x, m=m, kw=kw: generate(m, x, max_new_tokens=max_new_tokens, **kw)), 1)
             for name, m, kw in engine_cases(models, dev)]
    cases += [("hf/dynamic", hf_decoder(models["ntp"], max_new_tokens, None), 1),
              ("hf/static", hf_decoder(models["ntp"], max_new_tokens, None, static_cache=True), 2)]
    results = {}
    with torch.inference_mode():
        for name, run, warmup in tqdm(cases, desc="bench", disable=not progress, file=sys.stderr):
            try:
                results[name] = time_case(run, ids, dev, warmup=warmup)
            except Exception as e:  # noqa: BLE001 - record it and time the remaining cases
                results[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    breakdown = {}
    if "medusa" in models:
        for kernels in ("eager", "fused"):
            try:
                breakdown[kernels] = step_breakdown(models["medusa"], eval_tree(models["medusa"].config.n_heads),
                                                    prefix_len=ids[0].shape[1] + max_new_tokens // 2,
                                                    kernels=kernels, iters=2 if quick else 50)
            except Exception as e:  # noqa: BLE001
                breakdown[kernels] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    weights = ("Trained weights from the given checkpoint: accepted lengths are real." if model_dir else
               "Random weights: the heads copy the base, so accepted lengths reflect how often a random model "
               "repeats itself; this measures the engine (step cost, ceiling), not trained heads.")
    report = dict(schema=SCHEMA, device=device_info(dev, dt), weights=weights,
                  settings=dict(max_new_tokens=max_new_tokens, prompts=prompts, prompt_len=ids[0].shape[1],
                                model=str(model_dir) if model_dir else ("tiny" if quick else "gpt2-124M"),
                                n_params=models["ntp"].num_parameters()),
                  cases=results, step_breakdown=breakdown)
    print(format_bench(report))
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report
