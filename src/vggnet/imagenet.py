"""The 1000 ILSVRC-2012 classes (the order every public VGG release uses), shipped as package data."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

NUM_CLASSES = 1000


@dataclass(frozen=True)
class ImageNetClass:
    index: int
    wnid: str  # WordNet id, e.g. "n01440764"
    name: str  # short readable name, e.g. "tench"


@cache
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """All 1000 classes in index order (sorted WordNet ids: 0 = n01440764 tench)."""
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text("utf-8")
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            index, wnid, name = line.split("\t")
            out.append(ImageNetClass(int(index), wnid, name))
    if [c.index for c in out] != list(range(NUM_CLASSES)):
        raise RuntimeError("the packaged imagenet_classes.txt is damaged; reinstall vggnet")
    return tuple(out)


def imagenet_class_names() -> list[str]:
    """Readable names by index, the ``class_names`` stored with imported ImageNet weights."""
    return [c.name for c in imagenet_classes()]
