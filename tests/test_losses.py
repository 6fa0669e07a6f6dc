"""Perceptual, style and LPIPS losses: preprocessing per weights convention, taps against
``VGG.extract``, hand-computed Grams, gradients, autocast, and LPIPS against an independent
re-implementation of the lpips package's formula with the package's own linear layers."""

import io
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vggnet
from vggnet import preprocess
from vggnet.backbone import Trunk, block_ends
from vggnet.convert import convert
from vggnet.losses import LPIPS, PerceptualLoss, StyleLoss, gram, read_lpips_linear
from vggnet.weights import LoadedModel

PREPS = {"caffe": preprocess.CAFFE, "torchvision": preprocess.TORCHVISION,
         "paper": preprocess.paper((120.0, 115.0, 105.0))}
LPIPS_WHEEL = Path(sys.prefix) / "wheels" / "lpips-0.1.4-py3-none-any.whl"


def tiny(prep=preprocess.TORCHVISION, arch="A", seed=0):
    model = vggnet.create_model(arch, num_classes=3, width=1 / 16, crop_size=32, seed=seed).eval()
    return LoadedModel(model, prep)


def images(n=2, size=20, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prep", list(PREPS))
@pytest.mark.parametrize("input_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_trunk_input_is_the_weights_own_preprocessing(prep, input_range):
    """Float images in either range become what ``normalize`` makes of the same uint8 pixels
    (for Caffe: BGR, 0-255, minus the mean pixel)."""
    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    lo, hi = input_range
    x = pixels.float() / 255 * (hi - lo) + lo
    trunk = Trunk(tiny(PREPS[prep]), ["relu1_1"], input_range)
    torch.testing.assert_close(trunk.model_input(x), PREPS[prep].normalize(pixels),
                               rtol=1e-5, atol=2e-4)


def test_caffe_input_by_hand():
    x = images(1, 4)
    by_hand = x[:, [2, 1, 0]] * 255 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    trunk = Trunk(tiny(preprocess.CAFFE), ["relu1_1"])
    torch.testing.assert_close(trunk.model_input(x), by_hand)


def test_trunk_taps_are_the_models_truncated_and_frozen():
    loaded = tiny()
    x = images()
    trunk = Trunk(loaded, ["conv2_1", "relu3_1"])
    assert list(trunk.layers._modules)[-1] == "relu3_1"  # nothing past the deepest tap
    with torch.no_grad():
        want = loaded.model.extract(loaded.preprocessing.normalize(x * 255), ["conv2_1", "relu3_1"])
        got = trunk(x)
    assert list(got) == ["conv2_1", "relu3_1"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in trunk.parameters())
    # the caller's model is untouched: still trainable, in-place ReLUs
    assert all(p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.features.relu1_1.inplace
    trunk.train()  # a parent's train() cannot switch the frozen trunk to training mode
    assert not trunk.training and not trunk.layers.training


def test_unknown_layer_lists_the_valid_ones():
    with pytest.raises(ValueError,
                       match=r"unknown layer\(s\) \['relu9_9'\].*valid: conv1_1, relu1_1"):
        PerceptualLoss(tiny(), {"relu9_9": 1.0})


@pytest.mark.parametrize("dist", ["l1", "l2"])
def test_perceptual_loss_is_the_weighted_feature_distance(dist):
    loaded = tiny(preprocess.CAFFE)
    x, y = images(seed=1), images(seed=2)
    loss = PerceptualLoss(loaded, {"relu1_1": 2.0, "relu2_1": 0.5}, distance=dist)
    with torch.no_grad():
        norm = loaded.preprocessing.normalize
        fx = loaded.model.extract(norm(x * 255), ["relu1_1", "relu2_1"])
        fy = loaded.model.extract(norm(y * 255), ["relu1_1", "relu2_1"])
    d = (lambda a, b: (a - b).abs()) if dist == "l1" else (lambda a, b: (a - b) ** 2)
    per_sample = [2.0 * d(fx["relu1_1"][i], fy["relu1_1"][i]).mean()
                  + 0.5 * d(fx["relu2_1"][i], fy["relu2_1"][i]).mean() for i in range(2)]
    want = torch.stack(per_sample)
    torch.testing.assert_close(PerceptualLoss(loaded, {"relu1_1": 2.0, "relu2_1": 0.5},
                                              distance=dist, reduction="none")(x, y), want)
    torch.testing.assert_close(loss(x, y), want.mean())
    assert loss(x, x).item() == 0.0


def test_perceptual_default_layers_and_normalised_features():
    loaded = tiny(arch="D")
    loss = PerceptualLoss(loaded, normalize_features=True, distance="l2")
    assert loss.trunk.taps == ["relu1_2", "relu2_2", "relu3_3", "relu4_3"]
    x, y = images(size=32, seed=3), images(size=32, seed=4)
    with torch.no_grad():
        norm = loaded.preprocessing.normalize
        fx, fy = (loaded.model.extract(norm(t * 255), loss.trunk.taps) for t in (x, y))
    unit = lambda f: f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # noqa: E731
    want = sum(((unit(fx[k]) - unit(fy[k])) ** 2).mean() for k in fx)
    torch.testing.assert_close(loss(x, y), want, rtol=1e-5, atol=1e-7)


def test_gram_by_hand():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # (1, C=2, H=1, W=2)
    torch.testing.assert_close(gram(f), torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]) / 4)


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_style_loss_is_the_gram_distance(pool):
    loaded = tiny()
    x, y = images(seed=5), images(seed=6)
    loss = StyleLoss(loaded, ["relu1_1", "relu2_1"], pool=pool)
    if pool == "avg":
        assert isinstance(loss.trunk.layers.pool1, nn.AvgPool2d)
        assert isinstance(loaded.model.features.pool1, nn.MaxPool2d)  # the caller's is kept

    def feats(t):  # the model's layers by hand, with Gatys's average pool if asked
        f, out = loaded.preprocessing.normalize(t * 255), {}
        for name, m in loaded.model.features.named_children():
            f = F.avg_pool2d(f, 2) if pool == "avg" and name == "pool1" else m(f)
            if name in ("relu1_1", "relu2_1"):
                out[name] = f.clone()
            if name == "relu2_1":
                return out

    with torch.no_grad():
        gx, gy = ({k: gram(v) for k, v in feats(t).items()} for t in (x, y))
    want = sum(((gx[k] - gy[k]) ** 2).flatten(1).mean(1) for k in gx).mean()
    torch.testing.assert_close(loss(x, y), want)
    torch.testing.assert_close(loss(x, loss.target(y)), want)  # a precomputed fixed target


def test_losses_are_differentiable_wrt_the_images():
    """gradcheck in float64 through the whole trunk (preprocessing, convs, pools, Grams)."""
    loaded = tiny(preprocess.CAFFE)
    loaded.model.double()
    x = images(1, 8, seed=7).double().requires_grad_()
    y = images(1, 8, seed=8).double()
    for loss in (PerceptualLoss(loaded, ["relu2_1"], distance="l2"),
                 StyleLoss(loaded, ["relu1_1", "relu2_1"], pool="avg")):
        assert torch.autograd.gradcheck(lambda t, loss=loss: loss(t, y), (x,), eps=1e-6, atol=1e-5,
                                        fast_mode=True)


@pytest.mark.cpu_sensitive
def test_losses_under_bf16_autocast():
    loaded = tiny(arch="D")
    x = images(size=32, seed=9).requires_grad_()
    y = images(size=32, seed=10)
    for loss in (PerceptualLoss(loaded), StyleLoss(loaded)):
        exact = loss(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(x, y)
        assert value.dtype == torch.float32
        (grad,) = torch.autograd.grad(value, x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert abs(value.item() - exact.item()) <= 0.05 * exact.item()


# --- LPIPS ---------------------------------------------------------------------------------
TV_CONVS = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256),
            "M", (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512), "M"]


def torchvision_vgg16_features(seed: int) -> nn.Sequential:
    """torchvision's vgg16().features layout (index 0..30), random weights."""
    gen, layers = torch.Generator().manual_seed(seed), []
    for item in TV_CONVS:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        conv = nn.Conv2d(*item, 3, padding=1)
        with torch.no_grad():
            conv.weight.normal_(0, (2 / (9 * item[0])) ** 0.5, generator=gen)
            conv.bias.normal_(0, 0.05, generator=gen)
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers)


def lpips_reference(features: nn.Sequential, lins: list[torch.Tensor], x, y) -> torch.Tensor:
    """The lpips package's LPIPS(net='vgg', version='0.1') forward, written out: its
    ScalingLayer, its vgg16 slices of torchvision's features (0-3, 4-8, 9-15, 16-22, 23-29),
    normalize_tensor (eps 1e-10), 1x1 linear layers, spatial average, sum over layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    bounds = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]

    def outs(t):
        h, res = (t - shift) / scale, []
        for a, b in bounds:
            h = features[a:b](h)
            res.append(h)
        return res

    def normalize_tensor(f, eps=1e-10):
        return f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + eps)

    val = 0
    for fx, fy, w in zip(outs(x), outs(y), lins, strict=True):
        diff = (normalize_tensor(fx) - normalize_tensor(fy)) ** 2
        val = val + F.conv2d(diff, w).mean([2, 3], keepdim=True)
    return val.view(-1)


@pytest.fixture(scope="module")
def lpips_setup(tmp_path_factory):
    """A random VGG-16 in torchvision's state-dict layout (crop 32 keeps fc6 small), imported
    by `vggnet convert`, and the lpips wheel's linear layers read independently."""
    assert LPIPS_WHEEL.is_file(), (f"{LPIPS_WHEEL} is missing: `make test` downloads it "
                                   "(pip download --no-deps lpips==0.1.4 -d .venv/wheels)")
    d = tmp_path_factory.mktemp("lpips")
    features = torchvision_vgg16_features(seed=0)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state |= {"classifier.0.weight": torch.zeros(4096, 512),
              "classifier.0.bias": torch.zeros(4096),
              "classifier.3.weight": torch.zeros(4096, 4096),
              "classifier.3.bias": torch.zeros(4096),
              "classifier.6.weight": torch.zeros(10, 4096),
              "classifier.6.bias": torch.zeros(10)}
    torch.save(state, d / "vgg16_tv.pth")
    convert(d / "vgg16_tv.pth", d / "vgg16.safetensors")
    with zipfile.ZipFile(LPIPS_WHEEL) as z:
        raw = torch.load(io.BytesIO(z.read("lpips/weights/v0.1/vgg.pth")), map_location="cpu",
                         weights_only=True)
    lins = [raw[f"lin{i}.model.1.weight"] for i in range(5)]
    return features.eval(), lins, d / "vgg16.safetensors"


def test_lpips_matches_the_lpips_formula(lpips_setup, tmp_path):
    features, lins, weights = lpips_setup
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 48, 40, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 48, 40, generator=gen)).clamp(-1, 1)
    lp = LPIPS(weights, LPIPS_WHEEL)
    with torch.no_grad():
        got, want = lp(x, y), lpips_reference(features, lins, x, y)
    assert got.shape == (3,)
    assert (want > 0).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    assert lp(x, x).abs().max().item() == 0.0
    # the .pth itself, as the wheel holds it, reads the same as the wheel
    member = tmp_path / "vgg.pth"
    with zipfile.ZipFile(LPIPS_WHEEL) as z:
        member.write_bytes(z.read("lpips/weights/v0.1/vgg.pth"))
    for a, b in zip(read_lpips_linear(member), lins, strict=True):
        assert torch.equal(a, b)


def test_lpips_gradient_flows_to_the_input(lpips_setup):
    _, _, weights = lpips_setup
    lp = LPIPS(weights, LPIPS_WHEEL)
    x = torch.zeros(1, 3, 32, 32, requires_grad=True)
    y = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lp(x, y).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_lpips_refuses_other_backbones_and_files(tmp_path):
    with pytest.raises(ValueError, match="calibrated on VGG-16 .* the backbone is VGG A"):
        LPIPS(tiny(), LPIPS_WHEEL)
    bad = tmp_path / "other.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    d16 = LoadedModel(vggnet.create_model("D", width=1 / 16, crop_size=32, num_classes=2),
                      preprocess.TORCHVISION)
    with pytest.raises(ValueError, match="not LPIPS's VGG linear-layer file: missing"):
        LPIPS(d16, bad)
    with pytest.raises(ValueError,
                       match=r"do not fit the backbone's channels \[4, 8, 16, 32, 32\]"):
        LPIPS(d16, LPIPS_WHEEL)
    with pytest.raises(FileNotFoundError, match="pip download --no-deps lpips==0.1.4"):
        LPIPS(d16, tmp_path / "missing.whl")


def test_block_ends():
    assert block_ends(tiny(arch="E").model) == ["relu1_2", "relu2_2", "relu3_4", "relu4_4",
                                                "relu5_4"]
