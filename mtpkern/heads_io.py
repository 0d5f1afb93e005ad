"""MEDUSA heads in and out of other tools' layouts: FasterDecoding/Medusa (which TGI reads as it
is), vLLM and TensorRT-LLM.

Our MEDUSA head is the paper's and Medusa's own (``x + SiLU(W x + b)`` per layer, then an
unembedding: the base's, shared, or the head's own with ``--medusa-proj``), so the tensors map one
to one and only their names and the config differ:

=========  ==========================================================  ===============================
format     weights                                                     config.json
=========  ==========================================================  ===============================
medusa     ``medusa_lm_head.safetensors`` (or ``.pt``):                ``medusa_num_heads``,
           ``{h}.{l}.linear.weight|bias``, ``{h}.{L}.weight``          ``medusa_num_layers``,
                                                                       ``base_model_name_or_path``
vllm       ``model.safetensors``: ``blocks.{h}.layers.{l}.weight|bias``  ``model_type`` "medusa",
           and ``lm_heads.{h}.weight`` (only ``lm_heads.0`` when shared) ``num_heads``, ``original_lm_head``
trtllm     the medusa layout (what ``convert_checkpoint.py --medusa_model_dir`` reads)
=========  ==========================================================  ===============================

h counts MEDUSA heads from 0 (our head h + 1; ``n_heads`` counts the next-token head too), L is
the number of residual layers. The layouts followed, read in the targets' public source:

- FasterDecoding/Medusa ``medusa/model/medusa_model.py``: ``MedusaModelABC.__init__`` (the
  ``medusa_head`` ModuleList of ``nn.Sequential(*[ResBlock] * L, nn.Linear(hidden, vocab,
  bias=False))``) and ``MedusaConfig`` (``medusa_num_heads``, ``medusa_num_layers``,
  ``base_model_name_or_path``).
- vLLM ``vllm/model_executor/models/medusa.py``: ``ResidualBlock.__init__`` (``layers``, bias
  from ``medusa_fc_bias``), ``Medusa.__init__`` (``blocks``, ``lm_heads``, ``original_lm_head``)
  and ``Medusa.load_weights`` (``lm_heads.0.weight`` is the one LM head when
  ``original_lm_head``; a ``medusa_heads.`` prefix is dropped); ``vllm/transformers_utils/
  configs/medusa.py``: ``MedusaConfig.__init__``.
- TensorRT-LLM ``examples/medusa/convert_checkpoint.py``: ``parse_arguments``
  (``--medusa_model_dir``, ``--num_medusa_heads`` default 4) and
  ``tensorrt_llm/models/medusa/weight.py``: ``load_medusa_hf`` (``medusa_lm_head.pt``, else
  ``medusa_lm_head.safetensors``, keys ``{h}.{l}.linear.weight|bias`` and ``{h}.{L}.weight``).

- TGI (text-generation-inference) ``server/text_generation_server/models/__init__.py``:
  ``get_model`` (a ``config.json`` with ``medusa_num_heads`` is a head folder: the model served is
  its ``base_model_name_or_path``, ``medusa_num_heads`` the default and the bound of
  ``--speculate``, and the weights are ``medusa_lm_head.safetensors``, never ``.pt``);
  ``layers/medusa.py``: ``MedusaHeadV1.load``, ``MedusaHead.__init__`` and ``ResBlock.__init__``
  (head i: ``{i}.{l}.linear`` weight and bias per layer, then ``{i}.{L}`` without a bias: the
  medusa layout, so no ``tgi`` format); ``layers/speculative.py``: ``SpeculativeHead.load`` (a head
  config with an ``architectures`` field other than its MLP speculator's loads no heads at all, so
  the medusa layout's config has none).

vLLM, TensorRT-LLM and TGI cannot run here: the tests check the layouts as those loaders define
them. The base an export writes is in transformers' layout when ``export_heads`` is given
``convert_base`` (``mtpkern export`` gives ``mtpkern.to_hf``): the serving tools read that.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, cast

import torch

from mtpkern.checkpoint import CheckpointError, atomic_directory
from mtpkern.config import CONFIG_NAME
from mtpkern.layers import MedusaHead, ResBlock
from mtpkern.models import GPT2, MedusaModel, SpeculativeLM
from mtpkern.tree import Tree

FORMATS = ("medusa", "vllm", "trtllm")
MEDUSA_WEIGHTS = "medusa_lm_head.safetensors"
MEDUSA_WEIGHTS_PT = "medusa_lm_head.pt"
VLLM_WEIGHTS = "model.safetensors"
MARK_NAME = ".mtpkern-export"  # our mark: an output folder holding it is ours to replace
README_NAME = "README.md"
BASE_DIR = "base"  # where an export writes the base when no ``base`` name is given


class HeadsError(CheckpointError, ValueError):
    """A head directory or an export request we cannot honour (a ``CheckpointError`` and a
    ``ValueError``): one line naming the problem and the file."""


def is_head_dir(raw: dict) -> bool:
    """Whether a ``config.json`` (parsed) is a MEDUSA head directory's: FasterDecoding's
    (``medusa_num_heads``) or vLLM's (``model_type`` "medusa")."""
    return "medusa_num_heads" in raw or raw.get("model_type") == "medusa"


# ----------------------------------------------------------------------------- import


def read_heads(path: Path, raw: dict, *, load_base: Callable[[str], SpeculativeLM], base=None) -> MedusaModel:
    """The MedusaModel of the head directory ``path`` (its ``config.json`` parsed as ``raw``) on
    the base ``base``, else the config's ``base_model_name_or_path`` (relative to ``path`` when
    it names a folder there), loaded by ``load_base``. The weights' head count wins over the
    config's (FasterDecoding/Medusa #114: a warning, once)."""
    vllm = raw.get("model_type") == "medusa" and "medusa_num_heads" not in raw
    state, source = _read_state(path, vllm)
    layers = _int_field(raw, "num_hidden_layers" if vllm else "medusa_num_layers", path, default=1)
    blocks, unembeds = (_split_vllm if vllm else _split_medusa)(state, layers, raw, source)
    declared = raw.get("num_heads" if vllm else "medusa_num_heads")
    if declared != len(blocks):
        warnings.warn(f"{path / CONFIG_NAME} names {declared} MEDUSA heads but {source.name} holds {len(blocks)}: "
                      f"using the weights' {len(blocks)} (see FasterDecoding/Medusa #114)", stacklevel=3)
    base_model = load_base(_base_name(path, raw, base))
    if not isinstance(base_model, GPT2):
        raise HeadsError(f"{path}: the base {_base_name(path, raw, base)!r} holds a {type(base_model).__name__}, "
                         "not a base model (GPT2 or Llama)")
    _check_fits(base_model, blocks, unembeds, source)
    shared = all(u is None or torch.equal(u, base_model.unembed_weight.detach().cpu()) for u in unembeds)
    model = MedusaModel.from_base(base_model, n_heads=len(blocks) + 1, n_layers=layers, proj=not shared)
    _fill(model, blocks, None if shared else unembeds)
    return model


def _read_state(path: Path, vllm: bool) -> tuple[dict, Path]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    names = [VLLM_WEIGHTS] if vllm else [MEDUSA_WEIGHTS, MEDUSA_WEIGHTS_PT]
    found = [path / n for n in names if (path / n).is_file()]
    if not found:
        raise HeadsError(f"{path} holds no MEDUSA head weights: expected {' or '.join(names)}")
    f = found[0]
    try:
        state = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu",
                                                                                 weights_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise HeadsError(f"{f} is corrupt or truncated: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if not isinstance(state, dict):
        raise HeadsError(f"{f} must hold a dict of tensors, got {type(state).__name__}")
    prefix = "medusa_heads." if vllm else "medusa_head."  # a whole model's file keeps the heads under it
    return {k[len(prefix):] if k.startswith(prefix) else k: v.float() for k, v in state.items()}, f


def _int_field(raw: dict, key: str, path: Path, default: int) -> int:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise HeadsError(f"{path / CONFIG_NAME}: the field {key!r} must be an int >= 1, got {v!r}")
    return v


def _heads_in(state: dict, pattern: str) -> int:
    found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _check_names(state: dict, want: set, n: int, source: Path) -> None:
    missing, extra = sorted(want - set(state)), sorted(set(state) - want)
    if missing or extra:
        parts = ([f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}"] if missing else []) + \
                ([f"extra {extra[:4]}{' ...' if len(extra) > 4 else ''}"] if extra else [])
        raise HeadsError(f"{source} does not hold the MEDUSA heads its config names: " + ", ".join(parts))
    if n == 0:
        raise HeadsError(f"{source} holds no MEDUSA head")


def _blocks(state: dict, n: int, layers: int, prefix: Callable[[int, int], str]) -> tuple[set, Callable[[], list]]:
    """The names of n heads' residual layers (``prefix(h, l)`` + "weight" / "bias"), and a reader
    of them: per head, its layers' (weight, bias)."""
    names = {prefix(h, l) + p for h in range(n) for l in range(layers) for p in ("weight", "bias")}
    return names, lambda: [[(state[prefix(h, l) + "weight"], state[prefix(h, l) + "bias"]) for l in range(layers)]
                           for h in range(n)]


def _split_medusa(state: dict, layers: int, raw: dict, source: Path):
    """FasterDecoding's ``{h}.{l}.linear.weight|bias`` and ``{h}.{L}.weight``: per head, its
    layers' (weight, bias) and its unembedding."""
    n = _heads_in(state, r"(\d+)\.")
    names, read = _blocks(state, n, layers, lambda h, l: f"{h}.{l}.linear.")
    _check_names(state, names | {f"{h}.{layers}.weight" for h in range(n)}, n, source)
    return read(), [state[f"{h}.{layers}.weight"] for h in range(n)]


def _split_vllm(state: dict, layers: int, raw: dict, source: Path):
    """vLLM's ``blocks.{h}.layers.{l}.weight|bias`` and ``lm_heads.{h}.weight`` (with
    ``original_lm_head``, ``lm_heads.0.weight`` alone is read: the one LM head of every head)."""
    if raw.get("medusa_fc_bias", False) is not True:
        raise HeadsError(f"{source.parent / CONFIG_NAME}: 'medusa_fc_bias' must be true (our heads' layers "
                         "have a bias)")
    truncated = raw.get("truncated_vocab_size")
    if truncated is not None and truncated != raw.get("vocab_size"):
        raise HeadsError(f"{source.parent / CONFIG_NAME}: a truncated vocabulary ({truncated} of "
                         f"{raw.get('vocab_size')}, vLLM's token_map) is not supported")
    n = _heads_in(state, r"blocks\.(\d+)\.")
    shared = raw.get("original_lm_head", False) is True
    names, read = _blocks(state, n, layers, lambda h, l: f"blocks.{h}.layers.{l}.")
    heads = {"lm_heads.0.weight"} if shared else {f"lm_heads.{h}.weight" for h in range(n)}
    ignored = {f"lm_heads.{h}.weight" for h in range(1, n)} & set(state) if shared else set()  # vLLM skips them
    _check_names(state, names | heads | ignored, n, source)
    return read(), [state["lm_heads.0.weight" if shared else f"lm_heads.{h}.weight"] for h in range(n)]


def _base_name(path: Path, raw: dict, base) -> str:
    name = os.fspath(base) if isinstance(base, os.PathLike) else base if base is not None \
        else raw.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise HeadsError(f"{path / CONFIG_NAME} names no base model ('base_model_name_or_path'): pass --base / base=")
    if base is None and not Path(name).is_absolute() and (path / name).is_dir():
        return str(path / name)  # an export of ours carries its base beside the heads
    return name


def _check_fits(base: GPT2, blocks: list, unembeds: list, source: Path) -> None:
    d, v = base.config.n_embd, base.config.vocab_size
    for h, layers in enumerate(blocks):
        for l, (w, b) in enumerate(layers):
            if tuple(w.shape) != (d, d) or tuple(b.shape) != (d,):
                raise HeadsError(f"{source}: head {h} layer {l} is {tuple(w.shape)} + {tuple(b.shape)}, but the base's "
                                 f"hidden size is {d}")
    for h, u in enumerate(unembeds):
        if u is not None and tuple(u.shape) != (v, d):
            raise HeadsError(f"{source}: head {h}'s unembedding is {tuple(u.shape)}, but the base's vocabulary x "
                             f"hidden size is {(v, d)}")


@torch.no_grad()
def _fill(model: MedusaModel, blocks: list, unembeds: list | None) -> None:
    for h, head in enumerate(cast("list[MedusaHead]", list(model.medusa))):
        for l, (w, b) in enumerate(blocks[h]):
            lin = cast(ResBlock, head.blocks[l]).linear
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        if unembeds is not None and head.proj is not None:
            head.proj.weight.copy_(unembeds[h])


# ----------------------------------------------------------------------------- export


def head_tensors(model: MedusaModel) -> tuple[list, list | None]:
    """Per MEDUSA head, its layers' (weight, bias), and its own unembeddings (None: shared)."""
    heads = cast("list[MedusaHead]", list(model.medusa))
    blocks = [[(cast(ResBlock, blk).linear.weight, cast(ResBlock, blk).linear.bias) for blk in head.blocks]
              for head in heads]
    own = [head.proj.weight for head in heads if head.proj is not None]
    return blocks, (own if own else None)


def export_heads(model: SpeculativeLM, fmt: str, out, *, base: str | None = None, tokenizer=None,
                 tree: Tree | None = None, command: str | None = None, convert_base=None) -> Path:
    """Write ``model``'s MEDUSA heads into ``out`` in format ``fmt`` (``FORMATS``), with a README
    naming the command that serves them; returns ``out``. ``base``: the name or path the config
    gives as the base; None writes the base itself under ``out/base``: in transformers' layout,
    which the serving tools read, when ``convert_base`` (``mtpkern.to_hf``, as ``mtpkern export``
    passes it) turns it into a transformers model, else as mtpkern's own checkpoint (which only
    mtpkern reads). ``tokenizer``: written beside the heads (and the base).
    ``tree``: the calibrated auto tree, shown as TensorRT-LLM's ``--medusa_choices``. ``out``
    is replaced atomically, and only when it is new, empty or an export of ours (its mark)."""
    model = check_exportable(model, fmt)
    out = Path(out)
    check_out(out)
    blocks, own = head_tensors(model)
    with atomic_directory(out) as tmp:
        if fmt == "vllm":
            _write_vllm(tmp, model, blocks, own, base or BASE_DIR)
        else:
            _write_medusa(tmp, model, blocks, own, base or BASE_DIR)
        if base is None:
            _write_base(tmp / BASE_DIR, model, tokenizer, convert_base)
        if tokenizer is not None:  # beside the heads too: mtpkern's commands read a model's tokenizer there
            tokenizer.save_pretrained(tmp)
        (tmp / README_NAME).write_text(serving_readme(fmt, model, out, base, tree, command), encoding="utf-8")
        (tmp / MARK_NAME).write_text(f"written by mtpkern export --format {fmt}\n", encoding="utf-8")
        calibration = getattr(model, "calibration", None)
        if calibration is not None and _reimports_alike(model, own):  # the imported heads keep their auto tree
            calibration.save(tmp)
    return out


def _write_base(directory: Path, model: MedusaModel, tokenizer, convert_base) -> None:
    directory.mkdir()
    if convert_base is None:
        model.base.write_files(directory, tokenizer)
        return
    convert_base(model.base).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _reimports_alike(model: MedusaModel, own: list | None) -> bool:
    """Whether ``read_heads`` gives these heads back with the same parameters (and so the same
    calibration fingerprint): own unembeddings that all equal the base's come back shared."""
    base = model.unembed_weight
    return own is None or any(not torch.equal(u, base) for u in own)


def check_exportable(model: SpeculativeLM, fmt: str) -> MedusaModel:
    """``model`` when ``fmt`` is a format we write and the model has MEDUSA heads, else a HeadsError."""
    if fmt not in FORMATS:
        raise HeadsError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not isinstance(model, MedusaModel):
        raise HeadsError(f"--format {fmt} exports MEDUSA heads; this model's class is {type(model).__name__} (its "
                         "next-token model exports with mtpkern.to_hf)")
    return model


def check_out(out: Path) -> None:
    """Refuse an output folder that holds files we did not write (it lacks our mark)."""
    if out.exists() and not out.is_dir():
        raise HeadsError(f"--out {str(out)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARK_NAME).is_file():
        held = sorted(p.name for p in out.iterdir())
        raise HeadsError(f"--out {str(out)!r} holds files mtpkern export did not write ({', '.join(held[:3])}"
                         f"{' ...' if len(held) > 3 else ''}): choose an empty or new folder")


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _write_config(tmp: Path, config: dict) -> None:
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _write_medusa(tmp: Path, model: MedusaModel, blocks: list, own: list | None, base: str) -> None:
    """FasterDecoding's layout, which TensorRT-LLM's ``load_medusa_hf`` reads too: every head
    carries an unembedding (a shared one is written once per head)."""
    from safetensors.torch import save_file

    L = model.config.medusa_layers
    state = {}
    for h, layers in enumerate(blocks):
        for l, (w, b) in enumerate(layers):
            state[f"{h}.{l}.linear.weight"], state[f"{h}.{l}.linear.bias"] = _cpu(w), _cpu(b)
        state[f"{h}.{L}.weight"] = _cpu(own[h] if own is not None else model.unembed_weight)
    save_file(state, str(tmp / MEDUSA_WEIGHTS), metadata={"format": "pt"})
    config = {"medusa_num_heads": len(blocks), "medusa_num_layers": L, "base_model_name_or_path": base,
              "hidden_size": model.config.n_embd, "vocab_size": model.config.vocab_size}
    _write_config(tmp, config)


def _write_vllm(tmp: Path, model: MedusaModel, blocks: list, own: list | None, base: str) -> None:
    """vLLM's layout (``Medusa.__init__`` / ``load_weights``): a shared unembedding is
    ``original_lm_head`` with ``lm_heads.0.weight`` alone. ``base_model_name_or_path`` is ours
    (vLLM keeps an unknown field as an attribute): where mtpkern finds the base again."""
    from safetensors.torch import save_file

    state = {}
    for h, layers in enumerate(blocks):
        for l, (w, b) in enumerate(layers):
            state[f"blocks.{h}.layers.{l}.weight"], state[f"blocks.{h}.layers.{l}.bias"] = _cpu(w), _cpu(b)
    for h, u in enumerate(own if own is not None else [model.unembed_weight]):
        state[f"lm_heads.{h}.weight"] = _cpu(u)
    save_file(state, str(tmp / VLLM_WEIGHTS), metadata={"format": "pt"})
    c = model.config
    config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": c.n_embd,
              "vocab_size": c.vocab_size, "num_heads": len(blocks), "num_hidden_layers": c.medusa_layers,
              "truncated_vocab_size": c.vocab_size, "original_lm_head": own is None, "medusa_fc_bias": True,
              "torch_dtype": str(model.dtype).removeprefix("torch."), "base_model_name_or_path": base}
    _write_config(tmp, config)


def medusa_choices(tree: Tree | None) -> str | None:
    """A tree as TensorRT-LLM's / Medusa's ``--medusa_choices`` text, or None."""
    return None if tree is None else json.dumps([list(p) for p in tree.choices]).replace(" ", "")


def serving_readme(fmt: str, model: MedusaModel, out: Path, named: str | None, tree: Tree | None,
                   command: str | None) -> str:
    """The export's README: what it holds and the command that serves it. ``named``: the base the
    config names, None where the export writes it under ``out/base``."""
    n = model.n_heads - 1
    base = named or str(out / BASE_DIR)
    lines = [f"# MEDUSA heads ({fmt} layout), written by mtpkern", "",
             f"{n} MEDUSA heads of {model.config.medusa_layers} residual layer(s) on the base `{base}`"
             f" ({'own' if model.config.medusa_proj else 'shared'} unembedding).", ""]
    if command:
        lines += [f"Written by: `{command}`", ""]
    if fmt == "vllm":
        spec = json.dumps({"method": "medusa", "model": str(out), "num_speculative_tokens": n})
        lines += ["Serve with vLLM (not run by mtpkern: vLLM cannot run where it was written):", "", "```",
                  f"vllm serve {base} --speculative-config '{spec}'", "```"]
    elif fmt == "trtllm":
        lines += _trtllm_lines(model, out, base, tree)
    else:
        lines += ["Load with FasterDecoding/Medusa (`MedusaModel.from_pretrained` on this folder; its code builds "
                  "Llama- and Mistral-family bases), or back into mtpkern: "
                  f"`mtpkern generate {out} --prompt '...' --strategy medusa`.", ""] + _tgi_lines(n, out, named)
    return "\n".join(lines) + "\n"


def _trtllm_lines(model: MedusaModel, out: Path, base: str, tree: Tree | None) -> list[str]:
    n, choices = model.n_heads - 1, medusa_choices(tree)
    return ["Convert and serve with TensorRT-LLM (not run by mtpkern), from its `examples/medusa`:", "", "```",
            f"python convert_checkpoint.py --model_dir {base} --medusa_model_dir {out} --output_dir tllm_ckpt "
            f"--dtype float16 --num_medusa_heads {n} --num_medusa_layers {model.config.medusa_layers}",
            "trtllm-build --checkpoint_dir tllm_ckpt --output_dir engine --speculative_decoding_mode medusa",
            f"python ../run.py --engine_dir engine --tokenizer_dir {base} "
            f"--medusa_choices=\"{choices or '<your tree>'}\" --input_text 'Hello'", "```", "",
            "`--medusa_choices`: " + ("the model's calibrated `auto` tree (mtpkern.autotree)." if choices else
                                      "this model has no calibration, so no `auto` tree: run `mtpkern calibrate` "
                                      "and export again, or give your own."),
            "TensorRT-LLM's example converts Llama-family bases; it does not take a GPT-2 base."]


def _tgi_lines(n: int, out: Path, named: str | None) -> list[str]:
    """TGI reads this layout as it is (see the module docstring): the folder is the model id, the
    base its config's ``base_model_name_or_path``, looked up from where TGI runs."""
    if named is None:
        where, launch = (f"the base is `{BASE_DIR}/` here, which TGI finds from the folder it runs in",
                         f"cd {out} && text-generation-launcher --model-id . --speculate {n}")
    else:
        where, launch = (f"the base is `{named}`, a hub name or a path as TGI sees it",
                         f"text-generation-launcher --model-id {out} --speculate {n}")
    return ["Serve with TGI (text-generation-inference; not run by mtpkern), which reads this layout as it is "
            f"and serves GPT-2 and Llama-family bases ({where}; `--speculate` at most {n}):", "", "```", launch,
            "```"]


def _head_config(name_or_dir) -> dict | None:
    """The parsed ``config.json`` of a MEDUSA head directory, None for anything else."""
    try:
        raw = json.loads((Path(name_or_dir) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) and is_head_dir(raw) else None


def is_head_directory(name_or_dir) -> bool:
    """Whether ``name_or_dir`` is a MEDUSA head directory (FasterDecoding's or vLLM's layout)."""
    return _head_config(name_or_dir) is not None


def check_base_use(models, base) -> None:
    """A ``base`` (``--base``) given where none of ``models`` is a MEDUSA head directory, whose
    base it names, is a one-line HeadsError: it would be ignored."""
    if base is not None and not any(is_head_directory(m) for m in models):
        names = ", ".join(str(m) for m in models)
        raise HeadsError(f"--base / base= names the base of a MEDUSA head directory (FasterDecoding/Medusa's or "
                         f"vLLM's layout), and {names} {'is' if len(models) == 1 else 'are'} not one")


def tokenizer_source(name_or_dir, base=None):
    """Where the tokenizer of a model argument lives: a MEDUSA head directory's base (``base``,
    else its config's), anything else itself."""
    raw = _head_config(name_or_dir)
    return name_or_dir if raw is None else _base_name(Path(name_or_dir), raw, base)
