"""Head acceptance, as measured on held-out data: the calibration of a model and its file.

``accept[d][r]`` is the probability that draft head d's rank-r candidate is the model's own
token, given that the path above it was accepted (measured by :func:`mtpkern.calibrate.calibrate`).
It is saved beside the weights as ``calibration.json`` with a fingerprint of the model (type,
heads, vocabulary, layer sizes, a hash of a few weights), so a file from another model is
refused; ``mtpkern.load_model`` attaches it as ``model.calibration``.

``sampling`` holds, per temperature measured (``mtpkern calibrate --temperature T``), the
acceptance of *sampled* drafts under rejection sampling (:func:`mtpkern.calibrate.calibrate_sampling`):
``sampling[key]["accept"][d][i]``: the probability that, below an accepted node, the i-th
child drawn (without replacement) from draft head d + 1 is accepted (which needs its earlier
siblings rejected). A file written before it has none and loads as it did (the field is
optional, the schema unchanged).

The fingerprint's ``n_heads`` is the config's: every head, the next-token head included. A file
of schema ``mtpkern.calibration/1`` (written before /2) counted a MEDUSA model's MEDUSA heads
alone there; it is read as such (its fingerprint gains the next-token head).

A leaf: it needs torch, the checkpoint errors and nothing of the engine.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mtpkern.checkpoint import CheckpointError

CALIBRATION_NAME = "calibration.json"
SCHEMA = "mtpkern.calibration/2"
# Read and converted: /1 is /2 but for a MEDUSA fingerprint's n_heads (its MEDUSA heads only).
OLD_SCHEMAS = ("mtpkern.calibration/1",)
TOPK = 10  # ranks calibrated per head


class CalibrationError(CheckpointError):
    """A calibration file is corrupt or belongs to another model."""


def fingerprint(model) -> dict:
    """What identifies the model a calibration was measured on: its family, heads, vocabulary,
    layer sizes, and a hash of 16 evenly spaced weights of every tensor. The weights are rounded
    to float16 first, so the model in float32 and in float16 has one fingerprint."""
    cfg = model.config
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        # float32 linspace, as the fingerprints already written were made; past 2^24 elements its
        # last index can round up to numel, so it is clamped (smaller tensors keep their indices)
        idx = torch.linspace(0, flat.numel() - 1, min(16, flat.numel())).round().long().clamp_(max=flat.numel() - 1)
        idx = idx.to(flat.device)
        digest.update(name.encode())
        digest.update(flat[idx].to(torch.float16).float().cpu().numpy().tobytes())
    return dict(model_type=cfg.model_type, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, medusa_layers=cfg.medusa_layers,
                weights=digest.hexdigest()[:16])


def _fingerprint_drafts(fp: dict):
    """The draft heads of the model a fingerprint describes (its ``n_heads`` is the config's:
    every head, the next-token head included)."""
    n = fp.get("n_heads")
    return n - 1 if isinstance(n, int) else n


def _all_ints(values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


@dataclass
class Calibration:
    """How often each draft head's rank-r candidate is the model's own token.

    ``counts[d][r]``: positions where draft head d + 1's rank-r candidate was the model's
    own token, out of ``positions[d]`` positions where the path above was reachable (every
    shallower head's token within its top-``topk``). ``accept`` is their ratio.
    """

    fingerprint: dict
    topk: int
    counts: list[list[int]]
    positions: list[int]
    source: dict = field(default_factory=dict)
    # Per prompt, per generated position: the rank of the model's own token in each draft
    # head's top-k, one character per head ("0".."9", "x": not in the top-k, ".": past the end).
    ranks: list[list[str]] = field(default_factory=list)
    # Per temperature (key: ``temperature_key(T)``): {"temperature", "top_k", "top_p", "accept"
    # [depth][child index] (floats), "positions" [depth]}: the acceptance of sampled drafts.
    sampling: dict = field(default_factory=dict)

    @property
    def depth(self) -> int:
        """The number of draft heads calibrated."""
        return len(self.counts)

    @property
    def accept(self) -> list[list[float]]:
        return [[c / n if n else 0.0 for c in row] for row, n in zip(self.counts, self.positions)]

    def summary(self) -> str:
        """One line: top-1 and top-k acceptance per draft head."""
        heads = ", ".join(f"h{d + 1} {row[0]:.2f}/{sum(row):.2f}" for d, row in enumerate(self.accept))
        least = min(self.positions, default=0)
        return f"acceptance top-1/top-{self.topk} per draft head: {heads} ({least}+ positions)"

    def to_dict(self) -> dict:
        return dict(schema=SCHEMA, **asdict(self), accept=self.accept)

    def save(self, directory) -> Path:
        """Write ``directory/calibration.json`` atomically (a temporary file, then a rename)."""
        path = Path(directory) / CALIBRATION_NAME
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, d: dict, where: str = "calibration", model=None) -> Calibration:
        """A calibration from its JSON form, checked field by field; with ``model``, also
        checked against it (:meth:`check`), and its rows of counts against the model's heads.
        Anything wrong is a one-line CalibrationError naming ``where`` and the field."""
        try:
            cal = cls._parse(d)
        except (TypeError, ValueError) as e:
            raise CalibrationError(f"{where} is not a valid calibration: {e}") from None
        if model is not None:
            cal.check(model, where)
        expected = draft_depth(model) if model is not None else _fingerprint_drafts(cal.fingerprint)
        if cal.depth != expected:  # one row of counts per draft head
            whose = "the model has" if model is not None else "its fingerprint is of a model with"
            raise CalibrationError(f"{where} holds acceptance counts for {cal.depth} draft head(s), but {whose} "
                                   f"{expected}; rerun `mtpkern calibrate`")
        try:
            cal._check_shape()
        except ValueError as e:
            raise CalibrationError(f"{where} is not a valid calibration: {e}") from None
        return cal

    @classmethod
    def _parse(cls, d: dict) -> Calibration:
        """The fields of ``d``, each of its kind; ValueError names the first one that is not."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        missing = [k for k in ("schema", "fingerprint", "topk", "counts", "positions") if k not in d]
        if missing:
            raise ValueError(f"the field {missing[0]!r} is missing")
        if d["schema"] != SCHEMA and d["schema"] not in OLD_SCHEMAS:
            raise ValueError(f"schema {d['schema']!r} is not {SCHEMA!r}")
        if not isinstance(d["fingerprint"], dict):
            raise ValueError("the field 'fingerprint' must be an object")
        fp = dict(d["fingerprint"])
        if d["schema"] in OLD_SCHEMAS and fp.get("model_type") == "medusa" and _all_ints([fp.get("n_heads")]):
            fp["n_heads"] += 1  # /1 counted a MEDUSA model's MEDUSA heads, not its next-token head
        topk = d["topk"]
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= 10:
            raise ValueError(f"the field 'topk' must be an int in 1..10 (one character per rank), got {topk!r}")
        counts = d["counts"]
        if not isinstance(counts, list) or not all(isinstance(row, list) and _all_ints(row) for row in counts):
            raise ValueError("the field 'counts' must be a list of lists of ints (one row per draft head)")
        if not isinstance(d["positions"], list) or not _all_ints(d["positions"]):
            raise ValueError("the field 'positions' must be a list of ints (one per draft head)")
        ranks = d.get("ranks", [])
        if not isinstance(ranks, list) or not all(isinstance(p, list) and all(isinstance(r, str) for r in p)
                                                  for p in ranks):
            raise ValueError("the field 'ranks' must be a list of lists of strings (per prompt, per position)")
        source = d.get("source", {})
        if not isinstance(source, dict):
            raise ValueError("the field 'source' must be an object")
        sampling = d.get("sampling", {})
        if not isinstance(sampling, dict) or not all(isinstance(t, dict) for t in sampling.values()):
            raise ValueError("the field 'sampling' must be an object of objects (one per temperature)")
        return cls(fp, topk, [list(row) for row in counts], list(d["positions"]), dict(source),
                   [list(p) for p in ranks], {k: dict(t) for k, t in sampling.items()})

    def _check_shape(self) -> None:
        """ValueError unless counts, positions and ranks agree with each other."""
        if len(self.positions) != self.depth or any(len(row) != self.topk for row in self.counts):
            raise ValueError(f"counts must be {self.depth} rows of topk = {self.topk} ints and positions "
                             f"{self.depth} ints (one per draft head)")
        if any(c < 0 for row in self.counts for c in row) or any(
                sum(row) > n for row, n in zip(self.counts, self.positions)):
            raise ValueError("counts are negative or exceed their positions")
        allowed = set("x.") | {str(r) for r in range(self.topk)}
        bad = next((p for prompt in self.ranks for p in prompt if len(p) != self.depth or not set(p) <= allowed), None)
        if bad is not None:
            raise ValueError(f"ranks must be strings of {self.depth} characters (one per draft head) from "
                             f"{''.join(sorted(allowed))}, got {bad!r}")
        for key, table in self.sampling.items():
            _check_sampling_table(key, table, self.depth, self.topk)

    def add_sampling(self, table: dict) -> None:
        """Store a sampled-draft acceptance table (:func:`mtpkern.calibrate.calibrate_sampling`)
        under its temperature, replacing one measured before at that temperature."""
        _check_sampling_table("new", table, self.depth, self.topk)
        self.sampling[temperature_key(table["temperature"])] = table

    def sampling_table(self, temperature: float) -> dict | None:
        """The sampled-draft table measured at the temperature nearest ``temperature`` (ties to
        the lower one), or None when none was measured."""
        if not self.sampling:
            return None
        return min(self.sampling.values(), key=lambda t: (abs(t["temperature"] - temperature), t["temperature"]))

    def check(self, model, where: str = "calibration") -> None:
        """Raise CalibrationError unless this calibration was measured on ``model``."""
        mine, theirs = fingerprint(model), self.fingerprint
        if theirs.get("n_heads") != mine["n_heads"] or theirs.get("model_type") != mine["model_type"]:
            raise CalibrationError(
                f"{where} was measured on a {theirs.get('model_type')} model with {theirs.get('n_heads')} heads, "
                f"this is a {mine['model_type']} model with {mine['n_heads']}; rerun `mtpkern calibrate`")
        # The weight hash is exact for a model in float32 or float16 (it rounds to float16);
        # bfloat16 rounds differently, so such a model is checked by its shape alone.
        exact = model.dtype in (torch.float32, torch.float16)
        diff = [k for k in mine if theirs.get(k) != mine[k] and (exact or k != "weights")]
        if diff:
            raise CalibrationError(f"{where} was measured on another model ({', '.join(diff)} differ); "
                                   "rerun `mtpkern calibrate`")


def temperature_key(temperature: float) -> str:
    """The key of a temperature's table in ``Calibration.sampling``: ``0.7`` -> ``"0.7"``."""
    return f"{float(temperature):g}"


def _check_sampling_table(key: str, t: dict, depth: int, topk: int) -> None:
    """ValueError unless ``t`` is a sampled-draft table of ``depth`` rows of ``topk``
    probabilities whose rows sum to at most 1 (at most one child of a node is accepted)."""
    where = f"sampling[{key!r}]"
    missing = [k for k in ("temperature", "top_k", "top_p", "accept", "positions") if k not in t]
    if missing:
        raise ValueError(f"{where} lacks the field {missing[0]!r}")
    T = t["temperature"]
    if isinstance(T, bool) or not isinstance(T, (int, float)) or not 0 < T < float("inf"):
        raise ValueError(f"{where}: temperature must be a number > 0, got {T!r}")
    if isinstance(t["top_k"], bool) or not isinstance(t["top_k"], int) or t["top_k"] < 0 or not (
            _probability(t["top_p"]) and t["top_p"] > 0):
        raise ValueError(f"{where}: top_k must be an int >= 0 and top_p a number in (0, 1], got "
                         f"{t['top_k']!r} and {t['top_p']!r}")
    acc, pos = t["accept"], t["positions"]
    rows_ok = isinstance(acc, list) and len(acc) == depth and all(
        isinstance(r, list) and len(r) == topk and all(_probability(p) for p in r) and sum(r) <= 1 + 1e-6
        for r in acc)
    if not rows_ok:
        raise ValueError(f"{where}: accept must be {depth} rows (one per draft head) of {topk} probabilities "
                         "summing to at most 1")
    if not isinstance(pos, list) or len(pos) != depth or not _all_ints(pos) or min(pos, default=0) < 0:
        raise ValueError(f"{where}: positions must be {depth} ints >= 0 (one per draft head)")


def _probability(p) -> bool:
    return isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p <= 1.0


def load_calibration(directory, model) -> Calibration | None:
    """``directory/calibration.json`` checked against ``model``; None when there is none.
    A corrupt file or one from another model raises CalibrationError naming the file."""
    path = Path(directory) / CALIBRATION_NAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path} is corrupt (not valid JSON: {e}); "
                               "delete it or rerun `mtpkern calibrate`") from None
    return Calibration.from_dict(raw, str(path), model)


def attach_calibration(model, directory) -> None:
    """Set ``model.calibration`` from ``directory`` (None if it has no calibration.json)."""
    model.calibration = load_calibration(directory, model)


def draft_depth(model) -> int:
    """The number of draft heads: heads 1..n_heads-1 (MTP's head blocks after head 0, or the MEDUSA heads)."""
    return model.n_heads - 1


__all__ = [
    "CALIBRATION_NAME", "SCHEMA", "TOPK", "Calibration", "CalibrationError", "attach_calibration", "draft_depth",
    "fingerprint", "load_calibration", "temperature_key",
]
