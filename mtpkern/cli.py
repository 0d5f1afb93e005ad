"""mtpkern: train GPT-2 models that predict several tokens per pass, decode with them, compare them.

Bad arguments and bad inputs end with a one-line error and exit status 2, never a traceback
(set ``MTPKERN_DEBUG=1`` to see one); warnings are one line each too.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mtpkern.checkpoint import CheckpointError, check_report_path, write_text_atomic  # noqa: E402  (the package imports it anyway)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus where to find help), not the full usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(cast, ok, what: str):
    """An argparse type: ``cast(text)`` that ``ok`` accepts, else one line saying what was expected."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _number(int, lambda v: v > 0, "a positive integer")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite positive number")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_non_negative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a seed must be from 0 to 2**63 - 1, got {value}")
    return value


def _batch_sizes(text: str) -> tuple[int, ...]:
    """``--batch``: comma-separated batch sizes (``1,4,16``), or ``none``."""
    if text.strip().lower() == "none":
        return ()
    try:
        sizes = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes such as 1,4,16 (or none), got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers >= 1, got {text!r}")
    return sizes


def _device(text: str) -> str:
    if text not in ("auto", "cpu", "cuda") and not text.startswith("cuda:"):
        raise argparse.ArgumentTypeError(f"device must be auto, cpu or cuda[:N], got {text!r}")
    return text


def parse_tree(text: str):
    """``--tree``: ``auto``, ``dynamic`` / ``dynamic:N`` (kept as text for the decoder), or a
    tree spec for ``Tree.parse`` (``mc_sim_7b_63``, ``chain:N``, widths ``4,2,2``)."""
    from mtpkern.tree import Tree

    spec = text.strip().lower()
    if spec in ("auto", "dynamic") or spec.startswith("dynamic:"):
        return spec
    return Tree.parse(text)


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from mtpkern.train import TrainConfig, train

    if args.steps is not None and args.epochs is not None:
        raise ValueError("give either --steps or --epochs, not both")
    kw = dict(
        objective=args.objective, out=args.out, base=args.base, config=args.config, data=args.data,
        data_limit=args.data_limit, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, device=args.device, resume=args.resume, precision=args.precision,
        grad_checkpointing=args.grad_checkpointing, seed=args.seed, progress=not args.no_progress, loss=args.loss,
    )
    optional = dict(lr=args.lr, n_heads=args.n_heads, medusa_layers=args.medusa_layers, max_len=args.max_len,
                    eval_every=args.eval_every, save_every=args.save_every, medusa_proj=args.medusa_proj or None,
                    heads_coefficient=args.heads_coefficient, backbone_lr_ratio=args.backbone_lr_ratio,
                    head_warmup=args.head_warmup, backbone_loss=args.backbone_loss, teacher=args.teacher)
    kw.update({k: v for k, v in optional.items() if v is not None})
    if args.steps is None and args.epochs is None:
        kw.pop("steps")
        kw.pop("epochs")
    result = train(TrainConfig(**kw))
    print(f"checkpoint: {result.checkpoint}")
    if result.signal is not None:  # the checkpoint is written; schedulers still see the interruption
        name = signal.Signals(result.signal).name
        print(f"mtpkern train: stopped by {name} at step {result.steps}; continue with --resume", file=sys.stderr)
        return 128 + result.signal
    return 0


def cmd_distill(args) -> int:
    from mtpkern.distill import distill

    r = distill(args.model, args.data, args.out, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, seed=args.seed, limit=args.data_limit, device=args.device, dtype=args.dtype,
                progress=not args.no_progress, batch=args.batch)
    print(f"{r.out}: {r.kept + r.written} records ({r.written} new, {r.kept} kept from an earlier run, "
          f"{r.skipped} prompts skipped: too long for the context) of {r.total} prompts")
    return 0


def cmd_demo(args) -> int:
    from mtpkern.demo import run_demo

    run_demo(out=args.out, device=args.device, steps=args.steps, quick=args.quick, overwrite=args.overwrite)
    return 0


def cmd_generate(args) -> int:
    import torch

    from mtpkern.data import format_prompt, load_tokenizer
    from mtpkern.generate import generate
    from mtpkern.model import load_model
    from mtpkern.runtime import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    model = load_model(args.model, device=device, dtype=resolve_dtype(args.dtype))
    tokenizer = load_tokenizer(args.model)
    text = args.prompt if args.raw else format_prompt(args.prompt)
    ids = torch.tensor([tokenizer(text)["input_ids"]], device=device)
    strategy = args.strategy or {"gpt2": "ntp"}.get(model.config.model_type, model.config.model_type)
    tree = parse_tree(args.tree) if args.tree is not None else None
    gen = torch.Generator(device=device).manual_seed(args.seed)
    result = generate(
        model, ids, max_new_tokens=args.max_new_tokens, strategy=strategy, temperature=args.temperature,
        top_p=args.top_p, acceptance=args.acceptance, tree=tree, eos_token_id=tokenizer.eos_token_id,
        cuda_graph=args.cuda_graph, kernels=args.kernels, generator=gen,
    )
    assert not isinstance(result, list)  # one prompt [1, T]: one result, not a batch's list
    print(tokenizer.decode(result.tokens, skip_special_tokens=True))
    print(
        f"\n[{strategy}] {len(result.tokens)} tokens in {result.total_time * 1e3:.1f} ms "
        f"({result.tokens_per_second:.1f} tok/s on {device.type}), {result.num_steps} forward passes after "
        f"prefill, mean accepted length {result.mean_accept_length:.2f}",
        file=sys.stderr,
    )
    return 0


def cmd_eval(args) -> int:
    from mtpkern.eval import evaluate

    evaluate(
        args.models, data=args.data, json_path=args.json, device=args.device, max_samples=args.max_samples,
        speed_samples=args.speed_samples,
        max_new_tokens=args.max_new_tokens, kernels=args.kernels, hf_baseline=not args.no_hf,
        dtype=args.dtype, cuda_graph=args.cuda_graph, batch_sizes=args.batch, prefix_cache=not args.no_prefix_cache,
    )
    return 0


def cmd_bench(args) -> int:
    from mtpkern.bench import run_bench

    if args.json:
        check_report_path(args.json)  # refused before the work, not after
    run_bench(device=args.device, json_path=args.json, model_dir=args.model, max_new_tokens=args.max_new_tokens,
              prompts=args.prompts, quick=args.quick, hf_static=args.hf_static, batch_sizes=args.batch)
    return 0


def cmd_calibrate(args) -> int:
    import json

    from mtpkern.calibrate import calibrate_checkpoint, format_report

    if args.json:
        check_report_path(args.json)  # refused before the work, not after
    report = calibrate_checkpoint(
        args.model, data=args.data, device=args.device, dtype=args.dtype, max_samples=args.max_samples,
        max_new_tokens=args.max_new_tokens, kernels=args.kernels, cuda_graph=args.cuda_graph,
        max_nodes=args.max_nodes, measure=not args.no_measure,
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(report, indent=2))
    print(format_report(report))
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mtpkern", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an NTP, MTP, MEDUSA-1 or MEDUSA-2 model")
    t.add_argument("objective", choices=["ntp", "mtp", "medusa", "medusa2"],
                   help="medusa: heads on a frozen --base (MEDUSA-1); medusa2: heads and --base trained together")
    t.add_argument("--out", required=True, help="run directory (checkpoint/, log.jsonl, summary.json)")
    t.add_argument("--base", help="GPT-2 to start from: a Hugging Face name or directory, or an mtpkern checkpoint")
    t.add_argument("--config", choices=["tiny", "demo", "gpt2"], default="tiny",
                   help="model shape when training from scratch: tiny (4x128), demo (6x128), gpt2 (124M)")
    t.add_argument("--data", default="synthetic", help="synthetic | metamathqa | PATH to .json/.jsonl")
    t.add_argument("--data-limit", type=_positive_int)
    t.add_argument("--steps", type=_positive_int)
    t.add_argument("--epochs", type=_positive_float)
    t.add_argument("--batch-size", type=_positive_int, default=16)
    t.add_argument("--grad-accum", type=_positive_int, default=1)
    t.add_argument("--lr", type=_positive_float)
    t.add_argument("--n-heads", type=_positive_int)
    t.add_argument("--medusa-layers", type=_positive_int)
    t.add_argument("--medusa-proj", action="store_true",
                   help="MEDUSA heads with their own unembedding, initialised from the LM head (default: shared)")
    t.add_argument("--heads-coefficient", type=_positive_float,
                   help="medusa2: lambda in L = backbone loss + lambda * head losses (default 0.2)")
    t.add_argument("--backbone-lr-ratio", type=_positive_float,
                   help="medusa2: backbone learning rate / heads' learning rate (default 0.25)")
    t.add_argument("--head-warmup", type=_non_negative_int,
                   help="medusa2: steps of heads alone before the backbone joins (default 25%% of the run)")
    t.add_argument("--backbone-loss", choices=["ce", "kl"],
                   help="medusa2: the backbone's loss: ce (the labels, default) or kl (KL to the original model)")
    t.add_argument("--teacher", help="medusa2 with --backbone-loss kl: the teacher model (default: --base)")
    t.add_argument("--max-len", type=_positive_int)
    t.add_argument("--eval-every", type=_positive_int)
    t.add_argument("--save-every", type=_positive_int)
    t.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    t.add_argument("--loss", choices=["fused", "plain"], default="fused",
                   help="head losses by fused linear cross-entropy (no [N, V] logits) or from materialised logits")
    t.add_argument("--grad-checkpointing", action="store_true")
    t.add_argument("--device", type=_device, default="auto")
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--resume", action="store_true",
                   help="continue OUT/checkpoint with the run's saved configuration; only --steps / --epochs "
                        "(to extend it), --eval-every, --save-every and --device may differ, any other flag "
                        "that contradicts the saved run is an error")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("distill", help="self-distillation: write the model's own responses to the prompts of --data")
    s.add_argument("model", help="checkpoint or run directory (with its tokenizer)")
    s.add_argument("--data", required=True, help="synthetic | metamathqa | PATH to .json/.jsonl records with a 'query'")
    s.add_argument("--out", required=True, help="the .jsonl file to write (run again to resume it)")
    s.add_argument("--data-limit", type=_positive_int, help="the first N prompts of --data")
    s.add_argument("--max-new-tokens", type=_positive_int, default=128)
    s.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0: greedy (default); > 0: sampled")
    s.add_argument("--top-p", type=_positive_float, default=1.0)
    s.add_argument("--seed", type=_seed, default=0, help="record i is sampled with seed + i")
    s.add_argument("--batch", type=_positive_int, default=16,
                   help="prompts decoded at once (batched decoding; the output is the same for any value)")
    s.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA, fp32 on CPU")
    s.add_argument("--device", type=_device, default="auto")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_distill)

    d = sub.add_parser("demo", help="the offline demo: train NTP, MTP and MEDUSA-1 on synthetic maths and compare")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--device", type=_device, default="auto")
    d.add_argument("--steps", type=_positive_int, help="training steps of the NTP and MTP models")
    d.add_argument("--quick", action="store_true", help="a much shorter run on the 4-layer tiny shape (smoke test)")
    d.add_argument("--overwrite", action="store_true", help="replace a previous demo run in --out")
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="decode from a checkpoint")
    g.add_argument("model", help="checkpoint or run directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="use the prompt as is, without the instruction template")
    g.add_argument("--strategy", choices=["ntp", "mtp", "medusa"], help="default: the model's own")
    g.add_argument("--max-new-tokens", type=_positive_int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--acceptance", choices=["greedy", "typical", "rejection"], default="greedy")
    g.add_argument("--tree", help="auto, dynamic[:N], chain:N, mc_sim_7b_63 or per-depth widths like 4,2,2")
    g.add_argument("--kernels", choices=["auto", "eager", "fused"], default="auto")
    g.add_argument("--cuda-graph", action="store_true")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    g.add_argument("--device", type=_device, default="auto")
    g.add_argument("--seed", type=_seed, default=0)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="compare checkpoints: quality, speed, memory, training cost")
    e.add_argument("models", nargs="+", help="run or checkpoint directories")
    e.add_argument("--data", help="validation data when a run does not name its own")
    e.add_argument("--json", help="where to write the JSON report (default ./eval.json); the table goes beside it "
                                  "as .md and the plots into <stem>_plots/, and neither replaces a file that "
                                  "mtpkern eval did not write (nor does the default ./eval.json)")
    e.add_argument("--device", type=_device, default="auto")
    e.add_argument("--max-samples", type=_positive_int, default=50,
                   help="held-out prompts for BLEU and answer accuracy (decoded in batches)")
    e.add_argument("--speed-samples", type=_positive_int, default=None,
                   help="the first N of them also decoded one at a time by every strategy, for the speed "
                        "figures (default: all)")
    e.add_argument("--max-new-tokens", type=_positive_int, default=96)
    e.add_argument("--kernels", choices=["auto", "eager", "fused"], default="auto")
    e.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA, fp32 on CPU")
    e.add_argument("--cuda-graph", action="store_true", help="decode with CUDA graphs (CUDA only)")
    e.add_argument("--no-hf", action="store_true", help="skip the transformers generate baseline")
    e.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt whole (default: reuse the K/V of what it shares with the previous one)")
    e.add_argument("--batch", type=_batch_sizes, default=(1, 4, 16),
                   help="batch sizes to time batched decoding at (default 1,4,16; 'none' to skip)")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="end-to-end decode benchmark on the GPT-2 124M shape")
    b.add_argument("--device", type=_device, default="auto")
    b.add_argument("--json")
    b.add_argument("--model", help="a checkpoint to benchmark instead of random weights")
    b.add_argument("--max-new-tokens", type=_positive_int, default=128)
    b.add_argument("--prompts", type=_positive_int, default=5)
    b.add_argument("--quick", action="store_true", help="a small model and few tokens (smoke test)")
    b.add_argument("--hf-static", action="store_true",
                   help="also time transformers with its static cache (slow: it compiles itself)")
    b.add_argument("--batch", type=_batch_sizes, default=(1, 4, 16),
                   help="batch sizes to time batched decoding at (default 1,4,16; 'none' to skip)")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("calibrate", help="measure head acceptance and step cost; choose the tree for --tree auto")
    c.add_argument("model", help="run or checkpoint directory of an MTP or MEDUSA model")
    c.add_argument("--data", help="held-out data for a bare checkpoint (a run uses its own validation split)")
    c.add_argument("--device", type=_device, default="auto")
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA, fp32 on CPU")
    c.add_argument("--kernels", choices=["auto", "eager", "fused"], default="auto")
    c.add_argument("--cuda-graph", action="store_true", help="time steps replayed from CUDA graphs (CUDA only)")
    c.add_argument("--max-samples", type=_positive_int, default=32, help="held-out prompts to calibrate on")
    c.add_argument("--max-new-tokens", type=_positive_int, default=64)
    c.add_argument("--max-nodes", type=int, help="largest tree to consider, in draft nodes")
    c.add_argument("--no-measure", action="store_true", help="skip decoding with the chosen tree")
    c.add_argument("--json", help="also write the report as JSON")
    c.set_defaults(func=cmd_calibrate)
    return p


def _one_line_warning(command: str):
    """``warnings.showwarning`` for the command line: ``mtpkern CMD: warning: message``, without
    the source line that Python's default format adds."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"mtpkern {command}: warning: {message}", file=file or sys.stderr)

    return show


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("MTPKERN_DEBUG"):
        return args.func(args)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            return args.func(args)
    except KeyboardInterrupt:
        print("mtpkern: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, CheckpointError, OSError, NotImplementedError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mtpkern {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
