"""``mtpkern demo --overwrite`` removes only the runs the demo wrote (the full demo runs in test_cli)."""

import pytest

from mtpkern.demo import MARKER, RUNS, _clear_previous_runs, run_demo


def _user_run(path):
    (path / "checkpoint").mkdir(parents=True)
    (path / "checkpoint" / "model.safetensors").write_bytes(b"the user's weeks of training")


def test_overwrite_never_deletes_runs_the_demo_did_not_write(tmp_path):
    for run in RUNS:  # the README's layout: runs/ntp, runs/mtp, runs/medusa
        _user_run(tmp_path / "runs" / run)
    with pytest.raises(ValueError, match="was not written by the demo"):
        run_demo(out=tmp_path / "runs", device="cpu", quick=True, overwrite=True)
    for run in RUNS:
        assert (tmp_path / "runs" / run / "checkpoint" / "model.safetensors").read_bytes() == b"the user's weeks of training"


def test_overwrite_removes_the_demos_own_runs_only(tmp_path):
    out = tmp_path / "demo_out"
    for run in RUNS:
        (out / run / "checkpoint").mkdir(parents=True)
        (out / run / MARKER).write_text("demo")
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="pass --overwrite"):
        _clear_previous_runs(out, overwrite=False)
    assert all((out / run).exists() for run in RUNS)
    _clear_previous_runs(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_one_foreign_run_among_the_demos_stops_everything(tmp_path):
    out = tmp_path / "demo_out"
    for run in RUNS[:2]:
        (out / run).mkdir(parents=True)
        (out / run / MARKER).write_text("demo")
    _user_run(out / RUNS[2])
    with pytest.raises(ValueError, match=f"{RUNS[2]} exists and was not written by the demo"):
        _clear_previous_runs(out, overwrite=True)
    assert all((out / run).exists() for run in RUNS)  # nothing removed, not even the demo's own


def test_out_pointing_at_a_file_is_an_error(tmp_path):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(ValueError, match="is a file"):
        run_demo(out=tmp_path / "f", device="cpu", quick=True)
    assert (tmp_path / "f").read_text() == "mine"
