"""Checkpoint files: finding them, clear errors for bad ones, and atomic directory writes.

A run directory (``OUT`` of ``mtpkern train``) holds ``checkpoint/`` beside its logs; every
command and function that takes a model accepts the run directory or the checkpoint folder
itself, through :func:`resolve_checkpoint`.

A checkpoint is a directory. It is written into a temporary sibling first and moved into
place with renames, so at every moment either the old or the new complete checkpoint
exists: a crash or a Ctrl-C mid-write never loses the user's last good checkpoint. A crash
between the two renames leaves the old checkpoint under ``.NAME.old-PID``;
:func:`recover_interrupted_save` puts it back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

CHECKPOINT_DIR = "checkpoint"  # a run directory's checkpoint folder
CONFIG_NAME = "config.json"
RUN_FILES = ("train_config.json", "log.jsonl", "summary.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not match the model."""


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary directory; on success it replaces ``path`` atomically.

    The old directory, if any, is renamed aside before the new one is renamed into place
    and deleted only afterwards. On an exception the temporary directory is removed and
    ``path`` is left untouched; a full disk is a :class:`CheckpointError` that says so. The
    published folder and its files get the modes the umask gives new ones (``mkdtemp`` makes
    0700 folders and some writers 0600 files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _apply_umask(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            kept = f"{path} keeps the previous checkpoint" if path.exists() else "nothing was written"
            raise disk_full_error(path, kept) from e
        raise


# errors of a write that ran out of space: OSError's errno, else the text other writers give
# (torch.save: "unexpected pos N vs M" after a short write; safetensors: "os error 28")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("unexpected pos", "No space left on device", "os error 28", "Disk quota exceeded",
                    "os error 122")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a write that ran out of disk space (or quota)."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    return isinstance(error, Exception) and any(t in str(error) for t in _DISK_FULL_TEXTS)


def disk_full_error(path: str | os.PathLike, outcome: str) -> CheckpointError:
    """The one-line error of a write to ``path`` that found the disk full; ``outcome`` says
    what was kept."""
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    return CheckpointError(f"the disk is full (or over quota) while writing {path} ({free}): {outcome}; "
                           "free some space and try again")


def check_report_path(path: str, flag: str = "--json") -> None:
    """Refuse, before any work, a report path that cannot be written: a folder, or a path
    under a file. (A report is written at the end of the work it reports.)"""
    if Path(path).is_dir() or str(path).endswith("/"):
        raise ValueError(f"{flag} {path!r} is a directory: name the report file, e.g. {Path(path) / 'report.json'}")
    above = Path(path).absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise ValueError(f"{flag} {path!r} lies under {above}, which is a file, not a directory")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``path`` through a temporary sibling and one rename: a crash or a full disk leaves
    the previous file whole (a full disk is a :class:`CheckpointError` naming the file)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(path, f"{path} keeps its previous contents" if path.exists()
                                  else "nothing was written") from e
        raise


def _umask() -> int:
    """The process's umask, read where Linux shows it (``os.umask`` can only read it by setting it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(directory: Path) -> None:
    """Give ``directory``, its folders and files the modes the umask gives new ones."""
    mask = _umask()
    for root, _, files in os.walk(directory):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def require_file(directory: str | os.PathLike, name: str) -> Path:
    """Return ``directory/name`` or raise CheckpointError naming what is missing."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {str(directory)!r} is not a directory")
    f = directory / name
    if not f.is_file():
        raise CheckpointError(f"checkpoint {str(directory)!r} has no {name}")
    return f


def _leftovers(path: Path, kind: str) -> list[Path]:
    """``atomic_directory``'s own leftovers of ``path``: ``.NAME.old-PID`` or ``.NAME.tmp-XXXX``."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{kind}-" + (r"\d+$" if kind == "old" else r"[\w]+$"))
    if not path.parent.is_dir():
        return []
    return sorted((p for p in path.parent.iterdir() if p.is_dir() and pattern.match(p.name)),
                  key=lambda p: p.stat().st_mtime)


def interrupted_save(path: str | os.PathLike) -> Path | None:
    """The previous checkpoint that an interrupted save left aside (``path`` itself missing), or
    None. A crash between ``atomic_directory``'s two renames leaves exactly that state."""
    path = Path(path)
    if path.exists():
        return None
    complete = [p for p in _leftovers(path, "old") if (p / CONFIG_NAME).is_file()]
    return complete[-1] if complete else None


def recover_interrupted_save(path: str | os.PathLike) -> Path | None:
    """Put back the checkpoint an interrupted save left aside, then remove the leftovers of
    earlier saves (only ``atomic_directory``'s own names). Call it only while no other process
    writes ``path`` (the trainer holds the run's lock). Returns the folder it recovered from."""
    path = Path(path)
    recovered = interrupted_save(path)
    if recovered is not None:
        os.replace(recovered, path)
    for leftover in _leftovers(path, "old") + _leftovers(path, "tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    return recovered


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(checkpoint_dir, run_dir or None)`` for a run directory (holding ``checkpoint/``) or a
    checkpoint directory (one holding ``config.json``; its parent is the run when it holds the
    run's files). Anything else is a :class:`CheckpointError` that says what was found."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {str(path)!r}")
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a file, not a checkpoint or run directory")
    ckpt = path / CHECKPOINT_DIR
    if ckpt.is_dir():
        require_file(ckpt, CONFIG_NAME)
        return ckpt, path
    if (path / CONFIG_NAME).is_file():
        run = path.parent
        return path, run if any((run / f).is_file() for f in RUN_FILES) else None
    aside = interrupted_save(ckpt)
    if aside is not None:
        raise CheckpointError(f"{str(path)!r} has no checkpoint/: a save was interrupted and left the previous "
                              f"one in {aside.name}; `mtpkern train ... --resume` recovers it")
    raise CheckpointError(f"{str(path)!r} is neither a run directory (with checkpoint/) "
                          f"nor a checkpoint directory (with {CONFIG_NAME})")


def is_local(name_or_dir) -> bool:
    """Whether ``name_or_dir`` means a local path rather than a Hugging Face hub name."""
    text = str(name_or_dir)
    return Path(text).exists() or os.sep in text or text.startswith(".")


def model_source(name_or_dir):
    """A local run or checkpoint directory -> its checkpoint directory (:func:`resolve_checkpoint`);
    a hub name -> itself."""
    return resolve_checkpoint(name_or_dir)[0] if is_local(name_or_dir) else str(name_or_dir)


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold an exclusive lock on a run directory (created if needed) while the block runs.

    A second process that tries to lock the same directory fails at once with a
    :class:`CheckpointError` naming the holder's pid. The lock is ``flock`` on ``RUN/.lock``:
    the kernel releases it when the holder exits, however it dies, so a stale lock file from a
    dead process never blocks. When the block raises (a refused or failed run), the lock file
    and the folders this call created are removed again, so a refusal leaves nothing behind.
    """
    run_dir = Path(run_dir)
    created_dirs = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    fd, created_lock = _open_lock(run_dir / LOCK_NAME)
    done = False
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
        done = True
    finally:
        if not done and created_lock:
            (run_dir / LOCK_NAME).unlink(missing_ok=True)  # still held: no other process can own it
        os.close(fd)  # closing the descriptor releases the lock
        if not done:
            for d in created_dirs:
                try:
                    d.rmdir()  # only while empty: never what someone else put there
                except OSError:
                    break


def _open_lock(path: Path) -> tuple[int, bool]:
    """``(fd, created)``: ``path`` opened (created if missing) and ``flock``-ed. A lock file
    that its holder removed before we locked it is opened anew, so two processes never hold
    locks on two different files of the same name."""
    import fcntl

    while True:
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:
                continue  # removed in between: create it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(f"{path.parent} is in use by another training (pid {holder}): "
                                  "wait for it to finish, or choose another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, created
        os.close(fd)  # we locked a file its holder had just removed: try again
