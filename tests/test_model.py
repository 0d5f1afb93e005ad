"""The model family: parity with transformers, the decoding forward pass, heads, checkpoints."""

import json
import typing

import pytest
import torch
from transformers import GPT2Config as HFConfig
from transformers import GPT2LMHeadModel

from mtpkern import (
    GPT2, Attn, BatchDecoder, CheckpointError, Decoder, GPT2Config, KVCache, MedusaModel, MTPModel, SpeculativeLM,
    load_model, to_hf,
)
from mtpkern.config import CONFIG_FORMAT

HF_CONFIGS = [
    dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=1, n_head=2),
    dict(vocab_size=131, n_positions=48, n_embd=48, n_layer=3, n_head=4),
    dict(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=1, layer_norm_epsilon=1e-6),
]


def _hf_model(cfg: dict, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(HFConfig(**cfg, bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():  # make biases and LayerNorms non-trivial so a mapping error shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _tiny(seed=0, **kw) -> GPT2:
    torch.manual_seed(seed)
    cfg = GPT2Config.tiny(vocab_size=kw.pop("vocab_size", 61), n_positions=64, n_embd=32, n_layer=3, n_head=4, **kw)
    model = GPT2(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("cfg", HF_CONFIGS)
def test_logits_match_transformers(cfg, tmp_path):
    hf = _hf_model(cfg)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, expect=GPT2)
    torch.manual_seed(1)
    idx = torch.randint(0, cfg["vocab_size"], (3, cfg["n_positions"]))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx).logits[:, :, 0]
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


def test_to_hf_round_trip():
    model = _tiny()
    hf = to_hf(model)
    idx = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx).logits[:, :, 0]).abs().max().item() <= 1e-5


def _full_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def test_kv_cache_incremental_matches_full_forward():
    model = _tiny()
    idx = torch.randint(0, 61, (1, 23))
    full = _full_logits(model, idx)
    cache = model.new_cache(1, 40)
    chunks = [(0, 9), (9, 10), (10, 16), (16, 23)]
    with torch.no_grad():
        for a, b in chunks:
            mask = torch.ones(b - a, b, dtype=torch.bool).tril(a)
            out = model(idx[:, a:b], torch.arange(a, b), attn=Attn(cache, torch.arange(a, b), mask=mask))
            torch.testing.assert_close(out.logits, full[:, a:b], atol=1e-5, rtol=1e-5)


def test_tree_forward_matches_each_path():
    """Tree tokens written at slots prefix+i with position prefix+depth and an ancestor mask give,
    at every node, the logits of the plain sequence prefix + path-to-node."""
    model = _tiny()
    prefix = torch.randint(0, 61, (1, 7))
    parents = [-1, 0, 0, 1, 1, 2, 3]
    tokens = torch.randint(0, 61, (1, len(parents)))
    depth, anc = [], torch.zeros(len(parents), len(parents), dtype=torch.bool)
    for i, p in enumerate(parents):
        depth.append(0 if p < 0 else depth[p] + 1)
        anc[i, i] = True
        if p >= 0:
            anc[i] |= anc[p]
    P, T = prefix.shape[1], len(parents)
    cache = model.new_cache(1, 32)
    with torch.no_grad():
        model(prefix, torch.arange(P), attn=Attn(cache, torch.arange(P), mask=torch.ones(P, P, dtype=torch.bool).tril()))
        mask = torch.cat([torch.ones(T, P, dtype=torch.bool), anc], dim=1)
        out = model(tokens, P + torch.tensor(depth), attn=Attn(cache, torch.arange(P, P + T), mask=mask))
    for i in range(T):
        path = [i]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        seq = torch.cat([prefix, tokens[:, path[::-1]]], dim=1)
        ref = _full_logits(model, seq)[:, -1]
        torch.testing.assert_close(out.logits[:, i], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", ["gpt2", "mtp"])
def test_padding_never_makes_attention_bidirectional(make):
    """The thesis code's MTP trunk became bidirectional when given a padding mask. Ours: what a
    position sees never depends on later tokens, padding or not."""
    base = _tiny()
    model = base if make == "gpt2" else MTPModel.from_base(base, n_heads=3).eval()
    idx = torch.randint(0, 61, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = 0  # right padding with the pad id
    a, b = _full_logits(model, idx), _full_logits(model, changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=0, rtol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_sequence_longer_than_context_is_an_error():
    model = _tiny()
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.new_cache(1, 65)


def test_mtp_from_base_head0_reproduces_base():
    base = _tiny()
    mtp = MTPModel.from_base(base, n_heads=4).eval()
    assert mtp.n_heads == 4 and mtp.n_cache_layers == base.config.n_layer - 1 + 4
    idx = torch.randint(0, 61, (2, 15))
    out = _full_logits(mtp, idx)
    assert out.shape == (2, 15, 4, 61)
    torch.testing.assert_close(out[:, :, 0], _full_logits(base, idx)[:, :, 0], atol=0, rtol=0)
    # heads 1.. are copies of the last block, not aliases: training one leaves the others alone
    assert mtp.heads[1].mlp.c_fc.weight is not mtp.heads[0].mlp.c_fc.weight
    with torch.no_grad():
        mtp.heads[1].mlp.c_fc.weight.add_(1.0)
    assert torch.equal(mtp.heads[0].mlp.c_fc.weight, base.h[-1].mlp.c_fc.weight)


def test_mtp_decoding_fills_every_head_cache():
    """Head blocks have their own KV cache layers; cached decoding matches the full forward."""
    mtp = MTPModel.from_base(_tiny(), n_heads=3).eval()
    with torch.no_grad():
        for p in mtp.heads.parameters():
            p.add_(0.02 * torch.randn_like(p))
    idx = torch.randint(0, 61, (1, 12))
    full = _full_logits(mtp, idx)
    cache = mtp.new_cache(1, 16)
    with torch.no_grad():
        mtp(idx[:, :8], torch.arange(8), attn=Attn(cache, torch.arange(8), mask=torch.ones(8, 8, dtype=torch.bool).tril()))
        out = mtp(idx[:, 8:], torch.arange(8, 12), attn=Attn(cache, torch.arange(8, 12),
                  mask=torch.ones(4, 12, dtype=torch.bool).tril(8)), select=torch.tensor([3]))
    torch.testing.assert_close(out.logits[:, 0], full[:, 11], atol=1e-5, rtol=1e-5)


def test_medusa_heads_layout_and_identity_init():
    base = _tiny()
    med = MedusaModel.from_base(base, n_heads=4, n_layers=2).eval()
    assert med.n_heads == med.config.n_heads == 4  # head 0 = base (t+1), heads 1..3 = MEDUSA heads (t+2..t+4)
    assert len(med.medusa) == 3
    assert all(len(h.blocks) == 2 for h in med.medusa)
    assert not any(p.requires_grad for p in med.base.parameters())
    assert all(p.requires_grad for p in med.medusa.parameters())
    idx = torch.randint(0, 61, (1, 9))
    out = _full_logits(med, idx)
    ref = _full_logits(base, idx)[:, :, 0]
    for j in range(4):  # zero-initialised residual blocks: every head starts as the base
        torch.testing.assert_close(out[:, :, j], ref, atol=1e-6, rtol=1e-6)
    med.train()
    assert not med.base.training and med.medusa.training


def test_medusa_projection_heads():
    base = _tiny()
    med = MedusaModel.from_base(base, n_heads=3, proj=True).eval()
    assert med.head_weight(1) is med.medusa[0].proj.weight
    assert med.head_weight(0) is med.unembed_weight
    assert torch.equal(med.medusa[0].proj.weight, base.unembed_weight)
    with torch.no_grad():
        med.medusa[1].proj.weight.mul_(2)
    idx = torch.randint(0, 61, (1, 5))
    out = _full_logits(med, idx)
    torch.testing.assert_close(out[:, :, 2], 2 * out[:, :, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "mtp", "medusa"])
def test_checkpoint_round_trip(kind, tmp_path):
    base = _tiny()
    model = {"gpt2": lambda: base, "mtp": lambda: MTPModel.from_base(base, 3),
             "medusa": lambda: MedusaModel.from_base(base, 3, proj=True)}[kind]()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ck")
    loaded = load_model(tmp_path / "ck")
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert raw["model_type"] == "gpt2" and raw["mtpkern"]["model_type"] == kind
    assert raw["mtpkern"]["format"] == CONFIG_FORMAT and raw["mtpkern"]["n_heads"] == model.n_heads


def _of_family(cls: type) -> SpeculativeLM:
    """A small model of the family ``cls``: the tiny GPT-2, or heads on it."""
    base = _tiny()
    return {GPT2: base, MTPModel: MTPModel.from_base(base, 3), MedusaModel: MedusaModel.from_base(base, 3)}[cls].eval()


@pytest.mark.parametrize("cls", [GPT2, MTPModel, MedusaModel])
def test_load_model_returns_the_public_family_class(cls, tmp_path):
    """Every family loads as a ``SpeculativeLM``, the public base class ``load_model`` names."""
    _of_family(cls).save_pretrained(tmp_path / "ck")
    loaded = load_model(tmp_path / "ck")
    assert isinstance(loaded, SpeculativeLM) and type(loaded) is cls
    assert typing.get_type_hints(load_model)["return"] is SpeculativeLM


def test_load_model_refuses_a_checkpoint_of_another_class(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="holds a GPT2, not a MTPModel"):
        load_model(tmp_path / "ck", expect=MTPModel)
    assert type(load_model(tmp_path / "ck", expect=GPT2)) is GPT2


def test_save_overwrites_atomically_and_keeps_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["1 + 2 = 3", "The answer is: 3"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    model = _tiny()
    model.save_pretrained(tmp_path / "ck", tokenizer=fast)
    model.save_pretrained(tmp_path / "ck", tokenizer=fast)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary leftovers
    back = AutoTokenizer.from_pretrained(tmp_path / "ck")
    assert back("The answer is: 3")["input_ids"] == fast("The answer is: 3")["input_ids"]


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = _tiny()
    model.save_pretrained(tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        _tiny(seed=3).save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint or run directory"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a run directory .* nor a checkpoint directory"):
        load_model(tmp_path / "empty")
    (tmp_path / "empty" / "checkpoint").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(tmp_path / "empty")

    model = _tiny()
    model.save_pretrained(tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        load_model(tmp_path / "ck")

    weights.unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_model(tmp_path / "ck")

    weights.write_bytes(data)
    cfg_file = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["n_layer"] = 4
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match its config: missing"):
        load_model(tmp_path / "ck")

    cfg["n_layer"], cfg["n_embd"] = 3, 64
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model(tmp_path / "ck")

    cfg_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(tmp_path / "ck")


def test_unsupported_hf_variant_is_rejected(tmp_path):
    cfg = dict(HF_CONFIGS[0], scale_attn_by_inverse_layer_idx=True)
    _hf_model(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        load_model(tmp_path, expect=GPT2)


def test_load_model_accepts_a_run_directory_or_its_checkpoint(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path / "run" / "checkpoint")
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoint", str(tmp_path / "run")):
        loaded = load_model(path)
        assert torch.equal(loaded.wte.weight, model.wte.weight)


@pytest.mark.parametrize("field, value, message", [
    ("n_embd", "128", "n_embd must be a non-negative integer, got '128'"),
    ("n_layer", None, "n_layer must be a non-negative integer, got None"),
    ("n_head", 4.0, "n_head must be a non-negative integer, got 4.0"),
    ("mtpkern", "gpt2", "the field 'mtpkern' must be an object, got 'gpt2'"),
    ("layer_norm_epsilon", "x", "layer_norm_epsilon must be a positive number"),
    ("vocab_size", 0, "vocab_size must be >= 1"),
])
def test_config_field_of_the_wrong_type_names_the_file_and_field(tmp_path, field, value, message):
    _tiny().save_pretrained(tmp_path / "ck")
    cfg_file = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[field] = value
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "ck")
    assert str(cfg_file) in str(e.value) and message in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_hf_config_of_the_wrong_type_is_named_before_transformers_reads_it(tmp_path):
    _hf_model(HF_CONFIGS[0]).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_head"] = "2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json is not a valid config: n_head must be"):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_cache_allocates_zeroed_layers(dtype):
    cache = KVCache(3, 2, 4, 17, 8, dtype=dtype, device="cpu")
    for t in (cache.k, cache.v):
        assert t.shape == (3, 2, 4, 17, 8) and t.dtype == dtype and t.device == torch.device("cpu")
        assert not t.any()
    assert cache.k.data_ptr() != cache.v.data_ptr()
    assert cache.max_len == 17


def test_kv_cache_from_tensors_wraps_rows_without_a_copy():
    whole = KVCache(2, 4, 2, 9, 3, dtype=torch.float32, device="cpu")
    rows = KVCache.from_tensors(whole.k[:, 1:3], whole.v[:, 1:3])
    assert rows.k.shape == (2, 2, 2, 9, 3) and rows.max_len == 9
    assert (rows.k.dtype, rows.k.device) == (whole.k.dtype, whole.k.device)
    rows.k.fill_(1.0)
    rows.v[:, 0].fill_(2.0)
    assert whole.k[:, 1:3].eq(1).all() and not whole.k[:, [0, 3]].any()  # writes land in the batched cache
    assert whole.v[:, 1].eq(2).all() and not whole.v[:, [0, 2, 3]].any()
    rows.reset()
    assert not whole.k.any() and not whole.v.any()
    for k, v in ((whole.k, whole.v[:, :2]), (whole.k[0], whole.v[0]), (whole.k, whole.v.half())):
        with pytest.raises(ValueError, match="one 5-d shape, dtype and device"):
            KVCache.from_tensors(k, v)


@pytest.mark.parametrize("cls, strategy", [(GPT2, "ntp"), (MTPModel, "mtp"), (MedusaModel, "medusa")])
def test_engines_caches_are_what_the_constructor_builds(cls, strategy):
    """``new_cache`` (the single-prompt engine's) and the batch engine's cache have the layout
    ``KVCache(...)`` builds for the model: a layer per cache block, the model's dtype and device."""
    model = _of_family(cls)
    cfg = model.config
    want = KVCache(model.n_cache_layers, 1, cfg.n_head, cfg.n_positions, cfg.head_dim, dtype=model.dtype,
                   device=model.device)
    for got in (model.new_cache(1, cfg.n_positions), Decoder(model, strategy).cache):
        for a, b in ((got.k, want.k), (got.v, want.v)):
            assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
            assert torch.equal(a, b)
    batched = BatchDecoder(model, strategy, max_batch=3).cache
    for t in (batched.k, batched.v):
        assert t.shape == (model.n_cache_layers, 3, cfg.n_head, cfg.n_positions, cfg.head_dim)
        assert (t.dtype, t.device) == (model.dtype, model.device)
