"""The pointing game (Zhang et al. 2016, "Top-down neural attention by excitation backprop"):
does an explanation's strongest point fall on the object?

For each image with a ground-truth box, the heat map of the true class (saliency or Grad-CAM,
``vggnet.explain``) is brought to the input's size the way users see it (``explain.heatmap``:
bilinear, min-max scaled); its maximum (the first in row-major order on ties) is a hit when
that pixel's centre lies inside a box of the class, mapped from the stored image to the input
(the centre crop ``predict`` and ``explain`` take). The baseline points at the input's centre
every time. An image whose boxes all fall outside the crop is left out (nothing to point at).
This is the strict game: no tolerance around the box (Zhang et al. allow 15 pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .annotations import BoxedSample
from .boxes import area, clip
from .explain import gradcam, heatmap, saliency
from .weights import LoadedModel


def inside(points: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N,) bool: point i (x, y in pixels, (N, 2)) lies in one of image i's boxes ((k, 4)
    xyxy, right and bottom edges excluded)."""
    hits = []
    for (x, y), b in zip(points.tolist(), boxes, strict=True):
        hits.append(bool(((b[:, 0] <= x) & (x < b[:, 2]) & (b[:, 1] <= y) & (y < b[:, 3])).any()))
    return torch.tensor(hits, dtype=torch.bool)


def peak_points(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 2) pixel centres (x + 0.5, y + 0.5) of each raw map's maximum at input ``size``
    (h, w), after ``heatmap``'s upsampling."""
    heat = heatmap(maps.float(), size)  # (N, h, w)
    flat = heat.flatten(1).argmax(dim=1)
    y, x = flat // size[1], flat % size[1]
    return torch.stack([x, y], dim=1).float() + 0.5


@dataclass
class PointingResult:
    images: int = 0  # played (a box visible in the input)
    left_out: int = 0  # every box outside the input
    hits: dict[str, int] = field(default_factory=dict)  # method -> images hit
    correct: int = 0  # images whose top-1 class is the true one
    hits_when_correct: dict[str, int] = field(default_factory=dict)

    def rate(self, method: str, when_correct: bool = False) -> float:
        n = self.correct if when_correct else self.images
        hits = (self.hits_when_correct if when_correct else self.hits)[method]
        return hits / n if n else float("nan")


def _add(result: PointingResult, method: str, hits: torch.Tensor, correct: torch.Tensor) -> None:
    result.hits[method] = result.hits.get(method, 0) + int(hits.sum())
    result.hits_when_correct[method] = (result.hits_when_correct.get(method, 0)
                                        + int((hits & correct).sum()))


def play_batch(loaded: LoadedModel, pixels: torch.Tensor, labels: torch.Tensor,
               boxes: Sequence[torch.Tensor], layers: Sequence[str], result: PointingResult
               ) -> None:
    """One batch of inputs (uint8 (N, 3, H, W)), their true classes and boxes (input pixels)
    into ``result``: saliency, Grad-CAM at each of ``layers``, and the centre."""
    model = loaded.model.eval()
    size = tuple(pixels.shape[-2:])
    x = loaded.preprocessing.normalize(pixels.to(next(model.parameters()).device))
    maps = {"saliency": saliency(model, x, labels.tolist())}
    maps |= {f"gradcam {layer}": gradcam(model, x, layer, labels.tolist()) for layer in layers}
    with torch.no_grad():
        correct = (model(x).argmax(dim=1).cpu() == labels)
    for method, (m, _) in maps.items():
        _add(result, method, inside(peak_points(m.cpu(), size), boxes), correct)
    centre = torch.tensor([[size[1] / 2, size[0] / 2]]).expand(len(labels), 2)
    _add(result, "centre", inside(centre, boxes), correct)
    result.images += len(labels)
    result.correct += int(correct.sum())


def pointing_game(loaded: LoadedModel, samples: Sequence[BoxedSample], class_names: Sequence[str],
                  layers: Sequence[str], batch_size: int = 50, progress: bool = True
                  ) -> PointingResult:
    """The game on ``samples`` (images with boxes: ``annotations.attach_boxes``), each taken as
    ``predict`` takes it (centre crop at 256/224 of the crop size), explained for its true
    class; ``class_names`` name the samples' labels (the boxes' labels)."""
    from .progress import progress_bar
    from .protocol import centre_crop_resize
    from .transforms import EvalTransform, chw

    crop = loaded.model.config.crop_size
    transform = EvalTransform(centre_crop_resize(crop), crop)
    result, batch = PointingResult(), []
    with progress_bar(len(samples), "pointing game", enabled=progress) as bar:
        for i, s in enumerate(samples):
            pixels, window = transform.view(s.path)
            boxes, _ = clip(window.from_image(s.boxes_of(class_names[s.label])), crop, crop)
            boxes = boxes[area(boxes) > 0]
            if len(boxes):
                batch.append((chw(pixels), s.label, boxes))
            else:
                result.left_out += 1
            if batch and (len(batch) == batch_size or i == len(samples) - 1):
                play_batch(loaded, torch.cat([b[0] for b in batch]),
                           torch.tensor([b[1] for b in batch]), [b[2] for b in batch], layers,
                           result)
                batch = []
            bar.update(1)
    return result
