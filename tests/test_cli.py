"""The command line: one-line errors for bad input, and the commands on tiny models."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtpkern import GPT2, GPT2Config, MedusaModel
from mtpkern.cli import main, parse_tree
from mtpkern.data import format_prompt, load_tokenizer
from mtpkern.generation import generate
from mtpkern.hf_io import load_model
from mtpkern.options import DecodeOptions
from mtpkern.data import synthetic_records, train_tokenizer
from mtpkern.runtime import resolve_dtype


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
    (["eval", "d", "--speed-samples", "0"], "expected a positive integer, got 0"),
])
def test_bad_arguments_give_one_line_errors(args, message, tmp_path):
    r = run_cli(*[str(tmp_path / a) if a in ("o", "d") else a for a in args])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def run_main(args, capsys, monkeypatch):
    """``main(args)`` in this process: (exit status, stderr)."""
    monkeypatch.delenv("MTPKERN_DEBUG", raising=False)
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, *needles):
    assert code not in (0, None), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("field, value, message", [
    ("n_embd", "128", "n_embd must be a non-negative integer, got '128'"),
    ("n_layer", None, "n_layer must be a non-negative integer, got None"),
    ("n_head", 4.0, "n_head must be a non-negative integer, got 4.0"),
    ("mtpkern", "gpt2", "the field 'mtpkern' must be an object"),
])
def test_config_field_of_the_wrong_type(medusa_dir, tmp_path, field, value, message, capsys, monkeypatch):
    ckpt = tmp_path / "run" / "checkpoint"
    shutil.copytree(medusa_dir, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    for args in (["generate", tmp_path / "run", "--prompt", "hi", "--device", "cpu"],
                 ["train", "medusa", "--out", tmp_path / "m", "--base", tmp_path / "run", "--steps", "1"]):
        code, err = run_main(args, capsys, monkeypatch)
        assert_one_line_error(code, err, str(ckpt / "config.json"), message)


def test_corrupt_tokenizer_json(medusa_dir, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(medusa_dir, ckpt)
    (ckpt / "tokenizer.json").write_text('{"version": "1.0", "model": {"vocab": {"a"')
    code, err = run_main(["generate", ckpt, "--prompt", "hi", "--device", "cpu"], capsys, monkeypatch)
    assert_one_line_error(code, err, str(ckpt / "tokenizer.json"), "is corrupt")


def test_non_utf8_data(tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"query": "a", "response": "b"}\n{"query": "\xff", "response": "b"}\n')
    code, err = run_main(["train", "ntp", "--out", tmp_path / "o", "--data", data, "--steps", "1"], capsys, monkeypatch)
    assert_one_line_error(code, err, f"{data}:2: not UTF-8 text")


@pytest.mark.parametrize("args, message", [
    (["--out", "FILE"], "is a file, not a run directory"),
    (["--out", ""], "--out) is empty"),
    (["--out", "o", "--epochs", "inf"], "--epochs: expected a finite positive number, got inf"),
    (["--out", "o", "--lr", "inf"], "--lr: expected a finite positive number, got inf"),
    (["--out", "o", "--seed", str(2**64)], "--seed: a seed must be from 0 to 2**63 - 1"),
    (["--out", "o", "--n-heads", "1"], "objective 'mtp' needs n_heads >= 2"),
])
def test_bad_train_arguments(tmp_path, args, message, capsys, monkeypatch):
    (tmp_path / "FILE").write_text("mine")
    args = [str(tmp_path / a) if a in ("o", "FILE") else a for a in args]
    code, err = run_main(["train", "mtp", *args, "--steps" if "--epochs" not in args else "--no-progress",
                          *(["1"] if "--epochs" not in args else [])], capsys, monkeypatch)
    assert_one_line_error(code, err, message)
    assert (tmp_path / "FILE").read_text() == "mine" and not (tmp_path / "o").exists()


def test_eval_batch_sizes(medusa_dir, tmp_path, capsys, monkeypatch):
    """``mtpkern eval --batch``: the default 1,4,16, ``none`` to skip, and bad sizes as one line."""
    from mtpkern import cli

    seen = []
    monkeypatch.setattr(cli, "evaluate", lambda *a, **k: seen.append(k["batch_sizes"]))
    for extra, want in (([], (1, 4, 16)), (["--batch", "none"], ()), (["--batch", "8, 2,2"], (2, 8))):
        assert cli.main(["eval", str(medusa_dir), *extra]) == 0
        assert seen[-1] == want
    for bad in ("0,4", "two", ""):
        code, err = run_main(["eval", medusa_dir, "--batch", bad], capsys, monkeypatch)
        assert_one_line_error(code, err, "batch sizes")


def test_eval_json_pointing_at_a_directory_is_refused_before_evaluating(medusa_dir, tmp_path, capsys, monkeypatch):
    code, err = run_main(["eval", medusa_dir, "--json", tmp_path, "--device", "cpu", "--data", "synthetic"],
                         capsys, monkeypatch)
    assert_one_line_error(code, err, "is a directory: name the report file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_gives_the_same_message_everywhere(medusa_dir, tmp_path, capsys, monkeypatch):
    message = "device 'cuda' requested but CUDA is not available"
    for args in (["generate", medusa_dir, "--prompt", "hi", "--device", "cuda"],
                 ["train", "ntp", "--out", tmp_path / "o", "--device", "cuda"],
                 ["eval", medusa_dir, "--device", "cuda"],
                 ["bench", "--device", "cuda", "--quick"]):
        code, err = run_main(args, capsys, monkeypatch)
        assert_one_line_error(code, err, message)


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
    model = MedusaModel.from_base(base, n_heads=3)
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


@pytest.mark.parametrize("flags, options", [
    (["--strategy", "ntp", "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9"],
     dict(strategy="ntp", temperature=0.8, top_k=5, top_p=0.9)),
    (["--strategy", "medusa", "--tree", "2,1", "--acceptance", "typical", "--temperature", "0.7",
      "--typical-epsilon", "0.2", "--typical-alpha", "0.5", "--kernels", "eager"],
     dict(strategy="medusa", tree="2,1", acceptance="typical", temperature=0.7, typical_epsilon=0.2,
          typical_alpha=0.5, kernels="eager")),
    (["--strategy", "medusa", "--tree", "chain:2", "--acceptance", "rejection", "--temperature", "1.0",
      "--top-k", "8"], dict(strategy="medusa", tree="chain:2", acceptance="rejection", temperature=1.0, top_k=8)),
])
def test_generate_command_decodes_with_the_options_its_flags_name(medusa_dir, flags, options, capsys):
    """Every decoding flag of ``mtpkern generate`` is the DecodeOptions field of its name: the
    command prints what ``mtpkern.generate`` gives with those options and the same seed."""
    prompt = "Tom has 3 apples."
    code = main(["generate", str(medusa_dir), "--prompt", prompt, "--max-new-tokens", "8", "--device", "cpu",
                 "--seed", "3", *flags])
    out = capsys.readouterr()
    assert code == 0, out.err
    model = load_model(medusa_dir, device="cpu")
    tok = load_tokenizer(medusa_dir)
    ids = torch.tensor([tok(format_prompt(prompt))["input_ids"]])
    want = generate(model, ids, max_new_tokens=8, options=DecodeOptions(**options), eos_token_id=tok.eos_token_id,
                    generator=torch.Generator("cpu").manual_seed(3))
    assert out.out.strip() == tok.decode(want.tokens, skip_special_tokens=True).strip()
    assert f"[{options['strategy']}] {len(want.tokens)} tokens" in out.err


@pytest.mark.parametrize("flags, message", [
    (["--typical-alpha", "-1", "--acceptance", "typical", "--temperature", "0.7"], "typical_alpha must be a finite"),
    (["--top-k", "-2", "--strategy", "ntp", "--temperature", "0.5"], "top_k must be an int >= 0"),
    (["--top-k", "3"], "top_k / top_p apply to sampling"),
])
def test_generate_command_refuses_bad_decoding_options_in_one_line(medusa_dir, flags, message, capsys):
    code = main(["generate", str(medusa_dir), "--prompt", "hi", "--max-new-tokens", "4", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


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


@pytest.mark.slow
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
    assert all((out / run / ".mtpkern-demo").is_file() for run in ("ntp", "mtp", "medusa"))  # its own marks
    # MEDUSA's heads learn the NTP model's own answers (self-distillation), kept in MEDUSA's run folder
    answers = out / "medusa" / "ntp_answers.jsonl"
    assert len(answers.read_text().splitlines()) == 400  # the quick corpus: 400 prompts
    assert json.loads((out / "medusa" / "train_config.json").read_text())["data"] == str(answers)
    medusa = json.loads((out / "report.json").read_text())["models"][2]
    assert "self-distilled records: quality against the source's references" in medusa["validation"]["note"]
    again = run_cli("demo", "--quick", "--steps", "2", "--out", str(out), "--device", "cpu")
    assert again.returncode == 2 and "pass --overwrite" in again.stderr

    # `mtpkern eval` on the demo's runs, from the command line
    report = tmp_path / "eval" / "report.json"
    ev = run_cli("eval", str(out / "ntp"), str(out / "medusa" / "checkpoint"), "--json", str(report),
                 "--device", "cpu", "--max-samples", "2", "--max-new-tokens", "8", "--no-hf", "--batch", "2,1",
                 "--speed-samples", "1")
    assert ev.returncode == 0, ev.stderr[-3000:]
    data = json.loads(report.read_text())
    assert [m["model_type"] for m in data["models"]] == ["gpt2", "medusa"]
    assert data["models"][1]["speed"]["medusa"]["agrees_with_ntp"] == 1.0
    assert data["settings"]["batch_sizes"] == [1, 2] and set(data["models"][1]["batched"]["medusa"]) == {"1", "2"}
    # --speed-samples 1: one prompt timed one at a time, both scored from batched decoding
    assert data["settings"]["speed_samples"] == 1 and data["models"][1]["quality"]["n_samples"] == 2
    assert data["models"][1]["quality"]["decoded_with"]["agrees_with_batch_1"] == 1.0
    assert data["settings"]["prefix_cache"] is True and "prefix cache on:" in report.with_suffix(".md").read_text()
    # --no-prefix-cache: every prompt prefilled whole (two timed prompts: the second would share the template)
    off = tmp_path / "eval" / "off.json"
    ev = run_cli("eval", str(out / "ntp"), "--json", str(off), "--device", "cpu", "--max-samples", "2",
                 "--max-new-tokens", "8", "--no-hf", "--batch", "none", "--no-prefix-cache")
    assert ev.returncode == 0, ev.stderr[-3000:]
    data = json.loads(off.read_text())
    assert data["settings"]["prefix_cache"] is False and data["models"][0]["speed"]["ntp"]["reused_prompt_tokens"] == 0
    assert "prefix cache off" in off.with_suffix(".md").read_text()


@pytest.mark.slow
def test_bench_command_quick(tmp_path):
    path = tmp_path / "bench.json"
    code = main(["bench", "--device", "cpu", "--quick", "--prompts", "1", "--max-new-tokens", "6", "--json", str(path)])
    assert code == 0
    report = json.loads(path.read_text())
    assert report["device"]["type"] == "cpu"
    assert {"ntp/eager", "mtp/eager", "medusa/eager", "hf/dynamic"} <= set(report["cases"])
    assert report["cases"]["ntp/eager"]["tokens_per_second"] > 0
    assert set(report["batched"]) == {"mtp", "medusa"}  # the default --batch 1,4,16
    assert set(report["batched"]["medusa"]["medusa"]) == {"1", "4", "16"}
    none = tmp_path / "none.json"
    assert main(["bench", "--device", "cpu", "--quick", "--prompts", "1", "--max-new-tokens", "4", "--batch", "none",
                 "--json", str(none)]) == 0
    assert "batched" not in json.loads(none.read_text())


# ----------------------------------------------------------------------------- MEDUSA-2, projections, distill


@pytest.mark.parametrize("args, message", [
    (["train", "medusa2", "--out", "o", "--steps", "1"], "objective 'medusa2' needs a trained base model"),
    (["train", "mtp", "--out", "o", "--steps", "1", "--medusa-proj"], "objective 'mtp' has no MEDUSA heads"),
    (["train", "medusa", "--out", "o", "--base", "b", "--backbone-loss", "kl"], "is a MEDUSA-2 setting"),
    (["train", "medusa2", "--out", "o", "--base", "b", "--head-warmup", "-1"], "expected an integer >= 0"),
    (["distill", "d", "--data", "EMPTY", "--out", "x.jsonl"], "no prompts to answer"),
    (["distill", "d", "--data", "synthetic", "--out", "x.jsonl", "--temperature", "-1"], "expected a finite number >= 0"),
    (["distill", "d", "--data", "synthetic", "--out", "x.jsonl", "--batch", "0"], "expected a positive integer, got 0"),
])
def test_new_commands_give_one_line_errors_before_any_work(args, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "EMPTY").write_text("")
    (tmp_path / "EMPTY").rename(tmp_path / "EMPTY.jsonl")
    args = [str(tmp_path / a) if a in ("o", "d", "b", "x.jsonl") else str(tmp_path / "EMPTY.jsonl") if a == "EMPTY"
            else a for a in args]
    code, err = run_main(args, capsys, monkeypatch)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.jsonl").exists()


def test_medusa2_and_distill_commands_with_every_switch(tmp_path, capsys, monkeypatch):
    from mtpkern.hf_io import load_model
    from test_train import make_base

    base = make_base(tmp_path / "base")
    data = tmp_path / "d.jsonl"
    code, err = run_main(["distill", base, "--data", "synthetic", "--out", data, "--data-limit", "24",
                          "--max-new-tokens", "6", "--temperature", "0.7", "--top-p", "0.9", "--seed", "2",
                          "--dtype", "fp32", "--device", "cpu", "--no-progress", "--batch", "5"], capsys, monkeypatch)
    assert code == 0, err
    assert len(data.read_text().splitlines()) == 24
    one = tmp_path / "one.jsonl"  # --batch 1: the same records (the batch size changes nothing)
    code, err = run_main(["distill", base, "--data", "synthetic", "--out", one, "--data-limit", "24",
                          "--max-new-tokens", "6", "--temperature", "0.7", "--top-p", "0.9", "--seed", "2",
                          "--dtype", "fp32", "--device", "cpu", "--no-progress", "--batch", "1"], capsys, monkeypatch)
    assert code == 0 and one.read_text() == data.read_text(), err
    settings = json.loads((tmp_path / "d.jsonl.distill.json").read_text())
    assert (settings["temperature"], settings["top_p"], settings["seed"], settings["max_new_tokens"]) == (0.7, 0.9, 2, 6)
    out = tmp_path / "run"
    code, err = run_main(["train", "medusa2", "--out", out, "--base", base, "--data", data, "--steps", "2",
                          "--batch-size", "4", "--n-heads", "3", "--medusa-proj", "--heads-coefficient", "0.3",
                          "--backbone-lr-ratio", "0.5", "--head-warmup", "1", "--backbone-loss", "kl",
                          "--teacher", base, "--device", "cpu", "--precision", "fp32", "--loss", "plain",
                          "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    cfg = json.loads((out / "train_config.json").read_text())
    assert (cfg["objective"], cfg["medusa_proj"], cfg["heads_coefficient"], cfg["backbone_lr_ratio"],
            cfg["head_warmup"], cfg["backbone_loss"], cfg["teacher"]) == ("medusa2", True, 0.3, 0.5, 1, "kl", str(base))
    assert load_model(out).config.medusa_proj
    out = tmp_path / "mtp"
    code, err = run_main(["train", "mtp", "--out", out, "--base", base, "--data", data, "--steps", "1", "--batch-size",
                          "4", "--n-heads", "2", "--lr", "1e-3", "--trunk-lr-ratio", "0.05", "--device", "cpu",
                          "--precision", "fp32", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((out / "train_config.json").read_text())["trunk_lr_ratio"] == 0.05


def test_bench_decode_on_a_checkpoint_takes_prompts_from_data(medusa_dir, tmp_path, monkeypatch):
    """benchmarks/bench_decode.py --model DIR --data SRC: real prompts through the checkpoint's
    tokenizer (not random ids), every case and the step-cost curve in the JSON."""
    import json
    import runpy
    import sys

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"query": f"{i} + 2?", "response": f"The answer is: {i + 2}"})
                              for i in range(4)) + "\n")
    out = tmp_path / "bd.json"
    # a calibrated copy, so that auto plans a tree and the dynamic case at auto's budget runs
    from mtpkern.calibrate import calibrate_checkpoint

    ckpt = tmp_path / "run" / "checkpoint"
    shutil.copytree(medusa_dir, ckpt)
    monkeypatch.setenv("MTPKERN_CACHE", str(tmp_path / "cache"))
    calibrate_checkpoint(ckpt, data=str(data), max_samples=2, max_new_tokens=4, measure=False)
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--device", "cpu", "--threads", "1", "--model", str(ckpt),
                                      "--data", str(data), "--prompts", "2", "--max-new-tokens", "4",
                                      "--step-cost", "1,2", "--json", str(out), "--no-prefix-cache"])
    runpy.run_path(str(root / "benchmarks" / "bench_decode.py"), run_name="__main__")
    report = json.loads(out.read_text())
    assert report["weights"].endswith(f"prompts from {data}, stopping at EOS") and report["prompts"] == 2
    cases = report["cases"]
    assert cases["medusa: medusa tree=auto"]["tokens_per_second"] > 0
    assert any(name.startswith("medusa: medusa tree=dynamic:") for name in cases), list(cases)
    assert all("error" not in c for c in cases.values()), cases
    assert [p["T"] for p in report["step_cost"]["medusa"]] == [1, 2]
    assert report["prefix_cache"] is False


# ----------------------------------------------------------------------------- issue 22: never lose the user's files


def _files(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_eval_keeps_a_readme_beside_its_json(medusa_dir, tmp_path, capsys, monkeypatch):
    """`mtpkern eval RUN --json README.json` beside the user's README.md: refused in one line,
    before any work; the README stays."""
    import mtpkern.eval as ev

    monkeypatch.setattr(ev, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    (tmp_path / "README.md").write_text("# my project\n")
    for json_name, needle in (("README.json", "README.md exists and was not written by mtpkern eval"),
                              ("notes.md", "would hold both the JSON report and the table")):
        code, err = run_main(["eval", medusa_dir, "--max-samples", "2", "--batch", "none", "--no-hf",
                              "--max-new-tokens", "8", "--json", tmp_path / json_name, "--device", "cpu"],
                             capsys, monkeypatch)
        assert_one_line_error(code, err, needle)
    assert _files(tmp_path) == {"README.md": b"# my project\n"}
    assert "neither replaces a file" in build_parser_help("eval")


def build_parser_help(command: str) -> str:
    from mtpkern.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return " ".join(sub.choices[command].format_help().split())


def test_train_keeps_a_folder_that_is_not_a_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "u"
    out.mkdir()
    (out / "log.jsonl").write_text('{"my":"data"}\n')
    (out / "summary.json").write_text('{"mine":1}\n')
    code, err = run_main(["train", "ntp", "--out", out, "--steps", "5"], capsys, monkeypatch)
    assert_one_line_error(code, err, "is not empty and is not an mtpkern run")
    assert _files(out) == {"log.jsonl": b'{"my":"data"}\n', "summary.json": b'{"mine":1}\n'}  # no .lock either


TINY = ["--data-limit", "40", "--batch-size", "4", "--max-len", "128", "--device", "cpu", "--no-progress"]


def test_train_refusals_in_one_line_that_keep_the_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    code, err = run_main(["train", "ntp", "--out", out, "--steps", "3", *TINY], capsys, monkeypatch)
    assert code == 0, err
    before = _files(out)
    for args, needle in [
        (["--resume", "--steps", "2"], "is already at step 3: steps=2 (--steps 2) ends there"),
        (["--resume"], "is already at step 3: its saved length of 3 steps ends there"),
        (["--steps", "9"], "already exists: pass resume=True (--resume) to continue it"),
    ]:
        code, err = run_main(["train", "ntp", "--out", out, *args], capsys, monkeypatch)
        assert_one_line_error(code, err, needle)
        assert _files(out) == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 3 and summary["val_loss"] is not None


@pytest.mark.parametrize("extra, needle", [
    (["--n-heads", "200", "--max-len", "128"], "n_heads (--n-heads) 200 must be below the sequence length, "
                                                "max_len (--max-len) 128"),
    (["--n-heads", "100"], "longest training sequence has"),
    (["--data", "ONE"], "holds 1 record: training needs at least 2"),
])
def test_train_configuration_refusals_in_one_line(tmp_path, extra, needle, capsys, monkeypatch):
    (tmp_path / "one.jsonl").write_text(json.dumps({"query": "2 + 2?", "response": "The answer is: 4"}) + "\n")
    extra = [str(tmp_path / "one.jsonl") if a == "ONE" else a for a in extra]
    objective = "mtp" if "--n-heads" in extra else "ntp"
    code, err = run_main(["train", objective, "--out", tmp_path / "r", "--steps", "2", *TINY, *extra],
                         capsys, monkeypatch)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "r").exists()


def test_head_warmup_longer_than_the_run_is_refused(tmp_path, capsys, monkeypatch):
    code, err = run_main(["train", "medusa2", "--out", tmp_path / "r", "--base", tmp_path / "b", "--steps", "5",
                          "--head-warmup", "6"], capsys, monkeypatch)
    assert_one_line_error(code, err, "head_warmup (--head-warmup) 6 is longer than the run's 5 steps")


def test_a_full_disk_during_a_save_is_one_line(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full)
    code, err = run_main(["train", "ntp", "--out", tmp_path / "r", "--steps", "2", *TINY], capsys, monkeypatch)
    assert_one_line_error(code, err, "the disk is full", str(tmp_path / "r" / "checkpoint"), "nothing was written")


def test_a_long_record_s_tokenizer_limit_is_one_warning_line(tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.jsonl"
    records = [{"query": f"what is {i} + 1?", "response": f"The answer is: {i + 1}"} for i in range(30)]
    records.append({"query": "word " * 20_000, "response": "ok"})
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, err = run_main(["train", "ntp", "--out", tmp_path / "r", "--data", data, "--steps", "1", "--batch-size", "4",
                          "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "65536 characters" in ln]
    assert lines and lines[0].startswith("mtpkern train: warning: 1 of ") and "Warning" not in err, err


def test_calibrate_json_pointing_at_a_directory_is_refused_before_calibrating(medusa_dir, tmp_path, capsys,
                                                                              monkeypatch):
    from mtpkern import cli

    monkeypatch.setattr(cli, "calibrate_checkpoint", lambda *a, **k: pytest.fail("calibrated before checking --json"))
    code, err = run_main(["calibrate", medusa_dir, "--json", tmp_path, "--device", "cpu"], capsys, monkeypatch)
    assert_one_line_error(code, err, "is a directory: name the report file")


@pytest.mark.parametrize("where", ["folder", "under a file"])
def test_bench_json_that_cannot_be_written_is_refused_before_benchmarking(tmp_path, capsys, monkeypatch, where):
    from mtpkern import cli

    monkeypatch.setattr(cli, "run_bench", lambda *a, **k: pytest.fail("benchmarked before checking --json"))
    (tmp_path / "file").write_text("mine")
    path = str(tmp_path) if where == "folder" else str(tmp_path / "file" / "bench.json")
    code, err = run_main(["bench", "--quick", "--device", "cpu", "--json", path], capsys, monkeypatch)
    assert_one_line_error(code, err, "is a directory" if where == "folder" else "which is a file, not a directory")
    assert (tmp_path / "file").read_text() == "mine"


def test_train_s_stdout_is_the_checkpoint_line_alone(tmp_path, capfd, monkeypatch):
    """Progress goes to stderr: the tokenizer trainer's own bars (which write to stdout) are off
    where stdout is not a terminal, and its start and end are said on stderr."""
    monkeypatch.delenv("MTPKERN_DEBUG", raising=False)
    out = tmp_path / "r"
    assert main(["train", "ntp", "--out", str(out), "--steps", "1", "--data-limit", "40", "--batch-size", "4",
                 "--device", "cpu"]) == 0
    captured = capfd.readouterr()
    assert captured.out.splitlines() == [f"checkpoint: {out / 'checkpoint'}"]
    assert "training a 2048-token tokenizer on 38 records" in captured.err and "tokenizer trained in" in captured.err


# ----------------------------------------------------------------------------- issue 23: options defined once


def _subparsers() -> dict:
    from mtpkern.cli import build_parser

    return next(a for a in build_parser()._actions if a.dest == "command").choices


def _action(parser, flag: str):
    return next((a for a in parser._actions if flag in a.option_strings), None)


SHARED = {  # the commands that take each shared option
    "--device": {"train", "distill", "demo", "generate", "eval", "bench", "calibrate"},
    "--dtype": {"distill", "generate", "eval", "bench", "calibrate"},
    "--kernels": {"generate", "eval", "calibrate"},
    "--cuda-graph": {"generate", "eval", "calibrate"},
    "--seed": {"train", "distill", "generate", "calibrate"},  # calibrate: its sampling tables (--temperature)
    "--no-progress": {"train", "distill", "eval", "bench"},
}


@pytest.mark.parametrize("flag", list(SHARED))
def test_shared_options_are_one_definition_in_every_command(flag):
    """A shared option is the same argparse action (a parent parser's) in every command that
    takes it: one type, default and help; the other commands do not take it."""
    commands = _subparsers()
    actions = {name: _action(parser, flag) for name, parser in commands.items()}
    takers = {name for name, a in actions.items() if a is not None}
    assert takers == SHARED[flag]
    assert len({id(actions[name]) for name in takers}) == 1, flag


def test_dtype_default_is_one_rule_for_every_command(tmp_path, capsys, monkeypatch):
    """No command fixes --dtype: each resolves "fp16 on CUDA, fp32 on the CPU", and says so.
    ``mtpkern generate`` loaded fp32 on CUDA before; it now follows the rule as well."""
    from mtpkern import cli

    for name in SHARED["--dtype"]:
        action = _action(_subparsers()[name], "--dtype")
        assert action.default is None and "fp16 on CUDA, fp32 on the CPU" in action.help
        assert list(action.choices) == ["fp32", "fp16", "bf16"]
    loaded = []

    def load(path, *, device, dtype, base=None):
        loaded.append((device.type, dtype))
        raise RuntimeError("stop here")

    monkeypatch.setattr(cli, "load_model", load)
    for device in ("cpu", "cuda"):
        monkeypatch.setattr(cli, "resolve_device", lambda text, device=device: torch.device(device))
        code, err = run_main(["generate", tmp_path, "--prompt", "hi", "--device", device], capsys, monkeypatch)
        assert code == 2 and "stop here" in err
    assert loaded == [("cpu", torch.float32), ("cuda", torch.float16)]
    seen = {}

    class Called(Exception):
        pass

    def called(name):
        def record(*args, **kwargs):
            seen[name] = kwargs["dtype"]
            raise Called
        return record

    for name, target in (("eval", "evaluate"), ("calibrate", "calibrate_checkpoint"), ("bench", "run_bench"),
                         ("distill", "distill")):
        monkeypatch.setattr(cli, target, called(name))
    for args in (["eval", tmp_path], ["calibrate", tmp_path], ["bench"],
                 ["distill", tmp_path, "--data", "synthetic", "--out", tmp_path / "d.jsonl"]):
        with pytest.raises(Called):
            cli.main([str(a) for a in args])
    assert seen == {"eval": None, "calibrate": None, "bench": None, "distill": None}  # each resolves it by the rule
    assert resolve_dtype(None, torch.device("cuda")) is torch.float16
    assert resolve_dtype(None, torch.device("cpu")) is torch.float32


def test_batch_means_batch_sizes_in_every_command(tmp_path, capsys, monkeypatch):
    """``--batch`` is one option type everywhere: the batch size(s) of batched decoding, ``B`` or
    ``B,B,...`` or ``none``. eval and bench time each size; distill decodes at one (``--batch 5``
    as before; several, or none, is a one-line error)."""
    from types import SimpleNamespace

    from mtpkern import cli

    actions = {name: _action(_subparsers()[name], "--batch") for name in ("distill", "eval", "bench")}
    assert len({a.type for a in actions.values()}) == 1 and all(a.metavar == "B[,B...]" for a in actions.values())
    assert actions["distill"].default == (16,) and actions["eval"].default == actions["bench"].default == (1, 4, 16)
    batches = []
    done = SimpleNamespace(out="d.jsonl", kept=0, written=0, skipped=0, total=0)
    monkeypatch.setattr(cli, "distill", lambda *a, **k: batches.append(k["batch"]) or done)
    distill = ["distill", tmp_path, "--data", "synthetic", "--out", tmp_path / "d.jsonl"]
    for extra, want in ((["--batch", "5"], 5), ([], 16), (["--batch", "7,7"], 7)):
        code, err = run_main([*distill, *extra], capsys, monkeypatch)
        assert code == 0 and batches[-1] == want, err
    for bad in ("4,8", "none"):
        code, err = run_main([*distill, "--batch", bad], capsys, monkeypatch)
        assert_one_line_error(code, err, "--batch: distill decodes at one batch size")
    sizes = []
    monkeypatch.setattr(cli, "run_bench", lambda **k: sizes.append(k["batch_sizes"]))
    for extra, want in ((["--batch", "16"], (16,)), (["--batch", "none"], ()), ([], (1, 4, 16)),
                        (["--batch", "4,1,4"], (1, 4))):
        assert cli.main(["bench", *extra]) == 0 and sizes[-1] == want
