"""Winograd convolutions (vggnet.winograd) and packed linear layers (fuse.PackedLinear): the
same functions as F.conv2d / F.linear, picked by winograd.RULES, with their fallbacks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vggnet import fuse, winograd
from vggnet.runtime import make_runtime
from vggnet.winograd import PickedConv2d, Rule, WinogradConv2d, tile_blocks

# the matmuls, oneDNN's packed layers and their refusals depend on the instruction set: the
# whole module runs again under the AVX2 cap
pytestmark = pytest.mark.cpu_sensitive


def _conv_bn(cin: int, cout: int, seed: int = 0) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout).eval()
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    return conv, bn


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_is_the_convolution_in_float64(m):
    # exact up to float64 rounding: the transform matrices are right, every tile is covered
    # (sizes that are not multiples of m, a batch split into blocks of whole images and rows)
    conv, _ = _conv_bn(5, 7)
    layer = WinogradConv2d(conv.double(), None, False, torch.float64, m)
    layer.TILES = 6
    x = torch.randn(3, 5, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        ref = conv(x)
        got = layer(x)
    assert got.shape == (3, 7, 9, 11) and got.dtype == torch.float64
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m, tol", [(2, 1e-5), (4, 2e-5)])
def test_winograd_float32_matches_conv_bn_relu(m, tol):
    conv, bn = _conv_bn(16, 24, seed=1)
    x = torch.randn(2, 16, 14, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = F.relu(bn(conv(x)))
        got = WinogradConv2d(conv, bn, True, torch.float32, m)(x)
    assert (got >= 0).all()
    assert ((got - ref).norm() / ref.norm()).item() < tol


def test_winograd_bf16_within_bf16_rounding():
    conv, bn = _conv_bn(32, 32, seed=2)
    x = torch.randn(2, 32, 10, 10)
    with torch.no_grad():
        ref = F.relu(bn(conv(x)))
        got = WinogradConv2d(conv, bn, True, torch.bfloat16, 2)(x)
    assert got.dtype == torch.bfloat16
    # measured about 5e-3 (direct bf16: 2.4e-3); F(4x4) in bf16 would be about 3e-2
    assert ((got.float() - ref).norm() / ref.norm()).item() < 1.5e-2


def test_tile_blocks_cover_every_tile_once():
    assert tile_blocks(2, 3, 4, 5) == [(0, 1, 0, 1), (0, 1, 1, 2), (0, 1, 2, 3),
                                       (1, 2, 0, 1), (1, 2, 1, 2), (1, 2, 2, 3)]
    assert tile_blocks(5, 2, 2, 8) == [(0, 2, 0, 2), (2, 4, 0, 2), (4, 5, 0, 2)]
    assert tile_blocks(1, 7, 100, 50) == [(0, 1, r, r + 1) for r in range(7)]  # one row min


def test_rules_pick_layers_by_channels():
    rule = Rule(m=2, min_in=128, min_out=256)
    assert rule.applies(nn.Conv2d(128, 256, 3, padding=1))
    assert not rule.applies(nn.Conv2d(128, 128, 3, padding=1))
    assert not rule.applies(nn.Conv2d(256, 256, 3, padding=1, stride=2))
    assert not rule.applies(nn.Conv2d(256, 256, 5, padding=2))
    with pytest.raises(ValueError, match="3x3 stride-1 padding-1"):
        WinogradConv2d(nn.Conv2d(4, 4, 3, padding=0), None, False, torch.float32, 2)


def _vgg():
    from vggnet.model import create_model

    model = create_model("vgg11_bn", num_classes=5, width=1 / 8, crop_size=32, seed=0).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_prepare_inference_uses_winograd_where_the_rule_says(monkeypatch):
    monkeypatch.setenv("VGGNET_WINOGRAD", "1")
    # the real rules start at 64-256 channels; a width-1/8 net needs lower thresholds
    monkeypatch.setitem(winograd.RULES, torch.float32, Rule(m=4, min_in=16, min_out=16))
    model = _vgg()
    x, big = torch.randn(2, 3, 32, 32), torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref, ref_dense = model(x), model.forward_dense(big)
    keys = set(model.state_dict())
    rt = make_runtime("cpu", "fp32")
    fast = rt.prepare_inference(model, batch=2)
    kinds = {n: type(m).__name__ for n, m in fast.features.named_children() if "conv" in n}
    assert kinds["conv1_1"] == kinds["conv2_1"] == "PackedConv2d"  # 3 -> 8, 8 -> 16 channels
    assert kinds["conv3_1"] == kinds["conv5_2"] == "WinogradConv2d"
    assert any(n.startswith("Winograd F(4x4, 3x3) for conv3_1, conv3_2")
               for n in fast.inference_notes)
    assert set(fast.state_dict()) == keys
    with rt.inference():
        out, dense = fast(rt.input(x)), fast.forward_dense(rt.input(big))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dense, ref_dense, rtol=1e-4, atol=1e-4)


def test_keep_layer_outputs_with_winograd(monkeypatch):
    monkeypatch.setenv("VGGNET_WINOGRAD", "1")
    monkeypatch.setitem(winograd.RULES, torch.float32, Rule(m=2, min_in=8, min_out=8))
    model = _vgg()
    x = torch.randn(2, 3, 32, 32)
    layers = ["conv2_1", "bn2_1", "relu2_1", "conv4_2"]
    with torch.no_grad():
        ref = model.extract(x, layers)
    fast = make_runtime("cpu", "fp32").prepare_inference(model, keep_layer_outputs=True)
    assert isinstance(fast.features.conv2_1, WinogradConv2d) and not fast.features.conv2_1.relu
    with torch.no_grad():
        got = fast.extract(x.contiguous(memory_format=torch.channels_last), layers)
    for name in layers:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode, kind", [("auto", PickedConv2d), ("1", WinogradConv2d),
                                        ("0", fuse.PackedConv2d)])
def test_winograd_mode(monkeypatch, mode, kind):
    """auto: both forms, the faster picked by timing; 1: Winograd always; 0: never."""
    monkeypatch.setitem(winograd.RULES, torch.float32, Rule(m=4, min_in=8, min_out=8))
    monkeypatch.setenv("VGGNET_WINOGRAD", mode)
    model = _vgg()
    x, big = torch.randn(2, 3, 32, 32), torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref, ref_dense = model(x), model.forward_dense(big)
    keys = set(model.state_dict())
    rt = make_runtime("cpu", "fp32")
    fast = rt.prepare_inference(model, batch=2)
    with rt.inference():  # another size: its own exploring (PickedConv2d), same results
        for _ in range(PickedConv2d.EXPLORE + 1):
            dense = fast.forward_dense(rt.input(big))
            torch.testing.assert_close(dense, ref_dense, rtol=1e-4, atol=1e-4)
    assert type(fast.features.conv3_1) is kind and type(fast.features.conv1_1) is fuse.PackedConv2d
    assert set(fast.state_dict()) == keys
    with rt.inference():
        torch.testing.assert_close(fast(rt.input(x)), ref, rtol=1e-4, atol=1e-4)
    if kind is PickedConv2d:  # after EXPLORE calls a form is picked for this size
        assert winograd.ran_winograd(fast) == []  # exploring: direct first
        with rt.inference():
            for _ in range(PickedConv2d.EXPLORE):
                torch.testing.assert_close(fast(rt.input(x)), ref, rtol=1e-4, atol=1e-4)
        assert set(fast.features.conv3_1.choices().values()) <= {"direct", "winograd"}
        assert len(fast.features.conv3_1.choices()) == 2  # the crops' size and the dense one
        # the last call ran, in each layer, the form picked for its input's size class
        shapes: dict[str, torch.Size] = {}
        hooks = [m.register_forward_pre_hook(lambda _, a, n=n: shapes.update({n: a[0].shape}))
                 for n, m in fast.features.named_children() if isinstance(m, PickedConv2d)]
        with rt.inference():
            fast(rt.input(x))
        for h in hooks:
            h.remove()
        picked = {n: getattr(fast.features, n).choices()[PickedConv2d.size_class(torch.empty(s))]
                  for n, s in shapes.items()}
        assert winograd.ran_winograd(fast) == [f"features.{n}" for n, form in picked.items()
                                               if form == "winograd"]
    else:
        ran = winograd.ran_winograd(fast)
        assert ("features.conv3_1" in ran) is (kind is WinogradConv2d)
    monkeypatch.setenv("VGGNET_WINOGRAD", "yes")
    with pytest.raises(ValueError, match="VGGNET_WINOGRAD must be auto, 0 or 1, got 'yes'"):
        fuse.winograd_mode()


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Form(nn.Module):
    """A stand-in form that takes ``cost`` seconds on ``clock`` and adds ``value``."""

    def __init__(self, clock: _Clock, cost: float, value: float) -> None:
        super().__init__()
        self.clock, self.cost, self.value, self.calls = clock, cost, value, 0
        self.weight, self.bias = nn.Parameter(torch.zeros(1)), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.cost(self.calls) if callable(self.cost) else self.cost
        self.calls += 1
        return x + self.value


def test_picked_conv_runs_the_faster_form_and_explores_again_when_it_slows():
    clock = _Clock()
    direct, fast = _Form(clock, 3.0, 1.0), _Form(clock, 2.0, 2.0)
    layer = PickedConv2d(direct, fast)
    layer.clock = clock
    x = torch.zeros(1, 1, 4, 4)
    key = layer.size_class(x)
    # exploring: the forms in turns, each call run once
    turns = [1, 2] * (layer.EXPLORE // 2)
    assert [layer(x)[0, 0, 0, 0].item() for _ in range(layer.EXPLORE)] == turns
    assert layer.choices() == {key: "winograd"}  # median 2.0 against 3.0
    fast.cost = 3.9  # slower, but within SLOWER x the 2.0 it was picked with: kept
    for _ in range(5):
        assert layer(x).eq(2).all()
    for cost in (10.0, 10.0, 2.0, 10.0, 10.0):  # busy; a normal call resets the count
        fast.cost = cost
        assert layer(x).eq(2).all()
    assert layer.choices() == {key: "winograd"}
    assert layer(x).eq(2).all()  # third slow call in a row: explore again from the next call
    assert layer.choices() == {}
    assert [layer(x)[0, 0, 0, 0].item() for _ in range(layer.EXPLORE)] == turns
    assert layer.choices() == {key: "direct"}  # 3.0 now beats 10.0
    assert layer(x).eq(1).all()
    half = layer.EXPLORE // 2
    assert (direct.calls, fast.calls) == (2 * half + 1, 2 * half + 5 + 6)
    assert set(layer.state_dict()) == {"weight"}  # the forms are not submodules


def test_picked_conv_leaves_out_each_forms_setup_calls():
    clock = _Clock()
    # Winograd's first 3 calls are slow (setup, fresh memory), then it is the faster form
    direct, fast = _Form(clock, 3.0, 1.0), _Form(clock, lambda i: 100.0 if i < 3 else 2.0, 2.0)
    layer = PickedConv2d(direct, fast)
    layer.clock = clock
    x = torch.zeros(1, 1, 4, 4)
    for _ in range(layer.EXPLORE):
        layer(x)
    # counted from the first call, its median would be 100 and direct would win
    assert layer.SETUP == 2 and layer.choices() == {layer.size_class(x): "winograd"}


def test_size_classes_follow_the_work():
    cls = PickedConv2d.size_class
    assert cls(torch.empty(1, 3, 384, 512)) == cls(torch.empty(1, 3, 384, 500))
    assert cls(torch.empty(1, 3, 224, 224)) != cls(torch.empty(8, 3, 224, 224))
    assert cls(torch.empty(2, 3, 16, 16)) == cls(torch.empty(1, 3, 16, 32))


def test_winograd_failing_falls_back_to_direct(monkeypatch):
    monkeypatch.setitem(winograd.RULES, torch.float32, Rule(m=4, min_in=8, min_out=8))
    monkeypatch.setenv("VGGNET_WINOGRAD", "1")

    def broken(*args, **kwargs):
        raise RuntimeError("bmm: not here")

    winograd.winograd_works.cache_clear()
    monkeypatch.setattr(torch, "bmm", broken)
    try:
        assert "failed in torch.float32: bmm: not here" in winograd.winograd_works(torch.float32, 4)
        fast = make_runtime("cpu", "fp32").prepare_inference(_vgg())
        assert not any(isinstance(m, WinogradConv2d) for m in fast.modules())
    finally:
        winograd.winograd_works.cache_clear()


def test_packed_linear_is_the_linear_layer():
    if fuse.linear_packing_works(torch.float32) is not None:
        pytest.skip(fuse.linear_packing_works(torch.float32))
    torch.manual_seed(0)
    linear = nn.Linear(40, 12)
    packed = fuse.PackedLinear(linear, torch.float32, 4)
    assert isinstance(packed, nn.Linear) and packed.weight is linear.weight
    x = torch.randn(2, 3, 40)  # (N, L, in), as the dense head calls it
    with torch.no_grad():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed(x[0]), linear(x[0]), rtol=1e-5, atol=1e-5)


def test_packed_linear_refused_leaves_linear_layers(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs avx512bw")

    fuse.linear_packing_works.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse, raising=False)
    try:
        model = _vgg()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            ref = model(x)
        rt = make_runtime("cpu", "fp32")
        fast = rt.prepare_inference(model)
        assert type(fast.classifier.fc6) is nn.Linear
        assert any("linear layers left unpacked (torch.ops.mkldnn linear refused" in n
                   and "needs avx512bw" in n for n in fast.inference_notes)
        with rt.inference():
            torch.testing.assert_close(fast(rt.input(x)), ref, rtol=1e-4, atol=1e-4)
    finally:
        fuse.linear_packing_works.cache_clear()
