"""Style transfer at tiny sizes: both optimisers lower the style loss, the result stays an
image, the file front end writes a PNG of the content's shape."""

import numpy as np
import pytest
import torch
from PIL import Image

import vggnet
from vggnet import preprocess
from vggnet.stylize import StylizeSettings, read_image, stylize, stylize_files
from vggnet.weights import LoadedModel, save_weights


def tiny(prep=preprocess.TORCHVISION):
    model = vggnet.create_model("A", num_classes=3, width=1 / 16, crop_size=32, seed=0).eval()
    return LoadedModel(model, prep)


def stripes(h, w, seed):
    """Content: smooth blobs; style: high-contrast diagonal stripes."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    style = ((xx + yy) // 3 % 2).float().expand(3, h, w).clone()
    style[1] *= 0.3
    content = torch.rand(1, 3, 4, 4, generator=gen)
    content = torch.nn.functional.interpolate(content, (h, w), mode="bilinear", align_corners=False)
    return content, style[None]


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
@pytest.mark.parametrize("prep", ["torchvision", "caffe"])
def test_style_loss_decreases(optimizer, prep):
    content, style = stripes(24, 28, seed=0)
    # a random net's relu3_1 of a smooth photo is nearly zero, which makes the relative content
    # term large: a larger style weight than the default lets the style term move here
    settings = StylizeSettings(steps=15, optimizer=optimizer, lr=0.05, style_weight=1e4,
                               style_layers=("relu1_1", "relu2_1", "relu3_1"),
                               content_layers=("relu3_1",))
    loaded = tiny(preprocess.TORCHVISION if prep == "torchvision" else preprocess.CAFFE)
    image, history = stylize(content, style, loaded, settings, progress=False)
    assert len(history) == 15
    assert history[0]["content"] == 0.0  # starts from the content photo
    assert history[-1]["style"] < 0.5 * history[0]["style"]
    assert image.shape == content.shape and 0 <= image.min() and image.max() <= 1
    assert not torch.equal(image, content)


def test_noise_start_is_seeded():
    content, style = stripes(16, 16, seed=1)
    settings = StylizeSettings(steps=3, optimizer="adam", init="noise", seed=5,
                               style_layers=("relu1_1",), content_layers=("relu2_1",))
    a, ha = stylize(content, style, tiny(), settings, progress=False)
    b, hb = stylize(content, style, tiny(), settings, progress=False)
    assert torch.equal(a, b) and ha == hb
    assert ha[0]["content"] > 0


def test_stylize_files_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    Image.fromarray(rng.integers(0, 256, (50, 20, 3), dtype=np.uint8)).save(tmp_path / "s.jpg")
    save_weights(tmp_path / "w.safetensors", tiny().model, preprocess.CAFFE)
    assert read_image(tmp_path / "c.png", 20).shape == (1, 3, 15, 20)
    settings = StylizeSettings(steps=2, size=20, style_layers=("relu1_1",),
                               content_layers=("relu2_1",))
    history = stylize_files(tmp_path / "c.png", tmp_path / "s.jpg", tmp_path / "w.safetensors",
                            tmp_path / "out" / "o.png", settings, progress=False)
    assert len(history) == 2
    with Image.open(tmp_path / "out" / "o.png") as im:
        assert (im.size, im.mode) == ((20, 15), "RGB")


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="optimizer must be one of .* got 'sgd'"):
        StylizeSettings(optimizer="sgd")
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        StylizeSettings(steps=0)
