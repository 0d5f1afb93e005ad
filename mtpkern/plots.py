"""PNG plots of an evaluation report (see :mod:`mtpkern.eval` for the report's schema).

Figures are built with matplotlib's object-oriented API (``Figure`` on the Agg canvas), so
nothing here touches pyplot's global state or needs a display. matplotlib is imported when a
figure is drawn, so importing this module (``mtpkern.eval`` and ``mtpkern.bench`` do) stays cheap.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import TYPE_CHECKING

from mtpkern.checkpoint import disk_full_error, is_disk_full

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120
PLOTS_MARK = ".mtpkern-eval"  # written into every folder write_plots fills: that folder is ours to refill

GRAPHED = "+graph"  # ``mtpkern.bench.batch_study``'s suffix for a strategy replayed from CUDA graphs


def ntp_of(strategy: str) -> str:
    """The ``ntp`` case of a batch study that ``strategy`` is compared with: the one with the
    same CUDA-graph setting."""
    return "ntp" + GRAPHED if strategy.endswith(GRAPHED) else "ntp"


def _figure(figsize) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _save(fig: "Figure", path) -> str:
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=DPI)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path, "the plot is incomplete") from e
        raise
    return str(path)


def plot_loss_curves(report: dict, path) -> str | None:
    """Training loss against step, one line per run (from each run's ``log.jsonl``);
    per-head losses dashed where the log has them. None when no run has a training log."""
    runs = [m for m in report["models"] if m.get("training") and m["training"].get("curve")]
    if not runs:
        return None
    fig = _figure((7, 4.5))
    ax = fig.add_subplot()
    for m in runs:
        curve = m["training"]["curve"]
        line, = ax.plot(curve["step"], curve["loss"], label=f"{m['name']} ({m['model_type']})")
        for j, losses in enumerate(curve.get("head_losses") or []):
            ax.plot(curve["step"], losses, ls="--", lw=0.8, color=line.get_color(), alpha=0.6,
                    label=f"{m['name']} head {j}" if len(runs) == 1 else None)
    ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_tokens_per_second(report: dict, path) -> str:
    """Median decode tokens/s per model and strategy, transformers' ``generate`` included."""
    labels, values = [], []
    for m in report["models"]:
        for strategy, s in m["speed"].items():
            if s is not None and s.get("tokens_per_second") is not None:
                labels.append(f"{m['name']}\n{strategy}")
                values.append(s["tokens_per_second"])
    fig = _figure((max(6, 0.9 * len(labels) + 2), 4.5))
    ax = fig.add_subplot()
    bars = ax.bar(range(len(values)), values, color=["C0" if "hf" not in l else "C7" for l in labels])
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set(ylabel="tokens / s (median over prompts)",
           title=f"Greedy decoding speed, batch 1, on {report['device']['name']}")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_accept_histograms(report: dict, path) -> str | None:
    """Histogram of the tokens accepted per verification step, one panel per speculative run.
    None when no model decodes speculatively."""
    panels = [(m["name"], strategy, s) for m in report["models"] for strategy, s in m["speed"].items()
              if strategy not in ("ntp", "hf") and s is not None and s.get("accept_lengths")]
    if not panels:
        return None
    fig = _figure((4 * len(panels), 3.5))
    for i, (name, strategy, s) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        counts = Counter(s["accept_lengths"])
        xs = range(1, max(counts) + 1)
        total = sum(counts.values())
        ax.bar(xs, [counts[x] / total for x in xs])
        ax.axvline(s["mean_accept_length"], color="C3", ls="--", label=f"mean {s['mean_accept_length']:.2f}")
        ax.set(xlabel="tokens accepted per step", ylabel="fraction of steps", title=f"{name} ({strategy})")
        ax.set_xticks(list(xs))
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_head_accuracy(report: dict, path) -> str:
    """Top-1 (solid) and top-5 (hatched) accuracy of every head at its true offset
    (head j predicts token t + j + 1), on the validation split."""
    models = report["models"]
    n_heads = max(len(m["quality"]["head_top1"]) for m in models)
    width = 0.8 / len(models)
    fig = _figure((max(6, 1.2 * n_heads + 2), 4.5))
    ax = fig.add_subplot()
    for i, m in enumerate(models):
        q = m["quality"]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(q["head_top1"]))]
        ax.bar(xs, q["head_top5"], width, color=f"C{i}", alpha=0.35, hatch="//")
        ax.bar(xs, q["head_top1"], width, color=f"C{i}", label=f"{m['name']} ({m['model_type']})")
    ax.set_xticks(range(n_heads), [f"head {j}\n(t+{j + 1})" for j in range(n_heads)])
    ax.set(ylim=(0, 1), ylabel="accuracy (solid top-1, hatched top-5)", title="Per-head accuracy on validation")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_step_cost(curves: dict, path, title: str = "Step cost") -> str:
    """Median time of one decoding step against its tree tokens T, one line per setting:
    ``curves`` maps a label to ``[{"T": int, "step_us": float}, ...]`` (the cost model's
    measurement, :func:`mtpkern.costmodel.time_step`)."""
    fig = _figure((6.5, 4.2))
    ax = fig.add_subplot()
    for label, points in curves.items():
        ax.plot([p["T"] for p in points], [p["step_us"] / 1e3 for p in points], marker="o", label=label)
    ax.set(xlabel="tree tokens T per step", ylabel="step time (ms, median)", title=title)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_batch(batch: dict, path, title: str = "Batched decoding") -> str:
    """Tokens/s against the batch size B (left) and each speculative strategy's speed-up over
    its own model's ``ntp`` at that B (right). ``batch`` maps a family to
    ``{strategy: {B: {"tokens_per_second": ...}}}`` (``benchmarks/bench_decode.py --batch``)."""
    fig = _figure((10, 4.2))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for family, strategies in batch.items():
        for strategy, by_b in strategies.items():
            sizes = sorted(int(b) for b in by_b)
            left.plot(sizes, [by_b[str(b)]["tokens_per_second"] for b in sizes], marker="o",
                      label=f"{family} model: {strategy}")
        for strategy, by_b in strategies.items():
            ntp = strategies.get(ntp_of(strategy), {})  # the ntp case with the same CUDA-graph setting
            if strategy == ntp_of(strategy):
                continue
            sizes = sorted(int(b) for b in by_b if b in ntp)
            right.plot(sizes, [by_b[str(b)]["tokens_per_second"] / ntp[str(b)]["tokens_per_second"] for b in sizes],
                       marker="o", label=f"{strategy} over its ntp")
    left.set(xlabel="batch size B", ylabel="tokens/s (all rows)", title=title)
    right.set(xlabel="batch size B", ylabel="speed-up over ntp at the same B", title="What survives of the speed-up")
    right.axhline(1.0, color="grey", lw=0.8)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


PLOT_FILES = {
    "train_loss.png": plot_loss_curves,
    "tokens_per_second.png": plot_tokens_per_second,
    "accept_lengths.png": plot_accept_histograms,
    "head_accuracy.png": plot_head_accuracy,
}


def write_plots(report: dict, out_dir) -> list[str]:
    """Write every plot that has data into ``out_dir``, marked as ours (PLOTS_MARK); returns the
    paths written. The caller checks first that ``out_dir`` is new, empty or ours
    (:func:`plots_folder_is_ours`)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, PLOTS_MARK), "w") as f:
        f.write("written by `mtpkern eval`: it replaces the plots here on its next run\n")
    written = [fn(report, os.path.join(out_dir, name)) for name, fn in PLOT_FILES.items()]
    return [p for p in written if p is not None]


def plots_folder_is_ours(out_dir) -> bool:
    """Whether write_plots may fill ``out_dir``: it is missing or empty, holds our mark, or
    (written before the mark) holds nothing but plots of ours."""
    if not os.path.isdir(out_dir):
        return not os.path.exists(out_dir)
    names = set(os.listdir(out_dir))
    return PLOTS_MARK in names or names <= set(PLOT_FILES)
