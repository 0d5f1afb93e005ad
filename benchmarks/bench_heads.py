"""Which training makes better MEDUSA heads? Accepted length and per-head top-1 accuracy of
head variants trained with the same steps on the same prompts, on the synthetic corpus.

    python benchmarks/bench_heads.py            # a few minutes on a 2-core CPU
    python benchmarks/bench_heads.py --quick    # under a minute: a smoke test, not a measurement
    python benchmarks/bench_heads.py --json heads.json

Two comparisons, each between variants that differ in one thing only:

1. The objective, on a base trained on the whole corpus: MEDUSA-1 with the shared
   unembedding (``medusa``), MEDUSA-1 with per-head projections (``medusa --medusa-proj``),
   MEDUSA-2 (``medusa2``: the backbone trained too) and MEDUSA-2 with the KL-to-the-original
   backbone loss (``medusa2 --backbone-loss kl``).
2. The data, on a base whose outputs differ from the corpus (trained on half of the problem
   kinds only): MEDUSA-1 heads trained on the corpus vs on the base's own greedy responses to
   the same prompts (``mtpkern distill``).

Every head variant trains for the same number of steps, with the same seed and batch, on the
same prompts (the first ``--head-records`` records of the corpus). They are measured on
held-out problems of every kind (another seed of the generator):

- mean accepted length: greedy MEDUSA decoding through the engine (``mtpkern.eval``'s
  ``decode_prompts``) with one tree for every variant (``eval_tree``: top-4, top-2, top-1),
  tokens per verification step; the tokens are checked against the model's own greedy
  ``ntp`` (lossless);
- top-1 accuracy per head against the corpus' responses (``corpus top-1``) and against the
  model's own greedy responses (``own top-1``: what acceptance depends on), both from
  ``mtpkern.train.evaluate_heads``;
- the next-token perplexity on the corpus' responses (MEDUSA-2 changes the backbone).

Runs on the CPU with one thread (``torch.set_num_threads(1)``), so that ratios hold on a
shared machine; accepted lengths and accuracies do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtpkern.data import SYNTHETIC_KINDS, SFTDataset, collate, format_prompt, load_tokenizer, synthetic_records
from mtpkern.distill import distill
from mtpkern.eval import decode_prompts, decoders_for, eval_tree, speed_summary
from mtpkern.hf_io import load_model
from mtpkern.train import TrainConfig, evaluate_heads, train

N_HEADS = 3
SIZES = {  # full run / --quick
    "corpus": (2000, 400), "base_steps": (300, 40), "head_steps": (150, 20), "head_records": (600, 64),
    "eval_prompts": (24, 6), "max_new_tokens": (48, 24),
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(objective: str, out: Path, *, base, data: Path, steps: int, **kw):
    """One training; every run shares the batch, sequence length, seed and log rhythm."""
    cfg = TrainConfig(objective=objective, out=str(out), base=base, data=str(data), steps=steps, batch_size=16,
                      max_len=128, device="cpu", precision="fp32", seed=0, eval_every=10**9, save_every=10**9,
                      log_every=max(1, steps // 4), progress=False, **kw)
    t0 = time.perf_counter()
    result = train(cfg)
    print(f"  {out.name}: {steps} steps in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return result.checkpoint


def measure(checkpoint: str, eval_records: list[dict], max_new_tokens: int) -> dict:
    """Accepted length (greedy, lossless-checked), per-head top-1 (vs the corpus and vs the
    model's own outputs) and the next-token perplexity of one head model."""
    model = load_model(checkpoint).eval()
    tokenizer = load_tokenizer(checkpoint)
    eos = tokenizer.eos_token_id
    prompts = [torch.tensor([tokenizer(format_prompt(r["query"]), add_special_tokens=False)["input_ids"]])
               for r in eval_records]
    tree = eval_tree(model.n_heads - 1)  # one tree for every variant, not each one's calibrated tree
    runs = decode_prompts(model, prompts, max_new_tokens=max_new_tokens, eos_token_id=eos, hf_baseline=False,
                          progress=False, decoders=decoders_for(model, tree=tree))
    speed = speed_summary(runs, eos)["medusa"]
    own = [dict(r, response=tokenizer.decode([t for t in toks if t != eos], skip_special_tokens=True))
           for r, toks in zip(eval_records, runs["ntp"]["tokens"])]

    def heads(records):
        loader = torch.utils.data.DataLoader(SFTDataset(records, tokenizer, 128), batch_size=16,
                                             collate_fn=lambda b: collate(b, tokenizer.pad_token_id))
        return evaluate_heads(model, loader, torch.device("cpu"))

    corpus, mine = heads(eval_records), heads(own)
    return dict(accept_length=speed["mean_accept_length"], lossless=speed["agrees_with_ntp"],
                corpus_top1=corpus["acc_top1"][1:], own_top1=mine["acc_top1"][1:], ppl=corpus["ppl"],
                tree=runs["medusa"]["tree"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in under a minute")
    p.add_argument("--json", help="also write the results as JSON")
    p.add_argument("--out", help="keep the runs in this directory (default: a temporary one)")
    for name in SIZES:
        p.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {SIZES[name][0]} ({SIZES[name][1]} with --quick)")
    args = p.parse_args(argv)
    size = {k: getattr(args, k) or v[int(args.quick)] for k, v in SIZES.items()}
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        corpus = synthetic_records(size["corpus"], seed=0)
        kinds = sorted(SYNTHETIC_KINDS)[: len(SYNTHETIC_KINDS) // 2]
        all_data = write_jsonl(root / "corpus.jsonl", corpus)
        half_data = write_jsonl(root / "corpus_half.jsonl", [r for r in corpus if r["type"] in kinds])
        head_data = write_jsonl(root / "heads_corpus.jsonl", corpus[: size["head_records"]])
        eval_records = synthetic_records(size["eval_prompts"], seed=12345)  # held out, every kind

        print(f"bases: {size['base_steps']} steps each", file=sys.stderr)
        base_all = run("ntp", root / "base_all", base=None, data=all_data, steps=size["base_steps"])
        base_half = run("ntp", root / "base_half", base=None, data=half_data, steps=size["base_steps"])
        print(f"distilling {size['head_records']} prompts with base_half", file=sys.stderr)
        t = time.perf_counter()
        distilled = distill(base_half, head_data, root / "heads_distilled.jsonl", max_new_tokens=64, device="cpu",
                            progress=False)
        distill_s = time.perf_counter() - t

        heads = dict(steps=size["head_steps"], n_heads=1 + N_HEADS, data=head_data)  # and the next-token head
        variants = {
            "medusa1 shared (base: all kinds)": ("medusa", base_all, {}),
            "medusa1 proj (base: all kinds)": ("medusa", base_all, dict(medusa_proj=True)),
            "medusa2 ce (base: all kinds)": ("medusa2", base_all, {}),
            "medusa2 kl (base: all kinds)": ("medusa2", base_all, dict(backbone_loss="kl")),
            "medusa1 on corpus (base: half the kinds)": ("medusa", base_half, {}),
            "medusa1 on distilled (base: half the kinds)": ("medusa", base_half, dict(data=Path(distilled.out))),
        }
        print(f"head variants: {size['head_steps']} steps each on the same {size['head_records']} prompts",
              file=sys.stderr)
        results = {}
        for i, (name, (objective, base, kw)) in enumerate(variants.items()):
            ckpt = run(objective, root / f"heads_{i}", base=base, **{**heads, **kw})
            results[name] = measure(ckpt, eval_records, size["max_new_tokens"])
        bases = {name: measure_base(ckpt, eval_records)
                 for name, ckpt in (("base: all kinds", base_all), ("base: half the kinds", base_half))}
    report = dict(sizes=size, n_heads=1 + N_HEADS, half_kinds=kinds, distill_seconds=distill_s,
                  distilled_records=distilled.written, seconds=time.perf_counter() - t0,
                  device=f"CPU, {torch.get_num_threads()} thread", variants=results, bases=bases)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def measure_base(checkpoint: str, eval_records: list[dict]) -> dict:
    model, tokenizer = load_model(checkpoint).eval(), load_tokenizer(checkpoint)
    loader = torch.utils.data.DataLoader(SFTDataset(eval_records, tokenizer, 128), batch_size=16,
                                         collate_fn=lambda b: collate(b, tokenizer.pad_token_id))
    m = evaluate_heads(model, loader, torch.device("cpu"))
    return dict(ppl=m["ppl"], top1=m["acc_top1"][0])


def format_report(report: dict) -> str:
    size = report["sizes"]
    lines = [f"bench_heads: {N_HEADS} MEDUSA heads, {size['head_steps']} steps on the same {size['head_records']} "
             f"prompts per variant; bases {size['base_steps']} steps; {size['eval_prompts']} held-out prompts, "
             f"{size['max_new_tokens']} new tokens; {report['device']}; {report['seconds']:.0f} s in all",
             "", "| variant | accepted length | corpus top-1 per head | own top-1 per head | ppl (next token) | lossless |",
             "|---|---|---|---|---|---|"]
    for name, r in report["variants"].items():
        lines.append(f"| {name} | {r['accept_length']:.3f} | {' / '.join(f'{a:.3f}' for a in r['corpus_top1'])} | "
                     f"{' / '.join(f'{a:.3f}' for a in r['own_top1'])} | {r['ppl']:.2f} | {r['lossless']:.0%} |")
    for name, b in report["bases"].items():
        lines.append(f"| {name} (no heads) | 1 | | | {b['ppl']:.2f} | |")
    v = report["variants"]

    def ratio(a, b):
        return f"{v[a]['accept_length'] / v[b]['accept_length']:.3f}x"

    names = list(v)
    lines += ["", f"- {names[1]} vs {names[0]}: accepted length {ratio(names[1], names[0])}",
              f"- {names[2]} vs {names[0]}: {ratio(names[2], names[0])}; {names[3]}: {ratio(names[3], names[0])}",
              f"- distilled vs corpus heads on the half-kinds base: {ratio(names[5], names[4])} "
              f"({report['distilled_records']} distilled records, {report['distill_seconds']:.0f} s)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
