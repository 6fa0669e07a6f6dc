"""VGG as a frozen feature extractor for other models: the trunk behind the perceptual, style
and LPIPS losses (losses.py), style transfer (stylize.py) and retrieval descriptors.

``Trunk`` keeps a copy of the feature layers up to the deepest tap asked for (never fc6-fc8:
VGG-16's fc6 alone is 400 MB), frozen, and puts the weights' own preprocessing in front of
them, so callers hand over images in a range of their choosing ((0, 1) or (-1, 1)) whatever
convention the weights were trained with (torchvision RGB [0, 1] mean/std, Caffe/Keras BGR
0-255 minus the mean pixel, ours).
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .model import VGG
from .preprocess import Preprocessing
from .weights import LoadedModel, load_model

# a weights file (anything ``load_model`` reads: `vggnet convert` output, our weights and
# checkpoints), a loaded one, or a (model, preprocessing) pair
WeightsLike = str | os.PathLike | LoadedModel | tuple[VGG, Preprocessing]
POOLS = ("max", "avg")


def resolve(weights: WeightsLike) -> LoadedModel:
    """The loaded model for any ``WeightsLike``."""
    if isinstance(weights, LoadedModel):
        return weights
    if isinstance(weights, tuple) and len(weights) == 2 and isinstance(weights[0], VGG):
        return LoadedModel(weights[0], weights[1])
    if isinstance(weights, (str, os.PathLike)):
        return load_model(weights)
    raise TypeError(f"weights must be a weights file path, a LoadedModel or a (VGG, "
                    f"Preprocessing) pair, got {type(weights).__name__}")


def feature_names(model: VGG) -> list[str]:
    """The feature layers' names in order: conv1_1, relu1_1, ..., pool5."""
    return list(model.features._modules)


def check_layers(model: VGG, layers: Iterable[str], what: str = "layer") -> list[str]:
    """``layers`` as a list if every name is a feature layer of ``model``; else an error that
    lists the valid names."""
    layers, known = list(layers), feature_names(model)
    unknown = [n for n in layers if n not in known]
    if unknown or not layers:
        raise ValueError(f"unknown {what}(s) {unknown or layers} for VGG {model.config.name}; "
                         f"valid: {', '.join(known)}")
    return layers


def block_ends(model: VGG) -> list[str]:
    """The last ReLU of each block (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 for D): the
    taps of LPIPS and of Johnson et al.'s perceptual loss."""
    names = feature_names(model)
    return [names[i - 1] for i, n in enumerate(names) if n.startswith("pool")]


class Trunk(nn.Module):
    """Frozen feature layers of a VGG up to the deepest of ``layers``, with the weights'
    preprocessing in front: images (N, 3, H, W) RGB in ``input_range`` -> {layer: map}.

    A copy, so the caller's model is left as it was: ReLUs are not in-place (a conv tap stays
    the conv's output), and with ``pool="avg"`` the max-pools are 2x2 average pools (Gatys et
    al.'s choice for image synthesis: smoother gradients). Differentiable w.r.t. the images;
    runs under autocast; ``.to(device)`` moves it.
    """

    def __init__(self, weights: WeightsLike, layers: Sequence[str],
                 input_range: tuple[float, float] = (0.0, 1.0), pool: str = "max") -> None:
        super().__init__()
        loaded = resolve(weights)
        model = loaded.model
        self.taps = check_layers(model, layers)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        names = feature_names(model)
        last = max(names.index(n) for n in self.taps)
        self.layers = nn.Sequential(OrderedDict(
            (n, _frozen_copy(m, pool))
            for n, m in list(model.features.named_children())[:last + 1]))
        self.layers.eval().requires_grad_(False)
        self.config, self.preprocessing = model.config, loaded.preprocessing
        self.input_range = input_range
        a, b = loaded.preprocessing.affine(input_range)
        device = next(model.parameters()).device
        self.register_buffer("a", a.to(device), persistent=False)
        self.register_buffer("b", b.to(device), persistent=False)
        self.bgr = loaded.preprocessing.channel_order == "BGR"

    def train(self, mode: bool = True) -> Trunk:
        # frozen means eval mode too (batch norm uses its running statistics) whatever the
        # caller's model.train() does to the module tree it sits in
        return super().train(False)

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images in ``input_range`` (RGB) -> what the first conv was trained on."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError("expected RGB images of shape (N, 3, H, W), "
                             f"got {tuple(images.shape)}")
        return (images.flip(1) if self.bgr else images) * self.a + self.b

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x, wanted, out = self.model_input(images), set(self.taps), {}
        for name, layer in self.layers.named_children():
            x = layer(x)
            if name in wanted:
                out[name] = x
        return {n: out[n] for n in self.taps}


def _frozen_copy(module: nn.Module, pool: str) -> nn.Module:
    if isinstance(module, nn.ReLU):
        return nn.ReLU(inplace=False)
    if isinstance(module, nn.MaxPool2d) and pool == "avg":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    return copy.deepcopy(module)
