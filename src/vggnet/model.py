"""The VGG family of Simonyan & Zisserman (Table 1) as one table of configurations and one builder.

Layer names follow the paper's block/layer numbering, so that state-dict keys read like the
paper: ``features.conv3_2.weight``, ``features.pool5``, ``classifier.fc6.weight``.
The classifier is stored as Linear layers (the paper's training net); ``forward_dense`` runs
the very same weights as convolutions (fc6 as a kxk conv, fc7/fc8 as 1x1 convs), which is
the paper's dense evaluation.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fields import known_fields
from .initialize import init_weights

# One column per configuration of Table 1. An int is a 3x3 conv of that width, (width, 1) a
# 1x1 conv (config C), "L" AlexNet's local response normalisation, "M" a 2x2 max-pool.
CFGS: dict[str, list] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "L", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M",
          512, 512, (512, 1), "M", 512, 512, (512, 1), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
ARCHS = tuple(CFGS)
# The names torchvision (and most of the world) use for the same columns.
ALIASES = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}
FC_WIDTH = 4096

# AlexNet's LRN: b = a / (k + alpha * sum_{n neighbours} a^2) ** beta with k=2, n=5,
# alpha=1e-4, beta=0.75. PyTorch divides alpha by n, hence alpha * n here.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


class LocalResponseNorm(nn.LocalResponseNorm):
    """AlexNet's LRN across channels, the numbers of ``nn.LocalResponseNorm``, with the
    windowed sum of squares computed as a 1x1 convolution by a band of ones (a matmul over
    channels). torch's own formulation (a 3-D average pool over a padded copy) took 621 ms
    forward and backward on a (256, 8, 64, 64) batch on one CPU thread, this 275 ms. Computed
    in float32 whatever the input or autocast, as torch's LRN computes under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # output channel i sums input channels i - size//2 .. i + (size-1)//2 (as torch pads)
        c = x.shape[1]
        d = torch.arange(c, device=x.device)
        d = d[None, :] - d[:, None]  # (out, in): in - out
        band = ((d >= -(self.size // 2)) & (d <= (self.size - 1) // 2)).float().view(c, c, 1, 1)
        kind = x.device.type  # the meta device (shape inference in vggnet.info) has no autocast
        autocast = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
        with torch.autocast(kind, enabled=False) if autocast else nullcontext():
            xf = x.float()
            out = xf * (self.k + self.alpha / self.size * F.conv2d(xf * xf, band)).pow(-self.beta)
        # under autocast float32 out, as torch's LRN gives there; otherwise the input's dtype
        return out if autocast else out.to(x.dtype)


def list_models() -> list[str]:
    """Every name ``create_model`` accepts: the paper's columns, then the usual aliases."""
    aliases = [a for a in ALIASES] + [f"{a}_bn" for a in ALIASES]
    return list(ARCHS) + sorted(aliases, key=lambda n: (int(n[3:5]), n))


def resolve_name(name: str) -> tuple[str, bool]:
    """Map a model name to (paper column, batch_norm): "vgg16_bn" -> ("D", True)."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__} {name!r}")
    key = name.strip()
    bn = key.lower().endswith("_bn")
    if bn:
        key = key[: -len("_bn")]
    if key.lower() in ALIASES:
        return ALIASES[key.lower()], bn
    if key.upper() in CFGS:
        return key.upper(), bn
    raise ValueError(f"unknown VGG model {name!r}; choose one of {', '.join(list_models())} "
                     "(a paper column may also take a '_bn' suffix, e.g. 'C_bn')")


# Upper bounds of a config, far above any VGG trained in practice (width 64 is a 262144-wide
# FC layer), so that a file's claim is refused before any arithmetic on it can overflow.
LIMITS = {"num_classes": 1_000_000, "width": 64.0, "crop_size": 8192, "in_channels": 1024}


@dataclass(frozen=True)
class VGGConfig:
    """Everything needed to rebuild a VGG net; stored in every checkpoint and weights file."""

    arch: str = "D"
    num_classes: int = 1000
    batch_norm: bool = False
    width: float = 1.0  # multiplies every conv and FC width
    crop_size: int = 224  # the training crop; fc6 is a (crop/32)x(crop/32) kernel
    dropout: float = 0.5
    in_channels: int = 3

    def __post_init__(self) -> None:
        for name, top in LIMITS.items():  # a file may claim anything: sane bounds first
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value <= top:
                raise ValueError(f"{name} must be a number <= {top:g}, got {value!r}")
        if self.arch not in CFGS:
            raise ValueError(f"unknown arch {self.arch!r}; allowed: {', '.join(ARCHS)}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if not isinstance(self.in_channels, int) or self.in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {self.in_channels!r}")
        if not isinstance(self.crop_size, int) or self.crop_size < 32:
            raise ValueError(f"crop_size must be an int >= 32 (five 2x2 pools), got "
                             f"{self.crop_size!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.width > 0 or self.scaled(64) < 1:
            raise ValueError(f"width {self.width!r} makes the first conv {64 * self.width:g} "
                             "channels wide, which rounds to zero; use width >= 1/128 (e.g. "
                             "0.125, 0.25, 1.0)")

    def scaled(self, channels: int) -> int:
        return int(round(channels * self.width))

    @property
    def fc_kernel(self) -> int:
        """Spatial size of pool5 for a crop: five floor-halvings of the crop."""
        return self.crop_size // 32

    @property
    def fc_width(self) -> int:
        return self.scaled(FC_WIDTH)

    @property
    def name(self) -> str:
        return self.arch + ("_bn" if self.batch_norm else "")

    @property
    def label(self) -> str:
        """The net as people name it, the same in help texts, messages and reports:
        "vgg11_bn (VGG A with batch norm)", "VGG A-LRN"."""
        bn = " with batch norm" if self.batch_norm else ""
        alias = next((a for a, arch in ALIASES.items() if arch == self.arch), None)
        if alias is None:
            return f"VGG {self.arch}{bn}"
        return f"{alias}{'_bn' if self.batch_norm else ''} (VGG {self.arch}{bn})"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VGGConfig:
        return cls(**known_fields(cls, d, "model config keys"))


def feature_layers(cfg: VGGConfig) -> Iterator[tuple[str, nn.Module]]:
    """Yield (paper name, module) for the convolutional part, e.g. conv1_1, relu1_1, pool1."""
    block, layer, channels = 1, 0, cfg.in_channels
    for token in CFGS[cfg.arch]:
        if token == "M":
            yield f"pool{block}", nn.MaxPool2d(kernel_size=2, stride=2)
            block, layer = block + 1, 0
        elif token == "L":
            yield f"lrn{block}", LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE,
                                                   beta=LRN_BETA, k=LRN_K)
        else:
            width, kernel = token if isinstance(token, tuple) else (token, 3)
            width = cfg.scaled(width)
            layer += 1
            tag = f"{block}_{layer}"
            yield f"conv{tag}", nn.Conv2d(channels, width, kernel, padding=kernel // 2)
            if cfg.batch_norm:
                yield f"bn{tag}", nn.BatchNorm2d(width)
            yield f"relu{tag}", nn.ReLU(inplace=True)
            channels = width


def classifier_layers(cfg: VGGConfig) -> Iterator[tuple[str, nn.Module]]:
    k, fc = cfg.fc_kernel, cfg.fc_width
    yield "fc6", nn.Linear(cfg.scaled(512) * k * k, fc)
    yield "relu6", nn.ReLU(inplace=True)
    yield "drop6", nn.Dropout(cfg.dropout)
    yield "fc7", nn.Linear(fc, fc)
    yield "relu7", nn.ReLU(inplace=True)
    yield "drop7", nn.Dropout(cfg.dropout)
    yield "fc8", nn.Linear(fc, cfg.num_classes)


def linear_as_conv(fc: nn.Linear, x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Apply a Linear layer as a kxk convolution (stride 1, no padding): (N, C, H, W) ->
    (N, out, H-k+1, W-k+1), equal to ``F.conv2d(x, fc.weight.view(out, C, k, k), fc.bias)``.

    Computed as one matrix product of every kxk window (unfold; a plain view for k=1) with the
    Linear weight as it is, never copied: F.unfold lays a window out channel-major, (C, k, k),
    the order torch.flatten gives pool5 for fc6. For these shapes (few positions, 25088-wide
    kernels) this runs 4-5x faster than the convolution on the CPU (docs/benchmarks.md).
    """
    n, _, h, w = x.shape
    cols = F.unfold(x, kernel) if kernel > 1 else x.flatten(2)  # (N, C*k*k, L)
    y = fc(cols.transpose(1, 2))  # (N, L, out): F.linear, or a packed layer's own product
    return y.transpose(1, 2).unflatten(2, (h - kernel + 1, w - kernel + 1))


class VGG(nn.Module):
    def __init__(self, config: VGGConfig) -> None:
        super().__init__()
        self.config = config
        self.features = nn.Sequential(OrderedDict(feature_layers(config)))
        self.classifier = nn.Sequential(OrderedDict(classifier_layers(config)))

    # --- introspection -------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        """Every tap ``extract`` accepts, in execution order."""
        return [n for n, _ in self.features.named_children()] + \
               [n for n, _ in self.classifier.named_children()]

    def check_layers(self, layers: Iterable[str]) -> list[str]:
        """``layers`` as a list if ``extract`` accepts every name; else an error listing those
        it accepts (callers check before any work)."""
        layers, known = list(layers), self.layer_names()
        unknown = [n for n in layers if n not in known]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown} for VGG {self.config.arch}; available: "
                             f"{known}")
        return layers

    def _check_input(self, x: torch.Tensor, dense: bool) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"expected a batch of shape (N, {c.in_channels}, H, W), got "
                             f"{tuple(x.shape)}")
        h, w = x.shape[-2:]
        if dense and (h < c.crop_size or w < c.crop_size):
            raise ValueError(f"dense evaluation needs an input at least the crop size "
                             f"{c.crop_size}x{c.crop_size}, got {h}x{w}; rescale the image first")

    def _head_stages(self, dense: bool) -> Iterator[tuple[str, Callable]]:
        """The classifier as (name, fn) stages: Linear layers on a flat pool5, or as convs."""
        k = self.config.fc_kernel
        for name, m in self.classifier.named_children():
            if isinstance(m, nn.Linear) and dense:
                kernel = k if name == "fc6" else 1
                yield name, (lambda x, m=m, kk=kernel: linear_as_conv(m, x, kk))
            elif name == "fc6":
                yield name, (lambda x, m=m: m(self._flatten_pool5(x)))
            else:
                yield name, m

    def _flatten_pool5(self, x: torch.Tensor) -> torch.Tensor:
        k = self.config.fc_kernel
        if x.shape[-2:] != (k, k):
            crop = self.config.crop_size
            raise ValueError(
                f"the classifier takes {crop}x{crop} crops (pool5 {k}x{k}), but the input gave "
                f"pool5 {tuple(x.shape[-2:])} (input about {x.shape[-2] * 32}x"
                f"{x.shape[-1] * 32}); crop the input to {crop}x{crop}, or call forward_dense "
                "for whole images")
        return torch.flatten(x, 1)

    def stages(self, dense: bool = False) -> list[tuple[str, Callable]]:
        """The whole net as (name, fn) stages in execution order, one per ``layer_names``
        entry: feature layers as they are, the classifier as ``forward`` (Linear layers on a
        flat pool5) or, if ``dense``, as ``forward_dense`` runs it (convolutions)."""
        return list(self.features.named_children()) + list(self._head_stages(dense))

    # --- forward passes --------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> pool5 (N, 512*width, H/32, W/32)."""
        self._check_input(x, dense=False)
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """pool5 (N, 512*width, k, k) -> logits (N, classes), or fc7 features if pre_logits."""
        for name, fn in self._head_stages(dense=False):
            if pre_logits and name == "fc8":
                break
            x = fn(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of crops (N, C_in, crop, crop) -> logits (N, classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Fully convolutional net on whole images: (N, C_in, H, W) -> score map (N, classes, h, w)

        with h = H//32 - crop//32 + 1. Averaging the map over (h, w) gives the image's scores.
        """
        self._check_input(x, dense=True)
        x = self.features(x)
        for _, fn in self._head_stages(dense=True):
            x = fn(x)
        return x

    def extract(self, x: torch.Tensor, layers: Iterable[str],
                dense: bool = False) -> dict[str, torch.Tensor]:
        """Outputs of the named layers, e.g. ["relu1_2", "relu2_2", "relu3_3", "relu4_3"].

        Stops after the last requested layer, so perceptual-loss taps cost only the convs they
        need. fc taps need crop-sized input unless ``dense`` (then they are maps).
        """
        layers = self.check_layers(layers)
        self._check_input(x, dense=dense and any(n not in self.features._modules for n in layers))
        stages = self.stages(dense)
        wanted, out = set(layers), {}
        for i, (name, fn) in enumerate(stages):
            x = fn(x)
            if name in wanted:
                nxt = stages[i + 1][1] if i + 1 < len(stages) else None
                # the next in-place ReLU would overwrite a pre-activation tap
                out[name] = x.clone() if isinstance(nxt, nn.ReLU) and nxt.inplace else x
                if len(out) == len(wanted):
                    break
        return {n: out[n] for n in layers}


def config_for(name: str, *, num_classes: int = 1000, batch_norm: bool = False,
               width: float = 1.0, crop_size: int = 224, dropout: float = 0.5,
               in_channels: int = 3) -> VGGConfig:
    """The config of a net named by paper column ("A".."E", "A-LRN") or alias ("vgg16",
    "vgg16_bn"); a "_bn" name turns batch norm on."""
    arch, bn = resolve_name(name)
    return VGGConfig(arch=arch, num_classes=num_classes, batch_norm=batch_norm or bn,
                     width=width, crop_size=crop_size, dropout=dropout, in_channels=in_channels)


def create_model(name: str = "D", *, num_classes: int = 1000, batch_norm: bool = False,
                 width: float = 1.0, crop_size: int = 224, dropout: float = 0.5,
                 in_channels: int = 3, init: str | None = "glorot",
                 seed: int | None = None) -> VGG:
    """Build a VGG net by name (see ``config_for``).

    ``init``: "glorot" (default; the authors' post-submission finding), "paper" (N(0, 0.01)),
    "kaiming" (torchvision's), or None to keep PyTorch's layer defaults.
    """
    cfg = config_for(name, num_classes=num_classes, batch_norm=batch_norm, width=width,
                     crop_size=crop_size, dropout=dropout, in_channels=in_channels)
    return build(cfg, init=init, seed=seed)


def build(config: VGGConfig, init: str | None = "glorot", seed: int | None = None) -> VGG:
    model = VGG(config)
    if init is not None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        init_weights(model, init, generator=gen)
    return model
