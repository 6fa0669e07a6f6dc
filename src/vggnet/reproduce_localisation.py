"""The paper's localisation study (Appendix A, Tables 8 and 9) as one resumable run, on the
structure of ``vggnet.reproduce``: the same study folder, built-in data, training of the
classifiers, cells stored as JSON when done and kept on a rerun, and a Markdown report with
each measured cell beside the paper's number and a verdict on each finding.

The plan: config D (with batch norm in the reduced preset) trained as a classifier at S=256
from scratch and at S=384 from it (lr/10), the paper's chain; localisation nets made from
them (``vggnet.localize_train``): at S=256, single-class and per-class regression with fc6-fc8
fine-tuned, and per-class with all layers (Table 8, protocol 1); per-class with all layers
at S=384 too, for Table 9's rows (protocol 2: S=256 at Q=256, S=384 at Q=384 and at
Q={352, 384}, and the fusion of the two nets). The noise level: the S=256 per-class all-layer
net is trained a second time with another seed, and each error's binomial standard error
is reported. Everything lives in OUT/localisation/ (the built-in data in OUT/data, shared
with the classification study).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .protocol import LOCALISATION_PRESETS, for_crop
from .reproduce import NetJob, Study, _file, _write_json, load_cells
from .settings import StudySettings

SCALES = {"256": 256, "384": 384}  # the classifiers' training S, paper pixels
CLASSIFIERS = (NetJob("D", "256"), NetJob("D", "384", "D@256", 0.1))
SHORT = {"single-class": "SCR", "per-class": "PCR"}


@dataclass(frozen=True)
class LocJob:
    """One localisation net: regression, fine-tuned layers, from the classifier ``net``."""

    regression: str
    finetune: str
    net: str  # "D@256" | "D@384"
    seed: int = 0

    @property
    def id(self) -> str:
        scale = self.net.split("@")[1]
        return f"{SHORT[self.regression]}-{self.finetune}@{scale}" + (
            f"#seed{self.seed}" if self.seed else "")


def loc_jobs() -> list[LocJob]:
    """Table 8's three settings and one the paper leaves out (SCR, all layers), at S=256;
    the best at S=384 (Table 9); the S=256 per-class all-layer net again with seed 1."""
    return [LocJob("single-class", "fc", "D@256"), LocJob("per-class", "fc", "D@256"),
            LocJob("single-class", "all", "D@256"), LocJob("per-class", "all", "D@256"),
            LocJob("per-class", "all", "D@384"), LocJob("per-class", "all", "D@256", seed=1)]


# Table 8 (protocol 1, % error; the paper does not run SCR with all layers) and Table 9
# (protocol 2, top-5 localisation error on the validation set)
PAPER8 = {"SCR-fc@256": 36.4, "PCR-fc@256": 34.3, "SCR-all@256": None, "PCR-all@256": 33.1}
TABLE9 = {  # cell -> (train S, test Q in paper pixels, the rows' units: (net, Q)), paper error
    "S256-Q256": ("256", "256", (("PCR-all@256", 256),), 29.5),
    "S384-Q384": ("384", "384", (("PCR-all@384", 384),), 28.2),
    "S384-Q352,384": ("384", "352,384", (("PCR-all@384", 352), ("PCR-all@384", 384)), 27.5),
    "fusion": ("256, 384", "256 / 352,384", (("PCR-all@256", 256), ("PCR-all@384", 352),
                                             ("PCR-all@384", 384)), 26.9),
    "S256-Q256#seed1": ("256", "256", (("PCR-all@256#seed1", 256),), None),
}


class LocalisationStudy(Study):
    """OUT/localisation/{nets, localizers, cells, report.md, timing.json}; OUT/data."""

    def __init__(self, settings: StudySettings, log=print) -> None:
        super().__init__(settings, log)
        self.out = Path(settings.out) / "localisation"

    def q(self, paper_pixels: int) -> int:
        return for_crop(paper_pixels, self.crop)

    # --- training ---
    def train_localizer(self, job: LocJob) -> dict:
        from .localize_train import new_box_run
        from .train import train

        folder = self.out / "localizers" / job.id
        done = folder / "done.json"
        if done.is_file():
            import json

            return json.loads(done.read_text())
        runtime = dict(device=self.s.device, precision=self.s.precision, workers=self.s.workers,
                       progress=self.s.progress)
        if (folder / "last.pt").is_file():
            self.log(f"[{job.id}] resuming the interrupted localisation run in {folder}")
            result = train(resume=folder, task=_resuming(), **runtime)
        else:
            lr, batch = localizer_recipe(self.preset.train_preset, self.s.batch_size)
            settings, task = new_box_run(
                str(self.net_folder(job.net) / "last.pt"), self.data, job.regression,
                job.finetune, self.q(SCALES[job.net.split("@")[1]]),
                preset=self.preset.train_preset, out=str(folder), seed=job.seed, scan=False,
                epochs=self.preset.localizer_epochs, batch_size=batch, lr=lr, **runtime)
            self.log(f"[{job.id}] training a {job.regression} localisation net from {job.net}"
                     f" ({job.finetune} layers, S={settings.scale[0]}, lr {settings.lr:g})")
            result = train(settings, task=task)
        if result.status == "interrupted":
            raise KeyboardInterrupt
        summary = {"net": job.id, "status": result.status, "epochs": result.epochs,
                   "seconds": result.seconds, "best_error": 100 * result.best_top1_err}
        _write_json(done, summary)
        return summary

    # --- evaluation ---
    def samples(self):
        from .localize_eval import boxed_samples
        from .localize_train import box_file

        ds = self.dataset
        boxed, note = boxed_samples(ds.val.samples, ds.class_names,
                                    box_file(self.data, "val", None))
        self.log(note)
        return boxed

    def member(self, job_id: str, classifier: bool = False):
        from .localize_eval import load_member

        net = job_id.split("-")[1].split("#")[0].split("@")[1]
        clf = str(self.net_folder(f"D@{net}") / "last.pt") if classifier else None
        return load_member(str(self.out / "localizers" / job_id / "last.pt"), clf,
                           with_classifier=classifier)

    def protocol1(self, samples, runtime) -> None:
        from .localize_eval import protocol1_rows

        for job in loc_jobs():
            cid = f"{job.id}/p1"
            if (self.out / "cells" / _file(cid)).is_file():
                continue
            m = self.member(job.id)
            row = protocol1_rows([m], samples, self.dataset.class_names, None, runtime,
                                 self.preset.eval_batch)[m.name]
            _write_json(self.out / "cells" / _file(cid), {"cell": cid, **row})
            self.log(f"[{cid}] protocol-1 error {row['error']:.2f}% ({row['images']} images)")

    def protocol2(self, samples, runtime) -> None:
        from .localize_eval import protocol2_rows

        if all((self.out / "cells" / _file(f"{c}/p2")).is_file() for c in TABLE9):
            return
        names = sorted({n for *_, units, _ in TABLE9.values() for n, _ in units})
        members = [self.member(n, classifier=True) for n in names]
        rows = {c: [(names.index(n), self.q(q)) for n, q in units]
                for c, (*_, units, _) in TABLE9.items()}
        out = protocol2_rows(members, rows, samples, self.dataset.class_names, runtime,
                             progress=self.s.progress)
        for c, row in out.items():
            row["members"] = [Path(m).parent.name for m in row["members"]]
            _write_json(self.out / "cells" / _file(f"{c}/p2"), {"cell": f"{c}/p2", **row})
            self.log(f"[{c}] top-5 localisation error {row['error']:.2f}% ({row['images']} "
                     "images)")

    # --- the whole thing ---
    def _run(self) -> Path:
        from .runtime import make_runtime

        t0, load0 = time.perf_counter(), os.getloadavg()
        self.prepare_data()  # a bad --data is refused before the study folder is made
        self.out.mkdir(parents=True, exist_ok=True)
        trained = [self.train_net(j) for j in CLASSIFIERS]
        localizers = [self.train_localizer(j) for j in loc_jobs()]
        samples = self.samples()
        runtime = make_runtime(self.s.device, self.s.precision)
        self.protocol1(samples, runtime)
        self.protocol2(samples, runtime)
        timing = {"training_s": sum(t["seconds"] for t in trained + localizers),
                  "evaluation_s": sum(c.get("seconds", 0.0) for c in load_cells(self.out)
                                      .values()),
                  "invocation_s": time.perf_counter() - t0, "load_average_start": load0,
                  "load_average_end": os.getloadavg(), "cpu_cores": os.cpu_count(),
                  "threads": torch.get_num_threads(), "device": self.s.device,
                  "date": time.strftime("%Y-%m-%d %H:%M")}
        _write_json(self.out / "timing.json", timing)
        text = localisation_study_report(load_cells(self.out), self, trained, localizers, timing)
        (self.out / "report.md").write_text(text)
        return self.out / "report.md"


def _resuming():
    from .localize_train import BoxTask

    return BoxTask()


# --- noise and findings ---------------------------------------------------------------------
def standard_error(error: float, images: int) -> float:
    """One binomial standard error, in points, of an error rate (%) over ``images``."""
    p = error / 100
    return 100 * math.sqrt(p * (1 - p) / images) if images else math.nan


def noise(cells) -> dict:
    """The noise level: the two seeds' difference (protocol 1 and 2) and the standard error
    of the difference of two errors near 50% (the largest) over the images evaluated."""
    out = {}
    for p, a, b in (("p1", "PCR-all@256/p1", "PCR-all@256#seed1/p1"),
                    ("p2", "S256-Q256/p2", "S256-Q256#seed1/p2")):
        if a in cells and b in cells:
            out[f"seed_difference_{p}"] = abs(cells[a]["error"] - cells[b]["error"])
    images = min((c["images"] for c in cells.values()), default=0)
    out["se_difference"] = math.sqrt(2) * standard_error(50.0, images)
    return out


@dataclass(frozen=True)
class Finding:
    claim: str
    paper: str
    better: str  # the cell the paper finds lower
    worse: tuple[str, ...]


FINDINGS = (
    Finding("Per-class regression beats single-class (fc6-fc7 fine-tuned, protocol 1)",
            "PCR 34.3 < SCR 36.4", "PCR-fc@256/p1", ("SCR-fc@256/p1",)),
    Finding("Fine-tuning all layers beats fc6-fc7 only (PCR, protocol 1)",
            "all 33.1 < fc 34.3", "PCR-all@256/p1", ("PCR-fc@256/p1",)),
    Finding("Training at S=384 beats S=256 (protocol 2, Q=S)", "28.2 < 29.5",
            "S384-Q384/p2", ("S256-Q256/p2",)),
    Finding("Two test scales beat one (S=384: Q={352,384} vs Q=384)", "27.5 < 28.2",
            "S384-Q352,384/p2", ("S384-Q384/p2",)),
    Finding("Fusing the S=256 and S=384 nets beats each", "26.9 < 27.5, 29.5", "fusion/p2",
            ("S384-Q352,384/p2", "S256-Q256/p2")),
)


def judge(cells, f: Finding, level: float) -> tuple[str, str]:
    """(this run's evidence, verdict): "yes"/"no" in the paper's direction (strictly lower
    error), "within noise" when a difference is smaller than ``level`` points."""
    if f.better not in cells or any(w not in cells for w in f.worse):
        return "", "not measured"
    b = cells[f.better]["error"]
    diffs = [cells[w]["error"] - b for w in f.worse]
    notes = "; ".join(f"{b:.1f} {'<' if d > 0 else '>='} {cells[w]['error']:.1f}"
                      for w, d in zip(f.worse, diffs, strict=True))
    verdict = "yes" if all(d > 0 for d in diffs) else "no"
    if any(abs(d) < level for d in diffs):
        verdict += " (within noise)"
    return notes, verdict


def localisation_study_command(s: StudySettings) -> int:
    """``vggnet reproduce --study localisation``: run or resume it, print the verdicts."""
    report = LocalisationStudy(s).run()
    cells = load_cells(Path(s.out) / "localisation")
    level = max(noise(cells).values(), default=0.0)
    for f in FINDINGS:
        print(f"{judge(cells, f, level)[1]:>20}: {f.claim}")
    print(f"wrote {report}")
    return 0


# --- the localisation study's report --------------------------------------------------------------
def _cell(cells: Mapping, cid: str) -> tuple[str, str]:
    """(this run's error in bold, its standard error) or ("not run", "")."""
    c = cells.get(cid)
    if c is None:
        return "not run", ""
    return f"**{c['error']:.1f}**", f"{standard_error(c['error'], c['images']):.1f}"


def _paper(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def study_tables(cells: Mapping, q) -> list[str]:
    """Tables 8 and 9 with this run's numbers beside the paper's; ``q``: paper pixels -> here."""
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


def localizer_recipe(preset: str, batch_size: int | None) -> tuple[float, int]:
    """(lr, batch) of the study's localisation nets: the preset's, with the lr scaled in
    proportion when --batch-size changes the batch (the linear scaling rule: at batch 16 the
    reduced preset's lr 0.05 for batch 64 diverged)."""
    rec = LOCALISATION_PRESETS[preset]
    batch = batch_size or rec["batch_size"]
    return rec["lr"] * batch / rec["batch_size"], batch


def localisation_study_report(cells: Mapping, study, trained: Sequence[Mapping],
                              localizers: Sequence[Mapping], timing: Mapping) -> str:
    """OUT/localisation/report.md."""
    p, d = study.preset, study.dataset
    rec = LOCALISATION_PRESETS[p.train_preset]
    lr, batch = localizer_recipe(p.train_preset, study.s.batch_size)
    lr_note = ("" if rec["lr"] == 1e-3 else " (the paper: 1e-3, which barely moves boxes "
               "encoded in [0, 1] within a few epochs; docs/localisation.md)")
    if batch != rec["batch_size"]:
        lr_note += f" (the preset's {rec['lr']:g} at batch {rec['batch_size']}, scaled)"
    level = noise(cells)
    lines = [
        "# Reproducing Simonyan & Zisserman (ICLR 2015), Appendix A: localisation (Tables 8-9)",
        "", f"- Study preset `{study.s.preset}`: classifiers VGG D"
        f"{' with batch norm' if p.batch_norm else ''}, width {study.base.width:g}, crop "
        f"{study.crop}, S=256 from scratch ({p.epochs or study.base.epochs} epochs), S=384 from "
        f"it at lr/10 ({p.finetune_epochs or study.base.epochs} epochs); localisation nets: "
        f"lr {lr:g}{lr_note}, batch {batch}, "
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
