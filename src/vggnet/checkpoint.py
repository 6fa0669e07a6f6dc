"""Checkpoint files: written atomically, read without unpickling arbitrary objects."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file in the same folder, fsync, then rename over ``path``.

    A crash, a kill or a full disk at any point leaves the previous file at ``path`` intact,
    and a reader never sees a half-written file. The file gets the usual permissions (umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save ``obj`` to ``path`` atomically (see atomic_write)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors, numbers, strings, lists, dicts.

    Pickles that would run code (or build arbitrary objects) are refused with an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError on truncated zips, ...
        raise ValueError(f"cannot read checkpoint {str(path)!r} safely: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}. Only plain tensors and "
                         "containers are accepted (torch.load weights_only=True)") from e
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    return obj
