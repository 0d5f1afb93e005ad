"""Checkpoint files: clear errors for bad checkpoints, and atomic directory writes.

A checkpoint is a directory. It is written into a temporary sibling first and moved into
place with renames, so at every moment either the old or the new complete checkpoint
exists: a crash or a Ctrl-C mid-write never loses the user's last good checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not match the model."""


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary directory; on success it replaces ``path`` atomically.

    The old directory, if any, is renamed aside before the new one is renamed into place
    and deleted only afterwards. On an exception the temporary directory is removed and
    ``path`` is left untouched.
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
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
