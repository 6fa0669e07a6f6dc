"""Weight initialisation: the paper's N(0, 0.01), Glorot, and copying layers from trained nets.

Works on any module whose layers carry the paper's names (``vggnet.model.VGG``); it does not
import the model, which imports it."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from .protocol import INIT_SCHEMES

# Section 3.1: deeper nets start from net A's first four conv layers and last three FC layers.
# A's first four convs are conv1_1, conv2_1, conv3_1, conv3_2; in every deeper column the
# layers of the same name have the same shapes (block widths are equal), so they are copied by
# name, not by position (position would put A's 64->128 conv2_1 into a 64->64 conv1_2).
NET_A_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str = "glorot",
                 generator: torch.Generator | None = None) -> None:
    """Initialise every conv and linear layer; biases zero, batch-norm to identity.

    paper:   N(0, 0.01) everywhere (net A of the paper; "10^-2 variance" read as std 0.01).
    glorot:  Xavier uniform, U(-a, a), a = sqrt(6 / (fan_in + fan_out)).
    kaiming: torchvision's VGG init: He normal (fan_out) for convs, N(0, 0.01) for linears.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {INIT_SCHEMES}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight
            if scheme == "paper" or (scheme == "kaiming" and isinstance(m, nn.Linear)):
                w.normal_(0.0, 0.01, generator=generator)
            elif scheme == "glorot":
                fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
                a = math.sqrt(6.0 / (fan_in + fan_out))
                w.uniform_(-a, a, generator=generator)
            else:
                fan_out = w.shape[0] * w[0, 0].numel()
                w.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.weight.fill_(1.0)
            m.bias.zero_()


@dataclass
class CopyReport:
    """What ``copy_matching_layers`` did, per layer (e.g. "conv3_2", "fc6")."""

    copied: list[str] = field(default_factory=list)
    # (layer, key, shape in the source, shape in the model)
    shape_mismatch: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, absent from the source
    unexpected: list[str] = field(default_factory=list)  # in the source, absent from the model

    def summary(self) -> str:
        lines = [f"copied {len(self.copied)} layer(s): {', '.join(self.copied) or '-'}"]
        for layer, key, src, dst in self.shape_mismatch:
            lines.append(f"not copied {layer}: {key} has shape {list(src)} in the source, "
                         f"{list(dst)} in the model")
        if self.missing:
            lines.append(f"kept as initialised (not in the source): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"ignored (not in the model): {', '.join(self.unexpected)}")
        return "\n".join(lines)


def _layer_of(key: str) -> str:
    # "features.conv3_2.weight" -> "conv3_2"; "classifier.fc6.bias" -> "fc6"
    parts = key.split(".")
    return parts[1] if len(parts) >= 3 else parts[0]


@torch.no_grad()
def copy_matching_layers(model: nn.Module, state_dict: dict[str, torch.Tensor],
                         layers: tuple[str, ...] | None = None) -> CopyReport:
    """Copy every layer whose name and tensor shapes all match; report the rest.

    A layer is copied whole or not at all. ``layers`` restricts the copy to those names.
    """
    target = model.state_dict()
    by_layer_dst: dict[str, list[str]] = defaultdict(list)
    for k in target:
        by_layer_dst[_layer_of(k)].append(k)
    src_layers = {_layer_of(k) for k in state_dict}
    report = CopyReport()
    report.unexpected = sorted(src_layers - set(by_layer_dst)) if layers is None else []
    for layer, keys in by_layer_dst.items():
        if layers is not None and layer not in layers:
            continue
        if layer not in src_layers:
            report.missing.append(layer)
            continue
        # a key absent from the source counts as shape () so the report still names it
        bad = [(k, tuple(state_dict[k].shape) if k in state_dict else (), tuple(target[k].shape))
               for k in keys if k not in state_dict or state_dict[k].shape != target[k].shape]
        if bad:
            key, src, dst = bad[0]
            report.shape_mismatch.append((layer, key, src, dst))
            continue
        for k in keys:
            target[k].copy_(state_dict[k])
        report.copied.append(layer)
    return report


def init_from_net_a(model: nn.Module, net_a: nn.Module | dict[str, torch.Tensor]) -> list[str]:
    """The paper's initialisation of a deeper net from a trained net A; returns copied layers.

    Copies conv1_1, conv2_1, conv3_1, conv3_2 (and their batch-norm layers, when both nets
    have them) and fc6, fc7, fc8; every other layer keeps its (random) initialisation.
    """
    if isinstance(net_a, nn.Module):
        arch = net_a.config.arch
        if arch not in ("A", "A-LRN"):
            raise ValueError(f"init_from_net_a needs a net of config A or A-LRN, got {arch!r}")
        state = net_a.state_dict()
    else:
        state = net_a
    wanted = NET_A_LAYERS + tuple(n.replace("conv", "bn") for n in NET_A_LAYERS
                                  if n.startswith("conv"))
    report = copy_matching_layers(model, state, layers=wanted)
    if report.shape_mismatch:
        layer, key, src, dst = report.shape_mismatch[0]
        raise ValueError(f"net A does not fit this {model.config.name} net: {key} has shape "
                         f"{list(src)} in net A and {list(dst)} here; both nets need the same "
                         "width, crop size and number of classes")
    required = [n for n in NET_A_LAYERS if n not in report.copied]
    if required:
        raise ValueError(f"net A state is missing layers {required}; is it really a config-A net?")
    return report.copied
