"""Classify images with a weights file; its preprocessing, crop size and class names come from
the file, so the user never has to remember them.

Two modes (Section 3.2 of the paper, kept simple; full dense + multi-crop evaluation over a
dataset lives in evaluate.py):
- centre crop (default): rescale the shorter side to ``resize`` (256 for a 224 crop), take the
  central crop, one forward pass;
- dense: rescale the shorter side to each scale Q, run the net fully convolutionally on the
  whole image and on its mirror image, average the class score map over locations, then
  average the soft-max posteriors over flips and scales.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from .image import BadImageError, center_crop, load_rgb, resize_shorter, to_uint8_tensor
from .runtime import Runtime, make_runtime
from .weights import LoadedModel


@dataclass
class Prediction:
    path: str
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (index, name, probability)
    error: str | None = None  # why the image could not be classified


def default_resize(crop_size: int) -> int:
    """The shorter side a centre crop is cut from: 256 for 224 (the paper's S = 256)."""
    return round(crop_size * 256 / 224)


@torch.no_grad()
def class_probabilities(loaded: LoadedModel, images: Sequence[Image.Image], dense: bool = False,
                        scales: Sequence[int] | None = None, resize: int | None = None,
                        runtime: Runtime | None = None) -> torch.Tensor:
    """Soft-max posteriors (N, classes), float32 on the CPU, for RGB PIL images of any size."""
    rt = runtime or make_runtime()
    model = rt.prepare(loaded.model.eval())
    crop = loaded.model.config.crop_size

    def posteriors(pixels: torch.Tensor, dense_pass: bool) -> torch.Tensor:
        x = loaded.preprocessing.normalize(rt.input(pixels))
        with rt.autocast():
            out = loaded.model.forward_dense(x) if dense_pass else model(x)
        scores = out.float().mean(dim=(2, 3)) if dense_pass else out.float()
        return scores.softmax(dim=1).cpu()

    if not dense:
        size = resize or default_resize(crop)
        batch = torch.stack([to_uint8_tensor(center_crop(resize_shorter(im, size), crop)) for im in images])
        return posteriors(batch, dense_pass=False)
    qs = list(scales or [default_resize(crop)])
    out = []
    for im in images:
        total = torch.zeros(loaded.model.config.num_classes)
        for q in qs:
            x = to_uint8_tensor(resize_shorter(im, q))[None]
            total += posteriors(torch.cat([x, x.flip(-1)]), dense_pass=True).mean(dim=0)  # image + mirror
        out.append(total / len(qs))
    return torch.stack(out)


def top_k(probs: torch.Tensor, class_names: Sequence[str] | None, k: int) -> list[list[tuple[int, str, float]]]:
    p, idx = probs.topk(min(k, probs.shape[1]), dim=1)
    name = (lambda i: class_names[i]) if class_names else str
    return [[(int(i), name(int(i)), float(v)) for v, i in zip(pr, ir, strict=True)]
            for pr, ir in zip(p, idx, strict=True)]


def predict(loaded: LoadedModel, paths: Iterable[str | os.PathLike], top: int = 5, dense: bool = False,
            scales: Sequence[int] | None = None, batch_size: int = 16,
            runtime: Runtime | None = None) -> list[Prediction]:
    """Top-k classes for each image file; an unreadable image gets an ``error``, not an exception."""
    if top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    if scales is not None and min(scales) < loaded.model.config.crop_size:
        raise ValueError(f"dense scales must be at least the crop size {loaded.model.config.crop_size}, "
                         f"got {list(scales)}")
    rt = runtime or make_runtime()
    paths = [str(p) for p in paths]
    results: list[Prediction] = []
    for start in range(0, len(paths), batch_size):
        good, images = [], []
        for p in paths[start:start + batch_size]:
            try:
                images.append(load_rgb(p))
                good.append(Prediction(p))
            except BadImageError as e:  # missing, empty, corrupt, too large: reported, not raised
                results.append(Prediction(p, error=str(e)))
        if images:
            probs = class_probabilities(loaded, images, dense=dense, scales=scales, runtime=rt)
            for pred, best in zip(good, top_k(probs, loaded.class_names, top), strict=True):
                pred.top = best
            results.extend(good)
    order = {p: i for i, p in enumerate(paths)}
    return sorted(results, key=lambda r: order[r.path])
