"""Self-distillation data: the model's own responses to the prompts of a data source.

Heads trained on text the model did not write learn a distribution it does not follow, and
speculative decoding accepts fewer of their drafts. ``distill`` answers every prompt (the
``query`` of each record) with the model itself and writes the records, in the data schema
(``{"query", "response", "type"}`` plus ``"source_index"``, and ``"reference"``: the source's
own response, where it has one), to a JSONL file that every training objective reads
(``--data FILE.jsonl``). ``mtpkern eval`` scores a run trained on such a file against the
references, not against the model's own answers.

- Greedy (``temperature=0``, the default) or sampled (``temperature``, ``top_p``): record i is
  sampled with its own generator seeded by ``seed + i``, so the output is a function of the
  settings alone, whether or not the run was interrupted.
- ``batch`` prompts at a time (:class:`mtpkern.batch.BatchDecoder`, 16 by default): every row
  is what batch-1 decoding gives that prompt (greedy token for token; sampled rows draw from
  their own generators as batch 1 does), so the output never depends on ``batch``. A prompt
  too close to the end of the context for ``max_new_tokens`` is answered alone, with the room
  it has.
- Resumable: the settings are written beside the output (``FILE.jsonl.distill.json``); run
  the same command again and it keeps the records written (a half-written last line, from a
  killed run, is dropped), then continues after the last one. Other settings for an existing
  output are an error: a file is never half of one run and half of another. The model is
  identified by a fingerprint of its weights (``mtpkern.calibration.fingerprint``: a model
  retrained in place is another model, a copy elsewhere the same one) and the data by its
  prompts, never by how their paths are spelled.
- A tqdm progress bar when tqdm is installed.

Prompts that leave no room in the model's context for one new token are skipped, and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mtpkern.batch import BatchDecoder
from mtpkern.calibration import fingerprint
from mtpkern.data import format_prompt, load_prompts, load_tokenizer
from mtpkern.hf_io import load_model
from mtpkern.runtime import dtype_name, resolve_device, resolve_dtype

SETTINGS_SUFFIX = ".distill.json"
# What identifies a distillation, compared on resume: the model by its weights, the data by its
# prompts (not by how their paths are spelled), and the decoding settings.
COMPARED = ("model_fingerprint", "limit", "seed", "prompts", "max_new_tokens", "temperature", "top_p", "dtype")


@dataclass
class DistillResult:
    out: str
    written: int  # records written by this call
    kept: int  # records already there from an earlier call
    skipped: int  # prompts too long for the model's context
    total: int  # prompts in the source


def distill(model, data, out, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
            seed: int = 0, limit: int | None = None, device: str = "auto", dtype: str | None = None,
            progress: bool = True, batch: int = 16) -> DistillResult:
    """Write ``model``'s responses to the prompts of ``data`` to ``out`` (JSONL; see the module
    docstring). ``model``: a checkpoint or run directory (or Hugging Face GPT-2) with a
    tokenizer. ``data``: "synthetic", "metamathqa" or a .json/.jsonl file of records with a
    ``query`` (a ``response`` is not needed). ``limit``: the first ``limit`` prompts. ``batch``:
    prompts decoded at once (the output is the same for every value).
    Bad input is a ``ValueError`` (or ``DataError`` / ``CheckpointError``) before any decoding."""
    _check_args(max_new_tokens, temperature, top_p, seed, batch)
    out = _output_file(out)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    prompts = load_prompts(data, seed=seed, limit=limit)
    net = load_model(model, device=dev).eval()  # as saved: what its fingerprint reads
    settings = dict(model=str(model), model_fingerprint=fingerprint(net), data=str(data), limit=limit, seed=seed,
                    prompts=_prompts_digest(prompts), max_new_tokens=max_new_tokens, temperature=float(temperature),
                    top_p=float(top_p), dtype=dtype_name(dt))
    tokenizer = load_tokenizer(model)
    kept = _resume(out, settings, prompts)
    net = net.to(dt)
    eos, ctx = tokenizer.eos_token_id, net.config.n_positions
    encoded = tokenizer([format_prompt(r["query"]) for r in prompts], add_special_tokens=False)["input_ids"]
    if all(len(ids) >= ctx for ids in encoded):
        raise ValueError(f"no prompt of {str(data)!r} fits the model's context of {ctx} tokens with room to answer")
    start = kept[-1]["source_index"] + 1 if kept else 0
    # A batch never holds more rows than there are prompts left: its cache is sized by them.
    decoder = BatchDecoder(net, "ntp", max_batch=max(1, min(batch, len(prompts) - start)), temperature=temperature,
                           top_p=top_p)

    def answer(rows: list[int], room: int) -> list[list[int]]:
        gens = [torch.Generator(device=dev).manual_seed(seed + i) for i in rows] if temperature > 0 else None
        results = decoder.generate([encoded[i] for i in rows], max_new_tokens=room, eos_token_id=eos, generator=gens)
        return [r.tokens[:-1] if r.tokens and r.tokens[-1] == eos else r.tokens for r in results]

    written = skipped = 0
    bar = _progress(len(prompts), start, progress)
    with open(out, "a", encoding="utf-8") as f:
        for rows, room in _batches([len(ids) for ids in encoded], start, ctx, max_new_tokens, batch):
            if room < 1:
                skipped += 1
            else:
                for j, tokens in zip(rows, answer(rows, room)):
                    f.write(json.dumps(_record(prompts[j], j, tokenizer.decode(tokens, skip_special_tokens=True)))
                            + "\n")
                f.flush()  # whole records on disk; a half-written last line is dropped on resume
                written += len(rows)
            bar.update(len(rows))
    bar.close()
    return DistillResult(out=str(out), written=written, kept=len(kept), skipped=skipped, total=len(prompts))


def _check_args(max_new_tokens, temperature, top_p, seed, batch) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not _number(temperature) or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not _number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")


def _output_file(out) -> Path:
    out = Path(out)
    if out.suffix != ".jsonl":
        raise ValueError(f"--out {str(out)!r} must name a .jsonl file (one record per line)")
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory, not a .jsonl file")
    return out


def _batches(lengths: list[int], start: int, ctx: int, max_new_tokens: int, batch: int):
    """``(rows, room)`` in prompt order from ``start``, with ``lengths`` the prompts' token counts:
    a prompt that leaves no room in the context (room 0: skipped); one too close to its end for
    ``max_new_tokens``, alone with the room it has; else the next prompts with room for
    ``max_new_tokens``, up to ``batch`` of them."""
    i = start
    while i < len(lengths):
        room = ctx - lengths[i]
        rows = [i]
        if room >= max_new_tokens:
            while len(rows) < batch and rows[-1] + 1 < len(lengths) and ctx - lengths[rows[-1] + 1] >= max_new_tokens:
                rows.append(rows[-1] + 1)
        yield rows, max(0, min(room, max_new_tokens))
        i = rows[-1] + 1


def _record(source: dict, index: int, response: str) -> dict:
    """The distilled record of prompt ``index``: its query, the model's response, and the
    source's own response as the ``reference``, where it has one."""
    line = {"query": source["query"], "response": response, "type": source.get("type", "unknown"),
            "source_index": index}
    if isinstance(source.get("response"), str):
        line["reference"] = source["response"]
    return line


def _resume(out: Path, settings: dict, prompts: list[dict]) -> list[dict]:
    """The records an earlier call with the same settings wrote to ``out`` (the file cut after
    the last whole one), or [] for a new output, whose settings are then written."""
    meta = out.with_name(out.name + SETTINGS_SUFFIX)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(settings, indent=2))
        out.write_text("")
        return []
    if not meta.exists():
        raise ValueError(f"{out} exists but was not written by mtpkern distill (no {meta.name}): "
                         "choose another --out; it is never overwritten")
    try:
        saved = json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta} is not valid JSON ({e.msg})") from None
    _check_settings(out, meta, saved, settings)
    raw = out.read_bytes()
    lines = raw.split(b"\n")
    records: list[dict] = []
    good = 0
    for n, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        if n == len(lines) - 1:  # no newline after it: half-written by a killed run
            print(f"mtpkern distill: {out}: dropped a half-written last line", file=sys.stderr)
            break
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{out}:{n + 1}: not valid JSON: the file was changed by hand") from None
        i = rec.get("source_index") if isinstance(rec, dict) else None
        if (not isinstance(i, int) or i >= len(prompts) or prompts[i]["query"] != rec.get("query")
                or (records and i <= records[-1]["source_index"])):
            raise ValueError(f"{out}:{n + 1}: not the next record of {settings['data']!r} in prompt order: the file was "
                             "changed by hand")
        records.append(rec)
        good += len(line) + 1
    if good < len(raw):
        with open(out, "r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return records


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _prompts_digest(prompts: list[dict]) -> str:
    """What identifies the prompts: a hash of their queries, in order."""
    return hashlib.sha256(json.dumps([r["query"] for r in prompts]).encode()).hexdigest()[:16]


def _check_settings(out: Path, meta: Path, saved, settings: dict) -> None:
    """ValueError, in one line, unless ``out`` was distilled with ``settings`` (see COMPARED)."""
    if not isinstance(saved, dict):
        raise ValueError(f"{meta} is not a distill settings file (expected a JSON object)")
    if "model_fingerprint" not in saved:
        raise ValueError(f"{meta} was written by an older mtpkern distill, which named the model by its path only "
                         f"({saved.get('model')!r}), so its weights cannot be compared: choose another --out, or "
                         f"delete {out.name} and {meta.name} to start again")
    changed = [k for k in COMPARED if saved.get(k) != settings[k]]
    if not changed:
        return
    k = changed[0]
    if k == "model_fingerprint":
        what = f"another model ({saved.get('model')!r} then; the weights of {settings['model']!r} differ)"
    elif k == "prompts":
        what = f"other prompts ({saved.get('data')!r} then, {settings['data']!r} now)"
    else:
        what = f"{k}={saved.get(k)!r}, not {settings[k]!r}"
    raise ValueError(f"{out} was distilled with {what}: resuming needs the same settings (or choose another --out)")


def _progress(total: int, initial: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc="distill", dynamic_ncols=True, file=sys.stderr)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


__all__ = ["distill", "DistillResult"]
