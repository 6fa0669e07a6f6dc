import math

import pytest
import torch
from torch import nn

import vggnet
from vggnet.initialize import NET_A_LAYERS


def _weights(model, kind):
    return [m.weight for m in model.modules() if isinstance(m, kind)]


def test_paper_init_statistics():
    m = vggnet.create_model("A", num_classes=100, width=0.25, crop_size=64, init="paper", seed=0)
    w = torch.cat([p.flatten() for p in _weights(m, (nn.Conv2d, nn.Linear))])
    assert abs(w.mean().item()) < 2e-4
    assert abs(w.std().item() - 0.01) < 2e-4
    assert all((mod.bias == 0).all() for mod in m.modules()
               if isinstance(mod, (nn.Conv2d, nn.Linear)))


def test_glorot_init_statistics():
    m = vggnet.create_model("D", num_classes=100, width=0.25, crop_size=64, init="glorot", seed=0)
    for w in _weights(m, (nn.Conv2d, nn.Linear)):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
        a = math.sqrt(6 / (fan_in + fan_out))
        assert w.abs().max() <= a
        if w.numel() > 20000:  # the uniform's std is a/sqrt(3)
            assert abs(w.std().item() - a / math.sqrt(3)) / (a / math.sqrt(3)) < 0.03


def test_kaiming_and_batchnorm_init():
    m = vggnet.create_model("vgg11_bn", num_classes=10, width=0.25, crop_size=64, init="kaiming",
                            seed=0)
    conv = m.features.conv3_2.weight
    he = math.sqrt(2 / (conv.shape[0] * 9))
    assert abs(conv.std().item() - he) < 0.05 * he
    assert (m.features.bn1_1.weight == 1).all() and (m.features.bn1_1.bias == 0).all()
    with pytest.raises(ValueError, match=r"unknown init scheme 'xavier'.*glorot"):
        vggnet.init_weights(m, "xavier")


def _small(name, seed):
    return vggnet.create_model(name, num_classes=10, width=0.125, crop_size=64, init="paper",
                               seed=seed)


@pytest.mark.parametrize("deeper", ["B", "C", "D", "E"])
def test_init_from_net_a_copies_exactly_the_documented_layers(deeper):
    a, net = _small("A", 1), _small(deeper, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    copied = vggnet.init_from_net_a(net, a)
    assert copied == list(NET_A_LAYERS)
    src = a.state_dict()
    for key, value in net.state_dict().items():
        layer = key.split(".")[1]
        if layer in NET_A_LAYERS:
            assert torch.equal(value, src[key]), key
        else:
            assert torch.equal(value, before[key]), f"{key} must keep its own init"


def test_init_from_net_a_with_batch_norm_and_errors():
    a = vggnet.create_model("vgg11_bn", num_classes=10, width=0.125, crop_size=64, seed=1)
    d = vggnet.create_model("vgg16_bn", num_classes=10, width=0.125, crop_size=64, seed=2)
    assert vggnet.init_from_net_a(d, a) == ["conv1_1", "bn1_1", "conv2_1", "bn2_1", "conv3_1",
                                             "bn3_1", "conv3_2", "bn3_2", "fc6", "fc7", "fc8"]
    with pytest.raises(ValueError, match="config A or A-LRN, got 'B'"):
        vggnet.init_from_net_a(d, _small("B", 0))
    wide = vggnet.create_model("A", num_classes=10, width=0.25, crop_size=64)
    with pytest.raises(ValueError, match=r"conv1_1.weight has shape \[16, 3, 3, 3\] in net A "
                       r"and \[8, 3, 3, 3\]"):
        vggnet.init_from_net_a(_small("D", 0), wide)


def test_copy_matching_layers_reports_what_it_did():
    src = vggnet.create_model("D", num_classes=10, width=0.125, crop_size=64, seed=1)
    dst = vggnet.create_model("E", num_classes=20, width=0.125, crop_size=64, seed=2)
    fc8_before = dst.classifier.fc8.weight.clone()
    report = vggnet.copy_matching_layers(dst, src.state_dict())
    assert "conv5_3" in report.copied and "fc7" in report.copied
    assert report.missing == ["conv3_4", "conv4_4", "conv5_4"]
    mismatched = [(layer, k) for layer, k, *_ in report.shape_mismatch]
    assert mismatched == [("fc8", "classifier.fc8.weight")]
    assert report.shape_mismatch[0][2:] == ((10, 512), (20, 512))
    assert torch.equal(dst.classifier.fc8.weight, fc8_before)
    assert torch.equal(dst.features.conv5_3.weight, src.features.conv5_3.weight)
    text = report.summary()
    assert ("not copied fc8: classifier.fc8.weight has shape [10, 512] in the source, [20, 512]"
            in text)
