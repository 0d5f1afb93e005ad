"""mtpkern: train GPT-2 models that predict several tokens per pass, decode with them, compare them.

Bad arguments and bad inputs end with a one-line error and exit status 2, never a traceback
(set ``MTPKERN_DEBUG=1`` to see one); warnings are one line each too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before the tokenizers library loads

# Every command's module at the top. `mtpkern --help` pays for them, but they are about 25 ms of
# its 2-3 s on a 2-core CPU (python -X importtime); the rest is torch and the kernels, which
# `import mtpkern` loads for every command anyway. So no command imports lazily.
import torch  # noqa: E402

from mtpkern.bench import run_bench  # noqa: E402
from mtpkern.calibrate import calibrate_checkpoint, format_report  # noqa: E402
from mtpkern.checkpoint import CheckpointError, check_report_path, write_text_atomic  # noqa: E402
from mtpkern.commands import train_and_calibrate  # noqa: E402
from mtpkern.autotree import auto_tree, has_calibration  # noqa: E402
from mtpkern.data import DataError, chat_prompt_ids, format_prompt, load_tokenizer, require_chat_template  # noqa: E402
from mtpkern.demo import run_demo  # noqa: E402
from mtpkern.distill import distill  # noqa: E402
from mtpkern.eval import evaluate  # noqa: E402
from mtpkern.generation import generate  # noqa: E402
from mtpkern.heads_io import (  # noqa: E402
    FORMATS,
    check_base_use,
    check_exportable,
    check_out,
    export_heads,
    tokenizer_source,
)
from mtpkern.hf_io import load_model, to_hf  # noqa: E402
from mtpkern.options import ACCEPTANCE, KERNELS, STRATEGIES, DecodeOptions  # noqa: E402
from mtpkern.runtime import resolve_device, resolve_dtype  # noqa: E402
from mtpkern.train import TrainConfig  # noqa: E402
from mtpkern.tree import Tree  # noqa: E402

DTYPES = ("fp32", "fp16", "bf16")
DTYPE_HELP = "the weights' dtype; default: fp16 on CUDA, fp32 on the CPU (every command alike)"


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
    """``--batch``, in every command: the batch size(s) of batched decoding, one (``16``) or
    comma-separated (``1,4,16``), or ``none``; sorted, without repeats."""
    if text.strip().lower() == "none":
        return ()
    try:
        sizes = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes such as 16 or 1,4,16 (or none), got {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected batch sizes such as 16 or 1,4,16 (or none), got {text!r}")
    if sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {sizes[0]} (batch sizes such as 16 or "
                                         f"1,4,16, or none): {text!r}")
    return sizes


def _device(text: str) -> str:
    if text not in ("auto", "cpu", "cuda") and not text.startswith("cuda:"):
        raise argparse.ArgumentTypeError(f"device must be auto, cpu or cuda[:N], got {text!r}")
    return text


def parse_tree(text: str):
    """``--tree``: ``auto``, ``dynamic`` / ``dynamic:N`` (kept as text for the decoder), or a
    tree spec for ``Tree.parse`` (``mc_sim_7b_63``, ``chain:N``, widths ``4,2,2``)."""
    spec = text.strip().lower()
    if spec in ("auto", "dynamic") or spec.startswith("dynamic:"):
        return spec
    return Tree.parse(text)


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
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
                    trunk_lr_ratio=args.trunk_lr_ratio, head_warmup=args.head_warmup,
                    backbone_loss=args.backbone_loss, teacher=args.teacher)
    kw.update({k: v for k, v in optional.items() if v is not None})
    if args.steps is None and args.epochs is None:
        kw.pop("steps")
        kw.pop("epochs")
    result = train_and_calibrate(TrainConfig(**kw))  # MTP and MEDUSA runs end by calibrating their heads
    print(f"checkpoint: {result.checkpoint}")
    if result.signal is not None:  # the checkpoint is written; schedulers still see the interruption
        name = signal.Signals(result.signal).name
        print(f"mtpkern train: stopped by {name} at step {result.steps}; continue with --resume", file=sys.stderr)
        return 128 + result.signal
    return 0


def cmd_distill(args) -> int:
    if len(args.batch) != 1:
        raise ValueError(f"--batch: distill decodes at one batch size, got {','.join(map(str, args.batch)) or 'none'}")
    r = distill(args.model, args.data, args.out, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, seed=args.seed, limit=args.data_limit, device=args.device, dtype=args.dtype,
                progress=not args.no_progress, batch=args.batch[0])
    print(f"{r.out}: {r.kept + r.written} records ({r.written} new, {r.kept} kept from an earlier run, "
          f"{r.skipped} prompts skipped: too long for the context) of {r.total} prompts")
    return 0


def cmd_demo(args) -> int:
    run_demo(out=args.out, device=args.device, steps=args.steps, quick=args.quick, overwrite=args.overwrite)
    return 0


def cmd_generate(args) -> int:
    check_base_use([args.model], args.base)  # a MEDUSA head directory's base (mtpkern.heads_io)
    device = resolve_device(args.device)
    model = load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device), base=args.base)
    tokenizer = load_tokenizer(tokenizer_source(args.model, args.base))
    if args.chat:
        require_chat_template(tokenizer, "--chat writes the prompt with it")
        prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        prompt = tokenizer(args.prompt if args.raw else format_prompt(args.prompt))["input_ids"]
    ids = torch.tensor([prompt], device=device)
    options = decode_options(args, model)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    result = generate(model, ids, max_new_tokens=args.max_new_tokens, options=options,
                      eos_token_id=tokenizer.eos_token_id, generator=gen)
    strategy = options.strategy
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
    evaluate(
        args.models, data=args.data, json_path=args.json, device=args.device, max_samples=args.max_samples,
        speed_samples=args.speed_samples,
        max_new_tokens=args.max_new_tokens, kernels=args.kernels, hf_baseline=not args.no_hf,
        dtype=args.dtype, cuda_graph=args.cuda_graph, batch_sizes=args.batch, prefix_cache=not args.no_prefix_cache,
        progress=not args.no_progress, base=args.base,
    )
    return 0


def cmd_bench(args) -> int:
    if args.json:
        check_report_path(args.json)  # refused before the work, not after
    run_bench(device=args.device, json_path=args.json, model_dir=args.model, max_new_tokens=args.max_new_tokens,
              prompts=args.prompts, quick=args.quick, hf_static=args.hf_static, batch_sizes=args.batch,
              dtype=args.dtype, progress=not args.no_progress)
    return 0


def cmd_calibrate(args) -> int:
    if args.json:
        check_report_path(args.json)  # refused before the work, not after
    report = calibrate_checkpoint(
        args.model, data=args.data, device=args.device, dtype=args.dtype, max_samples=args.max_samples,
        max_new_tokens=args.max_new_tokens, kernels=args.kernels, cuda_graph=args.cuda_graph,
        max_nodes=args.max_nodes, measure=not args.no_measure, base=args.base, temperatures=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(report, indent=2))
    print(format_report(report))
    return 0


def cmd_export(args) -> int:
    """MEDUSA heads out in another tool's layout (mtpkern.heads_io), with the README that serves them."""
    check_out(Path(args.out))  # refused before the model loads
    model = check_exportable(load_model(args.run, base=args.base), args.format)
    try:
        tokenizer = None if args.base else load_tokenizer(tokenizer_source(args.run))
    except (DataError, OSError) as e:  # none beside the model, or a hub name offline
        warnings.warn(f"the base is written without a tokenizer: {e}")
        tokenizer = None
    tree = auto_tree(model) if has_calibration(model) else None
    command = "mtpkern export " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["export"] else None
    out = export_heads(model, args.format, args.out, base=args.base, tokenizer=tokenizer, tree=tree, command=command,
                       convert_base=to_hf)  # the base in transformers' layout, which the serving tools read
    print(f"wrote {args.format} MEDUSA heads to {out} (see {out / 'README.md'} to serve them)")
    return 0


# ----------------------------------------------------------------------------- parser


def _shared_options() -> dict[str, argparse.ArgumentParser]:
    """The options several commands share, each defined once, as argparse parent parsers: the
    same flag, type, default and help in every command that takes it."""
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", type=_device, default="auto",
                        help="auto (CUDA when available, else the CPU; default), cpu, cuda or cuda:N")
    dtype = argparse.ArgumentParser(add_help=False)
    dtype.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
    engine = argparse.ArgumentParser(add_help=False)
    engine.add_argument("--kernels", choices=KERNELS, default="auto",
                        help="the decoding engine's ops: fused kernels, eager references, or auto (default: fused "
                             "on CUDA)")
    engine.add_argument("--cuda-graph", action="store_true", help="replay decoding steps from CUDA graphs (CUDA only)")
    seed = argparse.ArgumentParser(add_help=False)
    seed.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    progress = argparse.ArgumentParser(add_help=False)
    progress.add_argument("--no-progress", action="store_true", help="no progress bars")
    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--base", default=None,
                      help="the base model (name or directory) of a MEDUSA head directory in FasterDecoding/Medusa's "
                           "or vLLM's layout (default: its config's base_model_name_or_path)")
    return dict(device=device, dtype=dtype, engine=engine, seed=seed, progress=progress, base=base)


def _add_batch(parser: argparse.ArgumentParser, default: tuple[int, ...], what: str) -> None:
    """``--batch``: the batch size(s) of batched decoding in every command (one type, see
    :func:`_batch_sizes`); ``what`` says what the command does with them."""
    shown = ",".join(map(str, default))
    parser.add_argument("--batch", type=_batch_sizes, default=default, metavar="B[,B...]",
                        help=f"batch size(s) of batched decoding: {what} (default {shown})")


def _add_max_new_tokens(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument("--max-new-tokens", type=_positive_int, default=default,
                        help=f"tokens to decode per prompt (default {default})")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mtpkern", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    shared = _shared_options()
    for add in (_add_train, _add_distill, _add_demo, _add_generate, _add_eval, _add_bench, _add_calibrate,
                _add_export):
        add(sub, shared)
    return p


def _add_train(sub, shared: dict) -> None:
    t = sub.add_parser("train", help="train an NTP, MTP, MEDUSA-1 or MEDUSA-2 model",
                       parents=[shared["device"], shared["seed"], shared["progress"]])
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
    t.add_argument("--n-heads", type=_positive_int,
                   help="prediction heads, the next-token head included: --n-heads 3 is 2 draft heads (MTP head "
                        "blocks or MEDUSA heads); default mtp 4, medusa/medusa2 6 (MEDUSA's 5 heads)")
    t.add_argument("--medusa-layers", type=_positive_int)
    t.add_argument("--medusa-proj", action="store_true",
                   help="MEDUSA heads with their own unembedding, initialised from the LM head (default: shared)")
    t.add_argument("--heads-coefficient", type=_positive_float,
                   help="medusa2: lambda in L = backbone loss + lambda * head losses (default 0.2)")
    t.add_argument("--backbone-lr-ratio", type=_positive_float,
                   help="medusa2: backbone learning rate / heads' learning rate (default 0.25)")
    t.add_argument("--trunk-lr-ratio", type=_positive_float,
                   help="mtp: the trunk's (and head 0's) learning rate / the draft heads' (default 1: one rate); "
                        "below 1 to fine-tune a pretrained model, whose draft heads start as copies of its last layer")
    t.add_argument("--head-warmup", type=_non_negative_int,
                   help="medusa2: steps of heads alone before the backbone joins (default 25%% of the run)")
    t.add_argument("--backbone-loss", choices=["ce", "kl"],
                   help="medusa2: the backbone's loss: ce (the labels, default) or kl (KL to the original model)")
    t.add_argument("--teacher", help="medusa2 with --backbone-loss kl: the teacher model (default: --base)")
    t.add_argument("--max-len", type=_positive_int)
    t.add_argument("--eval-every", type=_positive_int)
    t.add_argument("--save-every", type=_positive_int)
    t.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="mixed precision of training (autocast); auto: bf16 where the GPU has it natively, else "
                        "fp16, and fp32 on the CPU")
    t.add_argument("--loss", choices=["fused", "plain"], default="fused",
                   help="head losses by fused linear cross-entropy (no [N, V] logits) or from materialised logits")
    t.add_argument("--grad-checkpointing", action="store_true")
    t.add_argument("--resume", action="store_true",
                   help="continue OUT/checkpoint with the run's saved configuration; only --steps / --epochs "
                        "(to extend it), --eval-every, --save-every and --device may differ, any other flag "
                        "that contradicts the saved run is an error")
    t.set_defaults(func=cmd_train)


def _add_distill(sub, shared: dict) -> None:
    s = sub.add_parser("distill", help="self-distillation: write the model's own responses to the prompts of --data",
                       description="Self-distillation: the model's own responses to the prompts of --data; record i "
                                   "is sampled with --seed + i.",
                       parents=[shared["device"], shared["dtype"], shared["seed"], shared["progress"]])
    s.add_argument("model", help="checkpoint or run directory (with its tokenizer)")
    s.add_argument("--data", required=True, help="synthetic | metamathqa | PATH to .json/.jsonl records with a 'query'")
    s.add_argument("--out", required=True, help="the .jsonl file to write (run again to resume it)")
    s.add_argument("--data-limit", type=_positive_int, help="the first N prompts of --data")
    _add_max_new_tokens(s, 128)
    s.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0: greedy (default); > 0: sampled")
    s.add_argument("--top-p", type=_positive_float, default=1.0)
    _add_batch(s, (16,), "the prompts decoded at once, one size (the output is the same for any)")
    s.set_defaults(func=cmd_distill)


def _add_demo(sub, shared: dict) -> None:
    d = sub.add_parser("demo", help="the offline demo: train NTP, MTP and MEDUSA-1 on synthetic maths and compare",
                       parents=[shared["device"]])
    d.add_argument("--out", default="demo_out")
    d.add_argument("--steps", type=_positive_int, help="training steps of the NTP and MTP models")
    d.add_argument("--quick", action="store_true", help="a much shorter run on the 4-layer tiny shape (smoke test)")
    d.add_argument("--overwrite", action="store_true", help="replace a previous demo run in --out")
    d.set_defaults(func=cmd_demo)


def _add_generate(sub, shared: dict) -> None:
    g = sub.add_parser("generate", help="decode from a checkpoint",
                       parents=[shared["device"], shared["dtype"], shared["engine"], shared["seed"], shared["base"]])
    g.add_argument("model", help="checkpoint, run directory or MEDUSA head directory")
    g.add_argument("--prompt", required=True)
    form = g.add_mutually_exclusive_group()
    form.add_argument("--raw", action="store_true", help="use the prompt as is, without the instruction template")
    form.add_argument("--chat", action="store_true",
                      help="the prompt as a user's turn, written with the tokenizer's own chat template (instead of "
                           "the instruction template)")
    _add_max_new_tokens(g, 128)
    _add_decode_options(g)
    g.set_defaults(func=cmd_generate)


def _add_decode_options(p) -> None:
    """The fields of ``DecodeOptions`` (kernels and cuda_graph come from the engine parent), one
    flag each, named as the fields are."""
    d = DecodeOptions()
    p.add_argument("--strategy", choices=STRATEGIES, help="default: the model's own")
    p.add_argument("--tree", help="auto, dynamic[:N], chain:N, mc_sim_7b_63 or per-depth widths like 4,2,2 "
                                  "(default: auto where the checkpoint is calibrated, else the default tree)")
    p.add_argument("--acceptance", choices=ACCEPTANCE, default=d.acceptance)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=d.top_k, help="sampling: the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="sampling: the nucleus")
    p.add_argument("--typical-epsilon", type=float, default=d.typical_epsilon,
                   help="typical acceptance: accept while p(token) > min(epsilon, alpha * exp(-entropy))")
    p.add_argument("--typical-alpha", type=float, default=d.typical_alpha, help="typical acceptance: see --typical-epsilon")


def decode_options(args, model) -> DecodeOptions:
    """The ``DecodeOptions`` the decoding flags say (the model's own strategy by default)."""
    strategy = args.strategy or {"gpt2": "ntp", "llama": "ntp"}.get(model.config.model_type, model.config.model_type)
    return DecodeOptions(strategy, tree=parse_tree(args.tree) if args.tree is not None else None,
                         acceptance=args.acceptance, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, typical_epsilon=args.typical_epsilon, typical_alpha=args.typical_alpha,
                         kernels=args.kernels, cuda_graph=args.cuda_graph)


def _add_eval(sub, shared: dict) -> None:
    e = sub.add_parser("eval", help="compare checkpoints: quality, speed, memory, training cost",
                       parents=[shared["device"], shared["dtype"], shared["engine"], shared["progress"],
                                shared["base"]])
    e.add_argument("models", nargs="+", help="run, checkpoint or MEDUSA head directories (--base: the head "
                                             "directories' base)")
    e.add_argument("--data", help="validation data when a run does not name its own")
    e.add_argument("--json", help="where to write the JSON report (default ./eval.json); the table goes beside it "
                                  "as .md and the plots into <stem>_plots/, and neither replaces a file that "
                                  "mtpkern eval did not write (nor does the default ./eval.json)")
    e.add_argument("--max-samples", type=_positive_int, default=50,
                   help="held-out prompts for BLEU and answer accuracy (decoded in batches)")
    e.add_argument("--speed-samples", type=_positive_int, default=None,
                   help="the first N of them also decoded one at a time by every strategy, for the speed "
                        "figures (default: all)")
    _add_max_new_tokens(e, 96)
    e.add_argument("--no-hf", action="store_true", help="skip the transformers generate baseline")
    e.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt whole (default: reuse the K/V of what it shares with the previous one)")
    _add_batch(e, (1, 4, 16), "each timed, the largest also decodes the quality prompts; none to skip the timing")
    e.set_defaults(func=cmd_eval)


def _add_bench(sub, shared: dict) -> None:
    b = sub.add_parser("bench", help="end-to-end decode benchmark on the GPT-2 124M shape",
                       parents=[shared["device"], shared["dtype"], shared["progress"]])
    b.add_argument("--json", help="also write the report as JSON")
    b.add_argument("--model", help="a checkpoint to benchmark instead of random weights")
    _add_max_new_tokens(b, 128)
    b.add_argument("--prompts", type=_positive_int, default=5)
    b.add_argument("--quick", action="store_true", help="a small model and few tokens (smoke test)")
    b.add_argument("--hf-static", action="store_true",
                   help="also time transformers with its static cache (slow: it compiles itself)")
    _add_batch(b, (1, 4, 16), "each timed; none to skip")
    b.set_defaults(func=cmd_bench)


def _add_calibrate(sub, shared: dict) -> None:
    c = sub.add_parser("calibrate", help="measure head acceptance and step cost; choose the tree for --tree auto",
                       parents=[shared["device"], shared["dtype"], shared["engine"], shared["seed"], shared["base"]])
    c.add_argument("model", help="run or checkpoint directory of an MTP or MEDUSA model, or a MEDUSA head directory")
    c.add_argument("--data", help="held-out data for a bare checkpoint (a run uses its own validation split)")
    c.add_argument("--max-samples", type=_positive_int, default=32, help="held-out prompts to calibrate on")
    _add_max_new_tokens(c, 64)
    c.add_argument("--max-nodes", type=int, help="largest tree to consider, in draft nodes")
    c.add_argument("--no-measure", action="store_true", help="skip decoding with the chosen tree")
    c.add_argument("--temperature", type=_positive_float, nargs="+", action="extend", default=[],
                   help="also measure sampled drafts (acceptance rejection) at these temperatures (repeatable), "
                        "for --tree auto with --acceptance rejection")
    c.add_argument("--top-k", type=_non_negative_int, default=0, help="with --temperature: top-k sampling (0: all)")
    c.add_argument("--top-p", type=_positive_float, default=1.0, help="with --temperature: the nucleus")
    c.add_argument("--json", help="also write the report as JSON")
    c.set_defaults(func=cmd_calibrate)


def _add_export(sub, shared: dict) -> None:
    x = sub.add_parser("export", help="write a MEDUSA model's heads for FasterDecoding/Medusa, TGI, vLLM or "
                                      "TensorRT-LLM",
                       parents=[shared["base"]],
                       description="Write the heads, a README naming the command that serves them, and the base under "
                                   "OUT/base (in transformers' layout); --format medusa serves TGI too; with --base, the config names that base instead and none is written "
                                   "(docs/heads_export.md).")
    x.add_argument("run", help="MEDUSA checkpoint, run directory or head directory")
    x.add_argument("--format", required=True, choices=FORMATS, help="the layout: " + ", ".join(FORMATS))
    x.add_argument("--out", required=True, help="the folder to write (new, empty, or an earlier export)")
    x.set_defaults(func=cmd_export)


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
