"""What a set of weights expects of its input pixels, applied on the device in one fused op.

Data pipelines hand over uint8 RGB batches (N, 3, H, W); ``Preprocessing.normalize`` turns
them into what the first conv was trained on: channel order, value range, mean and std.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .fields import known_fields


@dataclass(frozen=True)
class Preprocessing:
    channel_order: str = "RGB"  # order the first conv expects: "RGB" or "BGR" (Caffe, Keras)
    # value of a white pixel the model expects: 255 (paper, Caffe) or 1 (torchvision)
    scale: float = 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # in the model's channel order and range
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values (std > 0), got mean={self.mean!r} "
                             f"std={self.std!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def normalize(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 RGB (N, 3, H, W) on any device -> normalised ``dtype`` input for the model."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 RGB images of shape (N, 3, H, W), got "
                             f"{tuple(images.shape)}")
        if self.channel_order == "BGR":
            images = images.flip(1)
        a, b = self.affine((0.0, 255.0), images.device)
        out = torch.addcmul(b, images.to(torch.float32), a)
        return out.to(dtype)  # elementwise ops keep the input's memory format (channels_last)

    def affine(self, input_range: tuple[float, float] = (0.0, 255.0),
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (1, 3, 1, 1) float32 in the model's channel order, such that
        ``x * a + b`` is the model's input for pixels ``x`` (already in that channel order)
        given in ``input_range`` (black, white): (0, 255) for uint8, (0, 1) or (-1, 1) for
        the float images of losses and generators."""
        lo, hi = (float(v) for v in input_range)
        if not hi > lo:
            raise ValueError(f"input_range must be (black, white) with white > black, got "
                             f"{input_range!r}; e.g. (0, 1) or (-1, 1)")
        # ((x - lo) / (hi - lo) * scale - mean) / std as one multiply-add per pixel
        std = torch.tensor(self.std, device=device)
        a = (self.scale / (hi - lo)) / std
        b = -(lo * self.scale / (hi - lo) + torch.tensor(self.mean, device=device)) / std
        return a.view(1, 3, 1, 1), b.view(1, 3, 1, 1)

    def describe(self) -> str:
        """In words, e.g. "RGB in [0, 1], minus mean (0.485, 0.456, 0.406), divided by std
        (0.229, 0.224, 0.225)"."""
        def values(v):
            return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"

        text = f"{self.channel_order} in [0, {self.scale:g}]"
        if any(self.mean):
            text += f", minus mean {values(self.mean)}"
        if any(s != 1 for s in self.std):
            text += f", divided by std {values(self.std)}"
        return text

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        d = known_fields(cls, d, "preprocessing keys")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# The paper's own convention: RGB 0-255 minus the training set's mean RGB (set per run).
def paper(mean_rgb: tuple[float, float, float]) -> Preprocessing:
    return Preprocessing("RGB", 255.0, tuple(mean_rgb))


# The authors' Caffe release and Keras's VGG16/VGG19 ("caffe" mode): BGR, 0-255, mean pixel.
CAFFE = Preprocessing("BGR", 255.0, (103.939, 116.779, 123.68))
# torchvision's vgg*: RGB in [0, 1], ImageNet mean and std.
TORCHVISION = Preprocessing("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
