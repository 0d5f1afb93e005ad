"""Tests for mtpkern.eval and mtpkern.plots: metrics on hand-made strings, run discovery,
the held-out split, the transformers baseline's weights, and an end-to-end evaluation of
three tiny trained runs (gpt2, mtp, medusa)."""

import json
import math

import pytest
import torch

from mtpkern.data import load_records, split_records
from mtpkern.eval import (
    answer_accuracy,
    bleu,
    evaluate,
    next_token_model,
    read_run,
    training_summary,
    validation_records,
)
from mtpkern.config import GPT2Config, LlamaConfig
from mtpkern.models import GPT2, Llama, MedusaModel, MTPModel
from mtpkern.plots import PLOTS_MARK

# ---------------------------------------------------------------- metrics


def test_bleu_perfect_and_disjoint():
    refs = ["Tom has 3 + 4 = 7 apples now.\nThe answer is: 7", "Each friend gets 12 / 3 = 4 cards."]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert bleu(["zebra quantum violin", "purple"], refs) == 0.0
    partial = bleu(["Tom has 3 + 4 = 8 apples now.\nThe answer is: 8", refs[1]], refs)
    assert 0.0 < partial < 100.0


def test_bleu_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="zero"):
        bleu([], [])


def test_answer_accuracy_compares_numbers():
    refs = ["x\nThe answer is: 7", "The answer is: 1,200", "The answer is: 0.5", "The answer is: 3"]
    assert answer_accuracy(refs, refs) == 1.0
    # Same numbers written differently still match; a wrong or missing answer does not.
    preds = ["so The answer is: 7.0", "The answer is: 1200.", "The answer is: 1/2", "no answer here"]
    assert answer_accuracy(preds, refs) == 0.75
    assert answer_accuracy(["The answer is: 8"], ["The answer is: 7"]) == 0.0
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        answer_accuracy(["a"], ["b", "c"])


def test_training_and_evaluation_share_one_metrics_module():
    """The metrics live in mtpkern.metrics: eval and train use those very functions (the names
    they exported before still resolve), and calibrate reads runs through mtpkern.rundir."""
    import mtpkern.calibrate as calibrate
    import mtpkern.eval as ev
    import mtpkern.metrics as metrics
    import mtpkern.rundir as rundir
    import mtpkern.train as tr

    assert ev.bleu is metrics.bleu and ev.answer_accuracy is metrics.answer_accuracy
    assert ev.evaluate_heads is tr.evaluate_heads is metrics.evaluate_heads
    assert ev.read_run is calibrate.read_run is rundir.read_run
    assert ev.validation_records is calibrate.validation_records is rundir.validation_records
    assert ev.training_summary is rundir.training_summary


@pytest.mark.parametrize("model_type", ["gpt2", "mtp", "medusa"])
def test_evaluate_heads_fused_and_plain_agree(model_type):
    """Every head's metrics from the fused loss kernel equal those from materialised logits."""
    from mtpkern.metrics import evaluate_heads

    torch.manual_seed(0)
    model = _model(model_type).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    loader = [{"input_ids": ids, "labels": labels}]
    fused = evaluate_heads(model, loader, torch.device("cpu"), fused=True)
    plain = evaluate_heads(model, loader, torch.device("cpu"), fused=False)
    assert fused["n_tokens"] == plain["n_tokens"] == [3 * 8] * model.n_heads  # 8 response labels a row
    assert fused["acc_top1"] == plain["acc_top1"] and fused["acc_top5"] == plain["acc_top5"]
    torch.testing.assert_close(torch.tensor(fused["head_loss"]), torch.tensor(plain["head_loss"]))
    assert fused["loss"] == fused["head_loss"][0] and fused["ppl"] == pytest.approx(math.exp(fused["loss"]))


# ---------------------------------------------------------------- runs and splits


def _model(model_type, family="gpt2"):
    if family == "llama":  # GQA and an untied unembedding: every weight of the family has a place
        base = Llama(LlamaConfig.tiny(vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                      intermediate_size=48, tie_word_embeddings=False))
    else:
        base = GPT2(GPT2Config.tiny(vocab_size=64, n_layer=2, n_embd=32, n_head=2))
    return {"base": lambda: base, "gpt2": lambda: base, "mtp": lambda: MTPModel.from_base(base, 2),
            "medusa": lambda: MedusaModel.from_base(base, 2)}[model_type]()


def _save_tiny(directory, model_type="gpt2", family="gpt2"):
    model = _model(model_type, family)
    model.save_pretrained(directory)
    return model


def test_validation_split_is_the_trainers(tmp_path):
    cfg = {"data": "synthetic", "seed": 3, "data_limit": 60, "val_fraction": 0.1}
    val, info = validation_records(cfg)
    _, expected = split_records(load_records("synthetic", seed=3, limit=60), 0.1, 3)
    assert val == expected and len(val) == 6
    assert info["held_out"] and info["n_records"] == 6
    with pytest.raises(ValueError, match="differs from the run's training data"):
        validation_records(cfg, data="other.jsonl")


def test_validation_split_of_a_bare_checkpoint_says_so():
    val, info = validation_records(None, "synthetic", limit=40)
    assert len(val) == 2 and not info["held_out"] and "may have trained" in info["note"]
    with pytest.raises(ValueError, match="pass data="):
        validation_records(None, None)


def test_training_summary_from_log(tmp_path):
    log = [{"kind": "train", "step": 10, "loss": 3.0, "head_losses": [3.0, 4.0], "peak_memory_bytes": 100,
            "elapsed_s": 1.0},
           {"kind": "train", "step": 20, "loss": 2.0, "head_losses": [2.0, 3.5], "peak_memory_bytes": 300,
            "elapsed_s": 2.0},
           {"kind": "eval", "step": 20, "val_loss": 2.1, "loss": 2.1}]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in log))
    cfg, records, summary = read_run(tmp_path)
    assert cfg is None and summary is None and records == log
    t = training_summary(records, summary)
    assert t["curve"] == {"step": [10, 20], "loss": [3.0, 2.0], "head_losses": [[3.0, 2.0], [4.0, 3.5]]}
    assert t["peak_memory_bytes"] == 300 and t["wall_time_s"] == 2.0
    assert training_summary([], None) is None
    (tmp_path / "log.jsonl").write_text(json.dumps(log[0]) + "\n{truncated")
    with pytest.raises(ValueError, match=r"log.jsonl:2 is not valid JSON"):
        read_run(tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("model_type", ["base", "mtp", "medusa"])
def test_next_token_model_has_the_same_next_token_path(tmp_path, model_type, family):
    """The transformers baseline's weights: a base model of the model's own family (issue 24: an
    MTP model on a Llama built head 0 as a GPT-2) whose logits are the next-token path's, also
    once converted to transformers."""
    from mtpkern.hf_io import to_hf

    torch.manual_seed(0)
    model = _save_tiny(tmp_path, model_type, family).eval()
    if model_type == "mtp":  # make head 0 differ from the other heads and the initial copy
        with torch.no_grad():
            for p in model.heads.parameters():
                p.add_(0.1 * torch.randn_like(p))
    base = next_token_model(model)
    assert type(base) is {"gpt2": GPT2, "llama": Llama}[family] and base.config.family == family
    idx = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        expected = model(idx, heads=1).logits[:, :, 0]
        torch.testing.assert_close(base(idx).logits[:, :, 0], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(to_hf(base)(idx).logits, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- end to end

DATA = dict(data="synthetic", data_limit=120, val_fraction=0.1, seed=5, max_len=128, vocab_size=400)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny trained runs: ntp from scratch, mtp from scratch, medusa on the ntp run."""
    from mtpkern.train import TrainConfig, train

    root = tmp_path_factory.mktemp("runs")
    common = dict(DATA, steps=4, batch_size=4, log_every=2, eval_every=4, eval_batches=1, save_every=4,
                  device="cpu", progress=False)
    train(TrainConfig(objective="ntp", out=str(root / "ntp"), **common))
    train(TrainConfig(objective="mtp", out=str(root / "mtp"), n_heads=2, **common))
    train(TrainConfig(objective="medusa", out=str(root / "medusa"), base=str(root / "ntp" / "checkpoint"),
                      n_heads=3, **common))
    return root


def test_evaluate_end_to_end(runs, tmp_path):
    out = tmp_path / "report" / "eval.json"
    # The medusa run is given by its checkpoint directory: its run files are one level up.
    report = evaluate([runs / "ntp", runs / "mtp", runs / "medusa" / "checkpoint"], json_path=out,
                      device="cpu", max_samples=3, max_new_tokens=10, max_batches=2, progress=False,
                      batch_sizes=(1, 2), speed_samples=2)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["schema"] == "mtpkern.eval/1" and report["device"]["type"] == "cpu"
    models = {m["model_type"]: m for m in report["models"]}
    assert list(models) == ["gpt2", "mtp", "medusa"]
    assert [m["name"] for m in report["models"]] == ["ntp", "mtp", "medusa"]
    n_val = len(split_records(load_records("synthetic", seed=5, limit=120), 0.1, 5)[1])

    for kind, m in models.items():
        q, J = m["quality"], m["n_heads"]
        assert m["validation"]["held_out"] and m["validation"]["n_records"] == n_val
        assert math.isfinite(q["ppl"]) and q["ppl"] > 1
        assert q["ppl"] == pytest.approx(math.exp(q["val_loss"]))
        assert len(q["head_top1"]) == len(q["head_top5"]) == J
        assert all(0 <= a <= b <= 1 for a, b in zip(q["head_top1"], q["head_top5"]))
        assert 0 <= q["bleu"] <= 100 and 0 <= q["answer_accuracy"] <= 1 and q["n_samples"] == 3
        # the solutions behind BLEU and accuracy: all 3 prompts in batches of 2 with the model's
        # own strategy; the 2 prompts the speed runs decode one at a time are the timed ones
        assert q["decoded_with"]["strategy"] == m["primary"] and q["decoded_with"]["batch"] == 2
        assert q["decoded_with"]["agrees_with_batch_1"] == 1.0 and q["decoded_with"]["seconds"] > 0
        assert len(m["speed"]["ntp"]["accept_lengths"]) >= 2 and report["settings"]["speed_samples"] == 2
        # batched decoding of the same prompts: every row the batch-1 run's tokens
        assert set(m["batched"]) == {"ntp", m["primary"]}, m["batched"]
        for by_b in m["batched"].values():
            assert set(by_b) == {"1", "2"}
            assert all(v["tokens_per_second"] > 0 and v["agrees_with_batch_1"] == 1.0 for v in by_b.values())
        ntp = m["speed"]["ntp"]
        assert ntp["forward_passes_per_token"] == 1.0 and ntp["mean_accept_length"] == 1.0
        for name, s in m["speed"].items():
            assert s["tokens_per_second"] > 0 and s["latency_s"] > 0, (kind, name)
            # Greedy decoding is lossless, and transformers runs the same next-token weights.
            assert s["agrees_with_ntp"] == 1.0, (kind, name)
        primary = m["speed"][m["primary"]]
        assert primary["mean_accept_length"] >= 1
        assert primary["forward_passes_per_token"] <= 1
        assert primary["speedup_vs_hf"] == pytest.approx(primary["tokens_per_second"]
                                                         / m["speed"]["hf"]["tokens_per_second"])
        assert m["memory"]["decode_peak_bytes"] > 0 and m["memory"]["kind"] == "process_peak_rss"
        t = m["training"]
        assert t["wall_time_s"] > 0 and t["time_per_epoch_s"] > 0 and t["peak_memory_bytes"] > 0
        assert t["curve"]["step"] == [2, 4] and len(t["curve"]["loss"]) == 2
    assert [m["primary"] for m in models.values()] == ["ntp", "mtp", "medusa"]
    # MEDUSA's perplexity is its frozen base's: the ntp run's weights on the same split.
    assert models["medusa"]["quality"]["ppl"] == pytest.approx(models["gpt2"]["quality"]["ppl"], rel=1e-5)
    assert "base" in models["medusa"]["quality"]["ppl_of"]
    assert models["mtp"]["speed"]["hf"]["weights"].startswith("trunk + head-0")

    table = (out.parent / "eval.md").read_text()
    assert report["device"]["name"] in table
    assert "| B=1 tokens/s | B=2 tokens/s | rows equal to batch 1 |" in table and "| 100% |" in table
    assert "medusa: BLEU and answer acc over 3 solutions decoded 2 at a time (medusa, batched; 100% of" in table
    for m in report["models"]:
        assert f"| {m['name']} ({m['model_type']}) | {m['primary']} |" in table
    assert len(report["files"]["plots"]) == 4
    for png in report["files"]["plots"]:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluate_shows_projections_and_what_medusa2_traded(runs, tmp_path):
    """A MEDUSA-1 run with its own projections and a MEDUSA-2 run: the report names them, and
    gives the original base's perplexity and answer accuracy beside the MEDUSA-2 backbone's."""
    from mtpkern.train import TrainConfig, train

    common = dict(DATA, steps=2, batch_size=4, log_every=2, eval_every=2, eval_batches=1, save_every=2,
                  device="cpu", progress=False, base=str(runs / "ntp" / "checkpoint"), n_heads=3)
    train(TrainConfig(objective="medusa", out=str(tmp_path / "proj"), medusa_proj=True, **common))
    train(TrainConfig(objective="medusa2", out=str(tmp_path / "m2"), head_warmup=0, lr=1e-2, **common))
    report = evaluate([runs / "ntp", tmp_path / "proj", tmp_path / "m2"], json_path=tmp_path / "e.json", device="cpu",
                      max_samples=2, max_new_tokens=8, max_batches=2, progress=False, hf_baseline=False, plots=False)
    ntp, proj, m2 = report["models"]
    assert (proj["objective"], proj["medusa_proj"], m2["objective"], m2["medusa_proj"]) == ("medusa", True, "medusa2", False)
    assert "original_base" not in proj["quality"]
    orig = m2["quality"]["original_base"]
    assert orig["ppl"] == pytest.approx(ntp["quality"]["ppl"], rel=1e-5)  # the same weights, split and prompts
    assert orig["answer_accuracy"] == ntp["quality"]["answer_accuracy"]
    assert m2["quality"]["ppl"] != pytest.approx(orig["ppl"], rel=1e-6)  # the backbone was trained
    assert m2["speed"]["medusa"]["agrees_with_ntp"] == 1.0
    table = (tmp_path / "e.md").read_text()
    assert "| proj (medusa, own projections) |" in table and "| m2 (medusa2) |" in table
    assert "m2 (MEDUSA-2) trades quality" in table
    # a base moved away since the run is reported, not fatal
    from mtpkern.eval import original_base_quality

    gone = original_base_quality(tmp_path / "moved", None, [], [], None, device="cpu", dtype=torch.float32,
                                 max_batches=1, max_new_tokens=4, kernels="auto")
    assert gone["ppl"] is None and "moved" in gone["error"]


def _llama_base(directory, n_kv_head: int):
    """A tiny random Llama with a 400-token tokenizer, saved as a training base."""
    from mtpkern.data import synthetic_records, train_tokenizer

    tok = train_tokenizer(synthetic_records(200, seed=7), vocab_size=400)
    torch.manual_seed(0)
    cfg = LlamaConfig.tiny(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=4, n_kv_head=n_kv_head,
                           intermediate_size=48, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    Llama(cfg).save_pretrained(directory, tokenizer=tok)
    return directory


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_eval_command_on_mtp_and_medusa_runs_on_a_llama(tmp_path, capsys, monkeypatch, n_kv_head):
    """Issue 24: `mtpkern eval` on runs trained on a Llama base (the MTP one built its
    transformers baseline as a GPT-2). Every strategy and transformers decode the same tokens."""
    from mtpkern.train import TrainConfig, train
    from test_cli import run_main

    base = _llama_base(tmp_path / "base", n_kv_head)
    common = dict(DATA, base=str(base), steps=2, batch_size=4, eval_every=1000, save_every=1000, n_heads=3,
                  device="cpu", precision="fp32", progress=False)
    for objective in ("mtp", "medusa"):
        train(TrainConfig(objective=objective, out=str(tmp_path / objective), **common))
    out = tmp_path / "e.json"
    code, err = run_main(["eval", tmp_path / "mtp", tmp_path / "medusa", "--json", out, "--max-samples", "3",
                          "--speed-samples", "2", "--max-new-tokens", "8", "--batch", "2", "--no-progress",
                          "--device", "cpu"], capsys, monkeypatch)
    assert code == 0, err
    mtp, medusa = json.loads(out.read_text())["models"]
    assert (mtp["model_type"], mtp["primary"], medusa["primary"]) == ("mtp", "mtp", "medusa")
    assert mtp["speed"]["hf"]["weights"] == "trunk + head-0 block as a Llama"
    for m in (mtp, medusa):
        assert {name: s["agrees_with_ntp"] for name, s in m["speed"].items()} == {"ntp": 1.0, m["primary"]: 1.0,
                                                                                  "hf": 1.0}
        assert m["quality"]["decoded_with"]["agrees_with_batch_1"] == 1.0 and len(m["quality"]["head_top1"]) == 3


def test_json_pointing_at_a_directory_fails_before_evaluating(tmp_path, monkeypatch):
    import mtpkern.eval as ev

    monkeypatch.setattr(ev, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    with pytest.raises(ValueError, match="is a directory: name the report file"):
        evaluate([tmp_path / "missing_run"], json_path=tmp_path, device="cpu")
    with pytest.raises(ValueError, match="is a directory"):
        evaluate([tmp_path / "missing_run"], json_path=str(tmp_path / "new") + "/", device="cpu")


def test_evaluate_bare_checkpoint_needs_data(runs, tmp_path):
    bare = tmp_path / "bare"
    from mtpkern.hf_io import load_model

    load_model(runs / "ntp" / "checkpoint").save_pretrained(bare)
    with pytest.raises(ValueError, match="pass data="):
        evaluate([bare], json_path=tmp_path / "e.json", device="cpu", progress=False)


# ---------------------------------------------------------------- the files it writes


def _refuse_to_evaluate(monkeypatch):
    import mtpkern.eval as ev

    monkeypatch.setattr(ev, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated before checking the outputs"))


def test_eval_never_replaces_a_derived_file_it_did_not_write(tmp_path, monkeypatch):
    """The table goes beside --json as .md and the plots into <stem>_plots/: names the user did
    not give. Something there that eval did not write is refused, before any work."""
    _refuse_to_evaluate(monkeypatch)
    (tmp_path / "README.md").write_text("# my project\n")
    with pytest.raises(ValueError, match=r"README.md exists and was not written by mtpkern eval") as e:
        evaluate([tmp_path / "run"], json_path=tmp_path / "README.json", device="cpu")
    assert "\n" not in str(e.value)
    (tmp_path / "r_plots").mkdir()
    (tmp_path / "r_plots" / "mine.png").write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"r_plots exists and was not written by mtpkern eval"):
        evaluate([tmp_path / "run"], json_path=tmp_path / "r.json", device="cpu")
    with pytest.raises(ValueError, match=r"notes.md would hold both the JSON report and the table"):
        evaluate([tmp_path / "run"], json_path=tmp_path / "notes.md", device="cpu")
    (tmp_path / "t.md").mkdir()
    with pytest.raises(ValueError, match=r"t.md exists and is not a file"):
        evaluate([tmp_path / "run"], json_path=tmp_path / "t.json", device="cpu")
    assert (tmp_path / "README.md").read_text() == "# my project\n"
    assert (tmp_path / "r_plots" / "mine.png").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "r_plots", "t.md"]


def test_eval_without_json_keeps_an_eval_json_or_md_it_did_not_write(tmp_path, monkeypatch):
    _refuse_to_evaluate(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval.json").write_text('{"mine": 1}')
    with pytest.raises(ValueError, match=r"eval.json exists here and is not an mtpkern eval report: name the "
                                         r"report file with json_path= \(--json\)"):
        evaluate([tmp_path / "run"], device="cpu")
    (tmp_path / "eval.json").unlink()
    (tmp_path / "eval.md").write_text("my notes")
    with pytest.raises(ValueError, match="eval.md exists and was not written by mtpkern eval"):
        evaluate([tmp_path / "run"], device="cpu")
    assert (tmp_path / "eval.md").read_text() == "my notes"


def test_eval_replaces_its_own_outputs_and_checks_again_before_writing(runs, tmp_path, monkeypatch):
    import mtpkern.eval as ev

    monkeypatch.chdir(tmp_path)
    kw = dict(device="cpu", max_samples=1, max_new_tokens=4, max_batches=1, progress=False, hf_baseline=False)
    evaluate([runs / "ntp"], **kw)  # ./eval.json, ./eval.md, ./eval_plots/
    table = (tmp_path / "eval.md").read_text()
    assert table.startswith(ev.TABLE_MARK + "\n") and (tmp_path / "eval_plots" / PLOTS_MARK).is_file()
    evaluate([runs / "ntp"], **kw)  # its own files: replaced
    (tmp_path / "eval.md").write_text(table.split("\n", 1)[1])  # a table from before the mark is its own too
    evaluate([runs / "ntp"], **kw)
    real = ev.evaluate_checkpoint

    def meanwhile(*args, **kwargs):  # the user writes late.md while the evaluation runs
        (tmp_path / "late.md").write_text("mine")
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_checkpoint", meanwhile)
    with pytest.raises(ValueError, match="late.md exists and was not written by mtpkern eval"):
        evaluate([runs / "ntp"], json_path=tmp_path / "late.json", plots=False, **kw)
    assert (tmp_path / "late.md").read_text() == "mine" and not (tmp_path / "late.json").exists()


def test_a_report_whose_folder_cannot_be_made_is_refused_before_evaluating(tmp_path, monkeypatch):
    _refuse_to_evaluate(monkeypatch)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match=r"file, which is a file, not a directory"):
        evaluate([tmp_path / "run"], json_path=tmp_path / "file" / "sub" / "e.json", device="cpu")
    assert (tmp_path / "file").read_text() == "mine"


def test_a_full_disk_while_plotting_names_the_file(tmp_path, monkeypatch):
    import errno

    from matplotlib.figure import Figure

    from mtpkern.checkpoint import CheckpointError
    from mtpkern.plots import plot_step_cost

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(CheckpointError, match=r"the disk is full .* while writing .*cost.png"):
        plot_step_cost({"ntp": [{"T": 1, "step_us": 10.0}]}, tmp_path / "cost.png")
