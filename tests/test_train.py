import json
import os
import re
import shutil
import signal

import numpy as np
import pytest
import torch

from imagefiles import bad_files, good_files
from vggnet import preprocess
from vggnet.checkpoint import load_checkpoint
from vggnet.cli import main
from vggnet.data import Batch
from vggnet.model import config_for, create_model
from vggnet.runlog import history_figures, round_floats
from vggnet.runtime import make_runtime
from vggnet.settings import make_settings
from vggnet.train import PlateauSchedule, init_from, sgd_step, train
from vggnet.transforms import ColorStats
from vggnet.weights import load_model

TINY = dict(model="A", width=1 / 16, crop_size=32, scale=(32, 40), batch_size=8, epochs=1,
            workers=0, progress=False, stats_images=50)


def settings(data, out, **kw):
    return make_settings("reduced", **{**TINY, "data": str(data), "out": str(out), **kw})


def _stats():
    return ColorStats((120.0, 115.0, 100.0), (0.05, 0.01, 0.002), tuple(map(tuple, np.eye(3))))


def _batches(n, micro, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    images = images.permute(0, 3, 1, 2)
    labels = torch.randint(0, 5, (n,), generator=g)
    alpha = torch.randn(n, 3, generator=g) * 0.1
    return [Batch(images[i:i + micro], labels[i:i + micro], alpha[i:i + micro], [])
            for i in range(0, n, micro)]


@pytest.mark.cpu_sensitive
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gradient_accumulation_equals_the_large_batch(precision):
    runtime = make_runtime("cpu", precision)
    stats = _stats()
    prep = preprocess.paper(stats.mean_rgb)
    weights = []
    for micro in (8, 2):
        model = create_model("A", num_classes=5, width=1 / 16, crop_size=32, dropout=0.0, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for step in range(2):
            totals, skipped = sgd_step(model, opt, _batches(8, micro, seed=step), 8, runtime,
                                       prep, stats)
        assert totals[3].item() == 8 and torch.isfinite(totals).all() and not skipped
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    moved = (weights[0] - torch.cat([p.flatten() for p in create_model(
        "A", num_classes=5, width=1 / 16, crop_size=32, seed=0).parameters()])).abs().max()
    assert moved > 1e-3  # the steps did something
    tol = 1e-5 if precision == "fp32" else 2e-2
    torch.testing.assert_close(weights[0], weights[1], atol=tol * moved.item(), rtol=0)


def test_plateau_schedule_drops_then_stops():
    s = PlateauSchedule(1e-2, patience=2, max_drops=2)
    events = [s.step(e) for e in (0.9, 0.8, 0.8, 0.85, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7)]
    assert events == ["improved", "improved", "kept", "dropped", "improved", "kept", "dropped",
                      "kept", "stop", "stop"]
    assert s.drops == 2 and abs(s.lr - 1e-4) < 1e-12


def test_resume_after_ctrl_c_equals_uninterrupted_run(data, tmp_path):
    kw = dict(epochs=2, micro_batch=4, scale=(32, 48))
    whole = train(settings(data, tmp_path / "whole", **kw))
    assert whole.status == "finished" and whole.epochs == 2

    def ctrl_c(step):
        if step == 4:  # in the middle of epoch 2 (3 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    cut = train(settings(data, tmp_path / "cut", **kw), on_step=ctrl_c)
    assert cut.status == "interrupted"
    ck = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert (ck["epoch"], ck["epoch_step"], ck["step"]) == (1, 1, 4)
    # resumed with loader worker processes: the data order and augmentation do not depend on them
    resumed = train(resume=tmp_path / "cut", workers=1)
    assert resumed.status == "finished" and resumed.epochs == 2
    a = load_checkpoint(tmp_path / "whole" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for ra, rb in zip(a["metrics"], b["metrics"], strict=True):
        for key in ("train_loss", "train_top1_err", "val_loss", "val_top1_err", "lr", "step"):
            assert ra[key] == rb[key], key
    lines = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch,step,lr")


def test_crash_while_writing_a_checkpoint_leaves_the_previous_one(data, tmp_path, monkeypatch):
    import vggnet.checkpoint

    real_save, calls = torch.save, []

    def dying_save(obj, f):
        calls.append(1)
        if len(calls) == 3:  # epoch 1 writes last.pt and best.pt; epoch 2 dies writing last.pt
            f.write(b"PK\x03\x04 half a zip")
            raise OSError("No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(vggnet.checkpoint.torch, "save", dying_save)
    with pytest.raises(OSError, match="No space left"):
        train(settings(data, tmp_path / "run", epochs=2))
    monkeypatch.setattr(vggnet.checkpoint.torch, "save", real_save)
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt*")) == ["best.pt", "last.pt"]
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["epoch"] == 1 and ck["format"] == "vggnet.checkpoint/1"
    assert train(resume=tmp_path / "run").epochs == 2


@pytest.mark.cpu_sensitive
@pytest.mark.parametrize("model", ["A", "A-LRN", "B", "C", "D", "E", "vgg11_bn"])
def test_one_epoch_of_each_config(data, tmp_path, model):
    r = train(settings(data, tmp_path / model, model=model))
    assert r.status == "finished" and r.epochs == 1 and 0 <= r.best_top1_err <= 1
    loaded = load_model(tmp_path / model / "best.pt")
    assert loaded.class_names == ["disc", "ring", "square"]
    assert loaded.model.config.name == {"vgg11_bn": "A_bn"}.get(model, model)
    ck = load_checkpoint(tmp_path / model / "best.pt")
    assert ck["train_settings"]["scale"] == [32, 40] and ck["train_settings"]["crop_size"] == 32
    assert set(ck["stats"]) >= {"mean_rgb", "eigval", "eigvec"}
    assert ck["preprocessing"]["mean"] == ck["stats"]["mean_rgb"]


def test_run_folder_contents_and_stage_chaining(data, tmp_path):
    a = train(settings(data, tmp_path / "A", epochs=2))
    names = {p.name for p in (tmp_path / "A").iterdir()}
    assert {"best.pt", "last.pt", "metrics.csv", "metrics.jsonl", "loss.png", "error.png",
            "report.md", "settings.json", "tensorboard"} <= names
    assert "lr.png" not in names  # the lr never dropped: the loss plot says so
    events = (tmp_path / "A" / "tensorboard").iterdir()
    assert any(p.name.startswith("events.out.tfevents") for p in events)
    lines = (tmp_path / "A" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in rows] == [1, 2] and rows == round_floats(a.history)
    assert "Training report: vgg11 (VGG A)" in (tmp_path / "A" / "report.md").read_text()

    deeper = create_model("D", num_classes=3, width=1 / 16, crop_size=32, seed=5)
    summary, meta, _, _ = init_from(deeper, tmp_path / "A")
    net_a = load_model(tmp_path / "A" / "best.pt").model
    for layer in ("conv1_1", "conv2_1", "conv3_1", "conv3_2"):
        assert torch.equal(getattr(deeper.features, layer).weight,
                           getattr(net_a.features, layer).weight)
    assert torch.equal(deeper.classifier.fc6.weight, net_a.classifier.fc6.weight)
    assert "net A" in summary and meta["stats"]["mean_rgb"]
    r = train(settings(data, tmp_path / "D", model="D", init_from=str(tmp_path / "A"), lr=1e-3))
    assert r.status == "finished"
    # the same mean RGB
    assert load_checkpoint(tmp_path / "D" / "last.pt")["stats"] == meta["stats"]


def test_bad_files_refuse_to_start_then_skip(data, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(data, root)
    bad = bad_files(root / "train" / "ring")
    good_files(root / "train" / "square", w=44, h=36)  # every convertible mode trains
    refused = f"{len(bad)} file\\(s\\) .* cannot be decoded; training did not start"
    with pytest.raises(ValueError, match=refused) as e:
        train(settings(root, tmp_path / "run"))
    for name, (path, words) in bad.items():
        assert str(path) in str(e.value) and words in str(e.value), name
    assert not (tmp_path / "run").exists()  # nothing written
    r = train(settings(root, tmp_path / "run", skip_bad=True))
    assert r.status == "finished"
    listed = (tmp_path / "run" / "bad_files.txt").read_text()
    assert all(str(p) in listed for p, _ in bad.values())
    assert f"{len(bad)} bad file(s) skipped" in (tmp_path / "run" / "report.md").read_text()


def test_bad_file_met_mid_epoch_does_not_crash(data, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(data, root)
    bad = bad_files(root / "train" / "disc")
    r = train(settings(root, tmp_path / "run", scan=False, epochs=1, batch_size=6))
    assert r.status == "finished" and r.history[0]["bad_files"] >= 1
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["epoch"] == 1 and len(bad) > 0


@pytest.mark.parametrize("case,message", [
    ("unwritable", "file' is a file, not a folder"),
    ("single", "single class"),
    ("empty", "empty class folder"),
    ("val", "validation classes differ from training classes"),
    ("batch", "fewer than one batch of 64; lower --batch-size"),
    ("init_from", "neither a run folder nor a checkpoint"),
])
def test_clear_errors_before_any_work(data, tmp_path, case, message):
    root = tmp_path / "d"
    shutil.copytree(data, root)
    out = tmp_path / "run"
    kw = {}
    if case == "unwritable":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    elif case == "single":
        shutil.rmtree(root / "train" / "ring")
        shutil.rmtree(root / "train" / "square")
    elif case == "empty":
        shutil.rmtree(root / "train" / "ring")
        (root / "train" / "ring").mkdir()
    elif case == "val":
        shutil.rmtree(root / "val" / "ring")
    elif case == "batch":
        kw["batch_size"] = 64
    elif case == "init_from":
        kw["init_from"] = str(tmp_path / "nope")
    with pytest.raises((ValueError, OSError), match=message):
        train(settings(root, out, **kw))
    assert not out.exists() or not any(out.iterdir())


def test_cli_train_and_resume_rules(data, tmp_path, capsys):
    args = ["train", "--data", str(data), "--preset", "reduced", "--model", "A",
            "--width", "0.0625", "--crop-size", "32", "--scale", "32,40", "--batch-size", "8",
            "--epochs", "1", "--workers", "0", "--no-progress", "--stats-images", "20",
            "--out", str(tmp_path / "r")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "finished after 1 epoch(s)" in out and "report.md" in out
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "r"), "--lr", "0.1"]) == 2
    assert "only --workers" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "r"), "--epochs", "2"]) == 0  # one more epoch
    assert "finished after 2 epoch(s)" in capsys.readouterr().out


def _row(epoch, lr, val, event):
    return {"epoch": epoch, "step": 3 * epoch, "lr": lr, "train_loss": 2.0 - 0.1 * epoch,
            "train_top1_err": 0.8, "val_loss": 1.9, "val_top1_err": val, "val_top5_err": 0.2,
            "images_per_s": 123.456789, "epoch_s": 1.0, "bad_files": 0, "skipped_steps": 0,
            "event": event}


def test_plots_name_the_run_mark_the_best_epoch_and_fold_a_constant_lr():
    steady = [_row(1, 0.01, 0.7, "improved"), _row(2, 0.01, 0.6, "improved"),
              _row(3, 0.01, 0.65, "kept")]
    figs = history_figures(steady, "A-reduced-1: vgg11 (VGG A)")
    assert set(figs) == {"loss", "error"}  # no lr.png: the lr never changed
    for fig in figs.values():
        ax = fig.axes[0]
        assert ax.get_title() == "A-reduced-1: vgg11 (VGG A)"
        best = [ln for ln in ax.get_lines() if ln.get_label() == "best.pt (epoch 2)"]
        assert len(best) == 1 and list(best[0].get_xdata()) == [2, 2]
    legend = [t.get_text() for t in figs["loss"].axes[0].get_legend().get_texts()]
    assert "lr 0.01 throughout" in legend
    dropped = steady + [_row(4, 0.001, 0.5, "improved")]
    figs = history_figures(dropped, "x")
    assert set(figs) == {"loss", "error", "lr"}
    assert figs["lr"].axes[0].get_yscale() == "log"


def test_metrics_files_round_floats(tmp_path):
    from vggnet.runlog import RunLog

    row = _row(1, 0.01, 1 - 0.769, "improved")
    row["val_top5_err"] = 100 * np.float32(0.231).item() / 100  # 0.23100000619888306
    log = RunLog(tmp_path)
    log.epoch(row)  # the metrics files are written from the first row on
    log.close()
    csv_row = (tmp_path / "metrics.csv").read_text().splitlines()[1].split(",")
    assert csv_row[5:9] == ["1.9", "0.231", "0.231", "123.457"]
    assert str(row["val_top5_err"]) == "0.23100000619888306"
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["images_per_s"] == 123.457


def test_a_bn_model_has_batch_norm_in_its_settings():
    s = make_settings("reduced", model="vgg11_bn")
    assert s.batch_norm is True and s.to_dict()["batch_norm"] is True
    assert make_settings("reduced", model="A").batch_norm is False
    assert config_for("vgg11_bn").label == "vgg11_bn (VGG A with batch norm)"
    assert config_for("C").label == "VGG C" and config_for("A-LRN").label == "VGG A-LRN"


def _interrupt_at(model_box, when):
    """on_step callback: after step 4, a hook sends this process SIGINT during the next
    step's backward pass ("backward") or during the first validation ("validation")."""
    def hook(*args):
        os.kill(os.getpid(), signal.SIGINT)

    def on_step(step):
        model = model_box[0]
        if when == "backward" and step == 4:
            model.classifier.fc8.weight.register_hook(hook)
        if when == "validation" and step == 3:  # the last step of epoch 1
            model.features.conv2_1.register_forward_hook(
                lambda m, i, o: None if m.training else hook())
    return on_step


@pytest.mark.parametrize("when", ["backward", "validation"])
def test_first_ctrl_c_abandons_the_step_and_resume_stays_exact(data, tmp_path, monkeypatch,
                                                               when, capsys):
    """The first Ctrl-C does not wait for the step (or the validation) to end: it is abandoned,
    last.pt holds the last finished step, and the resumed run ends bit-identical to an
    uninterrupted one (batch norm statistics and dropout's RNG are put back)."""
    from vggnet import train as train_module

    kw = dict(epochs=2, micro_batch=4, scale=(32, 48), model="A_bn")
    whole = train(settings(data, tmp_path / "whole", **kw))
    box = []
    build = train_module.build
    monkeypatch.setattr(train_module, "build", lambda *a, **k: box.append(build(*a, **k))
                        or box[-1])
    cut = train(settings(data, tmp_path / "cut", **kw), on_step=_interrupt_at(box, when))
    assert cut.status == "interrupted"
    err = capsys.readouterr().err
    assert "SIGINT: abandoning this step, saving the last finished one" in err
    ck = load_checkpoint(tmp_path / "cut" / "last.pt")
    # backward: step 5 abandoned mid-way; validation: epoch 1's steps kept, not validated
    assert (ck["epoch"], ck["epoch_step"], ck["step"]) == ((1, 1, 4) if when == "backward"
                                                           else (0, 3, 3))
    monkeypatch.setattr(train_module, "build", build)
    resumed = train(resume=tmp_path / "cut")
    assert resumed.status == "finished" and resumed.epochs == 2
    a = load_checkpoint(tmp_path / "whole" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [r["val_loss"] for r in a["metrics"]] == [r["val_loss"] for r in b["metrics"]]
    assert whole.best_top1_err == resumed.best_top1_err


def test_the_first_step_estimates_time_and_memory(data, tmp_path, capsys):
    train(settings(data, tmp_path / "run", epochs=2))
    out = capsys.readouterr().out
    assert out.count("first step: ") == 1
    s = r"\d+(\.\d)? s"
    assert re.search(rf"first step: {s} \(start-up included\): about {s} per epoch of 3 "
                     rf"steps, about {s} for the 2 epoch\(s\) left at most .*; peak resident "
                     r"memory \d+\.\d GiB", out)
    assert out.index("first step: ") < out.index("epoch   1/2")


def test_estimate_wording_and_the_preset_that_fits_a_cpu():
    from vggnet.estimate import duration, first_step_estimate

    assert [duration(s) for s in (0.42, 45, 720, 6660, 6 * 86400 + 3600 * 1 + 1200)] == [
        "0.4 s", "45 s", "12 min", "1 h 51 min", "6 d 1 h"]
    # the case: 372 s a step, 19 steps an epoch, 74 epochs, 13.1 GB, on a CPU
    text = first_step_estimate(372.0, 19, 74 * 19, 74, 13.1 * 1024, "resident memory", "cpu",
                               "paper")
    assert text.startswith("first step: 6 min (start-up included): about 1 h 58 min per epoch "
                           "of 19 steps, about 6 d 1 h for the 74 epoch(s) left at most")
    assert "peak resident memory 13.1 GiB" in text and "`--preset reduced`" in text
    assert "`--preset reduced`" not in first_step_estimate(372.0, 19, 19, 1, 1024, "GPU memory",
                                                           "cuda", "paper")
    assert "even the reduced preset" in first_step_estimate(200.0, 19, 38, 2, 1024, "x", "cpu",
                                                            "reduced")
    assert "\n" not in first_step_estimate(1.0, 19, 19, 1, 1024, "x", "cpu", "paper")
    # this project's 2-core CPU, 2026-12-03: VGG A, paper preset, built-in data, bf16: 83 s a
    # step, 26 min an epoch, 1 d 8 h for 74 epochs: the preset that fits is named
    assert "`--preset reduced`" in first_step_estimate(83.0, 19, 74 * 19, 74, 9216, "x", "cpu",
                                                       "paper")


def test_the_epoch_line_shows_slow_rates_with_a_decimal():
    """A full-size net on a CPU trains at under one image/s: printed "0 img/s" before."""
    from vggnet.runlog import epoch_line

    assert "|  0.5 img/s, 1 s" in epoch_line({**_row(1, 0.01, 0.5, "kept"), "images_per_s": 0.48},
                                             3)
    assert "|  123 img/s, 1 s" in epoch_line(_row(1, 0.01, 0.5, "kept"), 3)
