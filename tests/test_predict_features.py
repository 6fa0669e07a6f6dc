"""predict, features and probe on a tiny net whose weights are built so that known inputs
trigger known classes."""

import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

import vggnet
from vggnet import preprocess
from vggnet.cli import main
from vggnet.features import layer_taps
from vggnet.transforms import EvalTransform
from vggnet.weights import LoadedModel, load_model, save_weights

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
PREP = preprocess.paper((120.0, 115.0, 105.0))


def _image(path, rgb, seed, size=(52, 40)):
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(rgb) + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(path)
    return path


@pytest.fixture(scope="module")
def colour_net(tmp_path_factory):
    """A random tiny net whose fc8 is set so that each colour's image wins its own class: row j
    of fc8 is the direction of image j's centred relu7 descriptor c_j, so image j's logits are
    |c_j| cos(c_j, c_k), largest for k = j; scaled to a margin of 8 between first and second."""
    d = tmp_path_factory.mktemp("colours")
    model = vggnet.create_model("A", num_classes=3, width=1 / 16, crop_size=32, seed=0).eval()
    loaded = LoadedModel(model, PREP, list(COLOURS))
    images = {c: _image(d / f"{c}.png", rgb, seed=i) for i, (c, rgb) in enumerate(COLOURS.items())}
    feats = layer_taps(loaded, [images[c] for c in COLOURS], ["relu7"])["relu7"]
    rows = F.normalize(feats - feats.mean(0), dim=1)
    logits = (feats - feats.mean(0)) @ rows.T
    margin = min(logits[j, j] - logits[j].sort().values[-2] for j in range(3))
    with torch.no_grad():
        model.classifier.fc8.weight.copy_(rows * 8 / margin)
        model.classifier.fc8.bias.copy_(-(rows * 8 / margin) @ feats.mean(0))
    save_weights(d / "colours.safetensors", model, PREP, list(COLOURS))
    return d / "colours.safetensors", images


@pytest.mark.cpu_sensitive
@pytest.mark.parametrize("dense", [False, True])
def test_predict_prints_the_triggered_class(colour_net, dense, capsys):
    weights, images = colour_net
    args = ["predict", *(str(images[c]) for c in COLOURS), "--weights", str(weights), "--top", "2"]
    assert main(args + (["--dense", "--scales", "32,48"] if dense else [])) == 0
    out = capsys.readouterr().out.splitlines()
    for i, colour in enumerate(COLOURS):
        assert out[3 * i].endswith(f"{colour}.png")
        first, second = out[3 * i + 1], out[3 * i + 2]
        assert first.startswith("  1.") and first.endswith(f"  {colour} [{i}]")
        assert float(first.split()[1].rstrip("%")) > 50 > float(second.split()[1].rstrip("%"))


@pytest.mark.cpu_sensitive
def test_predict_int8_keeps_the_triggered_class(colour_net, tmp_path, capsys):
    weights, images = colour_net
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, (c, rgb) in enumerate(COLOURS.items()):
        for j in range(3):
            _image(calib / f"{c}{j}.png", rgb, seed=10 + 3 * i + j)
    (calib / "zz-broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # skipped, last in order
    args = ["predict", *(str(images[c]) for c in COLOURS), "--weights", str(weights), "--top", "1"]
    assert main(args + ["--int8", str(calib)]) == 0
    out = capsys.readouterr().out.splitlines()
    for i, colour in enumerate(COLOURS):
        assert out[2 * i + 1].endswith(f"  {colour} [{i}]")
    assert main(args + ["--int8", str(calib), "--dense"]) == 2
    assert "int8 runs crop-sized input only" in capsys.readouterr().err
    # the float32 layers are the user's choice, checked before any image is read
    assert main(args + ["--int8", str(calib), "--int8-float", "fc8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert all(out[2 * i + 1].endswith(f"  {c} [{i}]") for i, c in enumerate(COLOURS))
    assert main(args + ["--int8", str(calib), "--int8-float", "conv1_1,fc9"]) == 2
    assert "unknown layer(s) ['fc9']" in capsys.readouterr().err
    assert main(args + ["--int8-float", "fc8"]) == 2
    assert "give --int8 CALIBRATION_DIR with it" in capsys.readouterr().err


def test_predict_reports_bad_images_and_goes_on(colour_net, tmp_path, capsys):
    weights, images = colour_net
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["predict", str(tmp_path / "broken.jpg"), str(images["blue"]),
                 "--weights", str(weights)]) == 1
    captured = capsys.readouterr()
    assert "blue [2]" in captured.out and "broken.jpg" not in captured.out
    assert re.search(r"1 of 2 file\(s\) could not be read:\n  \S*broken.jpg: \w", captured.err)


def test_predict_takes_folders_and_writes_csv_or_json(colour_net, tmp_path, capsys):
    """Folders are searched recursively; bad files are listed with their reasons (exit code 1)
    and the predictions go to a CSV or JSON file with the usual permissions."""
    import csv

    weights, images = colour_net
    (tmp_path / "photos" / "deeper").mkdir(parents=True)
    for i, colour in enumerate(COLOURS):
        _image(tmp_path / "photos" / ("deeper" if i else "") / f"{colour}.png", COLOURS[colour],
               seed=i)
    (tmp_path / "photos" / "deeper" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "photos" / "notes.txt").write_text("not an image: not listed")
    args = ["predict", str(tmp_path / "photos"), "--weights", str(weights), "--top", "2"]
    assert main(args + ["--out", str(tmp_path / "p.csv")]) == 1
    captured = capsys.readouterr()
    assert "3 image(s) classified: top 2 classes in" in captured.out
    assert re.search(r"1 of 4 file\(s\) could not be read:\n  \S*deeper/broken.jpg: ",
                     captured.err)
    assert re.search(r"predicting: .*/4 \[\d\d:\d\d<", captured.err)  # a bar with ETA
    rows = {r["path"].split("photos/")[1]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert set(rows) == {"red.png", "deeper/green.png", "deeper/blue.png", "deeper/broken.jpg"}
    for colour, index in (("red", 0), ("green", 1), ("blue", 2)):
        r = rows[colour + ".png"] if colour == "red" else rows[f"deeper/{colour}.png"]
        assert (r["index_1"], r["class_1"], r["name_1"]) == (str(index), colour, colour)
        assert float(r["probability_1"]) > 0.5 > float(r["probability_2"]) and r["error"] == ""
    assert rows["deeper/broken.jpg"]["error"] and rows["deeper/broken.jpg"]["class_1"] == ""
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "p.csv").stat().st_mode & 0o777 == 0o666 & ~umask
    assert main(args + ["--out", str(tmp_path / "p.json"), "--dense", "--scales", "32,40"]) == 1
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["method"] == "dense" and data["scales"] == [32, 40]
    red = next(p for p in data["predictions"] if p["path"].endswith("red.png"))
    assert [t["class"] for t in red["top"]][:1] == ["red"] and len(red["top"]) == 2
    assert set(red["top"][0]) == {"index", "class", "name", "probability"}
    # a wrong output name is refused before any work
    assert main(args + ["--out", str(tmp_path / "p.txt")]) == 2
    assert "must end in .csv or .json" in capsys.readouterr().err


@pytest.mark.cpu_sensitive
def test_feature_taps(colour_net, tmp_path):
    weights, images = colour_net
    out = tmp_path / "taps.safetensors"
    assert main(["features", str(images["red"].parent), "--weights", str(weights),
                 "--layers", "relu1_1,relu2_1", "--out", str(out), "--precision", "fp32"]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["vggnet"])
        taps = {k: f.get_tensor(k) for k in f.keys()}
    assert [p.rsplit("/", 1)[-1] for p in meta["paths"]] == ["blue.png", "green.png", "red.png"]
    assert taps["relu1_1"].shape == (3, 4, 32, 32) and taps["relu2_1"].shape == (3, 8, 16, 16)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    # blue.png: the evaluation crop (shorter side 32, centre 32x32), the file's preprocessing
    # (mean RGB), conv1_1 + ReLU
    model = load_model(weights).model
    x = torch.from_numpy(EvalTransform(32, 32)(images["blue"]).copy()).permute(2, 0, 1)[None]
    x = x.float() - torch.tensor(PREP.mean).view(1, 3, 1, 1)
    conv1_1 = model.features.conv1_1
    expected = F.relu(F.conv2d(x, conv1_1.weight, conv1_1.bias, padding=1))
    torch.testing.assert_close(taps["relu1_1"][0:1], expected)


def test_an_unknown_tap_is_refused_before_any_image(colour_net, tmp_path, capsys):
    weights, images = colour_net
    out = tmp_path / "taps.safetensors"
    assert main(["features", str(images["red"].parent), "--weights", str(weights),
                 "--layers", "relu1_1,relu9_9", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vggnet features: error: unknown layer(s) ['relu9_9'] for VGG A; "
                          "available: ['conv1_1', 'relu1_1', "), err  # no progress bar first
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_transfer_descriptor_follows_appendix_b(colour_net, tmp_path):
    weights, images = colour_net
    out = tmp_path / "transfer.npz"
    assert main(["features", str(images["green"]), str(images["red"]), "--weights", str(weights),
                 "--scales", "32,40", "--out", str(out), "--precision", "fp32"]) == 0
    got = np.load(out)["features"]
    assert got.shape == (2, 256)
    # by hand: fc6 as a 1x1 conv over pool5 (crop 32: pool5 is 1x1), fc7 1x1; ReLUs; mean over
    # locations, the mirror image and both scales; then L2 normalisation
    model = load_model(weights).model
    c = model.classifier
    descriptor = torch.zeros(256)
    for q in (32, 40):
        x = torch.from_numpy(EvalTransform(q, None)(images["green"]).copy())
        x = x.permute(2, 0, 1)[None].float()
        for img in (x, x.flip(-1)):
            pool5 = model.features(img - torch.tensor(PREP.mean).view(1, 3, 1, 1))
            fc6 = F.relu(F.conv2d(pool5, c.fc6.weight[:, :, None, None], c.fc6.bias))
            fc7 = F.relu(F.conv2d(fc6, c.fc7.weight[:, :, None, None], c.fc7.bias))
            descriptor += fc7.mean(dim=(0, 2, 3)).detach()
    np.testing.assert_allclose(got[0], (descriptor / descriptor.norm()).numpy(), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_probe_separates_colours(colour_net, tmp_path, capsys):
    weights, _ = colour_net
    for split, n in (("train", 4), ("val", 2)):
        for j, colour in enumerate(("red", "blue")):
            (tmp_path / split / colour).mkdir(parents=True)
            for i in range(n):
                _image(tmp_path / split / colour / f"{i}.png", COLOURS[colour],
                       seed=100 * j + 10 * i + n)
    assert main(["probe", "--weights", str(weights), "--data", str(tmp_path),
                 "--scales", "32,40"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    for split in ("train", "val"):  # a bar with ETA per split
        assert re.search(rf"{split} descriptors: .*\d+/\d+ \[\d\d:\d\d<", captured.err), split
    assert "2 classes, 8 train / 4 val images" in out
    assert "train accuracy 100.00%, val accuracy 100.00%" in out


@pytest.mark.cpu_sensitive
def test_int8_model_keeps_the_float_layers_it_is_given(colour_net):
    from vggnet.predict import int8_model
    from vggnet.transforms import EvalTransform
    from vggnet.weights import load_model

    weights, images = colour_net
    loaded = load_model(weights)
    crop = loaded.model.config.crop_size
    files = [images[c] for c in COLOURS]

    def kinds(float_layers):
        q = int8_model(loaded, files, EvalTransform(crop, crop), float_layers=float_layers)
        modules = dict(q.named_modules())
        return [type(modules[f"graph.{n}"]).__module__.startswith("torch.ao.nn.")
                for n in ("features.conv1_1", "classifier.fc8")]

    assert kinds(None) == [False, False]  # quantize.FLOAT_LAYERS: both float32
    assert kinds(["fc8"]) == [True, False]
    assert kinds([]) == [True, True]
