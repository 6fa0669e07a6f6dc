"""Paper-style layer tables: output shapes, parameters, multiply-adds and activation memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .model import ARCHS, CFGS, VGG, VGGConfig, build, config_for
from .settings import InfoSettings


@dataclass
class LayerRow:
    name: str
    kind: str  # paper notation: conv3-64, conv1-256, LRN, maxpool, FC-4096
    shape: tuple[int, ...]  # output (C, H, W) or (features,)
    params: int
    macs: int  # multiply-adds per image


def _kind(m: nn.Module | None, name: str) -> str:
    if isinstance(m, nn.Conv2d):
        return f"conv{m.kernel_size[0]}-{m.out_channels}"
    if isinstance(m, nn.Linear):
        return f"FC-{m.out_features}"
    if isinstance(m, nn.BatchNorm2d):
        return "batchnorm"
    if isinstance(m, nn.LocalResponseNorm):
        return "LRN"
    if isinstance(m, nn.MaxPool2d):
        return "maxpool"
    return type(m).__name__.lower() if m is not None else name


def layer_table(config: VGGConfig, size: tuple[int, int] | None = None) -> list[LayerRow]:
    """One row per layer for one image of ``size`` (H, W); the classifier runs densely when
    the size is not the crop size. Computed on the meta device: nothing is allocated."""
    h, w = size or (config.crop_size, config.crop_size)
    with torch.device("meta"):
        model: VGG = build(config, init=None)
    dense = (h, w) != (config.crop_size, config.crop_size)
    x = torch.empty(1, config.in_channels, h, w, device="meta")
    model._check_input(x, dense=dense)
    modules = dict(model.features.named_children()) | dict(model.classifier.named_children())
    stages = list(model.features.named_children()) + list(model._head_stages(dense))
    rows = []
    for name, fn in stages:
        x = fn(x)
        m = modules[name]
        if isinstance(m, (nn.ReLU, nn.Dropout)):
            continue  # in place / identity at test time: no new activation, no cost
        out = x.shape[1:]
        params = sum(p.numel() for p in m.parameters())
        if isinstance(m, nn.Conv2d):
            macs = x[0].numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            macs = x[0].numel() * m.in_features  # per output value, in dense mode too
        else:
            macs = 0
        rows.append(LayerRow(name, _kind(m, name), tuple(out), params, macs))
    return rows


def summarize(config: VGGConfig, size: tuple[int, int] | None = None) -> dict:
    rows = layer_table(config, size)
    return {
        "params": sum(r.params for r in rows),
        "macs": sum(r.macs for r in rows),
        # float32 outputs of every conv/LRN/pool/FC layer of one image: what a forward
        # pass keeps for backward (ReLUs run in place)
        "activation_bytes": 4 * sum(_numel(r.shape) for r in rows),
        "rows": rows,
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def format_table(config: VGGConfig, size: tuple[int, int] | None = None) -> str:
    s = summarize(config, size)
    h, w = size or (config.crop_size, config.crop_size)
    k = config.fc_kernel
    title = (f"VGG {config.name} ({config.arch}: {_weight_layers(config)} weight layers), "
             f"input {config.in_channels}x{h}x{w}, {config.num_classes} classes, "
             f"width x{config.width:g}"
             + ("" if (h, w) == (config.crop_size, config.crop_size) else
                f", dense (crop {config.crop_size}, fc6 as {k}x{k} conv)"))
    lines = [title, f"{'layer':<9} {'type':<11} {'output':>16} {'params':>13} {'mult-adds':>15}"]
    for r in s["rows"]:
        shape = "x".join(str(d) for d in r.shape)
        lines.append(f"{r.name:<9} {r.kind:<11} {shape:>16} {r.params:>13,} {r.macs:>15,}")
    lines.append(f"{'soft-max':<9}")
    lines.append(f"parameters: {s['params']:,} ({s['params'] / 1e6:.1f} M)")
    lines.append(f"multiply-adds per image: {s['macs']:,} ({s['macs'] / 1e9:.2f} G)")
    lines.append(f"activation memory per image (float32 layer outputs): "
                 f"{s['activation_bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)


def _weight_layers(config: VGGConfig) -> int:
    return sum(1 for t in CFGS[config.arch] if t not in ("M", "L")) + 3


def format_summary(size: tuple[int, int] | None = None, **options) -> str:
    """Table 2 of the paper, plus cost: every column's weight layers, parameters,
    multiply-adds and activation memory at ``size`` (``options``: see ``model.config_for``)."""
    lines = [f"{'config':<8} {'weight layers':>13} {'parameters':>14} {'mult-adds':>10} "
             f"{'act. mem':>10}"]
    for arch in ARCHS:
        cfg = config_for(arch, **options)
        s = summarize(cfg, size)
        lines.append(f"{cfg.name:<8} {_weight_layers(cfg):>13} {s['params']:>14,} "
                     f"{s['macs'] / 1e9:>9.2f}G {s['activation_bytes'] / 2**20:>8.1f}Mi")
    return "\n".join(lines)


def info_command(s: InfoSettings) -> int:
    """``vggnet info``: one column's layer table, or (no model) the summary of all."""
    size = tuple(s.size) if s.size else None
    options = dict(num_classes=s.num_classes, batch_norm=s.batch_norm, width=s.width,
                   crop_size=s.crop_size, in_channels=s.in_channels)
    print(format_table(config_for(s.model, **options), size) if s.model
          else format_summary(size, **options))
    return 0
