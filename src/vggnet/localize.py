"""Localisation (the paper's Appendix A): a VGG net whose last layer regresses a bounding box,
and the paper's two test protocols.

The net is the classification net with fc8 replaced by a box regressor, initialised from a
trained classifier (every layer but fc8 copied, ``localizer_from_classifier``; fc8 starts at
the central box, ``init_regressor``): single-class
regression (SCR) has 4 outputs, one box whatever the class; per-class regression (PCR) has 4
per class, fc8 outputs 4k..4k+3 being class k's box. A box is encoded as (centre x, centre y,
width, height) in the input crop's pixels divided by the crop size, so the crop spans
[0, 1] x [0, 1] (``encode``/``decode``). The loss is Euclidean (Caffe's EuclideanLoss: half
the squared distance, averaged over the batch) on the box of the image's ground-truth class.
Fine-tuning covers all layers, or only fc6, fc7 and the new fc8 (``set_finetune``, Table 8).

Dense application: run fully convolutionally on a whole rescaled image, output location
(i, j) is the box the net gives the crop whose top-left corner is at input pixel
(32 j, 32 i) (five 2x2 pools; exact up to the convolutions' zero padding at the crop's
border), which maps it back to the stored image (``dense_boxes``).

Test protocol 1 (Table 8): the central crop, the ground-truth class's box; an image is
correct when the box has IoU >= 0.5 with one of that class's ground-truth boxes.
Test protocol 2 (Table 9): dense application at one or several scales, every location's
boxes merged per class by OverFeat's greedy merging (``vggnet.boxes.greedy_merge``) and
rated by the classifier's scores at those locations; the classifier's top-5 classes get one
box each; an image is correct when one of its five (class, box) guesses has the right class
and IoU >= 0.5 with one of its ground-truth boxes (top-5 localisation error).
Every box returned in stored-image pixels follows ``vggnet.boxes``' conventions.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .annotations import BoxedSample
from .boxes import (
    MERGE_THRESHOLD,
    Window,
    area,
    clip,
    cxcywh_to_xyxy,
    greedy_merge,
    iou,
    xyxy_to_cxcywh,
)
from .initialize import copy_matching_layers
from .model import VGG, build, known_fields
from .preprocess import Preprocessing
from .protocol import FINETUNE, REGRESSIONS
from .transforms import EvalTransform

STRIDE = 32  # input pixels between neighbouring locations of the dense output
IOU_CORRECT = 0.5  # ILSVRC: a box is correct at IoU >= 0.5 with a ground-truth box
REGRESSOR_STD = 1e-3  # fc8's initial weights (``init_regressor``)


@dataclass(frozen=True)
class LocalizerSpec:
    """What a localisation net's fc8 means: ``regression`` SCR or PCR over ``num_classes``
    object classes (those of the classifier it came from)."""

    regression: str = "per-class"
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.regression not in REGRESSIONS:
            raise ValueError(f"regression must be one of {', '.join(REGRESSIONS)}; got "
                             f"{self.regression!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")

    @property
    def boxes(self) -> int:
        """Boxes per input: 1 (SCR) or one per class (PCR)."""
        return 1 if self.regression == "single-class" else self.num_classes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LocalizerSpec:
        return cls(**known_fields(cls, d, "localisation keys"))


class Localizer(nn.Module):
    """A VGG net (``net``, fc8 4 * ``spec.boxes`` wide) read as a box regressor."""

    def __init__(self, net: VGG, spec: LocalizerSpec) -> None:
        super().__init__()
        if net.config.num_classes != 4 * spec.boxes:
            raise ValueError(f"a {spec.regression} localiser over {spec.num_classes} classes needs "
                             f"fc8 with {4 * spec.boxes} outputs; the net has "
                             f"{net.config.num_classes}")
        self.net, self.spec = net, spec
        self.finetune = "all"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Crops (N, 3, crop, crop) -> encoded boxes (N, K, 4), K = ``spec.boxes``."""
        return self.net(x).unflatten(1, (self.spec.boxes, 4))

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Whole images (N, 3, H, W) -> encoded boxes (N, K, 4, h, w) per location."""
        return self.net.forward_dense(x).unflatten(1, (self.spec.boxes, 4))

    def train(self, mode: bool = True) -> Localizer:
        super().train(mode)
        if self.finetune == "fc":  # frozen conv layers keep their batch-norm statistics too
            self.net.features.eval()
        return self


def localizer_from_classifier(classifier: VGG, regression: str = "per-class",
                              seed: int | None = None) -> Localizer:
    """A localisation net initialised from a trained classifier (any config; ``vggnet.weights.
    load_model(path).model`` reads one from a weights file or checkpoint): every layer but
    fc8 copied, a new fc8 regressor that starts at the central box (``init_regressor``)."""
    spec = LocalizerSpec(regression, classifier.config.num_classes)
    net = build(dataclasses.replace(classifier.config, num_classes=4 * spec.boxes), init=None)
    state = {k: v for k, v in classifier.state_dict().items()
             if not k.startswith("classifier.fc8.")}
    report = copy_matching_layers(net, state)
    if report.missing != ["fc8"] or report.shape_mismatch or report.unexpected:
        raise ValueError(f"could not copy the classifier into a localiser:\n{report.summary()}")
    init_regressor(net.classifier.fc8, seed)
    return Localizer(net.to(next(classifier.parameters()).device), spec)


@torch.no_grad()
def init_regressor(fc8: nn.Linear, seed: int | None = None) -> None:
    """Weights N(0, REGRESSOR_STD), every bias 0.5: each box starts within a few hundredths of
    the crop's central half (0.5, 0.5, 0.5, 0.5). The paper does not say how it initialised
    the regressor; Glorot's init here gave outputs of the size of fc7's activations (first
    epoch's loss 0.73 against 0.087 for this, and at lr 1e-3 still 0.25 after 3 epochs, worse
    than always answering the mean box: see docs/localisation.md)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    weight = torch.empty(fc8.weight.shape).normal_(0.0, REGRESSOR_STD, generator=gen)
    fc8.weight.copy_(weight)
    fc8.bias.fill_(0.5)


def set_finetune(localizer: Localizer, mode: str) -> list[nn.Parameter]:
    """Choose what trains: "all" layers, or "fc" (fc6, fc7 and fc8; the conv layers frozen,
    batch norm included). Returns the parameters to give the optimiser."""
    if mode not in FINETUNE:
        raise ValueError(f"finetune must be one of {', '.join(FINETUNE)}; got {mode!r}")
    localizer.finetune = mode
    for p in localizer.net.features.parameters():
        p.requires_grad_(mode == "all")
    for p in localizer.net.classifier.parameters():
        p.requires_grad_(True)
    localizer.train(localizer.training)
    return [p for p in localizer.parameters() if p.requires_grad]


# --- box encoding, targets and loss ------------------------------------------------------------
def encode(boxes: torch.Tensor, crop: int) -> torch.Tensor:
    """xyxy in crop pixels -> the regression's (cx, cy, w, h) / crop."""
    return xyxy_to_cxcywh(boxes) / crop


def decode(boxes: torch.Tensor, crop: int) -> torch.Tensor:
    """The regression's (cx, cy, w, h) / crop -> xyxy in crop pixels."""
    return cxcywh_to_xyxy(boxes * crop)


def crop_target(boxes: torch.Tensor, window: Window, min_visible: float = 0.5
                ) -> torch.Tensor | None:
    """A training crop's regression target: the stored image's ground-truth boxes (k, 4)
    brought into the crop (rescaled, cropped, flipped: ``window``), encoded. Of the boxes
    whose part inside the crop covers at least ``min_visible`` of the box or of the crop
    (whichever is smaller: an object larger than the crop counts when it fills the crop), the
    one with the most area inside; None when there is none. OverFeat did not train on boxes
    overlapping the field of view by less than 50%. Not clipped to the crop: the test compares
    boxes with the whole object, so the net learns to reach beyond its view."""
    boxes = window.from_image(boxes)
    visible = area(clip(boxes, *window.size)[0])
    whole = torch.minimum(area(boxes), torch.tensor(float(window.size[0] * window.size[1])))
    visible = torch.where((visible > 0) & (visible >= min_visible * whole), visible, -1.0)
    if not len(visible) or visible.max() < 0:
        return None
    return encode(boxes[visible.argmax()], window.size[0])


def select(boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, K, 4) boxes -> (N, 4): the box of each input's class (SCR: the one box)."""
    if boxes.shape[1] == 1:
        return boxes[:, 0]
    if labels.min() < 0 or labels.max() >= boxes.shape[1]:
        raise ValueError(f"class indices must be in [0, {boxes.shape[1]}), got "
                         f"{labels.min().item()}..{labels.max().item()}")
    return boxes[torch.arange(len(boxes), device=boxes.device), labels]


def box_loss(output: torch.Tensor, labels: torch.Tensor, target: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
    """Euclidean loss of the ground-truth class's box: half the squared distance between
    (N, 4) encoded boxes, its mean over the batch (or "sum")."""
    per_image = 0.5 * (select(output, labels).float() - target.float()).pow(2).sum(1)
    return per_image.sum() if reduction == "sum" else per_image.mean()


def dense_boxes(boxes: torch.Tensor, window: Window, crop: int) -> torch.Tensor:
    """One image's dense output (K, 4, h, w), encoded -> (h * w, K, 4) xyxy in stored-image
    pixels, locations row-major. ``window`` is the input's (the whole rescaled image, maybe
    flipped); location (i, j) is the crop at input pixel (STRIDE * j, STRIDE * i)."""
    k, _, h, w = boxes.shape
    pix = decode(boxes.permute(2, 3, 0, 1).reshape(h * w, k, 4), crop)  # crop pixels
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    offset = torch.stack([xs, ys, xs, ys], -1).reshape(h * w, 1, 4).to(pix) * STRIDE
    return window.to_image(pix + offset)


def is_correct(box: torch.Tensor, truth: torch.Tensor) -> bool:
    """Whether ``box`` (4,) has IoU >= 0.5 with one of the ground-truth boxes (k, 4)."""
    return bool(len(truth)) and bool(iou(box[None].to(truth), truth).max() >= IOU_CORRECT)


# --- test protocol 1: the central crop, the ground-truth class's box --------------------------
@torch.no_grad()
def central_crop_boxes(localizer: Localizer, crops: torch.Tensor, labels: torch.Tensor,
                       windows: Sequence[Window]) -> torch.Tensor:
    """Model-ready central crops (N, 3, crop, crop) -> the box of each image's class (N, 4),
    xyxy in stored-image pixels (``windows``: where each crop came from)."""
    pix = decode(select(localizer(crops).float(), labels.to(crops.device)), crops.shape[-1])
    return torch.stack([w.to_image(b) for w, b in zip(windows, pix.cpu(), strict=True)])


def protocol1(localizer: Localizer, crops: torch.Tensor, labels: torch.Tensor,
              windows: Sequence[Window], truth: Sequence[torch.Tensor]) -> list[bool]:
    """Table 8's test: per image, whether the central crop's box for the ground-truth class
    has IoU >= 0.5 with one of that class's ground-truth boxes (``truth``, (k, 4) each)."""
    boxes = central_crop_boxes(localizer, crops, labels, windows)
    return [is_correct(b, t) for b, t in zip(boxes, truth, strict=True)]


# --- test protocol 2: dense boxes, greedy merging, the classifier's top 5 --------------------
@dataclass
class DensePredictions:
    """Everything the dense passes over one image gave: ``boxes`` (L, K, 4) xyxy in stored-
    image pixels from every location of every view (K = 1 for SCR), ``probs`` (L, C) the
    classifier's posteriors at those locations, ``class_scores`` (C,) its posteriors for the
    image (the mean over ``views`` of each view's softmax of its mean logits)."""

    boxes: torch.Tensor
    probs: torch.Tensor
    class_scores: torch.Tensor
    views: int = 1

    def union(self, other: DensePredictions) -> DensePredictions:
        """Both sets of boxes (the paper's fusion of several nets), class scores averaged."""
        k = max(self.boxes.shape[1], other.boxes.shape[1])  # an SCR box serves every class
        boxes = torch.cat([self.boxes.expand(-1, k, 4), other.boxes.expand(-1, k, 4)])
        n = self.views + other.views
        scores = (self.class_scores * self.views + other.class_scores * other.views) / n
        return DensePredictions(boxes, torch.cat([self.probs, other.probs]), scores, n)


@torch.no_grad()
def dense_predictions(localizer: Localizer, classifier: VGG,
                      views: Sequence[tuple[torch.Tensor, Window]]) -> DensePredictions:
    """Run both nets densely over model-ready views (1, 3, H, W) of one image (several
    scales, flips) and collect every location's boxes and class posteriors."""
    crop = localizer.net.config.crop_size
    boxes, probs, scores = [], [], []
    for x, window in views:
        box_map = localizer.forward_dense(x)[0].float().cpu()  # (K, 4, h, w)
        logits = classifier.forward_dense(x)[0].float().cpu()  # (C, h', w')
        scores.append(logits.mean((1, 2)).softmax(0))
        if logits.shape[-2:] != box_map.shape[-2:]:  # nets of other crop sizes: nearest location
            logits = F.interpolate(logits[None], size=box_map.shape[-2:], mode="nearest")[0]
        probs.append(logits.flatten(1).T.softmax(1))  # (h * w, C), row-major as the boxes
        boxes.append(dense_boxes(box_map, window, crop))
    return DensePredictions(torch.cat(boxes), torch.cat(probs), torch.stack(scores).mean(0),
                            len(views))


@dataclass(frozen=True)
class Guess:
    """One of an image's five answers: a class, its box (stored-image xyxy) and the box's
    score (the summed class posteriors of the locations merged into it)."""

    label: int
    box: tuple[float, float, float, float]
    score: float


def top5_guesses(pred: DensePredictions, k: int = 5, threshold: float = MERGE_THRESHOLD
                 ) -> list[Guess]:
    """For each of the classifier's top-``k`` classes, the class's boxes from every location
    greedily merged, the merged box with the highest summed posterior its answer."""
    guesses = []
    for c in pred.class_scores.topk(min(k, len(pred.class_scores))).indices.tolist():
        boxes = pred.boxes[:, c if pred.boxes.shape[1] > 1 else 0]
        merged, summed, _ = greedy_merge(boxes, pred.probs[:, c], threshold)
        guesses.append(Guess(c, tuple(merged[0].tolist()), float(summed[0])))
    return guesses


def top5_correct(guesses: Sequence[Guess], label: int, truth: torch.Tensor) -> bool:
    """ILSVRC's localisation test for one image: one guess has the right class and IoU >= 0.5
    with one of the ground-truth boxes (k, 4) of that class."""
    return any(g.label == label and is_correct(torch.tensor(g.box), truth) for g in guesses)


def protocol2(localizer: Localizer, classifier: VGG, views: Sequence[tuple[torch.Tensor, Window]],
              label: int, truth: torch.Tensor, threshold: float = MERGE_THRESHOLD
              ) -> tuple[list[Guess], bool]:
    """Table 9's test for one image: its five guesses and whether they localise it."""
    guesses = top5_guesses(dense_predictions(localizer, classifier, views), threshold=threshold)
    return guesses, top5_correct(guesses, label, truth)


# --- over a set of images on disk ------------------------------------------------------------
def _model_input(pixels, prep: Preprocessing, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) normalised on ``device``."""
    return prep.normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device))


def central_crop(path: str | os.PathLike, size: int, crop: int, prep: Preprocessing,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, Window]:
    """Protocol 1's input: the central crop of the image rescaled to ``size`` (Q)."""
    pixels, window = EvalTransform(size, crop).view(path)
    return _model_input(pixels, prep, torch.device(device)), window


def image_views(path: str | os.PathLike, scales: Sequence[int], prep: Preprocessing,
                flip: bool = False, device: torch.device | str = "cpu"
                ) -> list[tuple[torch.Tensor, Window]]:
    """Protocol 2's inputs: the whole image rescaled to each of ``scales`` (Q), and mirrored
    too if ``flip``."""
    views = []
    for q in scales:
        pixels, window = EvalTransform(q, None).view(path)
        x = _model_input(pixels, prep, torch.device(device))
        views.append((x, window))
        if flip:
            views.append((x.flip(-1), dataclasses.replace(window, flip=True)))
    return views


@dataclass
class LocalisationResult:
    """Per image, whether it was localised; ``error`` in percent."""

    correct: list[bool]

    @property
    def error(self) -> float:
        return 100.0 * (1 - sum(self.correct) / len(self.correct)) if self.correct else float("nan")


def load_localizer(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """(Localizer, the file's ``LoadedModel``: preprocessing, class names, metadata) from a
    checkpoint or weights file alone: its "localisation" metadata says what fc8 regresses."""
    from .weights import load_model

    loaded = load_model(path, map_location)
    raw = loaded.meta.get("localisation")
    if not isinstance(raw, dict):
        raise ValueError(f"{str(path)!r} is not a localisation net (its metadata has no "
                         "'localisation' entry); make one from a classifier with `vggnet "
                         f"localize train --from {path}`")
    return Localizer(loaded.model, LocalizerSpec.from_dict(raw)), loaded


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def protocol1_error(localizer: Localizer, samples: Sequence[BoxedSample],
                    class_names: Sequence[str], size: int, prep: Preprocessing,
                    batch_size: int = 32) -> LocalisationResult:
    """Protocol 1 over images with ground-truth boxes (``vggnet.annotations.attach_boxes``),
    central crops of the images rescaled to ``size`` (Q)."""
    crop, device, correct = localizer.net.config.crop_size, _device(localizer), []
    localizer.eval()
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        inputs = [central_crop(s.path, size, crop, prep, device) for s in batch]
        labels = torch.tensor([s.label for s in batch])
        truth = [s.boxes_of(class_names[s.label]) for s in batch]
        correct += protocol1(localizer, torch.cat([x for x, _ in inputs]), labels,
                             [w for _, w in inputs], truth)
    return LocalisationResult(correct)


def protocol2_error(localizer: Localizer, classifier: VGG, samples: Sequence[BoxedSample],
                    class_names: Sequence[str], scales: Sequence[int], prep: Preprocessing,
                    flip: bool = False, threshold: float = MERGE_THRESHOLD) -> LocalisationResult:
    """Protocol 2 (top-5 localisation error) over images with ground-truth boxes, the nets
    applied densely at each of ``scales`` (Q)."""
    device, correct = _device(localizer), []
    localizer.eval()
    classifier.eval()
    for s in samples:
        views = image_views(s.path, scales, prep, flip, device)
        truth = s.boxes_of(class_names[s.label])
        correct.append(protocol2(localizer, classifier, views, s.label, truth, threshold)[1])
    return LocalisationResult(correct)
