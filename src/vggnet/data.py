"""Datasets on disk: image folders and the ImageNet layouts, the scan for bad files, loaders.

Layouts ``open_dataset`` understands (DIR is what ``--data`` names):
- DIR/train/<class>/... and DIR/val/<class>/...: one folder per class (any depth below it,
  any format Pillow reads). ImageNet's train/<wnid>/*.JPEG is this layout.
- DIR/val/ flat (ImageNet's ILSVRC2012_val_00000001.JPEG ...) with its labels in either
  LOC_val_solution.csv (Kaggle: "ImageId,PredictionString", the wnid first), or the devkit's
  ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per line, image 1 first) together
  with the devkit's meta.mat, which maps those IDs (the devkit's own order, not the sorted
  wnids) to wnids. They are looked for in DIR, DIR/val and DIR/ILSVRC2012_devkit_t12/data, or
  given with ``val_labels``.
- Kaggle's DIR/ILSVRC/Data/CLS-LOC/{train,val} with DIR/LOC_val_solution.csv.
- With ``val_split`` (``--val-split 0.1``): DIR/<class>/... alone (ImageFolder style), a
  fraction of each class held out for validation (``split_class_folders``).
Files whose names start with "." are ignored; every other file in a class folder is a sample
(a file Pillow cannot read is reported by the scan, not silently dropped).
"""

from __future__ import annotations

import atexit
import csv
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .image import BadImageError, load_rgb
from .progress import progress_bar
from .settings import CheckDataSettings, MakeDataSettings

GROUND_TRUTH_TXT = "ILSVRC2012_validation_ground_truth.txt"
LOC_CSV = "LOC_val_solution.csv"


@dataclass
class Split:
    """One split of a dataset: (path, class index) pairs over ``class_names``."""

    name: str
    root: Path
    samples: list[tuple[str, int]]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.samples]

    def counts(self) -> list[int]:
        """Images per class, in ``class_names`` order."""
        return np.bincount([c for _, c in self.samples], minlength=len(self.class_names)).tolist()

    def without(self, paths: set[str]) -> Split:
        return Split(self.name, self.root, [s for s in self.samples if s[0] not in paths],
                     self.class_names)


@dataclass
class Dataset:
    root: Path
    train: Split
    val: Split
    layout: str  # "class folders", "flat val + LOC_val_solution.csv", ...
    split: dict | None = None  # how val was carved out of one tree (split.split_record)

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names


def _files_under(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return out


def list_class_folders(folder: str | os.PathLike, name: str = "train") -> Split:
    """One subfolder per class; the class index is the position in the sorted folder names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{name} folder {str(folder)!r} does not exist")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{name} folder {str(folder)!r} has no class subfolders; expected one "
                         f"folder per class, e.g. {folder}/cat/0001.jpg, {folder}/dog/0001.jpg")
    samples, empty = [], []
    for i, c in enumerate(classes):
        files = _files_under(folder / c)
        if not files:
            empty.append(c)
        samples.extend((p, i) for p in files)
    if empty:
        raise ValueError(f"{len(empty)} empty class folder(s) in {name} folder {str(folder)!r}: "
                         f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}; put "
                         "images in them or remove them")
    return Split(name, folder, samples, classes)


def _is_flat(folder: Path) -> bool:
    """A folder of image files with no class subfolders (ImageNet's validation set)."""
    entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    return not any(e.is_dir() for e in entries) and any(e.is_file() for e in entries)


def read_loc_csv(path: str | os.PathLike) -> dict[str, str]:
    """LOC_val_solution.csv -> {image id (file stem): wnid}; the wnid of the first box."""
    labels = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise ValueError(f"{str(path)!r} does not start with the header "
                             f"'ImageId,PredictionString' of {LOC_CSV}; got {header!r}")
        for line, row in enumerate(reader, start=2):
            if len(row) < 2 or not row[1].split():
                raise ValueError(f"{str(path)!r} line {line}: expected 'ImageId,wnid x y x y ...', "
                                 f"got {row!r}")
            labels[row[0].strip()] = row[1].split()[0]
    return labels


def read_devkit_meta(path: str | os.PathLike) -> dict[int, str]:
    """The devkit's meta.mat -> {ILSVRC2012_ID: wnid} for the 1000 leaf classes."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ValueError(f"reading the devkit's {Path(path).name} needs scipy: "
                         "`pip install scipy` (or use LOC_val_solution.csv)") from None
    synsets = loadmat(str(path), squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets
            if int(s["num_children"]) == 0}


def read_ground_truth_txt(path: str | os.PathLike, meta: dict[int, str]) -> dict[str, str]:
    """ILSVRC2012_validation_ground_truth.txt (line i: the ILSVRC2012_ID of
    ILSVRC2012_val_{i:08d}) -> {image id: wnid}, through the devkit's ID -> wnid map."""
    labels = {}
    for i, line in enumerate(Path(path).read_text().split(), start=1):
        if not line.isdigit() or int(line) not in meta:
            raise ValueError(f"{str(path)!r} line {i}: {line!r} is not one of the devkit's "
                             f"{len(meta)} class IDs")
        labels[f"ILSVRC2012_val_{i:08d}"] = meta[int(line)]
    return labels


def _find_labels(root: Path, val_dir: Path) -> Path | None:
    for folder in (root, val_dir, root / "ILSVRC2012_devkit_t12" / "data", root.parent):
        for name in (LOC_CSV, GROUND_TRUTH_TXT):
            if (folder / name).is_file():
                return folder / name
    return None


def list_flat_val(val_dir: Path, labels_file: Path, class_names: list[str]) -> Split:
    """A flat validation folder labelled by LOC_val_solution.csv or the devkit's ground truth."""
    if labels_file.suffix == ".csv":
        labels = read_loc_csv(labels_file)
    else:
        meta_file = labels_file.parent / "meta.mat"
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{labels_file.name} lists class IDs in the devkit's order; their wnids are in "
                f"the devkit's meta.mat, expected at {str(meta_file)!r}")
        labels = read_ground_truth_txt(labels_file, read_devkit_meta(meta_file))
    index = {c: i for i, c in enumerate(class_names)}
    files = _files_under(val_dir)
    by_stem = {Path(p).stem: p for p in files}
    unlabelled = [p for p in files if Path(p).stem not in labels]
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} file(s) in {str(val_dir)!r} have no label in "
                         f"{str(labels_file)!r}, e.g. {unlabelled[0]!r}")
    missing = [k for k in labels if k not in by_stem]
    if missing:
        raise ValueError(f"{len(missing)} image(s) labelled in {str(labels_file)!r} are not in "
                         f"{str(val_dir)!r}, e.g. {missing[0]!r}")
    unknown = sorted({w for w in labels.values() if w not in index})
    if unknown:
        raise ValueError(f"validation labels name {len(unknown)} class(es) with no training "
                         f"folder: {', '.join(unknown[:10])}; the validation classes must be the "
                         "training classes")
    samples = sorted((by_stem[k], index[w]) for k, w in labels.items())
    return Split("val", val_dir, samples, class_names)


def check_same_classes(train: Split, val: Split) -> None:
    have = {val.class_names[c] for _, c in val.samples}
    missing, extra = sorted(set(train.class_names) - have), sorted(have - set(train.class_names))
    if missing or extra:
        raise ValueError(
            "validation classes differ from training classes: "
            + (f"{len(missing)} training class(es) have no validation images "
               f"({', '.join(missing[:10])})" if missing else "")
            + ("; " if missing and extra else "")
            + (f"{len(extra)} validation class(es) are not training classes "
               f"({', '.join(extra[:10])})" if extra else "")
            + "; both splits need the same class folders")


def _check_classes(train: Split) -> None:
    if len(train.class_names) < 2:
        raise ValueError(f"training folder {str(train.root)!r} has a single class "
                         f"({train.class_names[0]!r}); classification needs at least 2 class "
                         "folders")


def split_class_folders(root: Path, fraction: float, seed: int = 0) -> Dataset:
    """One folder per class (ImageFolder style), ``fraction`` of each class held out for
    validation (``split.split_samples``: seeded, stratified, independent of the listing)."""
    from .split import split_record, split_samples

    every = list_class_folders(root, "data")
    _check_classes(every)
    short = [c for c, n in zip(every.class_names, every.counts(), strict=True) if n < 2]
    if short:
        raise ValueError(f"{len(short)} class folder(s) in {str(root)!r} hold a single image "
                         f"({', '.join(short[:10])}): --val-split needs at least 2 per class, "
                         "one for each split")
    train, val = split_samples(every.samples, fraction, seed, root=root)
    return Dataset(root, Split("train", root, train, every.class_names),
                   Split("val", root, val, every.class_names),
                   f"one folder per class, {fraction:g} of each held out for validation "
                   f"(seed {seed})", split_record(val, fraction, seed, root=root))


def _layout_error(root: Path, val_split: float | None) -> ValueError:
    found = sorted(p.name for p in root.iterdir())
    if val_split is not None:
        return ValueError(f"--val-split carves validation images out of one folder per class, "
                          f"but {str(root)!r} has a train/ folder (train/ and val/ are the "
                          "splits); drop --val-split")
    hint = ""
    if found and all((root / n).is_dir() for n in found if not n.startswith(".")):
        hint = (" It looks like one folder per class: give --val-split 0.1 to hold out 10% of "
                "each class for validation.")
    return ValueError(f"dataset folder {str(root)!r} needs train/ and val/ subfolders, each "
                      "with one folder per class (val may instead be ImageNet's flat folder "
                      f"with {LOC_CSV} or {GROUND_TRUTH_TXT}); found {found[:10]}.{hint}")


def open_dataset(root: str | os.PathLike, val_labels: str | os.PathLike | None = None,
                 val_split: float | None = None, split_seed: int = 0) -> Dataset:
    """List a dataset's train and val splits (see the module doc for layouts; with
    ``val_split``, one folder per class split by ``split_class_folders``) and check that they
    are usable for classification: >= 2 classes, no empty class folder, same classes."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
    base = root
    if not (root / "train").is_dir() and (root / "ILSVRC" / "Data" / "CLS-LOC" / "train").is_dir():
        base = root / "ILSVRC" / "Data" / "CLS-LOC"  # Kaggle's ImageNet layout
    has_splits = (base / "train").is_dir() and (base / "val").is_dir()
    if val_split is not None and not (base / "train").is_dir():
        return split_class_folders(root, val_split, split_seed)
    if not has_splits or val_split is not None:
        raise _layout_error(root, val_split)
    train = list_class_folders(base / "train", "train")
    _check_classes(train)
    val_dir = base / "val"
    if _is_flat(val_dir):
        labels = Path(val_labels) if val_labels else _find_labels(root, val_dir)
        if labels is None:
            raise FileNotFoundError(
                f"validation folder {str(val_dir)!r} holds images but no class folders, and no "
                f"{LOC_CSV} or {GROUND_TRUTH_TXT} (+ meta.mat) was found in {str(root)!r}; give "
                "the labels file with --val-labels")
        val = list_flat_val(val_dir, labels, train.class_names)
        layout = f"class folders + flat val labelled by {labels.name}"
    else:
        val_raw = list_class_folders(val_dir, "val")
        index = {c: i for i, c in enumerate(train.class_names)}
        # relabel by name so that val index i is train class i
        val = Split("val", val_dir, [(p, index.get(val_raw.class_names[c], -1))
                                     for p, c in val_raw.samples], train.class_names)
        extra = sorted(set(val_raw.class_names) - set(index))
        if extra:
            raise ValueError(f"validation classes differ from training classes: {len(extra)} "
                             f"validation folder(s) are not training classes "
                             f"({', '.join(extra[:10])})")
        layout = "class folders"
    check_same_classes(train, val)
    return Dataset(root, train, val, layout)


# --- the scan for bad files ---------------------------------------------------------------
@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def check_file(path: str) -> str | None:
    """Why ``path`` cannot be trained on, or None. Decodes it at 1/8 size when it is a JPEG
    (the whole entropy-coded stream is still read, so truncation and corruption show)."""
    try:
        load_rgb(path, draft=(1, 1))
    except BadImageError as e:
        return e.reason
    return None


def scan(paths: Sequence[str], workers: int | None = None,
         progress: Callable[[int], None] | None = None) -> list[BadFile]:
    """Every unreadable file among ``paths``, in order, each with its reason. Threads: Pillow
    decodes with the GIL released. ``progress(n)`` is called as files are done."""
    bad: list[BadFile] = []
    chunk = 256
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]

    def run(part: Sequence[str]) -> list[BadFile]:
        return [BadFile(p, r) for p in part if (r := check_file(p)) is not None]

    with ThreadPoolExecutor(workers or min(32, 2 * (os.cpu_count() or 1))) as pool:
        for part, found in zip(chunks, pool.map(run, chunks), strict=True):
            bad.extend(found)
            if progress:
                progress(len(part))
    return bad


@dataclass
class CheckReport:
    dataset: Dataset
    bad: list[BadFile] = field(default_factory=list)
    seconds: float = 0.0

    def format(self) -> str:
        d = self.dataset
        lines = [f"dataset {d.root} ({d.layout}): {len(d.class_names)} classes"]
        for split in (d.train, d.val):
            counts = split.counts()
            lines.append(f"  {split.name}: {len(split):,} files, {min(counts):,}-{max(counts):,} "
                         f"per class ({split.root})")
        lines.append(f"scanned {len(d.train) + len(d.val):,} files in {self.seconds:.1f} s: "
                     + (f"{len(self.bad)} bad file(s)" if self.bad else "all readable"))
        lines.extend(f"  {b}" for b in self.bad)
        return "\n".join(lines)


def check_dataset(dataset: Dataset, workers: int | None = None,
                  progress: Callable[[int], None] | None = None) -> CheckReport:
    """Scan every file of both splits of a listed dataset (``open_dataset``)."""
    t = time.perf_counter()
    bad = scan(dataset.train.paths + dataset.val.paths, workers, progress)
    return CheckReport(dataset, bad, time.perf_counter() - t)


def format_bad(bad: Sequence[BadFile], limit: int = 50) -> str:
    lines = [f"  {b}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


# --- loaders ----------------------------------------------------------------------------------
def sample_rng(seed: int, epoch: int, index: int, attempt: int = 0) -> np.random.Generator:
    """The random stream of one sample in one epoch: independent of workers, batch size and
    of where a run was interrupted and resumed."""
    return np.random.default_rng([seed, epoch, index, attempt])


class TrainImages(torch.utils.data.Dataset):
    """Training samples keyed by (epoch, index) (see ``EpochSampler``): (HWC uint8 crop, label,
    (3,) colour-shift alpha, the bad files met). A file that fails to decode is replaced by the
    next one in the list (and reported), so a bad file never stops an epoch."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform, seed: int) -> None:
        self.samples, self.transform, self.seed = list(samples), transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        bad = []
        for attempt in range(min(len(self.samples), 100)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                image, alpha = self.transform(path, sample_rng(self.seed, epoch, index, attempt))
                return image, label, alpha, bad
            except BadImageError as e:
                bad.append(str(e))
        raise RuntimeError(f"100 files in a row failed to decode, e.g. {bad[:3]}; "
                           "run `vggnet data check` on the dataset")


class EvalImages(torch.utils.data.Dataset):
    """Evaluation samples: (HWC uint8 image, label, None, bad). A file that fails to decode
    gives label -1 (left out of the metrics by the caller) and is reported."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform) -> None:
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            return self.transform(path), label, None, []
        except BadImageError as e:
            c = getattr(self.transform, "crop_size", None) or 32
            return np.zeros((c, c, 3), np.uint8), -1, None, [str(e)]


@dataclass
class Batch:
    images: torch.Tensor  # (N, 3, H, W) uint8 RGB, a channels_last view
    labels: torch.Tensor  # (N,) int64; -1 marks an evaluation image that failed to decode
    alpha: torch.Tensor | None  # (N, 3) float32 colour-shift coefficients (training)
    bad: list[str]  # "path: reason" of files that failed to decode in this batch
    # what a sample is regressed to beside its label: (N, 4) float32 encoded boxes of the
    # localisation runs (``vggnet.localize_train``); None for classification
    targets: torch.Tensor | None = None
    redrawn: int = 0  # random crops drawn again because they lost their object's box

    def pin_memory(self) -> Batch:
        def pin(t):
            return None if t is None else t.pin_memory()

        return Batch(self.images.pin_memory(), self.labels.pin_memory(), pin(self.alpha),
                     self.bad, pin(self.targets), self.redrawn)


def collate(items) -> Batch:
    """Samples (image, label, alpha, bad) or (image, label, alpha, bad, target, redrawn)."""
    images = torch.from_numpy(np.stack([it[0] for it in items]))  # (N, H, W, 3)
    labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
    alpha = None if items[0][2] is None else torch.from_numpy(np.stack([it[2] for it in items]))
    batch = Batch(images.permute(0, 3, 1, 2), labels, alpha, [b for it in items for b in it[3]])
    if len(items[0]) > 4:
        batch.targets = torch.from_numpy(np.stack([it[4] for it in items]))
        batch.redrawn = sum(it[5] for it in items)
    return batch


class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) keys of one epoch for one process, from micro-batch ``start`` on.

    The epoch's order is a permutation seeded by (seed, epoch); it is cut into global batches
    (the last incomplete one dropped), each global batch into ``world_size`` equal shares, and
    this rank's share into micro-batches. Every rank and accumulation layout thus sees exactly
    the same global batches.
    """

    def __init__(self, n: int, global_batch: int, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, start_step: int = 0) -> None:
        self.n, self.global_batch, self.seed, self.epoch = n, global_batch, seed, epoch
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    @property
    def steps(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return (self.steps - self.start_step) * (self.global_batch // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        share = self.global_batch // self.world_size
        for step in range(self.start_step, self.steps):
            begin = step * self.global_batch + self.rank * share
            for i in order[begin:begin + share]:
                yield self.epoch, int(i)


# signals that stop a run (train.StopRequest), which loader workers must survive
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def _worker_init(_: int) -> None:
    # Ctrl-C reaches the whole process group, and so does SIGTERM from `timeout`, `kill --
    # -PGID` or a job scheduler; the main process finishes the step (which may need more
    # batches from the workers) and saves, so the workers ignore both (a worker killed by
    # SIGTERM ended the run in a traceback, unsaved). They were started with both blocked
    # (``Loader``), so none arrived before this. The loader ends them without signals: a None
    # on their queue, then they exit; its terminate() is a fallback for a worker that has not
    # exited 5 s later, which then exits when its item is done (it finds the done event or,
    # once the main process is gone, its watchdog).
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    sys.excepthook = _worker_excepthook


def _worker_excepthook(kind, value, tb) -> None:
    # A worker hands each batch's shared memory to the main process over a connection that a
    # helper thread of the worker accepts (multiprocessing's resource_sharer); when the main
    # process stops mid-handshake (the run was told to stop), that thread's accept() fails
    # and it printed a traceback from the worker, though the run stopped and saved as told
    # (seen in CI: a traceback from resource_sharer._serve's accept()). The main process sees
    # any failed hand-over itself, so a worker's helper thread losing its connection is not
    # reported.
    if (issubclass(kind, (EOFError, ConnectionError))
            and threading.current_thread() is not threading.main_thread()):
        return
    sys.__excepthook__(kind, value, tb)


class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes start with SIGINT and SIGTERM blocked (the mask of
    this thread while it starts them), until ``_worker_init`` ignores them: a signal to the
    whole process group can never kill a worker in the instant before. Signals to this
    process wait those milliseconds, then reach its handlers."""

    def __iter__(self):
        if not self.num_workers or threading.current_thread() is not threading.main_thread():
            return _watched(super().__iter__())
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return _watched(super().__iter__())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


# pids of this process's loader workers (``Loader``), for ``_kill_workers_at_exit``
_WORKER_PIDS: set[int] = set()


def _watched(it):
    """``it``, its worker processes noted so that the interpreter's exit cannot wait on them."""
    if not _WORKER_PIDS:
        atexit.register(_kill_workers_at_exit)
    _WORKER_PIDS.update(w.pid for w in getattr(it, "_workers", ()))
    return it


def _kill_workers_at_exit() -> None:
    # At exit, multiprocessing's own hook (registered at its import, so it runs after this
    # one) sends SIGTERM to daemonic children, which loader workers ignore (``_worker_init``),
    # then joins them. A worker whose loader was not shut down first (an iterator still alive
    # at exit: a script's `next(iter(loader))`, a run stopped mid-step whose iterator the
    # stop's traceback holds) keeps waiting for work while its parent lives, so the exit
    # waited forever (CI: no exit 120 s after a group SIGTERM). Workers hold nothing to save.
    # torch's SIGCHLD handler would raise "worker killed" into this hook: off, we are exiting.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    workers = [p for p in multiprocessing.active_children() if p.pid in _WORKER_PIDS]
    for p in workers:
        p.kill()
    for p in workers:
        p.join(timeout=5)


def make_loader(dataset, batch_size: int, workers: int, sampler=None, pin_memory: bool = False,
                prefetch: int = 4, collate_fn=collate) -> torch.utils.data.DataLoader:
    """Batches of uint8 images from ``workers`` processes (0: in this process)."""
    return Loader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=collate_fn, pin_memory=pin_memory, drop_last=False,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=prefetch if workers else None, persistent_workers=False,
        # its own generator, so that creating an iterator never draws from the global RNG
        # (which drives dropout and must replay exactly on resume)
        generator=torch.Generator().manual_seed(0))



# --- the `vggnet data` commands ------------------------------------------------------------------
def make_data_command(s: MakeDataSettings) -> int:
    """``vggnet data make``: write the built-in dataset (or find it already there)."""
    from .synthetic import is_made, make_synthetic

    spec = s.dataset
    cached = is_made(s.dir, spec) and not s.force
    if not cached:
        total = spec.count("train") + spec.count("val")
        with progress_bar(total, "writing", enabled=s.progress) as bar:
            make_synthetic(s.dir, spec, workers=s.workers, progress=bar.update, force=s.force)
    print(f"{'already there (cached):' if cached else 'wrote'} {s.dir}: {spec.count('train')} "
          f"train / {spec.count('val')} val JPEGs in {spec.num_classes} classes, in class-index "
          f"order: {', '.join(sorted(spec.classes))}")
    return 0


def check_data_command(s: CheckDataSettings) -> int:
    """``vggnet data check``: list and scan a dataset; exit code 1 if any file is bad."""
    d = open_dataset(s.dir, s.val_labels, s.val_split, s.split_seed)  # layout errors first
    with progress_bar(len(d.train) + len(d.val), "scanning", enabled=s.progress) as bar:
        report = check_dataset(d, workers=s.workers, progress=bar.update)
    print(report.format())
    return 1 if report.bad else 0
