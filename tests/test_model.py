import math

import pytest
import torch
from torch import nn

import vggnet
from vggnet.info import summarize
from vggnet.model import VGGConfig, resolve_name

PAPER_PARAMS = {"A": 132_863_336, "A-LRN": 132_863_336, "B": 133_047_848,
                "C": 133_638_952, "D": 138_357_544, "E": 143_667_240}
PAPER_GMACS = {"A": 7.61, "B": 11.31, "D": 15.47, "E": 19.63}


def tiny(name="D", **kw):
    kw = {"num_classes": 5, "width": 0.0625, "crop_size": 64, "seed": 0} | kw
    return vggnet.create_model(name, **kw)


@pytest.mark.parametrize("arch", list(PAPER_PARAMS))
def test_exact_parameter_counts(arch):
    # counted on the meta device (no memory) and once for real below
    assert summarize(VGGConfig(arch=arch))["params"] == PAPER_PARAMS[arch]


def test_parameter_count_of_a_real_module():
    m = vggnet.create_model("vgg11", init=None)
    assert sum(p.numel() for p in m.parameters()) == PAPER_PARAMS["A"]


@pytest.mark.parametrize("arch,gmacs", PAPER_GMACS.items())
def test_multiply_adds_match_the_paper(arch, gmacs):
    assert round(summarize(VGGConfig(arch=arch))["macs"] / 1e9, 2) == gmacs


def test_names_and_aliases():
    assert resolve_name("vgg16") == ("D", False)
    assert resolve_name("vgg19_bn") == ("E", True)
    assert resolve_name("a-lrn") == ("A-LRN", False)
    assert resolve_name("C_bn") == ("C", True)
    names = vggnet.list_models()
    assert names[:6] == ["A", "A-LRN", "B", "C", "D", "E"]
    assert {"vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg16_bn"} <= set(names)
    bn = vggnet.create_model("vgg11_bn", num_classes=3, width=0.0625, crop_size=32)
    assert any(isinstance(m, nn.BatchNorm2d) for m in bn.modules())


def test_config_c_has_1x1_convs_as_third_conv_of_blocks_3_to_5():
    m = tiny("C")
    convs = {n: c.kernel_size for n, c in m.features.named_children() if isinstance(c, nn.Conv2d)}
    assert [n for n, k in convs.items() if k == (1, 1)] == ["conv3_3", "conv4_3", "conv5_3"]
    assert len(convs) == 13


@pytest.mark.parametrize("name", ["A", "A-LRN", "B", "C", "D", "E", "vgg16_bn"])
def test_logits_and_dense_shapes(name):
    m = tiny(name).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 64, 64)).shape == (2, 5)
        for (h, w), (mh, mw) in {(64, 64): (1, 1), (96, 64): (2, 1), (128, 160): (3, 4),
                                 (100, 70): (2, 1)}.items():
            assert m.forward_dense(torch.randn(1, 3, h, w)).shape == (1, 5, mh, mw)


@pytest.mark.cpu_sensitive
@pytest.mark.parametrize("name", ["A", "C", "E", "vgg13_bn"])
def test_dense_equals_classifier_at_crop_size(name):
    m = tiny(name).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits = m(x)
        dense = m.forward_dense(x).mean(dim=(2, 3))
    torch.testing.assert_close(dense, logits, atol=1e-5, rtol=1e-5)


def test_every_parameter_gets_a_finite_gradient():
    for name in ("A-LRN", "C", "vgg11_bn"):
        m = tiny(name, dropout=0.5).train()
        loss = nn.functional.cross_entropy(m(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        for pname, p in m.named_parameters():
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, pname


def test_width_crop_dropout_in_channels_options():
    m = vggnet.create_model("B", num_classes=7, width=0.25, crop_size=96, dropout=0.2,
                            in_channels=1)
    assert m.features.conv1_1.weight.shape == (16, 1, 3, 3)
    assert m.classifier.fc6.weight.shape == (1024, 128 * 3 * 3)
    assert m.classifier.drop6.p == 0.2
    assert m(torch.randn(2, 1, 96, 96)).shape == (2, 7)


def test_extract_taps():
    m = tiny("D").eval()
    x = torch.randn(2, 3, 64, 64)
    names = ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "conv5_3", "pool5", "fc7", "relu7"]
    taps = m.extract(x, names)
    assert list(taps) == names
    assert taps["relu1_2"].shape == (2, 4, 64, 64)
    assert taps["relu4_3"].shape == (2, 32, 8, 8)
    assert taps["pool5"].shape == (2, 32, 2, 2)
    assert taps["fc7"].shape == (2, 256)
    assert (taps["conv5_3"] < 0).any(), "pre-activation tap must not be clobbered by in-place ReLU"
    with torch.no_grad():
        torch.testing.assert_close(taps["pool5"], m.forward_features(x))
        torch.testing.assert_close(taps["relu7"],
                                   m.forward_head(m.forward_features(x), pre_logits=True))
    assert (taps["fc7"] < 0).any() and (taps["relu7"] >= 0).all()
    dense = m.extract(torch.randn(1, 3, 128, 96), ["fc7"], dense=True)["fc7"]
    assert dense.shape == (1, 256, 3, 2)
    assert "conv5_4" in tiny("E").layer_names() and "conv5_4" not in m.layer_names()


@pytest.mark.parametrize("size,channels", [(5, 8), (5, 3), (4, 7), (1, 2)])
def test_lrn_equals_torchs_in_values_and_gradients(size, channels):
    from vggnet.model import LocalResponseNorm

    ours = LocalResponseNorm(size, 5e-2, 0.75, 2.0)
    ref = torch.nn.LocalResponseNorm(size, 5e-2, 0.75, 2.0)
    x = torch.rand(2, channels, 6, 5, dtype=torch.float64) * 20
    x = x.contiguous(memory_format=torch.channels_last)
    a, b = x.clone().float().requires_grad_(), x.clone().float().requires_grad_()
    torch.testing.assert_close(ours(a), ref(b), atol=1e-6, rtol=1e-5)
    g = torch.randn(2, channels, 6, 5)
    ours(a).backward(g)
    ref(b).backward(g)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    # float32 inside whatever the input: under autocast float32 out (as torch's LRN gives
    # there, though it squares in bf16), a bf16 model's input stays bf16
    xb = x.bfloat16()
    exact = ref(xb.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ref(xb).dtype == torch.float32
        torch.testing.assert_close(ours(xb), exact, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours(xb), exact.bfloat16())


def test_lrn_matches_alexnet_formula():
    m = vggnet.create_model("A-LRN", num_classes=3, width=0.125, crop_size=32)
    lrn = m.features.lrn1
    a = torch.rand(2, 8, 5, 5) * 20
    # AlexNet: b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta
    k, n, alpha, beta = 2.0, 5, 1e-4, 0.75
    b = torch.empty_like(a)
    for i in range(a.shape[1]):
        lo, hi = max(0, i - n // 2), min(a.shape[1] - 1, i + n // 2)
        b[:, i] = a[:, i] / (k + alpha * (a[:, lo:hi + 1] ** 2).sum(1)) ** beta
    torch.testing.assert_close(lrn(a), b, atol=1e-6, rtol=1e-5)
    names = m.layer_names()
    assert names.index("lrn1") == names.index("relu1_1") + 1
    assert names.index("pool1") == names.index("lrn1") + 1


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "F"}, r"unknown VGG model 'F'.*vgg16"),
    ({"name": "vgg17"}, r"'vgg17'"),
    ({"name": "D", "width": 0.001}, r"width 0.001.*rounds to zero"),
    ({"name": "D", "crop_size": 16}, r"crop_size must be an int >= 32.*16"),
    ({"name": "D", "num_classes": 0}, r"num_classes.*0"),
    ({"name": "D", "dropout": 1.0}, r"dropout.*1.0"),
])
def test_bad_configs_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vggnet.create_model(**kwargs)


def test_bad_inputs_name_the_value():
    m = tiny("A").eval()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got \(2, 1, 64, 64\)"):
        m(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"at least the crop size 64x64, got 48x80"):
        m.forward_dense(torch.randn(1, 3, 48, 80))
    with pytest.raises(ValueError, match=r"takes 64x64 crops.*forward_dense"):
        m(torch.randn(1, 3, 128, 128))
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['relu9_9'\]"):
        m.extract(torch.randn(1, 3, 64, 64), ["relu9_9"])


def test_config_roundtrip():
    cfg = VGGConfig(arch="C", num_classes=10, batch_norm=True, width=0.5, crop_size=96)
    assert VGGConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown model config keys \['depth'\]"):
        VGGConfig.from_dict(cfg.to_dict() | {"depth": 3})


def test_seeded_builds_are_identical():
    a, b = tiny("B", seed=3), tiny("B", seed=3)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    assert not torch.equal(a.features.conv1_1.weight, tiny("B", seed=4).features.conv1_1.weight)


def test_info_rows_sum_to_model():
    cfg = VGGConfig(arch="C", num_classes=10, width=0.25, crop_size=64)
    m = vggnet.build(cfg)
    assert summarize(cfg)["params"] == sum(p.numel() for p in m.parameters())
    # dense at a larger size: fc6 is applied at (h, w) positions
    s = summarize(cfg, (96, 64))
    fc6 = next(r for r in s["rows"] if r.name == "fc6")
    assert fc6.shape == (1024, 2, 1) and fc6.macs == 2 * 1024 * 128 * 4
    assert math.isclose(s["activation_bytes"], 4 * sum(math.prod(r.shape) for r in s["rows"]))


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_linear_as_conv_is_the_convolution(kernel, channels_last):
    from vggnet.model import linear_as_conv

    g = torch.Generator().manual_seed(0)
    fc = nn.Linear(4 * kernel * kernel, 6)
    x = torch.randn(2, 4, 5, 7, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = nn.functional.conv2d(x, fc.weight.view(6, 4, kernel, kernel), fc.bias)
    torch.testing.assert_close(linear_as_conv(fc, x, kernel), expected, rtol=1e-5, atol=1e-5)
