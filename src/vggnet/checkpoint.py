"""Files in and out: outputs checked before the work and written atomically, checkpoints read
without unpickling arbitrary objects and verified against the checksum stored in them."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from . import integrity

# a folder given where a file was expected: these are the files worth pointing at inside it
LOADABLE_SUFFIXES = (".pt", ".pth", ".safetensors")
# atomic_write's temporary files: "." + the target's name + "." + mkstemp's 8 characters + ".tmp"
TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")


class WriteError(OSError):
    """Writing a file failed (full disk, quota, read-only, I/O error): one line saying what
    failed, why, and that nothing was replaced. ``errno`` is the operating system's."""

    def __init__(self, errno: int | None, message: str) -> None:
        super().__init__(errno, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file in the same folder, fsync, then rename over ``path``.

    A crash, a kill or a full disk at any point leaves the previous file at ``path`` intact,
    and a reader never sees a half-written file. The file gets the usual permissions (umask).
    An operating-system error (ENOSPC, EDQUOT, EROFS, EIO, ...) becomes one ``WriteError``
    saying so; the temporary file is removed whatever happens.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, replaced = None, False
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        replaced = True
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if tmp is not None and not replaced:
            Path(tmp).unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is None or replaced or isinstance(e, WriteError):
            raise
        raise WriteError(cause.errno, _write_failed(path, cause)) from e
    return path


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: torch.save reports a failed write as a RuntimeError
    ("enforce fail at inline_container.cc") with the OSError as its context."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _write_failed(path: Path, e: OSError) -> str:
    free = ""
    try:
        free = f", {shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
    except OSError:
        pass
    kept = (f"the existing {path.name} is unchanged" if path.exists()
            else f"no {path.name} was written")
    return (f"cannot write {str(path)!r}: {e.strerror or e}{free}; nothing was replaced ({kept}, "
            "and every earlier file is intact); free some space or fix the folder, then try again")


def atomic_save(obj, path: str | os.PathLike, *, checksum: bool = True) -> Path:
    """torch.save ``obj`` to ``path`` atomically (see atomic_write). A dict gets a checksum of
    its content under "checksum" (see integrity.py), verified by ``load_checkpoint``."""
    if checksum and isinstance(obj, dict):
        obj = integrity.seal(obj)
    return atomic_write(path, lambda f: torch.save(obj, f))


def check_input_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """``path`` as a Path if it is a non-empty file; else a one-line error saying what it is
    (missing, a folder: with the loadable files in it, empty) and what to do."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in LOADABLE_SUFFIXES)
        found = (f"it holds {', '.join(inside[:5])}" if inside
                 else "it holds no .pt or .safetensors file")
        example = path / (inside[0] if inside else "best.pt")
        raise ValueError(f"{what} {str(path)!r} is a folder, not a file ({found}); give the file "
                         f"itself, e.g. {str(example)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {str(path)!r} is empty (0 bytes): it was never completely "
                         "written (a crash or a full disk while saving?); "
                         f"{integrity.other_copy_hint(path)}")
    return path


def check_writable_output(path: str | os.PathLike, kind: str,
                          suffixes: Sequence[str] = ()) -> Path:
    """Check, before any work, that ``path`` can take a ``kind`` output (e.g. "features"):
    not a folder, ending in one of ``suffixes`` (lower case, e.g. (".npz", ".safetensors"))
    if given, in an existing writable folder, not an existing read-only file. One-line
    errors: ValueError, FileNotFoundError, NotADirectoryError or PermissionError."""
    path = Path(path)
    if path.is_dir():
        name = f"{kind.replace(' ', '_')}{suffixes[0] if suffixes else ''}"
        raise ValueError(f"{kind} output {str(path)!r} is a folder; give a file name, e.g. "
                         f"{str(path / name)!r}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{kind} output {str(path)!r} must end in {' or '.join(suffixes)} (the "
                         f"suffix chooses the format), got {path.suffix or 'no suffix'!r}")
    parent = path.parent
    if not parent.exists():
        raise FileNotFoundError(f"the folder {str(parent)!r} of {kind} output {str(path)!r} does "
                                "not exist; create it first")
    _check_writable_folder(parent, f"{kind} output {str(path)!r}")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{kind} output {str(path)!r} exists and is read-only; remove it or "
                              "choose another name")
    return path


def check_output_folder(path: str | os.PathLike, kind: str) -> Path:
    """Check, before any work, that ``path`` can be (or already is) a writable folder for a
    ``kind`` output (e.g. "evaluation"): not a file, and the folder or, if it is still to be
    made, its nearest existing ancestor writable. Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{kind} folder {str(path)!r} is a file; give a folder (it is "
                                 "created if needed)")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    _check_writable_folder(existing, f"{kind} folder {str(path)!r}")
    return path


def _check_writable_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise NotADirectoryError(f"{what}: {str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {what}: the folder {str(folder)!r} is read-only for "
                              "this user; choose another place")


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files ``atomic_write`` left in ``folder`` when its process was
    killed mid-write (``.NAME.XXXXXXXX.tmp``); returns them. Only safe while no other process
    writes the folder: call it holding the folder's lock (runlock.RunLock)."""
    removed = []
    for p in sorted(Path(folder).glob(".*.tmp")):
        if p.is_file() and TEMPORARY.fullmatch(p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def load_checkpoint(path: str | os.PathLike, map_location="cpu", *, verify: bool = True) -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors, numbers, strings, lists, dicts.

    Pickles that would run code (or build arbitrary objects) are refused with an error, and so
    are empty files, files that are not torch files, zips that would expand beyond their size,
    and (``verify``) a content that does not match its stored checksum. The checksum record is
    not part of the returned dict.
    """
    path = check_input_file(path)
    _check_torch_file(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError on truncated zips, ...
        raise ValueError(f"cannot read checkpoint {str(path)!r} safely: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}. Only plain tensors and "
                         "containers are accepted (torch.load weights_only=True)") from e
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    stored = obj.pop(integrity.KEY, None)
    if verify:
        integrity.verify(stored, obj, path)
    return obj


def checkpoint_entry(path: str | os.PathLike, key: str):
    """``checkpoint[key]`` read without reading the tensors (memory-mapped) or verifying the
    checksum: a cheap look at, e.g., which epoch a file holds. None if the file is missing,
    unreadable or not a checkpoint dict."""
    try:
        path = check_input_file(path)
        _check_torch_file(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # whatever is wrong with it, it does not hold what was asked
        return None
    return obj.get(key) if isinstance(obj, dict) else None


def _check_torch_file(path: Path) -> None:
    """A torch.save file starts as a zip ("PK") or, before PyTorch 1.6, a pickle (0x80). A zip
    may not expand beyond its own size: torch.save stores its entries uncompressed, and
    torch.load would inflate compressed ones (a 17 kB file into 16 MB, or more) before any
    check could look at them."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise ValueError(f"{str(path)!r} is not a PyTorch checkpoint (it begins {head!r}, "
                         f"neither a zip nor a pickle); {integrity.other_copy_hint(path)}")
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                expanded = sum(i.file_size for i in z.infolist())
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"checkpoint {str(path)!r} is damaged or truncated ({e}); "
                             f"{integrity.other_copy_hint(path)}") from e
        size = path.stat().st_size
        if expanded > size:
            raise ValueError(f"checkpoint {str(path)!r} would expand from {size:,} to {expanded:,} "
                             "bytes: compressed entries, which torch.save never writes; refused")
