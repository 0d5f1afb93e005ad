"""The command line: one-line errors for bad input, and the commands on tiny models."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mtpkern import GPT2, GPT2Config, MedusaModel
from mtpkern.cli import main, parse_tree
from mtpkern.data import synthetic_records, train_tokenizer


def run_cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MTPKERN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mtpkern.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("args, message", [
    (["train", "xyz", "--out", "o"], "invalid choice: 'xyz'"),
    (["train", "ntp", "--out", "o", "--steps", "-3"], "expected a positive integer, got -3"),
    (["train", "ntp", "--out", "o", "--steps", "3", "--epochs", "1"], "give either --steps or --epochs"),
    (["train", "ntp", "--out", "o", "--device", "tpu"], "device must be auto, cpu or cuda"),
    (["train", "medusa", "--out", "o", "--steps", "1"], "needs a trained base model"),
    (["train", "ntp", "--out", "o", "--steps", "1", "--data", "no_such_file.jsonl"], "no_such_file.jsonl"),
    (["generate", "no_such_dir", "--prompt", "hi"], "no such local directory"),
    (["generate", "d", "--prompt", "hi", "--max-new-tokens", "0"], "expected a positive integer"),
])
def test_bad_arguments_give_one_line_errors(args, message, tmp_path):
    r = run_cli(*[str(tmp_path / a) if a in ("o", "d") else a for a in args])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_parse_tree_forms():
    assert len(parse_tree("mc_sim_7b_63")) == 64  # 63 nodes + the root
    assert parse_tree("chain:3").is_chain
    assert parse_tree("2,1").max_depth == 2
    assert parse_tree("chain3") == parse_tree("chain:3")
    assert parse_tree("auto") == "auto" and parse_tree("dynamic:8") == "dynamic:8"
    for bad in ("wide", "chain:0", "chain:x"):
        with pytest.raises(ValueError, match="tree spec"):
            parse_tree(bad)


@pytest.fixture(scope="module")
def medusa_dir(tmp_path_factory):
    records = synthetic_records(200, seed=0)
    tok = train_tokenizer(records, vocab_size=300)
    torch.manual_seed(0)
    base = GPT2(GPT2Config.tiny(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    model = MedusaModel.from_base(base, n_heads=2)
    d = tmp_path_factory.mktemp("ck") / "checkpoint"
    model.save_pretrained(d, tokenizer=tok)
    return d


@pytest.mark.parametrize("strategy, tree", [("ntp", None), ("medusa", "2,1"), ("medusa", "dynamic:4"),
                                            ("medusa", "auto")])
def test_generate_command_prints_text_and_stats(medusa_dir, strategy, tree, capsys):
    tree = ["--tree", tree] if tree else []
    code = main(["generate", str(medusa_dir.parent), "--prompt", "Tom has 3 apples.", "--strategy", strategy,
                 "--max-new-tokens", "8", "--device", "cpu", *tree])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"[{strategy}]" in out.err and "forward passes" in out.err
    assert out.out.strip() != "" or "0 tokens" not in out.err


@pytest.mark.parametrize("tree", ["chain:0", "chain:x", "chain0", "dynamic:0", "4;2"])
def test_generate_command_rejects_a_bad_tree_in_one_line(medusa_dir, tree, capsys):
    code = main(["generate", str(medusa_dir), "--prompt", "hi", "--max-new-tokens", "4", "--device", "cpu",
                 "--tree", tree])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "tree" in err and len(err.strip().splitlines()) == 1, err


def test_generate_command_rejects_a_prompt_longer_than_the_context(medusa_dir, capsys):
    code = main(["generate", str(medusa_dir), "--prompt", "seven " * 200, "--max-new-tokens", "8", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "context" in err and "Traceback" not in err


def test_demo_end_to_end_quick(tmp_path):
    """The README's main command, shortened: three trainings, the evaluation, table and plots."""
    out = tmp_path / "demo"
    r = run_cli("demo", "--quick", "--steps", "2", "--out", str(out), "--device", "cpu", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for run in ("ntp", "mtp", "medusa"):
        assert (out / run / "checkpoint" / "model.safetensors").is_file()
    table = (out / "report.md").read_text()
    assert "| ntp (gpt2) | ntp |" in table and "| mtp (mtp) | mtp |" in table and "| medusa (medusa) | medusa |" in table
    plots = sorted(p.name for p in (out / "report_plots").iterdir())
    assert "train_loss.png" in plots and all((out / "report_plots" / p).stat().st_size > 0 for p in plots)
    again = run_cli("demo", "--quick", "--steps", "2", "--out", str(out), "--device", "cpu")
    assert again.returncode == 2 and "pass --overwrite" in again.stderr

    # `mtpkern eval` on the demo's runs, from the command line
    report = tmp_path / "eval" / "report.json"
    ev = run_cli("eval", str(out / "ntp"), str(out / "medusa" / "checkpoint"), "--json", str(report),
                 "--device", "cpu", "--max-samples", "2", "--max-new-tokens", "8", "--no-hf")
    assert ev.returncode == 0, ev.stderr[-3000:]
    data = json.loads(report.read_text())
    assert [m["model_type"] for m in data["models"]] == ["gpt2", "medusa"]
    assert data["models"][1]["speed"]["medusa"]["agrees_with_ntp"] == 1.0
    assert report.with_suffix(".md").is_file()


def test_bench_command_quick(tmp_path):
    path = tmp_path / "bench.json"
    code = main(["bench", "--device", "cpu", "--quick", "--prompts", "1", "--max-new-tokens", "6", "--json", str(path)])
    assert code == 0
    report = json.loads(path.read_text())
    assert report["device"]["type"] == "cpu"
    assert {"ntp/eager", "mtp/eager", "medusa/eager", "hf/dynamic"} <= set(report["cases"])
    assert report["cases"]["ntp/eager"]["tokens_per_second"] > 0
