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


# --- the localisation study's report --------------------------------------------------------------
def _cell(cells: Mapping, cid: str) -> tuple[str, str]:
    """(this run's error in bold, its standard error) or ("not run", "")."""
    from .reproduce_localisation import standard_error

    c = cells.get(cid)
    if c is None:
        return "not run", ""
    return f"**{c['error']:.1f}**", f"{standard_error(c['error'], c['images']):.1f}"


def _paper(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def study_tables(cells: Mapping, q) -> list[str]:
    """Tables 8 and 9 with this run's numbers beside the paper's; ``q``: paper pixels -> here."""
    from .reproduce_localisation import PAPER8, TABLE9

    out = ["### Table 8: localisation error, protocol 1 (central crop, true class), S="
           f"{_here('256', str(q(256)))}, Q=S", "",
           "| fine-tuned layers | regression | error (%) | s.e. | paper |", "|---|---|---|---|---|"]
    for job, paper in PAPER8.items():
        reg, layers = job.split("@")[0].split("-")
        here, se = _cell(cells, f"{job}/p1")
        out.append(f"| {'1st and 2nd FC' if layers == 'fc' else 'all'} | {reg} | {here} | {se} "
                   f"| {_paper(paper)} |")
    out += ["", "### Table 9: top-5 localisation error, protocol 2 (dense, the classifier's "
            "top 5; PCR, all layers fine-tuned)", "",
            "| train S | test Q | error (%) | s.e. | paper |", "|---|---|---|---|---|"]
    for cid, (train_s, test_q, units, paper) in TABLE9.items():
        here, se = _cell(cells, f"{cid}/p2")
        shown_s = ", ".join(_here(s, str(q(int(s)))) for s in train_s.split(", "))
        nets = dict.fromkeys(n for n, _ in units)  # in order: "73 / 101,110" for the fusion
        shown_q = " / ".join(",".join(str(q(pq)) for m, pq in units if m == n) for n in nets)
        label = " (2nd seed)" if "#seed" in cid else " (fusion)" if cid == "fusion" else ""
        out.append(f"| {shown_s}{label} | {_here(test_q, shown_q)} | {here} | {se} | "
                   f"{_paper(paper)} |")
    return out


def _here(paper: str, here: str) -> str:
    """The paper's scales, with this run's beside them where a reduced preset changes them."""
    return paper if paper == here else f"{paper} (here {here})"


def localisation_study_report(cells: Mapping, study, trained: Sequence[Mapping],
                              localizers: Sequence[Mapping], timing: Mapping) -> str:
    """OUT/localisation/report.md."""
    from .protocol import LOCALISATION_PRESETS
    from .reproduce_localisation import FINDINGS, judge, noise

    p, d = study.preset, study.dataset
    rec = LOCALISATION_PRESETS[p.train_preset]
    lr_note = ("" if rec["lr"] == 1e-3 else " (the paper: 1e-3, which barely moves boxes "
               "encoded in [0, 1] within a few epochs; docs/localisation.md)")
    level = noise(cells)
    lines = [
        "# Reproducing Simonyan & Zisserman (ICLR 2015), Appendix A: localisation (Tables 8-9)",
        "", f"- Study preset `{study.s.preset}`: classifiers VGG D"
        f"{' with batch norm' if p.batch_norm else ''}, width {study.base.width:g}, crop "
        f"{study.crop}, S=256 from scratch ({p.epochs or study.base.epochs} epochs), S=384 from "
        f"it at lr/10 ({p.finetune_epochs or study.base.epochs} epochs); localisation nets: "
        f"lr {rec['lr']:g}{lr_note}, batch {study.s.batch_size or rec['batch_size']}, "
        f"{p.localizer_epochs or rec['epochs']} epochs, fixed S, validated by protocol 1; "
        "evaluated from last.pt",
        f"- Data: `{study.data}`: {len(d.train):,} training and {len(d.val):,} validation images,"
        f" {len(d.class_names)} classes",
        f"- Measured: {timing['date']}, this invocation {timing['invocation_s'] / 60:.1f} min "
        f"(training {timing['training_s'] / 60:.1f} min, evaluation "
        f"{timing['evaluation_s'] / 60:.1f} min); {timing['cpu_cores']} CPU cores, "
        f"{timing['threads']} torch thread(s); load average {timing['load_average_start'][0]:.1f}"
        f" at the start, {timing['load_average_end'][0]:.1f} at the end (a shared machine)",
        "", "Errors in %: **this run's** beside the paper's (ILSVRC-2012 validation set); "
        "s.e.: one binomial standard error of this run's number.", "",
        *study_tables(cells, study.q), "", "## Noise", ""]
    for key, text in (("seed_difference_p1", "protocol 1, PCR all layers S=256"),
                      ("seed_difference_p2", "protocol 2, S=256 Q=256")):
        if key in level:
            lines.append(f"- Two seeds of the same net differ by {level[key]:.1f} points ({text}).")
    lines += [f"- Two errors near 50% over these images differ by {level['se_difference']:.1f} "
              "points (one standard error of a difference) by chance alone.", "",
              "## Findings", "", "Judged in the paper's direction (lower error); a difference "
              f"under {max(level.values(), default=0):.1f} points (the larger noise measure) is "
              "marked within noise.", "", "| finding | paper | this run | reproduced |",
              "|---|---|---|---|"]
    for f in FINDINGS:
        ours, verdict = judge(cells, f, max(level.values(), default=0.0))
        lines.append(f"| {f.claim} | {f.paper} | {ours or '-'} | {verdict} |")
    lines += ["", "## Training runs", "", "| net | epochs | status | minutes | best val. error |",
              "|---|---|---|---|---|"]
    lines += [f"| classifier {t['net']} | {t['epochs']} | {t['status']} | "
              f"{t['seconds'] / 60:.1f} | top-1 {t['best_top1_err']:.1f}% |" for t in trained]
    lines += [f"| localiser {t['net']} | {t['epochs']} | {t['status']} | {t['seconds'] / 60:.1f}"
              f" | protocol 1 {t['best_error']:.1f}% |" for t in localizers]
    return "\n".join(lines) + "\n"
