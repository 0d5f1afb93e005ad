"""The calibrated ``"auto"`` tree, planned above the engines (FlashInfer's split: plan, then run).

``plan_tree`` reads the model's calibration (``mtpkern.calibration``: each head's acceptance
per rank), the engine's step cost on this device (``mtpkern.costmodel``, which times engine
steps) and gives the planner (``mtpkern.planner``, pure) both: the tree that maximises expected
tokens per second; at a ``temperature`` (rejection sampling), from the calibration's table of
sampled drafts measured nearest that temperature, against the cost of sampling steps.
``auto_tree`` caches it per model and setting. ``resolve_options`` turns a ``DecodeOptions``
whose tree is ``"auto"`` (or None on a calibrated model) into one whose tree is that ``Tree``,
for the engines, which take trees and never plan.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from mtpkern.calibration import Calibration
from mtpkern.costmodel import cost_depths, step_cost
from mtpkern.options import DecodeOptions, default_tree
from mtpkern.planner import TreePlan, check_budget, max_draft_nodes, optimise_tree_depths
from mtpkern.runtime import dtype_name, resolve_dtype
from mtpkern.tree import Tree


def has_calibration(model) -> bool:
    """Whether ``model`` carries head-acceptance calibration (``mtpkern calibrate``)."""
    return getattr(model, "calibration", None) is not None


def plan_tree(model, *, kernels: str = "auto", cuda_graph: bool = False, max_nodes: int | None = None,
              calibration: Calibration | None = None, temperature: float | None = None) -> TreePlan:
    """The optimised tree of ``model`` (its calibration, or ``calibration``) on its device; with
    ``temperature``, for rejection sampling, from the sampled-draft table measured nearest it
    (ValueError if none was measured)."""
    cal = calibration if calibration is not None else getattr(model, "calibration", None)
    if cal is None:
        raise ValueError("the model has no calibration: run `mtpkern calibrate` on its checkpoint")
    cal.check(model)
    limit = max_draft_nodes(model)
    if max_nodes is not None:
        check_budget(max_nodes, limit)
    table = None if temperature is None else cal.sampling_table(temperature)
    if temperature is not None and table is None:
        raise ValueError("the calibration has no table of sampled drafts: run `mtpkern calibrate --temperature T` "
                         "on its checkpoint")
    costs = {d: step_cost(model, kernels=kernels, cuda_graph=cuda_graph, depth=d, sampling=table is not None)
             for d in cost_depths(model)}
    T = min(limit, max_nodes or limit) + 1
    if table is not None:
        return optimise_tree_depths(table["accept"], costs, max_tokens=T, sampled=True)
    return optimise_tree_depths(cal.accept, costs, max_tokens=T, ranks=cal.ranks)


_warned_uncalibrated = False
_auto_trees: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {setting: (calibration, tree)}


def auto_tree(model, *, device=None, dtype=None, kernels: str = "auto", cuda_graph: bool = False,
              max_nodes: int | None = None, temperature: float | None = None) -> Tree | None:
    """The tree that maximises expected tokens/s for this checkpoint on this device, or None
    (with a warning, once per process) when the model has no calibration. ``device`` and
    ``dtype``, when given, must be the model's: the step cost is measured on the model as it is.
    ``temperature``: the tree for rejection sampling at that temperature, planned from the
    sampled-draft table measured nearest it; None (with a warning, once per model) when the
    calibration has none."""
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
    cal = model.calibration
    table = None if temperature is None else cal.sampling_table(temperature)
    if temperature is not None and table is None:
        _warn_unsampled(model)
        return None
    # Planned once per model and setting: generate() may ask on every call.
    measured = None if table is None else table["temperature"]
    key = (model.device, model.dtype, kernels, bool(cuda_graph), max_nodes, measured)
    planned = _auto_trees.setdefault(model, {})
    if key not in planned or planned[key][0] is not cal:
        plan = plan_tree(model, kernels=kernels, cuda_graph=cuda_graph, max_nodes=max_nodes, temperature=measured)
        planned[key] = (cal, plan.tree)
    return planned[key][1]


_warned_unsampled: weakref.WeakSet = weakref.WeakSet()


def _warn_unsampled(model) -> None:
    if model not in _warned_unsampled:
        _warned_unsampled.add(model)
        warnings.warn("tree='auto' with acceptance='rejection': the calibration has no table of sampled drafts "
                      "(run `mtpkern calibrate --temperature T` on its checkpoint); using the default tree",
                      stacklevel=3)


def resolve_options(model, options: DecodeOptions, *, batch: bool = False) -> DecodeOptions:
    """``options`` with its tree planned: ``"auto"``, or None on a calibrated model (for greedy
    and typical acceptance), becomes the calibrated tree for this model, device and kernels
    (``auto_tree``; the default tree without calibration). With ``acceptance="rejection"``,
    ``"auto"`` is planned from the sampled-draft table measured nearest the temperature (the
    default tree, with a warning, when none was measured). ``batch``: for ``BatchDecoder``,
    whose forward pass runs fused kernels or eager attention, never the CPU's mixed mode."""
    if options.strategy == "ntp":
        return options
    wants = options.wants_auto or (options.tree is None and options.acceptance != "rejection"
                                   and has_calibration(model))
    if not wants:
        return options
    kernels = options.kernels
    if batch:
        kernels = "fused" if options.fused_on(model.device, model) else "eager"
    if options.acceptance == "rejection":
        tree = auto_tree(model, kernels=kernels, cuda_graph=options.cuda_graph, temperature=options.temperature)
    else:
        tree = auto_tree(model, kernels=kernels, cuda_graph=options.cuda_graph)
    return options.replace(tree=tree if tree is not None else default_tree(model, options.strategy, options.acceptance))


__all__ = ["auto_tree", "has_calibration", "plan_tree", "resolve_options"]
