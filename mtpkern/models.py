"""One GPT-2 model family: the base model, MTP heads and MEDUSA-1 heads.

Every model maps tokens to J prediction heads; head j at position t predicts token
t + j + 1. J is ``n_heads``, model and config alike: every head, the next-token head (head 0)
included. For ``GPT2`` J = 1. For ``MTPModel`` (Gloeckle et al. 2024) the heads are
transformer blocks on a shared trunk. For ``MedusaModel`` (Cai et al. 2024) head 0 is the
frozen base model and heads 1..J-1 are MEDUSA's residual blocks, so MEDUSA head k (0-based)
predicts token t + k + 2. All heads share one final LayerNorm and the tied unembedding
(MEDUSA heads may have their own projection). ``SpeculativeLM`` is what the three have in
common, and all that the trainer and the decoding engines rely on.

Two families of base model share these interfaces: ``GPT2`` and ``Llama`` (Llama 2 and 3,
Mistral, Qwen2: ``mtpkern.llama``'s blocks); MTP and MEDUSA heads go on either, built from the
config's family. The blocks and the KV cache are in ``mtpkern.layers``; loading a checkpoint (ours or a
Hugging Face GPT-2) is ``mtpkern.hf_io.load_model``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtpkern.checkpoint import atomic_directory
from mtpkern.config import CONFIG_NAME, WEIGHTS_NAME, GPT2Config, LlamaConfig
from mtpkern.cpu_matmul import Matmul, share_layout
from mtpkern.layers import Attn, Block, DecodeWeights, KVCache, MedusaHead, ModelOutput, ResBlock, decode_block
from mtpkern.llama import LlamaBlock, LlamaDecodeWeights, RMSNorm, Rotary, decode_llama_block

ModelConfig = GPT2Config | LlamaConfig


def _init_weights(module: nn.Module):
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def _family_block(config: ModelConfig) -> nn.Module:
    return LlamaBlock(config) if isinstance(config, LlamaConfig) else Block(config)


def _family_norm(config: ModelConfig) -> nn.Module:
    if isinstance(config, LlamaConfig):
        return RMSNorm(config.n_embd, config.rms_norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


def _positions_and_head(model: SpeculativeLM, config: ModelConfig) -> None:
    """A Llama's rotary tables and, with untied embeddings, its own unembedding (``lm_head``)."""
    if isinstance(config, LlamaConfig):
        model.rotary = Rotary(config)
        if not config.tie_word_embeddings:
            model.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)


class SpeculativeLM(nn.Module):
    """A language model with J prediction heads (head j at position t predicts token t + j + 1):
    the base class of ``GPT2`` (J = 1), ``MTPModel`` and ``MedusaModel``, and the one interface
    the trainer and the speculative decoding engines use, so that neither has to ask which
    model it drives. It holds what the three share: the embedding, the KV cache's shape, the
    blocks as the decode path calls them, the unembedding and saving a checkpoint (loading one
    is ``mtpkern.load_model``)."""

    config: ModelConfig
    gradient_checkpointing: bool = False
    calibration = None  # head acceptance (mtpkern.calibration.Calibration), attached by load_model
    # Set by each model (MEDUSA: its base's token embedding; it overrides ``final_norm`` and
    # never calls ``embed``, which read the other two).
    wte: nn.Embedding
    wpe: nn.Embedding  # GPT-2 only; a Llama's positions are rotary
    ln_f: nn.Module
    rotary: Rotary | None = None  # the Llama family's rotary tables
    # A Llama with untied embeddings also has ``lm_head`` (nn.Linear): a submodule, never a class
    # attribute (one would shadow the registered module).

    @property
    def fused_layers(self) -> bool:
        """Whether the fused decoder-layer kernels serve this model's blocks: both families
        have them (GPT-2's ``Block.fused_decode``, the Llama family's ``LlamaBlock.fused_decode``)."""
        return self.config.family in ("gpt2", "llama")

    # number of prediction heads J, the next-token head included (config.n_heads); head j
    # predicts token t + j + 1, heads 1..J-1 are the draft heads
    @property
    def n_heads(self) -> int:
        return self.config.n_heads

    # number of layers with a KV cache
    @property
    def n_cache_layers(self) -> int:
        raise NotImplementedError

    @property
    def unembed_weight(self) -> torch.Tensor:
        """The shared unembedding [V, D] (the tied token embedding, or a Llama's ``lm_head``)."""
        head = self._modules.get("lm_head")
        return self.wte.weight if head is None else cast(nn.Linear, head).weight

    def head_weight(self, j: int) -> torch.Tensor:
        """The unembedding [V, D] of head j."""
        return self.unembed_weight

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def new_cache(self, batch: int, max_len: int, *, dtype=None, device=None) -> KVCache:
        cfg = self.config
        if max_len > cfg.n_positions:
            raise ValueError(f"a cache of {max_len} slots exceeds the model's context of {cfg.n_positions}")
        kv_heads = cfg.n_kv_head if isinstance(cfg, LlamaConfig) else cfg.n_head  # grouped-query attention
        return KVCache(
            self.n_cache_layers, batch, kv_heads, max_len, cfg.head_dim,
            dtype=dtype or self.dtype, device=device or self.device,
        )

    def embed(self, idx: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        T = idx.shape[1]
        if pos is None:
            if T > self.config.n_positions:
                raise ValueError(
                    f"sequence of {T} tokens exceeds the model's context of {self.config.n_positions}"
                )
            pos = torch.arange(T, device=idx.device)
        if self.rotary is not None:
            return self.wte(idx)  # positions are rotary, applied in attention (``_inputs``)
        return self.wte(idx) + self.wpe(pos)

    def _inputs(self, idx: torch.Tensor, pos: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
        """(the embedded tokens, what every block takes besides: a Llama's rotary (cos, sin) at
        ``pos`` [T] or [B, T], default 0 .. T-1)."""
        x = self.embed(idx, pos)
        return x, self._rope(pos if pos is not None else torch.arange(idx.shape[1], device=idx.device), x.dtype)

    def _rope(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple:
        return () if self.rotary is None else (self.rotary(pos, dtype),)

    def _path_rope(self, h: torch.Tensor, attn: Attn | None, pos: torch.Tensor | None) -> tuple:
        """The rotary of rows that sit at their own positions: MTP's head blocks over the trunk's
        output (training: 0 .. T-1; decoding an accepted path: its cache slots, which are its
        positions) unless ``pos`` says otherwise."""
        if self.rotary is None:
            return ()
        if pos is None:
            pos = attn.slots if attn is not None else torch.arange(h.shape[1], device=h.device)
        return self._rope(pos, h.dtype)

    def cache_blocks(self) -> list[Block]:
        """The transformer blocks in KV-cache layer order."""
        raise NotImplementedError

    def decode_weights(self) -> list[DecodeWeights]:
        """Every cache layer's block tensors for ``Attn.weights``: build them again after a
        parameter is replaced (``.to()``, ``load_state_dict(assign=True)``), and on a CPU after
        it changes in place (a :class:`~mtpkern.cpu_matmul.Matmul` may keep a copy). Each kind of
        matrix (every block's QKV projection, ...) shares one layout, timed over all of them."""
        weights = [b.decode_weights() if isinstance(b, LlamaBlock) else DecodeWeights.of(b) for b in self.cache_blocks()]
        for kind in zip(*weights):
            if isinstance(kind[0], Matmul):
                share_layout(list(kind))
        return weights

    def _blocks(self, blocks, x, attn: Attn | None, first_layer: int, extra: tuple = ()):
        """``blocks`` over x from cache layer ``first_layer`` on; ``extra``: what each block takes
        after its layer (a Llama's rotary)."""
        if attn is not None and attn.weights is not None and attn.mask is not None and not torch.is_grad_enabled():
            for i in range(len(blocks)):
                w = attn.weights[first_layer + i]
                if isinstance(w, LlamaDecodeWeights):
                    x = decode_llama_block(x, w, attn, first_layer + i, *extra)
                else:
                    x = decode_block(x, w, attn, first_layer + i)
            return x
        for i, block in enumerate(blocks):
            if self.gradient_checkpointing and self.training and attn is None:
                x = torch.utils.checkpoint.checkpoint(block, x, None, first_layer + i, *extra, use_reentrant=False)
            else:
                x = block(x, attn, first_layer + i, *extra)
        return x

    # -- the decoding engine's split of a step (mtpkern.decoder) ----------------------
    #
    # A speculative step verifies T tree tokens with head 0 alone (``decode_hidden``), then
    # runs the draft heads only where the next drafts come from (``draft_hidden``): MEDUSA's
    # heads on the last accepted node, MTP's head blocks on the accepted path (their KV
    # caches need every accepted position, never a rejected one).

    draft_on_path = False  # whether draft_hidden needs the whole accepted path (its KV caches)

    def decode_hidden(self, idx, pos, attn: Attn, *, final_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(head 0's hidden states [B, T, D], the carry ``draft_hidden`` starts from [B, T, D]).
        ``final_norm=False``: head 0's states before ``self.final_norm``, for a logits kernel
        that applies the norm in its prologue (``fused_logits(norm_weight=...)``)."""
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        """The norm between head 0's last block and the unembedding (LayerNorm, or RMSNorm)."""
        return self.ln_f

    def draft_hidden(self, carry: torch.Tensor, n: int, attn: Attn | None = None,
                     row: torch.Tensor | None = None) -> torch.Tensor:
        """Draft heads 1..n's hidden states [n, D] at row ``row`` (a 0-d index; default the last)
        of the carry rows [1, R, D]. MTP's head blocks also write their K/V for every row, at
        cache slots ``attn.slots``."""
        return carry.new_zeros(0, carry.shape[2])

    def _stacked(self, key: str, groups, derive=None) -> list[torch.Tensor]:
        """``[torch.stack(g) for g in groups()]`` (each ``(tensors, transpose)``), passed through
        ``derive`` when given, kept between calls and refreshed in place when a parameter
        changes (its version or storage), so that a CUDA graph that captured them keeps reading
        the right memory. The check walks the kept tensors, not the modules: a few microseconds
        per call."""
        cache = self.__dict__.setdefault("_stacked_cache", {})
        hit = cache.get(key)
        # Inference tensors keep no version counter: their storage alone identifies them.
        stamp = lambda ts: [(t.data_ptr(), None if t.is_inference() else t._version) for t in ts]  # noqa: E731
        if hit is not None and stamp(hit[0]) == hit[1]:
            return hit[2]
        spec = groups()
        sources = [t for tensors, _ in spec for t in tensors]
        with torch.no_grad():
            fresh = [torch.stack([t.detach().T if tr else t.detach() for t in tensors]) for tensors, tr in spec]
            if derive is not None:
                fresh = [t.contiguous() for t in derive(*fresh)]
        if hit is not None and (torch.is_inference_mode_enabled() or not any(x.is_inference() for x in hit[2])):
            if [(x.shape, x.dtype, x.device) for x in hit[2]] == [(x.shape, x.dtype, x.device) for x in fresh]:
                with torch.no_grad():
                    for old, new in zip(hit[2], fresh):
                        old.copy_(new)
                fresh = hit[2]
        cache[key] = (sources, stamp(sources), fresh)
        return fresh

    def head_logits(self, hidden: torch.Tensor, j: int) -> torch.Tensor:
        """Head j's float logits [..., V] from its hidden states [..., D]."""
        return (hidden @ self.head_weight(j).T).float()

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., J, D] -> [..., J, V] float logits."""
        J = hidden.shape[-2]
        if all(self.head_weight(j) is self.unembed_weight for j in range(J)):
            return (hidden @ self.unembed_weight.T).float()
        return torch.stack([self.head_logits(hidden[..., j, :], j) for j in range(J)], dim=-2)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- persistence -----------------------------------------------------------------

    def save_pretrained(self, directory, tokenizer=None) -> None:
        """Write safetensors + config.json (+ the tokenizer) atomically into ``directory``."""
        with atomic_directory(directory) as tmp:
            self.write_files(tmp, tokenizer)

    def write_files(self, directory, tokenizer=None) -> None:
        """Write the checkpoint files into an existing directory (not atomic on its own: for
        callers that publish a larger checkpoint with ``atomic_directory`` themselves)."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_hf_dict(), f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


class GPT2(SpeculativeLM):
    """GPT-2 (Radford et al. 2019) with tied embeddings, matching transformers' GPT2LMHeadModel."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.apply(_init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @property
    def n_heads(self) -> int:
        return 1

    @property
    def n_cache_layers(self) -> int:
        return self.config.n_layer

    def cache_blocks(self) -> list[Block]:
        return cast("list[Block]", list(self.h))  # nn.ModuleList types its items as Module

    def hidden_states(self, idx, pos=None, attn: Attn | None = None, final_norm: bool = True) -> torch.Tensor:
        """The final-normalised hidden states [B, T, D] (before the norm with ``final_norm=False``)."""
        x, extra = self._inputs(idx, pos)
        x = self._blocks(self.h, x, attn, 0, extra)
        return self.ln_f(x) if final_norm else x

    def decode_hidden(self, idx, pos, attn: Attn, *, final_norm: bool = True):
        h = self.hidden_states(idx, pos, attn, final_norm)
        return h, h

    def forward(self, idx, pos=None, *, attn: Attn | None = None, heads: int | None = None,
                select: torch.Tensor | None = None, logits: bool = True) -> ModelOutput:
        h = self.hidden_states(idx, pos, attn)
        if select is not None:
            h = h.index_select(1, select)
        h = h.unsqueeze(2)
        return ModelOutput(h, self.unembed(h) if logits else None)


class Llama(GPT2):
    """The Llama family's base model (Llama 2 and 3, Mistral without a sliding window, Qwen2,
    SmolLM), matching transformers' ``LlamaForCausalLM``: RMSNorm, rotary positions,
    grouped-query attention, a SwiGLU MLP, tied or untied embeddings. It decodes and trains
    through the same interface as ``GPT2`` (whose forward it shares: the blocks take the
    rotary from ``_inputs``)."""

    def __init__(self, config: LlamaConfig):  # noqa: D107 - GPT2's init builds GPT-2 modules: not called
        SpeculativeLM.__init__(self)
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer))
        self.ln_f = RMSNorm(config.n_embd, config.rms_norm_eps)
        _positions_and_head(self, config)
        self.apply(_init_weights)


BASE_CLASSES: dict[str, type[GPT2]] = {"gpt2": GPT2, "llama": Llama}


def base_class(config: ModelConfig) -> Callable[[ModelConfig], GPT2]:
    """The base model class of a config's family."""
    return cast("Callable[[ModelConfig], GPT2]", BASE_CLASSES[config.family])


class MTPModel(SpeculativeLM):
    """Multi-token prediction (Gloeckle et al. 2024): a shared trunk of L-1 blocks and
    ``n_heads`` transformer-block heads; head k predicts token t + k + 1. One shared final norm and
    unembedding. Head k's block uses KV-cache layer (L - 1) + k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.model_type != "mtp":
            config = replace(config, model_type="mtp")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.family == "gpt2":
            self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.trunk = nn.ModuleList(_family_block(config) for _ in range(config.n_layer - 1))
        self.heads = nn.ModuleList(_family_block(config) for _ in range(config.n_heads))
        self.ln_f = _family_norm(config)
        _positions_and_head(self, config)
        self.apply(_init_weights)

    @classmethod
    def from_base(cls, base: GPT2, n_heads: int = 4) -> MTPModel:
        """``n_heads`` heads, the next-token head included (n_heads - 1 draft heads): trunk =
        the base's first L-1 blocks, head 0 = its last block, heads 1..n_heads-1 start as
        copies of it: at initialisation head 0 reproduces the base exactly. Either family."""
        _check_base(base, "MTPModel.from_base")
        cfg = replace(base.config, model_type="mtp", n_heads=n_heads)  # checks that the heads fit the layers
        model = cls(cfg).to(device=base.device, dtype=base.dtype)
        L, state = base.config.n_layer, {}
        for key, value in base.state_dict().items():
            if not key.startswith("h."):
                state[key] = value  # embeddings, final norm, a Llama's untied lm_head
                continue
            i, rest = key[2:].split(".", 1)
            if int(i) < L - 1:
                state[f"trunk.{i}.{rest}"] = value
            else:
                state.update({f"heads.{k}.{rest}": value for k in range(n_heads)})
        model.load_state_dict(state)
        return model

    @property
    def n_cache_layers(self) -> int:
        return self.config.n_layer - 1 + self.config.n_heads

    def cache_blocks(self) -> list[Block]:
        return [*self.trunk, *self.heads]

    def trunk_forward(self, idx, pos=None, attn: Attn | None = None) -> torch.Tensor:
        """The shared trunk's output [B, T, D] (not normalised)."""
        x, extra = self._inputs(idx, pos)
        return self._blocks(self.trunk, x, attn, 0, extra)

    def head_forward(self, k: int, h: torch.Tensor, attn: Attn | None = None, final_norm: bool = True,
                     pos: torch.Tensor | None = None) -> torch.Tensor:
        """Head k on the trunk output: the final-normalised hidden states [B, T, D] (before the
        norm with ``final_norm=False``). A Llama's head block takes the rows' positions from
        ``pos``, else ``attn.slots`` (an accepted path sits at its positions), else 0 .. T-1."""
        first = self.config.n_layer - 1 + k
        x = self._blocks(self.heads[k : k + 1], h, attn, first, self._path_rope(h, attn, pos))
        return self.ln_f(x) if final_norm else x

    draft_on_path = True

    def decode_hidden(self, idx, pos, attn: Attn, *, final_norm: bool = True):
        h = self.trunk_forward(idx, pos, attn)
        return self.head_forward(0, h, attn, final_norm, pos=self._tree_pos(idx, pos)), h

    @staticmethod
    def _tree_pos(idx: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """The positions of a pass's tokens (a tree's nodes: prefix + depth, not their slots)."""
        return pos if pos is not None else torch.arange(idx.shape[1], device=idx.device)

    def draft_hidden(self, carry, n, attn=None, row=None):
        """Heads 1..n over the accepted path's trunk outputs: every row's K/V into the heads'
        caches, the rest of each block at ``row`` alone. With eager attention the n head blocks
        run as one batch (stacked weights, one op where n blocks would take n: on a CPU a block
        costs its op count); the fused kernels run them one by one."""
        if n == 0:
            return super().draft_hidden(carry, 0)
        row = (torch.full((), carry.shape[1] - 1, device=carry.device) if row is None else row).view(1)
        if attn.tree_mask is not None or self.config.family != "gpt2":
            return torch.cat([self.head_forward(k, carry, attn)[0].index_select(0, row) for k in range(1, n + 1)])
        return self._grouped_heads(carry, 1, n, attn, row)[:, 0]

    def decode_heads(self, idx, pos, attn: Attn, n: int) -> torch.Tensor:
        """Heads 0..n at every position at once, final-normed [1 + n, T, D] (eager attention,
        one sequence): the trunk, then the n + 1 head blocks as one batch over the same rows
        (their K/V into their caches at ``attn.slots``, under the same mask). A speculative step
        that verifies with head 0 gets the next drafts from the same pass, at the last accepted
        node: no second pass of the draft heads over the accepted path (the K/V of rejected
        nodes are moved away or overwritten like the trunk's, ``kv_compact_`` moves every layer)."""
        h = self.trunk_forward(idx, pos, attn)
        if self.config.family != "gpt2":  # the Llama family's head blocks one by one, at the nodes' positions
            pos = self._tree_pos(idx, pos)
            return torch.cat([self.head_forward(k, h, attn, pos=pos) for k in range(n + 1)])
        return self._grouped_heads(h, 0, n + 1, attn, None)

    def _grouped_heads(self, x: torch.Tensor, first_head: int, n: int, attn: Attn,
                       row: torch.Tensor | None) -> torch.Tensor:
        """Blocks heads[first_head .. first_head + n - 1] on the same input x [1, R, D] at once:
        K/V of every row into the cache, the states [n, 1, D] (final-normed) of ``row`` [1], or of
        every row [n, R, D] when ``row`` is None. Each LayerNorm's affine is folded into the
        projection after it (W diag(g) and b + W beta, kept with the stacked weights)."""
        R, D = x.shape[1], x.shape[2]
        cfg = cast(GPT2Config, self.config)  # GPT-2's blocks only (decode_heads, draft_hidden)
        H, eps = cfg.n_head, cfg.layer_norm_epsilon
        first = self.config.n_layer - 1 + first_head  # cache layer of the first head

        def groups():
            heads = list(self.heads[first_head : first_head + n])
            return [([get(b) for b in heads], t) for get, t in (
                (lambda b: b.ln_1.weight, False), (lambda b: b.ln_1.bias, False),
                (lambda b: b.attn.c_attn.weight, True), (lambda b: b.attn.c_attn.bias, False),
                (lambda b: b.attn.c_proj.weight, True), (lambda b: b.attn.c_proj.bias, False),
                (lambda b: b.ln_2.weight, False), (lambda b: b.ln_2.bias, False),
                (lambda b: b.mlp.c_fc.weight, True), (lambda b: b.mlp.c_fc.bias, False),
                (lambda b: b.mlp.c_proj.weight, True), (lambda b: b.mlp.c_proj.bias, False))]

        def fold(ln1w, ln1b, qkvw, qkvb, ow, ob, ln2w, ln2b, fcw, fcb, pw, pb):
            # (norm(x) g + beta) Wt + b = norm(x) (g[:, None] Wt) + (beta Wt + b)
            return (ln1w[:, :, None] * qkvw, (ln1b[:, None] @ qkvw) + qkvb[:, None], ow, ob[:, None],
                    ln2w[:, :, None] * fcw, (ln2b[:, None] @ fcw) + fcb[:, None], pw, pb[:, None])

        qkvw, qkvb, ow, ob, fcw, fcb, pw, pb = self._stacked(f"mtp{first_head}:{n}", groups, fold)
        qkv = torch.baddbmm(qkvb, F.layer_norm(x, (D,), eps=eps).expand(n, R, D), qkvw)
        q, k, v = (t.reshape(n, R, H, D // H).transpose(1, 2) for t in qkv.split(D, dim=2))
        kc, vc = attn.cache.k[first : first + n, 0], attn.cache.v[first : first + n, 0]
        kc.index_copy_(2, attn.slots, k)
        vc.index_copy_(2, attn.slots, v)
        assert attn.mask is not None, "Attn: the grouped heads need a mask (eager attention)"
        s = attn.mask.shape[-1]
        if row is None:
            y = F.scaled_dot_product_attention(q, kc[:, :, :s], vc[:, :, :s], attn_mask=attn.mask)  # [n, H, R, Dh]
            x = x + torch.baddbmm(ob, y.transpose(1, 2).reshape(n, R, D), ow)
        else:
            y = F.scaled_dot_product_attention(q.index_select(2, row), kc[:, :, :s], vc[:, :, :s],
                                               attn_mask=attn.mask.index_select(0, row))  # [n, H, 1, Dh]
            x = x.index_select(1, row) + torch.baddbmm(ob, y.transpose(1, 2).reshape(n, 1, D), ow)
        h = F.gelu(torch.baddbmm(fcb, F.layer_norm(x, (D,), eps=eps), fcw), approximate="tanh")
        return self.ln_f(x + torch.baddbmm(pb, h, pw))

    def forward(self, idx, pos=None, *, attn: Attn | None = None, heads: int | None = None,
                select: torch.Tensor | None = None, logits: bool = True) -> ModelOutput:
        heads = self.n_heads if heads is None else heads
        h = self.trunk_forward(idx, pos, attn)
        outs = []
        for k in range(heads):
            o = self.head_forward(k, h, attn, pos=self._tree_pos(idx, pos))  # every position: the head's KV cache needs them all
            outs.append(o if select is None else o.index_select(1, select))
        hs = torch.stack(outs, dim=2)
        return ModelOutput(hs, self.unembed(hs) if logits else None)


class MedusaModel(SpeculativeLM):
    """MEDUSA (Cai et al. 2024): a base GPT-2 plus ``n_heads - 1`` residual-block heads on its
    final hidden state; the base is frozen (MEDUSA-1) unless a MEDUSA-2 training unfreezes it.
    ``n_heads`` counts every head: head 0 is the base (token t + 1); MEDUSA head k (0-based) is
    head k + 1 and predicts token t + k + 2."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.model_type != "medusa":
            config = replace(config, model_type="medusa")
        self.config = config
        self.base = base_class(config)(replace(config, model_type=config.family, n_heads=1))
        self.medusa = nn.ModuleList(MedusaHead(config) for _ in range(config.n_heads - 1))
        self.freeze_base()

    @classmethod
    def from_base(cls, base: GPT2, n_heads: int = 6, n_layers: int = 1, proj: bool = False) -> MedusaModel:
        """``n_heads`` heads, the next-token head included: the base as head 0 and n_heads - 1
        MEDUSA heads of ``n_layers`` residual blocks each (the default 6: MEDUSA's 5 heads).
        ``proj``: each MEDUSA head with its own unembedding, initialised from the LM head."""
        _check_base(base, "MedusaModel.from_base")
        cfg = replace(base.config, model_type="medusa", n_heads=n_heads, medusa_layers=n_layers, medusa_proj=proj)
        model = cls(cfg).to(device=base.device, dtype=base.dtype)
        model.base.load_state_dict(base.state_dict())
        for head in cast("Iterable[MedusaHead]", model.medusa):  # nn.ModuleList types its items as Module
            if head.proj is not None:  # MEDUSA initialises a head's projection from the LM head
                head.proj.weight.data.copy_(base.unembed_weight.data)
        model.freeze_base()
        return model

    def freeze_base(self):
        for p in self.base.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not any(p.requires_grad for p in self.base.parameters()):
            self.base.eval()  # frozen (MEDUSA-1): never in training mode; MEDUSA-2 trains it
        return self

    @property
    def wte(self) -> nn.Embedding:  # type: ignore[override]  # read-only: the base owns the embedding
        return self.base.wte

    @property
    def n_cache_layers(self) -> int:
        return self.config.n_layer

    @property
    def unembed_weight(self) -> torch.Tensor:
        return self.base.unembed_weight

    def cache_blocks(self) -> list[Block]:
        return cast("list[Block]", list(self.base.h))  # nn.ModuleList types its items as Module

    def head_weight(self, j: int) -> torch.Tensor:
        proj = None if j == 0 else cast(MedusaHead, self.medusa[j - 1]).proj  # ModuleList items are typed Module
        return self.unembed_weight if proj is None else proj.weight

    def decode_hidden(self, idx, pos, attn: Attn, *, final_norm: bool = True):
        h = self.base.hidden_states(idx, pos, attn, final_norm)
        return h, h

    @property
    def final_norm(self) -> nn.Module:
        return self.base.ln_f

    def draft_hidden(self, carry, n, attn=None, row=None):
        """MEDUSA heads 1..n at one row of [1, R, D] at once: each residual layer is one batched
        matmul over the heads' stacked weights, [n, D]."""
        if n == 0:
            return super().draft_hidden(carry, 0)
        carry = carry[:, -1:] if row is None else carry.index_select(1, row.view(1))
        return self.heads_at(carry[0], n)[:, 0]

    def head_stack(self, n: int) -> list[torch.Tensor]:
        """Heads 1..n's residual layers as stacked (transposed weight [n, D, D], bias [n, D]) pairs,
        layer by layer, kept and refreshed in place when a parameter changes (``_stacked``)."""
        def groups():
            heads = cast("Iterable[MedusaHead]", self.medusa[:n])  # nn.ModuleList types its items as Module
            lin = [[cast(ResBlock, head.blocks[i]).linear for head in heads] for i in range(self.config.medusa_layers)]
            return [g for layer in lin for g in (([m.weight for m in layer], True), ([m.bias for m in layer], False))]

        return self._stacked(f"medusa{n}", groups)

    def heads_at(self, h: torch.Tensor, n: int, stacked: list[torch.Tensor] | None = None) -> torch.Tensor:
        """MEDUSA heads 1..n at every row of h [R, D] (final-normed): [n, R, D]. ``stacked``:
        ``head_stack(n)`` fetched by the caller (the decoder, once per generation)."""
        stacked = self.head_stack(n) if stacked is None else stacked
        x = h[None].expand(n, -1, -1)
        for w, b in zip(stacked[0::2], stacked[1::2]):
            x = x + F.silu(torch.baddbmm(b[:, None], x, w))
        return x

    def forward(self, idx, pos=None, *, attn: Attn | None = None, heads: int | None = None,
                select: torch.Tensor | None = None, logits: bool = True) -> ModelOutput:
        heads = self.n_heads if heads is None else heads
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.base.parameters())):
            h0 = self.base.hidden_states(idx, pos, attn)
        if select is not None:
            h0 = h0.index_select(1, select)
        hs = torch.stack([h0] + [self.medusa[k](h0) for k in range(heads - 1)], dim=2)
        return ModelOutput(hs, self.unembed(hs) if logits else None)


def _check_base(base, where: str) -> None:
    if not isinstance(base, GPT2):  # GPT2 or Llama
        raise TypeError(f"{where} takes a base model (GPT2 or Llama), got a {type(base).__name__}")


MODEL_CLASSES = {"gpt2": GPT2, "llama": Llama, "mtp": MTPModel, "medusa": MedusaModel}

