"""Training with the paper's recipe (Section 3.1), exactly resumable.

Mini-batch SGD (momentum 0.9, weight decay 5e-4, dropout 0.5 on fc6/fc7) on the multinomial
logistic loss, batch 256, learning rate 1e-2 divided by 10 when the validation top-1 error
stops improving, stopping at the next plateau after the last allowed drop (the paper drops
3 times). One training crop per image per epoch: rescale to S, random crop, flip, colour shift.

Shaped like Flax's ImageNet example: a ``Run`` holds what a run is and never changes (its
settings, data, colour statistics, runtime, log); a ``TrainState`` holds everything the steps
change (weights, optimizer, schedule, counters, best errors, history, RNG) and is what a
checkpoint stores (``to_checkpoint`` / ``from_checkpoint``). ``train`` sets both up, then
alternates ``train_epoch`` and ``end_of_epoch``. The per-process micro-batch comes from the
global batch in one place (``distributed.split_batch``), every process reads its own share of
each global batch (``data.EpochSampler``), metrics are sums reduced across processes, and
everything written to disk goes through ``RunLog`` (rank 0 only). Without torchrun the same
code is a single process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .checkpoint import load_checkpoint
from .data import (
    BadFile,
    Batch,
    Dataset,
    EpochSampler,
    EvalImages,
    TrainImages,
    format_bad,
    make_loader,
    open_dataset,
    scan,
)
from .estimate import first_step_estimate
from .initialize import copy_matching_layers, init_from_net_a
from .model import VGG, VGGConfig, build, config_for
from .preprocess import Preprocessing, paper
from .progress import progress_bar
from .protocol import default_test_scale
from .runfolder import finished, hold_run_folder, repair_best, sigterm_stops
from .runlog import CLASSIFICATION_PLOTS, RunLog, epoch_line, lr_changed, rate
from .runtime import Runtime, make_runtime, peak_memory
from .settings import RESUMABLE, TrainCommand, TrainSettings, make_settings
from .transfer import (
    FINE_TUNE_LR_FACTOR,
    Transfer,
    check_layer_name,
    freeze,
    frozen_layers,
    param_groups,
)
from .transforms import ColorStats, EvalTransform, TrainTransform, compute_stats, device_batch
from .weights import check_state_fits

CHECKPOINT_FORMAT = "vggnet.checkpoint/1"


# --- the learning-rate schedule ------------------------------------------------------------------
@dataclass
class PlateauSchedule:
    """Divide the lr by 1/factor when the val top-1 error has not improved for ``patience``
    epochs; after ``max_drops`` drops, the next plateau says "stop"."""

    lr: float
    factor: float = 0.1
    patience: int = 2
    max_drops: int = 3
    threshold: float = 1e-4
    best: float = math.inf
    bad_epochs: int = 0
    drops: int = 0

    def step(self, val_top1_err: float) -> str:
        """-> "improved", "kept", "dropped" (self.lr is now lower) or "stop"."""
        if val_top1_err < self.best - self.threshold:
            self.best, self.bad_epochs = val_top1_err, 0
            return "improved"
        self.bad_epochs += 1
        if self.bad_epochs < self.patience:
            return "kept"
        if self.drops >= self.max_drops:
            return "stop"
        self.lr *= self.factor
        self.drops += 1
        self.bad_epochs = 0
        return "dropped"

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


# --- one step, one validation pass -----------------------------------------------------------
def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 hits, top-5 hits) of (N, classes) logits; top-5 is top-k for fewer classes."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return hits[:, 0].sum(), hits.any(1).sum()


def _sums(loss_sum: torch.Tensor, top1: torch.Tensor, top5: torch.Tensor, n: int,
          device: torch.device) -> torch.Tensor:
    """float64 [loss sum, top-1 hits, top-5 hits, images]: what steps and passes add up."""
    return torch.stack([loss_sum.double(), top1.double(), top5.double(),
                        torch.tensor(float(n), dtype=torch.float64, device=device)])


def _no_sync(model: nn.Module, last: bool):
    """DDP's gradient all-reduce only on the last micro-batch of a step."""
    return nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Iterable[Batch],
             per_process_batch: int, runtime: Runtime, prep: Preprocessing, stats: ColorStats,
             scaler: torch.amp.GradScaler | None = None, poison: bool = False,
             loss_fn: Callable | None = None,
             interruptible: AbstractContextManager | None = None) -> tuple[torch.Tensor, bool]:
    """One SGD step on this process's share of a global batch, in micro-batches.

    Each micro-batch adds sum-of-losses / per_process_batch to the gradients, so the step
    equals one on the whole batch (DDP then averages the processes' equal shares). A
    non-finite loss or gradient on any process skips the step on every process (one agreed
    flag), leaving weights and optimizer state as they were. ``poison`` makes the loss NaN
    (fault injection). ``loss_fn(output, labels, targets)`` -> (summed loss, top-1 hits,
    top-5 hits) (``Task.loss``; default: the paper's classification). Returns (float64 sums
    [loss, top-1 hits, top-5 hits, images] on the device, skipped).
    """
    loss_fn = loss_fn or classification_loss
    micro_batches = list(micro_batches)
    optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)
    # a stop may abandon the forward and backward passes (``interruptible``), never the update
    with interruptible or nullcontext():
        for i, batch in enumerate(micro_batches):
            images = runtime.input(batch.images)
            labels = batch.labels.to(runtime.device, non_blocking=True)
            alpha = batch.alpha.to(runtime.device, non_blocking=True)
            targets = None if batch.targets is None else batch.targets.to(runtime.device)
            x = device_batch(images, prep, alpha=alpha, stats=stats)
            with _no_sync(model, i == len(micro_batches) - 1):
                with runtime.autocast():
                    output = model(x)
                loss_sum, top1, top5 = loss_fn(output, labels, targets)
                if poison:
                    loss_sum = loss_sum * float("nan")
                loss = loss_sum / per_process_batch
                (scaler.scale(loss) if scaler is not None else loss).backward()
            totals += _sums(loss_sum.detach(), top1, top5, len(labels), runtime.device)
    finite = torch.isfinite(totals[0])
    if scaler is None:  # with fp16 the grad scaler itself skips steps whose gradients overflow
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(grads))
    skip, = distributed.agree(not bool(finite), device=runtime.device)
    if skip:
        optimizer.zero_grad(set_to_none=True)
        return totals, True
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return totals, False


def classification_loss(logits: torch.Tensor, labels: torch.Tensor,
                        targets: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The multinomial logistic loss summed over (N, classes) logits, and the top-1/top-5
    hits (``targets``: unused, a classification sample has only its label)."""
    return (F.cross_entropy(logits.float(), labels, reduction="sum"),
            *count_correct(logits.detach(), labels))


@torch.no_grad()
def validate(model: nn.Module, batches: Iterable[Batch], runtime: Runtime,
             prep: Preprocessing, progress: Callable[[int], None] | None = None) -> dict:
    """Loss and top-1/top-5 error over ``batches`` (summed over processes). Images that failed
    to decode (label -1) are left out and listed under "bad". ``progress(n)`` after each
    batch of n images."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)
    bad: list[str] = []
    for batch in batches:
        if progress:
            progress(len(batch.labels))
        bad.extend(batch.bad)
        keep = batch.labels >= 0
        if not keep.any():
            continue
        images = runtime.input(batch.images[keep])
        labels = batch.labels[keep].to(runtime.device)
        with runtime.autocast():
            logits = model(device_batch(images, prep)).float()
        top1, top5 = count_correct(logits, labels)
        totals += _sums(F.cross_entropy(logits, labels, reduction="sum"), top1, top5, len(labels),
                        runtime.device)
    model.train(was_training)
    loss, top1, top5, n = distributed.all_reduce_sum(totals).tolist()
    if n == 0:
        raise ValueError("no validation image could be decoded; run `vggnet data check`")
    return {"loss": loss / n, "top1_err": 1 - top1 / n, "top5_err": 1 - top5 / n,
            "images": int(n), "bad": bad}


# --- setting a run up: every check before any work --------------------------------------------
def prepare_data(s: TrainSettings, info: distributed.DistInfo,
                 say: Callable[[str], None] = print) -> tuple[Dataset, list[BadFile]]:
    """List the dataset (layout errors raise here), scan every file, refuse or skip bad ones."""
    dataset = open_dataset(s.data, s.val_labels, s.val_split, s.split_seed)
    bad: list[BadFile] = []
    if s.scan:
        t = time.perf_counter()
        paths = dataset.train.paths + dataset.val.paths
        with progress_bar(len(paths), "scanning", enabled=s.progress and info.is_main) as bar:
            bad = distributed.broadcast_object(
                scan(paths, progress=bar.update) if info.is_main else None, info)
        say(f"scanned {len(dataset.train) + len(dataset.val):,} files in "
            f"{time.perf_counter() - t:.1f} s: {len(bad)} bad")
    if bad and not s.skip_bad:
        raise ValueError(f"{len(bad)} file(s) in {s.data!r} cannot be decoded; training did not "
                         f"start:\n{format_bad(bad)}\nfix or remove them, or pass --skip-bad to "
                         "train without them")
    if bad:
        paths = {b.path for b in bad}
        dataset = Dataset(dataset.root, dataset.train.without(paths), dataset.val.without(paths),
                          dataset.layout)
        empty = [c for c, n in zip(dataset.class_names, dataset.train.counts(), strict=True)
                 if n == 0]
        if empty:
            raise ValueError(f"after skipping bad files, training class(es) {empty} have no "
                             "images left")
        say(f"skipping {len(bad)} bad file(s) (listed in bad_files.txt):\n{format_bad(bad, 10)}")
    return dataset, bad


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder means its best.pt (else last.pt); a file is itself."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"run folder {str(p)!r} has no best.pt or last.pt")
    if not p.is_file():
        raise FileNotFoundError(f"{str(p)!r} is neither a run folder nor a checkpoint/weights "
                                "file")
    return p


class Initialised(NamedTuple):
    """What ``init_from`` did: its summary, the source's metadata, the layers it copied, and
    whether that was the paper's stage chaining (net A into a deeper net)."""

    summary: str
    meta: dict
    copied: list[str]
    chained: bool


def init_from(model: VGG, source: str | os.PathLike, new_head: bool = False) -> Initialised:
    """Stage chaining: net A into a deeper net (the paper's layers), anything else by matching
    layer names and shapes (``new_head``: never fc8, the classifier starts afresh)."""
    from .weights import read_file

    path = resolve_checkpoint(source)
    state, meta = read_file(path)
    src = VGGConfig.from_dict(meta["model_config"]) if meta.get("model_config") else None
    if src is not None and src.arch in ("A", "A-LRN") and model.config.arch not in ("A", "A-LRN"):
        copied = init_from_net_a(model, state)
        return Initialised(f"initialised from net A {path}: {', '.join(copied)} (the rest "
                           "random)", meta, copied, True)
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.fc8.")}
    report = copy_matching_layers(model, state)
    if not report.copied:
        raise ValueError(f"nothing in {str(path)!r} fits this {model.config.name} net:\n"
                         f"{report.summary()}")
    head = "\nfc8: a new classifier" if new_head else ""
    return Initialised(f"initialised from {path}:\n{report.summary()}{head}", meta,
                       report.copied, False)


def start_from(s: TrainSettings, model: VGG, log: RunLog) -> tuple[Transfer, dict]:
    """``--init-from``: copy the layers, then say at which lr they train and which stay fixed
    (``transfer``); returns that and the source's metadata."""
    done = init_from(model, s.init_from, s.new_head)
    log.message(done.summary)
    factor = s.transfer_lr_factor
    if factor is None:  # the paper: lr/10 from a trained net, the full lr for net A's layers
        factor = 1.0 if done.chained else FINE_TUNE_LR_FACTOR
    transfer = Transfer(str(s.init_from), tuple(done.copied), factor,
                        frozen_layers(model, s.freeze_until, tuple(done.copied)))
    log.message(transfer.describe())
    return transfer, done.meta


def run_preprocessing(ckpt: dict | None, source_meta: dict, stats: ColorStats) -> Preprocessing:
    """The input convention: a resumed run's own; the source's when starting from trained
    weights (they keep the convention they learnt with: torchvision's RGB [0, 1] mean/std,
    Caffe's BGR 0-255 minus the mean pixel, ours); else the paper's, the training set's mean
    RGB subtracted."""
    if ckpt is not None and ckpt.get("preprocessing"):
        return Preprocessing.from_dict(ckpt["preprocessing"])
    if source_meta.get("preprocessing"):
        return Preprocessing.from_dict(source_meta["preprocessing"])
    return paper(stats.mean_rgb)


def default_loader_workers() -> int:
    """Training loader processes: one per core but one (for the main process), at most 16."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    return max(1, min(16, cores - 1))


def check_resumable(overrides: dict) -> dict:
    """The overrides (None: not given) a resumed run may take: only how it runs (``RESUMABLE``),
    never what it computes; anything else is an error naming the option."""
    given = {k: v for k, v in overrides.items() if v is not None}
    other = sorted(set(given) - set(RESUMABLE))
    if other:
        def flags(keys):
            return ", ".join("--" + k.replace("_", "-") for k in keys)

        raise ValueError(f"--resume continues a run with its own settings; only "
                         f"{flags(RESUMABLE)} may be given with it, got {flags(other)}")
    return given


def name_run(settings: TrainSettings | None, resume: str | os.PathLike | None
             ) -> tuple[TrainSettings | None, Path | None]:
    """A new run's folder named (default runs/MODEL-PRESET-DATE); a group that torchrun
    restarted continues from its last.pt."""
    if resume is None and settings is not None:
        if settings.out is None:
            # under torchrun the run id is the same for every rank and every restart
            tag = os.environ.get("TORCHELASTIC_RUN_ID", "")[:8] or time.strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"{settings.model}-{settings.preset}-{tag}"
            settings = dataclasses.replace(settings, out=str(out))
        if distributed.restarted() and (Path(settings.out) / "last.pt").is_file():
            resume = Path(settings.out) / "last.pt"  # torchrun restarted the group: continue
    if resume is None and settings is None:
        raise ValueError("train() needs settings or resume")
    return settings, None if resume is None else Path(resume)


def checkpoint_path(resume: Path) -> Path:
    """What --resume names: a run folder means its last.pt."""
    return resume / "last.pt" if resume.is_dir() else resume


def run_config(s: TrainSettings, num_classes: int) -> VGGConfig:
    return config_for(s.model, num_classes=num_classes, batch_norm=s.batch_norm, width=s.width,
                      crop_size=s.crop_size, dropout=s.dropout)


def settings_and_checkpoint(settings: TrainSettings | None, resume: Path | None,
                            overrides: dict) -> tuple[TrainSettings, dict | None]:
    """The settings of a new run, or of the run ``resume`` continues (its checkpoint's, with
    ``overrides``) and that checkpoint, its tensors checked against those settings' net."""
    if resume is None:
        return settings, None
    given = check_resumable(overrides)
    path = checkpoint_path(resume)
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a vggnet training checkpoint (format "
                         f"{ckpt.get('format')!r}); --resume takes a run folder or its last.pt")
    s = TrainSettings.from_dict({**ckpt["train_settings"], **given, "out": str(path.parent)})
    # a classifier is built from its settings; another task's net (localisation) from the
    # config the checkpoint records
    config = (run_config(s, len(ckpt["class_names"])) if "localisation" not in ckpt
              else VGGConfig.from_dict(ckpt["model_config"]))
    check_state_fits(config, ckpt["model"], repr(str(path)), "its training settings describe")
    if "data" not in given and not Path(s.data).is_dir():
        raise FileNotFoundError(f"the run's dataset folder {s.data!r} does not exist; if it "
                                "moved, give its new place beside --resume (`vggnet train "
                                "--resume RUN --data NEW_DIR`, `vggnet finetune --resume RUN "
                                "NEW_DIR`)")
    return s, ckpt


def check_same_data(ckpt: dict, dataset: Dataset, root: str) -> None:
    """A resumed run trains on the data it started with, wherever that is now (--data)."""
    if ckpt["class_names"] != dataset.class_names:
        raise ValueError(f"the dataset's classes changed since the checkpoint was written "
                         f"({len(ckpt['class_names'])} then, {len(dataset.class_names)} in "
                         f"{root!r} now); resume on the same data")
    now = {"train": len(dataset.train), "val": len(dataset.val)}
    if ckpt.get("images", now) != now:
        raise ValueError(f"{root!r} holds {now['train']:,} training and {now['val']:,} "
                         f"validation images; the run was trained on {ckpt['images']['train']:,}"
                         f" and {ckpt['images']['val']:,}: resume on the same data (--data)")


class Checked(NamedTuple):
    """What the checks before a run found: where and how it runs, and on what data."""

    runtime: Runtime
    info: distributed.DistInfo
    dataset: Dataset
    bad: list[BadFile]
    micro: int  # images per forward pass and process
    accum: int  # micro-batches per step


def check_run(s: TrainSettings, ckpt: dict | None) -> Checked:
    """Every check before anything is computed or written."""
    runtime = make_runtime(s.device, s.precision, s.channels_last, s.compile)
    if s.sync_bn and runtime.device.type != "cuda":
        raise ValueError("--sync-bn synchronises batch norm across GPUs (NCCL); it needs CUDA, "
                         f"this run is on {runtime.device}")
    info = distributed.init_distributed(runtime.device, s.dist_timeout_s)
    say = print if info.is_main else (lambda *a, **k: None)
    if ckpt is None and s.init_from:
        resolve_checkpoint(s.init_from)
    dataset, bad = prepare_data(s, info, say)
    if ckpt is not None:
        check_same_data(ckpt, dataset, s.data)
    if ckpt is not None and ckpt.get("split"):
        from .split import check_split_record

        check_split_record(ckpt["split"], dataset.val.samples, dataset.root)
    if ckpt is None and s.freeze_until:  # the name; what was copied is checked on copying
        check_layer_name(config_for(s.model, batch_norm=s.batch_norm), s.freeze_until)
    micro, accum = distributed.split_batch(s.batch_size, info.world_size, s.micro_batch)
    if len(dataset.train) < s.batch_size:
        raise ValueError(f"the training set has {len(dataset.train)} images, fewer than one "
                         f"batch of {s.batch_size}; lower --batch-size")
    return Checked(runtime, info, dataset, bad, micro, accum)


# --- what a run learns ------------------------------------------------------------------------
class Task:
    """What a run learns: the paper's classification. ``train`` asks it for the model, the
    samples, each step's loss and the validation error that drives the schedule; a subclass
    changes any of them and keeps the loop, checkpoints, resume and run folder
    (``vggnet.localize_train.BoxTask``: box regression, validated by localisation error)."""

    name = "classification"  # checkpoints of other tasks record theirs under "task"
    command = "vggnet train"  # what continues such a run (with --resume)
    plots = CLASSIFICATION_PLOTS  # what the run's loss.png and error.png show

    def resumed(self, ckpt: dict) -> Task:
        """The task of the run ``ckpt`` continues: this one, if it is of this kind."""
        found = ckpt.get("task", "classification")
        if found != self.name:
            raise ValueError(f"that run trains {found}, not {self.name}; continue it with "
                             f"`{ckpt.get('resume_with', 'vggnet train')} --resume RUN`")
        return self

    def build(self, s: TrainSettings, class_names: list[str], ckpt: dict | None,
              log: RunLog) -> tuple[VGG, dict, Transfer | None]:
        """The model (initialised, or from ``--init-from`` in a new run), the metadata of the
        file it came from ({} if none) and the layers taken from it (``transfer``)."""
        model = build(run_config(s, len(class_names)), init=s.init, seed=s.seed)
        if ckpt is None and s.init_from:
            transfer, source_meta = start_from(s, model, log)
            return model, source_meta, transfer
        transfer = Transfer.from_dict(ckpt["transfer"]) if ckpt and ckpt.get("transfer") else None
        return model, {}, transfer

    def preprocessing(self, stats: ColorStats, ckpt: dict | None = None,
                      source_meta: dict | None = None) -> Preprocessing:
        """What the net's input pixels are (``run_preprocessing``): a resumed run's own, the
        source's when fine-tuning, else the paper's, minus the training set's mean RGB."""
        return run_preprocessing(ckpt, source_meta or {}, stats)

    def images(self, run: Run) -> tuple:
        """(training samples keyed by (epoch, index), this process's validation samples)."""
        s, c = run.settings, run.checked
        train = TrainImages(c.dataset.train.samples,
                            TrainTransform(s.scale, s.crop_size, s.flip, s.pca_std), seed=s.seed)
        val = [c.dataset.val.samples[i] for i in distributed.shard(len(c.dataset.val), c.info)]
        return train, EvalImages(val, EvalTransform(default_test_scale(s.scale), s.crop_size))

    def wrap(self, model: VGG) -> nn.Module:
        """The module that runs the weights in training and validation."""
        return model

    def loss(self, output: torch.Tensor, labels: torch.Tensor,
             targets: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(summed loss, top-1 hits, top-5 hits) of a micro-batch (see ``sgd_step``)."""
        return classification_loss(output, labels, targets)

    def validate(self, state: TrainState, run: Run,
                 progress: Callable[[int], None] | None = None) -> dict:
        """"loss", "top1_err" (the schedule follows it), "top5_err", "images", "bad" and
        optionally "extra" (more columns for the epoch's metrics row); ``progress(n)`` after
        each batch of n images."""
        return validate(state.net, make_loader(run.val_images, 2 * run.checked.micro,
                                               run.workers, pin_memory=run.pin),
                        run.runtime, run.prep, progress=progress)

    def epoch_line(self, row: dict, epochs: int) -> str:
        return epoch_line(row, epochs)

    def report(self, result: TrainResult, run: Run) -> str:
        return training_report(result, run)

    def constants(self) -> dict:
        """What checkpoints record about the task beside the run's constants."""
        return {}


# --- the run and its state ---------------------------------------------------------------------
@dataclass
class Run:
    """What a run is and runs on, fixed once set up: the constant part of its checkpoints."""

    settings: TrainSettings
    config: VGGConfig
    stats: ColorStats  # mean RGB and colour PCA (the colour shift)
    checked: Checked
    log: RunLog
    task: Task = field(default_factory=Task)
    prep: Preprocessing | None = None  # None: the task's (the paper's: mean RGB subtracted)
    transfer: Transfer | None = None  # the layers taken from --init-from and how they train

    def __post_init__(self) -> None:
        s, c = self.settings, self.checked
        self.prep = self.prep or self.task.preprocessing(self.stats)
        self.folder = Path(s.out)
        self.runtime, self.info, self.dataset = c.runtime, c.info, c.dataset
        self.workers = s.workers if s.workers is not None else default_loader_workers()
        self.pin = c.runtime.device.type == "cuda"
        self.train_images, self.val_images = self.task.images(self)
        self.steps_per_epoch = len(self.train_images) // s.batch_size

    def constants(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "model_config": self.config.to_dict(),
                "preprocessing": self.prep.to_dict(), "class_names": self.dataset.class_names,
                "images": {"train": len(self.dataset.train), "val": len(self.dataset.val)},
                "train_settings": self.settings.to_dict(), "stats": self.stats.to_dict(),
                "transfer": self.transfer.to_dict() if self.transfer else None,
                "split": self.dataset.split, **self.task.constants()}

    def describe(self) -> str:
        s, c, rt = self.settings, self.checked, self.runtime
        return (f"training {self.config.label} (width {s.width:g}, crop {s.crop_size}, S in "
                f"[{s.scale[0]}, {s.scale[1]}], Q={default_test_scale(s.scale)}) on "
                f"{len(self.train_images):,} images of {len(self.dataset.class_names)} classes, "
                f"{rt.device} {rt.amp_dtype or 'fp32'}; batch {s.batch_size} = "
                f"{self.info.world_size} process(es) x {c.accum} x {c.micro}; "
                f"{self.steps_per_epoch} steps/epoch; {self.workers} loader worker(s); input "
                f"{self.prep.describe()}")


@dataclass
class EpochProgress:
    """What the current epoch has added up so far (saved mid-epoch, so a resumed epoch's
    metrics are the whole epoch's)."""

    totals: list[float] = field(default_factory=lambda: [0.0] * 4)  # loss, top-1, top-5, images
    seconds: float = 0.0
    bad: list[str] = field(default_factory=list)  # files that failed to decode
    skipped: int = 0  # non-finite steps skipped
    redrawn: int = 0  # random crops drawn again (a localisation crop that lost its box)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainState:
    """Everything the steps change, as in Flax's ImageNet example: weights, optimizer,
    schedule, counters, best errors and the metrics so far; with the global RNG (dropout),
    exactly what ``to_checkpoint`` saves and ``from_checkpoint`` restores."""

    model: VGG  # the weights (``net`` runs them: on the device, maybe compiled or DDP-wrapped)
    net: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: PlateauSchedule
    scaler: torch.amp.GradScaler | None  # fp16 only
    epoch: int = 0  # finished epochs
    epoch_step: int = 0  # steps done in the current epoch
    step: int = 0  # steps done in all
    progress: EpochProgress = field(default_factory=EpochProgress)
    best_top1_err: float = math.inf
    best_top5_err: float = math.inf
    history: list[dict] = field(default_factory=list)  # one metrics row per finished epoch
    skips: int = 0  # consecutive skipped steps; not saved (a resumed run counts afresh)
    timed: bool = False  # the first step's estimate was printed; not saved

    @classmethod
    def create(cls, run: Run, model: VGG) -> TrainState:
        """A fresh state around ``model`` (initialised): SGD with the recipe's settings."""
        s, rt = run.settings, run.runtime
        model.train()
        if run.transfer is not None:  # before DDP and compile see which parameters train
            freeze(model, run.transfer.frozen)
        if s.sync_bn and run.info.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = distributed.wrap_ddp(rt.prepare(run.task.wrap(model)), run.info, rt.device,
                                   s.bucket_mb, s.grad_compression)
        optimizer = torch.optim.SGD(param_groups(model, run.transfer), lr=s.lr,
                                    momentum=s.momentum,
                                    weight_decay=s.weight_decay, **rt.optimizer_options())
        schedule = PlateauSchedule(s.lr, s.lr_factor, s.lr_patience, s.lr_drops,
                                   s.min_improvement)
        scaler = torch.amp.GradScaler(rt.device.type) if rt.needs_grad_scaler else None
        for p in model.parameters():  # a Ctrl-C is handled mid-backward, at each weight's grad
            if p.requires_grad:  # (--freeze-until's frozen layers get none)
                p.register_hook(_signal_point)
        return cls(model, net, optimizer, schedule, scaler)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, run: Run, model: VGG) -> TrainState:
        """The state ``to_checkpoint`` saved, RNG included, around ``model``."""
        state = cls.create(run, model)
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.schedule.load_state_dict(ckpt["scheduler"])
        if state.scaler is not None and ckpt.get("grad_scaler"):
            state.scaler.load_state_dict(ckpt["grad_scaler"])
        state.epoch, state.epoch_step, state.step = ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]
        state.progress = EpochProgress(**ckpt["epoch_progress"])
        state.best_top1_err, state.best_top5_err = ckpt["best_top1_err"], ckpt["best_top5_err"]
        state.history = list(ckpt["metrics"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if run.runtime.device.type == "cuda" and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        return state

    def to_checkpoint(self, run: Run) -> dict:
        cuda = run.runtime.device.type == "cuda"
        return {**run.constants(), "model": self.model.state_dict(),
                "epoch": self.epoch, "epoch_step": self.epoch_step, "step": self.step,
                "epoch_progress": self.progress.to_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state_dict(),
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if cuda else []},
                "metrics": self.history, "best_top1_err": self.best_top1_err,
                "best_top5_err": self.best_top5_err}


def start_run(s: TrainSettings, ckpt: dict | None, checked: Checked, log: RunLog,
              task: Task | None = None) -> tuple[Run, TrainState]:
    """The model (``task.build``: initialised, or from ``--init-from``), the colour statistics
    (the checkpoint's, the source's or computed), the run, and its state (fresh or restored)."""
    dataset, info, task = checked.dataset, checked.info, task or Task()
    model, source_meta, transfer = task.build(s, dataset.class_names, ckpt, log)
    if ckpt is not None:
        stats = ColorStats.from_dict(ckpt["stats"])
    elif source_meta.get("stats"):
        stats = ColorStats.from_dict(source_meta["stats"])
        log.message(f"colour statistics of {s.init_from} reused: mean RGB "
                    f"{[round(v, 2) for v in stats.mean_rgb]}")
    else:
        t = time.perf_counter()
        n = min(len(dataset.train), s.stats_images or len(dataset.train))
        with progress_bar(n, "colour statistics", enabled=s.progress and info.is_main) as bar:
            stats = distributed.broadcast_object(compute_stats(
                dataset.train.paths, s.scale[0], s.stats_images, progress=bar.update)
                if info.is_main else None, info)
        log.message(f"mean RGB {[round(v, 2) for v in stats.mean_rgb]}, colour PCA eigenvalues "
                    f"{[f'{v:.2e}' for v in stats.eigval]} from {stats.images} training images "
                    f"({time.perf_counter() - t:.1f} s)")
    prep = task.preprocessing(stats, ckpt, source_meta)
    if ckpt is None and s.init_from and source_meta.get("preprocessing"):
        log.message(f"input as {s.init_from} was trained: {prep.describe()}")
    run = Run(s, model.config, stats, checked, log, task, prep, transfer)
    if ckpt is not None:
        state = TrainState.from_checkpoint(ckpt, run, model)
        log.message(f"resuming {run.folder} at epoch {state.epoch + 1}, step "
                    f"{state.epoch_step}/{run.steps_per_epoch}")
        return run, state
    state = TrainState.create(run, model)
    torch.manual_seed(s.seed)  # dropout masks
    log.write_text("settings.json", json.dumps(s.to_dict(), indent=1) + "\n")
    if checked.dataset.split:
        log.write_text("split.json", json.dumps(checked.dataset.split, indent=1) + "\n")
    if checked.bad:
        log.write_text("bad_files.txt", "".join(f"{b}\n" for b in checked.bad))
    return run, state


def _signal_point(grad: torch.Tensor) -> None:
    """A gradient hook that does nothing: Python runs a pending signal handler only between
    Python instructions, so without it a Ctrl-C would wait for the whole backward pass (most
    of a step). On the CPU the backward pass runs on this thread; the handler can then
    abandon the step here."""


# --- the loop -----------------------------------------------------------------------------------
def halted(state: TrainState, run: Run, where: str) -> FloatingPointError:
    """The error that halts a run after ``max_skips`` non-finite steps in a row: what to
    change, and where to start again (last.pt only if one was saved: not in epoch 1)."""
    last = run.folder / "last.pt"
    change = f"lower --lr (now {state.schedule.lr:g})" + (
        "" if run.config.batch_norm else " or use --batch-norm")
    then = (f"The last good checkpoint is {last}; {change}, then start again from it with "
            "--init-from" if last.is_file() else f"No checkpoint was saved yet; {change}, then "
            "start again")
    return FloatingPointError(f"{state.skips} consecutive steps had a non-finite loss or "
                              f"gradient ({where}); training halted. {then}")


def take_step(state: TrainState, run: Run, batches: Iterator[Batch],
              stop: StopRequest | None = None) -> int:
    """One SGD step on the next global batch, its sums added to the epoch's; a non-finite one
    is skipped (``max_skips`` in a row halt the run). Returns the images it learnt from.
    ``stop`` may abandon it (``StepAbandoned``) while it loads and computes, before the
    update."""
    s = run.settings
    fault = distributed.injected_fault(run.info, state.step + 1)
    interruptible = stop.interruptible if stop is not None else nullcontext
    with interruptible():
        micro_batches = [next(batches) for _ in range(run.checked.accum)]
    totals, skipped = sgd_step(state.net, state.optimizer, micro_batches,
                               run.checked.micro * run.checked.accum, run.runtime, run.prep,
                               run.stats, state.scaler, poison=fault == "nan",
                               loss_fn=run.task.loss, interruptible=interruptible())
    totals = distributed.all_reduce_sum(totals).tolist()
    state.skips = state.skips + 1 if skipped else 0
    if skipped:
        state.progress.skipped += 1
        where = f"epoch {state.epoch + 1}, step {state.epoch_step + 1}"
        run.log.message(f"{where}: non-finite loss or gradient (loss {totals[0]}); step skipped "
                        f"on every process ({state.skips}/{s.max_skips})")
        if state.skips >= s.max_skips:
            raise halted(state, run, where)
        totals = [0.0] * 4  # nothing learnt from this batch
    p = state.progress
    p.totals = [a + b for a, b in zip(p.totals, totals, strict=True)]
    p.bad += [b for mb in micro_batches for b in mb.bad]
    p.redrawn += sum(mb.redrawn for mb in micro_batches)
    state.epoch_step += 1
    state.step += 1
    return int(totals[3])


def train_epoch(state: TrainState, run: Run, stop: StopRequest,
                on_step: Callable[[int], None] | None = None) -> bool:
    """Steps from ``state.epoch_step`` to the end of the epoch (``last.pt`` also every
    ``save_every_min``). True if a stop was requested: then ``last.pt`` holds the state after
    the last step."""
    s = run.settings
    for group in state.optimizer.param_groups:  # copied layers may train at a fraction
        group["lr"] = state.schedule.lr * group.get("lr_scale", 1.0)
    sampler = EpochSampler(len(run.train_images), s.batch_size, s.seed, state.epoch,
                           run.info.rank, run.info.world_size, start_step=state.epoch_step)
    batches = iter(make_loader(run.train_images, run.checked.micro, run.workers, sampler,
                               pin_memory=run.pin))
    bar = progress_bar(run.steps_per_epoch, f"epoch {state.epoch + 1}/{s.epochs}", unit="step",
                       enabled=s.progress and run.info.is_main, initial=state.epoch_step)
    t_epoch, images, stopped = time.perf_counter(), 0, stop.requested
    while not stopped and state.epoch_step < run.steps_per_epoch:
        done = step_or_abandon(state, run, batches, stop)
        if done is None:  # abandoned: the state is the last finished step's
            stopped = True
            break
        images += done
        t = state.progress.totals
        bar.update(1)
        bar.set_postfix(loss=f"{t[0] / max(t[3], 1):.3f}", acc=f"{t[1] / max(t[3], 1):.3f}",
                        img_s=f"{images / (time.perf_counter() - t_epoch):.0f}")
        if on_step is not None:
            on_step(state.step)
        stopped, = distributed.agree(stop.requested, device=run.runtime.device)
        if stopped:
            break
        due = time.perf_counter() - run.log.saved_at > 60 * s.save_every_min
        if due and state.epoch_step < run.steps_per_epoch:
            state.progress.seconds += time.perf_counter() - t_epoch
            t_epoch, images = time.perf_counter(), 0
            run.log.save("last.pt", state.to_checkpoint(run))
    del batches  # ends its worker processes now
    bar.close()
    state.progress.seconds += time.perf_counter() - t_epoch
    if stopped:
        save_stopped(state, run)
    return stopped


def save_stopped(state: TrainState, run: Run) -> None:
    run.log.save("last.pt", state.to_checkpoint(run))
    run.log.message(f"stopped at epoch {state.epoch + 1}, step {state.epoch_step}/"
                    f"{run.steps_per_epoch}; saved {run.folder / 'last.pt'}\nresume with: "
                    f"{run.task.command} --resume {run.folder}")


def step_or_abandon(state: TrainState, run: Run, batches: Iterator[Batch],
                    stop: StopRequest) -> int | None:
    """``take_step``, or None when a stop abandoned it (one process only): the RNG and the
    batch-norm statistics are then put back as they were before it, so that the state saved
    is exactly the last finished step's. The first step of the process is timed for the
    estimate of the run's time and memory (a real step: nothing extra is computed)."""
    before = StepStart(state.model, run.runtime.device) if stop.abandon else None
    t = time.perf_counter()
    try:
        images = take_step(state, run, batches, stop)
    except StepAbandoned:
        before.restore(state.model)
        return None
    if not state.timed:
        state.timed = True
        s = run.settings
        memory, what = peak_memory(run.runtime.device)
        steps_left = (s.epochs - state.epoch) * run.steps_per_epoch - state.epoch_step + 1
        run.log.message(first_step_estimate(time.perf_counter() - t, run.steps_per_epoch,
                                            steps_left, s.epochs - state.epoch, memory, what,
                                            run.runtime.device.type, s.preset))
    return images


class StepStart:
    """What a step changes before its update, kept to abandon it: the global RNG state
    (dropout) and the buffers (batch-norm statistics)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.rng = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
        self.buffers = [b.detach().clone() for b in model.buffers()]

    def restore(self, model: nn.Module) -> None:
        torch.set_rng_state(self.rng)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), self.buffers, strict=True):
                b.copy_(saved)


def end_of_epoch(state: TrainState, run: Run, stop: StopRequest | None = None) -> str:
    """Validate, step the schedule, record the epoch, save last.pt (and best.pt when the
    validation error improved). Returns the schedule's event ("stop" ends the run), or
    "interrupted" when ``stop`` abandoned the validation (last.pt then holds the epoch's
    steps, and a resumed run validates)."""
    bar = progress_bar(len(run.val_images), "validating",
                       enabled=run.settings.progress and run.info.is_main)
    try:
        with stop.interruptible() if stop is not None else nullcontext(), bar:
            val = run.task.validate(state, run, progress=bar.update)
    except StepAbandoned:
        save_stopped(state, run)
        return "interrupted"
    p = state.progress
    loss_sum, top1, _, n = p.totals
    lr = state.schedule.lr
    event = state.schedule.step(val["top1_err"])
    bad = p.bad + val["bad"]
    row = {"epoch": state.epoch + 1, "step": state.step, "lr": lr,
           "train_loss": loss_sum / n if n else math.nan,
           "train_top1_err": 1 - top1 / n if n else math.nan, "val_loss": val["loss"],
           "val_top1_err": val["top1_err"], "val_top5_err": val["top5_err"],
           "images_per_s": n / max(p.seconds, 1e-9), "epoch_s": p.seconds,
           "bad_files": len(bad), "skipped_steps": p.skipped, "event": event,
           **val.get("extra", {})}
    state.history.append(row)
    state.epoch, state.epoch_step, state.progress = state.epoch + 1, 0, EpochProgress()
    if event == "improved":
        state.best_top1_err, state.best_top5_err = val["top1_err"], val["top5_err"]
    run.log.epoch(row)  # first: after a kill the metrics are never behind last.pt
    ckpt = state.to_checkpoint(run)
    run.log.save("last.pt", ckpt)  # then best.pt: runfolder.repair_best mends a kill between
    if event == "improved":
        run.log.save("best.pt", ckpt)
    run.log.message(run.task.epoch_line(row, run.settings.epochs) + (
        f"\n  decode failures this epoch (skipped):\n{format_bad(bad, 10)}" if bad else ""))
    if event == "stop":
        run.log.message(f"validation error stopped improving after {state.schedule.drops} lr "
                        "drop(s): done")
    return event


@dataclass
class TrainResult:
    folder: Path
    # "finished", "stopped" (plateau after the last lr drop), "interrupted", or "already
    # finished" (a resumed run that was finished: nothing done)
    status: str
    epochs: int
    best_top1_err: float
    best_top5_err: float
    seconds: float
    history: list[dict] = field(default_factory=list)
    # what the run trained with (a resumed run: its checkpoint's, with the overrides given)
    settings: TrainSettings | None = None


def train(settings: TrainSettings | None = None, resume: str | os.PathLike | None = None,
          on_step: Callable[[int], None] | None = None, task: Task | None = None,
          **overrides) -> TrainResult:
    """Train (or, with ``resume`` = a run folder or its last.pt, continue a run exactly).

    ``overrides`` (``settings.RESUMABLE``: workers, progress, device, precision, ...) may
    change how a resumed run executes, never what it computes up to where it was going;
    ``epochs`` may extend it. ``on_step(global_step)`` is called after each step. ``task``:
    what the run learns (default: classification; a resumed run's must be of its kind). The
    run folder is locked throughout (``runfolder``); resuming a finished run changes nothing.
    """
    t_start = time.perf_counter()
    settings, resume = name_run(settings, resume)
    folder = Path(settings.out) if resume is None else checkpoint_path(resume).parent
    command = (task or Task()).command  # what continues this run, in the folder's messages
    with hold_run_folder(folder, resume is not None, command), sigterm_stops():
        s, ckpt = settings_and_checkpoint(settings, resume, overrides)
        task = (task or Task()).resumed(ckpt) if ckpt else task
        done = None if ckpt is None else check_resumed(s, ckpt, checkpoint_path(resume))
        return done or run_training(s, ckpt, on_step, t_start, task)


def check_resumed(s: TrainSettings, ckpt: dict, path: Path) -> TrainResult | None:
    """A resumed run's best.pt mended if a kill left it behind (main process); the run's
    result, unchanged, if it is finished."""
    main = distributed.env_info().is_main
    note = repair_best(ckpt, path) if main else None
    if note:
        print(note, flush=True)
    why = finished(s, ckpt)
    if why is None:
        return None
    if main:
        print(why, flush=True)
    return TrainResult(path.parent, "already finished", ckpt["epoch"], ckpt["best_top1_err"],
                       ckpt["best_top5_err"], 0.0, list(ckpt["metrics"]), s)


def run_training(s: TrainSettings, ckpt: dict | None, on_step: Callable[[int], None] | None,
                 t_start: float, task: Task | None = None) -> TrainResult:
    """Check, set up, then alternate ``train_epoch`` and ``end_of_epoch``; the report at the
    end."""
    checked = check_run(s, ckpt)
    log = RunLog(Path(s.out), enabled=checked.info.is_main,
                 history=list(ckpt["metrics"]) if ckpt else [])
    status = "finished"
    with distributed.leave_group_after():
        try:
            run, state = start_run(s, ckpt, checked, log, task)
            log.message(run.describe())
            log.saved_at = time.perf_counter()
            with StopRequest(abandon=checked.info.world_size == 1) as stop:
                while state.epoch < s.epochs:
                    if train_epoch(state, run, stop, on_step):
                        status = "interrupted"
                        break
                    event = end_of_epoch(state, run, stop)
                    if event in ("stop", "interrupted"):
                        status = "stopped" if event == "stop" else "interrupted"
                        break
                    if state.epoch < s.epochs and stopped_after_epoch(state, run, stop):
                        status = "interrupted"
                        break
            result = TrainResult(run.folder, status, state.epoch, state.best_top1_err,
                                 state.best_top5_err, time.perf_counter() - t_start, state.history,
                                 s)
            if status != "interrupted":
                log.plots(state.history, f"{run.folder.name}: {run.config.label}",
                          run.task.plots)
                log.write_text("report.md", run.task.report(result, run))
        finally:
            log.close()
    return result


def train_command(c: TrainCommand) -> int:
    """``vggnet train``: launch torchrun (``--nproc``), resume, or start a run from a preset
    and the options given; exit code 130 when interrupted (the run can be resumed)."""
    if c.nproc and "RANK" not in os.environ:  # torchrun runs this command nproc times
        return distributed.launch(c.argv, c.nproc, c.nnodes, c.rdzv_endpoint, c.max_restarts)
    if c.resume:
        result = train(resume=c.resume, **c.given)
    elif not c.given.get("data"):
        raise ValueError("--data DIR is required (a folder with train/ and val/; "
                         "`vggnet data make DIR` writes the built-in dataset)")
    else:
        result = train(make_settings(c.preset, **c.given))
    if result.status == "interrupted":
        return 130
    if distributed.env_info().is_main and result.status != "already finished":
        print(f"{result.status} after {result.epochs} epoch(s), {result.seconds / 60:.1f} min: "
              f"best val top-1 error {100 * result.best_top1_err:.2f}%, top-5 "
              f"{100 * result.best_top5_err:.2f}%; run folder {result.folder} (report.md)")
    return 0


def stopped_after_epoch(state: TrainState, run: Run, stop: StopRequest) -> bool:
    """A stop requested during the epoch-end save ends the run here: the epoch's checkpoint
    is saved already, so it costs no further step and no further save."""
    stopped, = distributed.agree(stop.requested, device=run.runtime.device)
    if stopped:
        run.log.message(f"stopped after epoch {state.epoch}; {run.folder / 'last.pt'} holds its "
                        f"end\nresume with: {run.task.command} --resume {run.folder}")
    return stopped


class StepAbandoned(BaseException):
    """A stop arrived while a step (or a validation) was interruptible: it is dropped.
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""


class StopRequest:
    """Ctrl-C or SIGTERM: save the last finished step and exit. With ``abandon`` (one
    process), the step under way is abandoned at once (``interruptible``), so a stop takes
    seconds even when a step takes minutes; with several processes, which must agree, the
    step is finished first. A second Ctrl-C stops at once."""

    def __init__(self, abandon: bool = False) -> None:
        self.requested = False
        self.abandon = abandon
        self._armed = False
        self._old: dict = {}

    def __enter__(self) -> StopRequest:
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        now = self._armed
        print(f"\n{signal.Signals(signum).name}: "
              + ("abandoning this step, saving the last finished one" if now else
                 "finishing this step, then saving") + " (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)
        if now:
            raise StepAbandoned

    @contextmanager
    def interruptible(self):
        """Within: a stop abandons the work at once (raises ``StepAbandoned``) if ``abandon``,
        and if one was requested already. The caller undoes what the work changed."""
        if not self.abandon:
            yield
            return
        if self.requested:
            raise StepAbandoned
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def training_report(r: TrainResult, run: Run) -> str:
    """report.md of a run: data, model, recipe, time, and its best and last errors."""
    from .info import summarize

    s, config, dataset, bad = run.settings, run.config, run.dataset, run.checked.bad
    params = summarize(config)["params"]
    last = r.history[-1] if r.history else {}
    drops = sum(1 for h in r.history if h["event"] == "dropped")
    lines = [
        f"# Training report: {config.label}",
        "",
        f"- Data: `{s.data}` ({dataset.layout}): {len(dataset.train):,} training and "
        f"{len(dataset.val):,} validation images, {len(dataset.class_names)} classes"
        + (f"; {len(bad)} bad file(s) skipped (bad_files.txt)" if bad else ""),
        f"- Model: {config.label}, width {s.width:g}, crop {s.crop_size}, {params:,} parameters, "
        f"init {s.init}" + (f", initialised from `{s.init_from}`" if s.init_from else ""),
        f"- Recipe (preset `{s.preset}`): SGD momentum {s.momentum}, weight decay "
        f"{s.weight_decay:g}, dropout {s.dropout}, batch {s.batch_size}, lr {s.lr:g} divided by "
        f"{1 / s.lr_factor:g} on validation plateaus (patience {s.lr_patience}, at most "
        f"{s.lr_drops} drops); S in [{s.scale[0]}, {s.scale[1]}], random crop, flip "
        f"{'on' if s.flip else 'off'}, PCA colour shift std {s.pca_std}; input "
        f"{run.prep.describe()}" + (f"; {run.transfer.describe()}" if run.transfer else ""),
        f"- Run: {r.epochs} epoch(s), {r.status}, {drops} lr drop(s), {r.seconds / 60:.1f} min"
        + (f", {rate(last['images_per_s'])} training images/s in the last epoch" if last else ""),
        "",
        "| | top-1 error | top-5 error |",
        "|---|---|---|",
        f"| best validation (best.pt, centre crop, Q={default_test_scale(s.scale)}) | "
        f"{100 * r.best_top1_err:.2f}% | {100 * r.best_top5_err:.2f}% |",
    ]
    if last:
        lines.append(f"| last epoch validation | {100 * last['val_top1_err']:.2f}% | "
                     f"{100 * last['val_top5_err']:.2f}% |")
        lines.append(f"| last epoch training (augmented crops) | "
                     f"{100 * last['train_top1_err']:.2f}% | |")
    plots = "`loss.png`, `error.png`" + (", `lr.png`" if lr_changed(r.history) else
                                         " (the lr never changed: stated in the loss plot)")
    lines += ["", "Files: `best.pt`, `last.pt` (checkpoints), `metrics.csv`, `metrics.jsonl`, "
              f"`tensorboard/`, {plots}, `settings.json`.", ""]
    return "\n".join(lines)
