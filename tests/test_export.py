"""Exported graphs run outside our model code (onnxruntime, the TorchScript loader) and match
PyTorch to 1e-4 at sizes other than the one they were exported with."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import vggnet
from vggnet import preprocess
from vggnet.cli import main
from vggnet.weights import save_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = vggnet.create_model("B", num_classes=5, width=1 / 16, crop_size=64, seed=3).eval()
    with torch.no_grad():  # non-zero biases, so a dropped bias would show
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("export") / "b.safetensors"
    save_weights(path, model, preprocess.CAFFE, list("abcde"))
    return path, model


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]


def test_onnx_classifier_and_dense(weights, tmp_path, capsys):
    path, model = weights
    onnx_args = ["export", "--weights", str(path), "--format", "onnx"]
    assert main([*onnx_args, "--out", str(tmp_path / "c.onnx")]) == 0
    assert main([*onnx_args, "--dense", "--out", str(tmp_path / "d.onnx")]) == 0
    assert capsys.readouterr().out.count("checked on") == 4
    props = onnx.load(str(tmp_path / "d.onnx")).metadata_props
    meta = json.loads({p.key: p.value for p in props}["vggnet"])
    assert meta["graph"] == "dense" and meta["class_names"] == list("abcde")
    assert meta["preprocessing"]["channel_order"] == "BGR"
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 64, 64, generator=gen)
    with torch.no_grad():
        ref = model(x).numpy()
    got = _ort(tmp_path / "c.onnx", x)
    assert ref.std() > 0.01
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    for shape in [(1, 3, 96, 64), (3, 3, 128, 160)]:  # dynamic batch, height and width
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            ref = model.forward_dense(x).numpy()
        got = _ort(tmp_path / "d.onnx", x)
        assert got.shape == ref.shape == (shape[0], 5, shape[2] // 32 - 1, shape[3] // 32 - 1)
        np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_torchscript_dense(weights, tmp_path):
    path, model = weights
    out = tmp_path / "d.pt"
    assert main(["export", "--weights", str(path), "--format", "torchscript", "--dense",
                 "--out", str(out)]) == 0
    extra = {"vggnet.json": ""}
    with pytest.warns(DeprecationWarning):  # torch.jit is deprecated in favour of torch.export
        scripted = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["vggnet.json"])["model_config"]["arch"] == "B"
    for shape in [(2, 3, 64, 64), (1, 3, 160, 96)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model.forward_dense(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("prep", ["torchvision", "caffe"])
def test_the_docs_onnxruntime_script_gives_predicts_top5(tmp_path, monkeypatch, capsys, prep):
    """docs/weights.md's script, on the exported file alone (metadata: resize rule,
    normalisation, readable class names), prints the top 5 that `vggnet predict` prints."""
    import re

    from PIL import Image

    from docblocks import REPO, blocks
    from vggnet.imagenet import imagenet_wnids

    model = vggnet.create_model("A", num_classes=1000, width=1 / 16, crop_size=32, seed=1).eval()
    with torch.no_grad():  # five clear winners, in an order the image still shifts a little
        model.classifier.fc8.bias.copy_(torch.full((1000,), -4.0))
        model.classifier.fc8.bias[[7, 281, 3, 999, 500]] = torch.tensor([3.0, 2.2, 1.4, 0.6, 0.0])
    preprocessing = {"torchvision": preprocess.TORCHVISION, "caffe": preprocess.CAFFE}[prep]
    save_weights(tmp_path / "w.safetensors", model, preprocessing, imagenet_wnids())
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(small).resize((90, 60), Image.BICUBIC).save("cat.jpg", quality=95)
    assert main(["export", "--weights", "w.safetensors", "--out", "vgg16.onnx"]) == 0
    assert main(["predict", "cat.jpg", "--weights", "w.safetensors", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    want = re.findall(r"^  \d\. +([\d.]+)%  (.+) \(n\d+\) \[(\d+)\]$", out, re.M)
    script = next(b for b in blocks(REPO / "docs" / "weights.md", "python")
                  if "onnxruntime" in b.code)
    exec(compile(script.code, script.where, "exec"), {})
    got = re.findall(r"^ *([\d.]+)%  (.+) \[(\d+)\]$", capsys.readouterr().out, re.M)
    assert [(n, i) for _, n, i in got] == [(n, i) for _, n, i in want]
    assert [i for _, _, i in got] == ["7", "281", "3", "999", "500"]
    assert got[0][1] == "cock" and got[2][1] == "tiger shark"  # readable, not WordNet ids
    for (p_got, _, _), (p_want, _, _) in zip(got, want, strict=True):
        assert abs(float(p_got) - float(p_want)) <= 0.5, (got, want)  # a wrong flip: 2.3
    meta = json.loads({p.key: p.value for p in onnx.load("vgg16.onnx").metadata_props}["vggnet"])
    assert meta["resize"]["shorter_side"] == 37 and meta["resize"]["crop"] == 32
    assert meta["normalize"]["scale"] == preprocessing.scale
    assert meta["class_labels"][281] == "tabby" and meta["class_names"][281] == "n02123045"
