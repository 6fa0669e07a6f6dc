import pytest
import torch

import vggnet
from vggnet.fuse import PackedConv2d, packing_works
from vggnet.quantize import quantize_int8

# run a second time with oneDNN and ATen capped at AVX2 (Makefile: make test)
pytestmark = pytest.mark.cpu_sensitive


def _net(arch, bn):
    return vggnet.create_model(arch, num_classes=5, width=1 / 16, crop_size=32, batch_norm=bn,
                               seed=0).eval()


@pytest.mark.parametrize("arch,bn", [("B", True), ("A-LRN", False)])
def test_int8_tracks_float32_and_leaves_the_model_alone(arch, bn):
    m = _net(arch, bn)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(4)]
    q = quantize_int8(m, calib)
    x = torch.randn(64, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref, out = m(x), q(x)
    assert out.dtype == torch.float32 and out.shape == (64, 5)
    # int8 rounding moves the logits by a few percent of their range, not more
    assert (out - ref).abs().max() < 0.15 * (ref.max() - ref.min())
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    # conv (+ batch norm + ReLU) layers really are int8 modules now
    quantized = [mod for mod in q.modules() if type(mod).__module__.startswith("torch.ao.nn.")]
    assert len(quantized) >= 8  # B: 10 convs, 3 linears
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_int8_refuses_bad_calibration():
    m = _net("A", False)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        quantize_int8(m, [])
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\) crops, got \(2, 3, 64, 64\)"):
        quantize_int8(m, [torch.randn(2, 3, 64, 64)])
    with pytest.raises(ValueError, match="quantized engine 'nope'"):
        quantize_int8(m, [torch.randn(2, 3, 32, 32)], backend="nope")


def test_first_and_last_layers_stay_float_and_names_are_checked():
    m = _net("B", True)
    g = torch.Generator().manual_seed(0)
    q = quantize_int8(m, [torch.randn(16, 3, 32, 32, generator=g)])
    modules = dict(q.named_modules())
    # fused conv1_1 + bn1_1 + relu1_1 and fc8 stay float (packed oneDNN layers where torch has
    # the ops); conv1_2 is int8
    first = modules["graph.features.conv1_1"]
    if packing_works(torch.float32) is None:
        assert isinstance(first, PackedConv2d) and first.relu and first.dtype == torch.float32
    else:
        assert not type(first).__module__.startswith("torch.ao.nn.quantized")
    assert type(modules["graph.features.conv1_2"]).__module__.startswith(
        "torch.ao.nn.intrinsic.quantized")
    fc8 = modules["graph.classifier.fc8"]
    assert isinstance(fc8, torch.nn.Linear) and not type(fc8).__module__.startswith("torch.ao")
    assert type(modules["graph.classifier.fc7"]).__module__.startswith("torch.ao.nn.")
    every = dict(quantize_int8(m, [torch.randn(16, 3, 32, 32, generator=g)],
                               float_layers=()).named_modules())
    for name in ("features.conv1_1", "classifier.fc8"):
        assert type(every[f"graph.{name}"]).__module__.startswith("torch.ao.nn."), name
    with pytest.raises(ValueError, match=r"float_layers \['fc9'\] are not layers of this VGG B"):
        quantize_int8(m, [torch.randn(2, 3, 32, 32)], float_layers=("conv1_1", "fc9"))


def test_full_range_activations_only_with_vnni(monkeypatch):
    # 7-bit activations (torch's x86 default) only where AVX2's 16-bit sums could saturate
    from vggnet import quantize

    m = _net("A", False)
    calib = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    seen = []
    real = quantize._quantize

    def spy(model, calibration, backend, float_layers, reduce_range):
        seen.append(reduce_range)
        return real(model, calibration, backend, float_layers, reduce_range)

    monkeypatch.setattr(quantize, "_quantize", spy)
    for vnni in (True, False):
        monkeypatch.setattr(quantize, "has_vnni", lambda v=vnni: v)
        quantize.quantize_int8(m, calib)
    quantize.quantize_int8(m, calib, reduce_range=False)
    assert seen == [False, True, False]


def test_every_float_layer_runs_packed_and_matches_the_eager_graph(monkeypatch):
    from vggnet import fuse

    m = _net("B", True)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 3, 32, 32, generator=g)]
    keep = ("conv1_1", "conv3_2", "fc7", "fc8")
    q = quantize_int8(m, calib, float_layers=keep)
    modules = dict(q.named_modules())
    convs_ok = fuse.packing_works(torch.float32) is None
    linears_ok = fuse.linear_packing_works(torch.float32) is None
    assert q.packed == ["conv1_1", "conv3_2"] * convs_ok + ["fc7", "fc8"] * linears_ok
    if convs_ok:  # ReLU fused, batch norm already folded by the conversion
        assert isinstance(modules["graph.features.conv3_2"], fuse.PackedConv2d)
        assert modules["graph.features.conv3_2"].relu
    if linears_ok:
        assert isinstance(modules["graph.classifier.fc7"], fuse.PackedLinear)
    # where the packed ops are refused, the converted graph's own float modules run: the same
    # function
    monkeypatch.setattr(fuse, "packing_works", lambda dtype: "refused")
    monkeypatch.setattr(fuse, "linear_packing_works", lambda dtype: "refused")
    eager = quantize_int8(m, calib, float_layers=keep)
    assert eager.packed == []
    x = torch.randn(8, 3, 32, 32, generator=g)
    with torch.no_grad():
        out, ref = q(x), m(x)
        assert torch.allclose(out, eager(x), rtol=1e-4, atol=1e-4)
    assert (out - ref).abs().max() < 0.15 * (ref.max() - ref.min())


def test_sensitivity_finds_the_layers_around_an_outlier_channel():
    # conv3_1's output channel 0 scaled up 300x and conv3_2's weights from it scaled down as
    # much: the same float function (ReLU is positively homogeneous), but the one int8 range
    # of that activation now spends its 256 levels on one channel, so the two layers that
    # quantize it (conv3_1's output, conv3_2's input) are the most sensitive
    from vggnet.quantize import layer_sensitivity, weighted_layers

    m = _net("A", False)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(2)]
    x = torch.randn(16, 3, 32, 32, generator=g)
    with torch.no_grad():
        before = m(x)
        m.features.conv3_1.weight[0] *= 300
        m.features.conv3_1.bias[0] *= 300
        m.features.conv3_2.weight[:, 0] /= 300
        assert torch.allclose(m(x), before, rtol=1e-4, atol=1e-5)
    s = layer_sensitivity(m, calib)
    assert list(s) == sorted(s, key=s.get, reverse=True)
    assert sorted(s) == sorted(weighted_layers(m)) and all(v >= 0 for v in s.values())
    assert set(list(s)[:2]) == {"conv3_1", "conv3_2"}


def test_the_default_engine_follows_the_build():
    from vggnet.quantize import default_backend

    assert default_backend(["qnnpack", "none", "onednn", "x86", "fbgemm"]) == "x86"
    assert default_backend(["qnnpack", "none"]) == "qnnpack"  # ARM builds
    assert default_backend(["none", "onednn"]) == "onednn"
    with pytest.raises(RuntimeError, match=r"no quantized engine for int8 \(it has \['none'\]\)"):
        default_backend(["none"])
    assert default_backend() in torch.backends.quantized.supported_engines
