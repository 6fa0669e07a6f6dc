"""One writer per run folder: an exclusive lock on DIR/run.lock while a run writes there.

The lock is ``fcntl.flock`` on the file, so the kernel drops it when its holder exits in any
way (a SIGKILL and an OOM kill too): it can never outlive its process. The file records who
holds it (pid, host, start time, command) for the message a second writer gets. A clean
release deletes the file; a killed holder leaves it behind, and the next writer takes it over
with a note (the record's pid is no longer running on this host). flock works between
processes on one machine; on NFS, Linux emulates it with POSIX locks (lockd), which also
covers clients on other machines.

Forked children (DataLoader workers) inherit the open file and with it the lock: the lock is
free once the holder and all its children are gone.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_NAME = "run.lock"


class RunFolderLocked(ValueError):
    """Another process holds the run folder's lock."""


@dataclass
class Holder:
    pid: int
    host: str
    started: str  # local time, "2026-12-01 10:00:00"
    command: str

    @classmethod
    def current(cls, command: str | None = None) -> Holder:
        if command is None:
            command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        return cls(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S"), command)

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            d = json.loads(text)
            return cls(int(d["pid"]), str(d["host"]), str(d["started"]), str(d["command"]))
        except (ValueError, TypeError, KeyError):
            return None  # empty (being written, or released) or not ours

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.started} (`{self.command}`)"

    def running(self) -> bool:
        """Whether a process with this pid runs on this machine (the host is not checked)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process
            return True
        return True


class RunLock:
    """``with RunLock(folder): ...`` holds ``folder``'s lock (the folder is created if needed).

    ``acquire`` raises RunFolderLocked naming the holder when another process has it, and
    returns a note (or None) when it took over the lock a killed process left behind."""

    def __init__(self, folder: str | os.PathLike, command: str | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait_s: float = 0.0) -> str | None:
        """Take the lock, retrying for up to ``wait_s`` seconds while another holds it."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._acquire()
            except RunFolderLocked:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def _acquire(self) -> str | None:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = Holder.parse(_read(fd))
                os.close(fd)
                who = holder.describe() if holder else "another process (not yet recorded)"
                if holder and holder.host == socket.gethostname() and not holder.running():
                    who += ", which has exited but whose child processes still hold the lock"
                raise RunFolderLocked(
                    f"run folder {str(self.folder)!r} is in use by {who}; wait for it to finish "
                    "or stop it, or choose another --out") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # a releaser deleted the file between our open and our lock: again
        previous = Holder.parse(_read(fd))
        me = Holder.current(self.command)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        if previous is None:
            return None
        here = previous.host == me.host
        state = "which is no longer running" if here and not previous.running() else \
            "which no longer holds it"
        return (f"note: took over the lock of {str(self.folder)!r} left by {previous.describe()}, "
                f"{state}")

    def release(self) -> None:
        """Delete the lock file, then let go (in this order: a process waiting on the old file
        sees it gone and starts over on a new one)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):
                self.path.unlink()
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        note = self.acquire()
        if note:
            print(note, file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", "replace")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
