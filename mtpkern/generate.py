"""Decoding: plain next-token decoding and lossless speculative decoding with the model's own heads.

The state of a generation is explicit: one static KV cache for all layers, ``prefix_len``
(how many tokens the cache holds) and the *root*, the next token, already chosen but not yet
in the cache. Every step runs one forward pass of the target model:

- ``decode_step`` (``ntp``): the root alone; its head-0 logits choose the next root.
- ``speculative_step`` (``mtp``, ``medusa``, greedy or typical acceptance): the root and a
  tree of draft tokens (the heads' top-k at the last accepted position, see ``mtpkern.tree``)
  in one pass, each node at position ``prefix_len + depth`` and attending to the prefix and
  its ancestors. Head 0 at each node says what the model itself would decode after it;
  ``verify_greedy`` keeps the longest root-to-leaf path whose drafts all agree with it, plus
  the model's own next token (the new root). The accepted path's K/V move into place
  (``kv_compact_``), and the heads at the last accepted node give the next drafts: the pass
  that verifies also proposes (Stern et al. 2018; Gloeckle et al. 2024; Cai et al. 2024).
- ``rejection_step`` (chains, temperature > 0): speculative sampling (Leviathan et al. 2023;
  Chen et al. 2023), which keeps the target's sampling distribution exactly.

Greedy speculative decoding therefore emits exactly the tokens greedy ``ntp`` emits: a
draft is kept only where it equals the model's own argmax given the same prefix.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from mtpkern.model import GPT2, Attn, KVCache, MedusaModel, MTPModel
from mtpkern.ops.fused_logits import MAX_K, fused_logits
from mtpkern.ops.kv_compact import kv_compact_
from mtpkern.ops.verify import verify_greedy, verify_typical
from mtpkern.tree import MC_SIM_7B_63, Tree, TreeTensors

STRATEGIES = ("ntp", "mtp", "medusa")
ACCEPTANCE = ("greedy", "typical", "rejection")
KERNELS = ("auto", "eager", "fused")


@dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens (an EOS that ended the output included)
    num_steps: int  # target forward passes after the prefill
    accept_lengths: list[int]  # tokens the verifier accepted per step (drafts + its own token),
    #                            before truncation at EOS / max_new_tokens
    step_times: list[float] = field(default_factory=list)  # seconds per step, synchronised
    prefill_time: float = 0.0
    total_time: float = 0.0

    @property
    def mean_accept_length(self) -> float:
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.total_time if self.total_time > 0 else 0.0

    @property
    def forwards_per_token(self) -> float:
        """Target forward passes (the prefill included) per generated token."""
        return (1 + self.num_steps) / len(self.tokens) if self.tokens else 0.0


# ----------------------------------------------------------------------------- sampling


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) [R, V], restricted to the top_k tokens (0 = all) and to
    the nucleus: the smallest set of most likely tokens whose probability reaches top_p (the
    most likely token is always kept), renormalised."""
    z = logits.float() / temperature
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
        drop = (before >= top_p).scatter(-1, order, before >= top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def speculative_sample(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                       generator: torch.Generator | None = None) -> list[int]:
    """Speculative sampling of a chain (Leviathan et al. 2023, Chen et al. 2023).

    p [n+1, V]: the target's distribution after the root and after each draft; q [n, V]: the
    draft distributions the n drafts were sampled from. Draft i is accepted with probability
    min(1, p_i(x_i) / q_i(x_i)); at the first rejection the token is resampled from
    normalize(max(0, p_i - q_i)) and the chain stops; if all are accepted, a bonus token is
    sampled from p_n. Each emitted token is then distributed exactly as p given the prefix.
    Returns the accepted drafts followed by the one sampled token.
    """
    n = drafts.numel()
    idx = torch.arange(n, device=p.device)
    u = torch.rand(n, device=p.device, generator=generator)
    accept = u * q[idx, drafts] < p[idx, drafts]
    a = int(accept.int().cumprod(0).sum())
    if a < n:
        residual = (p[a] - q[a]).clamp_min(0.0)
        # p == q up to rounding: a rejection has probability ~0 and its residual is all
        # rounding noise; p itself is the right distribution then.
        dist = residual if residual.sum() > 1e-6 else p[a]
    else:
        dist = p[n]
    x = torch.multinomial(dist, 1, generator=generator)
    return drafts[:a].tolist() + x.tolist()


# ----------------------------------------------------------------------------- forward passes


def _eager_mask(dense: torch.Tensor, prefix_len: torch.Tensor, span: int) -> torch.Tensor:
    """bool [T, span]: every slot below prefix_len, and tree node j (slot prefix_len + j) where
    dense[i, j]. Built on the device from a tensor prefix_len, so a CUDA graph can replay it."""
    T = dense.shape[0]
    rel = torch.arange(span, device=dense.device) - prefix_len
    in_tree = (rel >= 0) & (rel < T)
    return (rel < 0)[None, :] | (dense[:, rel.clamp(0, T - 1)] & in_tree[None, :])


def tree_step(model, cache: KVCache, tokens: torch.Tensor, prefix_len: torch.Tensor, tt: TreeTensors,
              *, heads: int, span: int, fused: bool) -> torch.Tensor:
    """One forward pass over T tree tokens [T] at cache slots prefix_len + i and positions
    prefix_len + depth[i]. Returns the hidden states [T, heads, D]. ``span``: how many cache
    slots eager attention looks at (prefix_len + T, or the whole cache for a CUDA graph)."""
    T = tokens.shape[0]
    slots = prefix_len + torch.arange(T, device=tokens.device)
    if fused:
        attn = Attn(cache, slots, tree_mask=tt.mask, prefix_len=prefix_len)
    else:
        attn = Attn(cache, slots, mask=_eager_mask(tt.dense_mask, prefix_len, span))
    return model(tokens[None], prefix_len + tt.depth, attn=attn, heads=heads, logits=False).hidden[0]


def prefill(model, cache: KVCache, input_ids: torch.Tensor, *, heads: int) -> torch.Tensor:
    """Run the prompt [P] through the model at slots 0..P-1 and return the hidden states of
    its last position [heads, D] (the other positions only fill the cache)."""
    P = input_ids.shape[0]
    _check_room(cache, 0, P)
    # A causal mask through eager attention in every kernels mode: the tree kernel is made
    # for short trees over a long prefix, the prompt is the opposite.
    pos = torch.arange(P, device=input_ids.device)
    causal = torch.ones(P, P, dtype=torch.bool, device=input_ids.device).tril()
    out = model(input_ids[None], pos, attn=Attn(cache, pos, mask=causal), heads=heads,
                select=pos[-1:], logits=False)
    return out.hidden[0, 0]


def _check_room(cache: KVCache, prefix_len: int, T: int) -> None:
    if prefix_len + T > cache.max_len:
        raise RuntimeError(
            f"KV cache overflow: writing {T} tokens at slot {prefix_len} needs {prefix_len + T} slots "
            f"but the cache has {cache.max_len}"
        )


def draft_topk(model, hidden: torch.Tensor, depth: int, k: int, backend: str | None) -> torch.Tensor:
    """Top-k token ids [depth, k] of draft heads 1..depth, from one position's hidden states
    [heads, D]."""
    if all(model.head_weight(j) is model.unembed_weight for j in range(1, depth + 1)):
        return fused_logits(hidden[1 : depth + 1], model.unembed_weight, k, backend=backend).topk_indices
    return torch.cat([
        fused_logits(hidden[j : j + 1], model.head_weight(j), k, backend=backend).topk_indices
        for j in range(1, depth + 1)
    ])


def tree_candidates(root: torch.Tensor, topk: torch.Tensor, tt: TreeTensors) -> torch.Tensor:
    """The tree's tokens [T]: the root, then node i's rank-th token of its draft head."""
    return torch.cat([root.view(1), topk[tt.head_row, tt.rank]])


# ----------------------------------------------------------------------------- decoding steps


@dataclass
class _Engine:
    """What every step needs, fixed for one generation."""

    model: torch.nn.Module
    cache: KVCache
    tree: Tree | None  # None for ntp
    tt: TreeTensors  # the tree's buffers (a root-only tree for ntp)
    heads: int  # heads computed per forward: 1 + the tree's depth
    fused: bool
    backend: str | None  # the ops' backend: "eager" or automatic
    forward: Callable  # (tokens [T], prefix_len int) -> hidden [T, heads, D]


def _device_int(value: int, device: torch.device) -> torch.Tensor:
    """A 0-d int64 tensor on ``device`` without a host sync (torch.tensor(value, device=cuda)
    copies from pageable memory and waits for the stream)."""
    return torch.full((), value, dtype=torch.long, device=device)


def _make_forward(model, cache, tt, heads, fused, cuda_graph):
    if not cuda_graph:
        def forward(tokens, prefix_len: int):
            _check_room(cache, prefix_len, tokens.shape[0])
            p = _device_int(prefix_len, tokens.device)
            return tree_step(model, cache, tokens, p, tt, heads=heads, span=prefix_len + tokens.shape[0], fused=fused)

        return forward
    graphed = _CudaGraphStep(
        lambda tokens, p: tree_step(model, cache, tokens, p, tt, heads=heads, span=cache.max_len, fused=fused),
        tt.depth.shape[0], cache.k.device,
    )

    def forward(tokens, prefix_len: int):
        _check_room(cache, prefix_len, tokens.shape[0])
        return graphed(tokens, prefix_len)

    return forward


class _CudaGraphStep:
    """One fixed-shape forward pass captured in a CUDA graph, replayed with new tokens and a
    new prefix_len through static input buffers (gpt-fast's recipe without the compiler).

    The warm-up and capture runs write garbage K/V at slots prefix_len.. of the cache; those
    slots are beyond every prefix read later and are overwritten before they are attended to.
    """

    def __init__(self, fn, T: int, device: torch.device):
        self.tokens = torch.zeros(T, dtype=torch.long, device=device)
        self.prefix_len = torch.zeros((), dtype=torch.long, device=device)
        # torch.cuda.graph captures on the current device: make it the model's (cuda:1 while
        # cuda:0 is current would otherwise run the kernels eagerly and capture nothing).
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # lazy initialisation (cuBLAS handles, Triton compiles) outside the graph
                    fn(self.tokens, self.prefix_len)
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fn(self.tokens, self.prefix_len)

    def __call__(self, tokens: torch.Tensor, prefix_len: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.prefix_len.fill_(prefix_len)
        self.graph.replay()
        return self.out


def decode_step(eng: _Engine, root: torch.Tensor, prefix_len: int, sample) -> torch.Tensor:
    """NTP: put the root in the cache; return the next token (0-d), ``sample``d from the
    head-0 hidden states [1, D]."""
    return sample(eng.forward(root.view(1), prefix_len)[:, 0])[0]


def speculative_step(eng: _Engine, root: torch.Tensor, topk: torch.Tensor, prefix_len: int, *,
                     acceptance: str, temperature: float, epsilon: float, alpha: float):
    """Verify the tree of drafts ``topk`` [depth, k] below ``root`` in one pass.

    Returns (accepted tokens as a host list: the accepted drafts and the model's own next
    token, which is the next root; the next root (0-d); the next drafts' top-k).
    """
    tt, model, b = eng.tt, eng.model, eng.backend
    tokens = tree_candidates(root, topk, tt)
    hidden = eng.forward(tokens, prefix_len)  # [T, heads, D]
    target = fused_logits(hidden[:, 0], model.head_weight(0), 1, backend=b).argmax
    if acceptance == "greedy":
        res = verify_greedy(tokens, target, tt.paths, backend=b)
    else:
        # p(node | parent) and the parent's entropy, both at the sampling temperature.
        st = fused_logits(hidden[tt.parents[1:], 0], model.head_weight(0), 1, tokens[1:],
                          scale=1.0 / temperature, backend=b)
        one, zero = st.lse.new_ones(1), st.lse.new_zeros(1)
        node_prob = torch.cat([one, torch.exp(st.target_logit - st.lse)])
        parent_entropy = torch.cat([zero, st.entropy])
        res = verify_typical(tokens, target, node_prob, parent_entropy, tt.paths,
                             epsilon=epsilon, alpha=alpha, backend=b)
    count = res.accept_len + 1
    if not eng.tree.is_chain:  # a chain's accepted path is already in place
        # index_select, not tt.paths[res.best_path]: indexing with a 0-d tensor calls .item().
        path = tt.paths.index_select(0, res.best_path.view(1))[0]
        kv_compact_(eng.cache.k, eng.cache.v, path, _device_int(prefix_len, tokens.device), count, backend=b)
    last = hidden.index_select(0, res.last_node.view(1))[0]  # [heads, D]
    next_topk = draft_topk(model, last, eng.tree.max_depth, topk.shape[1], b)
    next_root = res.tokens.gather(0, res.accept_len.view(1))[0]
    host = torch.cat([res.accept_len.view(1), res.tokens]).tolist()  # the step's one host sync
    return host[1 : 2 + host[0]], next_root, next_topk


def rejection_step(eng: _Engine, root: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, prefix_len: int,
                   probs: Callable, generator):
    """Speculative sampling over the chain root, drafts [n] (sampled from q [n, V]).

    Returns (emitted tokens as a host list, the next root (0-d), the next drafts and their
    distributions, from the draft heads at the last accepted node)."""
    tokens = torch.cat([root.view(1), drafts])
    hidden = eng.forward(tokens, prefix_len)
    p = probs(eng.model.head_logits(hidden[:, 0], 0))
    out = speculative_sample(p, q, drafts, generator)
    a = len(out) - 1  # the chain's nodes 0..a are accepted and already in place
    next_q = torch.cat([probs(eng.model.head_logits(hidden[a : a + 1, j], j)) for j in range(1, drafts.numel() + 1)])
    next_drafts = torch.multinomial(next_q, 1, generator=generator)[:, 0]
    return out, torch.tensor(out[-1], device=root.device), next_drafts, next_q


# ----------------------------------------------------------------------------- entry point


def default_tree(model, strategy: str, acceptance: str = "greedy") -> Tree:
    """mtp, and rejection sampling: a chain over every draft head (blockwise parallel
    decoding). medusa: MEDUSA's ``mc_sim_7b_63`` tree, cut to the model's number of MEDUSA
    heads and to the vocabulary."""
    drafts = model.n_heads - 1
    if strategy == "mtp" or acceptance == "rejection":
        return Tree.chain(drafts)
    top = min(10, model.config.vocab_size)
    return Tree([p for p in MC_SIM_7B_63 if len(p) <= drafts and max(p) < top])


def _resolve_tree(model, strategy: str, tree, acceptance: str) -> Tree | None:
    if strategy == "ntp":
        if tree is not None:
            raise ValueError("tree applies to strategy 'mtp' or 'medusa', not 'ntp'")
        return None
    if tree is None:
        tree = default_tree(model, strategy, acceptance)
    elif not isinstance(tree, Tree):
        tree = Tree(tree)
    if len(tree) == 1:
        raise ValueError("the tree has no draft nodes; use strategy='ntp'")
    tree.check(n_heads=model.n_heads - 1, topk=min(MAX_K, model.config.vocab_size))
    return tree


def _prompt(input_ids, vocab_size: int, device) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(
                f"input_ids has batch size {ids.shape[0]}: generate decodes one sequence at a time (batch 1)"
            )
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be [T] or [1, T], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("the prompt is empty: generate needs at least one input token")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must hold integer token ids, got {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size})")
    return ids.to(device=device, dtype=torch.long)


def _check_args(model, strategy, acceptance, kernels, temperature, top_k, top_p, max_new_tokens, cuda_graph):
    if not isinstance(model, (GPT2, MTPModel, MedusaModel)):
        raise TypeError(f"model must be a GPT2, MTPModel or MedusaModel, got {type(model).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "mtp" and not (isinstance(model, MTPModel) and model.n_heads > 1):
        raise ValueError(f"strategy 'mtp' needs an MTPModel with at least 2 heads, got a {_describe(model)}")
    if strategy == "medusa" and not isinstance(model, MedusaModel):
        raise ValueError(f"strategy 'medusa' needs a MedusaModel, got a {_describe(model)}")
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"unknown acceptance {acceptance!r}; choose one of {', '.join(ACCEPTANCE)}")
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no limit), got {top_k!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if strategy != "ntp":
        if acceptance == "greedy" and temperature > 0:
            raise ValueError(
                "acceptance 'greedy' decodes deterministically; with temperature > 0 use "
                "acceptance='rejection' (chains) or 'typical'"
            )
        if acceptance in ("typical", "rejection") and temperature == 0:
            raise ValueError(f"acceptance {acceptance!r} samples: it needs temperature > 0 (or use 'greedy')")
        if acceptance != "rejection" and (top_k or top_p < 1.0):
            raise ValueError("top_k / top_p apply to sampling: strategy 'ntp' or acceptance 'rejection'")
    if cuda_graph and model.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {model.device}")


def _describe(model) -> str:
    return f"{type(model).__name__} with {model.n_heads} head(s)"


def _engine(model, tree: Tree | None, cache_len: int, fused: bool, backend, cuda_graph: bool) -> _Engine:
    tt = (tree or Tree.chain(0)).tensors(model.device)
    heads = 1 + (tree.max_depth if tree is not None else 0)
    if not cuda_graph:
        cache = model.new_cache(1, cache_len)
        return _Engine(model, cache, tree, tt, heads, fused, backend,
                       _make_forward(model, cache, tt, heads, fused, False))
    # Captured graphs and their cache live on the model (a cycle the garbage collector frees
    # with it) and serve later calls with the same tree and kernels. One cache spans the
    # whole context, so one graph serves every prompt length. A graph reads the weights at
    # the addresses it was captured with: once any moved (model.to(), load_state_dict with
    # assign=True), every graph is stale and is dropped.
    weights = [t.data_ptr() for t in (*model.parameters(), *model.buffers())]
    cached = model.__dict__.get("_mtpkern_decode_graphs")
    if cached is None or cached[0] != weights:
        cached = model.__dict__["_mtpkern_decode_graphs"] = (weights, {})
    graphs = cached[1]
    key = (tree, fused, model.dtype, model.device)
    if key not in graphs:
        cache = model.new_cache(1, model.config.n_positions)
        graphs[key] = _Engine(model, cache, tree, tt, heads, fused, backend,
                              _make_forward(model, cache, tt, heads, fused, True))
    return graphs[key]


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def generate(
    model,
    input_ids,
    *,
    max_new_tokens: int,
    strategy: str = "ntp",
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    acceptance: str = "greedy",
    tree: Tree | Sequence[Sequence[int]] | None = None,
    eos_token_id: int | None = None,
    cuda_graph: bool = False,
    generator: torch.Generator | None = None,
    kernels: str = "auto",
    typical_epsilon: float = 0.09,
    typical_alpha: float = 0.3,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` ([T] or [1, T]; batch 1).

    strategy: "ntp" (one token per forward; on an MTP or MEDUSA model, its next-token head
        alone), "mtp" (self-speculation with an MTPModel's heads) or "medusa" (a MedusaModel's
        heads). ``tree``: a ``Tree`` or MEDUSA choices list over the heads' top-k (default: see
        ``default_tree``).
    temperature 0 is greedy. With temperature > 0: "ntp" samples (top_k, top_p); speculative
        strategies need acceptance "rejection" (chains; exactly the target's distribution) or
        "typical" (MEDUSA's rule: accept while p(token) > min(epsilon, alpha * exp(-entropy)),
        the next root being the model's argmax).
    Greedy acceptance is lossless: the tokens equal greedy "ntp" of the same model.
    kernels: "eager" (every op's eager reference, dense-mask attention), "fused" (the fused
        ops and tree attention) or "auto" (fused on CUDA, eager on CPU).
    cuda_graph: replay the fixed-shape forward passes from CUDA graphs (CUDA only).
    The output ends at the first ``eos_token_id`` (included) and never exceeds max_new_tokens.
    """
    _check_args(model, strategy, acceptance, kernels, temperature, top_k, top_p, max_new_tokens, cuda_graph)
    tree = _resolve_tree(model, strategy, tree, acceptance)
    if acceptance == "rejection" and tree is not None and not tree.is_chain:
        raise ValueError("acceptance 'rejection' is implemented for chains of drafts only, not trees")
    ids = _prompt(input_ids, model.config.vocab_size, model.device)
    P0, T = ids.shape[0], len(tree) if tree is not None else 1
    # The last step starts with at most max_new_tokens - 1 tokens emitted (its root not yet
    # cached) and writes T slots.
    need = P0 + max_new_tokens + T - 2
    ctx = model.config.n_positions
    if need > ctx:
        over = need - ctx
        what = f"prompt ({P0} tokens) + max_new_tokens ({max_new_tokens})"
        what += f" + tree ({T} nodes)" if tree is not None else ""
        hint = (f"lower max_new_tokens to at most {max_new_tokens - over}" if max_new_tokens > over
                else "shorten the prompt")
        raise ValueError(f"{what} needs {need} cache slots, {over} more than the model's context of {ctx}; {hint}")
    fused = kernels == "fused" or (kernels == "auto" and model.device.type == "cuda")
    backend = None if fused else "eager"
    eng = _engine(model, tree, need, fused, backend, cuda_graph)
    device = model.device
    # Typical acceptance samples nothing: its drafts are top-k and its next root the argmax.
    sampling = temperature > 0 and (tree is None or acceptance == "rejection")

    def probs(logits):
        return sampling_probs(logits, temperature, top_k, top_p)

    def next_token(h):  # h [R, D] head-0 hidden states -> [R] tokens
        if sampling:
            return torch.multinomial(probs(model.head_logits(h, 0)), 1, generator=generator)[:, 0]
        return fused_logits(h, model.head_weight(0), 1, backend=backend).argmax

    out: list[int] = []
    accept_lengths: list[int] = []
    step_times: list[float] = []

    def emit(chunk) -> bool:
        """Append tokens up to EOS / max_new_tokens; True when generation is over."""
        for t in chunk:
            out.append(t)
            if t == eos_token_id or len(out) == max_new_tokens:
                return True
        return False

    t0 = _sync(device)
    h = prefill(model, eng.cache, ids, heads=eng.heads)  # [heads, D]
    root = next_token(h[:1])[0]
    if tree is not None and acceptance == "rejection":
        q = torch.cat([probs(model.head_logits(h[j : j + 1], j)) for j in range(1, T)])
        drafts = torch.multinomial(q, 1, generator=generator)[:, 0]
    elif tree is not None:
        topk = draft_topk(model, h, tree.max_depth, tree.topk, backend)
    done = emit([int(root)])
    t1 = _sync(device)
    prefill_time = t1 - t0
    prefix_len = P0
    while not done:
        ts = time.perf_counter()
        if tree is None:
            root = decode_step(eng, root, prefix_len, next_token)
            chunk = [int(root)]
        elif acceptance == "rejection":
            chunk, root, drafts, q = rejection_step(eng, root, drafts, q, prefix_len, probs, generator)
        else:
            chunk, root, topk = speculative_step(
                eng, root, topk, prefix_len, acceptance=acceptance, temperature=temperature,
                epsilon=typical_epsilon, alpha=typical_alpha,
            )
        prefix_len += len(chunk)  # the root and the accepted drafts are now in the cache
        accept_lengths.append(len(chunk))
        done = emit(chunk)
        step_times.append(_sync(device) - ts)
    total = _sync(device) - t0
    return GenerationResult(out, len(step_times), accept_lengths, step_times, prefill_time, total)


__all__ = [
    "GenerationResult", "generate", "prefill", "decode_step", "tree_step", "speculative_step",
    "rejection_step", "speculative_sample", "sampling_probs", "default_tree", "draft_topk",
    "tree_candidates", "STRATEGIES", "ACCEPTANCE", "KERNELS",
]
