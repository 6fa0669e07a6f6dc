"""The paper's transfer recipe for small datasets (Appendix B): a linear classifier on the
L2-normalised dense FC7 descriptors of a fixed, pretrained net.

The paper trains a linear SVM; this trains its close cousin, multinomial logistic regression
with an L2 penalty, full batch with L-BFGS (deterministic, no learning rate to tune).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .data import open_dataset
from .features import extract_files
from .runtime import Runtime, make_runtime
from .settings import ProbeSettings
from .weights import LoadedModel, load_model


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
              weight_decay: float = 1e-3, runtime: Runtime | None = None,
              progress: bool = False) -> ProbeResult:
    """Train on data/train/<class>/*, report accuracy on data/val/<class>/* (the dataset
    layouts and checks of ``data.open_dataset``)."""
    dataset = open_dataset(data)
    rt = runtime or make_runtime()
    x = {split.name: extract_files(loaded, split.paths, scales=scales, runtime=rt,
                                   progress=progress, desc=f"{split.name} descriptors")["features"]
         for split in (dataset.train, dataset.val)}
    y = {split.name: torch.tensor([c for _, c in split.samples])
         for split in (dataset.train, dataset.val)}
    classes = dataset.class_names
    clf, mean, std = fit_linear_probe(x["train"], y["train"], len(classes),
                                      weight_decay=weight_decay)
    return ProbeResult(classes, _accuracy(clf, mean, std, x["train"], y["train"]),
                       _accuracy(clf, mean, std, x["val"], y["val"]), len(y["train"]),
                       len(y["val"]), clf, mean, std)


def probe_command(s: ProbeSettings) -> int:
    """``vggnet probe``: fit and print the train and val accuracy."""
    loaded = load_model(s.weights)
    r = run_probe(loaded, s.data, scales=s.scales, weight_decay=s.weight_decay,
                  runtime=make_runtime(s.device, s.precision), progress=s.progress)
    print(f"linear probe on {s.data}: {len(r.classes)} classes, {r.n_train} train / {r.n_val} "
          "val images")
    print(f"  train accuracy {r.train_accuracy:.2%}, val accuracy {r.val_accuracy:.2%}")
    return 0
