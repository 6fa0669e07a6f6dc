"""Training with the paper's recipe (Section 3.1), exactly resumable.

Mini-batch SGD (momentum 0.9, weight decay 5e-4, dropout 0.5 on fc6/fc7) on the multinomial
logistic loss, batch 256, learning rate 1e-2 divided by 10 when the validation top-1 error
stops improving, stopping at the next plateau after the last allowed drop (the paper drops
3 times). One training crop per image per epoch: rescale to S, random crop, flip, colour shift.

The loop is plain functions around one step (``train_step``): the per-process micro-batch
comes from the global batch in one place (``distributed.split_batch``), every process reads
its own share of each global batch (``data.EpochSampler``), metrics are sums reduced across
processes, and everything written to disk goes through ``RunLog`` (rank 0 only). Without
torchrun the same code is a single process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .checkpoint import atomic_save, load_checkpoint
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
from .initialize import copy_matching_layers, init_from_net_a
from .model import VGG, VGGConfig, build, known_fields, resolve_name
from .preprocess import Preprocessing, paper
from .runtime import Runtime, make_runtime
from .transforms import (
    ColorStats,
    EvalTransform,
    TrainTransform,
    compute_stats,
    default_test_scale,
    device_batch,
)

CHECKPOINT_FORMAT = "vggnet.checkpoint/1"


# --- settings -------------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    """Everything that defines a run; stored in its checkpoints as "train_settings"."""

    data: str = ""
    out: str | None = None  # run folder; default runs/<model>-<preset>-<date>
    preset: str = "paper"
    val_labels: str | None = None
    # model
    model: str = "A"
    batch_norm: bool = False
    width: float = 1.0
    crop_size: int = 224
    dropout: float = 0.5
    init: str = "glorot"  # "paper" is N(0, 0.01); Glorot trains deep nets without pre-training
    init_from: str | None = None  # run folder or checkpoint/weights file (stage chaining)
    # input
    scale: tuple[int, int] = (256, 256)  # (Smin, Smax); equal for a fixed S
    flip: bool = True
    pca_std: float = 0.1
    stats_images: int = 10_000  # training images read for mean RGB and colour PCA
    # optimisation
    batch_size: int = 256  # global batch, over all processes and accumulation steps
    micro_batch: int | None = None  # images per forward pass; None: the whole per-process batch
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_factor: float = 0.1
    lr_patience: int = 2  # epochs without a better val top-1 before the lr drops
    lr_drops: int = 3  # after this many drops, the next plateau ends training
    min_improvement: float = 1e-4  # val top-1 error must fall by this much to count
    epochs: int = 74  # at most
    seed: int = 0
    # runtime
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    workers: int | None = None  # loader processes; None: cores - 1 (at most 16)
    skip_bad: bool = False
    scan: bool = True  # decode-check every file before training
    save_every_min: float = 30.0  # also save last.pt mid-epoch this often
    progress: bool = True
    # data parallelism (torchrun / --nproc): see distributed.py
    dist_timeout_s: float = 600.0  # a collective waiting longer fails: a hung rank cannot stall the run
    bucket_mb: float = 25.0  # DDP gradient bucket size
    grad_compression: str = "none"  # "bf16"/"fp16": gradients all-reduced in half precision
    sync_bn: bool = False  # SyncBatchNorm across GPUs for the _bn models
    max_skips: int = 3  # consecutive non-finite steps (skipped by every rank) before the run halts

    def __post_init__(self) -> None:
        self.scale = tuple(int(s) for s in self.scale)
        if len(self.scale) != 2 or not self.crop_size <= self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be [Smin, Smax] with crop_size ({self.crop_size}) <= Smin <= "
                             f"Smax, got {list(self.scale)}; the paper uses 256, 384 or [256, 512] for "
                             "crop 224")
        resolve_name(self.model)
        if self.grad_compression not in ("none", "bf16", "fp16"):
            raise ValueError(f"grad_compression must be none, bf16 or fp16, got {self.grad_compression!r}")
        for name in ("batch_size", "epochs", "lr_patience", "max_skips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch!r}")
        if not self.lr > 0 or not 0 < self.lr_factor < 1 or self.lr_drops < 0:
            raise ValueError(f"need lr > 0, 0 < lr_factor < 1 and lr_drops >= 0; got lr={self.lr}, "
                             f"lr_factor={self.lr_factor}, lr_drops={self.lr_drops}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["scale"] = list(self.scale)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainSettings:
        return cls(**known_fields(cls, d, "training settings"))


# The paper's recipe, and the same recipe scaled down for CPUs and small datasets: the ratios
# are kept (crop / S = 224 / 256, jitter range [S, 2S], 5 pools, 3 FC layers, dropout), and so
# are batch 256 and lr 1e-2: a smaller batch at the same lr (4x the step noise per image) kills
# most fc6/fc7 ReLUs in the first epochs of a narrow net, and the run never leaves chance level.
# Small datasets have few steps per epoch and a long initial plateau, hence more patience.
PRESETS: dict[str, dict] = {
    "paper": dict(width=1.0, crop_size=224, scale=(256, 256), batch_size=256, lr=1e-2, epochs=74,
                  lr_patience=2, lr_drops=3, stats_images=10_000),
    "reduced": dict(width=0.125, crop_size=64, scale=(73, 73), batch_size=256, lr=1e-2, epochs=30,
                    lr_patience=5, lr_drops=3, stats_images=2_000),
}


def make_settings(preset: str = "paper", **overrides) -> TrainSettings:
    """A preset's settings with ``overrides`` (None values are ignored: "not given")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[preset], preset=preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainSettings(**values)


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


# --- one step, one evaluation ------------------------------------------------------------------
def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 hits, top-5 hits) of (N, classes) logits; top-5 is top-k for fewer classes."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return hits[:, 0].sum(), hits.any(1).sum()


def _no_sync(model: nn.Module, last: bool):
    """DDP's gradient all-reduce only on the last micro-batch of a step."""
    return nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Iterable[Batch],
               per_process_batch: int, runtime: Runtime, prep: Preprocessing, stats: ColorStats,
               scaler: torch.amp.GradScaler | None = None, poison: bool = False) -> tuple[torch.Tensor, bool]:
    """One SGD step on this process's share of a global batch, in micro-batches.

    Each micro-batch adds sum-of-losses / per_process_batch to the gradients, so the step
    equals one on the whole batch (DDP then averages the processes' equal shares). A
    non-finite loss or gradient on any process skips the step on every process (one agreed
    flag), leaving weights and optimizer state as they were. ``poison`` makes the loss NaN
    (fault injection). Returns (float64 sums [loss, top-1 hits, top-5 hits, images] on the
    device, skipped).
    """
    micro_batches = list(micro_batches)
    optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)
    for i, batch in enumerate(micro_batches):
        images = runtime.input(batch.images)
        labels = batch.labels.to(runtime.device, non_blocking=True)
        alpha = batch.alpha.to(runtime.device, non_blocking=True)
        x = device_batch(images, prep, alpha=alpha, stats=stats)
        with _no_sync(model, i == len(micro_batches) - 1):
            with runtime.autocast():
                logits = model(x)
            loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
            if poison:
                loss_sum = loss_sum * float("nan")
            loss = loss_sum / per_process_batch
            (scaler.scale(loss) if scaler is not None else loss).backward()
        top1, top5 = count_correct(logits.detach(), labels)
        totals += torch.stack([loss_sum.detach().double(), top1.double(), top5.double(),
                               torch.tensor(float(len(labels)), dtype=torch.float64, device=runtime.device)])
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


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], runtime: Runtime, prep: Preprocessing) -> dict:
    """Loss and top-1/top-5 error over ``batches`` (summed over processes). Images that failed
    to decode (label -1) are left out and listed under "bad"."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)
    bad: list[str] = []
    for batch in batches:
        bad.extend(batch.bad)
        keep = batch.labels >= 0
        if not keep.any():
            continue
        images = runtime.input(batch.images[keep])
        labels = batch.labels[keep].to(runtime.device)
        with runtime.autocast():
            logits = model(device_batch(images, prep)).float()
        top1, top5 = count_correct(logits, labels)
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), top1.double(),
                               top5.double(), torch.tensor(float(len(labels)), dtype=torch.float64,
                                                           device=runtime.device)])
    model.train(was_training)
    loss, top1, top5, n = distributed.all_reduce_sum(totals).tolist()
    if n == 0:
        raise ValueError("no validation image could be decoded; run `vggnet data check`")
    return {"loss": loss / n, "top1_err": 1 - top1 / n, "top5_err": 1 - top5 / n, "images": int(n),
            "bad": bad}


# --- what a run writes (rank 0 only) --------------------------------------------------------------
METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_top1_err", "val_loss", "val_top1_err",
                  "val_top5_err", "images_per_s", "epoch_s", "bad_files", "skipped_steps", "event")


class RunLog:
    """The run folder: checkpoints, metrics (CSV, JSONL, TensorBoard), plots and the report.
    Every write of a run goes through here; on ranks other than 0 every method does nothing."""

    def __init__(self, folder: Path, enabled: bool = True, history: list[dict] | None = None) -> None:
        self.folder, self.enabled = folder, enabled
        self.tb = None
        if not enabled:
            return
        # metrics files are rewritten from the checkpoint's history, so a resumed run has
        # exactly one row per finished epoch whatever happened after the last save
        history = history or []
        with open(folder / "metrics.csv", "w") as f:
            f.write(",".join(METRIC_COLUMNS) + "\n")
            f.writelines(self._csv_row(r) for r in history)
        with open(folder / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(folder / "tensorboard"),
                                purge_step=history[-1]["epoch"] + 1 if history else None)

    @staticmethod
    def _csv_row(row: dict) -> str:
        return ",".join("" if row.get(c) is None else str(row[c]) for c in METRIC_COLUMNS) + "\n"

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def save(self, name: str, checkpoint: dict) -> None:
        if self.enabled:
            atomic_save(checkpoint, self.folder / name)

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            (self.folder / name).write_text(text)

    def epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.folder / "metrics.csv", "a") as f:
            f.write(self._csv_row(row))
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for key in ("lr", "train_loss", "train_top1_err", "val_loss", "val_top1_err", "val_top5_err",
                    "images_per_s"):
            group = "train" if key.startswith("train") else "val" if key.startswith("val") else "run"
            self.tb.add_scalar(f"{group}/{key.split('_', 1)[1] if group != 'run' else key}",
                               row[key], row["epoch"])
        self.tb.flush()

    def plots(self, history: list[dict]) -> list[Path]:
        if not self.enabled or not history:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ep = [r["epoch"] for r in history]
        out = []
        for name, series, ylabel, log in (
            ("loss", [("train", "train_loss"), ("val", "val_loss")], "cross-entropy loss", False),
            ("error", [("train top-1", "train_top1_err"), ("val top-1", "val_top1_err"),
                       ("val top-5", "val_top5_err")], "error (%)", False),
            ("lr", [("learning rate", "lr")], "learning rate", True),
        ):
            fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
            for label, key in series:
                scale = 100 if name == "error" else 1
                ax.plot(ep, [r[key] * scale for r in history], marker="o", ms=3, label=label)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(self.folder / f"{name}.png")
            plt.close(fig)
            out.append(self.folder / f"{name}.png")
        return out

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --- setting a run up: every check before any work --------------------------------------------
def prepare_folder(out: Path, resuming: bool) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to the output folder {str(out)!r} ({type(e).__name__}: "
                         f"{e.strerror or e}); choose another --out") from None
    if not resuming and (out / "last.pt").exists():
        raise ValueError(f"{str(out)!r} already holds a run (last.pt); continue it with "
                         f"`vggnet train --resume {out}`, or choose another --out")
    return out


def prepare_data(s: TrainSettings, info: distributed.DistInfo,
                 say: Callable[[str], None] = print) -> tuple[Dataset, list[BadFile]]:
    """List the dataset (layout errors raise here), scan every file, refuse or skip bad ones."""
    dataset = open_dataset(s.data, s.val_labels)
    bad: list[BadFile] = []
    if s.scan:
        t = time.perf_counter()
        bad = distributed.broadcast_object(
            scan(dataset.train.paths + dataset.val.paths) if info.is_main else None, info)
        say(f"scanned {len(dataset.train) + len(dataset.val):,} files in "
                    f"{time.perf_counter() - t:.1f} s: {len(bad)} bad")
    if bad and not s.skip_bad:
        raise ValueError(f"{len(bad)} file(s) in {s.data!r} cannot be decoded; training did not start:\n"
                         f"{format_bad(bad)}\nfix or remove them, or pass --skip-bad to train without them")
    if bad:
        paths = {b.path for b in bad}
        dataset = Dataset(dataset.root, dataset.train.without(paths), dataset.val.without(paths),
                          dataset.layout)
        empty = [c for c, n in zip(dataset.class_names, dataset.train.counts(), strict=True) if n == 0]
        if empty:
            raise ValueError(f"after skipping bad files, training class(es) {empty} have no images left")
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
        raise FileNotFoundError(f"{str(p)!r} is neither a run folder nor a checkpoint/weights file")
    return p


def init_from(model: VGG, source: str | os.PathLike) -> tuple[str, dict]:
    """Stage chaining: net A into a deeper net (the paper's layers), anything else by matching
    layer names and shapes. Returns (summary, the source's metadata)."""
    from .weights import read_file

    path = resolve_checkpoint(source)
    state, meta = read_file(path)
    src = VGGConfig.from_dict(meta["model_config"]) if meta.get("model_config") else None
    if src is not None and src.arch in ("A", "A-LRN") and model.config.arch not in ("A", "A-LRN"):
        copied = init_from_net_a(model, state)
        return f"initialised from net A {path}: {', '.join(copied)} (the rest random)", meta
    report = copy_matching_layers(model, state)
    if not report.copied:
        raise ValueError(f"nothing in {str(path)!r} fits this {model.config.name} net:\n{report.summary()}")
    return f"initialised from {path}:\n{report.summary()}", meta


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores - 1))


@dataclass
class TrainResult:
    folder: Path
    status: str  # "finished", "stopped" (plateau after the last lr drop), "interrupted"
    epochs: int
    best_top1_err: float
    best_top5_err: float
    seconds: float
    history: list[dict] = field(default_factory=list)


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current step, save, exit. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
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
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --- the run ---------------------------------------------------------------------------------------
def train(settings: TrainSettings | None = None, resume: str | os.PathLike | None = None,
          on_step: Callable[[int], None] | None = None, **runtime_overrides) -> TrainResult:
    """Train (or, with ``resume`` = a run folder or its last.pt, continue a run exactly).

    ``runtime_overrides`` (workers, progress, device, precision, ...) may change how a resumed
    run executes, never what it computes up to where it was going; ``epochs`` may extend it.
    ``on_step(global_step)`` is called after each step.
    """
    t_start = time.perf_counter()
    ckpt = None
    if resume is None and settings is not None:
        if settings.out is None:
            # under torchrun the run id is the same for every rank and every restart
            tag = os.environ.get("TORCHELASTIC_RUN_ID", "")[:8] or time.strftime("%Y%m%d-%H%M%S")
            settings.out = str(Path("runs") / f"{settings.model}-{settings.preset}-{tag}")
        if distributed.restarted() and (Path(settings.out) / "last.pt").is_file():
            resume = Path(settings.out) / "last.pt"  # torchrun restarted the group: continue
    if resume is not None:
        path = Path(resume) / "last.pt" if Path(resume).is_dir() else Path(resume)
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{str(path)!r} is not a vggnet training checkpoint (format "
                             f"{ckpt.get('format')!r}); --resume takes a run folder or its last.pt")
        d = dict(ckpt["train_settings"], **{k: v for k, v in runtime_overrides.items() if v is not None})
        d["out"] = str(path.parent)
        settings = TrainSettings.from_dict(d)
    elif settings is None:
        raise ValueError("train() needs settings or resume")
    s = settings
    runtime = make_runtime(s.device, s.precision, s.channels_last, s.compile)
    if s.sync_bn and runtime.device.type != "cuda":
        raise ValueError("--sync-bn synchronises batch norm across GPUs (NCCL); it needs CUDA, "
                         f"this run is on {runtime.device}")
    info = distributed.init_distributed(runtime.device, s.dist_timeout_s)
    folder = Path(s.out)
    created = not folder.exists()
    if info.is_main:
        prepare_folder(folder, resuming=ckpt is not None)
    say = print if info.is_main else (lambda *a, **k: None)
    try:  # every check before anything is written or computed
        if ckpt is None and s.init_from:
            resolve_checkpoint(s.init_from)
        dataset, bad = prepare_data(s, info, say)
        if ckpt is not None and ckpt["class_names"] != dataset.class_names:
            raise ValueError(f"the dataset's classes changed since the checkpoint was written "
                             f"({len(ckpt['class_names'])} then, {len(dataset.class_names)} now); resume "
                             "on the same data")
        micro, accum = distributed.split_batch(s.batch_size, info.world_size, s.micro_batch)
        if len(dataset.train) < s.batch_size:
            raise ValueError(f"the training set has {len(dataset.train)} images, fewer than one batch "
                             f"of {s.batch_size}; lower --batch-size")
    except BaseException:
        if created and info.is_main and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    history = list(ckpt["metrics"]) if ckpt else []
    log = RunLog(folder, enabled=info.is_main, history=history)
    with distributed.leave_group_after():
        try:
            return _run(s, ckpt, runtime, info, log, history, dataset, bad, micro, accum, on_step, t_start)
        finally:
            log.close()


def _run(s: TrainSettings, ckpt: dict | None, runtime: Runtime, info: distributed.DistInfo, log: RunLog,
         history: list[dict], dataset: Dataset, bad: list[BadFile], micro: int, accum: int, on_step,
         t_start: float) -> TrainResult:
    folder = Path(s.out)
    steps_per_epoch = len(dataset.train) // s.batch_size

    arch, bn = resolve_name(s.model)
    config = VGGConfig(arch=arch, num_classes=len(dataset.class_names), batch_norm=bn or s.batch_norm,
                       width=s.width, crop_size=s.crop_size, dropout=s.dropout)
    model = build(config, init=s.init, seed=s.seed)
    source_meta: dict = {}
    if ckpt is None and s.init_from:
        summary, source_meta = init_from(model, s.init_from)
        log.message(summary)

    if ckpt is not None:
        stats = ColorStats.from_dict(ckpt["stats"])
    elif source_meta.get("stats"):
        stats = ColorStats.from_dict(source_meta["stats"])
        log.message(f"colour statistics of {s.init_from} reused: mean RGB "
                    f"{[round(v, 2) for v in stats.mean_rgb]}")
    else:
        t = time.perf_counter()
        stats = distributed.broadcast_object(
            compute_stats(dataset.train.paths, s.scale[0], s.stats_images) if info.is_main else None, info)
        log.message(f"mean RGB {[round(v, 2) for v in stats.mean_rgb]}, colour PCA eigenvalues "
                    f"{[f'{v:.2e}' for v in stats.eigval]} from {stats.images} training images "
                    f"({time.perf_counter() - t:.1f} s)")
    prep = paper(stats.mean_rgb)

    model.train()
    if s.sync_bn and info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = distributed.wrap_ddp(runtime.prepare(model), info, runtime.device, s.bucket_mb, s.grad_compression)
    optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
                                **runtime.optimizer_options())
    schedule = PlateauSchedule(s.lr, s.lr_factor, s.lr_patience, s.lr_drops, s.min_improvement)
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.needs_grad_scaler else None
    epoch, epoch_step, step = 0, 0, 0
    progress = {"totals": [0.0] * 4, "seconds": 0.0, "bad": [], "skipped": 0}
    best = {"top1_err": math.inf, "top5_err": math.inf}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("grad_scaler"):
            scaler.load_state_dict(ckpt["grad_scaler"])
        epoch, epoch_step, step = ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]
        progress = ckpt["epoch_progress"]
        best = {"top1_err": ckpt["best_top1_err"], "top5_err": ckpt["best_top5_err"]}
        torch.set_rng_state(ckpt["rng"]["torch"])
        if runtime.device.type == "cuda" and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        log.message(f"resuming {folder} at epoch {epoch + 1}, step {epoch_step}/{steps_per_epoch}")
    else:
        torch.manual_seed(s.seed)  # dropout masks
        log.write_text("settings.json", json.dumps(s.to_dict(), indent=1) + "\n")
        if bad:
            log.write_text("bad_files.txt", "".join(f"{b}\n" for b in bad))

    def checkpoint() -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "model_config": config.to_dict(), "model": model.state_dict(),
            "preprocessing": prep.to_dict(), "class_names": dataset.class_names,
            "train_settings": s.to_dict(), "stats": stats.to_dict(),
            "epoch": epoch, "epoch_step": epoch_step, "step": step, "epoch_progress": progress,
            "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if runtime.device.type == "cuda" else []},
            "metrics": history, "best_top1_err": best["top1_err"], "best_top5_err": best["top5_err"],
        }

    workers = s.workers if s.workers is not None else default_workers()
    q = default_test_scale(s.scale)
    train_images = TrainImages(dataset.train.samples, TrainTransform(s.scale, s.crop_size, s.flip, s.pca_std),
                               seed=s.seed)
    val_samples = [dataset.val.samples[i] for i in distributed.shard(len(dataset.val), info)]
    val_images = EvalImages(val_samples, EvalTransform(q, s.crop_size))
    pin = runtime.device.type == "cuda"
    log.message(f"training VGG {config.name} (width {s.width:g}, crop {s.crop_size}, S in "
                f"[{s.scale[0]}, {s.scale[1]}], Q={q}) on {len(dataset.train):,} images of "
                f"{len(dataset.class_names)} classes, {runtime.device} "
                f"{runtime.amp_dtype or 'fp32'}; batch {s.batch_size} = {info.world_size} process(es) x "
                f"{accum} x {micro}; {steps_per_epoch} steps/epoch; {workers} loader worker(s)")

    status = "finished"
    skips = 0  # consecutive skipped steps
    last_save = time.perf_counter()
    with StopRequest() as stop:
        while epoch < s.epochs:
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr
            sampler = EpochSampler(len(train_images), s.batch_size, s.seed, epoch, info.rank,
                                   info.world_size, start_step=epoch_step)
            batches = iter(make_loader(train_images, micro, workers, sampler, pin_memory=pin))
            bar = _progress_bar(s.progress and info.is_main, steps_per_epoch, epoch_step, epoch, s.epochs)
            t_epoch = time.perf_counter()
            images_done = 0
            interrupted = False
            while epoch_step < steps_per_epoch:
                fault = distributed.injected_fault(info, step + 1)
                micro_batches = [next(batches) for _ in range(accum)]
                totals, skipped = train_step(net, optimizer, micro_batches, micro * accum, runtime, prep, stats,
                                             scaler, poison=fault == "nan")
                totals = distributed.all_reduce_sum(totals).tolist()
                if skipped:
                    skips += 1
                    progress["skipped"] += 1
                    log.message(f"epoch {epoch + 1}, step {epoch_step + 1}: non-finite loss or gradient "
                                f"(loss {totals[0]}); step skipped on every process ({skips}/{s.max_skips})")
                    if skips >= s.max_skips:
                        raise FloatingPointError(
                            f"{skips} consecutive steps had a non-finite loss or gradient (epoch {epoch + 1}, "
                            f"step {epoch_step + 1}); training halted. The last good checkpoint is "
                            f"{folder / 'last.pt'}; lower --lr (now {schedule.lr:g}) or use --batch-norm, "
                            f"then start again from it with --init-from")
                    totals = [0.0] * 4  # nothing learnt from this batch
                else:
                    skips = 0
                progress["totals"] = [a + b for a, b in zip(progress["totals"], totals, strict=True)]
                progress["bad"] += [b for mb in micro_batches for b in mb.bad]
                epoch_step += 1
                step += 1
                images_done += int(totals[3])
                if bar is not None:
                    t_sum = progress["totals"]
                    bar.update(1)
                    bar.set_postfix(loss=f"{t_sum[0] / max(t_sum[3], 1):.3f}", acc=f"{t_sum[1] / max(t_sum[3], 1):.3f}",
                                    img_s=f"{images_done / (time.perf_counter() - t_epoch):.0f}")
                if on_step is not None:
                    on_step(step)
                stop_now, = distributed.agree(stop.requested, device=runtime.device)
                if stop_now:
                    interrupted = True
                    break
                if time.perf_counter() - last_save > 60 * s.save_every_min and epoch_step < steps_per_epoch:
                    progress["seconds"] += time.perf_counter() - t_epoch
                    t_epoch, images_done = time.perf_counter(), 0
                    log.save("last.pt", checkpoint())
                    last_save = time.perf_counter()
            del batches  # ends its worker processes now
            if bar is not None:
                bar.close()
            progress["seconds"] += time.perf_counter() - t_epoch
            if interrupted:
                log.save("last.pt", checkpoint())
                log.message(f"stopped at epoch {epoch + 1}, step {epoch_step}/{steps_per_epoch}; saved "
                            f"{folder / 'last.pt'}\nresume with: vggnet train --resume {folder}")
                status = "interrupted"
                break

            val = evaluate(net, make_loader(val_images, 2 * micro, workers, pin_memory=pin), runtime, prep)
            loss_sum, top1, _, n = progress["totals"]
            lr_used = schedule.lr
            event = schedule.step(val["top1_err"])
            epoch_bad = progress["bad"] + val["bad"]
            row = {"epoch": epoch + 1, "step": step, "lr": lr_used, "train_loss": loss_sum / n if n else math.nan,
                   "train_top1_err": 1 - top1 / n if n else math.nan, "val_loss": val["loss"], "val_top1_err": val["top1_err"],
                   "val_top5_err": val["top5_err"], "images_per_s": n / max(progress["seconds"], 1e-9),
                   "epoch_s": progress["seconds"], "bad_files": len(epoch_bad), "skipped_steps": progress["skipped"],
                   "event": event}
            history.append(row)
            epoch, epoch_step = epoch + 1, 0
            progress = {"totals": [0.0] * 4, "seconds": 0.0, "bad": [], "skipped": 0}
            improved = event == "improved"
            if improved:
                best = {"top1_err": val["top1_err"], "top5_err": val["top5_err"]}
            ckpt_now = checkpoint()
            log.save("last.pt", ckpt_now)
            if improved:
                log.save("best.pt", ckpt_now)
            last_save = time.perf_counter()
            log.epoch(row)
            log.message(_epoch_line(row, s.epochs) + (f"\n  decode failures this epoch (skipped):\n"
                                                      f"{format_bad(epoch_bad, 10)}" if epoch_bad else ""))
            if event == "stop":
                status = "stopped"
                log.message(f"validation error stopped improving after {schedule.drops} lr drop(s): done")
                break

    result = TrainResult(folder, status, epoch, best["top1_err"], best["top5_err"],
                         time.perf_counter() - t_start, history)
    if status != "interrupted":
        log.plots(history)
        log.write_text("report.md", training_report(result, s, config, dataset, bad, stats))
    return result


def _progress_bar(enabled: bool, total: int, done: int, epoch: int, epochs: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                dynamic_ncols=True, leave=False, file=sys.stderr)


def _epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.0e}  train loss {row['train_loss']:.3f} "
            f"top-1 err {100 * row['train_top1_err']:5.1f}%  |  val loss {row['val_loss']:.3f} top-1 err "
            f"{100 * row['val_top1_err']:5.1f}% top-5 err {100 * row['val_top5_err']:5.1f}%  |  "
            f"{row['images_per_s']:.0f} img/s, {row['epoch_s']:.0f} s  {row['event']}")


def training_report(r: TrainResult, s: TrainSettings, config: VGGConfig, dataset: Dataset,
                    bad: list[BadFile], stats: ColorStats) -> str:
    from .info import summarize

    params = summarize(config)["params"]
    last = r.history[-1] if r.history else {}
    drops = sum(1 for h in r.history if h["event"] == "dropped")
    lines = [
        f"# Training report: VGG {config.name}",
        "",
        f"- Data: `{s.data}` ({dataset.layout}): {len(dataset.train):,} training and "
        f"{len(dataset.val):,} validation images, {len(dataset.class_names)} classes"
        + (f"; {len(bad)} bad file(s) skipped (bad_files.txt)" if bad else ""),
        f"- Model: {config.name}, width {s.width:g}, crop {s.crop_size}, {params:,} parameters, "
        f"init {s.init}" + (f", initialised from `{s.init_from}`" if s.init_from else ""),
        f"- Recipe (preset `{s.preset}`): SGD momentum {s.momentum}, weight decay {s.weight_decay:g}, "
        f"dropout {s.dropout}, batch {s.batch_size}, lr {s.lr:g} divided by {1 / s.lr_factor:g} on "
        f"validation plateaus (patience {s.lr_patience}, at most {s.lr_drops} drops); S in "
        f"[{s.scale[0]}, {s.scale[1]}], random crop, flip {'on' if s.flip else 'off'}, PCA colour "
        f"shift std {s.pca_std}; mean RGB {[round(v, 1) for v in stats.mean_rgb]} subtracted",
        f"- Run: {r.epochs} epoch(s), {r.status}, {drops} lr drop(s), {r.seconds / 60:.1f} min"
        + (f", {last['images_per_s']:.0f} training images/s in the last epoch" if last else ""),
        "",
        "| | top-1 error | top-5 error |",
        "|---|---|---|",
        f"| best validation (best.pt, centre crop, Q={default_test_scale(s.scale)}) | "
        f"{100 * r.best_top1_err:.2f}% | {100 * r.best_top5_err:.2f}% |",
    ]
    if last:
        lines.append(f"| last epoch validation | {100 * last['val_top1_err']:.2f}% | "
                     f"{100 * last['val_top5_err']:.2f}% |")
        lines.append(f"| last epoch training (augmented crops) | {100 * last['train_top1_err']:.2f}% | |")
    lines += ["", "Files: `best.pt`, `last.pt` (checkpoints), `metrics.csv`, `metrics.jsonl`, "
              "`tensorboard/`, `loss.png`, `error.png`, `lr.png`, `settings.json`.", ""]
    return "\n".join(lines)
