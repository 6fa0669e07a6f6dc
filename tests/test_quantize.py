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
    # fused conv1_1 + bn1_1 + relu1_1 stays float (a packed oneDNN conv where torch has the
    # ops); conv1_2 is int8
    first = modules["graph.features.conv1_1"]
    if packing_works(torch.float32) is None:
        assert isinstance(first, PackedConv2d) and first.relu and first.dtype == torch.float32
    else:
        assert not type(first).__module__.startswith("torch.ao.nn.quantized")
    assert type(modules["graph.features.conv1_2"]).__module__.startswith(
        "torch.ao.nn.intrinsic.quantized")
    assert isinstance(modules["graph.classifier.fc8"], torch.nn.Linear)
    assert type(modules["graph.classifier.fc7"]).__module__.startswith("torch.ao.nn.")
    every = quantize_int8(m, [torch.randn(16, 3, 32, 32, generator=g)], float_layers=())
    fc8 = dict(every.named_modules())["graph.classifier.fc8"]
    assert type(fc8).__module__.startswith("torch.ao.nn.")
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
