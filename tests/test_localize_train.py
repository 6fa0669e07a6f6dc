"""Localisation round 2: the box sampler, training on train.py's loop, the localize commands,
the localisation study."""

import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from vggnet.annotations import BoxedSample
from vggnet.checkpoint import load_checkpoint
from vggnet.cli import main
from vggnet.data import collate, sample_rng
from vggnet.localize import decode, load_localizer
from vggnet.localize_train import DRAWS, BoxTask, BoxTrainImages, new_box_run
from vggnet.train import train
from vggnet.transforms import TrainTransform
from vggnet.weights import load_model, save_weights

TINY_CLF = ["--preset", "reduced", "--model", "A", "--width", "0.0625", "--crop-size", "32",
            "--scale", "40", "--batch-size", "8", "--epochs", "1", "--workers", "0",
            "--no-progress", "--stats-images", "20"]
TINY_LOC = ["--preset", "reduced", "--batch-size", "8", "--epochs", "1", "--workers", "0",
            "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These nets are tiny: a second thread only waits for a busy core (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the sampler --------------------------------------------------------------------------------
def _rectangle_image(path, size=(120, 90), box=(70, 20, 105, 60)):
    """Grey with one pure red rectangle (x1, y1, x2, y2: pixel columns x1..x2-1)."""
    a = np.full((size[1], size[0], 3), 128, np.uint8)
    a[box[1]:box[3], box[0]:box[2]] = (255, 0, 0)
    Image.fromarray(a).save(path)
    return BoxedSample(str(path), 0, torch.tensor([box], dtype=torch.float32), ("thing",), size)


def test_sampler_boxes_follow_the_crop_pixels(tmp_path):
    """The target, decoded, frames the red pixels of the very crop the sampler returns,
    flipped or not, wherever the crop lands (to within the resampling's blur)."""
    sample = _rectangle_image(tmp_path / "r.png")
    tf = TrainTransform((80, 80), 48, flip=True, pca_std=0.1)
    images = BoxTrainImages([sample], ["thing"], tf, seed=3)
    flips = set()
    for index in range(12):
        pixels, label, alpha, bad, target, redrawn = images[(0, index)]
        assert pixels.shape == (48, 48, 3) and label == 0 and bad == [] and alpha.shape == (3,)
        red = (pixels[..., 0] > 190) & (pixels[..., 1] < 60)
        ys, xs = np.nonzero(red)
        found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        box = decode(torch.from_numpy(target), 48).clamp(0, 48).numpy()
        assert np.abs(found - box).max() <= 1.5, (index, found, box)
        choice = tf.draw(sample_rng(3, 0, index, redrawn))  # the draw that was kept
        flips.add(choice["flip"])
    assert flips == {True, False}


def test_sampler_redraws_crops_that_lost_the_box_deterministically(tmp_path):
    # a box in a corner: many 48-pixel crops of the 107 x 80 rescaled image miss half of it
    sample = _rectangle_image(tmp_path / "r.png", (120, 90), (0, 0, 60, 60))
    tf = TrainTransform((80, 80), 48, flip=False, pca_std=0.0)
    images = BoxTrainImages([sample], ["thing"], tf, seed=0)
    items = [images[(1, i)] for i in range(20)]
    redrawn = [it[5] for it in items]
    assert sum(redrawn) > 0 and max(redrawn) < DRAWS  # redrawn, never left out here
    for it in items:  # every target has half of itself (or of the crop) in the crop
        box = decode(torch.from_numpy(it[4]), 48)
        w, h = (box[2:] - box[:2]).tolist()
        vw, vh = (box[2:].clamp(max=48) - box[:2].clamp(min=0)).tolist()
        assert vw * vh >= 0.5 * min(w * h, 48 * 48) - 1e-3
    # the same key gives the same sample; without the image size (decoding every draw) too
    again = BoxTrainImages([BoxedSample(sample.path, 0, sample.boxes, ("thing",))], ["thing"],
                           tf, seed=0)
    for i in (0, 7):
        a, b = images[(1, i)], again[(1, i)]
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[4], b[4]) and a[5] == b[5]
    batch = collate(items[:4])
    assert batch.targets.shape == (4, 4) and batch.redrawn == sum(redrawn[:4])


def test_box_task_loss_hand_computed():
    task = BoxTask("per-class", "all")
    out = torch.zeros(2, 3, 4)
    out[0, 1] = torch.tensor([0.5, 0.5, 0.5, 0.5])  # image 0, class 1: exactly its target
    out[1, 2] = torch.tensor([0.5, 0.5, 0.2, 0.2])  # image 1, class 2: IoU 0.04 / 0.25
    targets = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])
    loss, hits, hits5 = task.loss(out, torch.tensor([1, 2]), targets)
    assert loss.item() == pytest.approx(0.5 * (0.3 ** 2 * 2))
    assert hits.item() == hits5.item() == 1


# --- training, evaluation and prediction end to end ---------------------------------------------
@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A tiny classifier and a localisation net trained from it (one epoch each)."""
    root = tmp_path_factory.mktemp("loc")
    assert main(["train", "--data", str(data), "--out", str(root / "clf"), *TINY_CLF]) == 0
    args = ["localize", "train", "--from", str(root / "clf"), "--data", str(data),
            "--out", str(root / "loc"), "--finetune", "fc", *TINY_LOC]
    assert main(args) == 0
    return root


def test_localize_train_writes_a_run_folder_and_resumes(data, trained, tmp_path, capsys):
    loc = trained / "loc"
    for name in ("best.pt", "last.pt", "metrics.csv", "metrics.jsonl", "report.md",
                 "settings.json"):
        assert (loc / name).is_file(), name
    ck = load_checkpoint(loc / "last.pt")
    assert ck["task"] == "localisation" and ck["localisation"] == {"regression": "per-class",
                                                                   "num_classes": 3}
    assert ck["localisation_run"]["finetune"] == "fc"
    assert ck["model_config"]["num_classes"] == 12 and ck["train_settings"]["scale"] == [40, 40]
    assert ck["train_settings"]["lr"] == 0.05  # the reduced localisation preset
    row = ck["metrics"][0]
    assert 0 <= row["val_top1_err"] <= 1 and row["redrawn"] >= 0
    # fc fine-tuning left the conv layers as the classifier had them
    clf = load_checkpoint(trained / "clf" / "best.pt")["model"]
    assert all(torch.equal(v, clf[k]) for k, v in ck["model"].items() if k.startswith("features"))
    assert not torch.equal(ck["model"]["classifier.fc6.weight"], clf["classifier.fc6.weight"])
    loc_net, loaded = load_localizer(loc / "best.pt")
    assert loc_net.spec.boxes == 3 and loaded.class_names == ["disc", "ring", "square"]
    report = (loc / "report.md").read_text()
    assert "protocol-1 localisation error" in report and "fc6, fc7, fc8" in report
    # resume: its own settings, one more epoch; `vggnet train` refuses the run
    copy = tmp_path / "loc"
    shutil.copytree(loc, copy)
    capsys.readouterr()
    assert main(["localize", "train", "--resume", str(copy), "--regression", "single-class"]) == 2
    assert "--regression cannot be given with it" in capsys.readouterr().err
    assert main(["train", "--resume", str(copy)]) == 2
    assert "vggnet localize train --resume RUN" in capsys.readouterr().err
    assert main(["localize", "train", "--resume", str(copy), "--epochs", "2", "--no-progress"]) == 0
    assert "finished after 2 epoch(s)" in capsys.readouterr().out
    assert len(load_checkpoint(copy / "last.pt")["metrics"]) == 2


def test_a_new_run_onto_a_run_folder_names_the_command_that_continues_it(data, trained,
                                                                        capsys):
    loc = trained / "loc"
    args = ["localize", "train", "--from", str(trained / "clf"), "--data", str(data),
            "--out", str(loc), *TINY_LOC]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (f"already holds a run (last.pt); continue it with `vggnet localize train --resume "
            f"{loc}`") in err, err


def test_resume_after_ctrl_c_equals_uninterrupted_run(data, trained, tmp_path):
    def run(out, **kw):
        s, task = new_box_run(str(trained / "clf"), str(data), "single-class", "all",
                              preset="reduced", out=str(out), batch_size=8, micro_batch=4,
                              epochs=2, workers=0, progress=False)
        return train(s, task=task, **kw)

    whole = run(tmp_path / "whole")

    def ctrl_c(step):
        if step == 4:  # in the middle of epoch 2 (3 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    assert run(tmp_path / "cut", on_step=ctrl_c).status == "interrupted"
    resumed = train(resume=tmp_path / "cut", task=BoxTask(), workers=1)
    assert whole.status == resumed.status == "finished"
    a, b = (load_checkpoint(tmp_path / f / "last.pt") for f in ("whole", "cut"))
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for ra, rb in zip(a["metrics"], b["metrics"], strict=True):
        for key in ("train_loss", "train_top1_err", "val_loss", "val_top1_err", "redrawn"):
            assert ra[key] == rb[key], key


def test_localize_evaluate_both_protocols_and_fusion(data, trained, tmp_path, capsys):
    loc = str(trained / "loc")
    capsys.readouterr()
    assert main(["localize", "evaluate", loc, "--data", str(data), "--protocol", "1",
                 "--scales", "40,48", "--out", str(tmp_path / "p1")]) == 0
    out = capsys.readouterr().out
    assert "6 of 6 image(s) have boxes" in out and f"| {loc} @ 48 | 48 |" in out
    rows = json.loads((tmp_path / "p1" / "results.json").read_text())["rows"]
    assert {r["images"] for r in rows.values()} == {6} and len(rows) == 2
    # protocol 2 with two nets: each alone and the fusion (the union of their boxes)
    weights = tmp_path / "loc.safetensors"  # the checkpoint converted: the spec travels along
    assert main(["convert", str(trained / "loc" / "best.pt"), str(weights)]) == 0
    assert main(["localize", "evaluate", loc, str(weights), "--data", str(data),
                 "--protocol", "2", "--classifier", str(trained / "clf"), "--no-progress",
                 "--out", str(tmp_path / "p2")]) == 0
    rows = json.loads((tmp_path / "p2" / "results.json").read_text())["rows"]
    assert list(rows) == [loc, str(weights), "fusion of the 2 nets"]
    # each at its training S; the weights file has no training settings: 256/224 of crop 32
    assert [r["scales"] for r in rows.values()] == [[[40]], [[37]], [[40], [37]]]
    assert rows["fusion of the 2 nets"]["members"] == [loc, str(weights)]
    assert "| fusion of the 2 nets | 40 + 37 |" in capsys.readouterr().out
    assert main(["localize", "evaluate", loc, str(weights), "--data", str(data), "--protocol",
                 "2", "--scales", "40", "--classifier", str(trained / "clf"), "--no-progress",
                 "--out", str(tmp_path / "p2")]) == 0
    rows = json.loads((tmp_path / "p2" / "results.json").read_text())["rows"]
    assert rows[loc]["error"] == rows[str(weights)]["error"]  # the same net, the same boxes
    # a weights file does not say which classifier it came from
    assert main(["localize", "evaluate", str(weights), "--data", str(data), "--protocol", "2",
                 "--out", str(tmp_path / "p3")]) == 2
    assert "give --classifier CLASSIFIER" in capsys.readouterr().err


def test_localize_predict_draws_the_guesses(data, trained, tmp_path, capsys):
    image = sorted((data / "val" / "ring").iterdir())[0]
    capsys.readouterr()
    assert main(["localize", "predict", str(image), "--weights", str(trained / "loc"),
                 "--out", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out.splitlines()
    png = tmp_path / "png" / f"{image.stem}.boxes.png"
    assert out[0] == f"{image} -> {png}" and len(out) == 4  # 3 classes: 3 guesses
    assert {line.split("]")[0].split("[")[1] for line in out[1:]} == {"0", "1", "2"}
    with Image.open(png) as im:
        assert im.format == "PNG" and min(im.size) == 384  # drawn enlarged
        assert len(im.getcolors(1 << 20)) > 2
    # the classification commands refuse a localisation net
    assert main(["predict", str(image), "--weights", str(trained / "loc" / "best.pt")]) == 2
    assert "is a localisation net" in capsys.readouterr().err


def test_weights_keep_the_localisation_spec(trained, tmp_path):
    loc, loaded = load_localizer(trained / "loc" / "best.pt")
    path = save_weights(tmp_path / "w.safetensors", loc.net, loaded.preprocessing,
                        loaded.class_names, localisation=loc.spec.to_dict())
    again, _ = load_localizer(path)
    assert again.spec == loc.spec
    assert all(torch.equal(v, loc.net.state_dict()[k]) for k, v in again.net.state_dict().items())
    with pytest.raises(ValueError, match="3 class names for a model with 4 classes"):
        save_weights(tmp_path / "x.safetensors", loc.net, loaded.preprocessing, loaded.class_names,
                     localisation={"regression": "per-class", "num_classes": 4})
    with pytest.raises(ValueError, match="is not a localisation net"):
        load_localizer(trained / "clf" / "best.pt")
    assert load_model(path).model.config.num_classes == 12  # still an ordinary weights file


def test_images_without_a_box_are_left_out_and_the_run_counts_the_rest(data, trained, tmp_path,
                                                                       capsys):
    root = tmp_path / "d"
    shutil.copytree(data, root)
    lines = (root / "LOC_train_solution.csv").read_text().splitlines()
    (root / "LOC_train_solution.csv").write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    args = ["localize", "train", "--from", str(trained / "clf"), "--data", str(root), "--out",
            str(tmp_path / "run"), "--finetune", "fc", *TINY_LOC]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "23 of 24 image(s) have boxes; 1 skipped" in out
    assert "on 23 images of 3 classes" in out, out


# --- bad input: one-line errors before any work -------------------------------------------------
@pytest.mark.parametrize("case,message", [
    ("missing", "LOC_train_solution.csv' does not exist; give --train-boxes PATH"),
    ("malformed", "LOC_val_solution.csv' line 3: expected 'ImageId,wnid x1 y1 x2 y2"),
    ("coordinates", "line 2: box coordinates must be numbers, got '1 2 x 4'"),
    ("from_localiser", "is a localisation net"),
    ("no_from", "--from CLASSIFIER is required"),
])
def test_bad_input_is_one_line_error(data, trained, tmp_path, capsys, case, message):
    root = tmp_path / "d"
    shutil.copytree(data, root)
    source = trained / "clf"
    if case == "missing":
        (root / "LOC_train_solution.csv").unlink()
    elif case == "malformed":
        lines = (root / "LOC_val_solution.csv").read_text().splitlines()
        lines[2] = lines[2].rsplit(" ", 1)[0]  # a box with 3 numbers
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    elif case == "coordinates":
        lines = (root / "LOC_train_solution.csv").read_text().splitlines()
        lines[1] = lines[1].split(",")[0] + ",ring 1 2 x 4"
        (root / "LOC_train_solution.csv").write_text("\n".join(lines) + "\n")
    elif case == "from_localiser":
        source = trained / "loc"
    out = tmp_path / "run"
    args = ["localize", "train", "--data", str(root), "--out", str(out), *TINY_LOC]
    capsys.readouterr()
    assert main(args + ([] if case == "no_from" else ["--from", str(source)])) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    if case == "malformed":  # evaluate reads the same files the same way
        assert main(["localize", "evaluate", str(trained / "loc"), "--data", str(root),
                     "--out", str(tmp_path / "e")]) == 2
        assert message in capsys.readouterr().err


# --- the study ------------------------------------------------------------------------------------
def test_localisation_study_end_to_end_and_resumes(tmp_path, capsys):
    from vggnet import reproduce_localisation as rl
    from vggnet import train as train_module
    from vggnet.reproduce import load_cells

    out = tmp_path / "study"
    args = ["reproduce", "--study", "localisation", "--out", str(out), "--epochs", "1",
            "--finetune-epochs", "1", "--localizer-epochs", "1", "--train-per-class", "7",
            "--val-per-class", "2", "--width", "0.0625", "--batch-size", "16", "--device", "cpu",
            "--workers", "0", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Per-class regression beats single-class" in printed
    report = (out / "localisation" / "report.md").read_text()
    assert "not run" not in report
    assert "### Table 8:" in report and "### Table 9:" in report
    assert "| 384 (here 110) | 352,384 (here 101,110) |" in report
    assert "256 / 352,384 (here 73 / 101,110)" in report and "load average" in report
    cells = load_cells(out / "localisation")
    want = {f"{j.id}/p1" for j in rl.loc_jobs()} | {f"{c}/p2" for c in rl.TABLE9}
    assert set(cells) == want and {c["images"] for c in cells.values()} == {20}
    assert cells["fusion/p2"]["members"] == ["PCR-all@256", "PCR-all@384"]
    assert cells["S384-Q352,384/p2"]["scales"] == [[101, 110]]
    s384 = json.loads((out / "localisation" / "localizers" / "PCR-all@384" / "settings.json")
                      .read_text())
    assert s384["scale"] == [110, 110] and s384["init_from"].endswith("D@384/last.pt")
    # --batch-size 16 scales the reduced preset's lr 0.05 (batch 64) to 0.0125
    assert s384["batch_size"] == 16 and abs(s384["lr"] - 0.0125) < 1e-12
    assert "lr 0.0125 (the paper: 1e-3" in report and "(the preset's 0.05 at batch 64, scaled)" \
        in report
    d384 = json.loads((out / "localisation" / "nets" / "D@384" / "settings.json").read_text())
    assert d384["init_from"].endswith("D@256") and abs(d384["lr"] - 1e-3) < 1e-12
    # rerun: nothing is trained again; a deleted cell is evaluated again
    (out / "localisation" / "cells" / "SCR-fc@256__p1.json").unlink()
    kept = (out / "localisation" / "cells" / "PCR-fc@256__p1.json").stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("a finished training ran again")

    orig = train_module.train
    train_module.train = no_training
    try:
        assert main(args) == 0
    finally:
        train_module.train = orig
    assert set(load_cells(out / "localisation")) == want
    assert (out / "localisation" / "cells" / "PCR-fc@256__p1.json").stat().st_mtime_ns == kept


def test_a_localisation_run_plots_its_own_loss_and_error():
    """loss.png and error.png of a localisation run name the Euclidean box loss and the
    protocol-1 error, not classification's cross-entropy and top-5 (NaN there)."""
    from vggnet.runlog import history_figures

    rows = [{"epoch": e, "lr": 0.01, "train_loss": 1.0 / e, "val_loss": 2.0 / e,
             "train_top1_err": 0.5, "val_top1_err": 0.6, "val_top5_err": float("nan"),
             "event": "improved"} for e in (1, 2)]
    figs = history_figures(rows, "D-loc", BoxTask.plots)
    assert figs["loss"].axes[0].get_ylabel() == "Euclidean box loss"
    labels = [t.get_text() for t in figs["error"].axes[0].get_legend().get_texts()]
    assert labels == ["train boxes missed (IoU < 0.5)", "val protocol-1 error",
                      "best.pt (epoch 2)"]


def test_the_study_scales_the_localisers_lr_with_its_batch():
    from vggnet.reproduce_localisation import localizer_recipe

    assert localizer_recipe("reduced", None) == (0.05, 64)
    assert localizer_recipe("reduced", 16) == (0.0125, 16)
    assert localizer_recipe("paper", 512) == (2e-3, 512)
