"""Saliency and Grad-CAM: exact maps on a hand-built net whose class score is the brightest
pixel, Grad-CAM against a re-implementation of pytorch-grad-cam's GradCAM pipeline, the
overlay's colours, the rendered PNG and the raw maps file."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import vggnet
from vggnet import preprocess
from vggnet.explain import (
    default_cam_layer,
    explain_files,
    explain_pixels,
    gradcam,
    heatmap,
    overlay,
    saliency,
)
from vggnet.weights import load_model, save_weights


def max_pixel_net() -> vggnet.VGG:
    """VGG A at width 1/64 (channels 1, 2, 4, 8, 8), crop 32, all weights zero except a path
    that carries input channel 0 unchanged: every conv's centre tap from channel 0 to channel
    0, fc6/fc7 unit 0 from unit 0, fc8 class 2 from unit 0. For a non-negative input, class 2's
    score is the maximum of channel 0 (the pools), the other classes score 0."""
    model = vggnet.create_model("A", num_classes=3, width=1 / 64, crop_size=32, seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, m in model.features.named_children():
            if name.startswith("conv"):
                m.weight[0, 0, 1, 1] = 1.0
        model.classifier.fc6.weight[0, 0] = 1.0
        model.classifier.fc7.weight[0, 0] = 1.0
        model.classifier.fc8.weight[2, 0] = 1.0
    return model


def spot(r, c, v=2.0, size=32):
    x = torch.zeros(1, 3, size, size)
    x[0, 0, r, c] = v
    return x


@pytest.mark.parametrize("r,c", [(3, 29), (20, 7), (31, 0)])
def test_saliency_is_one_at_the_deciding_pixel(r, c):
    model = max_pixel_net()
    maps, targets = saliency(model, spot(r, c))
    assert targets.tolist() == [2]
    want = torch.zeros(1, 32, 32)
    want[0, r, c] = 1.0  # d max / d x = 1 at the argmax only
    assert torch.equal(maps, want)
    zero, _ = saliency(model, spot(r, c), target=0)  # class 0 does not depend on the image
    assert zero.abs().sum() == 0


def test_saliency_dense_input_averages_locations():
    """At 64x64 the classifier runs densely on a 2x2 pool5 grid and the scores are averaged:
    the spot's window contributes 1/4; the empty windows' zero fc6 units pass no gradient."""
    maps, _ = saliency(max_pixel_net(), spot(40, 10, size=64))
    want = torch.zeros(1, 64, 64)
    want[0, 40, 10] = 0.25
    assert torch.equal(maps, want)


@pytest.mark.parametrize("layer,cell,value", [("relu4_2", 8, 2.0 / 16), ("relu5_2", 16, 2.0 / 4),
                                              ("conv5_2", 16, 2.0 / 4)])
def test_gradcam_lights_the_spots_cell(layer, cell, value):
    """At a layer of stride s, channel 0 holds the maximum of each s x s cell, the score's
    gradient is 1 at the winning cell only, so alpha_0 = 1/(h*w) and the map is v/(h*w) there."""
    model = max_pixel_net()
    r, c = 21, 5
    cams, targets = gradcam(model, spot(r, c), layer)
    side = 32 // cell
    want = torch.zeros(1, side, side)
    want[0, r // cell, c // cell] = value
    assert targets.tolist() == [2]
    torch.testing.assert_close(cams, want, rtol=0, atol=1e-7)


def test_default_layer_and_bad_names():
    assert default_cam_layer(max_pixel_net()) == "relu5_2"
    assert default_cam_layer(vggnet.create_model("D", width=1 / 64, crop_size=32)) == "relu5_3"
    assert default_cam_layer(vggnet.create_model("E", width=1 / 64, crop_size=32)) == "relu5_4"
    with pytest.raises(ValueError,
                       match=r"unknown Grad-CAM layer\(s\) \['fc7'\] .* valid: conv1_1"):
        gradcam(max_pixel_net(), spot(1, 1), "fc7")
    with pytest.raises(ValueError, match=r"target 3 must be a class index in \[0, 3\)"):
        saliency(max_pixel_net(), spot(1, 1), target=3)


def grad_cam_package_formula(model: nn.Module, target_layer: nn.Module, x, category):
    """pytorch-grad-cam 1.5.7's GradCAM(model, [target_layer])(x, [ClassifierOutputTarget(c)])
    written out (the package imports torchvision and cv2, so it is not run here): forward hook
    saves the layer's output and a tensor hook its gradient; weights = mean of the gradient
    over (h, w); cam = ReLU(sum_k w_k A_k); scale_cam_image: (cam - min) / (1e-7 + max), then
    cv2.resize to the input (bilinear, half-pixel centres: F.interpolate align_corners=False);
    aggregate_multi_layers: ReLU, mean over the one layer, scale_cam_image again."""
    saved = {}

    def hook(module, inputs, output):
        saved["a"] = output.detach()
        output.register_hook(lambda g: saved.__setitem__("g", g.detach()))

    handle = target_layer.register_forward_hook(hook)
    out = model(x)
    model.zero_grad()
    out[:, category].sum().backward()
    handle.remove()
    w = saved["g"].numpy().mean(axis=(2, 3))
    cam = np.maximum((w[:, :, None, None] * saved["a"].numpy()).sum(axis=1), 0)

    def scale(img, size=None):
        img = img - img.min()
        img = img / (1e-7 + img.max())
        if size is not None:
            img = F.interpolate(torch.from_numpy(np.float32(img))[None, None], size=size,
                                mode="bilinear", align_corners=False)[0, 0].numpy()
        return np.float32(img)

    scaled = np.stack([scale(c, tuple(x.shape[-2:])) for c in cam])
    return np.stack([scale(np.maximum(c, 0)) for c in scaled])


@pytest.mark.parametrize("layer", ["relu4_1", "conv5_1", "relu5_2"])
def test_gradcam_matches_pytorch_grad_cam(layer):
    torch.manual_seed(0)
    model = vggnet.create_model("A", num_classes=5, width=1 / 16, crop_size=64, seed=3).eval()
    x = torch.randn(2, 3, 64, 64)
    cams, targets = gradcam(model, x, layer)
    # the reference hooks the module itself, so ReLUs must not overwrite a conv's output in place
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    for i in range(2):
        want = grad_cam_package_formula(model, model.features.get_submodule(layer), x[i:i + 1],
                                        int(targets[i]))
        got = heatmap(cams[i:i + 1], (64, 64)).numpy()
        assert want.max() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_heatmap_scales_to_unit_range():
    raw = torch.tensor([[[0.0, 2.0], [4.0, 8.0]]])
    h = heatmap(raw, (2, 2))  # same size: only the min-max scaling, twice
    torch.testing.assert_close(h, raw / (8.0 + 1e-7) / (8.0 / (8.0 + 1e-7) + 1e-7))
    up = heatmap(raw, (4, 4))
    assert up.shape == (1, 4, 4) and up[0, 0, 0] == 0 and up[0, 3, 3] == pytest.approx(1.0)


def test_overlay_colours():
    photo = np.zeros((2, 3, 3), np.uint8)
    photo[0, 0] = (200, 100, 0)
    heat = np.zeros((2, 3))
    heat[1, 2] = 1.0
    out = overlay(photo, heat, alpha=0.5)
    assert out[1, 2].tolist() == [64, 0, 0]  # half of jet(1) = (0.5, 0, 0) * 255
    assert out[0, 0].tolist() == [100, 50, 64]  # half the photo + half of jet(0) = (0, 0, 0.5)


@pytest.fixture()
def spot_weights(tmp_path):
    """The max-pixel net with the paper's preprocessing at zero mean and three class names,
    and a 40x40 photo whose brightest red pixel sits in the centre crop at (30, 9)."""
    prep = preprocess.paper((0.0, 0.0, 0.0))
    save_weights(tmp_path / "w.safetensors", max_pixel_net(), prep, ["cat", "dog", "red dot"])
    a = np.zeros((37, 37, 3), np.uint8)  # 37 = centre_crop_resize(32): no rescale, crop at (2, 2)
    a[32, 11] = (250, 0, 0)
    Image.fromarray(a).save(tmp_path / "photo.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    return tmp_path


def test_explain_files_writes_pngs_and_raw_maps(spot_weights):
    d = spot_weights
    loaded = load_model(d / "w.safetensors")
    results = explain_files(loaded, [d / "photo.png", d / "broken.jpg", d / "photo.png"],
                            d / "out", raw=True, progress=False)
    good, bad, again = results
    assert bad.error and "broken.jpg" in bad.error and not bad.maps
    assert good.top[0][1] == "red dot" and good.target == 2 and good.layer == "relu5_2"
    sal = good.maps["saliency"]
    assert sal.shape == (32, 32) and sal.argmax().item() == 30 * 32 + 9 and sal.max() == 1.0
    assert sorted(p.name for p in (d / "out").iterdir()) == [
        "photo-2.png", "photo-2.safetensors", "photo.png", "photo.safetensors"]
    with Image.open(d / "out" / "photo.png") as im:
        assert im.size == (3 * 32 * 7, 32 * 7 + 14 * 5)  # 3 panels zoomed 7x (>= 224), 3 lines
        sheet = np.asarray(im.convert("RGB"))
    assert (sheet[32 * 7:] < 100).any()  # text printed under the panels
    maps = load_file(d / "out" / "photo.safetensors")
    assert torch.equal(maps["saliency"], sal) and maps["gradcam"].shape == (2, 2)
    with safe_open(d / "out" / "photo.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["vggnet"])
    assert meta["target"] == 2 and meta["layer"] == "relu5_2" and meta["top"][0][1] == "red dot"


def test_explain_pixels_target_and_methods(spot_weights):
    loaded = load_model(spot_weights / "w.safetensors")
    pixels = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    pixels[0, 0, 4, 4] = 9
    ex = explain_pixels(loaded, pixels, ["gradcam"], layer="conv4_2", target=2)
    assert list(ex.maps) == ["gradcam"] and ex.layer == "conv4_2" and ex.target == 2
    assert ex.maps["gradcam"][0, 0] == pytest.approx(9 / 16)
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['cam'\]"):
        explain_pixels(loaded, pixels, ["cam"])
