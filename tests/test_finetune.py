"""Starting from trained weights: the source's preprocessing kept, copied layers at lr/10 or
fixed, a new classifier, a validation split carved from one folder, `vggnet finetune`."""

import json
import os
import shutil
import signal

import pytest
import torch

from vggnet import preprocess
from vggnet.checkpoint import load_checkpoint
from vggnet.cli import main
from vggnet.model import create_model
from vggnet.settings import make_settings
from vggnet.split import split_record
from vggnet.train import train
from vggnet.transforms import device_batch
from vggnet.weights import save_weights

TINY = dict(width=1 / 16, crop_size=32, scale=(32, 40), batch_size=8, epochs=1, workers=0,
            progress=False, stats_images=50, scan=False)


def settings(data, out, **kw):
    return make_settings("reduced", **{**TINY, "data": str(data), "out": str(out), **kw})


def source_weights(path, model="D", classes=5, prep=preprocess.TORCHVISION, seed=7):
    """A tiny net saved as `vggnet convert` saves imported weights (no colour statistics)."""
    net = create_model(model, num_classes=classes, width=1 / 16, crop_size=32, seed=seed)
    save_weights(path, net, prep, class_names=[f"c{i}" for i in range(classes)])
    return net


@pytest.fixture(scope="module")
def folder(data, tmp_path_factory):
    """The training images of the tiny dataset as one folder per class (ImageFolder style):
    3 classes of 8 images."""
    root = tmp_path_factory.mktemp("flat")
    for c in sorted(p.name for p in (data / "train").iterdir()):
        shutil.copytree(data / "train" / c, root / c)
    return root


def test_init_from_torchvision_weights_keeps_their_input_and_trains_them_at_lr_tenth(
        data, tmp_path):
    """Issue 15, item 1: a torchvision import fine-tuned with `train --init-from` used to get
    0-255 minus the new data's mean RGB and lr 1e-2 on every layer."""
    source_weights(tmp_path / "tv.safetensors")
    r = train(settings(data, tmp_path / "run", model="D",
                       init_from=str(tmp_path / "tv.safetensors")))
    assert r.status == "finished"
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["preprocessing"] == preprocess.TORCHVISION.to_dict()
    # what the first conv sees is what it saw in training: RGB in [0, 1], ImageNet mean/std
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    x = device_batch(pixels, preprocess.Preprocessing.from_dict(ckpt["preprocessing"]))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (pixels.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)
    # fc8 (5 classes in the source, 3 here) is new; every other layer copied, at lr/10
    transfer = ckpt["transfer"]
    assert transfer["lr_factor"] == 0.1 and "fc8" not in transfer["copied"]
    assert {"conv1_1", "conv5_3", "fc6", "fc7"} <= set(transfer["copied"])
    groups = ckpt["optimizer"]["param_groups"]
    assert [(g["lr"], g["lr_scale"], len(g["params"])) for g in groups] == [
        (1e-3, 0.1, 2 * 15), (1e-2, 1.0, 2)]  # 13 convs + fc6 + fc7, then fc8
    report = (tmp_path / "run" / "report.md").read_text()
    assert "input RGB in [0, 1], minus mean (0.485, 0.456, 0.406)" in report


@pytest.fixture(scope="module")
def net_a(data, tmp_path_factory):
    """A run folder of net A (one epoch on the tiny dataset)."""
    out = tmp_path_factory.mktemp("net") / "A"
    train(settings(data, out, model="A"))
    return out


def test_stage_chaining_from_net_a_keeps_the_full_lr(data, net_a, tmp_path):
    """The paper: "we did not decrease the learning rate for the pre-initialised layers"."""
    train(settings(data, tmp_path / "D", model="D", init_from=str(net_a)))
    ckpt = load_checkpoint(tmp_path / "D" / "last.pt")
    assert ckpt["transfer"]["lr_factor"] == 1.0
    assert ckpt["transfer"]["copied"] == ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6",
                                          "fc7", "fc8"]
    assert {g["lr"] for g in ckpt["optimizer"]["param_groups"]} == {1e-2}
    # our own run's input convention carries over too (its mean RGB subtracted)
    assert ckpt["preprocessing"] == load_checkpoint(net_a / "last.pt")["preprocessing"]


def test_freeze_until_keeps_layers_and_batch_norm_statistics(data, tmp_path):
    src = source_weights(tmp_path / "bn.safetensors", model="A_bn", classes=3,
                         prep=preprocess.CAFFE)
    with torch.no_grad():  # statistics that training would move
        src.features.bn1_1.running_mean.fill_(0.5)
        src.features.bn2_1.running_var.fill_(2.0)
    save_weights(tmp_path / "bn.safetensors", src, preprocess.CAFFE)
    train(settings(data, tmp_path / "run", model="A_bn", init_from=str(tmp_path / "bn.safetensors"),
                   freeze_until="conv2_1", new_head=True, transfer_lr_factor=0.5, epochs=2))
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    state, before = ckpt["model"], src.state_dict()
    for layer in ("conv1_1", "bn1_1", "conv2_1", "bn2_1"):
        keys = [k for k in before if f".{layer}." in k and "num_batches" not in k]
        assert keys and all(torch.equal(state[k], before[k]) for k in keys), layer
    for key in ("features.conv3_1.weight", "features.bn3_1.running_mean",
                "classifier.fc7.weight"):
        assert not torch.equal(state[key], before[key]), key
    assert ckpt["transfer"]["frozen"] == ["conv1_1", "bn1_1", "conv2_1", "bn2_1"]
    assert "fc8" not in ckpt["transfer"]["copied"]  # --new-head: a new classifier
    assert [g["lr_scale"] for g in ckpt["optimizer"]["param_groups"]] == [0.5, 1.0]
    assert ckpt["preprocessing"] == preprocess.CAFFE.to_dict()


@pytest.mark.parametrize("until,message", [
    ("conv9_9", "'conv9_9' is not a layer that can be kept fixed in VGG D; choose one of "
                "conv1_1, conv1_2, conv2_1"),
    ("fc8", "'fc8' is not a layer that can be kept fixed"),
])
def test_freeze_until_errors(data, tmp_path, until, message):
    source_weights(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=message):
        train(settings(data, tmp_path / "run", model="D", freeze_until=until,
                       init_from=str(tmp_path / "w.safetensors")))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_freeze_until_fc7_trains_the_new_classifier_alone(data, tmp_path):
    source_weights(tmp_path / "w.safetensors", model="A")
    train(settings(data, tmp_path / "run", model="A", freeze_until="fc7",
                   init_from=str(tmp_path / "w.safetensors")))
    groups = load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]["param_groups"]
    assert [(g["lr_scale"], len(g["params"])) for g in groups] == [(1.0, 2)]


def test_freezing_a_layer_that_was_not_copied_is_refused(data, net_a, tmp_path):
    s = settings(data, tmp_path / "D", model="D", init_from=str(net_a),
                 freeze_until="conv3_2")  # conv1_2 and conv2_2 of D are not net A's
    with pytest.raises(ValueError, match="would keep conv1_2, conv2_2 fixed, which --init-from "
                                         "did not copy"):
        train(s)


def test_fine_tuning_options_need_init_from(data, tmp_path):
    with pytest.raises(ValueError, match="--freeze-until, --new-head only apply to the layers "
                                         "--init-from copies"):
        settings(data, tmp_path / "x", freeze_until="conv1_1", new_head=True)
    with pytest.raises(ValueError, match="--transfer-lr-factor must be > 0"):
        settings(data, tmp_path / "x", init_from="w", transfer_lr_factor=0.0)


def test_resumed_fine_tune_equals_the_uninterrupted_one(data, tmp_path):
    source_weights(tmp_path / "tv.safetensors", model="A")
    kw = dict(model="A", epochs=2, init_from=str(tmp_path / "tv.safetensors"),
              freeze_until="conv1_1")
    train(settings(data, tmp_path / "whole", **kw))

    def ctrl_c(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(settings(data, tmp_path / "cut", **kw), on_step=ctrl_c).status == "interrupted"
    assert train(resume=tmp_path / "cut").status == "finished"
    a = load_checkpoint(tmp_path / "whole" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["transfer"] == b["transfer"]


# --- a validation split from one folder -------------------------------------------------------
def test_val_split_of_one_folder_is_stored_and_checked_on_resume(folder, tmp_path):
    run = tmp_path / "run"

    def stop_at_once(step):
        os.kill(os.getpid(), signal.SIGINT)

    s = settings(folder, run, model="A", val_split=0.25, split_seed=3)
    assert train(s, on_step=stop_at_once).status == "interrupted"
    ckpt = load_checkpoint(run / "last.pt")
    # 8 images per class: 2 held out of each
    assert ckpt["split"]["val_images"] == 6 and ckpt["split"]["seed"] == 3
    assert json.loads((run / "split.json").read_text()) == ckpt["split"]
    from vggnet.data import open_dataset

    d = open_dataset(folder, val_split=0.25, split_seed=3)
    assert (len(d.train), len(d.val)) == (18, 6) and d.val.counts() == [2, 2, 2]
    assert ckpt["split"] == split_record(d.val.samples, 0.25, 3, root=folder)
    victim = sorted(d.val.paths)[0]
    os.rename(victim, victim + ".moved")  # the split the run started with is gone
    try:
        with pytest.raises(ValueError, match="the validation split differs"):
            train(resume=run)
    finally:
        os.rename(victim + ".moved", victim)
    assert train(resume=run).status == "finished"


def test_data_check_of_one_folder(folder, capsys):
    assert main(["data", "check", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "It looks like one folder per class: give --val-split 0.1" in err
    assert main(["data", "check", str(folder), "--val-split", "0.25", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "one folder per class, 0.25 of each held out for validation (seed 0)" in out
    assert "train: 18 files, 6-6 per class" in out and "val: 6 files, 2-2 per class" in out


def test_val_split_with_train_and_val_folders_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="has a train/ folder"):
        train(settings(data, tmp_path / "run", val_split=0.1))


# --- the command ---------------------------------------------------------------------------------
def test_finetune_command_end_to_end(folder, tmp_path, capsys):
    src = source_weights(tmp_path / "tv.safetensors", model="A", classes=3)
    run = tmp_path / "run"
    args = ["finetune", str(folder), "--weights", str(tmp_path / "tv.safetensors"),
            "--val-split", "0.25", "--epochs", "2", "--batch-size", "8", "--workers", "0",
            "--no-progress", "--out", str(run), "--precision", "fp32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fc8: a new classifier" in out and "fine-tuning finished after 2 epoch(s)" in out
    ckpt = load_checkpoint(run / "best.pt")
    s = ckpt["train_settings"]
    assert (s["model"], s["width"], s["crop_size"], s["scale"]) == ("A", 1 / 16, 32, [37, 37])
    assert s["new_head"] and s["init_from"] == str(tmp_path / "tv.safetensors")
    assert ckpt["preprocessing"] == preprocess.TORCHVISION.to_dict()
    assert "fc8" not in ckpt["transfer"]["copied"] and ckpt["transfer"]["lr_factor"] == 0.1
    assert not torch.equal(ckpt["model"]["classifier.fc8.weight"], src.classifier.fc8.weight)
    results = json.loads((run / "evaluation" / "results.json").read_text())
    assert results["method"] == "dense" and results["scales"] == [[37]]
    assert results["images"] == 6 and results["checkpoints"] == [str(run / "best.pt")]
    report = (run / "report.md").read_text()
    assert "## Evaluation of best.pt (the paper's protocol)" in report
    assert f"top-1 error {results['top1_err']:.2f}%" in report
    # a finished run resumed: nothing to train, nothing evaluated or written again
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "is finished after 2 epoch(s)" in out and "nothing was changed" in out
    assert (f"best.pt was evaluated when the run finished: top-1 error "
            f"{results['top1_err']:.2f}%") in out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    # a new run onto it names the command that continues it; --epochs extends it
    assert main(args) == 2
    assert f"continue it with `vggnet finetune --resume {run}`" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    assert "fine-tuning finished after 3 epoch(s)" in capsys.readouterr().out
    assert load_checkpoint(run / "last.pt")["epoch"] == 3
    assert (run / "report.md").read_text().count("## Evaluation of best.pt") == 1


def test_a_fine_tune_whose_dataset_moved_resumes_with_its_new_place(folder, tmp_path, capsys):
    """`vggnet finetune --resume RUN NEW_DIR` (before, only `vggnet train --resume --data`
    could, which skips finetune's evaluation)."""
    import shutil

    source_weights(tmp_path / "tv.safetensors", model="A", classes=3)
    shutil.copytree(folder, tmp_path / "d")
    run = tmp_path / "run"
    assert main(["finetune", str(tmp_path / "d"), "--weights", str(tmp_path / "tv.safetensors"),
                 "--val-split", "0.25", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                 "--no-progress", "--out", str(run), "--precision", "fp32"]) == 0
    (tmp_path / "d").rename(tmp_path / "moved")
    capsys.readouterr()
    resume = ["finetune", "--resume", str(run), "--epochs", "2", "--no-progress"]
    assert main(resume) == 2
    assert "`vggnet finetune --resume RUN NEW_DIR`" in capsys.readouterr().err
    assert main(resume + [str(tmp_path / "moved")]) == 0
    assert "fine-tuning finished after 2 epoch(s)" in capsys.readouterr().out
    assert load_checkpoint(run / "last.pt")["train_settings"]["data"] == str(tmp_path / "moved")
    assert (run / "report.md").read_text().count("## Evaluation of best.pt") == 1


@pytest.mark.parametrize("args,message", [
    (["finetune", "DIR"], "give the dataset folder and the weights to start from"),
    (["finetune", "--resume", "R", "--weights", "W"], "--resume continues a run with its own"),
    (["finetune", "DIR", "--weights", "nope.safetensors"], "neither a run folder nor a"),
    (["finetune", "DIR", "--weights", "W", "--transfer-lr-factor", "0"],
     "--transfer-lr-factor must be > 0"),
])
def test_finetune_command_errors(tmp_path, capsys, args, message):
    source_weights(tmp_path / "W", model="A", classes=3)
    monkey = {"DIR": str(tmp_path), "W": str(tmp_path / "W"), "R": str(tmp_path)}
    assert main([monkey.get(a, a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vggnet finetune: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
