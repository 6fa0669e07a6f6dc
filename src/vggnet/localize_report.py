"""What localisation commands write for people: a run's report.md and the evaluation tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def training_report(r, run, task) -> str:
    """report.md of a localisation run (``r``: train.TrainResult; ``run``: train.Run;
    ``task``: localize_train.BoxTask): the classifier it came from, the regression, the
    recipe, time, and its best and last protocol-1 errors."""
    from .info import summarize

    s, config, dataset = run.settings, run.config, run.dataset
    last = r.history[-1] if r.history else {}
    drops = sum(1 for h in r.history if h["event"] == "dropped")
    redrawn = sum(h.get("redrawn", 0) for h in r.history)
    lines = [
        f"# Localisation training report: VGG {config.name}, {task.regression} regression",
        "",
        f"- Data: `{s.data}` ({dataset.layout}), {len(dataset.class_names)} classes",
        *[f"- {note}" for note in task.notes],
        f"- Net: from the classifier `{task.classifier}`, every layer but fc8 copied; fc8 "
        f"regresses {task.spec.boxes} box(es) ({config.num_classes} outputs); width "
        f"{config.width:g}, crop {config.crop_size}, {summarize(config)['params']:,} parameters; "
        f"trained layers: {'all' if task.finetune == 'all' else 'fc6, fc7, fc8'}",
        f"- Recipe (preset `{s.preset}`): Euclidean loss on the true class's box (centre, size) "
        f"/ crop; SGD momentum {s.momentum}, weight decay {s.weight_decay:g}, dropout "
        f"{s.dropout}, batch {s.batch_size}, lr {s.lr:g} divided by {1 / s.lr_factor:g} on "
        f"validation plateaus (patience {s.lr_patience}, at most {s.lr_drops} drops); fixed "
        f"S={s.scale[0]}, random crop, flip {'on' if s.flip else 'off'}, PCA colour shift std "
        f"{s.pca_std}",
        f"- Run: {r.epochs} epoch(s), {r.status}, {drops} lr drop(s), {r.seconds / 60:.1f} min; "
        f"{redrawn} random crop(s) drawn again because they lost their box",
        "",
        "| | protocol-1 localisation error | loss |",
        "|---|---|---|",
        f"| best validation (best.pt, central crop, Q={s.scale[0]}) | "
        f"{100 * r.best_top1_err:.2f}% | |",
    ]
    if last:
        lines += [f"| last epoch validation | {100 * last['val_top1_err']:.2f}% | "
                  f"{last['val_loss']:.4f} |",
                  f"| last epoch training crops (IoU < 0.5 with their box) | "
                  f"{100 * last['train_top1_err']:.2f}% | {last['train_loss']:.4f} |"]
    lines += ["", "Files: `best.pt`, `last.pt` (checkpoints; `vggnet localize evaluate|predict` "
              "read them), `metrics.csv`, `metrics.jsonl` (val_top1_err: protocol-1 error; "
              "train_top1_err: training crops missed), `tensorboard/`, `settings.json`.", ""]
    return "\n".join(lines)


def results_table(rows: Mapping[str, Mapping], protocol: int) -> str:
    """A Markdown table of evaluation rows: name -> {"error", "images", "scales", "seconds"}."""
    what = "protocol-1 error (central crop, true class)" if protocol == 1 else \
        "top-5 localisation error (dense)"
    lines = [f"| localisation net(s) | test Q | {what} | images | seconds |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {_scales(r['scales'])} | {r['error']:.2f}% | {r['images']} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def _scales(scales: Sequence) -> str:
    """[73] -> "73"; [[73], [101, 110]] (a fusion) -> "73 + 101,110"."""
    if scales and isinstance(scales[0], (list, tuple)):
        return " + ".join(_scales(s) for s in scales)
    return ",".join(str(q) for q in scales)

