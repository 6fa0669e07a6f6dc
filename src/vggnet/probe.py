"""The paper's transfer recipe for small datasets (Appendix B): a linear classifier on the
L2-normalised dense FC7 descriptors of a fixed, pretrained net.

The paper trains a linear SVM; this trains its close cousin, multinomial logistic regression
with an L2 penalty, full batch with L-BFGS (deterministic, no learning rate to tune).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .features import extract_files, list_images
from .runtime import Runtime, make_runtime
from .weights import LoadedModel


def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """root/<class>/<images> -> (paths, labels, classes sorted by name)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{str(root)!r} has no class folders; expected {root}/<class>/<image files>")
    paths, labels = [], []
    for i, c in enumerate(classes):
        found = list_images([root / c])
        paths += found
        labels += [i] * len(found)
    return paths, labels, classes


@dataclass
class ProbeResult:
    classes: list[str]
    train_accuracy: float
    val_accuracy: float
    n_train: int
    n_val: int
    classifier: nn.Linear  # acts on standardised descriptors (see fit_linear_probe)
    mean: torch.Tensor
    std: torch.Tensor


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-3,
                     max_iter: int = 200) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """Logistic regression on standardised features x (N, D): returns (linear, mean, std)."""
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    clf = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(clf(z), y) + weight_decay * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf, mean, std


def _accuracy(clf: nn.Linear, mean, std, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((clf((x - mean) / std).argmax(1) == y).float().mean())


def run_probe(loaded: LoadedModel, data: str | os.PathLike, scales: Sequence[int] | None = None,
              weight_decay: float = 1e-3, runtime: Runtime | None = None) -> ProbeResult:
    """Train on data/train/<class>/*, report accuracy on data/val/<class>/* (same classes)."""
    data = Path(data)
    train_paths, train_y, classes = list_image_folder(data / "train")
    val_paths, val_y, val_classes = list_image_folder(data / "val")
    if val_classes != classes:
        raise ValueError(f"train and val class folders differ: {classes} vs {val_classes}")
    rt = runtime or make_runtime()
    xtr = extract_files(loaded, train_paths, scales=scales, runtime=rt)["features"]
    xva = extract_files(loaded, val_paths, scales=scales, runtime=rt)["features"]
    ytr, yva = torch.tensor(train_y), torch.tensor(val_y)
    clf, mean, std = fit_linear_probe(xtr, ytr, len(classes), weight_decay=weight_decay)
    return ProbeResult(classes, _accuracy(clf, mean, std, xtr, ytr), _accuracy(clf, mean, std, xva, yva),
                       len(train_paths), len(val_paths), clf, mean, std)
