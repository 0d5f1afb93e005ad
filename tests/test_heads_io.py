"""MEDUSA heads in and out of FasterDecoding/Medusa, vLLM and TensorRT-LLM layouts (issue 25).

Neither vLLM nor TensorRT-LLM runs here: a small reference loader below reads each exported
layout as those tools' loaders define it (vLLM ``Medusa.load_weights``, TensorRT-LLM
``load_medusa_hf``) and applies the format's head formula, ``x + SiLU(W x + b)`` per layer, then
the unembedding, to the base's final hidden state.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mtpkern import generate, load_model
from mtpkern.checkpoint import CheckpointError
from mtpkern.heads_io import FORMATS, MARK_NAME, HeadsError, export_heads
from mtpkern.models import MedusaModel
from mtpkern.train import train
from test_cli import assert_one_line_error, run_main
from test_train import make_base, tiny_run


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"))


def random_heads(base_dir, *, n_heads=4, n_layers=2, proj=False, seed=0) -> MedusaModel:
    """Heads with random (not zero) weights on the saved base, so every tensor matters."""
    torch.manual_seed(seed)
    model = MedusaModel.from_base(load_model(base_dir), n_heads=n_heads, n_layers=n_layers, proj=proj)
    with torch.no_grad():
        for p in model.medusa.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def medusa_head_dir(path: Path, base_dir, *, n=3, layers=1, declared=None, own=True, hidden=None, vocab=None,
                    drop=None, extra=None, pt=False) -> Path:
    """A FasterDecoding/Medusa head directory written by hand, as ``medusa_model.py`` saves one."""
    base = load_model(base_dir)
    d, v = hidden or base.config.n_embd, vocab or base.config.vocab_size
    g = torch.Generator().manual_seed(1)
    state = {}
    for h in range(n):
        for l in range(layers):
            state[f"{h}.{l}.linear.weight"] = torch.randn(d, d, generator=g) * 0.05
            state[f"{h}.{l}.linear.bias"] = torch.randn(d, generator=g) * 0.05
        unembed = base.unembed_weight.detach().clone() if (d, v) == tuple(base.unembed_weight.shape[::-1]) \
            else torch.zeros(v, d)
        state[f"{h}.{layers}.weight"] = unembed + (torch.randn(v, d, generator=g) * 0.05 if own else 0)
    if drop:
        del state[drop]
    if extra:
        state[extra] = torch.zeros(1)
    path.mkdir(parents=True)
    if pt:
        torch.save(state, path / "medusa_lm_head.pt")
    else:
        save_file(state, str(path / "medusa_lm_head.safetensors"))
    config = {"medusa_num_heads": n if declared is None else declared, "medusa_num_layers": layers,
              "base_model_name_or_path": str(base_dir)}
    (path / "config.json").write_text(json.dumps(config))
    return path


def reference_logits(out: Path, fmt: str, hidden: torch.Tensor) -> torch.Tensor:
    """[B, T, H, V]: the heads of an exported folder applied to ``hidden``, read by its format's rules."""
    cfg = json.loads((out / "config.json").read_text())
    if fmt == "vllm":
        st = load_file(str(out / "model.safetensors"))
        n, L = cfg["num_heads"], cfg["num_hidden_layers"]
        layers = [[(st[f"blocks.{h}.layers.{l}.weight"], st[f"blocks.{h}.layers.{l}.bias"]) for l in range(L)]
                  for h in range(n)]
        lm = [st["lm_heads.0.weight" if cfg["original_lm_head"] else f"lm_heads.{h}.weight"] for h in range(n)]
    else:
        st = load_file(str(out / "medusa_lm_head.safetensors"))
        n, L = cfg["medusa_num_heads"], cfg["medusa_num_layers"]
        layers = [[(st[f"{h}.{l}.linear.weight"], st[f"{h}.{l}.linear.bias"]) for l in range(L)] for h in range(n)]
        lm = [st[f"{h}.{L}.weight"] for h in range(n)]
    outs = []
    for h in range(n):
        x = hidden
        for w, b in layers[h]:
            x = x + F.silu(x @ w.T + b)
        outs.append(x @ lm[h].T)
    return torch.stack(outs, dim=2)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("proj", [False, True])
def test_every_layout_gives_mtpkerns_head_logits(base_dir, tmp_path, fmt, proj):
    model = random_heads(base_dir, proj=proj)
    out = export_heads(model, fmt, tmp_path / "out")
    idx = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx).logits[:, :, 1:]
        ref = reference_logits(out, fmt, model.base.hidden_states(idx))
    assert ref.shape == ours.shape == (2, 9, 3, model.config.vocab_size)
    torch.testing.assert_close(ref, ours, atol=1e-5, rtol=0)
    assert (out / MARK_NAME).is_file() and (out / "README.md").is_file()
    assert_same_weights(load_model(out), model)  # the export carries its base: it loads back alone


@pytest.mark.parametrize("proj, original", [(False, True), (True, False)])
def test_shared_or_own_unembedding_maps_to_original_lm_head(base_dir, tmp_path, proj, original):
    out = export_heads(random_heads(base_dir, proj=proj), "vllm", tmp_path / "v")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["original_lm_head"] is original
    assert {k: cfg[k] for k in ("model_type", "architectures", "num_heads", "num_hidden_layers", "medusa_fc_bias")} \
        == {"model_type": "medusa", "architectures": ["MedusaModel"], "num_heads": 3, "num_hidden_layers": 2,
            "medusa_fc_bias": True}
    assert cfg["truncated_vocab_size"] == cfg["vocab_size"] == 512 and cfg["hidden_size"] == 32
    names = set(load_file(str(out / "model.safetensors")))
    assert {n for n in names if n.startswith("lm_heads.")} == ({"lm_heads.0.weight"} if original else
                                                               {f"lm_heads.{h}.weight" for h in range(3)})
    assert load_model(out).config.medusa_proj is proj


@pytest.mark.parametrize("pt", [False, True])
def test_import_export_import_is_bit_identical(base_dir, tmp_path, pt):
    src = medusa_head_dir(tmp_path / "heads", base_dir, n=3, layers=2, pt=pt)
    first = load_model(src)
    assert isinstance(first, MedusaModel) and first.n_heads == 4 and first.config.medusa_proj
    for fmt in FORMATS:
        again = load_model(export_heads(first, fmt, tmp_path / fmt))
        assert_same_weights(again, first)
    original = torch.load(src / "medusa_lm_head.pt") if pt else load_file(str(src / "medusa_lm_head.safetensors"))
    written = load_file(str(tmp_path / "medusa" / "medusa_lm_head.safetensors"))
    assert original.keys() == written.keys() and all(torch.equal(original[k], written[k]) for k in original)


def test_shared_unembedding_imports_as_shared(base_dir, tmp_path):
    model = load_model(medusa_head_dir(tmp_path / "heads", base_dir, own=False))
    assert not model.config.medusa_proj and model.head_weight(1) is model.unembed_weight


def test_head_count_of_the_weights_wins_with_one_warning(base_dir, tmp_path):
    """FasterDecoding/Medusa #114: a config naming 2 heads over weights holding 4."""
    src = medusa_head_dir(tmp_path / "heads", base_dir, n=4, declared=2)
    with pytest.warns(UserWarning, match="names 2 MEDUSA heads but medusa_lm_head.safetensors holds 4") as got:
        model = load_model(src)
    assert len([w for w in got if "#114" in str(w.message)]) == 1
    assert model.n_heads == 5


def test_base_given_overrides_the_config(base_dir, tmp_path):
    src = medusa_head_dir(tmp_path / "heads", base_dir)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "nowhere")}))
    with pytest.raises(CheckpointError, match="nowhere"):
        load_model(src)
    assert load_model(src, base=str(base_dir)).n_heads == 4


@pytest.mark.parametrize("kw, needle", [
    (dict(hidden=16), "hidden size is 32"),
    (dict(vocab=100), "vocabulary x hidden size is (512, 32)"),
    (dict(drop="1.0.linear.bias"), "missing ['1.0.linear.bias']"),
    (dict(extra="0.0.linear.scale"), "extra ['0.0.linear.scale']"),
])
def test_bad_head_directories_are_one_line_errors_naming_the_file(base_dir, tmp_path, kw, needle):
    src = medusa_head_dir(tmp_path / "heads", base_dir, **kw)
    with pytest.raises(HeadsError) as e:
        load_model(src)
    assert needle in str(e.value) and "medusa_lm_head.safetensors" in str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def vllm_head_dir(path: Path, base_dir, **changes) -> Path:
    """An export of ours in vLLM's layout, its config.json then changed."""
    out = export_heads(random_heads(base_dir), "vllm", path)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in {**cfg, **changes}.items() if v is not None}))
    return out


@pytest.mark.parametrize("changes, needle", [
    (dict(truncated_vocab_size=100), "a truncated vocabulary (100 of 512"),
    (dict(medusa_fc_bias=False), "'medusa_fc_bias' must be true"),
    (dict(base_model_name_or_path=None), "names no base model"),
    (dict(num_hidden_layers=3), "missing ['blocks.0.layers.2.bias'"),
])
def test_bad_vllm_configs_are_one_line_errors_naming_the_file(base_dir, tmp_path, changes, needle):
    out = vllm_head_dir(tmp_path / "v", base_dir, **changes)
    with pytest.raises(HeadsError) as e:
        load_model(out)
    assert needle in str(e.value) and str(out) in str(e.value) and "\n" not in str(e.value)


def test_imported_heads_decode_losslessly(base_dir, tmp_path):
    model = load_model(medusa_head_dir(tmp_path / "heads", base_dir, layers=2))
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    ntp = generate(model, ids, max_new_tokens=24, strategy="ntp")
    for tree in ("2,1", "chain:3"):
        got = generate(model, ids, max_new_tokens=24, strategy="medusa", tree=tree)
        assert got.tokens == ntp.tokens, tree


def test_refusals_before_anything_is_written(base_dir, tmp_path, mtp_model):
    model = random_heads(base_dir)
    with pytest.raises(HeadsError, match="unknown export format 'tgi'"):
        export_heads(model, "tgi", tmp_path / "a")
    with pytest.raises(HeadsError, match="exports MEDUSA heads; this model's class is MTPModel"):
        export_heads(mtp_model, "medusa", tmp_path / "b")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(HeadsError, match="holds files mtpkern export did not write .notes.txt"):
        export_heads(model, "vllm", foreign)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"] and (foreign / "notes.txt").read_text() == "mine"
    again = export_heads(model, "medusa", tmp_path / "ours")
    export_heads(model, "vllm", again)  # our own export is replaced, whole
    assert not (again / "medusa_lm_head.safetensors").exists() and (again / "model.safetensors").is_file()


def test_export_command_every_flag_and_generate_with_base(base_dir, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    random_heads(base_dir).save_pretrained(ckpt, tokenizer=None)
    out = tmp_path / "trt"
    code, err = run_main(["export", ckpt, "--format", "trtllm", "--out", out, "--base", base_dir], capsys, monkeypatch)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir) and not (out / "base").exists()
    readme = (out / "README.md").read_text()
    assert "--num_medusa_heads 3" in readme and "no calibration" in readme
    code, err = run_main(["generate", out, "--base", base_dir, "--prompt", "1 + 1", "--raw", "--max-new-tokens", "4",
                          "--strategy", "medusa", "--tree", "2,1"], capsys, monkeypatch)
    assert code == 0, err


@pytest.mark.parametrize("args, needle", [
    (["--format", "tgi"], "invalid choice: 'tgi'"),
    (["--format", "vllm", "--mtp"], "this model's class is MTPModel"),
    (["--format", "vllm", "--foreign"], "did not write"),
])
def test_export_command_refusals_in_one_line(base_dir, tmp_path, capsys, monkeypatch, mtp_model, args, needle):
    src = tmp_path / "ckpt"
    (mtp_model if "--mtp" in args else random_heads(base_dir)).save_pretrained(src)
    out = tmp_path / "out"
    if "--foreign" in args:
        out.mkdir()
        (out / "keep.bin").write_bytes(b"x")
    flags = [a for a in args if a not in ("--mtp", "--foreign")]
    code, err = run_main(["export", src, *flags, "--out", out], capsys, monkeypatch)
    assert_one_line_error(code, err, needle)
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["keep.bin"]


def test_imported_heads_train_further_and_calibrate(base_dir, tmp_path, capsys, monkeypatch):
    """A head directory (with the tokenizer beside it, as our exports write it) is a base to
    continue training from; the run then calibrates and evaluates through the CLI."""
    from mtpkern.data import load_tokenizer

    heads = tmp_path / "heads"
    model = load_model(medusa_head_dir(tmp_path / "src", base_dir, n=2))
    export_heads(model, "medusa", heads, tokenizer=load_tokenizer(base_dir))
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("medusa.")}
    run = tmp_path / "run"
    train(tiny_run(run, "medusa", heads, n_heads=3, medusa_proj=True, steps=3))
    after = load_model(run).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the imported heads trained on
    code, err = run_main(["calibrate", run, "--max-samples", "2", "--max-new-tokens", "8", "--no-measure"],
                         capsys, monkeypatch)
    assert code == 0, err
    assert (run / "checkpoint" / "calibration.json").is_file()
    trt = tmp_path / "trt"
    code, err = run_main(["export", run, "--format", "trtllm", "--out", trt], capsys, monkeypatch)
    assert code == 0, err
    readme = (trt / "README.md").read_text()
    assert "--medusa_choices=\"[[0]" in readme and "calibrated `auto` tree" in readme, readme
    imported = load_model(trt)  # the calibration travels with the heads: `auto` still plans from it
    assert imported.calibration is not None and imported.calibration.to_dict() == load_model(run).calibration.to_dict()
    report = tmp_path / "eval.json"
    code, err = run_main(["eval", heads, "--data", "synthetic", "--json", report, "--max-samples", "2",
                          "--max-new-tokens", "8", "--no-hf", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    code, err = run_main(["calibrate", heads, "--data", "synthetic", "--max-samples", "2", "--max-new-tokens", "8",
                          "--no-measure"], capsys, monkeypatch)
    assert code == 0, err
    (evaluated,) = json.loads(report.read_text())["models"]
    assert evaluated and "medusa" in json.dumps(evaluated).lower()


def test_eval_and_calibrate_take_the_base_of_a_head_directory(base_dir, tmp_path, capsys, monkeypatch):
    """`--base` names the base of a FasterDecoding head directory whose config names one that is
    not here (its hub name, say): eval and calibrate read the heads, and the tokenizer, from it."""
    heads = medusa_head_dir(tmp_path / "heads", base_dir, n=2)
    cfg = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path=str(tmp_path / "elsewhere"))))
    report = tmp_path / "eval.json"
    common = ["--data", "synthetic", "--max-samples", "2", "--max-new-tokens", "8"]
    code, err = run_main(["eval", heads, *common, "--json", report, "--no-progress"], capsys, monkeypatch)
    assert_one_line_error(code, err, "elsewhere")  # without --base: the config's base, which is not there
    code, err = run_main(["eval", heads, "--base", base_dir, *common, "--json", report, "--no-progress"],
                         capsys, monkeypatch)
    assert code == 0, err
    (evaluated,) = json.loads(report.read_text())["models"]
    assert (evaluated["model_type"], evaluated["n_heads"], evaluated["speed"]["medusa"]["agrees_with_ntp"]) == \
        ("medusa", 3, 1.0)
    code, err = run_main(["calibrate", heads, "--base", base_dir, *common, "--no-measure"], capsys, monkeypatch)
    assert code == 0, err
    assert load_model(heads, base=base_dir).calibration is not None  # written beside the heads, for that base


@pytest.mark.parametrize("command", [
    ["eval", "--data", "synthetic", "--no-progress"],
    ["calibrate", "--data", "synthetic"],
    ["generate", "--prompt", "1 + 1"],
])
def test_a_base_for_what_is_not_a_head_directory_is_refused(base_dir, tmp_path, capsys, monkeypatch, command):
    code, err = run_main([command[0], base_dir, "--base", base_dir, *command[1:]], capsys, monkeypatch)
    assert_one_line_error(code, err, "names the base of a MEDUSA head directory", str(base_dir), "is not one")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tgi_serves_the_medusa_export(base_dir, tmp_path, capsys, monkeypatch, family):
    """TGI reads FasterDecoding's layout as it is (heads_io's docstring names its loader): what
    `mtpkern export --format medusa` writes, read by TGI's rules (the head folder's config.json
    with medusa_num_heads and no architectures field, medusa_lm_head.safetensors only, head i's
    `{i}.{l}.linear` then `{i}.{L}`; the base from base_model_name_or_path, where TGI runs, by
    transformers), gives mtpkern's logits for every head. The README launches it."""
    import transformers

    from test_llama import hf_model

    if family == "llama":
        base_dir = tmp_path / "llama"
        hf_model("llama").save_pretrained(base_dir)
        heads = medusa_head_dir(tmp_path / "heads", base_dir, n=2, layers=2)
    else:
        heads = tmp_path / "heads"
        random_heads(base_dir, n_heads=3, n_layers=2, proj=True).save_pretrained(heads)
    out = tmp_path / "tgi"
    code, err = run_main(["export", heads, "--format", "medusa", "--out", out], capsys, monkeypatch)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert "architectures" not in cfg and cfg["medusa_num_heads"] == 2 and (out / "medusa_lm_head.safetensors").is_file()
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out / cfg["base_model_name_or_path"],
                                                                output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model = load_model(heads)
    idx = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base_out = hf(idx, output_hidden_states=True)
        got = torch.cat([base_out.logits[:, :, None], reference_logits(out, "medusa", base_out.hidden_states[-1])], 2)
        torch.testing.assert_close(got, model(idx).logits, atol=1e-5, rtol=0)
    readme = (out / "README.md").read_text()
    assert f"cd {out} && text-generation-launcher --model-id . --speculate 2" in readme, readme
    named = tmp_path / "named"
    code, err = run_main(["export", heads, "--format", "medusa", "--out", named, "--base", base_dir],
                         capsys, monkeypatch)
    assert code == 0, err
    assert f"text-generation-launcher --model-id {named} --speculate 2" in (named / "README.md").read_text()


@pytest.mark.parametrize("variant", ["llama", "qwen2_tied"])
def test_heads_on_a_llama_family_base(tmp_path, variant):
    """The base loads through load_model: heads of FasterDecoding's layout sit on a transformers
    Llama-family folder as on a GPT-2, and every layout gives back their logits."""
    from mtpkern.models import Llama
    from test_llama import hf_model

    hf_model(variant).save_pretrained(tmp_path / "base")
    model = load_model(medusa_head_dir(tmp_path / "heads", tmp_path / "base", n=2, layers=2))
    assert isinstance(model.base, Llama) and model.n_heads == 3
    idx = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    for fmt in FORMATS:
        out = export_heads(model, fmt, tmp_path / fmt)
        with torch.no_grad():
            ref = reference_logits(out, fmt, model.base.hidden_states(idx))
            torch.testing.assert_close(ref, model(idx).logits[:, :, 1:], atol=1e-5, rtol=0)
        assert_same_weights(load_model(out), model)
