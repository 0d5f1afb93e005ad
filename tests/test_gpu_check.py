"""benchmarks/gpu_check.sh, dry-run on this machine, so that the script's own bugs show here and
not in the GPU machine's one short run."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
GPU_STAGES = ("import_ext", "graphs", "cxx_errors", "kernel_tests", "bench_kernels", "bench_rejection", "agreement", "bench_decode", "bench_batch",
              "bench_fused_step",
              "bench_e2e", "bench_memory", "memcheck", "tests")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="gpu_check.sh needs bash and coreutils' timeout")


def run(script: Path, **env):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "PACK": "0", **env}
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=script.parent)


def stages(out: Path) -> dict:
    rows = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()]
    return {name: (status, note) for name, status, _, note in rows}


def test_dry_run_skips_gpu_stages_and_collects_every_benchmark(tmp_path):
    r = run(SCRIPT, OUT=str(tmp_path), DRY_RUN="1", TOTAL_S="300")
    assert r.returncode == 0, r.stdout + r.stderr
    got = stages(tmp_path)
    assert got["env"][0] == "passed" and got["collect"][0] == "passed", got
    for name in (*GPU_STAGES, "install"):
        assert got[name] == ("skipped", "DRY_RUN=1"), (name, got[name])
    collected = (tmp_path / "collect.log").read_text()
    with_tests = [p for p in sorted((ROOT / "benchmarks").glob("bench_*.py")) if "\ndef test_" in p.read_text()]
    assert len(with_tests) >= 5
    for path in with_tests:
        assert re.search(rf"^benchmarks/{path.name}::test_", collected, re.M), f"{path.name} not collected"
    assert "error" not in collected.lower(), collected
    summary = (tmp_path / "summary.txt").read_text()
    assert "2 passed, 0 failed, 15 skipped" in summary and summary in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason a CPU machine gives")
def test_stage_filter_and_the_no_gpu_reason(tmp_path):
    r = run(SCRIPT, OUT=str(tmp_path), STAGES="kernel_tests")
    assert r.returncode == 0, r.stdout + r.stderr
    got = stages(tmp_path)
    assert got["kernel_tests"] == ("skipped", "no CUDA GPU visible to torch")
    assert got["install"] == ("skipped", "not in STAGES") and got["collect"] == ("skipped", "not in STAGES")
    assert "kernel_tests: skipped" in r.stdout


def test_total_budget_and_the_static_baseline_switch(tmp_path):
    r = run(SCRIPT, OUT=str(tmp_path), DRY_RUN="1", TOTAL_S="10", HF_STATIC="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert stages(tmp_path)["collect"] == ("skipped", "no time left in TOTAL_S=10")
    assert re.search(r"HF_STATIC=1: (bench_decode also times .*--hf-static|.*has no --hf-static flag)", r.stdout)


def test_out_defaults_to_gpu_results_at_the_repository_root(tmp_path):
    """Run from a copy (the real gpu_results/ may hold a user's figures): OUT is found from the
    script's place, not the caller's working directory."""
    bench = tmp_path / "repo" / "benchmarks"
    bench.mkdir(parents=True)
    for name in ("gpu_check.sh", "gpu_summary.py"):
        shutil.copy(ROOT / "benchmarks" / name, bench / name)
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    r = subprocess.run(["bash", str(bench / "gpu_check.sh")], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env={**env, "PYTHON": sys.executable, "STAGES": "none"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "repo" / "gpu_results" / "summary.txt").is_file()
    assert not (tmp_path / "gpu_results").exists()


def test_summary_reads_every_benchmarks_json(tmp_path):
    (tmp_path / "stages.tsv").write_text("bench_kernels\tpassed\t40\t8 passed\ntests\tFAILED\t240\ttimed out\n")
    case = dict(kernel_device_us=12.5, eager_device_us=70.0, speedup_vs_eager=5.6, gbps=900.0, kernel_host_us=30.0,
                eager_host_us=90.0)
    (tmp_path / "bench_kernels.json").write_text(json.dumps({"device": "X", "cases": [
        {"name": "test_tree_attention[512]", "file": "bench_tree_attention.py", **case},
        {"name": "test_verify_greedy", "file": "bench_verify.py", **case}]}))
    tie = {"prompt": 2, "position": 25, "fp32_gap": -6e-4, "tie": True}
    (tmp_path / "agreement.json").write_text(json.dumps({"cases": {
        "float32 medusa eager": {"identical": 0.75, "agreement": 0.9},
        "float16 medusa fused": {"identical": 0.75, "agreement": 0.85, "divergences": [tie], "explained": True},
        "float16 mtp fused": {"identical": 0.5, "agreement": 0.5, "explained": False,
                              "divergences": [tie, {**tie, "fp32_gap": 1.5, "tie": False}]}}}))
    (tmp_path / "bench_decode.json").write_text(json.dumps({"cases": {
        "ntp: ntp": {"tokens_per_second": 1500.0}, "ntp: transformers static": {"error": "boom", "family": "ntp"}}}))
    (tmp_path / "bench_e2e.json").write_text("{not json")
    (tmp_path / "bench_batch.json").write_text(json.dumps({"batch": {"medusa": {
        "ntp": {"1": {"tokens_per_second": 100.0}, "4": {"tokens_per_second": 300.0}},
        "medusa": {"1": {"tokens_per_second": 150.0}, "4": {"tokens_per_second": 330.0}}}}}))
    (tmp_path / "bench_mtp_memory.json").write_text(json.dumps({"results": [
        {"variant": "ntp-fused", "peak_bytes": 800 * 2**20, "vs_ntp_fused": 1.0, "step_s": 0.25}]}))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_summary.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "1 passed, 1 failed (tests), 0 skipped" in out
    assert "tree_attention tree_attention[512]: 12.5 vs 70.0 us, 5.6x" in out and "target <= 15 us: met" in out
    assert "target <= 10 us: MISSED" in out
    assert "float32 medusa eager: 0.75, 0.900" in out
    assert "float16 medusa fused: 0.75, 0.850; 1 at near-ties (largest fp32 gap 0.0006)" in out
    assert "float16 mtp fused: 0.50, 0.500; 2, NOT ALL NEAR-TIES: A BUG (largest fp32 gap 1.5)" in out
    assert "ntp: ntp: 1500.0" in out and "transformers static: failed: boom" in out
    assert "bench_e2e.json: unreadable" in out
    assert "medusa: medusa: B=1 150 (1.50x), B=4 330 (1.10x)" in out
    assert "ntp-fused: 800 MiB, 1.00x, 0.250 s" in out


def test_ci_runs_the_readmes_test_command_and_the_gpu_machines_triton():
    readme = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("pip install torch")]
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(readme) >= 2 and readme[1] in ci.splitlines(), "README's second set-up command must be in .ci/run"
    assert "--target \"$TRITON_SIDE\" triton==3.6.0" in ci
    assert 'PYTHONPATH="$TRITON_SIDE" python -m pytest -q tests/test_triton_compile.py' in ci
    assert "set -euo pipefail" in ci  # any failing step, pytest's exit code 5 (nothing collected) included, fails CI


def test_pack_leaves_a_tarball_beside_the_summary(tmp_path):
    """PACK=1 (the default): a remote machine returns two files, not one per stage."""
    (tmp_path / "notes.md").write_text("a user's file")  # not written by the run: left alone
    r = run(SCRIPT, OUT=str(tmp_path), DRY_RUN="1", TOTAL_S="300", STAGES="collect", PACK="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_results.tgz", "notes.md", "summary.txt"]
    with tarfile.open(tmp_path / "gpu_results.tgz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"env.txt", "stages.tsv", "collect.log"} <= names, names


def test_test_files_run_one_process_each_and_a_crash_loses_one_file(tmp_path):
    """The kernel_tests / tests stages' runner: every file reports, a segfault included, and one
    total line sums pytest's counts."""
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_ok.py").write_text("def test_a():\n    assert 1\n\ndef test_b():\n    assert 2\n")
    (tests / "test_crash.py").write_text("import ctypes\n\ndef test_boom():\n    ctypes.string_at(0)\n")
    (tests / "test_fail.py").write_text("def test_no():\n    assert 0\n")
    files = [str(tests / f"test_{n}.py") for n in ("ok", "crash", "fail")]
    cmd = f"source <(sed -n '/^pytest_files()/,/^}}/p' {SCRIPT}); pytest_files demo 60 " + " ".join(files)
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "JOBS": "2"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"test_ok.py: rc=0 .*2 passed", r.stdout), r.stdout
    assert re.search(r"test_crash.py: rc=139", r.stdout) and "Fatal Python error" in r.stdout, r.stdout
    assert "FAILED " in r.stdout and "test_no" in r.stdout, r.stdout
    assert r.stdout.strip().splitlines()[-1] == "2 passed, 1 failed, 0 skipped, 0 errors", r.stdout
    assert sorted(p.name for p in (tmp_path / "demo.files").iterdir()) == ["test_crash.log", "test_fail.log", "test_ok.log"]
