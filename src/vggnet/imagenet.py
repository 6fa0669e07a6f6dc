"""The 1000 ILSVRC-2012 classes (the order every public VGG release uses), shipped as package
data."""

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


def imagenet_wnids() -> list[str]:
    """WordNet ids by index: the ``class_names`` of imported ImageNet weights. They are unique
    (readable names are not: two "crane"s, two "maillot"s) and they are ImageNet's training
    folder names, so imported weights, nets trained on ImageNet folders and the evaluation
    of either agree on what each output is."""
    return [c.wnid for c in imagenet_classes()]


def describe(label: str) -> str:
    """A class name for people: "n01440764" -> "tench (n01440764)"; other names unchanged."""
    c = _by_wnid().get(label)
    return f"{c.name} ({c.wnid})" if c else label


def readable_name(label: str) -> str:
    """The name alone: "n01440764" -> "tench"; other names unchanged."""
    c = _by_wnid().get(label)
    return c.name if c else label


@cache
def _by_wnid() -> dict[str, ImageNetClass]:
    return {c.wnid: c for c in imagenet_classes()}
