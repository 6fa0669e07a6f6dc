"""Data-parallel training through torchrun on CPU (gloo): equivalence, faults, multi-node."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from vggnet.checkpoint import load_checkpoint
from vggnet.distributed import FAULT_ENV
from vggnet.settings import make_settings
from vggnet.train import train

# 24 training images, global batch 8: 3 steps an epoch; dropout 0 because masks are drawn per
# process (augmentation is drawn per image, so it is the same for any number of processes)
TINY = dict(model="A", width=1 / 16, crop_size=32, scale=(32, 40), batch_size=8, dropout=0.0,
            workers=0, progress=False, stats_images=50, epochs=2, device="cpu", precision="fp32")


def _args(data, out, **kw):
    opts = {**TINY, **kw}
    args = ["--data", str(data), "--out", str(out), "--preset", "reduced", "--no-progress"]
    for k, v in opts.items():
        if k == "progress":
            continue
        flag = "--" + k.replace("_", "-")
        args += [flag, ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    return args


def _torchrun(args, nproc=2, restarts=0, env=None, extra=(), wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", *(extra or ["--standalone"]), "-m", "vggnet", "train",
           *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop(FAULT_ENV, None) if env is None or FAULT_ENV not in env else None
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=240)


def _weights(folder):
    ckpt = load_checkpoint(folder / "last.pt")
    return ckpt, ckpt["model"]


def _same(a, b, tol=1e-5):
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol, msg=k)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The single-process run everything is compared with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(make_settings("reduced", data=str(data), out=str(out), **TINY))
    return _weights(out)


def test_two_processes_equal_one_process(data, tmp_path, reference):
    r = _torchrun(_args(data, tmp_path / "ddp"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "batch 8 = 2 process(es) x 1 x 4" in r.stdout
    ckpt, weights = _weights(tmp_path / "ddp")
    ref_ckpt, ref_weights = reference
    assert ckpt["step"] == ref_ckpt["step"] == 6
    _same(weights, ref_weights)
    # sharded validation, all-reduced sums: exactly the single-process metrics
    for a, b in zip(ckpt["metrics"], ref_ckpt["metrics"], strict=True):
        assert a["val_top1_err"] == b["val_top1_err"] and abs(a["val_loss"] - b["val_loss"]) < 1e-5


def test_killed_rank_restarts_and_finishes(data, tmp_path, reference):
    # rank 1 is SIGKILLed at step 5 (epoch 2); torchrun restarts the group, which resumes
    # from the epoch-1 checkpoint and finishes with the same steps and weights
    r = _torchrun(_args(data, tmp_path / "kill"), restarts=1, env={FAULT_ENV: "1:5:kill"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming" in r.stdout
    ckpt, weights = _weights(tmp_path / "kill")
    assert ckpt["step"] == reference[0]["step"] and len(ckpt["metrics"]) == 2
    _same(weights, reference[1])


def test_sigterm_on_one_rank_saves_once_and_resumes(data, tmp_path, reference):
    out = tmp_path / "term"
    r = _torchrun(_args(data, out), env={FAULT_ENV: "1:2:term"})
    assert "resume with: vggnet train --resume" in r.stdout, r.stdout + r.stderr
    ckpt, _ = _weights(out)
    assert ckpt["step"] == 2 and ckpt["epoch"] == 0  # both ranks stopped after the same step
    r = _torchrun(["--resume", str(out), "--no-progress"])
    assert r.returncode == 0, r.stdout + r.stderr
    ckpt, weights = _weights(out)
    assert ckpt["step"] == 6
    _same(weights, reference[1])


def test_nan_on_one_rank_is_skipped_by_all(data, tmp_path):
    # a NaN loss on rank 1 only: both ranks skip step 2; same as one process skipping step 2
    r = _torchrun(_args(data, tmp_path / "ddp", epochs=1), env={FAULT_ENV: "1:2:nan"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step skipped on every process (1/3)" in r.stdout
    os.environ[FAULT_ENV] = "0:2:nan"
    try:
        single = train(make_settings("reduced", data=str(data), out=str(tmp_path / "one"),
                                     **{**TINY, "epochs": 1}))
    finally:
        del os.environ[FAULT_ENV]
    assert single.history[0]["skipped_steps"] == 1
    _same(_weights(tmp_path / "ddp")[1], _weights(tmp_path / "one")[1])


def test_consecutive_nans_halt_and_keep_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "0:4-6:nan")  # every step of epoch 2
    with pytest.raises(FloatingPointError, match="3 consecutive steps had a non-finite loss") as e:
        train(make_settings("reduced", data=str(data), out=str(tmp_path / "run"), **TINY))
    last = tmp_path / "run" / "last.pt"
    assert (f"The last good checkpoint is {last}; lower --lr (now 0.01) or use --batch-norm, "
            "then start again from it with --init-from") in str(e.value)
    ckpt, weights = _weights(tmp_path / "run")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_nans_from_the_first_step_halt_without_naming_a_checkpoint(data, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "0:1-3:nan")  # epoch 1: nothing saved yet
    with pytest.raises(FloatingPointError) as e:
        train(make_settings("reduced", data=str(data), out=str(tmp_path / "run"), batch_norm=True,
                            **TINY))
    assert str(e.value).endswith("training halted. No checkpoint was saved yet; lower --lr (now "
                                 "0.01), then start again"), str(e.value)
    assert not (tmp_path / "run" / "last.pt").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_launch_on_loopback(data, tmp_path, reference):
    endpoint = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "multi"
    nodes = [_torchrun(_args(data, out), nproc=1, wait=False,
                       extra=["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                              "--rdzv-id=test", f"--node-rank={i}"]) for i in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(logs)
    assert any("2 process(es)" in log for log in logs)
    _same(_weights(out)[1], reference[1])


def test_nproc_launcher_and_its_arguments(data, tmp_path, capsys, monkeypatch):
    from vggnet import cli
    from vggnet.distributed import without_launch_options

    argv = ["--data", "d", "--nproc", "2", "--max-restarts=3", "--lr", "1"]
    assert without_launch_options(argv) == ["--data", "d", "--lr", "1"]
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.delenv("RANK", raising=False)
    assert cli.main(["train", "--data", str(data), "--nproc", "2", "--max-restarts", "1"]) == 0
    assert calls[0][1:7] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
                             "--max-restarts=1", "--standalone"]
    assert calls[0][-4:] == ["vggnet", "train", "--data", str(data)]
