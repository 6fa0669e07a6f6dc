"""Hostile and unlucky files (issue 16): a small file claiming a huge net, corrupted bytes,
empty and foreign files, folders given for files, outputs that cannot be written and disks
that fill up during a save. Faults are real where the machine allows: subprocesses with
measured memory, a file-size rlimit, a 1 MiB tmpfs in a private mount namespace."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vggnet
from vggnet import integrity, preprocess
from vggnet.checkpoint import WriteError, atomic_save, check_writable_output, load_checkpoint
from vggnet.cli import main
from vggnet.features import save_features
from vggnet.weights import load_model, read_file, save_weights

SRC = str(Path(vggnet.__file__).resolve().parents[1])


def _net(**kw):
    return vggnet.create_model("C", num_classes=4, width=0.0625, crop_size=32, seed=0, **kw).eval()


def _checkpoint(model) -> dict:
    return {"model_config": model.config.to_dict(), "model": model.state_dict(),
            "preprocessing": preprocess.CAFFE.to_dict(), "class_names": None, "epoch": 3,
            "best_top1_err": 12.5}


def _run(code: str, *args: str, timeout: float = 120, prefix: list[str] | None = None):
    """Run ``code`` in a fresh Python (the package importable) and return the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run([*(prefix or []), sys.executable, "-c", textwrap.dedent(code), *args],
                           capture_output=True, text=True, timeout=timeout, env=env)


def _edit_metadata(src: Path, dst: Path, **config_changes) -> Path:
    """A copy of weights file ``src`` whose metadata claims another config (tensors unchanged)."""
    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()["vggnet"])
    meta["model_config"].update(config_changes)
    save_file(load_file(str(src)), str(dst), metadata={"vggnet": json.dumps(meta)})
    return dst


# --- item 1: what a file claims is checked against its tensors before anything is built -------
MEASURE = """
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # before the fix: fail, not swap
    from vggnet.bench import peak_rss_mib  # VmHWM: ru_maxrss would carry the forking parent's peak
    from vggnet.weights import load_model
    t = time.perf_counter()
    try:
        load_model(sys.argv[1])
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    print(json.dumps({"error": error, "seconds": time.perf_counter() - t,
                      "peak_rss_mib": peak_rss_mib()}))
"""


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_a_small_file_claiming_a_huge_net_is_refused_in_bounded_memory(tmp_path, kind):
    """The issue's case: a VGG file whose metadata claims width 64 (tensors unchanged). Built,
    VGG D at width 64 would take about 240 GB (60 G parameters); refused in well under 1 GiB,
    with the file, the claim and the first mismatch named."""
    m = vggnet.create_model("D", num_classes=10, width=0.0625, crop_size=64, seed=0)
    good = save_weights(tmp_path / "good.safetensors", m, preprocess.CAFFE)
    if kind == "safetensors":
        bad = _edit_metadata(good, tmp_path / "claims64.safetensors", width=64)
    else:
        ckpt = _checkpoint(m)
        ckpt["model_config"]["width"] = 64
        bad = atomic_save(ckpt, tmp_path / "claims64.pt")
    r = _run(MEASURE, str(bad))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["error"] is not None and out["error"].startswith("ValueError: "), out
    assert str(bad) in out["error"] and "width 64" in out["error"]
    assert ("features.conv1_1.weight has shape [4, 3, 3, 3] in the file and [4096, 3, 3, 3]"
            in out["error"])
    assert "\n" not in out["error"]
    assert out["peak_rss_mib"] < 1024 and out["seconds"] < 10, out
    print(f"refused in {out['seconds'] * 1000:.0f} ms, peak RSS {out['peak_rss_mib']:.0f} MiB")


def test_impossible_claims_are_refused_before_any_arithmetic(tmp_path):
    good = save_weights(tmp_path / "good.safetensors", _net(), preprocess.CAFFE)
    for change, words in [({"width": 1e300}, "width must be a number <= 64"),
                          ({"width": "wide"}, "width must be a number"),
                          ({"num_classes": 10**12}, "num_classes must be a number <= 1e+06"),
                          ({"crop_size": 10**9}, "crop_size must be a number <= 8192"),
                          ({"in_channels": 3000}, "in_channels must be a number <= 1024"),
                          ({"arch": ["D"]}, "impossible model config"),
                          ({"num_classes": 5},
                           "classifier.fc8.weight has shape [4, 256] in the file")]:
        bad = _edit_metadata(good, tmp_path / "bad.safetensors", **change)
        with pytest.raises(ValueError, match="bad.safetensors") as e:
            load_model(bad)
        assert words in str(e.value), (change, str(e.value))


def test_every_command_goes_through_the_check(tmp_path, data, capsys):
    good = save_weights(tmp_path / "good.safetensors", _net(), preprocess.CAFFE)
    bad = str(_edit_metadata(good, tmp_path / "claims.safetensors", width=64))
    image = str(next(p for p in (Path(data) / "val").rglob("*") if p.is_file()))
    commands = [["predict", image, "--weights", bad],
                ["features", image, "--weights", bad, "--out", str(tmp_path / "f.npz")],
                ["probe", "--weights", bad, "--data", str(data)],
                ["export", "--weights", bad, "--out", str(tmp_path / "m.onnx")],
                ["evaluate", bad, "--data", str(data), "--out", str(tmp_path / "ev")],
                ["convert", bad, str(tmp_path / "c.safetensors")]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "claims.safetensors' holds tensors that do not fit the VGG C (width 64" in err, argv
        assert err.count("\n") == 1, err
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "f.npz").exists()


def test_read_file_checks_the_claim_for_init_from(tmp_path):
    """read_file (used by --init-from) refuses the same files, before returning any tensor."""
    good = save_weights(tmp_path / "good.safetensors", _net(), preprocess.CAFFE)
    with pytest.raises(ValueError, match="do not fit the VGG C"):
        read_file(_edit_metadata(good, tmp_path / "claims.safetensors", crop_size=64))


def test_a_zip_that_would_inflate_is_refused(tmp_path):
    """torch.load inflates deflated zip entries (torch.save never writes them): 17 kB -> 16 MB."""
    plain = tmp_path / "plain.pt"
    torch.save({"x": torch.zeros(1 << 20)}, plain)
    with zipfile.ZipFile(plain) as src, \
            zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(ValueError, match=r"would expand from [\d,]+ to 4,19\d,\d{3} bytes"):
        load_checkpoint(tmp_path / "deflated.pt")
    assert load_checkpoint(plain)["x"].shape == (1 << 20,)


# --- item 4: checksums --------------------------------------------------------------------------
def _flip(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(b ^ 0xFF for b in data[offset:offset + n])
    path.write_bytes(bytes(data))


def _entry(path: Path, pick) -> tuple[int, zipfile.ZipInfo]:
    """(offset of its bytes in the file, info) of the entry ``pick(infos)`` of a torch.save zip
    (stored uncompressed, so the bytes are the entry's content)."""
    with zipfile.ZipFile(path) as z:
        info = pick(z.infolist())
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)  # the local header: name and extra-field lengths at 26 and 28
    return info.header_offset + 30 + int.from_bytes(head[26:28], "little") + \
        int.from_bytes(head[28:30], "little"), info


def test_flipped_bytes_in_a_checkpoint_are_refused(tmp_path):
    m = _net()
    best = atomic_save(_checkpoint(m), tmp_path / "best.pt")
    last = atomic_save(_checkpoint(m), tmp_path / "last.pt")
    assert load_checkpoint(last)["epoch"] == 3 and "checksum" not in load_checkpoint(last)
    torch.testing.assert_close(load_model(last).model(torch.ones(1, 3, 32, 32)),
                               m(torch.ones(1, 3, 32, 32)))
    offset, info = _entry(last, lambda infos: max(infos, key=lambda i: i.file_size))
    _flip(last, offset + info.file_size // 2)
    for load in (load_checkpoint, load_model):
        with pytest.raises(integrity.CorruptFileError) as e:
            load(last)
        msg = str(e.value)
        assert f"{str(last)!r} is corrupt" in msg and "checksum" in msg
        assert f"--resume {best}" in msg and "\n" not in msg
    assert load_checkpoint(best)["epoch"] == 3  # its sibling is untouched and loads


def test_flipped_bytes_in_a_weights_file_are_refused(tmp_path):
    m = _net()
    p = save_weights(tmp_path / "w.safetensors", m, preprocess.CAFFE)
    load_model(p)
    header = int.from_bytes(p.read_bytes()[:8], "little")
    _flip(p, 8 + header + (p.stat().st_size - 8 - header) // 2)
    with pytest.raises(integrity.CorruptFileError,
                       match=r"w.safetensors' is corrupt: .*restore it from a copy"):
        load_model(p)


def test_a_changed_number_outside_the_tensors_is_caught(tmp_path):
    """The checksum covers everything in a checkpoint, not only tensors: here the best error
    stored as a pickled float, rewritten in place with the same length."""
    p = atomic_save(_checkpoint(_net()), tmp_path / "last.pt")
    at, pkl = _entry(p, lambda infos: next(i for i in infos if i.filename.endswith("data.pkl")))
    data = bytearray(p.read_bytes())
    start = at + data[at:at + pkl.file_size].index(b"G" + np.float64(12.5).byteswap().tobytes())
    data[start + 1:start + 9] = np.float64(2.5).byteswap().tobytes()  # BINFLOAT is big-endian
    p.write_bytes(bytes(data))
    assert torch.load(p, weights_only=True)["best_top1_err"] == 2.5  # torch reads it happily
    with pytest.raises(integrity.CorruptFileError):
        load_checkpoint(p)


def test_files_without_a_checksum_load_with_one_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(integrity, "_noted", False)
    m = _net()
    old_pt = atomic_save(_checkpoint(m), tmp_path / "old.pt", checksum=False)
    new = save_weights(tmp_path / "new.safetensors", m, preprocess.CAFFE)
    with safe_open(str(new), "pt") as f:
        meta = json.loads(f.metadata()["vggnet"])
    del meta["checksum"]
    old_st = tmp_path / "old.safetensors"
    save_file(load_file(str(new)), str(old_st), metadata={"vggnet": json.dumps(meta)})
    for p in (old_pt, old_st, old_pt):
        assert load_model(p).model.config == m.config
    err = capsys.readouterr().err
    assert err.count("written without a checksum") == 1 and "old.pt" in err


def test_digest_is_the_same_after_a_round_trip_and_differs_on_any_change():
    obj = {"a": torch.arange(6.0).view(2, 3).t(), "b": [1, 2.5, "x", None, True],
           3: (torch.zeros(0),)}
    d = integrity.content_digest(obj)
    assert d == integrity.content_digest({3: [torch.zeros(0)], "b": [1, 2.5, "x", None, True],
                                          "a": torch.tensor([[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]])})
    for changed in ({**obj, "b": [1, 2.5, "x", None, 1]}, {**obj, "a": obj["a"].double()},
                    {**obj, "a": obj["a"].reshape(3, 2).contiguous().view(2, 3)},
                    {**obj, "b": [1, 2.5, "x", None]}):
        assert integrity.content_digest(changed) != d


# --- item 9: empty, foreign and folder inputs ---------------------------------------------------
def test_empty_text_and_folder_inputs_get_one_line_errors(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    atomic_save(_checkpoint(_net()), run / "best.pt")
    (run / "last.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"last.pt' is empty \(0 bytes\).*--resume .*best.pt"):
        load_checkpoint(run / "last.pt")
    (run / "last.pt").write_text("epoch 12 went fine\n")
    with pytest.raises(ValueError,
                       match=r"last.pt' is not a PyTorch checkpoint \(it begins b'epoch 12"):
        load_checkpoint(run / "last.pt")
    with pytest.raises(ValueError,
                       match=r"run' is a folder, not a file \(it holds best.pt, last.pt\)"):
        load_model(run)
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(image)
    for argv, words in [(["predict", str(image), "--weights", str(run)], "is a folder, not a file"),
                        (["predict", str(image), "--weights", str(run / "last.pt")],
                         "last.pt' is neither a vggnet weights file nor a checkpoint (it begins "
                         "b'epoch"),
                        (["convert", str(run), str(tmp_path / "o.safetensors")],
                         "is a folder, not a file")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


# --- item 6 and 12: outputs checked before the work --------------------------------------------
def test_outputs_are_checked_before_the_work(tmp_path, capsys):
    src = tmp_path / "w.safetensors"
    save_weights(src, _net(), preprocess.CAFFE)
    (tmp_path / "folder").mkdir()
    for out, words in [(tmp_path / "folder", "is a folder; give a file name, e.g."),
                       (tmp_path / "missing" / "o.safetensors", "does not exist; create it first"),
                       (tmp_path / "o.pt", "must end in .safetensors"),
                       (src / "o.safetensors", "is a file, not a folder")]:
        assert main(["convert", str(src), str(out)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    with pytest.raises(ValueError,
                       match=r"features output .*f.txt' must end in .npz or .safetensors"):
        save_features(tmp_path / "f.txt", {"x": torch.zeros(2)}, {})
    for name in ("f.npz", "f.safetensors"):
        save_features(tmp_path / name, {"x": torch.ones(2)}, {"k": 1})
    assert np.load(tmp_path / "f.npz")["x"].tolist() == [1.0, 1.0]
    assert load_file(str(tmp_path / "f.safetensors"))["x"].tolist() == [1.0, 1.0]


def _namespace_prefix(tmp_path: Path) -> list[str]:
    """`unshare` into a private user and mount namespace (where a tmpfs can be mounted without
    privileges on the host), or skip where the machine does not allow it."""
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                       capture_output=True) if shutil.which("unshare") else None
    probe.rmdir()
    if r is None or r.returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm); the rlimit test still runs")
    return ["unshare", "-rm"]


def _in_namespace(tmp_path: Path, mounts: str, code: str):
    r = subprocess.run([*_namespace_prefix(tmp_path), "sh", "-c",
                        f"{mounts} && exec {sys.executable} -c \"$0\"", textwrap.dedent(code)],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=SRC))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_read_only_outputs_are_refused(tmp_path):
    """A read-only folder (a tmpfs remounted ro) and a read-only file in a writable folder
    (a read-only bind mount of it): real EROFS, which holds for root too."""
    ro, old = tmp_path / "ro", tmp_path / "old.npz"
    ro.mkdir()
    old.write_bytes(b"")
    out = _in_namespace(tmp_path, f"mount -t tmpfs tmpfs {ro} && mount -o remount,ro {ro} && "
                        f"mount --bind {old} {old} && mount -o remount,bind,ro {old}", f"""
        from vggnet.checkpoint import check_output_folder, check_writable_output
        for path in ("{ro}/new.npz", "{old}"):
            try:
                check_writable_output(path, "features", (".npz",))
            except PermissionError as e:
                print(e)
        try:
            check_output_folder("{ro}/a/b", "evaluation")
        except PermissionError as e:
            print(e)
        """)
    assert f"cannot write features output '{ro}/new.npz': the folder '{ro}' is read-only" in out
    assert f"features output '{old}' exists and is read-only; remove it or choose another" in out
    assert f"cannot write evaluation folder '{ro}/a/b': the folder '{ro}' is read-only" in out


SAVE_ON_A_SMALL_DISK = """
    import sys, torch
    from vggnet.checkpoint import WriteError, atomic_save, load_checkpoint
    disk = sys.argv[1]
    atomic_save({{"w": torch.ones(1000)}}, disk + "/last.pt")  # the earlier, good checkpoint
    {setup}
    try:
        atomic_save({{"w": torch.zeros(1 << 20)}}, disk + "/last.pt")  # 4 MiB: does not fit
    except WriteError as e:
        print("ERROR", e.errno, e)
    import os
    print("FILES", sorted(os.listdir(disk)))
    print("KEPT", bool((load_checkpoint(disk + "/last.pt")["w"] == 1).all()))
"""


def _check_failed_save(out: str, reason: str) -> None:
    error = next(line for line in out.splitlines() if line.startswith("ERROR"))
    assert reason in error and "last.pt" in error
    assert ("nothing was replaced (the existing last.pt is unchanged, and every earlier file is "
            "intact)") in error
    assert "FILES ['last.pt']" in out  # no temporary file left behind
    assert "KEPT True" in out


def test_a_full_disk_during_a_save_replaces_nothing(tmp_path):
    """A real ENOSPC: a 1 MiB tmpfs, a 4 MiB checkpoint."""
    disk = tmp_path / "disk"
    disk.mkdir()
    code = SAVE_ON_A_SMALL_DISK.format(setup="").replace("sys.argv[1]", repr(str(disk)))
    out = _in_namespace(tmp_path, f"mount -t tmpfs -o size=1m tmpfs {disk}", code)
    _check_failed_save(out, "No space left on device")
    assert " MiB free there" in out


def test_a_file_size_limit_during_a_save_replaces_nothing(tmp_path):
    """A real EFBIG, on any Linux: RLIMIT_FSIZE (SIGXFSZ ignored, so the write fails)."""
    code = SAVE_ON_A_SMALL_DISK.format(setup=(
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))"))
    r = _run(code, str(tmp_path))
    assert r.returncode == 0, r.stderr
    _check_failed_save(r.stdout, "File too large")


def test_convert_onto_a_full_disk_keeps_the_earlier_file(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    big = vggnet.create_model("A", num_classes=10, width=0.25, crop_size=32, seed=0)  # 4.5 MB
    src = save_weights(tmp_path / "big.safetensors", big, preprocess.CAFFE)
    out = _in_namespace(tmp_path, f"mount -t tmpfs -o size=1m tmpfs {disk}", f"""
        import vggnet
        from vggnet import preprocess
        from vggnet.checkpoint import WriteError
        from vggnet.convert import convert
        from vggnet.weights import load_model, save_weights
        small = vggnet.create_model("A", num_classes=4, width=1 / 16, crop_size=32, seed=1)
        save_weights("{disk}/out.safetensors", small, preprocess.CAFFE)
        try:
            convert("{src}", "{disk}/out.safetensors")
        except WriteError as e:
            print("ERROR", e)
        print("KEPT", load_model("{disk}/out.safetensors").model.config.width)
        """)
    assert "No space left on device" in out and "the existing out.safetensors is unchanged" in out
    assert "KEPT 0.0625" in out


def test_write_error_is_not_raised_for_other_failures(tmp_path):
    def broken(f):
        raise KeyError("a bug, not a disk")

    with pytest.raises(KeyError):
        from vggnet.checkpoint import atomic_write

        atomic_write(tmp_path / "x", broken)
    assert list(tmp_path.iterdir()) == []
    assert issubclass(WriteError, OSError)
    check_writable_output(tmp_path / "fine.npz", "features", (".npz",))


def test_temporaries_of_a_write_killed_midway_are_found_and_removed(tmp_path):
    """A real SIGKILL in the middle of atomic_write: the target keeps its old content, the
    temporary stays behind, and remove_temporaries (for the next start, under the lock)
    deletes it and nothing else."""
    from vggnet.checkpoint import remove_temporaries

    (tmp_path / "last.pt").write_bytes(b"old")
    (tmp_path / ".hidden.tmp").write_bytes(b"not ours")  # no mkstemp part: kept
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from vggnet.checkpoint import atomic_write

        def slow(f):
            f.write(b"x" * 100_000)
            f.flush()
            print("writing", flush=True)
            time.sleep(600)

        atomic_write(sys.argv[1], slow)
        """), str(tmp_path / "last.pt")], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=SRC))
    assert p.stdout.readline().strip() == "writing"
    p.kill()
    p.wait(timeout=60)
    left = [f for f in tmp_path.iterdir() if f.name.startswith(".last.pt.")]
    assert len(left) == 1 and left[0].stat().st_size == 100_000
    assert (tmp_path / "last.pt").read_bytes() == b"old"
    assert remove_temporaries(tmp_path) == left
    assert sorted(f.name for f in tmp_path.iterdir()) == [".hidden.tmp", "last.pt"]


def test_output_folders_are_checked_without_creating_anything(tmp_path):
    from vggnet.checkpoint import check_output_folder

    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError,
                       match=r"evaluation folder .*file' is a file; give a folder"):
        check_output_folder(tmp_path / "file", "evaluation")
    with pytest.raises(NotADirectoryError, match=r"file' is a file, not a folder"):
        check_output_folder(tmp_path / "file" / "sub", "evaluation")
    deeper = tmp_path / "new" / "deeper"
    assert check_output_folder(deeper, "evaluation") == deeper
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checksum_of_gpu_tensors_holds_wherever_they_are_loaded(tmp_path):
    obj = {"w": torch.randn(1000, device="cuda").bfloat16(), "n": 3}
    p = atomic_save(obj, tmp_path / "g.pt")
    assert load_checkpoint(p)["w"].device.type == "cpu"
    assert torch.equal(load_checkpoint(p, map_location="cuda")["w"], obj["w"])


def test_foreign_torch_files_get_no_checksum_note(tmp_path, monkeypatch, capsys):
    """A torchvision state dict never has a vggnet checksum: no note about an 'older vggnet'."""
    from vggnet.convert import import_weights

    monkeypatch.setattr(integrity, "_noted", False)
    net = _net()
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    fcs = [net.classifier.fc6, net.classifier.fc7, net.classifier.fc8]
    state = {}
    for i, m in enumerate(convs):
        state |= {f"features.{2 * i}.weight": m.weight, f"features.{2 * i}.bias": m.bias}
    for i, m in zip((0, 3, 6), fcs, strict=True):
        state |= {f"classifier.{i}.weight": m.weight, f"classifier.{i}.bias": m.bias}
    torch.save({k: v.detach() for k, v in state.items()}, tmp_path / "tv.pth")
    import_weights(tmp_path / "tv.pth", model="C")
    assert "checksum" not in capsys.readouterr().err
