"""What a training run's folder guarantees (docs/run-folder.md): one writer at a time, no
leftovers of a killed save, a best.pt that is the best the history names, nothing written
when a run fails or is stopped before it starts, and a finished run left alone on resume.

The main process calls these around ``train.train``; every other process of a torchrun group
leaves the folder to it.
"""

from __future__ import annotations

import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import distributed
from .checkpoint import (
    WriteError,
    atomic_write,
    check_output_folder,
    checkpoint_entry,
    remove_temporaries,
)
from .runlock import RunLock
from .settings import TrainSettings

# a torchrun restart's new main process waits this long for the dead group's processes (and
# their loader workers, which see their parent gone within 5 s) to let go of the lock
RESTART_LOCK_WAIT_S = 60.0


def prepare_folder(out: Path, resuming: bool, command: str = "vggnet train") -> Path:
    """``out`` exists and takes files; a new run may not start where one is (its last.pt);
    ``command`` continues such a run (a task's, e.g. ``vggnet localize train``)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to the output folder {str(out)!r} ({type(e).__name__}: "
                         f"{e.strerror or e}); choose another --out") from None
    if not resuming and (out / "last.pt").exists():
        raise ValueError(f"{str(out)!r} already holds a run (last.pt); continue it with "
                         f"`{command} --resume {out}`, or choose another --out")
    return out


@contextmanager
def hold_run_folder(folder: Path, resuming: bool,
                    command: str = "vggnet train") -> Iterator[None]:
    """The main process's hold on a run folder for a whole ``train`` call.

    Checked writable, then locked (``runlock.RunLock``: a second ``train --out`` or
    ``--resume`` of the same folder is refused naming this process) before the checkpoint is
    read or anything is written, then cleared of the temporary files a killed save left. On
    the way out the lock is released, a folder this call created and left empty is removed,
    and a failed write (``WriteError``: a full disk, ...) says how to continue the run.
    """
    if not distributed.env_info().is_main or (resuming and not folder.is_dir()):
        yield  # other ranks; or a resume of nothing, refused when its checkpoint is read
        return
    created, lock = not folder.exists(), None
    try:
        check_output_folder(folder, "run")
        lock = RunLock(folder)
        note = lock.acquire(wait_s=RESTART_LOCK_WAIT_S if distributed.restarted() else 0.0)
        prepare_folder(folder, resuming, command)  # under the lock: a run may have ended
        removed = remove_temporaries(folder)
        for line in ([note] if note else []) + ([
                f"removed {len(removed)} temporary file(s) left by a save that was killed: "
                f"{', '.join(p.name for p in removed)}"] if removed else []):
            print(line, flush=True)
        yield
    except WriteError as e:
        then = (f"the run stopped; continue it with `{command} --resume {folder}`"
                if (folder / "last.pt").is_file() else
                "the run stopped before its first checkpoint; start it again")
        raise WriteError(e.errno, f"{e}; {then}") from e
    finally:
        if lock is not None:
            lock.release()
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def repair_best(checkpoint: dict, path: Path) -> str | None:
    """Make best.pt hold the epoch the history calls the best; returns what was done.

    last.pt is saved before best.pt, so a kill (or a full disk) between the two leaves best.pt
    one improvement behind (or missing) while the history, and later the report, name the
    newer best. That epoch's checkpoint is then ``checkpoint`` itself (loaded from ``path``),
    which is copied over best.pt. Call it holding the folder's lock, before training on."""
    improved = [row["epoch"] for row in checkpoint["metrics"] if row["event"] == "improved"]
    best = path.parent / "best.pt"
    if not improved or path.resolve() == best.resolve():
        return None
    held = checkpoint_entry(best, "epoch")
    if held == improved[-1]:
        return None
    found = f"best.pt held epoch {held}" if held is not None else "best.pt was missing"
    if (checkpoint["epoch"], checkpoint["epoch_step"]) != (improved[-1], 0):
        return (f"warning: {found}, not epoch {improved[-1]}, the run's best, and {path.name} has "
                "moved on since; best.pt is replaced at the next improvement (best.pt is not "
                "the best the report names until then)")
    with open(path, "rb") as src:
        atomic_write(best, lambda f: shutil.copyfileobj(src, f))
    return (f"{found}, not epoch {improved[-1]}, the run's best (a save was cut short): copied "
            f"{path.name}, that epoch's checkpoint, to best.pt")


def finished(s: TrainSettings, checkpoint: dict) -> str | None:
    """Why the run ``checkpoint`` continues is already finished under settings ``s`` (None if
    it is not): its epochs are done, or it stopped on a plateau after its last lr drop and
    ``--epochs`` does not extend it beyond what it was given."""
    done, planned = checkpoint["epoch"], checkpoint["train_settings"]["epochs"]
    rows = checkpoint["metrics"]
    stopped = bool(rows) and rows[-1]["event"] == "stop" and checkpoint["epoch_step"] == 0
    if done < s.epochs and not (stopped and s.epochs <= planned):
        return None
    drops = checkpoint["scheduler"]["drops"]
    why = (f"the validation error stopped improving after {drops} lr drop(s)" if stopped
           else f"{done} of --epochs {s.epochs} done")
    return (f"the run in {s.out} is finished after {done} epoch(s) ({why}); nothing was changed. "
            f"To train it further, resume it with --epochs N, N > {max(done, planned)}")


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """Outside the training loop (whose ``StopRequest`` finishes the step and saves), SIGTERM
    stops at once, as Ctrl-C does: with a message, the run's ``finally`` blocks run (the lock
    is released, a folder that holds nothing yet is removed), exit code 130."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        print(f"\n{signal.Signals(signum).name}: stopping now (no training step was under way)",
              file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
