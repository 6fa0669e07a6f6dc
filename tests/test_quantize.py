import pytest
import torch

import vggnet
from vggnet.quantize import quantize_int8

# run a second time with oneDNN and ATen capped at AVX2 (Makefile: make test)
pytestmark = pytest.mark.cpu_sensitive


def _net(arch, bn):
    return vggnet.create_model(arch, num_classes=5, width=1 / 16, crop_size=32, batch_norm=bn, seed=0).eval()


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
