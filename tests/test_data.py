import numpy as np
import pytest
import torch

from imagefiles import bad_files, class_tree, good_files, noise_image
from vggnet.cli import main
from vggnet.data import (
    EpochSampler,
    EvalImages,
    TrainImages,
    check_file,
    collate,
    open_dataset,
    scan,
)
from vggnet.synthetic import SyntheticSpec, is_made, make_synthetic, render
from vggnet.transforms import EvalTransform, TrainTransform


def test_class_folders_listing(tmp_path):
    class_tree(tmp_path, ("cat", "dog"), per_class=3)
    class_tree(tmp_path, ("cat", "dog"), per_class=2, split="val")
    (tmp_path / "train" / "dog" / ".DS_Store").write_bytes(b"junk")  # hidden: ignored
    d = open_dataset(tmp_path)
    assert d.class_names == ["cat", "dog"] and d.layout == "class folders"
    assert d.train.counts() == [3, 3] and d.val.counts() == [2, 2]
    assert all(("/dog/" in p) == (c == 1) for p, c in d.train.samples + d.val.samples)


@pytest.mark.parametrize("case,message", [
    ("empty", r"1 empty class folder\(s\) in train folder .*: b; put images in them"),
    ("single", "has a single class \\('a'\\); classification needs at least 2"),
    ("val_missing", "training class\\(es\\) have no validation images \\(c\\)"),
    ("val_extra", "validation folder\\(s\\) are not training classes \\(zebra\\)"),
    ("no_val", "needs train/ and val/ subfolders"),
])
def test_dataset_errors_before_any_work(tmp_path, case, message):
    classes = ("a",) if case == "single" else ("a", "b", "c")
    class_tree(tmp_path, classes, per_class=1)
    if case != "no_val":
        val = {"val_missing": ("a", "b"), "val_extra": ("a", "b", "c", "zebra")}.get(case, classes)
        class_tree(tmp_path, val, per_class=1, split="val")
    if case == "empty":
        for f in (tmp_path / "train" / "b").iterdir():
            f.unlink()
    with pytest.raises(ValueError, match=message):
        open_dataset(tmp_path)


def _flat_val(root, wnids_per_image):
    (root / "val").mkdir(parents=True)
    for i, _ in enumerate(wnids_per_image, start=1):
        noise_image(40, 32, seed=i).save(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")


def test_flat_val_with_loc_csv(tmp_path):
    class_tree(tmp_path, ("n01", "n02", "n03"), per_class=1)
    labels = ["n02", "n01", "n03", "n02"]
    _flat_val(tmp_path, labels)
    rows = [f"ILSVRC2012_val_{i:08d},{w} 1 2 30 20 {w} 3 4 10 10" for i, w in enumerate(labels, 1)]
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n"
                                                   + "\n".join(rows[::-1]) + "\n")
    d = open_dataset(tmp_path)
    assert "LOC_val_solution.csv" in d.layout
    assert [c for _, c in d.val.samples] == [1, 0, 2, 1]  # sorted by file name


def test_flat_val_with_devkit_ground_truth(tmp_path):
    from scipy.io import savemat

    class_tree(tmp_path, ("n01", "n02", "n03"), per_class=1)
    # the devkit numbers classes in its own order, not by sorted wnid: ID 1 is n03 here
    synsets = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    rows = [(1, "n03", 0), (2, "n01", 0), (3, "n02", 0), (4, "n00", 3)]
    for row, (i, w, kids) in enumerate(rows):
        synsets[row] = (i, w, kids)
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    savemat(devkit / "meta.mat", {"synsets": synsets})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("3\n1\n2\n1\n")
    _flat_val(tmp_path, range(4))
    d = open_dataset(tmp_path)
    assert [d.class_names[c] for _, c in d.val.samples] == ["n02", "n03", "n01", "n03"]
    # without meta.mat the IDs cannot be mapped: a clear error, not a silent sorted-wnid guess
    (devkit / "meta.mat").unlink()
    with pytest.raises(FileNotFoundError, match="meta.mat"):
        open_dataset(tmp_path)


def test_flat_val_label_problems(tmp_path):
    class_tree(tmp_path, ("n01", "n02"), per_class=1)
    _flat_val(tmp_path, range(3))
    with pytest.raises(FileNotFoundError, match="give the labels file with --val-labels"):
        open_dataset(tmp_path)
    csv = tmp_path / "labels.csv"
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01 1 1 2 2\n"
                   "ILSVRC2012_val_00000002,n09 1 1 2 2\nILSVRC2012_val_00000003,n02 1 1 2 2\n")
    with pytest.raises(ValueError, match="no training folder: n09"):
        open_dataset(tmp_path, val_labels=csv)
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01 1 1 2 2\n")
    with pytest.raises(ValueError, match="2 file\\(s\\) .* have no label"):
        open_dataset(tmp_path, val_labels=csv)


def test_scan_reports_every_bad_file_and_accepts_every_mode(tmp_path):
    bad = bad_files(tmp_path / "bad")
    good = good_files(tmp_path / "good")
    paths = [str(p) for p in good.values()] + [str(p) for p, _ in bad.values()]
    found = {b.path: b.reason for b in scan(paths, workers=2)}
    assert set(found) == {str(p) for p, _ in bad.values()}
    for name, (p, words) in bad.items():
        assert words in found[str(p)], (name, found[str(p)])
    assert check_file(str(good["deep16.png"])) is None


def test_every_image_mode_trains_and_evaluates(tmp_path):
    good = good_files(tmp_path, w=48, h=40)
    samples = [(str(p), i) for i, p in enumerate(good.values())]
    ds = TrainImages(samples, TrainTransform(scale=(32, 48), crop_size=32), seed=0)
    for i in range(len(samples)):
        img, label, alpha, bad = ds[(0, i)]
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and label == i and not bad
    # EXIF orientation applied: 48x40 stored rotated is 48 wide again
    assert EvalTransform(40, None)(good["exif_rotated.jpg"]).shape == (40, 48, 3)
    gray = EvalTransform(40, 32)(good["gray.png"])
    assert np.array_equal(gray[..., 0], gray[..., 2])


def test_bad_file_mid_epoch_is_replaced_and_reported(tmp_path):
    good = good_files(tmp_path / "g")
    bad = bad_files(tmp_path / "b")
    samples = [(str(good["rgb.jpg"]), 0), (str(bad["truncated.jpg"][0]), 1),
               (str(good["gray.png"]), 2)]
    ds = TrainImages(samples, TrainTransform(scale=(32, 32), crop_size=32), seed=0)
    img, label, _, reported = ds[(0, 1)]
    assert label == 2 and img.shape == (32, 32, 3)  # the next file stands in
    assert len(reported) == 1 and "truncated.jpg: cannot decode" in reported[0]
    ev = EvalImages(samples, EvalTransform(32, 32))
    batch = collate([ev[i] for i in range(3)])
    assert batch.labels.tolist() == [0, -1, 2] and len(batch.bad) == 1


def test_collate_gives_channels_last_uint8():
    items = [(np.full((4, 5, 3), i, np.uint8), i, np.ones(3, np.float32), []) for i in range(2)]
    b = collate(items)
    assert b.images.shape == (2, 3, 4, 5) and b.images.dtype == torch.uint8
    assert b.images.is_contiguous(memory_format=torch.channels_last)
    assert b.alpha.shape == (2, 3) and b.labels.tolist() == [0, 1]


def test_epoch_sampler_same_global_batches_for_any_layout():
    one = list(EpochSampler(50, 8, seed=3, epoch=2))
    assert len(one) == 48 and len({i for _, i in one}) == 48 and all(e == 2 for e, _ in one)
    two = [list(EpochSampler(50, 8, 3, 2, rank=r, world_size=2)) for r in range(2)]
    for step in range(6):  # each global batch is rank 0's share then rank 1's
        shares = two[0][4 * step:4 * step + 4] + two[1][4 * step:4 * step + 4]
        assert one[8 * step:8 * step + 8] == shares
    resumed = list(EpochSampler(50, 8, 3, 2, start_step=4))
    assert resumed == one[32:] and len(EpochSampler(50, 8, 3, 2, start_step=4)) == 16
    assert list(EpochSampler(50, 8, 3, 3)) != one


def test_synthetic_is_deterministic_and_hard(tmp_path):
    spec = SyntheticSpec(seed=5, train_per_class=2, val_per_class=1, num_classes=3, min_side=40,
                         max_side=60)
    a, la, qa = render(spec, "train", 4)
    b, lb, qb = render(spec, "train", 4)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and (la, qa) == (lb, qb) and la == 1
    assert not np.array_equal(np.asarray(render(spec, "val", 4)[0]), np.asarray(a))
    sizes = [render(spec, "train", i)[0].size for i in range(12)]
    assert all(w != h and 40 <= min(w, h) <= 60 for w, h in sizes) and len(set(sizes)) > 6

    assert make_synthetic(tmp_path / "s", spec, workers=1) is True
    d = open_dataset(tmp_path / "s")
    assert d.train.counts() == [2, 2, 2] and d.val.counts() == [1, 1, 1]
    assert d.class_names == sorted(["disc", "ring", "square"])
    first = (tmp_path / "s" / "train" / "ring" / "ring_000001.jpg").read_bytes()
    assert is_made(tmp_path / "s", spec) and make_synthetic(tmp_path / "s", spec) is False  # cached
    assert make_synthetic(tmp_path / "t", spec, workers=2) is True
    assert (tmp_path / "t" / "train" / "ring" / "ring_000001.jpg").read_bytes() == first
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a vggnet synthetic dataset"):
        make_synthetic(tmp_path / "mine", spec)


def test_cli_data_make_and_check(tmp_path, capsys):
    root = tmp_path / "d"
    assert main(["data", "make", str(root), "--train-per-class", "2", "--val-per-class", "1",
                 "--classes", "2", "--min-side", "40", "--max-side", "48", "--workers", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["data", "check", str(root)]) == 0
    assert "all readable" in capsys.readouterr().out
    bad = bad_files(root / "train" / "disc")
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{len(bad)} bad file(s)" in out
    assert "zero.jpg: empty file (0 bytes)" in out and "bomb.png: decompression bomb" in out
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # the classes as every model trained on the data numbers them (sorted folder names)
    assert main(["data", "make", str(tmp_path / "four"), "--train-per-class", "1",
                 "--val-per-class", "1", "--classes", "4", "--min-side", "40", "--max-side",
                 "48", "--workers", "1", "--no-progress"]) == 0
    assert "4 classes, in class-index order: bar, disc, ring, square" in capsys.readouterr().out


def test_a_workers_helper_thread_losing_its_connection_prints_nothing(capsys):
    """A loader worker's resource_sharer thread whose connection the stopping main process
    dropped printed a traceback (CI, group SIGTERM); any other error still prints."""
    import threading

    from vggnet.data import _worker_excepthook

    def hook(kind):
        try:
            raise kind("lost")
        except kind as e:
            _worker_excepthook(type(e), e, e.__traceback__)

    for kind in (EOFError, ConnectionResetError, BrokenPipeError, ValueError):
        t = threading.Thread(target=hook, args=(kind,))
        t.start()
        t.join()
    hook(EOFError)  # in the worker's main thread: not a helper thread's lost connection
    err = capsys.readouterr().err
    assert err.count("Traceback") == 2
    assert "ValueError: lost" in err and "EOFError: lost" in err
    assert "ConnectionResetError" not in err and "BrokenPipeError" not in err


def test_exit_with_a_loader_iterator_alive_does_not_hang():
    """Workers ignore SIGTERM (a group SIGTERM must not kill them mid-run), so at exit
    multiprocessing's terminate-then-join waited forever on a worker whose iterator was
    still alive (a script's next(iter(loader)), a run stopped mid-step)."""
    import subprocess
    import sys

    script = ("import torch\n"
              "from vggnet.data import make_loader\n"
              "ds = [torch.zeros(3) for _ in range(1000)]\n"
              "it = iter(make_loader(ds, batch_size=2, workers=2,\n"
              "                      collate_fn=torch.utils.data.default_collate))\n"
              "print(next(it).shape)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout == "torch.Size([2, 3])\n", p.stderr
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr
