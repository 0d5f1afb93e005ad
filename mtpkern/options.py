"""``DecodeOptions``: how to decode, one dataclass validated once and shared by ``generate``,
``Decoder``, ``BatchDecoder`` and the CLI.

The options say *how* (strategy, tree, acceptance, sampling, kernels, CUDA graphs); the engines
say *where* (one model, its cache). Checks that need no model run when the options are made;
``check_model`` adds the ones that need it (the strategy's heads, the device's graphs), and
``static_tree`` turns a tree spec into a ``Tree`` (or a dynamic tree's node budget). The
calibrated ``"auto"`` tree is planned by ``mtpkern.autotree`` (above the step core, which it
times): the engines ask it once when built, and the core takes the ``Tree`` it gives.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

from mtpkern.graphs import graphs_available
from mtpkern.models import GPT2, MedusaModel, MTPModel
from mtpkern.ops import _backend
from mtpkern.ops.fused_logits import MAX_K
from mtpkern.tree import MC_SIM_7B_63, Tree

STRATEGIES = ("ntp", "mtp", "medusa")
ACCEPTANCE = ("greedy", "typical", "rejection")
KERNELS = ("auto", "eager", "fused")
DYNAMIC_NODES = 16  # tree="dynamic": draft nodes per step unless "dynamic:N" says otherwise
TREE_KINDS = "'chain:3', '4,2,1', 'mc_sim_7b_63', 'auto', 'dynamic' or 'dynamic:N'"

TreeSpec = Tree | Sequence[Sequence[int]] | str | None


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode.

    strategy: "ntp" (one token per forward; on an MTP or MEDUSA model, its next-token head
        alone), "mtp" (self-speculation with an MTPModel's heads) or "medusa" (a MedusaModel's
        heads).
    tree: a ``Tree``, MEDUSA choices (``[[0], [1], [0, 0]]``), a spec for ``Tree.parse``
        ("chain:3", "4,2,1", "mc_sim_7b_63"), "auto" (the calibrated tree for this device,
        planned by ``mtpkern.autotree``), "dynamic" or "dynamic:N" (N draft nodes chosen per
        step from the heads' probabilities), or None: "auto" when the model carries
        calibration, else the default tree.
    acceptance: "greedy" (temperature 0: the tokens of greedy "ntp"), "rejection" (chains, trees
        and dynamic trees of sampled drafts, temperature > 0: exactly the model's sampling
        distribution) or "typical"
        (MEDUSA's rule: accept while p(token) > min(typical_epsilon, typical_alpha *
        exp(-entropy)), the next root the model's argmax).
    temperature, top_k, top_p: sampling ("ntp", or acceptance "rejection"); 0 is greedy.
    kernels: "eager" (every op's eager reference, dense-mask attention), "fused" (the fused
        ops and tree attention) or "auto" (fused on CUDA; on the CPU eager logits and attention
        with the C++ extension's verification and KV compaction, when built).
    cuda_graph: replay steps from CUDA graphs (CUDA only).
    """

    strategy: str = "ntp"
    tree: TreeSpec = None
    acceptance: str = "greedy"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    typical_epsilon: float = 0.09
    typical_alpha: float = 0.3
    kernels: str = "auto"
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.acceptance not in ACCEPTANCE:
            raise ValueError(f"unknown acceptance {self.acceptance!r}; choose one of {', '.join(ACCEPTANCE)}")
        if self.kernels not in KERNELS:
            raise ValueError(f"unknown kernels {self.kernels!r}; choose one of {', '.join(KERNELS)}")
        _check_sampling(self.temperature, self.top_k, self.top_p)
        _check_typical(self.typical_epsilon, self.typical_alpha)
        if not isinstance(self.cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True or False, got {self.cuda_graph!r}")
        object.__setattr__(self, "temperature", float(self.temperature))
        if self.strategy != "ntp":
            self._check_acceptance()
        elif self.tree is not None:
            raise ValueError("tree applies to strategy 'mtp' or 'medusa', not 'ntp'")

    def _check_acceptance(self) -> None:
        if self.acceptance == "greedy" and self.temperature > 0:
            raise ValueError("acceptance 'greedy' decodes deterministically; with temperature > 0 use "
                             "acceptance='rejection' or 'typical'")
        if self.acceptance in ("typical", "rejection") and self.temperature == 0:
            raise ValueError(f"acceptance {self.acceptance!r} samples: it needs temperature > 0 (or use 'greedy')")
        if self.acceptance != "rejection" and (self.top_k or self.top_p < 1.0):
            raise ValueError("top_k / top_p apply to sampling: strategy 'ntp' or acceptance 'rejection'")

    def replace(self, **changes) -> DecodeOptions:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def sampling(self) -> bool:
        """Whether decoding draws tokens (``ntp`` sampling, rejection sampling). Typical
        acceptance draws nothing: its drafts are top-k and its next root the argmax."""
        return self.temperature > 0 and (self.strategy == "ntp" or self.acceptance == "rejection")

    def fused_on(self, device, model=None) -> bool:
        """Whether the forward pass runs the fused kernels on ``device`` (a ``torch.device``, or
        the model itself, on its device): ``"fused"``, or ``"auto"`` on CUDA. Given the model,
        never for a family the fused layer kernels do not serve (``model.fused_layers``: GPT-2's
        and the Llama family's blocks both have them)."""
        if model is None and hasattr(device, "fused_layers"):
            device, model = device.device, device
        if model is not None and not model.fused_layers:
            return False  # check_model refuses kernels="fused" for such a model
        return self.kernels == "fused" or (self.kernels == "auto" and device.type == "cuda")

    @property
    def ops_backend(self) -> str | None:
        """Verification and KV compaction: the C++ kernels wherever built (they beat the eager
        references on the CPU too), the references for ``kernels="eager"``."""
        return "eager" if self.kernels == "eager" else ("cuda" if _backend.HAS_CUDA_EXT else None)

    def check_model(self, model) -> None:
        """The checks that need the model: its family has the strategy's heads, and CUDA
        graphs have a CUDA device."""
        if not isinstance(model, (GPT2, MTPModel, MedusaModel)):  # GPT2 includes its sibling family Llama
            raise TypeError(f"model must be a GPT2, Llama, MTPModel or MedusaModel, got {type(model).__name__}")
        if self.strategy == "mtp" and not (isinstance(model, MTPModel) and model.n_heads > 1):
            raise ValueError(f"strategy 'mtp' needs an MTPModel with at least 2 heads, got a {_describe(model)}")
        if self.strategy == "medusa" and not isinstance(model, MedusaModel):
            raise ValueError(f"strategy 'medusa' needs a MedusaModel, got a {_describe(model)}")
        if self.kernels == "fused" and not model.fused_layers:
            raise ValueError(f"kernels='fused': the fused layer kernels do not serve a {model.config.family} "
                             f"model; use kernels='eager' or 'auto'")
        if self.cuda_graph and not graphs_available(model.device):
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {model.device}")

    def static_tree(self, model) -> tuple[Tree | None, int]:
        """(the tree to verify, or None for ``ntp`` and dynamic trees; a dynamic tree's node
        budget, else 0). ``tree="auto"`` must have been planned already (``mtpkern.autotree``)."""
        if self.strategy == "ntp":
            return None, 0
        tree = self.tree
        if isinstance(tree, str):
            spec = tree.strip().lower()
            if not spec:
                raise ValueError(f"the tree spec is empty: give one ({TREE_KINDS}), or None for the default tree")
            if spec == "auto":
                raise ValueError("tree='auto' is planned from the model's calibration above the engines: decode "
                                 "with mtpkern.generate, or pass tree=mtpkern.auto_tree(model, ...)")
            if spec == "dynamic" or spec.startswith("dynamic:"):
                return None, _dynamic_nodes(spec, model)
            tree = Tree.parse(tree)
        elif tree is None:
            tree = default_tree(model, self.strategy, self.acceptance)
        elif not isinstance(tree, Tree):
            if not isinstance(tree, (list, tuple)):
                raise TypeError(f"tree must be a Tree, a list of paths like [[0], [1], [0, 0]], a spec ({TREE_KINDS}) "
                                f"or None, got {type(tree).__name__}")
            tree = Tree(tree)
        if len(tree) == 1:
            raise ValueError("the tree has no draft nodes; use strategy='ntp'")
        tree.check(n_heads=model.n_heads - 1, topk=min(MAX_K, model.config.vocab_size))
        return tree, 0

    @property
    def wants_auto(self) -> bool:
        """Whether the tree is the calibrated ``"auto"`` one."""
        return isinstance(self.tree, str) and self.tree.strip().lower() == "auto"


def default_tree(model, strategy: str, acceptance: str = "greedy") -> Tree:
    """mtp, and rejection sampling: a chain over every draft head (blockwise parallel
    decoding). medusa: MEDUSA's ``mc_sim_7b_63`` tree, cut to the model's number of MEDUSA
    heads and to the vocabulary."""
    drafts = model.n_heads - 1
    if strategy == "mtp" or acceptance == "rejection":
        return Tree.chain(drafts)
    top = min(10, model.config.vocab_size)
    return Tree([p for p in MC_SIM_7B_63 if len(p) <= drafts and max(p) < top])


def _dynamic_nodes(spec: str, model) -> int:
    if spec == "dynamic":
        return DYNAMIC_NODES
    text = spec[len("dynamic:"):]
    try:
        n = int(text)
    except ValueError:
        n = 0
    limit = model.config.n_positions - 2
    if not 1 <= n <= limit:
        raise ValueError(f"tree {spec!r}: the node budget must be an int in [1, {limit}], got {text!r}")
    return n


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_sampling(temperature, top_k, top_p) -> None:
    if not _number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not _number(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no limit), got {top_k!r}")


def _check_typical(epsilon, alpha) -> None:
    for name, x in (("typical_epsilon", epsilon), ("typical_alpha", alpha)):
        if not _number(x) or not math.isfinite(x) or x < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")


def _describe(model) -> str:
    return f"{type(model).__name__} with {model.n_heads} head(s)"


def engine_options(strategy, options, keywords: dict, where: str) -> DecodeOptions:
    """An engine's or ``generate``'s options: ``options`` (a ``DecodeOptions``, which may come
    positionally as ``strategy``), with the keyword ``keywords`` applied over it, or the options
    the keywords alone make; ``strategy`` given as a string is the ``strategy`` keyword."""
    if isinstance(strategy, DecodeOptions):
        if options is not None:
            raise TypeError(f"{where}: options given twice (positionally and as options=)")
        options, strategy = strategy, None
    if strategy is not None:
        keywords = {**keywords, "strategy": strategy}
    unknown = sorted(set(keywords) - {f.name for f in dataclasses.fields(DecodeOptions)})
    if unknown:
        raise TypeError(f"{where}: unknown option {unknown[0]!r}; the options are the fields of "
                        f"DecodeOptions: {', '.join(f.name for f in dataclasses.fields(DecodeOptions))}")
    if options is None:
        return DecodeOptions(**keywords)
    if not isinstance(options, DecodeOptions):
        raise TypeError(f"{where}: options must be a DecodeOptions, got {type(options).__name__}")
    return options.replace(**keywords) if keywords else options


__all__ = ["DecodeOptions", "default_tree", "engine_options", "STRATEGIES", "ACCEPTANCE", "KERNELS", "DYNAMIC_NODES"]
