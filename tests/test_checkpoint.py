"""Run and checkpoint directories: one resolver, recovery from an interrupted save, the run lock."""

import errno
import os
import stat

import pytest
import torch

from mtpkern.checkpoint import (
    CheckpointError,
    atomic_directory,
    interrupted_save,
    model_source,
    recover_interrupted_save,
    resolve_checkpoint,
    run_lock,
)
from mtpkern.config import GPT2Config
from mtpkern.models import GPT2


def _save_tiny(directory):
    GPT2(GPT2Config.tiny(vocab_size=64, n_layer=1, n_embd=16, n_head=2)).save_pretrained(directory)


def test_resolve_checkpoint_run_and_bare(tmp_path):
    run = tmp_path / "run"
    _save_tiny(run / "checkpoint")
    (run / "train_config.json").write_text("{}")
    assert resolve_checkpoint(run) == (run / "checkpoint", run)
    assert resolve_checkpoint(run / "checkpoint") == (run / "checkpoint", run)
    assert resolve_checkpoint(str(run)) == (run / "checkpoint", run)
    bare = tmp_path / "bare"
    _save_tiny(bare)
    assert resolve_checkpoint(bare) == (bare, None)  # tmp_path holds no run files
    assert model_source(run) == run / "checkpoint" and model_source("gpt2") == "gpt2"  # a hub name stays
    with pytest.raises(CheckpointError, match="neither a run directory"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint or run directory"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(tmp_path / "file")
    (tmp_path / "half" / "checkpoint").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="has no config.json"):
        resolve_checkpoint(tmp_path / "half")


def _crash_between_the_renames(path, monkeypatch):
    """Save over ``path`` and die after the old checkpoint was moved aside, before the new one
    was moved in: what a kill -9 at that instant leaves."""
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(path) as tmp:
            (tmp / "config.json").write_text("{\"new\": 1}")
    monkeypatch.setattr(os, "replace", real_replace)


def test_recover_an_interrupted_save_and_clean_only_our_leftovers(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoint"
    _save_tiny(ckpt)
    before = (ckpt / "config.json").read_text()
    _crash_between_the_renames(ckpt, monkeypatch)
    assert not ckpt.exists()
    aside = interrupted_save(ckpt)
    assert aside is not None and aside.name == f".checkpoint.old-{os.getpid()}"
    with pytest.raises(CheckpointError, match="a save was interrupted .* --resume"):
        resolve_checkpoint(tmp_path)
    # leftovers of earlier kills, and things that are not ours
    (tmp_path / ".checkpoint.tmp-abc123").mkdir()
    (tmp_path / ".checkpoint.old-999999").mkdir()  # incomplete (no config.json): never restored
    (tmp_path / ".checkpoint.old-notapid").mkdir()
    (tmp_path / "my_notes").mkdir()
    assert recover_interrupted_save(ckpt) == aside
    assert (ckpt / "config.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.old-notapid", "checkpoint", "my_notes"]
    assert recover_interrupted_save(ckpt) is None  # nothing left to do


def test_run_lock_is_exclusive_and_a_stale_lock_does_not_block(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        assert (run / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(CheckpointError, match=f"in use by another training \\(pid {os.getpid()}\\)"):
            with run_lock(run):
                pass
    with run_lock(run):  # released on exit
        pass
    (run / ".lock").write_text("12345\n")  # a lock file left by a dead process holds no lock
    with run_lock(run):
        pass


# ----------------------------------------------------------------------------- full disk, modes, the lock


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save's
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_full_disk_mid_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, error):
    ckpt = tmp_path / "checkpoint"
    _save_tiny(ckpt)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    with pytest.raises(CheckpointError) as e:
        with atomic_directory(ckpt) as tmp:
            (tmp / "config.json").write_text("{}")
            raise error
    message = str(e.value)
    assert "disk is full" in message and str(ckpt) in message and "keeps the previous" in message
    assert "\n" not in message and "inline_container" not in message
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temporary folder left


def test_a_full_disk_in_a_first_save_says_nothing_was_written(tmp_path):
    with pytest.raises(CheckpointError, match="disk is full .* nothing was written"):
        with atomic_directory(tmp_path / "checkpoint"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_mid_save_pass_through(tmp_path):
    with pytest.raises(ValueError, match="not a disk error"):
        with atomic_directory(tmp_path / "checkpoint"):
            raise ValueError("not a disk error")


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_a_checkpoint_takes_the_umask_s_modes(tmp_path, umask, dir_mode, file_mode):
    """mkdtemp makes 0700 folders and some writers 0600 files; a published checkpoint has the
    modes any other file the user writes would have."""
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "checkpoint") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            fd = os.open(tmp / "private.bin", os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    ckpt = tmp_path / "checkpoint"
    assert stat.S_IMODE(ckpt.stat().st_mode) == dir_mode
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in ckpt.iterdir()} == {
        "model.safetensors": file_mode, "private.bin": file_mode, "config.json": file_mode}


def test_run_lock_leaves_nothing_behind_when_the_run_is_refused(tmp_path):
    """A refused run (an exception inside the lock) removes the lock file and the folder it
    created; a folder that existed keeps everything but the lock file we added."""
    with pytest.raises(ValueError):
        with run_lock(tmp_path / "new"):
            raise ValueError("refused")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError):
        with run_lock(tmp_path / "mine"):
            raise ValueError("refused")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    with run_lock(tmp_path / "run"):  # a run that went through keeps its lock file, as before
        pass
    with pytest.raises(ValueError):
        with run_lock(tmp_path / "run"):
            raise ValueError("refused")
    assert (tmp_path / "run" / ".lock").is_file()  # it was there before: not ours to remove
