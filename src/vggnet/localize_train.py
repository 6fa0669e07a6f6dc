"""Training localisation nets (the paper's Appendix A) on ``vggnet.train``'s loop.

``BoxTask`` is the ``train.Task`` of a localisation run: the net is a trained classifier
with fc8 replaced by a box regressor (``localize.localizer_from_classifier``), each step's
loss is the Euclidean loss on the box of the image's class, and the validation error that
drives the learning-rate schedule (and picks best.pt) is test protocol 1's: the central
crop at Q = S, correct when its box has IoU >= 0.5 with a ground-truth box of the class.
Everything else is ``train``'s: SGD with the paper's recipe, micro-batches, precision,
torchrun, Ctrl-C, checkpoints with exact resume, metrics, run folder.

Training samples (``BoxTrainImages``): per image one random crop at the fixed scale S, with
the pipeline's flip and PCA colour shift; its target is the image's ground-truth box brought
into that very crop (``TrainTransform.view`` returns the crop's ``Window``;
``localize.crop_target`` keeps a box when half of it, or half of the crop, is visible). A
crop that lost every box is drawn again (``DRAWS`` times at most, then the next image
stands in), and those draws are counted per epoch ("redrawn" in the metrics).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed
from .annotations import BoxedSample, attach_boxes, read_boxes
from .boxes import cxcywh_to_xyxy, iou
from .data import make_loader, sample_rng
from .image import BadImageError
from .localize import (
    IOU_CORRECT,
    Localizer,
    LocalizerSpec,
    crop_target,
    decode,
    is_correct,
    localizer_from_classifier,
    select,
    set_finetune,
)
from .model import VGG, VGGConfig, build
from .preprocess import Preprocessing
from .protocol import FINETUNE, LOCALISATION_PRESETS, centre_crop_resize, default_test_scale
from .runlog import rate
from .runtime import Runtime
from .settings import LocalizeTrainCommand, TrainSettings, make_settings
from .train import Run, Task, TrainResult, TrainState, resolve_checkpoint, train
from .transforms import EvalTransform, TrainTransform, device_batch
from .weights import LoadedModel, load_model, require_classifier

DRAWS = 10  # random crops tried per image before the next image stands in
BOX_FILES = {"train": "LOC_train_solution.csv", "val": "LOC_val_solution.csv"}


# --- samples ------------------------------------------------------------------------------------
class BoxTrainImages(torch.utils.data.Dataset):
    """Training samples keyed by (epoch, index), as ``data.TrainImages``: (HWC uint8 crop,
    label, (3,) colour-shift alpha, the bad files met, (4,) float32 encoded target box, the
    crops drawn again). Deterministic in (seed, epoch, index) whatever the workers."""

    def __init__(self, samples: Sequence[BoxedSample], class_names: Sequence[str],
                 transform: TrainTransform, seed: int) -> None:
        self.samples, self.class_names = list(samples), list(class_names)
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        bad, redrawn = [], 0
        for attempt in range(min(len(self.samples), 100)):
            sample = self.samples[(index + attempt) % len(self.samples)]
            try:
                found, rejected = self.draw(sample, epoch, index, attempt)
            except BadImageError as e:
                bad.append(str(e))
                continue
            redrawn += rejected
            if found is not None:
                pixels, alpha, target = found
                return pixels, sample.label, alpha, bad, target, redrawn
        raise RuntimeError(f"100 images in a row failed to decode or to keep their box in "
                           f"{DRAWS} random crops, e.g. {bad[:3]}; run `vggnet data check`")

    def draw(self, sample: BoxedSample, epoch: int, index: int, attempt: int):
        """((crop, alpha, target) or None, crops rejected): up to ``DRAWS`` random crops of
        one image until one keeps a box. Where the image's size is known, a crop is placed
        (and rejected) before any decoding."""
        tf = self.transform
        truth = sample.boxes_of(self.class_names[sample.label])
        for d in range(DRAWS):
            choice = tf.draw(sample_rng(self.seed, epoch, index, attempt * DRAWS + d))
            if sample.size is not None and crop_target(truth, tf.window(sample.size,
                                                                        choice)) is None:
                continue
            pixels, window = tf.view(sample.path, choice)
            target = crop_target(truth, window)
            if target is not None:
                return (pixels, choice["alpha"], target.numpy().astype(np.float32)), d
        return None, DRAWS


class CentralCrops(torch.utils.data.Dataset):
    """Protocol 1's inputs: (uint8 central crop (crop, crop, 3), its ``Window``, the sample),
    or (None, "path: reason", the sample) for a file that fails to decode."""

    def __init__(self, samples: Sequence[BoxedSample], transform: EvalTransform) -> None:
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:
            pixels, window = self.transform.view(s.path)
        except BadImageError as e:
            return None, str(e), s
        return pixels, window, s


def as_list(items: list) -> list:
    return items


# --- validation: protocol 1 with the run's net --------------------------------------------------
@torch.no_grad()
def validate_boxes(net: nn.Module, batches, class_names: Sequence[str], runtime: Runtime,
                   prep: Preprocessing, progress: Callable[[int], None] | None = None) -> dict:
    """Protocol 1 over ``CentralCrops`` batches (summed over processes): "top1_err" the
    fraction of images whose true class's box has IoU < 0.5 with all of its ground-truth
    boxes; "loss" the Euclidean loss against the box a training crop in the same place would
    have had (images whose box is not half in the central crop are left out of it)."""
    was_training = net.training
    net.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, images in it, correct, images
    bad: list[str] = []
    for items in batches:
        bad += [why for pixels, why, _ in items if pixels is None]
        items = [it for it in items if it[0] is not None]
        if not items:
            continue
        images = torch.from_numpy(np.stack([p for p, _, _ in items])).permute(0, 3, 1, 2)
        labels = torch.tensor([s.label for _, _, s in items])
        with runtime.autocast():
            out = net(device_batch(runtime.input(images), prep)).float().cpu()  # (N, K, 4)
        for box, (_, window, s) in zip(select(out, labels), items, strict=True):
            truth = s.boxes_of(class_names[s.label])
            sums[2] += is_correct(window.to_image(decode(box, images.shape[-1])), truth)
            target = crop_target(truth, window)
            if target is not None:
                sums[0] += 0.5 * float((box - target).pow(2).sum())
                sums[1] += 1
        sums[3] += len(items)
        if progress is not None:
            progress(len(items))
    net.train(was_training)
    loss_sum, n_loss, correct, n = distributed.all_reduce_sum(sums.to(runtime.device)).tolist()
    if n == 0:
        raise ValueError("no validation image could be decoded; run `vggnet data check`")
    return {"loss": loss_sum / n_loss if n_loss else math.nan, "top1_err": 1 - correct / n,
            "top5_err": math.nan, "images": int(n), "bad": bad}


# --- the task -----------------------------------------------------------------------------------
def box_file(data: str | os.PathLike, split: str, given: str | None,
             flag: str | None = None) -> str:
    """The ground-truth boxes of ``split``: ``given``, or DATA/LOC_<split>_solution.csv."""
    if given:
        return str(given)
    path = Path(data) / BOX_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"no ground-truth boxes for the {split} images: {str(path)!r} "
                                f"does not exist; give {flag or f'--{split}-boxes'} PATH (a "
                                f"LOC_{split}_solution.csv or a folder of ILSVRC XML files)")
    return str(path)


class BoxTask(Task):
    """A localisation run (see the module doc). Made with the box files' paths, which are
    read at once (a missing or malformed file stops the command before any work); a
    resumed run's task comes from its checkpoint (``resumed``)."""

    name = "localisation"
    command = "vggnet localize train"
    plots = {"loss": ([("train", "train_loss"), ("val", "val_loss")], "Euclidean box loss"),
             "error": ([("train boxes missed (IoU < 0.5)", "train_top1_err"),
                        ("val protocol-1 error", "val_top1_err")], "error (%)")}

    def __init__(self, regression: str = "per-class", finetune: str = "all",
                 classifier: str | None = None, train_boxes: str | None = None,
                 val_boxes: str | None = None) -> None:
        LocalizerSpec(regression, 1)  # checks the choice
        if finetune not in FINETUNE:
            raise ValueError(f"finetune must be one of {', '.join(FINETUNE)}; got {finetune!r}")
        self.regression, self.finetune, self.classifier = regression, finetune, classifier
        self.files = {"train": train_boxes, "val": val_boxes}
        self.boxes = {k: read_boxes(v) for k, v in self.files.items() if v}
        self.spec: LocalizerSpec | None = None
        self.prep: Preprocessing | None = None
        self.notes: list[str] = []  # what pairing images with boxes found, for the report

    def resumed(self, ckpt: dict) -> BoxTask:
        Task.resumed(self, ckpt)
        r = ckpt["localisation_run"]
        return BoxTask(r["regression"], r["finetune"], r["classifier"], r["train_boxes"],
                       r["val_boxes"])

    def build(self, s: TrainSettings, class_names: list[str], ckpt: dict | None,
              log) -> tuple[VGG, dict, None]:
        if ckpt is not None:
            self.spec = LocalizerSpec.from_dict(ckpt["localisation"])
            self.prep = Preprocessing.from_dict(ckpt["preprocessing"])
            return build(VGGConfig.from_dict(ckpt["model_config"]), init=None), {}, None
        loaded = load_classifier(self.classifier)
        if loaded.class_names != class_names:
            raise ValueError(f"the classifier {self.classifier!r} knows other classes than the "
                             f"dataset ({len(loaded.class_names or [])} vs {len(class_names)}; "
                             "a localisation net's boxes are those of its classifier's classes"
                             "); train it on this data first")
        loc = localizer_from_classifier(loaded.model, self.regression, seed=s.seed)
        self.spec, self.prep = loc.spec, loaded.preprocessing
        log.message(f"localisation net from {self.classifier}: VGG {loc.net.config.name}, every "
                    f"layer but fc8 copied; fc8 regresses {loc.spec.boxes} box(es) "
                    f"({self.regression}); trained layers: {self.finetune}")
        return loc.net, loaded.meta, None

    def preprocessing(self, stats, ckpt=None, source_meta=None) -> Preprocessing:
        return self.prep  # the classifier's: its features were learnt on that input

    def images(self, run: Run) -> tuple:
        s, ds = run.settings, run.dataset
        paired = {}
        for split, samples in (("train", ds.train.samples), ("val", ds.val.samples)):
            boxed, report = attach_boxes(samples, *self.boxes[split])
            boxed = [b for b in boxed if len(b.boxes_of(ds.class_names[b.label]))]
            note = (f"{split} boxes ({self.files[split]}): {report.summary()}; "
                    f"{report.boxed - len(boxed)} with no box of their own class left out")
            self.notes.append(note)
            run.log.message(note)
            paired[split] = boxed
        if len(paired["train"]) < s.batch_size or not paired["val"]:
            raise ValueError(f"{len(paired['train'])} training and {len(paired['val'])} "
                             f"validation images have boxes: need a batch ({s.batch_size}) and one"
                             " (see the lines above)")
        train_images = BoxTrainImages(paired["train"], ds.class_names,
                                      TrainTransform(s.scale, s.crop_size, s.flip, s.pca_std),
                                      s.seed)
        val = paired["val"]
        return train_images, [val[i] for i in distributed.shard(len(val), run.info)]

    def wrap(self, model: VGG) -> nn.Module:
        loc = Localizer(model, self.spec)
        set_finetune(loc, self.finetune)
        return loc

    def loss(self, output: torch.Tensor, labels: torch.Tensor,
             targets: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Summed Euclidean loss of (N, K, 4) boxes; a "hit" is a box with IoU >= 0.5 with the
        crop's target (top-1 and top-5 alike)."""
        pred = select(output.float(), labels)
        loss_sum = 0.5 * (pred - targets.float()).pow(2).sum()
        hits = (iou(cxcywh_to_xyxy(pred.detach()), cxcywh_to_xyxy(targets.float()))
                >= IOU_CORRECT).sum()
        return loss_sum, hits, hits

    def validate(self, state: TrainState, run: Run,
                 progress: Callable[[int], None] | None = None) -> dict:
        s = run.settings
        crops = CentralCrops(run.val_images, EvalTransform(default_test_scale(s.scale),
                                                           s.crop_size))
        batches = make_loader(crops, 2 * run.checked.micro, run.workers, collate_fn=as_list)
        val = validate_boxes(state.net, batches, run.dataset.class_names, run.runtime, run.prep,
                             progress)
        return {**val, "extra": {"redrawn": state.progress.redrawn}}

    def epoch_line(self, row: dict, epochs: int) -> str:
        return (f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.0e}  train loss "
                f"{row['train_loss']:.4f} boxes missed {100 * row['train_top1_err']:5.1f}%  |  "
                f"val loss {row['val_loss']:.4f} protocol-1 error "
                f"{100 * row['val_top1_err']:5.1f}%  |  {rate(row['images_per_s'])} img/s, "
                f"{row['epoch_s']:.0f} s, {row.get('redrawn', 0)} crops redrawn  {row['event']}")

    def report(self, result: TrainResult, run: Run) -> str:
        from .localize_report import training_report

        return training_report(result, run, self)

    def constants(self) -> dict:
        return {"task": self.name, "resume_with": self.command,
                "localisation": self.spec.to_dict(),
                "localisation_run": {"regression": self.regression, "finetune": self.finetune,
                                     "classifier": self.classifier,
                                     "train_boxes": self.files["train"],
                                     "val_boxes": self.files["val"]}}


def load_classifier(path: str | os.PathLike) -> LoadedModel:
    """A classifier from a run folder (best.pt, else last.pt), checkpoint or weights file."""
    file = resolve_checkpoint(path)
    return require_classifier(load_model(file), file)


# --- the command ----------------------------------------------------------------------------------
def new_box_run(classifier: str, data: str, regression: str = "per-class", finetune: str = "all",
                scale: int | None = None, train_boxes: str | None = None,
                val_boxes: str | None = None, preset: str = "paper",
                **given) -> tuple[TrainSettings, BoxTask]:
    """The settings and task of a new localisation run from ``classifier``: its net (config,
    width, crop, batch norm, dropout), at the fixed scale ``scale`` (default: the classifier's
    own S if fixed, else 256/224 of its crop), the preset's recipe, ``given`` on top."""
    given = {k: v for k, v in given.items() if v is not None}  # None: not given
    file = resolve_checkpoint(classifier)
    loaded = load_classifier(file)
    cfg = loaded.model.config
    src = (loaded.meta.get("train_settings") or {}).get("scale") or [0, 1]
    s = scale or (int(src[0]) if src[0] == src[1] else centre_crop_resize(cfg.crop_size))
    tag = time.strftime("%Y%m%d-%H%M%S")
    out = given.pop("out", None) or f"runs/localize-{cfg.name}-{regression}-{finetune}-{tag}"
    values = {**LOCALISATION_PRESETS[preset], "model": cfg.arch, "batch_norm": cfg.batch_norm,
              "width": cfg.width, "crop_size": cfg.crop_size, "dropout": cfg.dropout,
              "scale": (s, s), "init_from": str(file), "data": data, "out": out, **given}
    settings = make_settings(preset, **values)
    task = BoxTask(regression, finetune, os.path.abspath(file),
                   box_file(data, "train", train_boxes), box_file(data, "val", val_boxes))
    return settings, task


def localize_train_command(c: LocalizeTrainCommand) -> int:
    """``vggnet localize train``: a new run from --from, or --resume one; exit code 130 when
    interrupted (the run can be resumed)."""
    own = {"classifier": "--from", "regression": "--regression", "finetune": "--finetune",
           "scale": "--scale", "train_boxes": "--train-boxes", "val_boxes": "--val-boxes"}
    if c.resume:
        given = [flag for name, flag in own.items() if getattr(c, name) is not None]
        if given:
            raise ValueError(f"--resume continues a run with its own settings; {', '.join(given)}"
                             " cannot be given with it")
        result = train(resume=c.resume, task=BoxTask(), **c.given)
    else:
        if not c.given.get("data"):
            raise ValueError("--data DIR is required (a dataset with train/ and val/ and its "
                             "box files; `vggnet data make DIR` writes the built-in one)")
        if not c.classifier:
            raise ValueError("--from CLASSIFIER is required: the trained classifier to start "
                             "from (a run folder, checkpoint or weights file)")
        given = dict(c.given)
        settings, task = new_box_run(c.classifier, given.pop("data"), c.regression or "per-class",
                                     c.finetune or "all", c.scale, c.train_boxes, c.val_boxes,
                                     c.preset, **given)
        result = train(settings, task=task)
    if result.status == "interrupted":
        return 130
    if distributed.env_info().is_main:
        print(f"{result.status} after {result.epochs} epoch(s), {result.seconds / 60:.1f} min: "
              f"best protocol-1 localisation error {100 * result.best_top1_err:.2f}%; run "
              f"folder {result.folder} (report.md)")
    return 0
