"""benchmarks/bench_cpu_matmul.py: every MTPKERN_CPU_MATMUL value timed in its own process on a
saved checkpoint, the table and the JSON; bad flags are one-line errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cpu_matmul.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cpu_matmul", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_layout_is_timed_in_its_own_process(tmp_path, medusa_model):
    ckpt, report_path = tmp_path / "medusa", tmp_path / "layouts.json"
    medusa_model.save_pretrained(ckpt)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(ckpt), "--tokens", "1,4", "--rounds", "2",
                           "--threads", "1", "--min-time", "0.01", "--json", str(report_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["rounds"] == 2 and report["threads"] == 1
    assert sorted(report["seconds"]) == ["auto", "copy", "flip"]
    for per_size in report["seconds"].values():
        assert sorted(per_size) == ["1", "4"]
        assert all(len(runs) == 2 and all(0 < s < 5 for s in runs) for runs in per_size.values())
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 4 |")]
    assert len(rows) == 2 and all(len(r.split("|")) == 8 for r in rows)
    assert "round 2/2" in proc.stderr


@pytest.mark.parametrize("acceptance", ["rejection", "typical"])
def test_sampling_steps_are_timed_with_acceptance(tmp_path, medusa_model, acceptance):
    ckpt, report_path = tmp_path / "medusa", tmp_path / "layouts.json"
    medusa_model.save_pretrained(ckpt)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(ckpt), "--tokens", "1,4", "--rounds", "1",
                           "--threads", "1", "--min-time", "0.01", "--acceptance", acceptance,
                           "--json", str(report_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["acceptance"] == acceptance
    assert all(0 < s < 5 for per_size in report["seconds"].values() for runs in per_size.values() for s in runs)


def test_a_failing_child_names_its_layout(tmp_path, gpt2_model):
    ckpt = tmp_path / "base"
    gpt2_model.save_pretrained(ckpt)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(ckpt), "--tokens", "1,4", "--rounds", "1",
                           "--min-time", "0.01"], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "MTPKERN_CPU_MATMUL=" in last and "has no draft heads" in last and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, message", [(["--tokens", "0,4"], "--tokens takes tree sizes"),
                                            (["--tokens", "four"], "--tokens takes tree sizes"),
                                            (["--rounds", "0"], "take numbers >= 1")])
def test_bad_flags_are_one_line_errors(flags, message):
    with pytest.raises(SystemExit, match=message):
        _bench().parse_args(["ckpt", *flags])


def test_an_unknown_acceptance_is_refused(capsys):
    with pytest.raises(SystemExit):
        _bench().parse_args(["ckpt", "--acceptance", "exact"])
    assert "argument --acceptance: invalid choice: 'exact'" in capsys.readouterr().err
