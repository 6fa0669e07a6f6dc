"""What a run folder guarantees (issue 16; docs/run-folder.md), with real faults: processes
killed by SIGKILL at chosen moments, SIGINT/SIGTERM from outside, a second process in the same
folder, a full disk (a tmpfs in a private mount namespace). The moment of a kill is chosen by
wrapping a function in the killed process, which then SIGKILLs itself; the code under test
runs as it is."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import vggnet
from vggnet.checkpoint import atomic_save, load_checkpoint
from vggnet.cli import main
from vggnet.runlock import LOCK_NAME, RunLock
from vggnet.settings import make_settings
from vggnet.train import train

SRC = str(Path(vggnet.__file__).resolve().parents[1])
TINY = dict(model="A", width=1 / 16, crop_size=32, scale=(32, 40), batch_size=8, epochs=1,
            workers=0, progress=False, stats_images=20, precision="fp32")


def _args(data, out, **kw) -> list[str]:
    """`vggnet train` arguments of the tiny run (3 steps an epoch), with ``kw`` on top."""
    args = ["train", "--data", str(data), "--out", str(out), "--preset", "reduced",
            "--no-progress"]
    for k, v in {**TINY, **kw}.items():
        if k != "progress":
            value = ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
            args += ["--" + k.replace("_", "-"), value]
    return args


def _vggnet(args: list[str], **kw) -> subprocess.Popen:
    """`python -m vggnet ARGS` in a fresh process (stdout and stderr piped, as text)."""
    return subprocess.Popen([sys.executable, "-m", "vggnet", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=SRC), **kw)


def _killed_in(code: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run ``code`` (which arranges a SIGKILL at some moment), then `vggnet ARGS`, in a fresh
    process; it must die by that SIGKILL."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code) + textwrap.dedent("""
        from vggnet.cli import main
        main(sys.argv[1:])
        """), *args], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=SRC))
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    return r


def _wait_for(p: subprocess.Popen, text: str) -> str:
    for line in p.stdout:
        if text in line:
            return line
    raise AssertionError(f"the process ended without printing {text!r}: {p.stderr.read()}")


# --- item 8 and 12: everything is checked before anything is written ----------------------------
@pytest.mark.parametrize("option,value,words", [
    ("width", "0", "width 0.0 makes the first conv 0 channels wide"),
    ("crop_size", "0", "crop_size must be an int >= 32 (five 2x2 pools), got 0"),
    ("dropout", "2", "dropout must be in [0, 1), got 2.0"),
    ("workers", "-1", "--workers must be >= 0 (0 loads the images in the training process), "
                      "got -1"),
    ("pca_std", "-1", "--pca-std must be >= 0 (the std of the PCA colour shift; 0 turns it "
                      "off), got -1.0"),
    ("save_every_min", "-1", "--save-every-min must be > 0 minutes"),
    ("scale", "73,80,90", "--scale takes S (fixed) or SMIN,SMAX (jittered): one or two values, "
                          "got 3: 73,80,90"),
    ("init_from", "text", "is neither a vggnet weights file nor a checkpoint (it begins "
                          "b'not a checkpoint"),
    ("init_from", "empty", "no best.pt or last.pt"),
])
def test_a_bad_option_writes_nothing(data, tmp_path, capsys, option, value, words):
    if option == "init_from":
        (tmp_path / "empty").mkdir()
        (tmp_path / "text").write_text("not a checkpoint\n")
        value = str(tmp_path / value)
    out = tmp_path / "run"
    assert main(_args(data, out, **{option: value})) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not out.exists()


PAUSE_AFTER_STATS = """
    import sys, time
    import vggnet.runlog

    message = vggnet.runlog.RunLog.message

    def message_then_pause(self, text):  # start-up held right after the colour statistics
        message(self, text)
        if text.startswith("mean RGB"):
            time.sleep(120)

    vggnet.runlog.RunLog.message = message_then_pause
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_run_starts_leaves_nothing(data, tmp_path, sig):
    """Ctrl-C or SIGTERM once the colour statistics are computed (the net, the optimizer and
    the runtime are still to come): exit code 130, a message, no run folder. The start-up is
    held there, so that a slow reader of the output (a loaded machine) cannot let the tiny
    run finish before the signal (it did: exit code 0, about 1 run in 5 under `make test`)."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PAUSE_AFTER_STATS) +
                          "from vggnet.cli import run\nrun()\n", *_args(data, out)],
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, PYTHONPATH=SRC))
    _wait_for(p, "mean RGB")
    time.sleep(1)  # however late the signal comes, the run is still starting
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "vggnet train: interrupted" in err and "Traceback" not in err
    if sig == signal.SIGTERM:
        assert "SIGTERM: stopping now (no training step was under way)" in err
    assert not out.exists()


# --- item 3: one writer per run folder ---------------------------------------------------------
def test_a_second_run_or_resume_in_a_running_folder_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    p = _vggnet(_args(data, out, epochs=200))
    _wait_for(p, "epoch   1/200")
    try:
        for args in (_args(data, out), ["train", "--resume", str(out)]):
            assert main(args) == 2
            err = capsys.readouterr().err
            assert (f"run folder {str(out)!r} is in use by pid {p.pid} on " in err
                    and "wait for it to finish or stop it" in err and err.count("\n") == 1), err
    finally:
        p.send_signal(signal.SIGTERM)
        o, _ = p.communicate(timeout=120)
    assert p.returncode == 130 and "resume with" in o
    assert not (out / LOCK_NAME).exists()  # released on the way out
    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 1 + load_checkpoint(out / "last.pt")["epoch"]  # one writer's rows
    lock = RunLock(out)
    assert lock.acquire() is None  # free, and no dead holder's record left
    lock.release()


# --- item 2: best.pt is the best the history names ---------------------------------------------
KILL_BEFORE_BEST = """
    import os, signal, sys
    import vggnet.runlog

    save = vggnet.runlog.atomic_save

    def save_or_die(obj, path, **kw):  # SIGKILL between an epoch's last.pt and its best.pt
        if path.name == "best.pt" and obj["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, path, **kw)

    vggnet.runlog.atomic_save = save_or_die
"""


def test_a_kill_between_last_and_best_is_mended_on_resume(data, tmp_path, capsys):
    """The issue's case: epoch 2 improves, last.pt is written, the process dies before best.pt.
    best.pt still holds epoch 1 while last.pt's history (and the report) name epoch 2. (A
    negative --min-improvement makes every epoch count as an improvement, whatever it learnt.)"""
    out = tmp_path / "run"
    _killed_in(KILL_BEFORE_BEST, _args(data, out, epochs=2, min_improvement=-1))
    last = load_checkpoint(out / "last.pt")
    assert [row["event"] for row in last["metrics"]] == ["improved", "improved"]
    assert load_checkpoint(out / "best.pt")["epoch"] == 1  # stale
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 2  # written before last.pt: never behind it
    assert main(["train", "--resume", str(out)]) == 0  # finished: mends best.pt, trains nothing
    said = capsys.readouterr().out
    assert ("best.pt held epoch 1, not epoch 2, the run's best (a save was cut short): copied "
            "last.pt, that epoch's checkpoint, to best.pt") in said
    assert "is finished after 2 epoch(s)" in said
    assert (out / "best.pt").read_bytes() == (out / "last.pt").read_bytes()
    assert load_checkpoint(out / "best.pt")["best_top1_err"] == last["metrics"][1]["val_top1_err"]
    assert main(["train", "--resume", str(out)]) == 0
    assert "best.pt held" not in capsys.readouterr().out  # once mended, nothing to say


# --- item 7: temporary files of a killed save --------------------------------------------------
KILL_DURING_SAVE = """
    import os, signal, sys
    import vggnet.checkpoint

    save = vggnet.checkpoint.torch.save

    def half_save_then_die(obj, f):  # SIGKILL half-way through epoch 2's last.pt
        name = os.readlink(f"/proc/self/fd/{f.fileno()}")  # atomic_write's temporary file
        if obj.get("epoch") == 2 and "/.last.pt." in name:
            f.write(b"PK" + bytes(300_000))
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        save(obj, f)

    vggnet.checkpoint.torch.save = half_save_then_die
"""


def test_the_temporary_file_of_a_killed_save_is_removed_on_resume(data, tmp_path, capsys):
    out = tmp_path / "run"
    _killed_in(KILL_DURING_SAVE, _args(data, out, epochs=2))
    left = sorted(p.name for p in out.glob(".last.pt.*.tmp"))
    assert len(left) == 1 and load_checkpoint(out / "last.pt")["epoch"] == 1
    assert main(["train", "--resume", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"removed 1 temporary file(s) left by a save that was killed: {left[0]}" in said
    assert not list(out.glob(".*.tmp")) and load_checkpoint(out / "last.pt")["epoch"] == 2


# --- item 5: a finished run is left alone ------------------------------------------------------
def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_resuming_a_finished_run_changes_nothing_unless_extended(data, tmp_path, capsys):
    # patience 1 and no lr drop: the first epoch that does not improve ends the run
    r = train(make_settings("reduced", **{**TINY, "epochs": 6, "lr_patience": 1, "lr_drops": 0},
                            data=str(data), out=str(tmp_path / "plateau")))
    assert r.status == "stopped" and r.epochs < 6, "this recipe must stop on a plateau"
    train(make_settings("reduced", **TINY, data=str(data), out=str(tmp_path / "done")))
    for name, epochs, why in [("plateau", r.epochs, "the validation error stopped improving "
                               "after 0 lr drop(s)"), ("done", 1, "1 of --epochs 1 done")]:
        folder = tmp_path / name
        before = _snapshot(folder)
        capsys.readouterr()
        for extra in ([], ["--epochs", "1"] if name == "done" else ["--epochs", "6"]):
            assert main(["train", "--resume", str(folder), *extra]) == 0
            said = capsys.readouterr().out
            assert (f"the run in {folder} is finished after {epochs} epoch(s) ({why}); nothing "
                    f"was changed. To train it further, resume it with --epochs N, N > "
                    f"{max(epochs, 6 if name == 'plateau' else 1)}") in said, said
            assert _snapshot(folder) == before
    assert main(["train", "--resume", str(tmp_path / "done"), "--epochs", "2"]) == 0
    assert load_checkpoint(tmp_path / "done" / "last.pt")["epoch"] == 2
    assert main(["train", "--resume", str(tmp_path / "plateau"), "--epochs", "7"]) == 0
    assert load_checkpoint(tmp_path / "plateau" / "last.pt")["epoch"] > r.epochs


# --- item 10: signals -----------------------------------------------------------------------
def test_a_signal_during_validation_costs_no_step_and_one_save(data, tmp_path, monkeypatch,
                                                               capsys):
    import vggnet.runlog
    import vggnet.train

    validate, saved = vggnet.train.validate, []

    def validate_under_ctrl_c(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # during epoch 1's validation
        return validate(*a, **kw)

    def save(obj, path, **kw):
        saved.append((path.name, obj["step"]))
        return atomic_save(obj, path, **kw)

    monkeypatch.setattr(vggnet.train, "validate", validate_under_ctrl_c)
    monkeypatch.setattr(vggnet.runlog, "atomic_save", save)
    r = train(make_settings("reduced", **{**TINY, "epochs": 3}, data=str(data),
                            out=str(tmp_path / "run")))
    # one process abandons the validation (issue 15: a stop takes seconds): epoch 1's steps
    # are saved once, in last.pt, and the resumed run validates them
    assert r.status == "interrupted" and r.epochs == 0
    assert saved == [("last.pt", 3)]
    assert "stopped at epoch 1, step 3/3;" in capsys.readouterr().out


def test_ctrl_c_while_the_program_exits_prints_no_traceback(data, tmp_path):
    """Ctrl-C stops the run; more Ctrl-C keep coming while the process exits (loader workers
    and torch's atexit finalizers): before, one landing in an atexit callback printed a
    traceback."""
    p = _vggnet(_args(data, tmp_path / "run", epochs=200, workers=2))
    _wait_for(p, "epoch   1/200")
    p.send_signal(signal.SIGINT)
    _wait_for(p, "resume with")
    while p.poll() is None:
        p.send_signal(signal.SIGINT)
        time.sleep(0.003)
    err = p.stderr.read()
    assert p.returncode == 130 and "Traceback" not in err and "Exception ignored" not in err, err


def test_sigterm_to_the_whole_process_group_stops_like_sigterm_to_the_run(data, tmp_path):
    """`timeout`, `kill -TERM -- -PGID` and job schedulers signal every process of the run,
    its loader workers too: before, a worker died of it and the run ended in a traceback
    (exit code 1) without its save. Now it stops and saves, as for SIGTERM alone."""
    out = tmp_path / "run"
    p = _vggnet(_args(data, out, epochs=200, workers=2, batch_size=2), start_new_session=True)
    _wait_for(p, "epoch   1/200")  # 12 steps an epoch: epoch 2's workers are loading
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGTERM)  # the process group that start_new_session made
    stdout, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    # abandoned mid-step, or finished when it came between steps (in the loader's wait)
    assert ("SIGTERM: abandoning this step, saving the last finished one" in err
            or "SIGTERM: finishing this step, then saving" in err), err
    assert f"resume with: vggnet train --resume {out}" in stdout
    # saved where it stopped: in epoch 2, or at epoch 1's end when a loaded machine was slower
    assert load_checkpoint(out / "last.pt")["step"] >= 12


# --- item 6: one-line errors instead of tracebacks -----------------------------------------------
def test_resuming_tensors_that_do_not_fit_is_refused_before_building(data, tmp_path, capsys):
    out = tmp_path / "run"
    train(make_settings("reduced", **TINY, data=str(data), out=str(out)))
    ckpt = load_checkpoint(out / "last.pt")
    ckpt["train_settings"]["width"] = 0.125  # resealed: only the claim is wrong
    atomic_save(ckpt, out / "last.pt")
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "last.pt' holds tensors that do not fit the VGG A" in err
    assert "its training settings describe" in err and "refused before building" in err


def _namespace(tmp_path: Path) -> list[str]:
    from test_file_safety import _namespace_prefix

    return _namespace_prefix(tmp_path)


def test_a_full_disk_during_training_stops_with_one_line_and_keeps_the_checkpoints(data,
                                                                                   tmp_path):
    """A 2.3 MB tmpfs: epoch 1's last.pt and best.pt (0.9 MB each) fit, epoch 2's new last.pt
    does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    train_args = " ".join(["-m", "vggnet", *_args(data, out, epochs=3)])
    check = (f"import os; from vggnet.checkpoint import load_checkpoint; "
             f"print('EPOCH', load_checkpoint('{out}/last.pt')['epoch'], "
             f"load_checkpoint('{out}/best.pt')['epoch']); print('FILES', sorted(os.listdir("
             f"'{out}')))")
    r = subprocess.run([*_namespace(tmp_path), "sh", "-c",
                        f"mount -t tmpfs -o size=2300k tmpfs {disk} && "
                        f"{sys.executable} {train_args}; echo RC=$? && "
                        f"{sys.executable} -c \"{check}\""],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=SRC))
    assert "RC=2" in r.stdout, r.stdout + r.stderr
    error = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(error) == 1 and error[0].startswith("vggnet train: error: cannot write "), r.stderr
    assert "No space left on device" in error[0] and "every earlier file is intact" in error[0]
    assert f"the run stopped; continue it with `vggnet train --resume {out}`" in error[0]
    assert "EPOCH 1 1" in r.stdout and ".tmp" not in r.stdout


def test_evaluate_and_export_outputs_are_checked_before_the_work(data, tmp_path, capsys):
    from vggnet import preprocess
    from vggnet.weights import save_weights

    weights = save_weights(tmp_path / "w.safetensors",
                           vggnet.create_model("A", num_classes=3, width=1 / 16, crop_size=32),
                           preprocess.CAFFE)
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    for argv, words in [
            (["evaluate", str(weights), "--data", str(data), "--out", str(tmp_path / "file")],
             "evaluation folder '" + str(tmp_path / "file") + "' is a file; give a folder"),
            (["export", "--weights", str(weights), "--out", str(tmp_path / "folder")],
             "onnx export output '" + str(tmp_path / "folder") + "' is a folder"),
            (["export", "--weights", str(weights), "--out", str(tmp_path / "no" / "x.onnx")],
             "does not exist; create it first")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert not (tmp_path / "no").exists()


def test_read_only_outputs_of_evaluate_export_and_features_are_refused_first(data, tmp_path):
    """Real EROFS (a tmpfs remounted read-only), refused before any model is loaded: the
    weights file given does not even exist."""
    ro = tmp_path / "ro"
    ro.mkdir()
    code = f"""
        from vggnet.cli import main
        for argv in (["evaluate", "missing.pt", "--data", "{data}", "--out", "{ro}/ev"],
                     ["export", "--weights", "missing.pt", "--out", "{ro}/m.onnx"],
                     ["features", "{data}", "--weights", "missing.pt", "--out", "{ro}/f.npz"]):
            print("RC", main(argv))
        """
    r = subprocess.run([*_namespace(tmp_path), "sh", "-c",
                        f"mount -t tmpfs tmpfs {ro} && mount -o remount,ro {ro} && "
                        f"exec {sys.executable} -c \"$0\"", textwrap.dedent(code)],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=SRC))
    assert r.stdout.count("RC 2") == 3, r.stdout + r.stderr
    for what in (f"evaluation folder '{ro}/ev'", f"onnx export output '{ro}/m.onnx'",
                 f"features output '{ro}/f.npz'"):
        assert f"cannot write {what}: the folder '{ro}' is read-only" in r.stderr, r.stderr
    assert "missing.pt" not in r.stderr


# --- item 11: the dataset's path -----------------------------------------------------------
def test_data_is_stored_absolute_and_a_moved_dataset_can_be_given_on_resume(
        data, tmp_path, monkeypatch, capsys):
    shutil.copytree(data, tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    assert main(_args("d", "run")) == 0
    stored = json.loads((tmp_path / "run" / "settings.json").read_text())["data"]
    assert stored == str(tmp_path / "d")
    assert load_checkpoint(tmp_path / "run" / "last.pt")["train_settings"]["data"] == stored
    (tmp_path / "d").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "run")  # resumed from elsewhere, with a relative path
    resume = ["train", "--resume", str(tmp_path / "run"), "--epochs", "2"]
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert (f"the run's dataset folder {str(tmp_path / 'd')!r} does not exist; if it moved, "
            f"give its new place beside --resume (`vggnet train --resume RUN --data NEW_DIR`, "
            f"`vggnet finetune --resume RUN NEW_DIR`)") in err, err
    smaller = tmp_path / "smaller"
    shutil.copytree(tmp_path / "moved", smaller)
    next((smaller / "train" / "disc").iterdir()).unlink()
    assert main([*resume, "--data", "../smaller"]) == 2
    err = capsys.readouterr().err
    assert "holds 23 training and 6 validation images; the run was trained on 24 and 6" in err
    assert main([*resume, "--data", "../moved"]) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["train_settings"]["data"] == str(tmp_path / "moved")
    assert torch.isfinite(torch.tensor(ckpt["best_top1_err"]))
