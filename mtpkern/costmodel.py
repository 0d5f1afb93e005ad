"""The cost model: the time of one decoding step of the engine (forward pass, verification,
KV compaction, next drafts, host sync) for T = 1 (a next-token step) to 128 tree tokens, sampled
at powers of two and interpolated linearly (for MTP one curve per tree depth: each draft head is
a transformer block the step runs), on the device, dtype, kernels and CUDA-graph setting in use
(:func:`step_cost`). Measured once and cached in ``$MTPKERN_CACHE/step_cost.json`` (default
``~/.cache/mtpkern``), keyed by device name, torch version, model shape, dtype, kernels,
cuda_graph, tree depth and on a CPU ``MTPKERN_CPU_MATMUL`` (``mtpkern.cpu_matmul``), and
for rejection sampling (``sampling=True``: its steps draw drafts and run ``verify_rejection``,
which costs more than a greedy step) apart.

It times the engine's own step (:meth:`mtpkern.steps.StepEngine.run_step`, the core under
``Decoder``), so it sits above that core and below the engines, which plan ``auto`` trees from
it (``mtpkern.autotree``); the curve it returns is the planner's :class:`~mtpkern.planner.StepCost`.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from typing import Callable

import torch

from mtpkern.calibration import TOPK, draft_depth
from mtpkern.cpu_matmul import forced_layout
from mtpkern.options import DecodeOptions
from mtpkern.steps import StepEngine
from mtpkern.graphs import graphs_available
from mtpkern.planner import StepCost, _smooth, check_curve
from mtpkern.runtime import cache_dir, device_name, dtype_name, read_cache, synchronize, write_cache
from mtpkern.tree import Tree

# /2: verification runs head 0 alone; /3: CPU products per layout (cpu_matmul); /4: sampling
# steps take their logits from the kept unembedding (on a CPU, up to 2x faster).
COST_SCHEMA = "mtpkern.step_cost/4"
COST_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)  # tree tokens T at which a step is timed
COST_ROUNDS = 2


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
                   min_time: float = 0.05, sampling: bool = False, acceptance: str | None = None) -> float:
    """The fastest of several timed runs (the least disturbed by other work on the machine),
    in seconds, of one greedy decoding step of the engine over ``tree`` (None: one
    next-token step) after ``prefix_len`` cached tokens: the forward pass, verification, KV
    compaction, the next drafts and the step's host sync. Random tokens, so few drafts are
    accepted; what that saves (moving fewer K/V) is small. The one place the cost model times
    a step: it runs the engine's own step (``mtpkern.steps.StepEngine.run_step``, under ``mtpkern.Decoder``).
    ``sampling``: a sampling step instead (temperature 1; a tree verified by rejection sampling).
    ``acceptance``: a sampling step with a tree verified this way (``"rejection"``: as
    ``sampling``; ``"typical"``); ``"greedy"``: the greedy step."""
    if acceptance not in (None, "greedy", "rejection", "typical"):
        raise ValueError(f"acceptance must be greedy, rejection or typical, got {acceptance!r}")
    device = model.device
    strategy = "ntp" if tree is None else model.config.model_type
    rule = acceptance or ("rejection" if sampling else "greedy")
    how: dict = {} if rule == "greedy" else dict(temperature=1.0, acceptance=rule if tree else "greedy")
    with torch.inference_mode():
        decoder = StepEngine(model, DecodeOptions(strategy, tree=tree, kernels=kernels, cuda_graph=cuda_graph, **how))

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


def step_cost_tree(n_nodes: int, n_draft_heads: int, topk: int = 10) -> Tree:
    """A tree of ``n_nodes`` nodes (the root included) over ``n_draft_heads`` heads and ranks
    below ``topk``, for timing steps by size: the paths in order of (rank sum, depth, ranks),
    a shape close to what acceptance-driven trees look like."""
    if n_nodes < 2:
        raise ValueError(f"a tree to time needs at least 2 nodes, got {n_nodes}")
    paths: list[tuple[int, ...]] = []
    budget = n_nodes - 1
    for total in itertools.count():
        level = [p for d in range(1, n_draft_heads + 1)
                 for p in itertools.product(range(min(topk, total + 1)), repeat=d) if sum(p) == total]
        for p in sorted(level, key=lambda p: (len(p), p)):
            if len(paths) < budget and (len(p) == 1 or p[:-1] in paths):
                paths.append(p)
        if len(paths) >= budget or total > budget + n_draft_heads * topk:
            break
    if len(paths) < budget:
        raise ValueError(f"no tree of {n_nodes} nodes over {n_draft_heads} heads and top-{topk}")
    return Tree([list(p) for p in paths])


def time_step(model, n_nodes: int, *, kernels: str = "auto", cuda_graph: bool = False, prefix_len: int = 64,
              iters: int = 10) -> float:
    """Median seconds of one greedy decoding step of ``n_nodes`` tree tokens (1 = ``ntp``) on
    ``model``'s device, dtype, ``kernels`` and ``cuda_graph`` setting: the cost model's
    measurement (``mtpkern.calibrate`` and ``benchmarks/bench_decode.py`` use it)."""
    if n_nodes == 1:
        dec = StepEngine(model, DecodeOptions("ntp", kernels=kernels, cuda_graph=cuda_graph))
    else:
        strategy = model.config.model_type
        if strategy not in ("mtp", "medusa"):
            raise ValueError(f"a {type(model).__name__} has no draft heads: it can only time n_nodes=1")
        tree = step_cost_tree(n_nodes, model.n_heads - 1, min(10, model.config.vocab_size))
        dec = StepEngine(model, DecodeOptions(strategy, tree=tree, kernels=kernels, cuda_graph=cuda_graph))
    return dec.time_step(prefix_len=prefix_len, iters=iters)


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
    key = dict(device=device_name(model.device), torch=torch.__version__, model=shape,
               dtype=dtype_name(model.dtype), kernels=kernels, cuda_graph=bool(cuda_graph))
    if model.device.type == "cpu":
        key["cpu_matmul"] = forced_layout() or "auto"
    return key


def cost_depths(model) -> list[int]:
    """The tree depths whose step costs differ enough to be measured apart: every depth for MTP
    (each draft head is a transformer block the step runs over every node), the full depth for
    MEDUSA (its heads are one residual block each)."""
    D = draft_depth(model)
    return list(range(1, D + 1)) if model.config.model_type == "mtp" else [D]


def step_cost(model, *, kernels: str = "auto", cuda_graph: bool = False, depth: int | None = None,
              refresh: bool = False, timer: Callable | None = None, sampling: bool = False) -> StepCost:
    """The step-cost curve of ``model`` as it is (device, dtype) for trees of ``depth`` (default:
    every draft head), measured once per setting and cached in ``cache_dir() / "step_cost.json"``;
    ``refresh`` measures again. ``timer``: what times one step (default :func:`time_tree_step`).
    ``sampling``: the steps of rejection sampling (the timer is called with ``sampling=True``)."""
    if kernels not in ("auto", "eager", "fused"):
        raise ValueError(f"unknown kernels {kernels!r}; choose one of auto, eager, fused")
    if draft_depth(model) < 1:
        raise ValueError(f"step_cost times tree steps: it needs a model with draft heads, got {model.n_heads} head(s)")
    if cuda_graph and not graphs_available(model.device):
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {model.device}")
    D = draft_depth(model) if depth is None else depth
    if isinstance(D, bool) or not isinstance(D, int) or not 1 <= D <= draft_depth(model):
        raise ValueError(f"depth must be an int in 1..{draft_depth(model)} (the draft heads), got {depth!r}")
    how: dict = {"sampling": True} if sampling else {}  # a greedy curve keeps its key and calls timers as before
    key = dict(cost_key(model, kernels=kernels, cuda_graph=cuda_graph), depth=D, **how)
    name = json.dumps(key, sort_keys=True)
    path = cache_dir() / "step_cost.json"
    prefix = min(256, model.config.n_positions // 2)
    sizes = [T for T in COST_SIZES if prefix + T <= model.config.n_positions]
    K = min(TOPK, model.config.vocab_size)
    sizes = [T for T in sizes if T - 1 <= sum(K ** d for d in range(1, D + 1))]
    table = read_cache(path, COST_SCHEMA)
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
        seconds = [min(s, timer(model, tree, prefix_len=prefix, kernels=kernels, cuda_graph=cuda_graph, **how))
                   for s, tree in zip(seconds, trees)]
    try:
        check_curve(sizes, seconds)
    except ValueError as e:
        raise ValueError(f"step_cost: the timer returned an impossible step time ({e})") from None
    seconds = _smooth(seconds)
    table[name] = dict(sizes=sizes, seconds=seconds, prefix_len=prefix,
                       measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_cache(path, COST_SCHEMA, table, "step-cost")
    return StepCost(sizes, seconds, key)


__all__ = ["cache_dir", "cost_depths", "cost_key", "device_name", "step_cost", "step_cost_tree", "time_step",
           "time_tree_step", "timing_tree"]
