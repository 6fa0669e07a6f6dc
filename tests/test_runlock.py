"""The run-folder lock between real processes: a second writer is refused naming the holder,
a clean exit releases it, a SIGKILLed holder's lock is taken over with a note."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vggnet
from vggnet.runlock import LOCK_NAME, RunFolderLocked, RunLock

SRC = str(Path(vggnet.__file__).resolve().parents[1])
# runlock.py alone, without the package (whose __init__ imports torch: 2 s a process)
RUNLOCK = str(Path(SRC) / "vggnet" / "runlock.py")
LOAD = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("runlock", {RUNLOCK!r})
runlock = sys.modules["runlock"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runlock)
RunLock, RunFolderLocked = runlock.RunLock, runlock.RunFolderLocked
"""

# holds the lock until its stdin closes; says "held" (and any note) once it has it
HOLDER = """
    import sys
    with RunLock(sys.argv[1], command="vggnet train --out " + sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
"""

# one attempt: prints "got" and the note, or "refused" and the message
TRY = """
    import sys
    lock = RunLock(sys.argv[1], command="second")
    try:
        note = lock.acquire()
    except RunFolderLocked as e:
        print("refused", e)
    else:
        print("got", note)
        lock.release()
"""


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOAD + textwrap.dedent(code), *args], text=True,
                            stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=SRC), **kw)


def _try(folder: Path) -> str:
    p = _python(TRY, str(folder))
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    return out.strip()


@pytest.fixture
def holder(tmp_path):
    folder = tmp_path / "run"
    p = _python(HOLDER, str(folder), stdin=subprocess.PIPE)
    assert p.stdout.readline().strip() == "held"
    yield folder, p
    if p.poll() is None:
        p.kill()
    p.wait(timeout=60)


def test_a_second_writer_is_refused_naming_the_holder(holder):
    folder, p = holder
    out = _try(folder)
    assert out.startswith(f"refused run folder {str(folder)!r} is in use by pid {p.pid} on "
                          f"{socket.gethostname()} since ")
    assert f"(`vggnet train --out {folder}`); wait for it to finish or stop it" in out
    assert "\n" not in out
    record = json.loads((folder / LOCK_NAME).read_text())
    assert record["pid"] == p.pid and record["command"] == f"vggnet train --out {folder}"


def test_a_clean_exit_releases_the_lock_and_removes_the_file(holder):
    folder, p = holder
    p.stdin.close()
    assert p.wait(timeout=60) == 0
    assert not (folder / LOCK_NAME).exists()
    assert _try(folder) == "got None"  # no stale note after a clean release
    assert not (folder / LOCK_NAME).exists()


def test_a_killed_holder_is_taken_over_with_a_note(holder):
    folder, p = holder
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == p.pid  # left behind
    out = _try(folder)
    assert out.startswith(f"got note: took over the lock of {str(folder)!r} left by pid {p.pid} "
                          "on ")
    assert out.endswith("which is no longer running")


def test_in_process_second_lock_and_reacquire(tmp_path):
    """flock conflicts between two open files in one process too; a released lock is free."""
    with RunLock(tmp_path / "r") as first:
        assert first.held
        with pytest.raises(RunFolderLocked, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path / "r").acquire()
    assert not first.held and not (tmp_path / "r" / LOCK_NAME).exists()
    second = RunLock(tmp_path / "r")
    assert second.acquire() is None
    second.release()


# acquires and releases N times, retrying when refused; while holding, it creates a marker
# file with O_EXCL, which fails if another process holds the lock at the same moment
CHURN = """
    import os, sys, time
    folder, n = sys.argv[1], int(sys.argv[2])
    while not os.path.exists(os.path.join(folder, "go")):
        time.sleep(0.01)
    done = 0
    while done < n:
        lock = RunLock(folder, command="churn")
        try:
            lock.acquire()
        except RunFolderLocked:
            continue
        marker = os.open(os.path.join(folder, "inside"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(marker)
        os.unlink(os.path.join(folder, "inside"))
        lock.release()
        done += 1
    print(done)
"""


def test_contending_processes_never_hold_it_together(tmp_path):
    """Three processes take and release the lock 100 times each, as fast as they can: the
    release deletes the file while others may have it open, so a waiter must notice that its
    file is no longer the lock file (else two would hold 'the' lock at once)."""
    folder = tmp_path / "run"
    folder.mkdir()
    procs = [_python(CHURN, str(folder), "100") for _ in range(3)]
    (folder / "go").touch()
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0] and outs == ["100"] * 3
    assert sorted(f.name for f in folder.iterdir()) == ["go"]


def test_children_of_a_dead_holder_keep_the_lock_and_the_message_says_so(tmp_path):
    """A forked child (a DataLoader worker) shares the lock; after the holder's death the lock
    lasts as long as the child, and the refusal explains why a dead pid still holds it."""
    folder = tmp_path / "run"
    p = _python("""
        import os, sys
        RunLock(sys.argv[1], command="parent").acquire()
        if os.fork() == 0:  # the child inherits the locked file
            sys.stdin.read()
            os._exit(0)
        print("held", flush=True)
        os._exit(0)  # the parent dies without releasing
        """, str(folder), stdin=subprocess.PIPE)
    assert p.stdout.readline().strip() == "held"
    p.wait(timeout=60)
    out = _try(folder)
    assert out.startswith("refused") and f"pid {p.pid}" in out
    assert "which has exited but whose child processes still hold the lock" in out
    p.stdin.close()  # the child exits
    for _ in range(100):
        out = _try(folder)
        if out.startswith("got"):
            break
    assert out.startswith("got note: took over") and "no longer running" in out
