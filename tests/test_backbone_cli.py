"""The backbone commands (stylize, explain, retrieve, features --pool): what they write and
print at tiny sizes, and their one-line errors before any work."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vggnet import preprocess
from vggnet.cli import main
from vggnet.explain import resolve_target
from vggnet.model import create_model
from vggnet.retrieval import DescriptorSettings, describe
from vggnet.runtime import make_runtime
from vggnet.weights import load_model, save_weights

NAMES = ["disc", "ring", "n01440764", "crane", "crane"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny VGG-16 (5 classes, crop 32) and a few images: photos/a.png, photos/b.jpg,
    photos/broken.jpg (not an image), db/ with two pictures and a broken one."""
    root = tmp_path_factory.mktemp("backbone")
    net = create_model("D", num_classes=5, width=1 / 16, crop_size=32, seed=0)
    save_weights(root / "w.safetensors", net, preprocess.TORCHVISION, class_names=NAMES)
    rng = np.random.default_rng(0)
    for folder, names in (("photos", ("a.png", "b.jpg")), ("db", ("red.png", "blue.png"))):
        (root / folder).mkdir()
        for i, name in enumerate(names):
            pixels = rng.integers(0, 256, (36, 48, 3), dtype=np.uint8) // (i + 1)
            Image.fromarray(pixels).save(root / folder / name)
        (root / folder / "broken.jpg").write_bytes(b"not a picture")
    return root


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- stylize -----------------------------------------------------------------------------------
def test_stylize_writes_the_image(files, tmp_path, capsys):
    code, out, _ = run(capsys, "stylize", files / "photos" / "a.png", files / "db" / "red.png",
                       "--weights", files / "w.safetensors", "--out", tmp_path / "s.png",
                       "--steps", 3, "--size", 32, "--style-layers", "relu1_1,relu2_1",
                       "--content-layers", "relu2_2", "--optimizer", "adam", "--no-progress")
    assert code == 0 and out.startswith("3 objective evaluations: content ")
    assert Image.open(tmp_path / "s.png").size == (32, 24)  # longer side 32 of a 48 x 36 photo


@pytest.mark.parametrize("args,message", [
    (["--style-layers", "relu9_9"], "unknown layer(s) ['relu9_9'] for VGG D; valid: conv1_1"),
    (["--out", "s.txt"], "stylized image output 's.txt' must end in .png or .jpg"),
    (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
])
def test_stylize_errors(files, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    base = ["stylize", files / "photos" / "a.png", files / "db" / "red.png", "--weights",
            files / "w.safetensors", "--out", "s.png", "--steps", 1, "--no-progress"]
    if args[0] == "--optimizer":
        with pytest.raises(SystemExit):
            run(capsys, *base, *args)
        assert message in capsys.readouterr().err
        return
    code, _, err = run(capsys, *base, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.png").exists()


# --- explain -----------------------------------------------------------------------------------
def test_explain_writes_pngs_and_lists_the_skipped(files, tmp_path, capsys):
    code, out, _ = run(capsys, "explain", files / "photos", "--weights", files / "w.safetensors",
                       "--out", tmp_path / "ex", "--target", "ring", "--raw", "--no-progress")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == [
        "a.png", "a.safetensors", "b.png", "b.safetensors"]
    lines = out.splitlines()
    assert lines[:2] == [f"{files / 'photos' / 'a.png'}: ring (class 1)",
                         f"{files / 'photos' / 'b.jpg'}: ring (class 1)"]
    assert lines[2] == (f"wrote 2 explanation(s) to {tmp_path / 'ex'}; skipped 1 image(s) that "
                        "could not be decoded:")
    assert lines[3].startswith(f"  {files / 'photos' / 'broken.jpg'}: ")
    with safe_open(str(tmp_path / "ex" / "a.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["gradcam", "saliency"]
        assert json.loads(f.metadata()["vggnet"])["target"] == 1


def test_explain_one_method_at_a_layer(files, tmp_path, capsys):
    code, out, _ = run(capsys, "explain", files / "photos" / "a.png", "--weights",
                       files / "w.safetensors", "--out", tmp_path / "ex", "--method", "gradcam",
                       "--layer", "conv4_3", "--raw", "--no-progress")
    assert code == 0
    with safe_open(str(tmp_path / "ex" / "a.safetensors"), "pt") as f:
        assert list(f.keys()) == ["gradcam"] and f.get_tensor("gradcam").shape == (4, 4)
        assert json.loads(f.metadata()["vggnet"])["layer"] == "conv4_3"


@pytest.mark.parametrize("args,message", [
    (["--layer", "conv9"], "unknown Grad-CAM layer(s) ['conv9'] for VGG D; valid: conv1_1, "
                           "relu1_1, conv1_2"),
    (["--target", "7"], "--target 7 is not a class index of these weights (0 to 4)"),
    (["--target", "crane"], "--target 'crane' names 2 classes (3: crane, 4: crane); give the "
                            "index instead"),
    (["--target", "dog"], "--target 'dog' is not a class of these weights; give an index (0 to "
                          "4) or a name, e.g. disc, ring, tench (n01440764)"),
])
def test_explain_errors_before_any_image(files, tmp_path, capsys, args, message):
    code, _, err = run(capsys, "explain", files / "photos", "--weights", files / "w.safetensors",
                       "--out", tmp_path / "ex", "--no-progress", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ex").exists()


def test_resolve_target_by_readable_imagenet_name():
    assert resolve_target("Tench", NAMES, 5) == 2 and resolve_target("n01440764", NAMES, 5) == 2
    assert resolve_target(None, NAMES, 5) is None and resolve_target("0", None, 5) == 0


# --- retrieval ---------------------------------------------------------------------------------
def test_retrieve_writes_topk_and_the_sheet(files, tmp_path, capsys):
    code, out, _ = run(capsys, "retrieve", files / "photos", files / "db", "--weights",
                       files / "w.safetensors", "--out", tmp_path / "r", "--k", 2,
                       "--pool", "mac", "--scales", "48,34", "--no-progress",
                       "--precision", "fp32")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["contact_sheet.png", "topk.csv"]
    with open(tmp_path / "r" / "topk.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["query"], r["rank"]) for r in rows] == [
        (str(files / "photos" / q), k) for q in ("a.png", "b.jpg") for k in ("1", "2")]
    assert {r["match"] for r in rows} == {str(files / "db" / n) for n in ("blue.png", "red.png")}
    assert out.splitlines()[0].startswith(f"{files / 'photos' / 'a.png'}: best {files / 'db'}")
    assert "skipped 2 image(s):" in out  # the broken query and the broken database image


def test_retrieve_errors(files, tmp_path, capsys):
    code, _, err = run(capsys, "retrieve", files / "photos", tmp_path / "none", "--weights",
                       files / "w.safetensors", "--out", tmp_path / "r")
    assert code == 2 and "is neither an image file nor a folder" in err
    code, _, err = run(capsys, "retrieve", files / "photos", files / "db", "--weights",
                       files / "w.safetensors", "--out", tmp_path / "r", "--k", 0)
    assert code == 2 and "-k must be at least 1, got 0" in err


# --- features --pool ---------------------------------------------------------------------------
def test_features_pool_equals_describe(files, tmp_path, capsys):
    code, out, _ = run(capsys, "features", files / "db", "--weights", files / "w.safetensors",
                       "--pool", "gem", "--gem-p", 2, "--scales", "48,34", "--out",
                       tmp_path / "d.safetensors", "--no-progress", "--precision", "fp32")
    assert code == 0 and out.startswith("2 images: descriptors (2, 32)")
    assert "skipped 1 image(s):" in out and "broken.jpg" in out
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        got = f.get_tensor("descriptors")
        meta = json.loads(f.metadata()["vggnet"])
    paths = [str(files / "db" / n) for n in ("blue.png", "red.png")]
    assert meta["paths"] == paths and meta["longer_sides"] == [48, 34]
    assert (meta["pool"], meta["gem_p"], meta["layer"]) == ("gem", 2.0, "relu5_3")
    want, _, _ = describe(load_model(files / "w.safetensors"), paths,
                          DescriptorSettings(pool="gem", p=2.0, size=48, scales=(1.0, 34 / 48)),
                          make_runtime("cpu", "fp32"), progress=False)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)


def test_features_pool_errors(files, tmp_path, capsys):
    code, _, err = run(capsys, "features", files / "db", "--weights", files / "w.safetensors",
                       "--pool", "mac", "--layers", "relu1_1", "--out", tmp_path / "d.npz")
    assert code == 2 and "--pool and --layers ask for two kinds of output; give one" in err
    code, _, err = run(capsys, "features", files / "db", "--weights", files / "w.safetensors",
                       "--pool", "mac", "--scales", "8", "--out", tmp_path / "d.npz")
    assert code == 2 and "--scales are longer image sides in pixels" in err
