"""Atomic file writes (temp file + fsync + rename), file digests, and the run dir a file belongs to."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Read once at import: os.umask can only be read by setting it, which other threads could observe.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    # Makes a rename itself durable; some filesystems cannot open a directory for that, which is fine.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write through ``write(tmp_path)`` into a temp file beside ``path``, fsync it, then rename it into place.

    A kill or a failed write leaves the previous ``path`` whole and at most a hidden
    ``.<name>.<random>.tmp`` beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a half-written file at ``path``; a failed write raises its OSError."""

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as error:
                # torch's zip writer turns a failed write (a full disk: ENOSPC) into a RuntimeError
                # ("unexpected pos"); through a Python file the OSError is its context.
                if isinstance(error.__context__, OSError):
                    raise error.__context__ from None
                raise

    return atomic_write(path, save)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically (temp file + rename)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_dir(path: str | os.PathLike) -> Path:
    """The run dir a file belongs to: the folder above ``checkpoints/`` or ``deploy/`` (``deploy/<name>/``
    of deploy.py too), else the file's own folder (e.g. Lightning's ``hpc_ckpt_<n>.ckpt`` in the run dir)."""
    path = Path(path)
    if path.parent.name in ("checkpoints", "deploy"):
        return path.parent.parent
    if path.parent.parent.name == "deploy":
        return path.parent.parent.parent
    return path.parent
