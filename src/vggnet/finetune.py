"""``vggnet finetune``: trained weights on your own folder of classes, in one command.

A training run (``train.train``: the same run folder, checkpoints, metrics, report and
resume) whose settings come from the weights file: its column, width, batch norm, crop and
dropout, a new fc8 for the data's classes (``new_head``), every other layer copied and
trained at ``transfer_lr_factor`` x lr (the paper's lr/10) or kept fixed up to
``freeze_until`` (``vggnet.transfer``), and the weights' own input convention (the run keeps
the source's preprocessing: ``train.run_preprocessing``). Early stopping is the training
schedule's rule with fine-tuning defaults: after ``lr_patience`` epochs without a better
validation top-1 error the lr drops, after ``lr_drops`` drops the next plateau stops the run,
and best.pt holds the best epoch. Then best.pt is evaluated with the paper's protocol
(``evaluate.evaluate``: dense, flips, Q from the training scale) on the validation split,
into RUN/evaluation/, and the result is added to RUN/report.md; a finished run resumed is
neither trained nor evaluated again (unless ``--epochs`` extends it).
"""

from __future__ import annotations

import time
from pathlib import Path

from .evaluate import EvalReport
from .settings import (
    FINETUNE_EPOCHS,
    EvalSettings,
    FinetuneSettings,
    TrainSettings,
    make_settings,
)
from .train import Task


class FinetuneTask(Task):
    """The classification task, continued by `vggnet finetune --resume` (which then evaluates
    best.pt); `vggnet train --resume` continues the run too, without that evaluation."""

    command = "vggnet finetune"


def finetune_settings(s: FinetuneSettings) -> TrainSettings:
    """The training run's settings: the model from ``s.weights``, the rest from ``s``."""
    from .model import VGGConfig
    from .protocol import train_scale
    from .train import resolve_checkpoint
    from .weights import read_metadata

    source = resolve_checkpoint(s.weights)
    c = VGGConfig.from_dict(read_metadata(source)["model_config"])
    out = s.out or str(Path("runs") / f"finetune-{c.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return make_settings(
        "paper", data=s.dir, out=out, model=c.name, batch_norm=c.batch_norm, width=c.width,
        crop_size=c.crop_size, dropout=c.dropout, scale=s.scale or train_scale("256", c.crop_size),
        init_from=str(s.weights), new_head=True, transfer_lr_factor=s.transfer_lr_factor,
        freeze_until=s.freeze_until, val_split=s.val_split, split_seed=s.split_seed, lr=s.lr,
        epochs=FINETUNE_EPOCHS if s.epochs is None else s.epochs, batch_size=s.batch_size,
        lr_patience=s.lr_patience, lr_drops=s.lr_drops, seed=s.seed, skip_bad=s.skip_bad,
        device=s.device, precision=s.precision, workers=s.workers,
        progress=s.progress)  # None: the default


def evaluate_run(folder: Path, ts: TrainSettings, protocol: EvalSettings,
                 progress: bool = True) -> EvalReport:
    """best.pt of a run on its validation split with ``protocol``, written to
    folder/evaluation/ and added to folder/report.md."""
    from .data import open_dataset
    from .evaluate import evaluate, format_report, write_report

    dataset = open_dataset(ts.data, ts.val_labels, ts.val_split, ts.split_seed)
    report = evaluate([folder / "best.pt"], dataset.val.samples, dataset.class_names, protocol,
                      device=ts.device, precision=ts.precision, progress=progress)
    print(format_report(report))
    write_report(report, folder / "evaluation")
    m = report.metrics
    scales = ",".join(map(str, report.scales[0]))
    with open(folder / "report.md", "a") as f:
        f.write(f"\n## Evaluation of best.pt (the paper's protocol)\n\n"
                f"- {report.method} at Q={scales}, flips {'averaged' if report.flip else 'off'}, "
                f"on the {m['images']} validation images: **top-1 error {m['top1_err']:.2f}%, "
                f"top-5 error {m['top5_err']:.2f}%** (evaluation/results.json, per_class.csv, "
                "confusion.png)\n")
    return report


def evaluated(folder: Path) -> bool:
    """Whether best.pt's evaluation is in ``folder`` (then said again, not redone)."""
    path = folder / "evaluation" / "results.json"
    if not path.is_file():  # e.g. a Ctrl-C during that evaluation
        return False
    import json

    r = json.loads(path.read_text())
    print(f"best.pt was evaluated when the run finished: top-1 error {r['top1_err']:.2f}%, "
          f"top-5 error {r['top5_err']:.2f}% ({r['method']}; {path}, {folder / 'report.md'})")
    return True


def finetune_command(s: FinetuneSettings) -> int:
    """``vggnet finetune``: start (or ``--resume``) the run, then evaluate best.pt; exit code
    130 when interrupted (continue with --resume)."""
    from .train import train

    how = {k: getattr(s, k) for k in ("device", "precision", "workers")}
    if s.resume:
        if s.weights:
            raise ValueError("--resume continues a run with its own weights; give --resume RUN "
                             "(with how it runs: --device, --precision, --workers, --progress; "
                             "--epochs to extend it; DIR only if its dataset moved there)")
        extend = {} if s.epochs is None else {"epochs": s.epochs}
        moved = {} if s.dir is None else {"data": s.dir}  # checked to be the same data
        result = train(resume=s.resume, progress=s.progress, task=FinetuneTask(), **how,
                       **extend, **moved)
    elif not s.dir or not s.weights:
        raise ValueError("give the dataset folder and the weights to start from: `vggnet "
                         "finetune DIR --weights W` (or --resume RUN)")
    else:
        result = train(finetune_settings(s), task=FinetuneTask())
    if result.status == "interrupted":
        return 130
    if result.status == "already finished" and evaluated(result.folder):
        return 0
    print(f"fine-tuning {result.status} after {result.epochs} epoch(s), "
          f"{result.seconds / 60:.1f} min: best val top-1 error (centre crop) "
          f"{100 * result.best_top1_err:.2f}%; run folder {result.folder}")
    evaluate_run(result.folder, result.settings, s.evaluation, s.progress)
    return 0
