"""The built-in dataset: synthetic, generated deterministically from a seed, written to disk.

Ten classes of flat objects (disc, ring, square, bar, triangle, star, cross, hexagon,
crescent, arrow), each image showing one object of its class at a widely varying scale
(diameter about 1/3 to 9/10 of the shorter side), position (anywhere, mostly near the middle,
partly outside the frame at times) and rotation, in a random colour or texture, on a cluttered
colour background (gradients, blotches, lines and small shapes, some of them in front of the
object), with sensor-like noise, as JPEGs of varying non-square sizes. Shape is what defines a
class; colour is only a weak cue (each class's objects lean to a hue of their own, with so much
spread that neighbouring classes overlap), and some shapes are alike at small sizes
(disc / hexagon / ring, square / bar), so a small network does not reach 100%.

The images are written as an image-folder tree (DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg)
so that training reads them through exactly the code path of real data. Image i of a split
depends only on (seed, split, i): generation is parallel and repeatable.

Each object's bounding box (``object_box``: the extent of the shape's pixels inside the
frame, including parts hidden by clutter, as ImageNet's boxes include occluded parts) is
written next to the images as DIR/LOC_train_solution.csv and DIR/LOC_val_solution.csv, in
the format of ImageNet's localisation files (``vggnet.annotations``), the class name in
place of the wnid and the file name without ".jpg" as the image id.
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from .annotations import LabelledBox, write_box_csv

CLASSES = ("disc", "ring", "square", "bar", "triangle", "star", "cross", "hexagon", "crescent",
           "arrow")
SPLITS = {"train": 0, "val": 1}
MARKER = "synthetic.json"
VERSION = 6  # bump when the rendering or the files change, so cached copies are regenerated
BOX_FILES = {"train": "LOC_train_solution.csv", "val": "LOC_val_solution.csv"}


@dataclass(frozen=True)
class SyntheticSpec:
    seed: int = 0
    train_per_class: int = 500
    val_per_class: int = 100
    num_classes: int = 10  # the first N of CLASSES
    min_side: int = 96  # shorter image side, drawn uniformly from [min_side, max_side]
    max_side: int = 160

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= len(CLASSES):
            raise ValueError(f"num_classes must be in [2, {len(CLASSES)}], got {self.num_classes}")
        if self.train_per_class < 1 or self.val_per_class < 1:
            raise ValueError(f"need at least one image per class and split, got train "
                             f"{self.train_per_class}, val {self.val_per_class}")
        if not 32 <= self.min_side <= self.max_side:
            raise ValueError(f"image sides must satisfy 32 <= min_side <= max_side, got "
                             f"{self.min_side}, {self.max_side}")

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES[: self.num_classes]

    def count(self, split: str) -> int:
        per = self.train_per_class if split == "train" else self.val_per_class
        return per * self.num_classes


# --- shapes: polygons in unit coordinates (radius about 1), or masks drawn directly ---------------
def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


POLYGONS = {
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.75,
    "bar": np.array([[-1, -0.3], [1, -0.3], [1, 0.3], [-1, 0.3]]),
    "triangle": _regular(3, -np.pi / 2),
    "star": _star(),
    "cross": np.array([[-1, -.25], [-.25, -.25], [-.25, -1], [.25, -1], [.25, -.25], [1, -.25],
                       [1, .25], [.25, .25], [.25, 1], [-.25, 1], [-.25, .25], [-1, .25]]),
    "hexagon": _regular(6),
    "arrow": np.array([[-1, -.2], [.2, -.2], [.2, -.6], [1, 0], [.2, .6], [.2, .2], [-1, .2]]),
}


def _place(points: np.ndarray, cx: float, cy: float, r: float,
           angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    rot = points @ np.array([[c, s], [-s, c]])
    return [(cx + r * x, cy + r * y) for x, y in rot]


def _shape_mask(name: str, size: tuple[int, int], cx: float, cy: float, r: float,
                angle: float) -> Image.Image:
    mask = Image.new("L", size, 0)
    d = ImageDraw.Draw(mask)
    if name in POLYGONS:
        d.polygon(_place(POLYGONS[name], cx, cy, r, angle), fill=255)
    elif name == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        q = 0.55 * r
        d.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
    elif name == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = 0.5 * r * math.cos(angle), 0.5 * r * math.sin(angle)
        q = 0.85 * r
        d.ellipse([cx + ox - q, cy + oy - q, cx + ox + q, cy + oy + q], fill=0)
    else:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(CLASSES)}")
    return mask


# --- pictures ---------------------------------------------------------------------------------
def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _away_from(draw, ref: np.ndarray, distance: float) -> np.ndarray:
    """The first of up to 10 colours from ``draw()`` at least ``distance`` from ``ref`` (RGB,
    Euclidean), else the farthest of them."""
    best, best_d = None, -1.0
    for _ in range(10):
        c = draw()
        d = float(np.linalg.norm(c - ref))
        if d > best_d:
            best, best_d = c, d
        if d >= distance:
            break
    return best


def _far_colour(rng: np.random.Generator, ref: np.ndarray, distance: float = 100.0) -> np.ndarray:
    """A random colour at least ``distance`` away from ``ref``, so that the object stands out
    from the background around it."""
    return _away_from(lambda: np.array(_colour(rng), np.float32), ref, distance)


def _class_colour(rng: np.random.Generator, label: int, classes: int, ref: np.ndarray,
                  distance: float = 100.0) -> np.ndarray:
    """A colour whose hue is the class's own (evenly spread around the wheel) plus broad noise
    (std 0.12 turns, so neighbouring classes overlap a lot), away from ``ref`` if it can be."""

    def draw() -> np.ndarray:
        hue = (label / classes + rng.normal(0.0, 0.12)) % 1.0
        return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0)),
                        np.float32) * 255

    return _away_from(draw, ref, distance)


def _texture(rng: np.random.Generator, w: int, h: int, ref: np.ndarray, label: int,
             classes: int) -> Image.Image:
    """A fill for an object: flat colour (60%), stripes of two colours, or a gradient; the
    first colour has the class's hue (a weak cue, as colour is for real objects), the second is
    any colour; both differ from ``ref`` (the background under the object)."""
    kind = rng.choice(3, p=[0.6, 0.2, 0.2])
    a, b = _class_colour(rng, label, classes, ref), _far_colour(rng, ref)
    if kind == 0:
        return Image.new("RGB", (w, h), tuple(int(v) for v in a))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    t = xx * np.cos(theta) + yy * np.sin(theta)
    if kind == 1:
        period = rng.uniform(4, 14)
        t = (np.floor(t / period) % 2)
    else:
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    img = a + t[..., None] * (b - a)
    return Image.fromarray(img.astype(np.uint8), "RGB")


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Gradient plus low-frequency colour blotches, (h, w, 3) float32."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(theta) + yy * np.sin(theta)
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    base = a + t[..., None] * (b - a)
    gh, gw = rng.integers(3, 8, 2)
    blotch = Image.fromarray(rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8), "RGB")
    blotch = np.asarray(blotch.resize((w, h), Image.BICUBIC), np.float32)
    mix = rng.uniform(0.1, 0.35)
    return (1 - mix) * base + mix * blotch


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, n: int) -> None:
    """Small distractors: lines, ellipses, rectangles and arcs, all smaller than objects."""
    side = min(w, h)
    for _ in range(n):
        kind = rng.integers(4)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.015, 0.05) * side
        colour = _colour(rng)
        if kind == 0:
            length, a = rng.uniform(0.1, 0.5) * side, rng.uniform(0, 2 * np.pi)
            draw.line([x, y, x + length * math.cos(a), y + length * math.sin(a)], fill=colour,
                      width=int(rng.integers(1, 4)))
        elif kind == 1:
            draw.ellipse([x - r, y - r * rng.uniform(0.4, 1), x + r, y + r], fill=colour)
        elif kind == 2:
            draw.rectangle([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], fill=colour)
        else:
            start = rng.uniform(0, 360)
            draw.arc([x - 2 * r, y - 2 * r, x + 2 * r, y + 2 * r], start,
                     start + rng.uniform(60, 270), fill=colour, width=int(rng.integers(1, 4)))


class Placement(NamedTuple):
    """Where an object was drawn: its shape, centre, radius (pixels) and rotation (radians)."""

    shape: str
    cx: float
    cy: float
    r: float
    angle: float


class Rendered(NamedTuple):
    image: Image.Image
    label: int
    quality: int  # of the JPEG it is stored as
    box: tuple[int, int, int, int]  # xyxy of the object's pixels (vggnet.boxes conventions)
    placement: Placement


def render(spec: SyntheticSpec, split: str, index: int) -> tuple[Image.Image, int, int]:
    """Image ``index`` of ``split``: (RGB image, class index, JPEG quality)."""
    return render_all(spec, split, index)[:3]


def object_box(spec: SyntheticSpec, split: str, index: int) -> tuple[int, int, int, int]:
    """The bounding box of image ``index``'s object: (x1, y1, x2, y2), pixel columns x1 to
    x2 - 1 and rows y1 to y2 - 1 of the image (``vggnet.boxes`` conventions), the extent of
    every pixel of the shape inside the frame. Renders the image (a few milliseconds)."""
    return render_all(spec, split, index).box


def image_id(spec: SyntheticSpec, index: int) -> str:
    """The file name of image ``index`` without ".jpg": the image id in the box files."""
    name = spec.classes[index % spec.num_classes]
    return f"{name}_{index:06d}"


def render_all(spec: SyntheticSpec, split: str, index: int) -> Rendered:
    """Image ``index`` of ``split`` with everything known about it."""
    rng = np.random.default_rng([spec.seed, SPLITS[split], index])
    label = index % spec.num_classes
    short = int(rng.integers(spec.min_side, spec.max_side + 1))
    long = int(round(short * rng.uniform(1.15, 1.6)))  # never square
    w, h = (long, short) if rng.random() < 0.65 else (short, long)

    background = np.clip(_background(rng, w, h), 0, 255)
    canvas = Image.fromarray(background.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    n_clutter = int(rng.integers(3, 10))
    n_front = int(rng.integers(0, 2))
    _clutter(draw, rng, w, h, n_clutter)

    r = min(w, h) * math.exp(rng.uniform(math.log(0.17), math.log(0.45)))  # object radius
    # anywhere, but mostly near the middle (as in photos); up to half a radius outside the frame
    cx = float(np.clip(rng.normal(w / 2, 0.2 * w), 0.5 * r, w - 0.5 * r))
    cy = float(np.clip(rng.normal(h / 2, 0.2 * h), 0.5 * r, h - 0.5 * r))
    placement = Placement(spec.classes[label], cx, cy, r, rng.uniform(0, 2 * np.pi))
    mask = _shape_mask(placement.shape, (w, h), cx, cy, r, placement.angle)
    box = mask.getbbox()  # the shape's pixels (the mask is binary: no antialiasing)
    under = background[int(min(cy, h - 1)), int(min(cx, w - 1))]
    canvas.paste(_texture(rng, w, h, under, label, spec.num_classes), (0, 0), mask)
    _clutter(draw, rng, w, h, n_front)  # in front of the object

    pixels = np.asarray(canvas, np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(2, 10), pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    return Rendered(image, label, int(rng.integers(70, 96)), box, placement)


def _write(job: tuple[SyntheticSpec, str, str, int]) -> tuple[str, LabelledBox]:
    spec, root, split, index = job
    image, label, quality, box, _ = render_all(spec, split, index)
    name = image_id(spec, index)
    image.save(Path(root) / split / spec.classes[label] / f"{name}.jpg", quality=quality)
    return name, LabelledBox(spec.classes[label], box)


class _Serial:
    """``pool.map`` in this process (one worker)."""

    def map(self, fn, jobs, chunksize=1):
        return map(fn, jobs)

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc) -> None:
        return None


def is_made(root: str | os.PathLike, spec: SyntheticSpec) -> bool:
    """True if ``root`` holds a complete copy of this dataset (the marker is written last)."""
    marker = Path(root) / MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("version") == VERSION and meta.get("spec") == dataclasses.asdict(spec)


def make_synthetic(root: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec(),
                   workers: int | None = None, progress: Callable[[int], None] | None = None,
                   force: bool = False) -> bool:
    """Write the dataset under ``root``; returns False when a complete copy with the same spec
    was already there (the cache), True when it was generated.

    A folder that is not an earlier copy of this dataset (no marker) is never overwritten.
    """
    root = Path(root)
    if is_made(root, spec) and not force:
        return False
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).exists() and not (root / ".incomplete").exists():
            raise ValueError(f"{str(root)!r} exists and is not a vggnet synthetic dataset; "
                             "choose an empty or new folder")
        for sub in ("train", "val"):
            shutil.rmtree(root / sub, ignore_errors=True)
        for name in (MARKER, *BOX_FILES.values()):
            (root / name).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / ".incomplete").touch()
    for split in SPLITS:
        for c in spec.classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
    jobs = [(spec, str(root), split, i) for split in SPLITS for i in range(spec.count(split))]
    workers = workers or os.cpu_count() or 1
    boxes: dict[str, dict[str, list[LabelledBox]]] = {split: {} for split in SPLITS}
    with ProcessPoolExecutor(workers) if workers > 1 else _Serial() as pool:
        done = pool.map(_write, jobs, chunksize=64)
        for (_, _, split, _), (name, box) in zip(jobs, done, strict=True):
            boxes[split][name] = [box]
            if progress:
                progress(1)
    for split, rows in boxes.items():
        write_box_csv(root / BOX_FILES[split], rows)
    meta = {"version": VERSION, "spec": dataclasses.asdict(spec), "classes": list(spec.classes),
            "counts": {s: spec.count(s) for s in SPLITS},
            "about": "synthetic shapes on cluttered backgrounds, generated by vggnet.synthetic"}
    (root / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
    (root / ".incomplete").unlink()
    return True
