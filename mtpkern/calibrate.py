"""Trees that fit the hardware: head acceptance on held-out data, step cost vs tree size, and
the tree that maximises expected tokens per second (Sequoia, Chen et al. 2024, measured here).

Three pieces, each usable alone:

* **Calibration** (:func:`calibrate`): on held-out prompts, the model decodes greedily with its
  own next-token path; then, at every position of that continuation, draft head d's top-k
  (k = 10) is compared with the token the model itself decoded d positions later. Counted
  only where every shallower head's correct token was within its top-k (the positions a tree
  could reach at depth d), this gives ``accept[d][r]``: the probability that head d's rank-r
  candidate is the model's own token, given that the path above it was accepted. Saved beside
  the weights as ``calibration.json`` with a fingerprint of the model (type, heads, vocabulary,
  layer sizes, a hash of a few weights), so a file from another model is refused;
  ``mtpkern.load_model`` attaches it as ``model.calibration``.
* **Cost model** (:func:`step_cost`): the time of one decoding step of the engine (forward
  pass, verification, KV compaction, next drafts, host sync) for T = 1 (a next-token step) to
  128 tree tokens, sampled at powers of two and interpolated linearly (for MTP one curve per
  tree depth: each draft head is a transformer block the step runs), on the device, dtype,
  kernels and CUDA-graph setting in use. Measured once and cached in
  ``$MTPKERN_CACHE/step_cost.json`` (default ``~/.cache/mtpkern``), keyed by device name,
  torch version, model shape, dtype, kernels, cuda_graph and tree depth.
* **Tree optimiser** (:func:`optimise_tree`, :func:`optimise_tree_depths`): for every node
  budget n (and depth) the tree with the largest expected accepted length, then the one that
  maximises expected accepted length / step time.

Why greedy best-first expansion is exact (the argument :func:`best_first_nodes` relies on).
Assumptions: (a) the event "head d's rank-r candidate is the model's own token" has
probability ``accept[d][r]`` given that the path above it was accepted, whatever the ranks on
that path (acceptance depends only on (depth, rank)); (b) every ``accept[d][r]`` lies in
[0, 1]. A node is the path of ranks (r1, ..., rd); its *score* is
``s(r1..rd) = accept[1][r1] * ... * accept[d][rd]``, the probability that its whole path is
accepted. At each depth exactly one token is the model's own, and the candidates of one head
are distinct tokens, so at most one node per depth has its whole path accepted, and the
number of accepted drafts equals the number of nodes whose path is accepted:
``E[accepted length] = 1 + sum of the scores of the tree's nodes`` (the 1 is the model's own
token, always emitted). A tree of n nodes is a prefix-closed set of n paths, so the best tree
of n nodes maximises a sum of node scores under prefix closure. By (b) a child never scores
above its parent; order nodes by (score descending, depth ascending, path ascending), and a
parent always precedes its children. The n first nodes of that order therefore form a
prefix-closed set, and no set of n nodes has a larger sum: they are the best n-node tree, and
best-first expansion from the root (a heap of the frontier) lists them in that order, so every
budget's optimum is a prefix of one list. Monotonicity in rank is not needed (ranks need not
be expanded in order), so noisy estimates are used as measured.

What the assumptions cost: heads err together (a hard position is hard for every head), and
decoding does not visit every position (a step skips the tokens it accepts, so easy stretches
count less than in an average over positions). The calibration therefore also keeps, for
every generated position, the rank of the model's own token in each head's top-k; the
candidates (the best-first trees, one per budget) are then scored by replaying greedy decoding
over those continuations (:func:`simulate_steps`), which is what decoding those prompts with
that tree does, step for step.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import platform
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from mtpkern.checkpoint import CheckpointError
from mtpkern.graphs import graphs_available
from mtpkern.runtime import dtype_name, resolve_dtype, synchronize
from mtpkern.tree import Tree

CALIBRATION_NAME = "calibration.json"
SCHEMA = "mtpkern.calibration/1"
COST_SCHEMA = "mtpkern.step_cost/2"  # /2: verification runs head 0 alone (decoder)
TOPK = 10  # ranks calibrated per head
COST_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)  # tree tokens T at which a step is timed
COST_ROUNDS = 2


class CalibrationError(CheckpointError):
    """A calibration file is corrupt or belongs to another model."""


# ----------------------------------------------------------------------------- calibration


def fingerprint(model) -> dict:
    """What identifies the model a calibration was measured on: its family, heads, vocabulary,
    layer sizes, and a hash of 16 evenly spaced weights of every tensor. The weights are rounded
    to float16 first, so the model in float32 and in float16 has one fingerprint."""
    cfg = model.config
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(16, flat.numel())).round().long().to(flat.device)
        digest.update(name.encode())
        digest.update(flat[idx].to(torch.float16).float().cpu().numpy().tobytes())
    return dict(model_type=cfg.model_type, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, medusa_layers=cfg.medusa_layers,
                weights=digest.hexdigest()[:16])


def _fingerprint_drafts(fp: dict):
    """The draft heads of the model a fingerprint describes (its ``n_heads`` is the config's:
    MTP counts head 0, MEDUSA only its MEDUSA heads)."""
    n = fp.get("n_heads")
    return n - 1 if fp.get("model_type") == "mtp" and isinstance(n, int) else n


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
        if d["schema"] != SCHEMA:
            raise ValueError(f"schema {d['schema']!r} is not {SCHEMA!r}")
        if not isinstance(d["fingerprint"], dict):
            raise ValueError("the field 'fingerprint' must be an object")
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
        return cls(dict(d["fingerprint"]), topk, [list(row) for row in counts], list(d["positions"]), dict(source),
                   [list(p) for p in ranks])

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
    """The number of draft heads: MTP heads 1..n-1, or the MEDUSA heads."""
    return model.n_heads - 1


@torch.inference_mode()
def calibrate(model, prompts: Sequence, *, max_new_tokens: int = 64, eos_token_id: int | None = None,
              topk: int = TOPK, source: dict | None = None) -> Calibration:
    """Measure ``accept[d][r]`` on ``prompts`` (token id lists or tensors; see the module
    docstring). Each prompt is decoded greedily (the model's own speculative strategy over a
    chain, whose tokens equal greedy next-token decoding), then one causal forward pass over prompt +
    continuation gives every head's top-k at every generated position."""
    from mtpkern.generate import generate

    kind = model.config.model_type
    if kind not in ("mtp", "medusa") or draft_depth(model) < 1:
        raise ValueError(f"calibration needs an MTP or MEDUSA model with draft heads, got a {kind} model "
                         f"with {model.n_heads} head(s)")
    _check_calibrate_args(prompts, topk)
    D, K = draft_depth(model), min(topk, model.config.vocab_size, 10)  # one character per rank
    counts = torch.zeros(D, K, dtype=torch.long)
    positions = torch.zeros(D, dtype=torch.long)
    n_prompts, ranks = 0, []
    for i, prompt in enumerate(prompts):
        ids = _prompt_ids(prompt, i, model.device)
        P = ids.numel()
        room = model.config.n_positions - P - D - 1
        if P == 0 or room < 1:
            continue
        out = generate(model, ids, max_new_tokens=min(max_new_tokens, room), strategy=kind,
                       tree=Tree.chain(D), eos_token_id=eos_token_id)
        assert not isinstance(out, list)  # one prompt: one result, not a batch's list
        seq = torch.cat([ids, torch.tensor(out.tokens, device=ids.device, dtype=torch.long)])
        L = seq.numel()
        hidden = model(seq[None], heads=D + 1, logits=False).hidden[0]  # [L, D + 1, dim]
        reachable = torch.ones(L - P, dtype=torch.bool, device=ids.device)  # positions P-1 .. L-2
        table = torch.full((L - P, D), -1, dtype=torch.long)  # -1: past the end
        for d in range(1, D + 1):
            n = L - P - d  # positions t = P-1 .. L-d-2 have a token d + 1 ahead
            if n <= 0:
                break
            top = model.head_logits(hidden[P - 1 : P - 1 + n, d], d).topk(K, dim=-1).indices  # [n, K]
            hit = top == seq[P + d : P + d + n, None]  # the model's own token d positions after t+1
            rank = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(hit[:, 0], K, dtype=torch.long))
            ok = reachable[:n]
            counts[d - 1] += torch.bincount(rank[ok], minlength=K + 1)[:K].cpu()
            positions[d - 1] += int(ok.sum())
            reachable = reachable[:n] & (rank < K)
            table[:n, d - 1] = rank.cpu()
        ranks.append(["".join("." if r < 0 else "x" if r >= K else str(r) for r in row) for row in table.tolist()])
        n_prompts += 1
    if n_prompts == 0:
        raise ValueError(f"no prompt to calibrate on: none was given, or none leaves room to decode in the "
                         f"model's context of {model.config.n_positions} tokens")
    info = dict(source or {}, n_prompts=n_prompts, max_new_tokens=max_new_tokens)
    return Calibration(fingerprint(model), K, counts.tolist(), positions.tolist(), info, ranks)


def _check_calibrate_args(prompts, topk) -> None:
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts must be a list of token-id sequences (tokenize text first, e.g. with "
                        f"mtpkern.data.load_tokenizer(checkpoint)), got {type(prompts).__name__}")
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= TOPK:
        raise ValueError(f"topk must be an int in 1..{TOPK} (one character per rank), got {topk!r}")


def _prompt_ids(prompt, i: int, device) -> torch.Tensor:
    """Prompt i's token ids, 1-D: text, or ids that are not integers (which ``long()`` would
    truncate silently), are a TypeError."""
    try:
        ids = torch.as_tensor(prompt, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"prompt {i} must be token ids, a list of ints or an integer tensor (tokenize text first, "
                        f"e.g. with mtpkern.data.load_tokenizer(checkpoint)), got {type(prompt).__name__}") from None
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"prompt {i} must hold integer token ids, got {ids.dtype}")
    return ids.reshape(-1).long()


def held_out_prompts(records, tokenizer, model, *, max_samples: int, max_new_tokens: int) -> list[list[int]]:
    """Token ids of up to ``max_samples`` records' prompts that leave room to decode."""
    from mtpkern.data import format_prompt

    room = model.config.n_positions - max_new_tokens - draft_depth(model) - 1
    prompts = []
    for rec in records:
        ids = tokenizer(format_prompt(rec["query"]), add_special_tokens=False)["input_ids"]
        if 0 < len(ids) <= room:
            prompts.append(ids)
        if len(prompts) == max_samples:
            break
    return prompts


def calibrate_records(model, records, tokenizer, *, max_samples: int = 16, max_new_tokens: int = 48,
                      source: dict | None = None) -> Calibration:
    """:func:`calibrate` on the prompts of held-out records."""
    prompts = held_out_prompts(records, tokenizer, model, max_samples=max_samples, max_new_tokens=max_new_tokens)
    if not prompts:
        raise ValueError(f"no held-out prompt fits the context of {model.config.n_positions} tokens "
                         f"with max_new_tokens={max_new_tokens}")
    return calibrate(model, prompts, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                     source=source)


# ----------------------------------------------------------------------------- cost model


def cache_dir() -> Path:
    """Where measured step costs are kept: ``$MTPKERN_CACHE``, else ``~/.cache/mtpkern``."""
    return Path(os.environ.get("MTPKERN_CACHE") or Path.home() / ".cache" / "mtpkern")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def timing_tree(T: int, depth: int, topk: int = TOPK) -> Tree:
    """A tree of T tokens (the root included) as deep as ``depth`` allows: a top-1 chain, then
    further ranks breadth first. Its step costs what any T-token tree of that depth costs."""
    chain: list[tuple[int, ...]] = [(0,) * d for d in range(1, min(T - 1, depth) + 1)]
    frontier: list[tuple[int, ...]] = [()]
    paths, seen = list(chain), set(chain)
    while len(paths) < T - 1 and frontier:
        nxt = []
        for parent in frontier:
            for r in range(topk):
                p = parent + (r,)
                nxt.append(p)
                if p not in seen and len(paths) < T - 1:
                    paths.append(p)
                    seen.add(p)
        frontier = [p for p in nxt if len(p) < depth]
    if len(paths) < T - 1:
        raise ValueError(f"no tree of {T} tokens fits depth {depth} and top-{topk}")
    return Tree([list(p) for p in paths])


def time_tree_step(model, tree: Tree | None, *, prefix_len: int, kernels: str = "auto", cuda_graph: bool = False,
                   min_time: float = 0.05) -> float:
    """The fastest of several timed runs (the least disturbed by other work on the machine),
    in seconds, of one greedy decoding step of the engine over ``tree`` (None: one
    next-token step) after ``prefix_len`` cached tokens: the forward pass, verification, KV
    compaction, the next drafts and the step's host sync. Random tokens, so few drafts are
    accepted; what that saves (moving fewer K/V) is small. The one place the cost model times
    a step: it runs the engine's own step (``mtpkern.Decoder.run_step``)."""
    from mtpkern.decoder import Decoder

    device = model.device
    strategy = "ntp" if tree is None else model.config.model_type
    with torch.inference_mode():
        decoder = Decoder(model, strategy, tree=tree, kernels=kernels, cuda_graph=cuda_graph)

        def step():
            return decoder.run_step(prefix_len)

        step()  # warm-up: allocator, kernel caches, graph capture
        times: list[float] = []
        t_end = time.perf_counter() + min_time
        while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return min(times)


@dataclass
class StepCost:
    """Seconds of one decoding step at ``sizes`` tree tokens (1: a next-token step); linear in
    between."""

    sizes: list[int]
    seconds: list[float]
    key: dict = field(default_factory=dict)

    def __post_init__(self):
        check_curve(self.sizes, self.seconds)

    def __call__(self, T: float) -> float:
        s, t = self.sizes, self.seconds
        if not s[0] <= T <= s[-1]:
            raise ValueError(f"step cost is measured for 1..{s[-1]} tree tokens, not {T}")
        for i in range(1, len(s)):
            if T <= s[i]:
                w = (T - s[i - 1]) / (s[i] - s[i - 1])
                return t[i - 1] + w * (t[i] - t[i - 1])
        return t[0]

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]


def check_curve(sizes: Sequence[int], seconds: Sequence[float]) -> None:
    """ValueError unless ``seconds`` holds one finite, positive timing per size and the sizes
    rise strictly from 1 (a next-token step)."""
    if len(sizes) != len(seconds):
        raise ValueError(f"{len(sizes)} sizes but {len(seconds)} timings: a step cost needs one timing per size")
    if not sizes or sizes[0] != 1:
        raise ValueError(f"step cost sizes must start at 1 (a next-token step), got {list(sizes)}")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"step cost sizes must be strictly increasing, got {list(sizes)}")
    bad = next((t for t in seconds if not _positive_seconds(t)), None)
    if bad is not None:
        raise ValueError(f"step cost timings must be finite numbers of seconds > 0, got {bad!r}")


def _positive_seconds(t) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0


def _smooth(seconds: list[float]) -> list[float]:
    """The curve made non-decreasing (each timing at least the one before): it is a cost, and
    timing noise must never favour a bigger tree."""
    out = list(seconds)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1])
    return out


def _cached_cost(entry, sizes: list[int], key: dict) -> StepCost:
    """A cache entry as the curve a measurement gives (smoothed alike); ValueError says what
    is wrong with it: unreadable, other sizes than this setting times, or timings that are
    not finite and positive."""
    try:
        got, seconds = [int(s) for s in entry["sizes"]], [float(t) for t in entry["seconds"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"unreadable sizes or seconds ({type(e).__name__}: {e})") from None
    if got != sizes:
        raise ValueError(f"sizes {got} are not the sizes this setting times, {sizes}")
    check_curve(sizes, seconds)
    return StepCost(sizes, _smooth(seconds), key)


def cost_key(model, *, kernels: str, cuda_graph: bool) -> dict:
    """What a measured step cost depends on."""
    cfg = model.config
    shape = {k: getattr(cfg, k) for k in ("model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
                                          "n_heads", "medusa_layers", "medusa_proj")}
    return dict(device=device_name(model.device), torch=torch.__version__, model=shape,
                dtype=dtype_name(model.dtype), kernels=kernels, cuda_graph=bool(cuda_graph))


def cost_depths(model) -> list[int]:
    """The tree depths whose step costs differ enough to be measured apart: every depth for MTP
    (each draft head is a transformer block the step runs over every node), the full depth for
    MEDUSA (its heads are one residual block each)."""
    D = draft_depth(model)
    return list(range(1, D + 1)) if model.config.model_type == "mtp" else [D]


def step_cost(model, *, kernels: str = "auto", cuda_graph: bool = False, depth: int | None = None,
              refresh: bool = False, timer: Callable | None = None) -> StepCost:
    """The step-cost curve of ``model`` as it is (device, dtype) for trees of ``depth`` (default:
    every draft head), measured once per setting and cached in ``cache_dir() / "step_cost.json"``;
    ``refresh`` measures again. ``timer``: what times one step (default :func:`time_tree_step`)."""
    if kernels not in ("auto", "eager", "fused"):
        raise ValueError(f"unknown kernels {kernels!r}; choose one of auto, eager, fused")
    if draft_depth(model) < 1:
        raise ValueError(f"step_cost times tree steps: it needs a model with draft heads, got {model.n_heads} head(s)")
    if cuda_graph and not graphs_available(model.device):
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {model.device}")
    D = draft_depth(model) if depth is None else depth
    if isinstance(D, bool) or not isinstance(D, int) or not 1 <= D <= draft_depth(model):
        raise ValueError(f"depth must be an int in 1..{draft_depth(model)} (the draft heads), got {depth!r}")
    key = dict(cost_key(model, kernels=kernels, cuda_graph=cuda_graph), depth=D)
    name = json.dumps(key, sort_keys=True)
    path = cache_dir() / "step_cost.json"
    prefix = min(256, model.config.n_positions // 2)
    sizes = [T for T in COST_SIZES if prefix + T <= model.config.n_positions]
    K = min(TOPK, model.config.vocab_size)
    sizes = [T for T in sizes if T - 1 <= sum(K ** d for d in range(1, D + 1))]
    table = _read_cache(path)
    if not refresh and name in table:
        try:
            return _cached_cost(table[name], sizes, key)
        except ValueError as e:  # a damaged or hand-edited entry: never plan with it
            warnings.warn(f"{path}: the step cost of this setting is damaged ({e}); measuring it again",
                          stacklevel=2)
    timer = timer or time_tree_step
    trees = [timing_tree(T, D, K) if T > 1 else None for T in sizes]
    # Sizes in turn, twice, keeping the faster: a burst of other work on the machine then
    # spoils one round of one size rather than the whole curve.
    seconds = [math.inf] * len(sizes)
    for _ in range(COST_ROUNDS):
        seconds = [min(s, timer(model, tree, prefix_len=prefix, kernels=kernels, cuda_graph=cuda_graph))
                   for s, tree in zip(seconds, trees)]
    try:
        check_curve(sizes, seconds)
    except ValueError as e:
        raise ValueError(f"step_cost: the timer returned an impossible step time ({e})") from None
    seconds = _smooth(seconds)
    table[name] = dict(sizes=sizes, seconds=seconds, prefix_len=prefix,
                       measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _write_cache(path, table)
    return StepCost(sizes, seconds, key)


def _read_cache(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
        return table if isinstance(table, dict) and table.pop("schema", None) == COST_SCHEMA else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # none yet, or damaged: it is only a cache


def _write_cache(path: Path, table: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"schema": COST_SCHEMA, **table}, indent=2))
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not write the step-cost cache {path}: {e}", stacklevel=3)


# ----------------------------------------------------------------------------- tree optimiser


def best_first_nodes(accept: Sequence[Sequence[float]], limit: int) -> list[tuple[tuple[int, ...], float]]:
    """The ``limit`` best nodes of the infinite tree over ``accept`` [depth][rank], best first,
    as (path, score): for every n, the first n form the n-node tree with the largest expected
    accepted length (proof and assumptions in the module docstring). Deterministic: ties go
    to the shallower, then the lexicographically smaller path."""
    for row in accept:
        if any(not 0.0 <= p <= 1.0 for p in row):
            raise ValueError(f"acceptance probabilities must lie in [0, 1], got {list(row)}")
    heap: list[tuple[float, int, tuple[int, ...]]]  # (-score, depth, path)
    heap = [(-p, 1, (r,)) for r, p in enumerate(accept[0])] if accept else []
    heapq.heapify(heap)
    out: list[tuple[tuple[int, ...], float]] = []
    while heap and len(out) < limit:
        neg, depth, path = heapq.heappop(heap)
        out.append((path, -neg))
        if depth < len(accept):
            for r, p in enumerate(accept[depth]):
                heapq.heappush(heap, (neg * p, depth + 1, path + (r,)))
    return out


def simulate_steps(ranks: Sequence[Sequence[str]], tree: Tree | set) -> list[list[int]]:
    """Replay greedy decoding with ``tree`` over calibrated continuations: per prompt, the
    tokens each step emits (accepted drafts + the model's own token). A step at position t
    accepts the deepest tree path equal to the ranks of the model's own tokens at t, and the
    next step starts after them: exactly what decoding those prompts with ``tree`` does (the
    tokens are the model's own greedy ones), except that the last step of a generation may
    also accept drafts past the calibrated end."""
    return _replay(_parse_ranks(ranks), set(tree.choices) if isinstance(tree, Tree) else tree)


def _parse_ranks(ranks) -> list[list[tuple[int, ...]]]:
    return [[tuple(int(c) if c.isdigit() else -1 for c in row) for row in prompt] for prompt in ranks]


def _replay(rows_per_prompt, paths: set) -> list[list[int]]:
    out = []
    for rows in rows_per_prompt:
        steps, t = [], 0
        while t < len(rows):
            a = 0
            while a < len(rows[t]) and rows[t][: a + 1] in paths:
                a += 1
            steps.append(1 + a)
            t += 1 + a
        out.append(steps)
    return out


def _mean_step(steps: list[list[int]]) -> float:
    flat = [a for prompt in steps for a in prompt]
    return sum(flat) / len(flat) if flat else 1.0


def simulated_accept_length(ranks: Sequence[Sequence[str]], tree: Tree) -> float:
    """Mean tokens per step of :func:`simulate_steps`."""
    return _mean_step(simulate_steps(ranks, tree))


@dataclass
class TreePlan:
    """The chosen tree and what the models predict for it."""

    tree: Tree
    expected_accept_length: float  # tokens per step: accepted drafts + the model's own token
    step_time_s: float
    tokens_per_second: float
    ntp_tokens_per_second: float  # 1 / the cost of a one-token step
    curve: list[dict] = field(default_factory=list)  # every budget: nodes, accept length, step s, tok/s

    def to_dict(self) -> dict:
        return dict(tree=[list(p) for p in self.tree.choices], nodes=len(self.tree) - 1,
                    depth=self.tree.max_depth, topk=self.tree.topk,
                    predicted_accept_length=self.expected_accept_length, predicted_step_s=self.step_time_s,
                    predicted_tokens_per_second=self.tokens_per_second,
                    predicted_speedup_vs_ntp=self.tokens_per_second / self.ntp_tokens_per_second)


def max_draft_nodes(model) -> int:
    """The largest node budget the cache allows: one prompt token, the root and the drafts."""
    return model.config.n_positions - 2


def check_budget(max_nodes, limit: int) -> None:
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or not 1 <= max_nodes <= limit:
        raise ValueError(f"max_nodes (draft nodes per step) must be an int in 1..{limit} "
                         f"(the model's context less the root and one prompt token), got {max_nodes!r}")


def optimise_tree(accept: Sequence[Sequence[float]], cost: Callable[[int], float], *, max_tokens: int,
                  ranks: Sequence[Sequence[str]] | None = None) -> TreePlan:
    """The tree maximising expected tokens/s = E[accepted length](n) / cost(n + 1) over node
    budgets n = 1 .. max_tokens - 1 (``cost`` takes the tree tokens T = n + 1, root included).
    Ties go to the smaller tree.

    With ``ranks`` (a calibration's continuations), the candidates are the same best-first
    trees, but each one's accepted length is replayed over those continuations
    (:func:`simulate_steps`) instead of taken from the independence model: decoding visits
    positions unevenly (a step skips what it accepts) and heads err together, which the
    product of averages misses."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"max_tokens must be an int >= 2: a tree needs the root and one draft, got {max_tokens!r}")
    nodes = best_first_nodes(accept, max_tokens - 1)
    if not nodes:
        raise ValueError("no draft heads to build a tree from")
    rows = _parse_ranks(ranks) if ranks else None
    best: tuple[int, float, float, float] | None = None
    expected, curve, chosen = 1.0, [], set()
    for n, (path, score) in enumerate(nodes, start=1):
        expected += score
        chosen.add(path)
        if rows is not None:
            expected = _mean_step(_replay(rows, chosen))
        seconds = _step_seconds(cost, n + 1)
        rate = expected / seconds
        curve.append(dict(nodes=n, accept_length=expected, step_s=seconds, tokens_per_second=rate))
        if best is None or rate > best[3]:
            best = (n, expected, seconds, rate)
    assert best is not None  # nodes is not empty
    n, expected, seconds, rate = best
    tree = Tree([list(p) for p, _ in nodes[:n]])
    return TreePlan(tree, expected, seconds, rate, 1.0 / _step_seconds(cost, 1), curve)


def _step_seconds(cost: Callable[[int], float], T: int) -> float:
    seconds = cost(T)
    if not _positive_seconds(seconds):
        raise ValueError(f"cost({T}) must be a finite number of seconds > 0, got {seconds!r}")
    return seconds


def optimise_tree_depths(accept: Sequence[Sequence[float]], costs: dict, *, max_tokens: int,
                         ranks: Sequence[Sequence[str]] | None = None) -> TreePlan:
    """:func:`optimise_tree` when the step cost depends on the tree's depth too: ``costs[d]``
    is the cost of trees at most d deep. For every d the best trees of depth <= d are the
    best-first nodes of ``accept[:d]``; the best (depth, budget) wins, ties to the shallower."""
    best = None
    for d in sorted(costs):
        T = min(max_tokens, getattr(costs[d], "max_tokens", max_tokens))
        plan = optimise_tree(accept[:d], costs[d], max_tokens=T, ranks=ranks)
        if best is None or plan.tokens_per_second > best.tokens_per_second:
            best = plan
    if best is None:
        raise ValueError("no step cost to optimise against")
    return best


def plan_tree(model, *, kernels: str = "auto", cuda_graph: bool = False, max_nodes: int | None = None,
              calibration: Calibration | None = None) -> TreePlan:
    """The optimised tree of ``model`` (its calibration, or ``calibration``) on its device."""
    cal = calibration if calibration is not None else getattr(model, "calibration", None)
    if cal is None:
        raise ValueError("the model has no calibration: run `mtpkern calibrate` on its checkpoint")
    cal.check(model)
    limit = max_draft_nodes(model)
    if max_nodes is not None:
        check_budget(max_nodes, limit)
    costs = {d: step_cost(model, kernels=kernels, cuda_graph=cuda_graph, depth=d) for d in cost_depths(model)}
    return optimise_tree_depths(cal.accept, costs, max_tokens=min(limit, max_nodes or limit) + 1, ranks=cal.ranks)


_warned_uncalibrated = False
_auto_trees: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {setting: (calibration, tree)}


def auto_tree(model, *, device=None, dtype=None, kernels: str = "auto", cuda_graph: bool = False,
              max_nodes: int | None = None) -> Tree | None:
    """The tree that maximises expected tokens/s for this checkpoint on this device, or None
    (with a warning, once per process) when the model has no calibration. ``device`` and
    ``dtype``, when given, must be the model's: the step cost is measured on the model as it is."""
    global _warned_uncalibrated
    try:
        want = torch.device(device) if device is not None else model.device
    except (RuntimeError, TypeError):
        raise ValueError(f"auto_tree: unknown device {device!r}") from None
    if want.type != model.device.type or (want.index is not None and want != model.device):
        raise ValueError(f"auto_tree: the model is on {model.device}, not {device}; move it first")
    if dtype is not None and resolve_dtype(dtype) != model.dtype:
        raise ValueError(f"auto_tree: the model is {dtype_name(model.dtype)}, not {dtype_name(resolve_dtype(dtype))}; "
                         "cast it first")
    if max_nodes is not None:
        check_budget(max_nodes, max_draft_nodes(model))
    if getattr(model, "calibration", None) is None:
        if not _warned_uncalibrated:
            _warned_uncalibrated = True
            warnings.warn("tree='auto': the model has no calibration (run `mtpkern calibrate` on its checkpoint); "
                          "using the default tree", stacklevel=2)
        return None
    # Planned once per model and setting: generate() may ask on every call.
    key = (model.device, model.dtype, kernels, bool(cuda_graph), max_nodes)
    planned = _auto_trees.setdefault(model, {})
    cal = model.calibration
    if key not in planned or planned[key][0] is not cal:
        planned[key] = (cal, plan_tree(model, kernels=kernels, cuda_graph=cuda_graph, max_nodes=max_nodes).tree)
    return planned[key][1]




# ----------------------------------------------------------------------------- a checkpoint


def calibrate_checkpoint(path, *, data: str | None = None, device: str = "auto", dtype: str | None = None,
                         max_samples: int = 32, max_new_tokens: int = 64, kernels: str = "auto",
                         cuda_graph: bool = False, max_nodes: int | None = None, measure: bool = True) -> dict:
    """``mtpkern calibrate``: calibrate a run or checkpoint on its held-out data, write
    ``calibration.json`` beside the weights, measure the step cost, choose the tree, and (with
    ``measure``) decode held-out prompts with it and with ``ntp`` to set the prediction beside
    what happens. Returns the report (printed by :func:`format_report`)."""
    from mtpkern.data import load_tokenizer
    from mtpkern.checkpoint import resolve_checkpoint
    from mtpkern.eval import read_run, validation_records
    from mtpkern.model import load_model
    from mtpkern.runtime import resolve_device

    ckpt, run = resolve_checkpoint(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    train_config = read_run(run)[0]
    val, info = validation_records(train_config, data)
    # Loaded as saved (the fingerprint reads those weights) and without any old calibration.
    model = load_model(ckpt, device=dev, calibration=False).eval()
    if model.config.model_type not in ("mtp", "medusa"):
        raise ValueError(f"{ckpt} holds a {model.config.model_type} model: calibration needs MTP or MEDUSA heads")
    if max_nodes is not None:
        check_budget(max_nodes, max_draft_nodes(model))
    tokenizer = load_tokenizer(ckpt)
    prompts = held_out_prompts(val, tokenizer, model, max_samples=2 * max_samples, max_new_tokens=max_new_tokens)
    if not prompts:
        raise ValueError(f"no held-out prompt fits the context of {model.config.n_positions} tokens "
                         f"with max_new_tokens={max_new_tokens}; lower --max-new-tokens")
    fit, check = prompts[:max_samples], prompts[max_samples:] or prompts[:max_samples]
    cal = calibrate(model, fit, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, source=info)
    saved = cal.save(ckpt)
    model = model.to(dt)
    plan = plan_tree(model, kernels=kernels, cuda_graph=cuda_graph, max_nodes=max_nodes, calibration=cal)
    cost = step_cost(model, kernels=kernels, cuda_graph=cuda_graph)
    report = dict(checkpoint=str(ckpt), calibration_file=str(saved), calibration=cal.to_dict(),
                  step_cost=dict(sizes=cost.sizes, seconds=cost.seconds, **cost.key, cache=str(cache_dir())),
                  plan=plan.to_dict(), measured=None)
    if measure:
        report["measured"] = measure_tree(model, plan.tree, check, max_new_tokens=max_new_tokens,
                                          eos_token_id=tokenizer.eos_token_id, kernels=kernels, cuda_graph=cuda_graph)
    return report


def measure_tree(model, tree: Tree, prompts, *, max_new_tokens: int, eos_token_id: int | None = None,
                 kernels: str = "auto", cuda_graph: bool = False) -> dict:
    """Mean accepted length and tokens/s (new tokens / decode time after the prefill, summed
    over prompts) of greedy decoding with ``tree``, and of ``ntp`` for the speedup; one
    untimed warm-up each."""
    from mtpkern.generate import generate

    out = {}
    for name, kw in (("ntp", dict(strategy="ntp")), ("tree", dict(strategy=model.config.model_type, tree=tree))):
        runs = []
        for p in [prompts[0], *prompts]:  # the first: an untimed warm-up
            r = generate(model, torch.as_tensor(p, device=model.device), max_new_tokens=max_new_tokens,
                         eos_token_id=eos_token_id, kernels=kernels, cuda_graph=cuda_graph, **kw)
            assert not isinstance(r, list)  # one prompt: one result, not a batch's list
            runs.append(r)
        del runs[0]
        steps = [a for r in runs for a in r.accept_lengths]
        seconds = sum(sum(r.step_times) for r in runs)
        out[name] = dict(accept_length=sum(steps) / max(1, len(steps)),
                         tokens_per_second=sum(steps) / seconds if seconds > 0 else 0.0)
    return dict(accept_length=out["tree"]["accept_length"], tokens_per_second=out["tree"]["tokens_per_second"],
                ntp_tokens_per_second=out["ntp"]["tokens_per_second"],
                speedup_vs_ntp=out["tree"]["tokens_per_second"] / max(out["ntp"]["tokens_per_second"], 1e-12),
                n_prompts=len(prompts))


def format_report(report: dict) -> str:
    """The calibrate command's output: acceptance, step cost, the tree, predicted vs measured."""
    cal = Calibration.from_dict(report["calibration"])
    cost, plan, got = report["step_cost"], report["plan"], report["measured"]
    lines = [f"calibration: {report['calibration_file']}", f"  {cal.summary()}",
             f"step cost ({cost['device']}, {cost['dtype']}, kernels {cost['kernels']}, "
             f"cuda_graph {cost['cuda_graph']}): " + ", ".join(
                 f"T={T} {t * 1e3:.2f} ms" for T, t in zip(cost["sizes"], cost["seconds"])),
             f"tree: {plan['nodes']} nodes, depth {plan['depth']}, top-{plan['topk']}: {plan['tree']}",
             "| | accepted length | tokens/s (decode steps) | speedup vs ntp |", "|---|---|---|---|",
             f"| predicted | {plan['predicted_accept_length']:.2f} | {plan['predicted_tokens_per_second']:.1f} "
             f"| {plan['predicted_speedup_vs_ntp']:.2f}x |"]
    if got is not None:
        lines.append(f"| measured ({got['n_prompts']} held-out prompts) | {got['accept_length']:.2f} "
                     f"| {got['tokens_per_second']:.1f} | {got['speedup_vs_ntp']:.2f}x |")
    return "\n".join(lines)


def calibrate_after_training(model, records, tokenizer, checkpoint, *, source: dict | None = None) -> Path | None:
    """The end of ``mtpkern train mtp|medusa``: calibrate the trained model on its held-out
    records and write ``calibration.json`` into the checkpoint. A model that leaves no room to
    decode is skipped, not an error: training succeeded."""
    if model.config.model_type not in ("mtp", "medusa") or draft_depth(model) < 1 or not records:
        return None
    try:
        # A short calibration (12 prompts x 40 tokens) so training ends soon; `mtpkern
        # calibrate` measures more (32 x 64 by default).
        cal = calibrate_records(model.eval(), records, tokenizer, max_samples=12, max_new_tokens=40, source=source)
    except ValueError as e:
        warnings.warn(f"skipped calibration: {e}", stacklevel=2)
        return None
    return cal.save(checkpoint)

__all__ = [
    "CALIBRATION_NAME", "Calibration", "CalibrationError", "StepCost", "TreePlan", "attach_calibration",
    "auto_tree", "best_first_nodes", "cache_dir", "calibrate", "calibrate_after_training", "calibrate_checkpoint",
    "calibrate_records", "cost_depths", "fingerprint", "format_report", "load_calibration", "measure_tree",
    "optimise_tree", "optimise_tree_depths", "plan_tree", "simulate_steps",
    "simulated_accept_length", "step_cost", "time_tree_step", "timing_tree",
]
