import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import vggnet
from vggnet import evaluate as ev
from vggnet import preprocess
from vggnet.protocol import default_test_scales
from vggnet.runtime import make_runtime
from vggnet.settings import EvalSettings
from vggnet.weights import load_model, save_weights

CPU = make_runtime("cpu", "fp32")
CLASSES = [f"c{i}" for i in range(7)]


@pytest.fixture(autouse=True)
def _one_thread():
    # these nets are tiny: on a shared 2-core machine, threads only wait on each other
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(arch="A", seed=0, classes=7, crop=32):
    return vggnet.create_model(arch, num_classes=classes, width=0.0625, crop_size=crop,
                               seed=seed).eval()


def _weights(tmp_path, name="a", arch="A", seed=0, classes=CLASSES, crop=32):
    m = _net(arch, seed, len(classes), crop)
    return save_weights(tmp_path / f"{name}.safetensors", m,
                        preprocess.paper((120.0, 110.0, 100.0)), list(classes))


def _images(tmp_path, sizes, seed=0, fmt="png"):
    """Random-texture images with (w, h) sizes; labels cycle through the classes."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (w, h) in enumerate(sizes):
        small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
        p = tmp_path / f"img{i}.{fmt}"
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(p)
        out.append((str(p), i % len(CLASSES)))
    return out


def _predict(models, paths, scales, passes, **kw):
    kw.setdefault("workers", 0)
    return ev.compute_posteriors(models, paths, [scales] * len(models), passes, runtime=CPU, **kw)


# --- the pieces -----------------------------------------------------------------------------
def test_crop_grid_covers_corners_and_centre_inside_the_image():
    h, w, c = 45, 70, 32
    cells = ev.crop_grid(h, w, c, 5)
    assert len(cells) == 25 and len(set(cells)) == 25
    for t, left in cells:
        assert 0 <= t and t + c <= h and 0 <= left and left + c <= w
    assert {(0, 0), (0, w - c), (h - c, 0), (h - c, w - c)} <= set(cells)
    centre = ((h - c) // 2, (w - c) // 2)
    assert centre in cells and ev.crop_grid(h, w, c, 1) == [centre]
    tops = sorted({t for t, _ in cells})
    assert tops == [0, 3, 6, 9, 13]  # regular steps of (45-32)/4
    with pytest.raises(ValueError, match="32x32 crop does not fit in a 31x70 image"):
        ev.crop_grid(31, 70, 32, 5)


def test_default_scales_follow_the_paper():
    assert default_test_scales({"scale": [256, 256]}, 224) == (256,)
    assert default_test_scales({"scale": [256, 256]}, 224, multi_scale=True) == (224, 256, 288)
    assert default_test_scales({"scale": [384, 384]}, 224, multi_scale=True) == (352, 384, 416)
    assert default_test_scales({"scale": [256, 512]}, 224) == (384,)
    assert default_test_scales({"scale": [256, 512]}, 224, multi_scale=True) == (256, 384, 512)
    # reduced preset: crop 64, S = 73 (256 * 64/224), step 32 * 64/224 = 9
    assert default_test_scales({"scale": [73, 73]}, 64, multi_scale=True) == (64, 73, 82)
    assert default_test_scales(None, 224) == (256,)  # imported weights: the usual 256 for 224


def test_topk_hand_computed_with_ties():
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1],   # label 0: clear winner
                      [0.3, 0.3, 0.2, 0.2],   # label 1: tied for first -> counts as wrong at k=1
                      [0.4, 0.3, 0.2, 0.1],   # label 2: third -> wrong at 1 and 2, right at 3
                      [0.25, 0.25, 0.25, 0.25],  # label 3: all tied: right only at k=4
                      [0.1, 0.2, 0.3, 0.4]])  # label 0: last
    y = torch.tensor([0, 1, 2, 3, 0])
    assert ev.topk_correct(p, y, 1).tolist() == [True, False, False, False, False]
    assert ev.topk_correct(p, y, 2).tolist() == [True, True, False, False, False]
    assert ev.topk_correct(p, y, 3).tolist() == [True, True, True, False, False]
    assert ev.topk_correct(p, y, 4).tolist() == [True, True, True, True, True]
    s = ev.scores(p, y, ["a", "b", "c", "d"])
    assert s["top1_err"] == pytest.approx(80.0) and s["top5_err"] == 0.0
    assert [c["top1_acc"] for c in s["per_class"]] == [50.0, 0.0, 0.0, 0.0]
    assert s["confusion"][0] == [1, 0, 0, 1]  # argmax: the lowest index among tied maxima
    assert s["confusion"][1] == [1, 0, 0, 0]


def test_size_buckets_bound_memory_and_emit_everything_once():
    b = ev.SizeBuckets(batch_size=3, budget=3 * 10 * 15)
    emitted, sizes = [], [(10, 15), (10, 20), (10, 15), (10, 60), (10, 15), (10, 20), (10, 13)] * 5
    for i, (h, w) in enumerate(sizes):
        for batch in b.add(i, torch.zeros(h, w, 3, dtype=torch.uint8)):
            assert len({tuple(im.shape) for _, im in batch}) == 1  # one size per batch
            assert len(batch) <= 3
            emitted.append([i for i, _ in batch])
        assert b.pending <= 4 * b.budget
    emitted += [[i for i, _ in batch] for batch in b.drain()]
    assert sorted(i for batch in emitted for i in batch) == list(range(len(sizes)))
    assert [len(x) for x in emitted if sizes[x[0]] == (10, 60)] == [1] * 5  # 600 px >= budget


# --- the protocol ---------------------------------------------------------------------------
@pytest.mark.cpu_sensitive
def test_dense_at_crop_size_equals_center_crop(tmp_path):
    samples = _images(tmp_path, [(40, 40), (64, 64), (33, 33), (100, 100)])
    m = load_model(_weights(tmp_path))
    pred = _predict([m], [p for p, _ in samples], (32,), ("dense", "center"))
    torch.testing.assert_close(pred.posteriors[(0, "dense")], pred.posteriors[(0, "center")])
    # and it is really the model's centre-crop posterior: compare with a direct forward
    img = torch.from_numpy(np.array(Image.open(samples[1][0]).resize((32, 32), Image.BILINEAR)))
    x = m.preprocessing.normalize(img.permute(2, 0, 1)[None].contiguous())
    with torch.no_grad():
        direct = (m.model(x).softmax(1) + m.model(x.flip(-1)).softmax(1)) / 2
    torch.testing.assert_close(pred.posteriors[(0, "center")][1:2], direct)


def test_flips_are_averaged(tmp_path):
    # square 40px images at Q=40 with 32 crops: grid steps of 2 px, symmetric under mirroring
    sizes = [(40, 40), (40, 40), (60, 40), (40, 52)]
    samples = _images(tmp_path, sizes)
    mirrored = []
    for p, _ in samples:
        q = p.replace(".png", "_m.png")
        Image.open(p).transpose(Image.FLIP_LEFT_RIGHT).save(q)
        mirrored.append(q)
    m = load_model(_weights(tmp_path))
    paths = [p for p, _ in samples]
    both = _predict([m], paths, (40,), ("dense", "multicrop"), flip=True)
    orig = _predict([m], paths, (40,), ("dense", "multicrop"), flip=False)
    mirr = _predict([m], mirrored, (40,), ("dense", "multicrop"), flip=False)
    for p in ("dense", "multicrop"):
        rows = slice(None) if p == "dense" else slice(0, 2)  # the grid is symmetric for squares
        avg = (orig.posteriors[(0, p)] + mirr.posteriors[(0, p)]) / 2
        torch.testing.assert_close(both.posteriors[(0, p)][rows], avg[rows])
        assert not torch.allclose(orig.posteriors[(0, p)], mirr.posteriors[(0, p)])


def test_ensemble_averages_posteriors_not_logits(tmp_path):
    samples = _images(tmp_path, [(48, 40), (40, 40), (70, 44)])
    paths = [p for p, _ in samples]
    a, b = load_model(_weights(tmp_path, "a", "A", 0)), load_model(_weights(tmp_path, "b", "B", 1))
    # make the nets confident enough that averaging logits and posteriors differ
    for m in (a, b):
        m.model.classifier.fc8.weight.data *= 20
    both = _predict([a, b], paths, (40,), ("center",))
    alone = [_predict([m], paths, (40,), ("center",)).posteriors[(0, "center")] for m in (a, b)]
    for i in range(2):
        torch.testing.assert_close(both.posteriors[(i, "center")], alone[i])
    ens = ev.combine(both, [0, 1], ["center"])
    torch.testing.assert_close(ens, (alone[0] + alone[1]) / 2)
    # the mean of log-posteriors (i.e. logits up to a constant) is a different thing
    via_logits = ((alone[0].log() + alone[1].log()) / 2).softmax(1)
    assert (ens - via_logits).abs().max() > 1e-3


def test_same_results_across_batch_sizes_and_workers(tmp_path):
    sizes = [(40, 40), (60, 40), (40, 75), (60, 40), (50, 50), (90, 36), (40, 40), (45, 60),
             (60, 40)]
    samples = _images(tmp_path, sizes, fmt="jpg")
    paths = [p for p, _ in samples]
    m = load_model(_weights(tmp_path, arch="C"))
    ref = _predict([m], paths, (32, 40), ("dense", "multicrop"), batch_size=2, workers=0)
    other = _predict([m], paths, (32, 40), ("dense", "multicrop"), batch_size=4, workers=2)
    assert ref.kept == other.kept == list(range(len(paths)))
    for key in ref.posteriors:
        torch.testing.assert_close(ref.posteriors[key], other.posteriors[key], rtol=1e-5, atol=1e-6)
        assert ref.posteriors[key].sum(1).sub(1).abs().max() < 1e-5


def test_unreadable_images_are_skipped_and_reported(tmp_path):
    samples = _images(tmp_path, [(40, 40), (50, 40), (40, 40)])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    samples[1:1] = [(str(tmp_path / "empty.jpg"), 1), (str(tmp_path / "junk.jpg"), 2)]
    w = _weights(tmp_path)
    rep = ev.evaluate([w], samples, CLASSES, EvalSettings(method="center", scales=(32,), workers=0),
                      device="cpu", precision="fp32")
    assert rep.metrics["images"] == 3
    assert [(p.split("/")[-1], r) for p, r in rep.skipped] == [
        ("empty.jpg", "empty file (0 bytes)"), ("junk.jpg", "not an image Pillow can identify")]


def test_evaluate_writes_json_csv_png_and_checks_classes(tmp_path):
    samples = _images(tmp_path, [(40, 40), (50, 40), (40, 64), (44, 40), (40, 40), (40, 40),
                                 (70, 40)])
    wa, wb = _weights(tmp_path, "a", "A", 0), _weights(tmp_path, "b", "E", 1)
    rep = ev.evaluate([wa, wb], samples, CLASSES,
                      EvalSettings(method="dense+multicrop", scales=(32, 40), grid=3, workers=0),
                      device="cpu", precision="fp32")
    assert rep.metrics["images"] == 7 and len(rep.parts) == 4
    files = ev.write_report(rep, tmp_path / "out")
    data = json.loads(open(files["json"]).read())
    assert data["top1_err"] == round(rep.metrics["top1_err"], 4)
    assert data["scales"] == [[32, 40], [32, 40]]
    assert data["images_per_s"] > 0 and len(data["confusion"]) == 7
    rows = list(csv.DictReader(open(files["csv"])))
    assert [r["class"] for r in rows] == CLASSES + ["(all)"]
    assert open(files["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = ev.format_report(rep)
    assert "ensemble of 2" in text and "top-1 error" in text and "c6" in text
    # bad input: what differs is named
    wc = _weights(tmp_path, "c", classes=CLASSES[:6])
    with pytest.raises(ValueError, match="disagree on the number of classes: "
                       ".*a.safetensors has 7, .*c.safetensors has 6"):
        ev.evaluate([wa, wc], samples, CLASSES, device="cpu")
    wd = _weights(tmp_path, "d", classes=CLASSES[:6] + ["zebra"])
    with pytest.raises(ValueError, match=r"different class names.*only in the first: "
                       r"\['c6'\].*only in the second: \['zebra'\]"):
        ev.evaluate([wa, wd], samples, CLASSES, device="cpu")
    with pytest.raises(ValueError, match=r"the dataset's class\(es\) \['c6'\] are not among the "
                       r"7 classes of .*d.safetensors; evaluate on classes the model knows"):
        ev.evaluate([wd], samples, CLASSES, device="cpu")
    with pytest.raises(ValueError, match="test scale 20 is smaller than the crop size 32"):
        ev.evaluate([wa], samples, CLASSES, EvalSettings(scales=(20, 40)), device="cpu")


def test_cli_evaluates_a_dataset_and_reports_bad_files(tmp_path, capsys):
    from imagefiles import bad_files, class_tree, good_files
    from vggnet.checkpoint import atomic_save
    from vggnet.cli import main

    root = tmp_path / "data"
    for split in ("train", "val"):
        class_tree(root, classes=("a", "b", "c"), per_class=2, split=split)
    good = good_files(root / "val" / "a" / "modes")
    bad = bad_files(root / "val" / "b")
    m = _net("B", classes=3)
    ckpt = tmp_path / "run" / "last.pt"
    atomic_save({"format": "vggnet.checkpoint/1", "model_config": m.config.to_dict(),
                 "model": m.state_dict(),
                 "preprocessing": preprocess.paper((120.0, 110.0, 100.0)).to_dict(),
                 "class_names": ["a", "b", "c"],
                 "train_settings": {"scale": [36, 36], "crop_size": 32}}, ckpt)
    out = tmp_path / "eval"
    assert main(["evaluate", str(ckpt), "--data", str(root), "--method", "multicrop",
                 "--multi-scale", "--grid", "3", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert re.search(r"evaluating: .*\d+/\d+ \[\d\d:\d\d<", captured.err)  # a bar with ETA
    assert "scales: 32,36,41" in text and f"({len(bad)} unreadable, skipped)" in text
    data = json.loads((out / "results.json").read_text())
    assert data["images"] == 6 + len(good) and data["scales"] == [[32, 36, 41]]
    reasons = {p.split("/")[-1]: r for p, r in ((s["path"], s["reason"]) for s in data["skipped"])}
    assert set(reasons) == set(bad)
    for name, (_, words) in bad.items():
        assert words in reasons[name], (name, reasons[name])
    # a checkpoint trained on other classes: the difference is named, exit code 2
    atomic_save({"model_config": m.config.to_dict(), "model": m.state_dict(),
                 "class_names": ["a", "b", "zebra"]}, tmp_path / "other.pt")
    assert main(["evaluate", str(tmp_path / "other.pt"), "--data", str(root)]) == 2
    err = capsys.readouterr().err
    assert "vggnet evaluate: error: the dataset's class(es) ['c'] are not among the 3" in err


def test_a_dataset_with_some_of_the_model_classes_is_scored_over_all_of_them(tmp_path):
    """An ImageNet subset, say: evaluated on its classes, scored over all the model's, and
    said so; per-class rows and the confusion matrix for its classes, plus "another class"."""
    samples = [(p, label) for p, label in _images(tmp_path, [(40, 40)] * 12)]
    subset = ["c4", "c1"]  # the dataset's classes (its own order), model indices 4 and 1
    samples = [(p, i % 2) for i, (p, _) in enumerate(samples)]
    said = []
    rep = ev.evaluate([_weights(tmp_path)], samples, subset, EvalSettings(method="center",
                      scales=(32,), flip=False, workers=0), device="cpu", precision="fp32",
                      say=said.append)
    assert rep.subset == [1, 4]
    assert said == [ev.subset_note(CLASSES, [1, 4])] and "2 of the model's 7 classes" in said[0]
    assert "scored over all 7" in ev.format_report(rep)
    post, labels = rep.posteriors.posteriors[(0, "center")], rep.labels
    assert labels.tolist() == [4, 1] * 6  # the model's indices of the dataset's classes
    wrong = int((post.argmax(1) != labels).sum())  # over all 7 outputs
    assert rep.metrics["top1_err"] == 100.0 * wrong / 12
    assert [r["class"] for r in rep.metrics["per_class"]] == ["c1", "c4"]
    cm = np.array(rep.metrics["confusion"])
    assert cm.shape == (2, 3) and cm.sum() == 12 and cm.sum(1).tolist() == [6, 6]
    assert cm[:, :2].trace() == 12 - wrong
    assert rep.confusion_labels() == ["1 c1", "4 c4", "another class"]
    files = ev.write_report(rep, tmp_path / "out")
    assert json.loads(open(files["json"]).read())["evaluated_classes"] == ["c1", "c4"]


def test_errors_are_exact_and_files_round_floats(tmp_path):
    """769 of 1000 right is 23.1% error, not 23.100000619888306, in the report and its JSON."""
    labels = torch.arange(1000) % 4
    post = torch.nn.functional.one_hot(labels, 4).float()
    post[769:] = post[769:].roll(1, dims=1)  # 231 wrong
    s = ev.scores(post, labels, ["a", "b", "c", "d"])
    assert s["top1_err"] == 23.1 and s["top5_err"] == 0.0
    rep = ev.EvalReport(["x.pt"], "center", [[32]], False, 1, ["a", "b", "c", "d"], s,
                        seconds=3.0)
    text = open(ev.write_report(rep, tmp_path)["json"]).read()
    assert '"top1_err": 23.1,' in text and '"images_per_s": 333.333,' in text


def test_confusion_matrix_in_class_index_order_with_counts():
    labels = ["0 zebra", "1 apple", "2 mango"]  # not alphabetical: the model's order
    fig = ev.confusion_figure([[3, 1, 0], [0, 2, 0], [5, 0, 0]], labels, "run/best.pt")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert sorted((t.get_position(), t.get_text()) for t in ax.texts) == [
        ((0, 0), "3"), ((0, 2), "5"), ((1, 0), "1"), ((1, 1), "2")]
    assert ax.get_title() == "run/best.pt"


def test_evaluate_writes_a_new_folder_per_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = ev.default_out("runs/A-reduced-1/best.pt", "dense")
    a.mkdir(parents=True)
    b = ev.default_out("runs/A-reduced-1/best.pt", "dense")
    assert a.parent == b.parent == tmp_path.joinpath("evaluation").relative_to(tmp_path)
    assert a.name.startswith("A-reduced-1-dense-") and b != a and not b.exists()
    assert ev.default_out("vgg16.safetensors", "center").name.startswith("vgg16-center-")
