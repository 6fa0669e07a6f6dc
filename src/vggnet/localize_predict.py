"""A localisation net's answers for single images (``vggnet localize predict``): protocol 2's
five (class, box) guesses, printed and drawn on the image as a PNG."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .image import BadImageError, list_images, load_rgb
from .localize import Guess, dense_predictions, image_views, top5_guesses
from .localize_eval import Member, load_member
from .runtime import Runtime, make_runtime
from .settings import LocalizePredictCommand

COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))
MIN_DRAWN_SIDE = 384  # small images are drawn enlarged, so that the labels stay legible


@dataclass(frozen=True)
class BoxGuess:
    """One answer: the class (index, name), the classifier's posterior for it, its box
    (x1, y1, x2, y2 in the image's pixels) and the box's score (summed posteriors of the
    locations merged into it)."""

    label: int
    name: str
    probability: float
    box: tuple[float, float, float, float]
    score: float


def predict_boxes(member: Member, path: str | os.PathLike, scales: Sequence[int],
                  runtime: Runtime, flip: bool = False, top: int = 5) -> list[BoxGuess]:
    """The ``top`` guesses for one image, best class first (raises BadImageError)."""
    views = image_views(path, scales, member.loaded.preprocessing, flip, runtime.device)
    with runtime.autocast():
        pred = dense_predictions(member.localizer, member.classifier, views)
    names = member.loaded.class_names or []
    guesses: list[Guess] = top5_guesses(pred, k=top)
    return [BoxGuess(g.label, names[g.label] if names else str(g.label),
                     float(pred.class_scores[g.label]), g.box, g.score) for g in guesses]


def draw_guesses(path: str | os.PathLike, guesses: Sequence[BoxGuess], out: Path) -> Path:
    """The image with each guess's box and "rank. class probability" drawn on it, as a PNG;
    an image whose shorter side is under ``MIN_DRAWN_SIDE`` is enlarged first. Labels that
    would cover each other (equal boxes: single-class regression) are stacked."""
    from PIL import ImageDraw, ImageFont

    image = load_rgb(path)
    k = max(1.0, MIN_DRAWN_SIDE / min(image.size))
    if k > 1:
        image = image.resize((round(image.width * k), round(image.height * k)))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, min(image.size) // 28))
    width = max(2, min(image.size) // 160)
    texts = [f"{rank}. {g.name} {g.probability:.0%}" for rank, g in enumerate(guesses, 1)]
    labels = _place_labels([tuple(v * k for v in g.box) for g in guesses],
                           [draw.textbbox((0, 0), t, font=font) for t in texts], image.size)
    for i in reversed(range(len(guesses))):  # the best one drawn last, on top
        colour = COLOURS[i % len(COLOURS)]
        draw.rectangle(tuple(v * k for v in guesses[i].box), outline=colour, width=width)
        draw.rectangle(labels[i], fill=colour)
        draw.text((labels[i][0] + 2, labels[i][1]), texts[i], fill=(255, 255, 255), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out


def _place_labels(boxes, extents, size) -> list[tuple[float, float, float, float]]:
    """A label rectangle per box, best first: above the box's top-left corner (inside the
    image), moved down past the labels placed before it that it would cover."""
    placed: list[tuple[float, float, float, float]] = []
    for (x1, y1, _, _), (left, _, right, bottom) in zip(boxes, extents, strict=True):
        w, h = right - left + 4, bottom + 2
        x = min(max(0.0, x1), size[0] - w)
        y = y1 - h if y1 - h >= 0 else max(0.0, y1)
        while any(x < px2 and px1 < x + w and y < py2 and py1 < y + h
                  for px1, py1, px2, py2 in placed):
            y += h
        placed.append((x, y, x + w, y + h))
    return placed


def output_name(out: Path, path: Path, taken: set[Path]) -> Path:
    """OUT/<stem>.boxes.png, numbered when two images share a stem."""
    name, n = out / f"{path.stem}.boxes.png", 2
    while name in taken:
        name, n = out / f"{path.stem}-{n}.boxes.png", n + 1
    taken.add(name)
    return name


def localize_predict_command(c: LocalizePredictCommand) -> int:
    """``vggnet localize predict``: the guesses on stdout and one PNG per image; an image
    that cannot be read is reported on stderr and the exit code is 1."""
    from .checkpoint import check_output_folder
    from .runlog import dated_folder

    if c.top < 1:
        raise ValueError(f"--top must be at least 1, got {c.top}")
    out = check_output_folder(c.out or dated_folder(Path("localisation"), "predictions"),
                              "predictions")
    rt = make_runtime(c.device, c.precision)
    member = load_member(c.weights, c.classifier, rt.device, with_classifier=True)
    scales = list(c.scales or [member.scale])
    crop = member.localizer.net.config.crop_size
    if min(scales) < crop:
        raise ValueError(f"scales must be at least the crop size {crop}, got {scales}")
    failed, taken = 0, set()
    for path in list_images(c.images):
        try:
            guesses = predict_boxes(member, path, scales, rt, c.flip, c.top)
            png = draw_guesses(path, guesses, output_name(out, path, taken))
        except BadImageError as e:
            failed += 1
            print(f"vggnet localize predict: error: {e}", file=sys.stderr)
            continue
        print(f"{path} -> {png}")
        for rank, g in enumerate(guesses, 1):
            box = ", ".join(f"{v:.0f}" for v in g.box)
            print(f"  {rank}. {g.probability:7.2%}  {g.name} [{g.label}]  box ({box})  "
                  f"box score {g.score:.2f}")
    return 1 if failed else 0
