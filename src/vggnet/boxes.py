"""Bounding boxes: formats, IoU, where a network input came from, and OverFeat's greedy merging.

Conventions, shared by every module that handles boxes (localisation, the box files of
``vggnet.annotations``, the explain helpers' pointing game):

- A box is a float tensor (..., 4). Corner format, "xyxy": (x1, y1, x2, y2), the left, top,
  right and bottom edges in continuous pixel coordinates of the image the box refers to.
  Pixel column i covers [i, i + 1), so the box around pixel columns 10..19 and rows 5..7 is
  (10, 5, 20, 8), and a box's width is x2 - x1. Centre format, "cxcywh": (centre x,
  centre y, width, height), the paper's regression target (Appendix A).
- ImageNet's files give integer corners (xmin ymin xmax ymax); we take them as they are,
  xmax as the right edge. The ILSVRC devkit counts xmax as the last pixel inside (widths
  xmax - xmin + 1): a difference of one pixel, which moves IoU by about 1% on a 100-pixel box.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The merge threshold on ``match_score`` (ours; OverFeat gives no value): two boxes of the same
# size merge when shifted by up to sqrt(2) - 1 = 0.41 of their side (score 0.28 at a tenth of
# a side, 0.65 at a quarter, 1.17 at a half); boxes that do not overlap never merge (their
# score is 1 plus the centre distance term)
MERGE_THRESHOLD = 1.0


# --- formats ----------------------------------------------------------------------------------
def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (...); an inverted box has area 0."""
    return ((boxes[..., 2] - boxes[..., 0]).clamp(min=0)
            * (boxes[..., 3] - boxes[..., 1]).clamp(min=0))


def intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Area of the overlap of xyxy boxes, broadcasting (..., 4) with (..., 4) -> (...)."""
    lo = torch.maximum(a[..., :2], b[..., :2])
    hi = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (hi - lo).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of xyxy boxes, broadcasting: (N, 4) with (N, 4) -> (N,) pairs
    them up; ``iou(a[:, None], b[None])`` gives the (N, M) matrix. Two empty boxes score 0."""
    inter = intersection(a, b)
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


# --- transforms -------------------------------------------------------------------------------
def rescale(boxes: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Boxes of an image resized by (sx, sy) output pixels per input pixel."""
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def translate(boxes: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    return boxes + boxes.new_tensor([dx, dy, dx, dy])


def hflip(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Boxes of an image ``width`` pixels wide mirrored left-right (x -> width - x)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], -1)


def clip(boxes: torch.Tensor, width: float, height: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes clipped to the image [0, width] x [0, height], and a (...) mask of the boxes that
    changed. A box wholly outside comes back with zero width or height (``area`` 0)."""
    hi = boxes.new_tensor([width, height, width, height])
    out = torch.minimum(boxes.clamp(min=0), hi)
    return out, (out != boxes).any(-1)


@dataclass(frozen=True)
class Window:
    """Where a network input came from: the stored image, ``image_size`` = (w, h), rescaled
    isotropically to ``rescaled_size`` (w, h); the input is ``box`` = (x0, y0, x1, y1) of
    the rescaled image (a crop, or the whole of it for dense application), mirrored
    left-right if ``flip``. Maps boxes between the stored image and the input."""

    image_size: tuple[int, int]
    rescaled_size: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool = False

    @property
    def size(self) -> tuple[int, int]:
        """(w, h) of the input."""
        x0, y0, x1, y1 = self.box
        return x1 - x0, y1 - y0

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): rescaled pixels per stored pixel (equal up to the rounding of the sides)."""
        return (self.rescaled_size[0] / self.image_size[0],
                self.rescaled_size[1] / self.image_size[1])

    def from_image(self, boxes: torch.Tensor) -> torch.Tensor:
        """Stored-image boxes -> input boxes (not clipped to the input: see ``clip``)."""
        out = translate(rescale(boxes, *self.scale), -self.box[0], -self.box[1])
        return hflip(out, self.size[0]) if self.flip else out

    def to_image(self, boxes: torch.Tensor) -> torch.Tensor:
        """Input boxes -> stored-image boxes (the inverse of ``from_image``)."""
        out = hflip(boxes, self.size[0]) if self.flip else boxes
        sx, sy = self.scale
        return rescale(translate(out, self.box[0], self.box[1]), 1 / sx, 1 / sy)


# --- OverFeat's greedy merging ----------------------------------------------------------------
def match_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How far apart two xyxy boxes are for merging (0 for equal boxes), broadcasting.

    OverFeat (Sermanet et al. 2014, Section 4.3) merges the pair with the smallest "sum of
    the distance between centers of the two bounding boxes and the intersection area".
    Read literally, overlap would raise the score and two equal boxes would never merge,
    against the stated aim of merging spatially close predictions; and a distance and an
    area cannot be added across scales. Our reading keeps both terms, scale-free, with
    overlap drawing boxes together: the distance between the centres divided by the mean
    side of the two boxes, plus 1 - IoU.
    """
    ca, cb = xyxy_to_cxcywh(a), xyxy_to_cxcywh(b)
    side = (ca[..., 2:].sum(-1) + cb[..., 2:].sum(-1)) / 4
    dist = torch.linalg.vector_norm(ca[..., :2] - cb[..., :2], dim=-1)
    return dist / side.clamp(min=1e-6) + 1 - iou(a, b)


def greedy_merge(boxes: torch.Tensor, scores: torch.Tensor, threshold: float = MERGE_THRESHOLD
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OverFeat's greedy merging: (n, 4) xyxy boxes with (n,) scores -> merged boxes (m, 4),
    their summed scores (m,) and how many boxes each merged (m,), best score first.

    Repeatedly merge the pair with the smallest ``match_score`` until it exceeds
    ``threshold``. A merged box is the mean of the coordinates of all the boxes merged into
    it (so the order of merging does not weight them) and its score is the sum of theirs
    (OverFeat: "cumulatively adding the detection class outputs"); the final prediction is
    the first row. Ties go to the lowest indices. O(n^2) memory, O(n^3) time at worst.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"greedy_merge takes boxes (n, 4) and scores (n,), got "
                         f"{tuple(boxes.shape)} and {tuple(scores.shape)}")
    n = boxes.shape[0]
    total = boxes.double().clone()  # summed coordinates of each cluster's members
    count = torch.ones(n, dtype=torch.float64)
    score = scores.double().clone()
    live = torch.ones(n, dtype=torch.bool)
    means = total.clone()
    m = match_score(means[:, None], means[None])  # (n, n)
    m.fill_diagonal_(torch.inf)
    while n > 1:
        best = int(torch.argmin(m))
        i, j = divmod(best, n)
        if not m[i, j] <= threshold:  # also stops at inf: nothing left to merge
            break
        total[i] += total[j]
        count[i] += count[j]
        score[i] += score[j]
        means[i] = total[i] / count[i]
        live[j] = False
        row = match_score(means[i], means)
        row[~live] = torch.inf
        row[i] = torch.inf
        m[i], m[:, i] = row, row
        m[j], m[:, j] = torch.inf, torch.inf
    order = torch.argsort(score[live], descending=True, stable=True)
    return (means[live][order].to(boxes.dtype), score[live][order].to(scores.dtype),
            count[live][order].long())
