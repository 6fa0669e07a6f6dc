"""VGG losses for image models: perceptual (feature) loss, style loss, LPIPS.

All three run a frozen ``backbone.Trunk``: feature layers only up to the deepest tap, the
weights' own preprocessing applied to images given in a stated range, differentiable w.r.t.
the images, usable under autocast (the trunk's convs run in bf16/fp16, the distances in
float32) and on any device (``loss.to(device)``).

- ``PerceptualLoss``: weighted distance between feature maps (Johnson et al. 2016).
- ``StyleLoss``: distance between Gram matrices normalised by C*H*W (Gatys et al. 2016).
- ``LPIPS``: the v0.1 VGG distance of Zhang et al. 2018 (the ``lpips`` package), from a VGG-16
  weights file and the package's linear-layer file.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Trunk, WeightsLike, block_ends, resolve
from .settings import STYLE_LAYERS  # Gatys et al.'s relu1_1 ... relu5_1

DISTANCES = ("l1", "l2")
LPIPS_EPS = 1e-10  # lpips.normalize_tensor's
LPIPS_MEMBER = "lpips/weights/v0.1/vgg.pth"  # the linear layers' file inside the lpips wheel


def unit_channels(f: torch.Tensor, eps: float = LPIPS_EPS) -> torch.Tensor:
    """Each position's channel vector scaled to unit length: (N, C, H, W) -> same (LPIPS)."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 (autocast) maps in float32 for the distances; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gram(f: torch.Tensor) -> torch.Tensor:
    """Gram matrix of feature maps normalised by C*H*W: (N, C, H, W) -> (N, C, C), at least
    float32."""
    n, c, h, w = f.shape
    flat = at_least_float32(f).reshape(n, c, h * w)
    with _no_autocast(f):  # a bf16 matmul would lose the small differences a loss is made of
        return flat @ flat.transpose(1, 2) / (c * h * w)


def feature_distance(x: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean absolute ("l1") or squared ("l2") difference per sample: (N, ...) -> (N,), at
    least float32."""
    d = at_least_float32(x) - at_least_float32(y)
    d = d.abs() if kind == "l1" else d.pow(2)
    return d.flatten(1).mean(dim=1)


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _layer_weights(layers: Mapping[str, float] | Sequence[str] | str) -> dict[str, float]:
    if isinstance(layers, str):
        layers = [layers]
    weights = dict(layers) if isinstance(layers, Mapping) else {n: 1.0 for n in layers}
    if not weights:
        raise ValueError("layers is empty; name at least one layer, e.g. {'relu2_2': 1.0}")
    return {n: float(w) for n, w in weights.items()}


class _FeatureLoss(nn.Module):
    """A trunk, per-layer weights, a distance and a reduction: shared by both feature losses.
    ``forward(x, y)``: y is an image batch or ``target(y)`` computed once (a fixed target)."""

    def __init__(self, weights: WeightsLike, layers, input_range, pool: str, distance: str,
                 reduction: str) -> None:
        super().__init__()
        _check_choice("distance", distance, DISTANCES)
        _check_choice("reduction", reduction, ("mean", "sum", "none"))
        self.layer_weights = _layer_weights(layers)
        self.trunk = Trunk(weights, list(self.layer_weights), input_range, pool)
        self.distance, self.reduction = distance, reduction

    def represent(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def target(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """What ``y`` is compared by, without a graph (for a fixed target)."""
        with torch.no_grad():
            return {k: v.detach() for k, v in self.represent(self.trunk(y)).items()}

    def forward(self, x: torch.Tensor, y: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(y, dict):
            y = self.represent(self.trunk(y)) if y.requires_grad else self.target(y)
        rx = self.represent(self.trunk(x))
        per_sample = sum(w * feature_distance(rx[n], y[n], self.distance)
                         for n, w in self.layer_weights.items())
        if self.reduction == "none":
            return per_sample
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


class PerceptualLoss(_FeatureLoss):
    """sum over layers of weight * distance(VGG features of x, of y), per sample then reduced.

    ``layers``: {name: weight} or names (weight 1); default the last ReLU of blocks 1-4
    (relu1_2, relu2_2, relu3_3, relu4_3 for VGG-16). ``normalize_features``: unit-length
    channel vectors first (as LPIPS). ``distance``: "l1" (mean |dx|) or "l2" (mean dx^2).
    """

    def __init__(self, weights: WeightsLike,
                 layers: Mapping[str, float] | Sequence[str] | None = None,
                 input_range: tuple[float, float] = (0.0, 1.0), normalize_features: bool = False,
                 pool: str = "max", distance: str = "l1", reduction: str = "mean") -> None:
        loaded = resolve(weights)
        layers = layers if layers is not None else block_ends(loaded.model)[:4]
        super().__init__(loaded, layers, input_range, pool, distance, reduction)
        self.normalize_features = normalize_features

    def represent(self, feats):
        return {k: unit_channels(at_least_float32(v)) if self.normalize_features else v
                for k, v in feats.items()}


class StyleLoss(_FeatureLoss):
    """sum over layers of weight * distance(Gram of x's features, Gram of y's), Grams
    normalised by C*H*W (Gatys et al.); default layers relu1_1 ... relu5_1, distance "l2"
    (mean squared difference of the Gram matrices), ``pool="avg"`` for Gatys's average pools."""

    def __init__(self, weights: WeightsLike,
                 layers: Mapping[str, float] | Sequence[str] = STYLE_LAYERS,
                 input_range: tuple[float, float] = (0.0, 1.0), pool: str = "max",
                 distance: str = "l2", reduction: str = "mean") -> None:
        super().__init__(weights, layers, input_range, pool, distance, reduction)

    def represent(self, feats):
        return {k: gram(v) for k, v in feats.items()}


def read_lpips_linear(path: str | os.PathLike) -> list[torch.Tensor]:
    """LPIPS v0.1 VGG linear layers as five (1, C, 1, 1) weights, from ``vgg.pth`` or from the
    ``lpips`` wheel that holds it (``pip download --no-deps lpips==0.1.4``; never installed).
    Read with ``weights_only=True``: a file that is not plain tensors is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS linear-layer file {str(path)!r} does not exist; get it "
                                "with `pip download --no-deps lpips==0.1.4 -d DIR` and pass the "
                                "wheel (or lpips/weights/v0.1/vgg.pth from inside it)")
    if zipfile.is_zipfile(path) and path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            if LPIPS_MEMBER not in z.namelist():
                raise ValueError(f"{str(path)!r} has no {LPIPS_MEMBER}; is it the lpips wheel?")
            data = io.BytesIO(z.read(LPIPS_MEMBER))
        state = torch.load(data, map_location="cpu", weights_only=True)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    keys = [f"lin{i}.model.1.weight" for i in range(5)]
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{str(path)!r} is not LPIPS's VGG linear-layer file: missing {missing} "
                         f"(it has {sorted(state)[:6]})")
    return [state[k].float() for k in keys]


class LPIPS(nn.Module):
    """LPIPS v0.1 with the VGG-16 trunk: ``lp(x, y)`` for (N, 3, H, W) images in
    ``input_range`` ((-1, 1) as the lpips package) -> (N,) distances.

    d(x, y) = sum over relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the spatial mean of
    w_l . (u_l(x) - u_l(y))^2, where u_l is the layer's map with unit-length channel vectors
    and w_l the layer's learned non-negative channel weights (a 1x1 conv without bias).
    lpips's "scaling layer" is exactly torchvision's preprocessing for [-1, 1] input
    ((x + 1)/2 - mean)/std, so with torchvision's VGG-16 (imported by `vggnet convert`) this
    is lpips's number; the linear layers were calibrated on that trunk, so other VGG-16
    weights give another (uncalibrated) metric.
    """

    def __init__(self, backbone: WeightsLike, linear: str | os.PathLike | Sequence[torch.Tensor],
                 input_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        loaded = resolve(backbone)
        cfg = loaded.model.config
        if (cfg.arch, cfg.batch_norm) != ("D", False):
            raise ValueError(f"LPIPS's linear layers were calibrated on VGG-16 (column D, no batch "
                             f"norm) features; the backbone is VGG {cfg.name}")
        self.trunk = Trunk(loaded, block_ends(loaded.model), input_range)
        lins = read_lpips_linear(linear) if isinstance(linear, (str, os.PathLike)) else list(linear)
        widths = [cfg.scaled(c) for c in (64, 128, 256, 512, 512)]
        if [tuple(w.shape) for w in lins] != [(1, c, 1, 1) for c in widths]:
            raise ValueError(f"LPIPS linear layers of shapes {[tuple(w.shape) for w in lins]} do "
                             f"not fit the backbone's channels {widths} (width {cfg.width:g})")
        for i, w in enumerate(lins):
            self.register_buffer(f"lin{i}", w.detach().clone().to(self.trunk.a.device))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError("LPIPS compares images of one shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        fx, fy = self.trunk(x), self.trunk(y)
        total = 0
        with _no_autocast(x):
            for i, name in enumerate(self.trunk.taps):
                d = (unit_channels(at_least_float32(fx[name]))
                     - unit_channels(at_least_float32(fy[name]))).pow(2)
                total = total + F.conv2d(d, getattr(self, f"lin{i}")).mean(dim=(1, 2, 3))
        return total
