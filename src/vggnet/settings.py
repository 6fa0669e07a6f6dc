"""What every command can be told: one frozen, validated dataclass per command or concern.

Each field's metadata (``fields.option``) holds its help text and choices; ``vggnet.cli``
generates every command-line option from these classes alone, so a setting is named,
defaulted, documented and checked in one place. The library takes the same objects.
A class's docstring is its command's ``--help`` description.

Light on purpose (no torch, no numpy): ``vggnet --help`` and ``vggnet train --help`` read
this module and nothing heavy.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .fields import known_fields, nested, option
from .protocol import (
    FINETUNE,
    INIT_SCHEMES,
    LOCALISATION_PRESETS,
    LOCALISATION_PROTOCOLS,
    METHODS,
    PASSES,
    PRESETS,
    REGRESSIONS,
)

# the choices of the settings below, each defined here once
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
GRAD_COMPRESSIONS = ("none", "bf16", "fp16")
EXPORT_FORMATS = ("onnx", "torchscript")
POOLINGS = ("mac", "spoc", "gem", "rmac")  # retrieval descriptors (vggnet.retrieval)
# what a resumed run may change: how it executes, never what it computes (and how long it runs);
# data and val_labels: where a moved dataset now is (checked to be the same classes and images)
RESUMABLE = ("workers", "progress", "device", "precision", "channels_last", "compile", "epochs",
             "dist_timeout_s", "bucket_mb", "data", "val_labels")
MODEL_HELP = "A, A-LRN, B, C, D, E or vgg11, vgg13, vgg16, vgg19 (each also with _bn)"


# the options several commands share, made by one function each (a dataclass field can only
# belong to one class)
def device_option():
    return option("auto", "auto (a GPU if there is one), cpu, cuda, cuda:N")


def precision_option():
    return option("auto", "auto: bf16 on GPUs and on CPUs with native bf16 (docs/benchmarks.md),"
                  " else fp32; fp32 for full float32 numbers", choices=PRECISIONS)


def progress_option(group: str | None = None):
    return option(True, "progress bars with the time left, on stderr (--no-progress: none)",
                  group=group)


def weights_option():
    return option(help="vggnet weights file or training checkpoint (import others with "
                  "`vggnet convert`)")


# --- training -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Everything that defines a run; stored in its checkpoints as "train_settings"."""

    data: str = option("", "dataset folder with train/ and val/, or one folder per class with "
                       "--val-split (see `vggnet data check`)")
    out: str | None = option(None, "run folder (default runs/MODEL-PRESET-DATE)")
    preset: str = option("paper", cli=False)  # the command's --preset
    val_labels: str | None = option(None, "labels file of a flat ImageNet val folder")
    # model
    model: str = option("A", MODEL_HELP, group="model")
    batch_norm: bool = option(False, "batch norm after every conv (on for a _bn model)",
                              group="model")
    width: float = option(1.0, "multiplies every conv and FC width", group="model")
    crop_size: int = option(224, "training crop (224 in the paper)", group="model")
    dropout: float = option(0.5, "dropout of fc6 and fc7", group="model")
    init: str = option("glorot", "for layers not initialised from --init-from: glorot, paper "
                       "(N(0, 0.01)) or kaiming (torchvision's)", choices=INIT_SCHEMES,
                       group="model")
    init_from: str | None = option(None, "stage chaining: net A into a deeper net (conv1_1, "
                                   "conv2_1, conv3_1, conv3_2, fc6-8), otherwise every layer whose"
                                   " name and shape match", metavar="RUN_OR_CHECKPOINT",
                                   group="model")
    # fine-tuning (--init-from; `vggnet finetune` sets these)
    transfer_lr_factor: float | None = option(
        None, "lr multiplier of the layers --init-from copies (default: 0.1, the paper's lr/10 "
        "for a net that starts from trained weights; 1 when net A starts a deeper net, as the "
        "paper)", metavar="F", group="fine-tuning")
    freeze_until: str | None = option(None, "keep the copied layers up to this one fixed (e.g. "
                                      "conv4_3; its batch norm too)", metavar="LAYER",
                                      group="fine-tuning")
    new_head: bool = option(False, "fc8 starts afresh (a new classifier) even where the "
                            "source's fits", group="fine-tuning")
    # input
    val_split: float | None = option(None, "DIR is one folder per class (no train/ and val/): "
                                     "hold out this fraction of each class for validation "
                                     "(e.g. 0.1)", metavar="FRACTION", group="input")
    split_seed: int = option(0, "seed of --val-split's choice of files", group="input")
    scale: tuple[int, ...] = option((256, 256), "training scale: S (fixed), or SMIN,SMAX "
                                    "(jittered per image)", metavar="S[,SMAX]", group="input")
    flip: bool = option(True, "random horizontal flips", group="input")
    pca_std: float = option(0.1, "std of the PCA colour shift (0 turns it off)", group="input")
    stats_images: int = option(10_000, "training images read for mean RGB and colour PCA",
                               group="input")
    # optimisation
    batch_size: int = option(256, "global batch, over all processes and accumulation steps",
                             group="optimisation")
    micro_batch: int | None = option(None, "images per forward pass; the step accumulates "
                                     "gradients exactly", group="optimisation")
    lr: float = option(1e-2, "learning rate", group="optimisation")
    momentum: float = option(0.9, "SGD momentum", group="optimisation")
    weight_decay: float = option(5e-4, "L2 penalty", group="optimisation")
    lr_factor: float = option(0.1, "lr multiplier at a plateau", group="optimisation")
    lr_patience: int = option(2, "epochs without a better val top-1 before a drop",
                              group="optimisation")
    lr_drops: int = option(3, "drops allowed; the next plateau stops training",
                           group="optimisation")
    min_improvement: float = option(1e-4, "val top-1 error must fall by this much to count",
                                    group="optimisation")
    epochs: int = option(74, "at most this many epochs", group="optimisation")
    seed: int = option(0, "data order, augmentation, initialisation and dropout",
                       group="optimisation")
    # runtime
    device: str = option("auto", "auto, cpu, cuda, cuda:N", group="runtime")
    precision: str = option("auto", "auto: bf16 where the device computes it natively, else fp32",
                            choices=PRECISIONS, group="runtime")
    channels_last: bool | None = option(None, "channels_last memory format (default: on)",
                                        group="runtime")
    compile: bool = option(False, "torch.compile the model", group="runtime")
    workers: int | None = option(None, "loader processes (default: cores - 1, at most 16)",
                                 group="runtime")
    skip_bad: bool = option(False, "train without the files that fail to decode (default: "
                            "refuse to start)", group="runtime")
    scan: bool = option(True, "decode-check every file before training (--no-scan: bad files"
                        " are skipped as met)", group="runtime")
    save_every_min: float = option(30.0, "also save last.pt mid-epoch this often",
                                   group="runtime")
    progress: bool = progress_option(group="runtime")
    # data parallelism (torchrun / --nproc): see distributed.py
    dist_timeout_s: float = option(600.0, "a collective waiting longer fails: a hung process "
                                   "cannot stall the run", group="data parallel (torchrun)")
    bucket_mb: float = option(25.0, "DDP gradient bucket size in MiB",
                              group="data parallel (torchrun)")
    grad_compression: str = option("none", "all-reduce gradients in half precision (halves the"
                                   " traffic)", choices=GRAD_COMPRESSIONS,
                                   group="data parallel (torchrun)")
    sync_bn: bool = option(False, "SyncBatchNorm across GPUs for the _bn models",
                           group="data parallel (torchrun)")
    max_skips: int = option(3, "consecutive non-finite steps, skipped on every process, before"
                            " the run halts", group="data parallel (torchrun)")

    def __post_init__(self) -> None:
        # the model's names are in model.py (torch); imported here, where settings are made,
        # not for --help. model.py imports nothing from this module.
        from .model import config_for, resolve_name

        # the net's own checks (width, crop size, dropout), before anything is read or written
        config_for(self.model, batch_norm=self.batch_norm, width=self.width,
                   crop_size=self.crop_size, dropout=self.dropout)
        _check_run_values(self)
        scale = tuple(int(s) for s in self.scale)
        if len(scale) > 2:
            raise ValueError(f"--scale takes S (fixed) or SMIN,SMAX (jittered): one or two "
                             f"values, got {len(scale)}: {','.join(map(str, scale))}")
        scale = scale * 2 if len(scale) == 1 else scale  # "S" is the fixed scale [S, S]
        object.__setattr__(self, "scale", scale)
        if len(scale) != 2 or not self.crop_size <= scale[0] <= scale[1]:
            raise ValueError(f"scale must be [Smin, Smax] with crop_size ({self.crop_size}) <= "
                             f"Smin <= Smax, got {list(scale)}; the paper uses 256, 384 or "
                             "[256, 512] for crop 224")
        if resolve_name(self.model)[1]:  # "vgg11_bn" has batch norm: say so in the settings
            object.__setattr__(self, "batch_norm", True)
        if self.grad_compression not in GRAD_COMPRESSIONS:
            raise ValueError(f"grad_compression must be none, bf16 or fp16, got "
                             f"{self.grad_compression!r}")
        for name in ("batch_size", "epochs", "lr_patience", "max_skips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch!r}")
        if not self.lr > 0 or not 0 < self.lr_factor < 1 or self.lr_drops < 0:
            raise ValueError(f"need lr > 0, 0 < lr_factor < 1 and lr_drops >= 0; got lr={self.lr}"
                             f", lr_factor={self.lr_factor}, lr_drops={self.lr_drops}")
        check_fine_tuning(self)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["scale"] = list(self.scale)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainSettings:
        return cls(**known_fields(cls, d, "training settings"))


def _check_run_values(s: TrainSettings) -> None:
    """The values PyTorch would only reject (or misread) once the run has started; the paths
    made absolute, so that the run can be resumed from any folder."""
    if s.workers is not None and (isinstance(s.workers, bool) or s.workers < 0):
        raise ValueError(f"--workers must be >= 0 (0 loads the images in the training process),"
                         f" got {s.workers!r}")
    if not s.pca_std >= 0:  # also NaN
        raise ValueError(f"--pca-std must be >= 0 (the std of the PCA colour shift; 0 turns it "
                         f"off), got {s.pca_std!r}")
    if not s.save_every_min > 0:
        raise ValueError(f"--save-every-min must be > 0 minutes (last.pt is also saved at every "
                         f"epoch end and on Ctrl-C), got {s.save_every_min!r}")
    for name in ("data", "val_labels"):
        if getattr(s, name):
            object.__setattr__(s, name, os.path.abspath(getattr(s, name)))


def check_fine_tuning(s: TrainSettings) -> None:
    """The fine-tuning and split options make sense together (one-line errors)."""
    if s.transfer_lr_factor is not None and not s.transfer_lr_factor > 0:
        raise ValueError(f"--transfer-lr-factor must be > 0 (0.1: the copied layers at lr/10; "
                         f"--freeze-until keeps layers fixed), got {s.transfer_lr_factor!r}")
    given = [f"--{k.replace('_', '-')}" for k in ("transfer_lr_factor", "freeze_until")
             if getattr(s, k) is not None] + (["--new-head"] if s.new_head else [])
    if given and not s.init_from:
        raise ValueError(f"{', '.join(given)} only apply to the layers --init-from copies; give "
                         "--init-from RUN_OR_WEIGHTS (or use `vggnet finetune`)")
    if s.val_split is not None and not 0 < s.val_split < 1:
        raise ValueError(f"--val-split is the fraction of each class held out for validation, "
                         f"between 0 and 1 (e.g. 0.1), got {s.val_split!r}")


def make_settings(preset: str = "paper", **overrides) -> TrainSettings:
    """A preset's settings (``protocol.PRESETS``) with ``overrides`` (None values are ignored:
    "not given")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[preset], preset=preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainSettings(**values)


@dataclass(frozen=True, kw_only=True)
class TrainCommand:
    """Train with the paper's recipe (SGD momentum 0.9, weight decay 5e-4, dropout 0.5, batch
    256, lr 1e-2 divided by 10 on validation plateaus, scale augmentation, flips, PCA colour
    shift). Options not given come from --preset. The first step prints the time per epoch
    and the memory. Ctrl-C or SIGTERM abandons the step under way, saves the last finished
    one as last.pt and says how to resume. Data parallel: `vggnet train --nproc N ...` runs torchrun
    (or run `torchrun --nproc-per-node N -m vggnet train ...` yourself); --batch-size stays the
    global batch."""

    preset: str = option("paper", "paper: the defaults shown (224 crops, S=256, full width); "
                         "reduced: the same ratios at 64 crops (S=73), width 1/8, at most 30 "
                         "epochs, lr patience 5 (vggnet.protocol.PRESETS)",
                         choices=tuple(PRESETS))
    resume: str | None = option(None, "continue the run in this folder (or its last.pt) "
                                "exactly", metavar="RUN")
    given: dict = nested("vggnet.settings:TrainSettings", partial=True)  # options given
    nproc: int | None = option(None, "processes (GPUs) per node; launches torchrun",
                               group="data parallel (torchrun)")
    nnodes: str = option("1", "nodes (or MIN:MAX), with --rdzv-endpoint",
                         group="data parallel (torchrun)")
    rdzv_endpoint: str | None = option(None, "rendezvous of a multi-node run",
                                       metavar="HOST:PORT", group="data parallel (torchrun)")
    max_restarts: int = option(0, "restarts of the group after a failed process; it resumes "
                               "from last.pt", group="data parallel (torchrun)")
    argv: tuple[str, ...] = option((), cli=False)  # the command's arguments, for torchrun


# --- the main job and data ------------------------------------------------------------------------
DATASET_HELP = {"seed": "dataset seed", "train_per_class": "training images per class",
                "val_per_class": "validation images per class",
                "num_classes": "number of classes (2-10)",
                "min_side": "smallest shorter image side", "max_side": "largest shorter image side"}


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """The main job: write the built-in synthetic dataset (reused when there), train vgg11_bn
    (VGG A with batch norm) with the paper's recipe at reduced size (preset 'reduced'),
    evaluate best.pt on the validation split and write a run folder with checkpoints,
    metrics, plots and report.md."""

    data_dir: str = option("data/shapes", "where the dataset goes")
    out: str | None = option(None, "run folder (default runs/demo-DATE)")
    dataset: object = nested("vggnet.synthetic:SyntheticSpec", rename={"num_classes": "classes"},
                             help=DATASET_HELP,
                             only=("seed", "train_per_class", "val_per_class", "num_classes"))
    model: str = option("vgg11_bn", MODEL_HELP)
    epochs: int = option(35, "epochs (see vggnet.demo for the recipe)")
    batch_size: int = option(64, "global batch (see vggnet.demo)")
    width: float | None = option(None, "override the reduced preset's width")
    crop_size: int | None = option(None, "override the reduced preset's crop")
    scale: tuple[int, ...] | None = option(None, "override the training scale: S or SMIN,SMAX",
                                           metavar="S[,SMAX]")
    precision: str | None = option(None, "default: bf16 on a CPU with native bf16, else the "
                                   "runtime's choice", choices=PRECISIONS)
    workers: int | None = option(None, "loader processes (default: cores - 1)")
    progress: bool = progress_option()


@dataclass(frozen=True, kw_only=True)
class MakeDataSettings:
    """Write the built-in dataset: synthetic shapes on cluttered backgrounds, deterministic
    from --seed, as DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg. A complete copy with
    the same settings is reused."""

    dir: str = option(positional=True, help="where the dataset goes")
    dataset: object = nested("vggnet.synthetic:SyntheticSpec", rename={"num_classes": "classes"},
                             help=DATASET_HELP)
    workers: int | None = option(None, "processes (default: all cores)")
    force: bool = option(False, "regenerate even if a copy is there")
    progress: bool = progress_option()


@dataclass(frozen=True, kw_only=True)
class CheckDataSettings:
    """List a dataset (train/ and val/ class folders, ImageNet layouts, or with --val-split one
    folder per class) and decode every file inside a guard; print each bad file with its
    reason. Exit code 1 if any file is bad."""

    dir: str = option(positional=True, help="dataset folder")
    val_labels: str | None = option(None, "labels of a flat val folder (LOC_val_solution.csv or "
                                    "the devkit's ILSVRC2012_validation_ground_truth.txt next "
                                    "to meta.mat)")
    val_split: float | None = option(None, "DIR is one folder per class (no train/ and val/): "
                                     "list it with this fraction of each class held out for "
                                     "validation, as `train --val-split` does (e.g. 0.1)",
                                     metavar="FRACTION")
    split_seed: int = option(0, "seed of --val-split's choice of files")
    workers: int | None = option(None, "decoding threads")
    progress: bool = progress_option()


@dataclass(frozen=True, kw_only=True)
class InfoSettings:
    """Print the layer table of a configuration (or a summary of all): output shapes,
    parameters, multiply-adds and activation memory."""

    model: str | None = option(None, f"{MODEL_HELP}; omit for all", positional="?")
    size: tuple[int, ...] | None = option(None, "input size (default: the crop size); larger "
                                          "sizes run the head densely", metavar="H,W")
    num_classes: int = option(1000, "classifier outputs")
    batch_norm: bool = option(False, "batch norm after every conv")
    width: float = option(1.0, "multiplies every conv and FC width")
    crop_size: int = option(224, "training crop (fc6 kernel = crop/32)")
    in_channels: int = option(3, "input channels")

    def __post_init__(self) -> None:
        if self.size is not None and len(self.size) != 2:
            given = ",".join(map(str, self.size))
            raise ValueError(f"--size takes H,W (two integers), got {given}")


# --- evaluation and the study -----------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """The paper's test protocol (Section 3.2) for ``evaluate.evaluate``."""

    method: str = option("dense", "center: one centre crop; dense: the fully convolutional net "
                         "on the whole image; multicrop: a grid of crops; dense+multicrop: both,"
                         " averaged", choices=METHODS)
    scales: tuple[int, ...] | None = option(None, "test scales (smaller image side); default: "
                                            "from training, as the paper", metavar="Q1,Q2,...")
    multi_scale: bool = option(False, "default scales {S-32,S,S+32} (fixed S) or {Smin,mid,Smax}"
                               " (jittered S) instead of one")
    flip: bool = option(True, "average with horizontal flips (--no-flip: do not)")
    grid: int = option(5, "multicrop: GRID x GRID crops per scale")
    # a whole rescaled image counts as (its pixels / crop pixels) inputs, so memory per pass
    # is bounded whatever the image size
    batch_size: int = option(32, "crop-sized inputs per forward pass")
    workers: int | None = option(None, "decoding processes (default: 0 on the CPU, up to 8 with "
                                 "a GPU)")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown evaluation method {self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")
        if self.scales is not None:
            bad = [q for q in self.scales if not isinstance(q, int) or q < 1]
            if not self.scales or bad:
                raise ValueError(f"test scales must be positive ints (the smaller image side), "
                                 f"got {self.scales!r}")
        if not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"grid must be a positive int (5 gives the paper's 5x5 crops), got "
                             f"{self.grid!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise ValueError(f"workers must be an int >= 0 (0 decodes in this process), got "
                             f"{self.workers!r}")

    @property
    def passes(self) -> tuple[str, ...]:
        return PASSES[self.method]


@dataclass(frozen=True, kw_only=True)
class EvaluateCommand:
    """Evaluate a checkpoint or weights file, or an ensemble of several (soft-max posteriors
    averaged), with the paper's protocol: images rescaled to each test scale Q, dense or
    multi-crop evaluation, horizontal flips."""

    checkpoints: tuple[str, ...] = option(positional="+", metavar="CHECKPOINT",
                                          help="checkpoints or weights files")
    data: str = option(help="dataset folder: train/ and val/ (any layout `vggnet data check` "
                       "reads), or one folder per class")
    split: str = option("val", "the split of a train/ + val/ dataset", choices=("val", "train"))
    val_labels: str | None = option(None, "labels of a flat ImageNet val folder")
    protocol: EvalSettings = nested("vggnet.settings:EvalSettings")
    device: str = device_option()
    precision: str = precision_option()
    out: str | None = option(None, "folder for results.json, per_class.csv, confusion.png "
                             "(default: a new evaluation/CHECKPOINT-METHOD-DATE)")
    progress: bool = progress_option()


@dataclass(frozen=True)
class StudyPreset:
    """How big a study is: the training preset (``protocol.PRESETS``) and what it changes."""

    train_preset: str
    epochs: int | None = None  # the S=256 stages (from scratch, or from A); None: the preset's
    finetune_epochs: int | None = None  # the S=384 and jittered stages (initialised from a net)
    batch_norm: bool = False  # batch norm after every conv (not in the paper)
    batch_size: int | None = None  # global training batch; None: the training preset's
    train_per_class: int = 0  # the built-in dataset, used when no --data is given
    val_per_class: int = 0
    eval_batch: int = 32  # crop-sized inputs per forward pass
    threads: int | None = None  # torch CPU threads; None: torch's default
    localizer_epochs: int | None = None  # localisation nets; None: LOCALISATION_PRESETS'


STUDY_PRESETS = {
    # the paper's protocol as it is: full nets, 224 crops, S=256/384/[256;512], ImageNet
    "paper": StudyPreset("paper", eval_batch=128),
    # the same chain and tables on the built-in dataset at 64-pixel crops, for 2 CPU cores
    # One thread: these nets are so small that a second thread gains little, and on a shared
    # 2-core machine two threads made training 7x slower (876 vs 123 images/s for A, measured).
    # Batch norm: the plain nets need several times the epochs to leave chance on the built-in
    # data (plain A is still at chance after 6 epochs, A with batch norm at 74% top-1 error),
    # more than 2 CPU cores allow for 12 nets in well under an hour.
    # Batch 64: 4,000 training images are 15 steps an epoch at 256; with batch norm the
    # smaller batch trains stably and gets 4x the steps for the same images/s (see vggnet.demo).
    "reduced": StudyPreset("reduced", epochs=16, finetune_epochs=6, batch_norm=True, batch_size=64,
                           train_per_class=400, val_per_class=80, threads=1),
}
STUDIES = ("classification", "localisation")


@dataclass(frozen=True, kw_only=True)
class StudySettings:
    """Train what Tables 3-6 need (A, A-LRN, B, C, D, E at S=256; C, D, E at S=384 from their
    S=256 nets and at S=[256;512] from their S=384 nets; B-E start from A), evaluate every
    cell, and write OUT/report.md with each number beside the paper's and a verdict on each
    finding. Rerunning resumes: finished trainings and cells are kept."""

    preset: str = option("reduced", "reduced: 64-pixel crops on 2 CPU cores; paper: the full "
                         "protocol", choices=tuple(STUDY_PRESETS))
    data: str | None = option(None, "dataset with train/ and val/ (default: the built-in "
                              "dataset, written to OUT/data; the paper preset needs ImageNet)")
    out: str | None = option(None, "study folder; an earlier study's resumes it (default: a "
                             "new reproduce/PRESET-DATE)")
    epochs: int | None = option(None, "epochs of each S=256 stage (default: the preset's)")
    finetune_epochs: int | None = option(None, "epochs of each S=384 and jittered stage")
    localizer_epochs: int | None = option(None, "localisation study: epochs of each "
                                          "localisation net")
    train_per_class: int | None = option(None, "built-in dataset: training images per class")
    val_per_class: int | None = option(None, "built-in dataset: validation images per class")
    width: float | None = option(None, "width multiplier of every net")
    batch_size: int | None = option(None, "global batch of every training (default: the "
                                    "preset's)")
    threads: int | None = option(None, "torch CPU threads (default: the preset's)")
    device: str = device_option()
    precision: str = precision_option()
    workers: int | None = option(None, "training loader processes")
    progress: bool = progress_option()
    study: str = option("classification", "classification: Tables 3-6; localisation: Tables 8-9 "
                        "(Appendix A: box regression from the D classifiers at S=256 and S=384)",
                        choices=STUDIES)

    def __post_init__(self) -> None:
        if self.study not in STUDIES:
            raise ValueError(f"unknown study {self.study!r}; choose one of {', '.join(STUDIES)}")
        if self.preset not in STUDY_PRESETS:
            raise ValueError(f"unknown study preset {self.preset!r}; choose one of "
                             f"{sorted(STUDY_PRESETS)}")
        if self.preset == "paper" and self.data is None:
            raise ValueError("the paper preset trains on ImageNet: give --data DIR (train/ and "
                             "val/)")

    def resolved(self) -> StudyPreset:
        over = {k: getattr(self, k) for k in ("epochs", "finetune_epochs", "batch_size",
                                              "train_per_class", "val_per_class", "threads",
                                              "localizer_epochs")
                if getattr(self, k) is not None}
        presets = LOCALISATION_STUDY_PRESETS if self.study == "localisation" else STUDY_PRESETS
        return dataclasses.replace(presets[self.preset], **over)


# --- weights in and out -------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PredictSettings:
    """Classify images with a weights file, applying its preprocessing and class names.
    Default: centre crop of the image rescaled to 256/224 of the crop size; --dense: the fully
    convolutional net on whole images at each scale, averaged with the mirror image (the
    paper's dense evaluation)."""

    images: tuple[str, ...] = option(positional="+", help="image files or folders (searched "
                                     "recursively)")
    weights: str = weights_option()
    out: str | None = option(None, "write the predictions to a .csv or .json file (path, "
                             "top classes with names, probabilities) instead of the screen")
    device: str = device_option()
    precision: str = precision_option()
    top: int = option(5, "classes listed per image")
    dense: bool = option(False, "dense evaluation instead of a centre crop")
    scales: tuple[int, ...] | None = option(None, "shorter side(s) the image is rescaled to: "
                                            "every Q with --dense, the first for the centre crop "
                                            "(default: 256/224 of the crop size, i.e. 256 for "
                                            "224)", metavar="Q1,Q2,...")
    int8: str | None = option(None, "run an int8 copy of the model, calibrated on up to 256 "
                              "images under DIR (representative ones, e.g. training images): "
                              "CPU, centre crop only; about 2x the bf16 speed, less exact "
                              "(docs/benchmarks.md)", metavar="DIR")
    int8_float: tuple[str, ...] | None = option(None, "with --int8: the layers kept in float32 "
                                                "(default: conv1_1,fc8; `vggnet bench --items "
                                                "int8curve` measures the choice on a model)",
                                                metavar="LAYER,...")
    progress: bool = progress_option()


@dataclass(frozen=True, kw_only=True)
class FeaturesSettings:
    """Save layer outputs (--layers relu1_2,relu2_2,... on centre crops), a retrieval
    descriptor (--pool mac|spoc|gem|rmac of the last conv layer, after its ReLU, L2-normalised:
    cnnimageretrieval-pytorch's conventions), or by default the paper's transfer descriptor
    (Appendix B): dense relu7 averaged over locations, flips and scales, L2-normalised."""

    inputs: tuple[str, ...] = option(positional="+", help="image files or folders (searched "
                                     "recursively)")
    weights: str = weights_option()
    device: str = device_option()
    precision: str = precision_option()
    layers: str | None = option(None, "comma-separated layer names, e.g. "
                                "relu1_2,relu2_2,relu3_3,relu4_3")
    size: int | None = option(None, "crop size for --layers (default: the model's crop size)")
    scales: tuple[int, ...] | None = option(None, "scales of the transfer descriptor (default: "
                                            "256,384,512 for a 224 crop); with --pool the longer"
                                            " image side(s), e.g. 1024,724,512 (default 1024)",
                                            metavar="Q1,Q2,...")
    pool: str | None = option(None, "retrieval descriptor: mac, spoc, gem or rmac (unreadable "
                              "images are skipped and listed)", choices=POOLINGS)
    gem_p: float = option(3.0, "GeM's power (with --pool gem)")
    batch_size: int = option(16, "images per batch")
    out: str = option(help="output .safetensors or .npz")
    progress: bool = progress_option()

    def __post_init__(self) -> None:
        if self.pool is not None and self.layers:
            raise ValueError("--pool and --layers ask for two kinds of output; give one")


@dataclass(frozen=True, kw_only=True)
class ProbeSettings:
    """Train a linear classifier (L2-regularised logistic regression) on the transfer
    descriptors of DIR/train/<class>/* and report its accuracy on DIR/val/<class>/*."""

    weights: str = weights_option()
    device: str = device_option()
    precision: str = precision_option()
    data: str = option(help="folder with train/<class>/ and val/<class>/")
    scales: tuple[int, ...] | None = option(None, "scales of the transfer descriptor (default: "
                                            "256,384,512 for a 224 crop)", metavar="Q1,Q2,...")
    weight_decay: float = option(1e-3, "L2 penalty on the classifier")
    progress: bool = progress_option()


@dataclass(frozen=True, kw_only=True)
class ConvertSettings:
    """Convert a torchvision state dict (.pth), Keras VGG16/VGG19 weights (.h5, .weights.h5)
    or the authors' Caffe release (.caffemodel) into vggnet's safetensors format, with its
    preprocessing and class names. The format is detected from the file; the model column,
    width, classes and crop from the shapes."""

    input: str = option(positional=True, help="weights file to import")
    output: str = option(positional=True, help="safetensors file to write")
    model: str | None = option(None, "column to load into (e.g. D, vgg19, C); default: inferred")
    sha256: str | None = option(None, "expected SHA-256 of the input (full, or a prefix of >= 8 "
                                "hex digits)")
    prototxt: str | None = option(None, "Caffe deploy .prototxt defining the net (optional)")
    progress: bool = progress_option()


@dataclass(frozen=True, kw_only=True)
class ExportSettings:
    """Export the classifier (crop-size input, dynamic batch) or with --dense the fully
    convolutional net (dynamic batch, height and width), then check it against PyTorch
    (onnxruntime for ONNX)."""

    weights: str = weights_option()
    format: str = option("onnx", "graph format", choices=EXPORT_FORMATS)
    dense: bool = option(False, "fully convolutional graph for any image size")
    out: str = option(help="output file")
    progress: bool = progress_option()


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    """Time inference, training and memory with the default runtime against plain float32 NCHW
    eager PyTorch, in the same run, with the machine's matmul peak. See docs/benchmarks.md."""

    quick: bool = option(False, "tiny sizes: a smoke run of seconds")
    items: str | None = option(None, "comma-separated subset of inference, agreement, int8, "
                               "int8curve, training, pipeline, evaluation, memory, peers "
                               "(default: all)")
    repeats: int | None = option(None, "timed repetitions per candidate (median reported)")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    compile: bool = option(False, "also time inference through torch.compile (reports the "
                           "compile time)")
    threads: int | None = option(None, "torch threads (default: torch's, one per core)")
    trained: str | None = option(None, "trained model for the top-1 agreement item (default: "
                                 "the newest runs/demo-*/best.pt of `make demo`)",
                                 metavar="CHECKPOINT")
    data: str | None = option(None, "its dataset (default: the one it was trained on)",
                              metavar="DIR")
    json: str | None = option(None, "also write the results as JSON", metavar="PATH")

    def __post_init__(self) -> None:
        for name in ("repeats", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name} must be >= 1, got {v}")


# --- VGG as a backbone (issue 13): style transfer, explanations, retrieval, fine-tuning --------
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")  # Gatys et al.
STYLIZE_OPTIMIZERS = ("lbfgs", "adam")
STYLIZE_INITS = ("content", "noise")
EXPLAIN_METHODS = ("gradcam", "saliency", "both")
RETRIEVAL_SIZE = 1024  # cirtorch's test size: images shrunk to this longer side


@dataclass(frozen=True, kw_only=True)
class StylizeSettings:
    """How ``stylize.stylize`` optimises an image (Gatys, Ecker & Bethge)."""

    steps: int = option(300, "optimiser iterations, one objective evaluation each")
    optimizer: str = option("lbfgs", "L-BFGS (Gatys's) or Adam", choices=STYLIZE_OPTIMIZERS)
    size: int = option(512, "longer side of the output (and of the style image as used)")
    content_layers: tuple[str, ...] = option(("relu4_2",), "layers compared with the content "
                                             "photo", metavar="LAYER,...")
    style_layers: tuple[str, ...] = option(STYLE_LAYERS, "layers whose Gram matrices are "
                                           "compared with the style image's",
                                           metavar="LAYER,...")
    content_weight: float = option(1.0, "weight of the content term")
    style_weight: float = option(100.0, "weight of the style term (each term is relative to "
                                 "its target's size; raise it for more style)")
    pool: str = option("avg", "the trunk's pools: avg (Gatys's choice) or max",
                       choices=("avg", "max"))
    init: str = option("content", "start from the content photo or from seeded noise",
                       choices=STYLIZE_INITS)
    lr: float = option(0.02, "Adam's step in pixel units of [0, 1] (L-BFGS uses 1 with its "
                       "line search)")
    seed: int = option(0, "the noise start")

    def __post_init__(self) -> None:
        if self.optimizer not in STYLIZE_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {STYLIZE_OPTIMIZERS}, got "
                             f"{self.optimizer!r}")
        if self.init not in STYLIZE_INITS:
            raise ValueError(f"init must be one of {STYLIZE_INITS}, got {self.init!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"size must be an int >= 16 pixels, got {self.size!r}")
        if not self.content_layers or not self.style_layers:
            raise ValueError(f"need at least one content and one style layer, got "
                             f"{self.content_layers!r} and {self.style_layers!r}")


@dataclass(frozen=True, kw_only=True)
class StylizeCommand:
    """Neural style transfer (Gatys et al. 2016): optimise an image, starting from CONTENT, to
    keep CONTENT's features and take STYLE's Gram matrices through a frozen VGG with the
    weights' own preprocessing; writes the result as an image file."""

    content: str = option(positional=True, help="content photo")
    style: str = option(positional=True, help="style image")
    weights: str = weights_option()
    out: str = option(help="output image (.png, .jpg, ...)")
    settings: StylizeSettings = nested("vggnet.settings:StylizeSettings")
    device: str = device_option()
    progress: bool = progress_option()


@dataclass(frozen=True, kw_only=True)
class ExplainSettings:
    """Explain what a classifier looked at: for each image's centre crop (as `predict` takes
    it), Grad-CAM (Selvaraju et al. 2017) and/or the saliency map (Simonyan, Vedaldi &
    Zisserman 2013) of the top class (or --target), written as OUT/<name>.png: the photo, the
    photo under each heat map, the top-5 classes below. Images that cannot be decoded are
    skipped and listed."""

    images: tuple[str, ...] = option(positional="+", help="image files or folders (searched "
                                     "recursively)")
    weights: str = weights_option()
    out: str = option(help="folder for the PNGs (created if needed)")
    method: str = option("both", "gradcam, saliency or both", choices=EXPLAIN_METHODS)
    layer: str | None = option(None, "Grad-CAM's layer (default: the last conv layer's "
                               "rectified output, relu5_3 for VGG-16)")
    target: str | None = option(None, "explain this class (an index, or a name among the "
                                "weights' class names) instead of each image's top class",
                                metavar="CLASS")
    raw: bool = option(False, "also save the raw maps as OUT/<name>.safetensors")
    device: str = device_option()
    progress: bool = progress_option()


@dataclass(frozen=True, kw_only=True)
class RetrieveSettings:
    """Image retrieval: describe QUERY and DATABASE images with a pooled descriptor of the last
    conv layer (cnnimageretrieval-pytorch's conventions), rank the database by cosine
    similarity for each query, and write OUT/topk.csv and OUT/contact_sheet.png."""

    query: str = option(positional=True, help="query image, or folder of them")
    database: str = option(positional=True, help="database image, or folder of them")
    weights: str = weights_option()
    out: str = option(help="folder for topk.csv and contact_sheet.png (created if needed)")
    k: int = option(10, "matches listed per query")
    pool: str = option("gem", "mac, spoc, gem (generalised mean) or rmac", choices=POOLINGS)
    gem_p: float = option(3.0, "GeM's power (1: spoc; large: mac)")
    scales: tuple[int, ...] = option((RETRIEVAL_SIZE,), "longer image side(s) in pixels, "
                                     "combined as cirtorch's multi-scale (e.g. 1024,724,512); "
                                     "images are shrunk to the largest, never enlarged",
                                     metavar="L1,L2,...")
    device: str = device_option()
    precision: str = precision_option()
    progress: bool = progress_option()

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"-k must be at least 1, got {self.k}")


FINETUNE_EPOCHS = 30  # `vggnet finetune`'s --epochs when a new run is not told


@dataclass(frozen=True, kw_only=True)
class FinetuneSettings:
    """Fine-tune trained weights on your own images: a new classifier (fc8) for DIR's classes,
    every other layer copied from --weights and trained at --transfer-lr-factor x --lr (the
    paper's lr/10) or kept fixed up to --freeze-until, with the weights' own input convention;
    early stopping on the validation split (best.pt is the best epoch); then the paper's
    evaluation of best.pt (dense, flips) on that split. A run folder like `train`'s; continue
    an interrupted one with --resume RUN."""

    dir: str | None = option(None, "dataset: train/ and val/ with one folder per class, or one "
                             "folder per class with --val-split", positional="?")
    weights: str | None = option(None, "trained weights to start from: a `vggnet convert` file,"
                                 " our weights, a checkpoint or a run folder")
    resume: str | None = option(None, "continue the fine-tuning run in this folder (no "
                                "--weights; DIR only where its dataset moved)", metavar="RUN")
    out: str | None = option(None, "run folder (default runs/finetune-MODEL-DATE)")
    val_split: float | None = option(None, "DIR is one folder per class: hold out this fraction"
                                     " of each class for validation (e.g. 0.1)",
                                     metavar="FRACTION")
    split_seed: int = option(0, "seed of --val-split's choice of files")
    freeze_until: str | None = option(None, "keep the layers up to this one fixed (e.g. conv4_3,"
                                      " fc7; its batch norm too)", metavar="LAYER")
    transfer_lr_factor: float = option(0.1, "lr multiplier of the copied layers")
    lr: float = option(1e-2, "learning rate of the new classifier")
    epochs: int | None = option(None, f"at most this many epochs (default: {FINETUNE_EPOCHS});"
                                " with --resume: extend the run to this many")
    batch_size: int = option(32, "images per SGD step")
    lr_patience: int = option(3, "epochs without a better val top-1 error before the lr drops "
                              "(or, after the last drop, training stops)")
    lr_drops: int = option(1, "lr drops (x0.1) before the next plateau stops training")
    scale: tuple[int, ...] | None = option(None, "training scale S or SMIN,SMAX (default: 256/224"
                                           " of the weights' crop, 256 for 224)",
                                           metavar="S[,SMAX]")
    seed: int = option(0, "data order, augmentation, the new classifier and dropout")
    evaluation: EvalSettings = nested("vggnet.settings:EvalSettings",
                                      only=("method", "multi_scale", "scales"))
    skip_bad: bool = option(False, "train without the files that fail to decode")
    device: str | None = option(None, "auto (default: a GPU if there is one), cpu, cuda, cuda:N;"
                                " with --resume: the run's own unless given")
    precision: str | None = option(None, "auto (default), fp32, bf16 or fp16; with --resume: the"
                                   " run's own unless given", choices=PRECISIONS)
    workers: int | None = option(None, "loader processes (default: cores - 1, at most 16)")
    progress: bool = progress_option()


# --- localisation (Appendix A) -------------------------------------------------------------------
# The localisation study (``vggnet.reproduce_localisation``): config D with batch norm trained
# from scratch at S=256 (here 73) for 12 epochs, then at S=384 (110) from it for 4 at lr/10;
# localisation nets: ``protocol.LOCALISATION_PRESETS``. The same built-in data as the
# classification study; 12 epochs because the localisers need a classifier that has left
# chance (12 gave 71.4% top-1 error, 4.6 min; docs/localisation.md).
LOCALISATION_STUDY_PRESETS = {
    "paper": StudyPreset("paper", eval_batch=128),
    "reduced": StudyPreset("reduced", epochs=12, finetune_epochs=4, batch_norm=True,
                           batch_size=64, train_per_class=400, val_per_class=80, threads=1),
}
# what a localisation run may be told of `vggnet train`'s options (its net comes from the
# classifier: model, width, crop, batch norm, dropout; its scale is fixed: --scale S)
LOCALISATION_TRAIN_OPTIONS = (
    "data", "out", "val_labels", "flip", "pca_std", "stats_images", "batch_size", "micro_batch",
    "lr", "momentum", "weight_decay", "lr_factor", "lr_patience", "lr_drops", "min_improvement",
    "epochs", "seed", "device", "precision", "channels_last", "compile", "workers", "skip_bad",
    "scan", "save_every_min", "progress", "dist_timeout_s", "bucket_mb", "grad_compression",
    "max_skips")
MERGE_THRESHOLD = 1.0  # vggnet.boxes.MERGE_THRESHOLD, here without importing torch


def boxes_option(split: str):
    return option(None, f"ground-truth boxes of the {split} images: a LOC_*_solution.csv or a "
                  f"folder of ILSVRC XML files (default: DATA/LOC_{split}_solution.csv)",
                  metavar="PATH")


@dataclass(frozen=True, kw_only=True)
class LocalizeTrainCommand:
    """Make a localisation net from a trained classifier and train it (the paper's Appendix
    A): fc8 replaced by a box regressor (one box for all classes, or one per class), the
    Euclidean loss on the box of the image's class, one random crop per image at a fixed
    scale S with its box following the crop and flip, validated by test protocol 1 (the
    central crop's box; IoU >= 0.5 with the truth is correct). Options not given come from
    --preset; run folders, Ctrl-C, checkpoints, resume and report.md as in `vggnet train`."""

    preset: str = option("paper", "paper: lr 1e-3, batch 256, plateau schedule; reduced: lr "
                         "0.05, batch 64, 4 epochs (the built-in data on a CPU; see "
                         "docs/localisation.md)", choices=tuple(LOCALISATION_PRESETS))
    resume: str | None = option(None, "continue the run in this folder (or its last.pt) exactly",
                                metavar="RUN")
    classifier: str | None = option(None, "the trained classifier to start from: a run folder "
                                    "(its best.pt), checkpoint or weights file", flag="from",
                                    metavar="CLASSIFIER")
    regression: str | None = option(None, "single-class: one box for every class; per-class "
                                    "(default): one box per class", choices=REGRESSIONS)
    finetune: str | None = option(None, "layers trained: all (default) or fc (fc6, fc7 and the "
                                  "regressor; the conv layers frozen)", choices=FINETUNE)
    scale: int | None = option(None, "training scale S, fixed (the paper: 256 and 384; default: "
                               "the classifier's S)", metavar="S")
    train_boxes: str | None = boxes_option("train")
    val_boxes: str | None = boxes_option("val")
    given: dict = nested("vggnet.settings:TrainSettings", partial=True,
                         only=LOCALISATION_TRAIN_OPTIONS)


@dataclass(frozen=True, kw_only=True)
class LocalizeEvaluateCommand:
    """Localisation error of localisation nets on images with ground-truth boxes. Protocol 1
    (Table 8): the central crop at Q, the box of the true class. Protocol 2 (Table 9): each net
    applied densely to whole images at every Q, boxes merged greedily and rated by a
    classifier, whose top-5 classes get one box each (top-5 localisation error). Several nets
    with protocol 2: each alone, then their fusion (the union of their boxes)."""

    localizers: tuple[str, ...] = option(positional="+", metavar="LOCALISER",
                                         help="localisation nets: run folders (best.pt), "
                                         "checkpoints or weights files")
    data: str = option(help="dataset folder: train/ and val/ (any layout `vggnet data check` "
                       "reads)")
    split: str = option("val", "the split evaluated", choices=("val", "train"))
    val_labels: str | None = option(None, "labels of a flat ImageNet val folder")
    boxes: str | None = option(None, "ground-truth boxes: a LOC_*_solution.csv or a folder of "
                               "ILSVRC XML files (default: DATA/LOC_<split>_solution.csv)",
                               metavar="PATH")
    protocol: int = option(1, "1: central crop, the true class's box (Table 8); 2: dense, the "
                           "classifier's top 5 (Table 9)", choices=LOCALISATION_PROTOCOLS)
    scales: tuple[int, ...] | None = option(None, "test scales Q (protocol 1: one result per Q; "
                                            "2: all at once); default: each net's training S",
                                            metavar="Q1,Q2,...")
    classifier: str | None = option(None, "protocol 2: the classifier rating the boxes "
                                    "(default: the one each net was trained from)",
                                    metavar="CLASSIFIER")
    flip: bool = option(False, "protocol 2: the mirror images too")
    threshold: float = option(MERGE_THRESHOLD, "protocol 2: greedy merging stops above this "
                              "match score (docs/localisation.md)")
    batch_size: int = option(32, "protocol 1: crops per forward pass")
    device: str = device_option()
    precision: str = precision_option()
    out: str | None = option(None, "folder for results.json (default: a new "
                             "localisation/evaluation-DATE)")
    progress: bool = progress_option()


@dataclass(frozen=True, kw_only=True)
class LocalizePredictCommand:
    """The five (class, box) guesses of protocol 2 for each image: the localisation net
    applied densely, its boxes merged and rated by the classifier, one box for each of the
    classifier's top-5 classes. Prints them and writes OUT/<image>.boxes.png with the boxes
    and labels drawn on the image."""

    images: tuple[str, ...] = option(positional="+", help="image files or folders")
    weights: str = option(help="localisation net: run folder (best.pt), checkpoint or weights "
                          "file")
    classifier: str | None = option(None, "the classifier rating the boxes (default: the one "
                                    "the net was trained from)", metavar="CLASSIFIER")
    scales: tuple[int, ...] | None = option(None, "test scales Q (default: the net's training "
                                            "S)", metavar="Q1,Q2,...")
    flip: bool = option(False, "the mirror image too")
    top: int = option(5, "guesses per image (one class each)")
    out: str | None = option(None, "folder for the PNGs (default: a new "
                             "localisation/predictions-DATE)")
    device: str = device_option()
    precision: str = precision_option()
