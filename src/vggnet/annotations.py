"""Localisation ground truth on disk: ImageNet's bounding-box files and the built-in dataset's.

Two formats are read:
- Kaggle's LOC_train_solution.csv / LOC_val_solution.csv: the header "ImageId,PredictionString",
  then one row per image: its id (the file name without extension), and "wnid x1 y1 x2 y2"
  once per box, space-separated, in pixels of the stored image. ``vggnet.synthetic`` writes
  the same files for the built-in dataset (class names in place of wnids).
- The ILSVRC bounding-box XML folders (PASCAL VOC style, one file per image, any depth):
  <annotation><filename>, <size><width><height>, and per box
  <object><name>wnid</name><bndbox><xmin><ymin><xmax><ymax></bndbox></object>.
Coordinates are kept as the files give them (``vggnet.boxes``: x2, y2 are the right and
bottom edges). ``read_boxes`` reads either; ``attach_boxes`` pairs a dataset's images with
their boxes, skipping (and reporting) images without a box and clipping boxes to the image.
"""

from __future__ import annotations

import csv
import io
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .boxes import area, clip
from .checkpoint import atomic_write

HEADER = ["ImageId", "PredictionString"]


@dataclass(frozen=True)
class LabelledBox:
    """One ground-truth box: the class it frames (wnid or class folder name) and its corners
    (x1, y1, x2, y2) in pixels of the stored image."""

    label: str
    box: tuple[float, float, float, float]


Annotations = dict[str, list[LabelledBox]]  # image id (file name without extension) -> boxes


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def write_box_csv(path: str | os.PathLike,
                  annotations: Mapping[str, Sequence[LabelledBox]]) -> Path:
    """Write ``annotations`` as a LOC_*_solution.csv (atomically), rows in the mapping's order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    for image, boxes in annotations.items():
        writer.writerow([image, " ".join(f"{b.label} {' '.join(_number(v) for v in b.box)}"
                                         for b in boxes)])
    return atomic_write(path, lambda f: f.write(out.getvalue().encode()))


def _checked_box(coords: Sequence[str], where: str) -> tuple[float, float, float, float]:
    try:
        x1, y1, x2, y2 = (float(v) for v in coords)
    except ValueError:
        raise ValueError(f"{where}: box coordinates must be numbers, got {' '.join(coords)!r}"
                         ) from None
    if not (x2 >= x1 and y2 >= y1):
        raise ValueError(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has x2 < x1 or y2 < y1; "
                         "expected xmin ymin xmax ymax")
    return x1, y1, x2, y2


def _parse_row(row: list[str], where: str) -> tuple[str, list[LabelledBox]]:
    tokens = row[1].split() if len(row) == 2 else []
    if len(row) != 2 or not row[0].strip() or not tokens or len(tokens) % 5:
        raise ValueError(f"{where}: expected 'ImageId,wnid x1 y1 x2 y2 [wnid x1 y1 x2 y2 ...]' "
                         f"(5 values per box), got {','.join(row)!r}")
    boxes = [LabelledBox(tokens[i], _checked_box(tokens[i + 1:i + 5], where))
             for i in range(0, len(tokens), 5)]
    return row[0].strip(), boxes


def read_box_csv(path: str | os.PathLike) -> Annotations:
    """A LOC_*_solution.csv -> {image id: boxes}. A malformed line is an error naming the file
    and the line."""
    path = Path(path)
    out: Annotations = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != HEADER:
            raise ValueError(f"{str(path)!r} line 1: expected the header "
                             f"'{','.join(HEADER)}' of ImageNet's box files, got {header!r}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue  # a blank line (the files end with one)
            image, boxes = _parse_row(row, f"{str(path)!r} line {line}")
            if image in out:
                raise ValueError(f"{str(path)!r} line {line}: image {image!r} is listed twice")
            out[image] = boxes
    return out


def _text(node: ET.Element, tag: str, where: str) -> str:
    found = node.find(tag)
    if found is None or found.text is None or not found.text.strip():
        raise ValueError(f"{where}: missing <{tag}>")
    return found.text.strip()


def read_box_xml(path: str | os.PathLike) -> tuple[str, tuple[int, int] | None, list[LabelledBox]]:
    """One ILSVRC/VOC annotation file -> (image id, (width, height) or None, boxes)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{str(path)!r} line {e.position[0]}: not well-formed XML ({e})") from None
    name = root.findtext("filename")
    image = Path(name.strip()).stem if name and name.strip() else path.stem
    size = None
    if root.find("size") is not None:
        w, h = (_text(root.find("size"), t, f"{str(path)!r} <size>") for t in ("width", "height"))
        size = (int(float(w)), int(float(h))) if float(w) > 0 and float(h) > 0 else None
    boxes = []
    for i, obj in enumerate(root.iter("object"), start=1):
        where = f"{str(path)!r} object {i}"
        bnd = obj.find("bndbox")
        if bnd is None:
            raise ValueError(f"{where}: missing <bndbox>")
        coords = [_text(bnd, t, where) for t in ("xmin", "ymin", "xmax", "ymax")]
        boxes.append(LabelledBox(_text(obj, "name", where), _checked_box(coords, where)))
    return image, size, boxes


def read_box_xml_folder(folder: str | os.PathLike
                        ) -> tuple[Annotations, dict[str, tuple[int, int]]]:
    """Every *.xml under ``folder`` -> ({image id: boxes}, {image id: (width, height)})."""
    out: Annotations = {}
    sizes: dict[str, tuple[int, int]] = {}
    for path in sorted(Path(folder).rglob("*.xml")):
        image, size, boxes = read_box_xml(path)
        if image in out:
            raise ValueError(f"{str(path)!r}: image {image!r} is annotated twice in "
                             f"{str(folder)!r}")
        out[image] = boxes
        if size:
            sizes[image] = size
    return out, sizes


def read_boxes(path: str | os.PathLike) -> tuple[Annotations, dict[str, tuple[int, int]]]:
    """A LOC_*_solution.csv or a folder of XML files -> (annotations, image sizes where the
    files give them)."""
    path = Path(path)
    if path.is_dir():
        return read_box_xml_folder(path)
    if path.is_file():
        return read_box_csv(path), {}
    raise FileNotFoundError(f"box file or folder {str(path)!r} does not exist; give a "
                            "LOC_*_solution.csv or a folder of ILSVRC bounding-box XML files")


# --- pairing a dataset's images with their boxes -------------------------------------------
@dataclass(frozen=True)
class BoxedSample:
    """An image with its class index and ground-truth boxes: ``boxes`` (k, 4) float32 xyxy in
    pixels of the stored image, clipped to it; ``box_labels`` the class of each box; ``size``
    the image's (width, height) where known (a training crop's box is then placed before
    the image is decoded)."""

    path: str
    label: int
    boxes: torch.Tensor
    box_labels: tuple[str, ...]
    size: tuple[int, int] | None = None

    def boxes_of(self, label: str) -> torch.Tensor:
        """The (j, 4) boxes framing class ``label`` (a wnid or class folder name)."""
        rows = [i for i, b in enumerate(self.box_labels) if b == label]
        return self.boxes[rows]


@dataclass
class BoxReport:
    """What ``attach_boxes`` did: images asked for, those left out with why, boxes changed."""

    images: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    clipped: int = 0  # boxes partly outside their image, clipped to it
    dropped: int = 0  # boxes with nothing inside their image, left out

    @property
    def boxed(self) -> int:
        return self.images - len(self.skipped)

    def summary(self) -> str:
        text = f"{self.boxed} of {self.images} image(s) have boxes"
        if self.skipped:
            path, why = self.skipped[0]
            text += f"; {len(self.skipped)} skipped, e.g. {path!r} ({why})"
        if self.clipped:
            text += f"; {self.clipped} box(es) clipped to their image"
        if self.dropped:
            text += f"; {self.dropped} box(es) with nothing inside their image left out"
        return text


def _image_size(path: str) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except OSError:
        return None


def attach_boxes(samples: Sequence[tuple[str, int]],
                 annotations: Mapping[str, Sequence[LabelledBox]],
                 sizes: Mapping[str, tuple[int, int]] | None = None,
                 ) -> tuple[list[BoxedSample], BoxReport]:
    """Pair (path, class index) samples with their boxes (looked up by the file name without
    extension). Boxes are clipped to the image, whose size comes from ``sizes`` (the XML
    files give it) or else from the file's header. Images without a box, and images whose
    boxes all fall outside them, are skipped; the report says which and counts the boxes
    clipped or left out."""
    out, report = [], BoxReport(images=len(samples))
    for path, label in samples:
        key = Path(path).stem
        given = annotations.get(key)
        if not given:
            report.skipped.append((path, "no box in the box file"))
            continue
        size = (sizes or {}).get(key) or _image_size(path)
        if size is None:
            report.skipped.append((path, "unreadable image"))
            continue
        boxes, changed = clip(torch.tensor([b.box for b in given], dtype=torch.float32), *size)
        keep = area(boxes) > 0
        report.clipped += int((changed & keep).sum())
        report.dropped += int((~keep).sum())
        if not keep.any():
            report.skipped.append((path, "every box lies outside the image"))
            continue
        names = tuple(b.label for b, k in zip(given, keep.tolist(), strict=True) if k)
        out.append(BoxedSample(path, label, boxes[keep], names, tuple(size)))
    return out, report
