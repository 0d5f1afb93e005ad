"""``n_heads`` has one meaning: every prediction head, the next-token head included (a MEDUSA
model with 5 MEDUSA heads has n_heads 6). Checkpoints, run folders and calibrations written
before, when a MEDUSA config counted its MEDUSA heads alone, still load as the same models.

``tests/data/old_runs`` holds a MEDUSA run (``--n-heads 2``: two MEDUSA heads, as that code
counted them) and an MTP run (``--n-heads 3``) written by the code of commit f0b7180, with what
that code computed from them (``expected.json``); see its README.md.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mtpkern import GPT2, GPT2Config, MedusaModel, MTPModel, generate, load_model, load_tokenizer
from mtpkern.calibration import CALIBRATION_NAME, SCHEMA, Calibration, draft_depth, load_calibration
from mtpkern.checkpoint import CheckpointError
from mtpkern.cli import main
from mtpkern.config import CONFIG_FORMAT
from mtpkern.eval import evaluate
from mtpkern.rundir import RUN_FORMAT, read_run, read_state, upgrade_config
from mtpkern.train import TrainConfig, train

OLD = Path(__file__).parent / "data" / "old_runs"
EXPECTED = json.loads((OLD / "expected.json").read_text())
KINDS = {"medusa": MedusaModel, "mtp": MTPModel}


@pytest.fixture
def old_run(tmp_path):
    """A copy of an old run folder (resuming and calibrating write into it)."""
    def copy(kind: str) -> Path:
        shutil.copytree(OLD / kind, tmp_path / kind)
        return tmp_path / kind
    return copy


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- old checkpoints


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_old_checkpoint_loads_as_the_same_model(kind):
    """Three heads for both: the MEDUSA file says n_heads 2 (its MEDUSA heads), read as 3."""
    raw = json.loads((OLD / kind / "checkpoint" / "config.json").read_text())
    assert "format" not in raw["mtpkern"]  # written before the marker
    model = load_model(OLD / kind / "checkpoint")
    assert type(model) is KINDS[kind]
    assert model.n_heads == model.config.n_heads == 3 and draft_depth(model) == 2
    if kind == "medusa":
        assert raw["mtpkern"]["n_heads"] == 2 and len(model.medusa) == 2
    else:
        assert raw["mtpkern"]["n_heads"] == 3 and len(model.heads) == 3
    want = EXPECTED[kind]
    with torch.no_grad():
        logits = model(torch.tensor([want["prompt"]])).logits[0]
    assert logits.argmax(-1).tolist() == want["head_top1"]
    torch.testing.assert_close(logits[-1, :, :32], torch.tensor(want["last_logits"]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_old_checkpoint_decodes_as_before(kind):
    """Greedy next-token decoding gives the old code's tokens; the model's own speculative
    strategy (MEDUSA's tree, MTP's heads) gives the same tokens."""
    model = load_model(OLD / kind / "checkpoint")
    want = EXPECTED[kind]
    prompt = torch.tensor(want["prompt"])
    ntp = generate(model, prompt, max_new_tokens=24, strategy="ntp")
    assert ntp.tokens == want["greedy"]
    tree = [[0], [1], [0, 0]] if kind == "medusa" else None
    spec = generate(model, prompt, max_new_tokens=24, strategy=kind, tree=tree)
    assert spec.tokens == want["greedy"]
    calibrated = generate(model, prompt, max_new_tokens=24, strategy=kind)  # its calibration's auto tree
    assert calibrated.tokens == want["greedy"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_old_calibration_is_accepted_for_its_checkpoint(kind):
    ckpt = OLD / kind / "checkpoint"
    raw = json.loads((ckpt / CALIBRATION_NAME).read_text())
    assert raw["schema"] == "mtpkern.calibration/1" and raw["fingerprint"]["n_heads"] == {"medusa": 2, "mtp": 3}[kind]
    model = load_model(ckpt)
    assert model.calibration is not None and model.calibration.depth == 2
    assert model.calibration.fingerprint["n_heads"] == 3
    assert load_calibration(ckpt, load_model(ckpt, calibration=False)).counts == raw["counts"]
    alone = Calibration.from_dict(raw, "old.json")  # without the model: its counts against its fingerprint
    assert alone.fingerprint["n_heads"] == 3
    resaved = alone.to_dict()
    assert resaved["schema"] == SCHEMA and resaved["fingerprint"]["n_heads"] == 3
    Calibration.from_dict(resaved, "new.json", model)  # written anew: the new schema, still this model's


# ----------------------------------------------------------------------------- old run folders


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_old_run_folder_reads_in_the_current_format(kind):
    saved = json.loads((OLD / kind / "train_config.json").read_text())
    assert "format" not in saved
    train_config = read_run(OLD / kind)[0]
    assert train_config is not None and train_config["format"] == RUN_FORMAT and train_config["n_heads"] == 3
    state = read_state(OLD / kind / "checkpoint")
    assert state["config"]["n_heads"] == 3 and state["config"]["format"] == RUN_FORMAT
    if kind == "medusa":  # one loss weight per MEDUSA head, as before
        assert train_config["head_weights"] == saved["head_weights"] == pytest.approx([1.0, 0.8])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_old_run_resumes_with_the_same_model(kind, old_run):
    run = old_run(kind)
    before = load_model(run / "checkpoint")
    args = dict(objective=kind, out=str(run), resume=True, steps=3, device="cpu", progress=False,
                base="base" if kind == "medusa" else None)  # as saved: a resume reads only its checkpoint
    with pytest.raises(ValueError, match="--n-heads 2 contradicts the run's saved 3"):
        train(TrainConfig(n_heads=2, **args))
    result = train(TrainConfig(n_heads=3, **args))
    assert result.steps == 3 and not result.interrupted
    after = load_model(run / "checkpoint")
    assert type(after) is type(before) and after.n_heads == 3
    assert sorted(after.state_dict()) == sorted(before.state_dict())
    if kind == "medusa":  # MEDUSA-1: the base stays frozen, the heads train
        for name, p in before.base.state_dict().items():
            assert torch.equal(after.base.state_dict()[name], p), name
    assert any(not torch.equal(after.state_dict()[k], v) for k, v in before.state_dict().items())
    # written anew, every file in the current format
    assert json.loads((run / "checkpoint" / "config.json").read_text())["mtpkern"]["format"] == CONFIG_FORMAT
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["format"] == RUN_FORMAT and saved["n_heads"] == 3
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["config"]["format"] == RUN_FORMAT and state["config"]["n_heads"] == 3 and state["step"] == 3


def test_an_old_run_evaluates_and_calibrates(old_run, tmp_path, monkeypatch, capsys):
    """``mtpkern eval`` and ``mtpkern calibrate`` read the old run's train_config.json (its
    validation split) and checkpoint; calibrate replaces the old calibration.json."""
    run = old_run("medusa")
    report = evaluate([run], json_path=tmp_path / "eval.json", device="cpu", max_samples=2, max_new_tokens=8,
                      max_batches=1, hf_baseline=False, plots=False, progress=False)
    (entry,) = report["models"]
    assert entry["n_heads"] == 3 and len(entry["quality"]["head_top1"]) == 3
    monkeypatch.setenv("MTPKERN_CACHE", str(tmp_path / "cache"))
    assert main(["calibrate", str(run), "--max-samples", "2", "--max-new-tokens", "8", "--no-measure",
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    raw = json.loads((run / "checkpoint" / CALIBRATION_NAME).read_text())
    assert raw["schema"] == SCHEMA and raw["fingerprint"]["n_heads"] == 3
    assert load_model(run).calibration.depth == 2


# ----------------------------------------------------------------------------- the one meaning


def test_n_heads_3_is_two_draft_heads_for_both_families(old_run, tmp_path, monkeypatch, capsys):
    """``mtpkern train mtp|medusa --n-heads 3`` both give 2 draft heads, and everything the run
    writes (config.json, train_config.json, the trainer state, calibration.json) says 3."""
    monkeypatch.setenv("MTPKERN_CACHE", str(tmp_path / "cache"))
    ckpt = OLD / "medusa" / "checkpoint"
    load_model(ckpt).base.save_pretrained(tmp_path / "base", tokenizer=load_tokenizer(ckpt))
    common = ["--base", str(tmp_path / "base"), "--steps", "1", "--batch-size", "4", "--data-limit", "40",
              "--max-len", "128", "--eval-every", "1000", "--precision", "fp32", "--device", "cpu", "--no-progress"]
    for kind in ("medusa", "mtp"):
        out = tmp_path / f"new-{kind}"
        assert main(["train", kind, "--out", str(out), "--n-heads", "3", *common]) == 0, capsys.readouterr().err
        model = load_model(out)
        assert type(model) is KINDS[kind] and model.n_heads == 3 and draft_depth(model) == 2
        assert len(model.medusa if kind == "medusa" else model.heads) == {"medusa": 2, "mtp": 3}[kind]
        raw = json.loads((out / "checkpoint" / "config.json").read_text())["mtpkern"]
        assert raw["format"] == CONFIG_FORMAT and raw["n_heads"] == 3
        saved = json.loads((out / "train_config.json").read_text())
        assert saved["format"] == RUN_FORMAT and saved["n_heads"] == 3
        assert torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)["config"]["n_heads"] == 3
        cal = json.loads((out / "checkpoint" / CALIBRATION_NAME).read_text())
        assert cal["schema"] == SCHEMA and cal["fingerprint"]["n_heads"] == 3 and len(cal["counts"]) == 2


def test_from_base_counts_every_head():
    base = GPT2(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    mtp, medusa = MTPModel.from_base(base, n_heads=3), MedusaModel.from_base(base, n_heads=3)
    assert mtp.n_heads == medusa.n_heads == mtp.config.n_heads == medusa.config.n_heads == 3
    assert draft_depth(mtp) == draft_depth(medusa) == 2 and len(medusa.medusa) == 2
    assert len(MedusaModel.from_base(base).medusa) == 5  # the default: MEDUSA's 5 heads, n_heads 6
    with pytest.raises(ValueError, match="a MEDUSA model needs n_heads >= 2") as e:
        MedusaModel.from_base(base, n_heads=1)
    _one_line(e)


def test_a_config_is_converted_only_without_the_marker():
    hf = GPT2Config.tiny(vocab_size=64, model_type="medusa", n_heads=3).to_hf_dict()
    assert hf["mtpkern"]["format"] == CONFIG_FORMAT
    assert GPT2Config.from_hf_dict(hf).n_heads == 3  # written now: as is
    old = {**hf, "mtpkern": {k: v for k, v in hf["mtpkern"].items() if k != "format"}}
    assert GPT2Config.from_hf_dict(old).n_heads == 4  # written before: its 3 MEDUSA heads and head 0
    old_mtp = {**old, "mtpkern": {**old["mtpkern"], "model_type": "mtp"}}
    assert GPT2Config.from_hf_dict(old_mtp).n_heads == 3  # MTP always counted head 0
    assert upgrade_config({"objective": "medusa2", "n_heads": 5}, "f")["n_heads"] == 6
    assert upgrade_config({"objective": "mtp", "n_heads": 5}, "f")["n_heads"] == 5
    assert upgrade_config({"objective": "medusa", "n_heads": 5, "format": RUN_FORMAT}, "f")["n_heads"] == 5


# ----------------------------------------------------------------------------- bad markers


@pytest.mark.parametrize("fmt, message", [
    (CONFIG_FORMAT + 1, "written by a newer mtpkern"),
    ("2", "'mtpkern.format' must be a positive integer, got '2'"),
    (0, "'mtpkern.format' must be a positive integer, got 0"),
])
def test_a_bad_config_format_is_one_line_naming_the_file(tmp_path, fmt, message):
    ckpt = tmp_path / "ck"
    shutil.copytree(OLD / "medusa" / "checkpoint", ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["mtpkern"]["format"] = fmt
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(ckpt)
    assert str(ckpt / "config.json") in _one_line(e)


@pytest.mark.parametrize("fmt, message", [
    (RUN_FORMAT + 1, "written by a newer mtpkern"),
    (True, "'format' must be a positive integer, got True"),
])
def test_a_bad_run_format_is_one_line_naming_the_file(old_run, fmt, message):
    run = old_run("mtp")
    saved = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**saved, "format": fmt}))
    with pytest.raises(CheckpointError, match=message) as e:
        read_run(run)
    assert str(run / "train_config.json") in _one_line(e)
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        upgrade_config([1], run / "train_config.json")
