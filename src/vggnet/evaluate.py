"""The paper's test protocol (Section 3.2): dense, multi-crop, multi-scale, flips, ensembles.

Every image is rescaled isotropically so that its smaller side is Q (each test scale), then
  - center: one centre crop of the training crop size;
  - dense: the fully convolutional net on the whole rescaled image; the class score map is
    spatially averaged, then soft-max;
  - multicrop: a regular grid x grid set of crops (5x5 in the paper), soft-max per crop;
and the soft-max posteriors are averaged over crops, horizontal flips and scales. Methods
(dense+multicrop) and nets (ensembles) are combined by averaging their posteriors too.

Images of any size are decoded in worker processes, rescaled to every test scale once, and
grouped by their rescaled size so that a batch is one tensor; batches are normalised on the
device with each model's own ``Preprocessing``.

Top-k rule (ties): an image counts as correct at k when fewer than k *other* classes score
at least as high as the true class, i.e. a tie with the true class counts against it. A net
that outputs the same score for every class is therefore always wrong (unless k >= classes).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import check_output_folder
from .image import BadImageError, load_rgb_reduced, shorter_side_size
from .progress import progress_bar
from .protocol import default_test_scales
from .runtime import Runtime, make_runtime
from .settings import EvalSettings, EvaluateCommand
from .transforms import crop_resized
from .weights import LoadedModel, load_model, require_classifier


def crop_grid(height: int, width: int, crop: int, n: int) -> list[tuple[int, int]]:
    """(top, left) of an n x n regular grid of crop x crop windows inside a height x width image.

    The outer windows touch the image borders (corners included); for odd n the middle one is
    the centre crop ((H-crop)//2, (W-crop)//2); n = 1 is the centre crop alone.
    """
    if height < crop or width < crop:
        raise ValueError(f"a {crop}x{crop} crop does not fit in a {height}x{width} image; "
                         f"use test scales >= the crop size {crop}")

    def steps(size: int) -> list[int]:
        if n == 1:
            return [(size - crop) // 2]
        return [i * (size - crop) // (n - 1) for i in range(n)]

    return [(t, left) for t in steps(height) for left in steps(width)]


def topk_correct(posteriors: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C) scores, (N,) labels -> (N,) bool: fewer than k other classes score >= the true one."""
    true = posteriors.gather(1, labels.view(-1, 1))
    at_least = (posteriors >= true).sum(1) - 1  # other classes tied with or above the true class
    return at_least < k


# --- the input pipeline ---------------------------------------------------------------------
class RescaledImages(torch.utils.data.Dataset):
    """Item i: (i, [HWC uint8 array per scale]) or (i, reason) for a file that cannot be read.

    Decodes once (a JPEG at reduced size where that still only shrinks it to the largest
    scale) and rescales to every scale exactly as training does (``transforms.crop_resized``).
    """

    def __init__(self, paths: Sequence[str], scales: Sequence[int]) -> None:
        self.paths, self.scales = list(paths), sorted(set(scales))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            decoded = load_rgb_reduced(self.paths[i], self.scales[-1])
        except BadImageError as e:
            return i, e.reason
        out = []
        for q in self.scales:
            w, h = shorter_side_size(decoded.full_size, q)
            out.append(crop_resized(decoded, q, (0, 0, w, h)))
        return i, out


class SizeBuckets:
    """Groups (index, HWC uint8) images by size into batches; memory stays bounded.

    A bucket is emitted when it holds ``batch_size`` images or ``budget`` pixels (so a batch
    of panoramas is smaller); when all pending images exceed 4 budgets, the biggest bucket
    goes early. Emission depends only on the order and sizes of the images, never on timing,
    so results do not depend on the number of workers.
    """

    def __init__(self, batch_size: int, budget: int) -> None:
        self.batch_size, self.budget = batch_size, budget
        self.buckets: dict[tuple[int, int], list] = {}
        self.pending = 0

    def add(self, index: int, image) -> list[list]:
        """Queue a (H, W, 3) image; returns the batches that are ready (lists of (index, image))."""
        key = tuple(image.shape[:2])
        bucket = self.buckets.setdefault(key, [])
        bucket.append((index, image))
        self.pending += key[0] * key[1]
        out = []
        if len(bucket) >= self.batch_size or len(bucket) * key[0] * key[1] >= self.budget:
            out.append(self._pop(key))
        while self.pending > 4 * self.budget:
            biggest = max(self.buckets, key=lambda k: len(self.buckets[k]) * k[0] * k[1])
            out.append(self._pop(biggest))
        return out

    def drain(self) -> list[list]:
        return [self._pop(k) for k in list(self.buckets)]

    def _pop(self, key) -> list:
        bucket = self.buckets.pop(key)
        self.pending -= len(bucket) * key[0] * key[1]
        return bucket


def _identity(x):
    return x


def default_decode_workers(device: torch.device) -> int:
    """Decoding processes: on a GPU, up to 8 (the GPU waits on decoding otherwise); on the CPU
    none, since the model's threads already use every core and extra busy processes make
    them wait on each other (measured: 5x slower with one worker on 2 cores)."""
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


@dataclass
class Posteriors:
    """Posteriors (N_kept, C) per (model index, pass); rows follow ``kept`` (sample indices)."""

    posteriors: dict[tuple[int, str], torch.Tensor]
    kept: list[int]
    skipped: list[tuple[str, str]]  # (path, reason)
    seconds: float


class PosteriorSums:
    """Running sums of soft-max posteriors per (model index, pass) and image, and how many
    views (flips, crops) each sum holds, so that their ratio is the mean posterior."""

    def __init__(self, models: Sequence[LoadedModel], nets: Sequence,
                 scales: Sequence[Sequence[int]], passes: Sequence[str], n: int, rt: Runtime,
                 flip: bool, grid: int,
                 budget: int) -> None:
        self.models, self.nets, self.scales, self.passes = models, nets, scales, passes
        self.rt, self.flip, self.grid, self.budget = rt, flip, grid, budget
        classes = models[0].model.config.num_classes
        self.acc = {(mi, p): torch.zeros(n, classes, device=rt.device)
                    for mi in range(len(models)) for p in passes}
        self.count = {key: torch.zeros(n, device=rt.device) for key in self.acc}

    def add(self, batch: list) -> None:
        """One batch of (image index, (H, W, 3) uint8) at one scale, through every model that
        is evaluated at that scale."""
        rt = self.rt
        idx = torch.tensor([i for i, _ in batch], device=rt.device)
        # (n, H, W, 3) stacked -> (n, 3, H, W), which is already channels_last in memory
        x = torch.from_numpy(np.stack([im for _, im in batch])).permute(0, 3, 1, 2)
        x = rt.input(x if rt.channels_last else x.contiguous())
        q = min(x.shape[-2:])
        for mi, (m, net) in enumerate(zip(self.models, self.nets, strict=True)):
            if q not in self.scales[mi]:
                continue
            for p in self.passes:
                probs, units = _posteriors(net, m, x, p, self.flip, self.grid, self.budget, rt)
                self.acc[(mi, p)].index_add_(0, idx, probs)
                self.count[(mi, p)].index_add_(0, idx, torch.full_like(idx, units,
                                                                       dtype=torch.float32))

    def means(self, kept: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
        """Mean posteriors (len(kept), C) on the CPU, rows in the order of ``kept``."""
        rows = kept.to(self.rt.device)
        return {key: (self.acc[key][rows] / self.count[key][rows].unsqueeze(1)).cpu()
                for key in self.acc}


def compute_posteriors(models: Sequence[LoadedModel], paths: Sequence[str],
                       scales: Sequence[Sequence[int]], passes: Sequence[str], *,
                       flip: bool = True, grid: int = 5, batch_size: int = 16,
                       workers: int | None = None, runtime: Runtime | None = None,
                       progress: bool = False) -> Posteriors:
    """Run every model over every image at its scales (``scales[m]``) for each pass.

    Images are decoded once for all models; unreadable ones are skipped and listed.
    ``batch_size``: crop-sized inputs per forward pass (see ``EvalSettings``).
    """
    rt = runtime or make_runtime()
    workers = default_decode_workers(rt.device) if workers is None else workers
    nets = [rt.prepare_inference(m.model) for m in models]
    for m, qs in zip(models, scales, strict=True):
        crop = m.model.config.crop_size
        if min(qs) < crop:
            raise ValueError(f"test scale {min(qs)} is smaller than the crop size {crop} of a "
                             f"{m.model.config.name} net; use scales >= {crop}")
    # pixels per batch and per forward pass: batch_size crops' worth (a Q=512 view of a 4:3
    # image counts as 7 crops of 224); at least one view per pass whatever its size
    budget = batch_size * max(m.model.config.crop_size for m in models) ** 2
    sums = PosteriorSums(models, nets, scales, passes, len(paths), rt, flip, grid, budget)
    buckets = SizeBuckets(batch_size, budget)
    loader = torch.utils.data.DataLoader(
        RescaledImages(paths, sorted({q for qs in scales for q in qs})), batch_size=None,
        shuffle=False, num_workers=workers, collate_fn=_identity)
    skipped, seen = [], torch.zeros(len(paths), dtype=torch.bool)
    start = time.perf_counter()
    with torch.inference_mode(), progress_bar(len(paths), "evaluating", enabled=progress) as bar:
        for i, item in loader:
            bar.update(1)
            if isinstance(item, str):
                skipped.append((str(paths[i]), item))
                continue
            seen[i] = True
            for im in item:
                for batch in buckets.add(i, im):
                    sums.add(batch)
        for batch in buckets.drain():
            sums.add(batch)
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
    seconds = time.perf_counter() - start
    kept = seen.nonzero().flatten()
    return Posteriors(sums.means(kept), kept.tolist(), skipped, seconds)


def _posteriors(net, m: LoadedModel, x: torch.Tensor, method: str, flip: bool, grid: int,
                budget: int, rt: Runtime) -> tuple[torch.Tensor, int]:
    """uint8 (n, 3, H, W) on the device -> (summed posteriors (n, C), units summed per image).

    Each forward pass takes at most ``budget`` input pixels (at least one view).
    """
    prep, n = m.preprocessing, x.shape[0]
    if method == "dense":
        views = torch.cat([x, x.flip(-1)]) if flip else x
        parts = []
        for chunk in views.split(max(1, budget // (x.shape[-2] * x.shape[-1]))):
            with rt.autocast():
                scores = net.forward_dense(prep.normalize(chunk))  # (b, C, h, w)
            parts.append(scores.float().mean((2, 3)).softmax(1))
        probs = torch.cat(parts).view(-1, n, parts[0].shape[1])  # (flips, n, C)
        return probs.sum(0), probs.shape[0]
    crop = m.model.config.crop_size
    cells = crop_grid(x.shape[-2], x.shape[-1], crop, 1 if method == "center" else grid)
    # (n, P, 3, crop, crop) -> (n*P, ...): every image's crops, image-major
    crops = torch.stack([x[:, :, t:t + crop, left:left + crop] for t, left in cells], 1)
    crops = crops.flatten(0, 1)
    parts = []
    for chunk in crops.split(max(1, budget // (crop * crop * (2 if flip else 1)))):
        views = torch.cat([chunk, chunk.flip(-1)]) if flip else chunk
        with rt.autocast():
            logits = net(prep.normalize(views))
        probs = logits.float().softmax(1)
        parts.append(probs.view(2 if flip else 1, -1, probs.shape[1]).sum(0))
    probs = torch.cat(parts).view(n, len(cells), -1)  # (n, P, C)
    return probs.sum(1), len(cells) * (2 if flip else 1)


# --- checks of what is evaluated against what -----------------------------------------------
def _differences(a: Sequence[str], b: Sequence[str]) -> str:
    only_a = [c for c in a if c not in set(b)]
    only_b = [c for c in b if c not in set(a)]

    def few(xs):
        return f"{xs[:5]}{' ...' if len(xs) > 5 else ''} ({len(xs)})"

    if not only_a and not only_b:
        first = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        return (f"same names in a different order (first at position {first}: {a[first]!r} vs "
                f"{b[first]!r})")
    return "; ".join(s for s in (f"only in the first: {few(only_a)}" if only_a else "",
                                 f"only in the second: {few(only_b)}" if only_b else "") if s)


def check_ensemble(models: Sequence[LoadedModel], names: Sequence[str]) -> list[str] | None:
    """The class names the members share (None if none has names); errors name what differs."""
    first = models[0].model.config
    if first.in_channels != 3:
        raise ValueError(f"{names[0]} takes {first.in_channels}-channel input; evaluation feeds "
                         "RGB images")
    for m, name in zip(models[1:], names[1:], strict=True):
        c = m.model.config
        if c.num_classes != first.num_classes:
            raise ValueError(f"ensemble members disagree on the number of classes: {names[0]} has "
                             f"{first.num_classes}, {name} has {c.num_classes}")
        if c.in_channels != 3:
            raise ValueError(f"{name} takes {c.in_channels}-channel input; evaluation feeds RGB "
                             "images")
    named = [(m.class_names, n) for m, n in zip(models, names, strict=True)
             if m.class_names is not None]
    for cls, name in named[1:]:
        if list(cls) != list(named[0][0]):
            raise ValueError(f"ensemble members have different class names: first = {named[0][1]}, "
                             f"second = {name}: {_differences(named[0][0], cls)}")
    return list(named[0][0]) if named else None


def align_classes(model_classes: Sequence[str] | None, num_classes: int,
                  data_classes: Sequence[str], source: str) -> list[int]:
    """Map dataset label -> model output index. The dataset may hold a subset of the model's
    classes (an ImageNet subset, say): it is scored over all of them. A class the model does
    not know is an error naming it."""
    if model_classes is None:
        if len(data_classes) != num_classes:
            raise ValueError(f"{source} has {num_classes} outputs and no class names, but the "
                             f"dataset has {len(data_classes)} classes")
        return list(range(num_classes))
    where = {c: i for i, c in enumerate(model_classes)}
    unknown = [c for c in data_classes if c not in where]
    if unknown:
        few = f"{unknown[:10]}" + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise ValueError(f"the dataset's class(es) {few} are not among the "
                         f"{len(model_classes)} classes of {source}; evaluate on classes the "
                         "model knows (all of them, or a subset)")
    return [where[c] for c in data_classes]


def subset_note(class_names: Sequence[str], subset: Sequence[int] | None) -> str:
    """One line saying that the dataset holds only some of the model's classes, and which."""
    if subset is None:
        return ""
    from .imagenet import describe

    shown = ", ".join(describe(class_names[i]) for i in subset[:10])
    more = f", ... ({len(subset) - 10} more in results.json)" if len(subset) > 10 else ""
    return (f"the dataset has {len(subset)} of the model's {len(class_names)} classes: scored "
            f"over all {len(class_names)} (any other class predicted is wrong); per-class "
            f"results and the confusion matrix for these: {shown}{more}")


# --- metrics --------------------------------------------------------------------------------
def _percent(count: int | torch.Tensor, n: int) -> float:
    """100 * count / n from the exact count (23.1, not 23.100000619888306)."""
    return 100.0 * int(count) / n


def scores(posteriors: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
           subset: Sequence[int] | None = None) -> dict:
    """Top-1/top-5 error (%) over all C classes, per-class accuracy and the confusion matrix
    (rows: true class, columns: predicted) for the classes ``subset`` (model indices; default
    all), with one more column, "another class", when it is a true subset."""
    n, c = posteriors.shape
    top1, top5 = topk_correct(posteriors, labels, 1), topk_correct(posteriors, labels, 5)
    pred = posteriors.argmax(1)  # the confusion matrix: the lowest-index class of tied maxima
    rows = list(range(c)) if subset is None else list(subset)
    k = len(rows)
    column = torch.full((c,), k, dtype=torch.long)  # predictions outside the subset: column k
    column[torch.tensor(rows, dtype=torch.long)] = torch.arange(k)
    confusion = torch.bincount(column[labels] * (k + 1) + column[pred],
                               minlength=k * (k + 1)).view(k, k + 1)
    if subset is None:
        confusion = confusion[:, :k]
    per_class = []
    for i in rows:
        mask = labels == i
        m = int(mask.sum())
        per_class.append({"class": class_names[i], "images": m,
                          "top1_acc": _percent(top1[mask].sum(), m) if m else None,
                          "top5_acc": _percent(top5[mask].sum(), m) if m else None})
    return {"images": n, "top1_err": _percent(n - top1.sum(), n) if n else math.nan,
            "top5_err": _percent(n - top5.sum(), n) if n else math.nan,
            "per_class": per_class, "confusion": confusion.tolist()}


@dataclass
class EvalReport:
    checkpoints: list[str]
    method: str
    scales: list[list[int]]  # per checkpoint
    flip: bool
    grid: int
    class_names: list[str]
    metrics: dict  # scores() of the final posteriors
    parts: dict = field(default_factory=dict)  # "member i / pass" -> {top1_err, top5_err}
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    posteriors: Posteriors | None = None  # behind the metrics (not written out)
    labels: torch.Tensor | None = None  # (N_kept,) true classes in the models' class order
    subset: list[int] | None = None  # the dataset's classes (model indices) if only some

    @property
    def images_per_s(self) -> float:
        return self.metrics["images"] / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict:
        m = {k: v for k, v in self.metrics.items() if k != "confusion"}
        return {"checkpoints": self.checkpoints, "method": self.method, "scales": self.scales,
                "flip": self.flip, "grid": self.grid, "device": self.device, **m,
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
                "seconds": self.seconds, "images_per_s": self.images_per_s, "parts": self.parts,
                "class_names": self.class_names, "confusion": self.metrics["confusion"],
                **({"evaluated_classes": [self.class_names[i] for i in self.subset]}
                   if self.subset is not None else {})}

    def confusion_labels(self) -> list[str]:
        """The confusion matrix's rows (and columns): "index name", in class-index order;
        with a subset of the classes, a last column "another class"."""
        from .imagenet import describe

        rows = range(len(self.class_names)) if self.subset is None else self.subset
        labels = [f"{i} {describe(self.class_names[i])}" for i in rows]
        return labels + (["another class"] if self.subset is not None else [])


def combine(posteriors: Posteriors, members: Sequence[int], passes: Sequence[str]) -> torch.Tensor:
    """The final posteriors: the mean over passes (dense+multicrop) and over ensemble members."""
    return torch.stack([posteriors.posteriors[(m, p)] for m in members for p in passes]).mean(0)


def evaluate(checkpoints: Sequence[str | os.PathLike], samples: Sequence[tuple[str, int]],
             class_names: Sequence[str], settings: EvalSettings | None = None, *,
             device: str = "auto", precision: str = "auto",
             models: Sequence[LoadedModel] | None = None, progress: bool = False,
             say: Callable[[str], None] | None = None) -> EvalReport:
    """Evaluate one checkpoint, or an ensemble of several, on (path, label) samples, with the
    protocol of ``settings`` (default: dense at the scale each was trained for, flips).
    ``say`` gets a line before the work when the dataset holds only some of the classes."""
    settings = settings or EvalSettings()
    names = [str(c) for c in checkpoints]
    if not names:
        raise ValueError("no checkpoint given; pass at least one checkpoint or weights file")
    rt = make_runtime(device, precision)
    models = (list(models) if models is not None
              else [require_classifier(load_model(c), c) for c in checkpoints])
    shared = check_ensemble(models, names)
    mapping = align_classes(shared, models[0].model.config.num_classes, class_names, names[0])
    out_names = shared or list(class_names)
    subset = sorted(mapping) if len(mapping) < len(out_names) else None
    if subset is not None and say is not None:
        say(subset_note(out_names, subset))
    if settings.scales is not None:
        scales = [tuple(settings.scales)] * len(models)
    else:
        scales = [default_test_scales(m.meta.get("train_settings"), m.model.config.crop_size,
                                      settings.multi_scale) for m in models]
    post = compute_posteriors(models, [p for p, _ in samples], scales, settings.passes,
                              flip=settings.flip, grid=settings.grid,
                              batch_size=settings.batch_size, workers=settings.workers,
                              runtime=rt, progress=progress)
    labels = torch.tensor([mapping[samples[i][1]] for i in post.kept], dtype=torch.long)
    members = range(len(models))
    final = (combine(post, members, settings.passes) if post.kept
             else torch.zeros(0, len(out_names)))
    parts = {}
    if post.kept and (len(models) > 1 or len(settings.passes) > 1):
        for mi in members:
            for p in settings.passes:
                s = scores(post.posteriors[(mi, p)], labels, out_names, subset)
                parts[f"{names[mi]} / {p}"] = {k: s[k] for k in ("top1_err", "top5_err", "images")}
    return EvalReport(names, settings.method, [list(q) for q in scales], settings.flip,
                      settings.grid, out_names, scores(final, labels, out_names, subset), parts,
                      post.skipped, post.seconds, str(rt.device), post, labels, subset)


def evaluate_command(c: EvaluateCommand) -> int:
    """``vggnet evaluate``: evaluate, print the report, write its files (--out checked
    first, so that a file or a read-only folder there costs no evaluation)."""
    out = check_output_folder(c.out or default_out(c.checkpoints[0], c.protocol.method),
                              "evaluation")
    samples, classes = list_eval_data(c.data, c.split, c.val_labels)
    report = evaluate(c.checkpoints, samples, classes, c.protocol, device=c.device,
                      precision=c.precision, progress=c.progress, say=print)
    print(format_report(report))
    files = write_report(report, out)
    print(f"wrote {files['json']}, {files['csv']}, {files['png']}")
    return 0


def default_out(checkpoint: str, method: str) -> Path:
    """A new folder per evaluation: evaluation/<run or file>-<method>-<date>."""
    from .runlog import dated_folder

    p = Path(checkpoint)
    name = p.parent.name if p.stem in ("best", "last") and p.parent.name else p.stem
    return dated_folder(Path("evaluation"), f"{name}-{method}")


def list_eval_data(root: str | os.PathLike, split: str = "val",
                   val_labels=None) -> tuple[list, list[str]]:
    """(samples, class names) to evaluate on: ``split`` of a dataset with train/ and val/ (any
    layout ``data.open_dataset`` reads), or ``root`` itself as one folder per class."""
    from .data import list_class_folders, open_dataset

    root = Path(root)
    if (root / "train").is_dir() or (root / "ILSVRC").is_dir():
        d = open_dataset(root, val_labels)
        s = d.val if split == "val" else d.train
    else:
        s = list_class_folders(root, "data")
    return s.samples, s.class_names


# --- output ---------------------------------------------------------------------------------
def format_report(report: EvalReport, max_classes: int = 30) -> str:
    r, m = report, report.metrics
    lines = [f"checkpoints: {', '.join(r.checkpoints)}" + (f"  (ensemble of {len(r.checkpoints)})"
                                                           if len(r.checkpoints) > 1 else ""),
             f"method: {r.method}"
             + (f" ({r.grid}x{r.grid} grid)" if "multicrop" in r.method else "")
             + f"   scales: {' | '.join(','.join(map(str, q)) for q in r.scales)}"
             f"   flips: {'averaged' if r.flip else 'off'}   device: {r.device}",
             f"images: {m['images']}"
             + (f" ({len(r.skipped)} unreadable, skipped)" if r.skipped else "")
             + f"   {r.images_per_s:.1f} images/s",
             f"top-1 error: {m['top1_err']:.2f}%   top-5 error: {m['top5_err']:.2f}%"]
    if r.subset is not None:
        lines.insert(2, subset_note(r.class_names, r.subset))
    for name, e in r.parts.items():
        lines.append(f"  {name}: top-1 {e['top1_err']:.2f}%  top-5 {e['top5_err']:.2f}%")
    rows = m["per_class"]
    if len(rows) > max_classes:
        rows = sorted((x for x in rows if x["images"]), key=lambda x: x["top1_acc"])[:10]
        lines.append(f"the 10 classes with the lowest top-1 accuracy (all "
                     f"{len(m['per_class'])} in the CSV):")
    width = max([5] + [len(x["class"]) for x in rows])
    lines.append(f"{'class':<{width}}  {'images':>6}  {'top-1 acc':>9}  {'top-5 acc':>9}")
    for x in rows:
        acc = (f"{x['top1_acc']:>8.1f}%  {x['top5_acc']:>8.1f}%" if x["images"]
               else f"{'-':>9}  {'-':>9}")
        lines.append(f"{x['class']:<{width}}  {x['images']:>6}  {acc}")
    for path, reason in r.skipped[:10]:
        lines.append(f"skipped {path}: {reason}")
    if len(r.skipped) > 10:
        lines.append(f"... and {len(r.skipped) - 10} more unreadable files (all listed in the "
                     "JSON)")
    return "\n".join(lines)


def write_report(report: EvalReport, out_dir: str | os.PathLike) -> dict[str, str]:
    """results.json, per_class.csv and confusion.png in ``out_dir``; returns their paths."""
    import csv
    import json

    from .runlog import round_floats

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "per_class.csv",
             "png": out / "confusion.png"}
    paths["json"].write_text(json.dumps(round_floats(report.to_dict()), indent=1) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "images", "top1_acc", "top5_acc"])
        for x in report.metrics["per_class"]:
            w.writerow([x["class"], x["images"], _fmt(x["top1_acc"]), _fmt(x["top5_acc"])])
        m = report.metrics
        w.writerow(["(all)", m["images"], _fmt(100 - m["top1_err"]), _fmt(100 - m["top5_err"])])
    title = (f"{', '.join(_short(c) for c in report.checkpoints)}\n{report.method}, top-1 error "
             f"{report.metrics['top1_err']:.2f}%")
    plot_confusion(report.metrics["confusion"], report.confusion_labels(), paths["png"], title)
    return {k: str(v) for k, v in paths.items()}


def _short(checkpoint: str) -> str:
    """A checkpoint as its run folder and file name: "runs/A-.../best.pt" -> "A-.../best.pt"."""
    p = Path(checkpoint)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def plot_confusion(confusion: list[list[int]], labels: Sequence[str], path,
                   title: str = "") -> None:
    """``confusion_figure`` as a PNG."""
    import matplotlib.pyplot as plt

    fig = confusion_figure(confusion, labels, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_figure(confusion: list[list[int]], labels: Sequence[str], title: str = ""):
    """The confusion matrix: true class down (``labels`` in their order: class index),
    predicted across, coloured by the fraction of the true class, each cell's image count
    written in it (up to 30 classes). A last column without a row is "another class"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    r, c = cm.shape
    size = min(16.0, 4.0 + 0.45 * c)
    fig, ax = plt.subplots(figsize=(size, size * r / c + 0.5))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if c <= 40:
        ax.set_xticks(range(c), labels[:c], rotation=90)
        ax.set_yticks(range(r), labels[:r])
    if c <= 30:
        for (i, j), n in np.ndenumerate(cm):
            if n:
                ax.text(j, i, f"{int(n)}", ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    return fig
