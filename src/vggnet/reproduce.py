"""The paper's study (Tables 3-6) as one resumable run: train the nets, evaluate every cell,
write a Markdown report with each measured cell beside the paper's number and a verdict on
each of the paper's findings.

Names used throughout:
  net   "D@256", "D@384", "D@jit": config D trained at fixed S=256, fixed S=384, S in [256;512]
        (in paper pixels; a reduced preset scales them by crop/224).
  cell  "<net>/<single|multi>/<method>" for one net, "<ensemble>/multi/<method>" for ensembles.
Every cell's result is a JSON file in OUT/cells/, written when the cell is done; a rerun only
does the cells (and trainings) that have no file yet.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import atomic_write
from .model import ARCHS
from .progress import progress_bar
from .protocol import PAPER_CROP, TRAIN_SCALES, train_scale
from .settings import StudySettings, make_settings

# --- what the paper trained and measured ------------------------------------------------------


@dataclass(frozen=True)
class NetJob:
    """One training run: config ``arch`` at training scale ``scale``, started from ``init_from``."""

    arch: str
    scale: str  # "256" | "384" | "jit"
    init_from: str | None = None  # a net id; None: from scratch
    lr_factor: float = 1.0  # times the preset's learning rate (the paper's 1e-3 for S=384 is 1/10)

    @property
    def id(self) -> str:
        return f"{self.arch}@{self.scale}"


def net_jobs() -> list[NetJob]:
    """The paper's stage chaining, in an order where every net's parent comes first.

    A and A-LRN from scratch at S=256; B..E at S=256 from A (its first four convs and three
    FC layers); C, D, E at S=384 from their S=256 net at lr/10; jittered S from the S=384 net.
    """
    jobs = [NetJob("A", "256"), NetJob("A-LRN", "256")]
    jobs += [NetJob(a, "256", "A@256") for a in ("B", "C", "D", "E")]
    jobs += [NetJob(a, "384", f"{a}@256", 0.1) for a in ("C", "D", "E")]
    jobs += [NetJob(a, "jit", f"{a}@384", 0.1) for a in ("C", "D", "E")]
    return jobs


# Table 3 (single test scale), Table 4 (multi-scale), Table 5 (jittered S, Q={256,384,512})
# and Table 6 (ensembles): (top-1, top-5) validation error in %.
PAPER: dict[str, tuple[float, float]] = {
    "A@256/single/dense": (29.6, 10.4), "A-LRN@256/single/dense": (29.7, 10.5),
    "B@256/single/dense": (28.7, 9.9),
    "C@256/single/dense": (28.1, 9.4), "C@384/single/dense": (28.1, 9.3),
    "C@jit/single/dense": (27.3, 8.8),
    "D@256/single/dense": (27.0, 8.8), "D@384/single/dense": (26.8, 8.7),
    "D@jit/single/dense": (25.6, 8.1),
    "E@256/single/dense": (27.3, 9.0), "E@384/single/dense": (26.9, 8.7),
    "E@jit/single/dense": (25.5, 8.0),
    "B@256/multi/dense": (28.2, 9.6),
    "C@256/multi/dense": (27.7, 9.2), "C@384/multi/dense": (27.8, 9.2),
    "C@jit/multi/dense": (26.3, 8.2),
    "D@256/multi/dense": (26.6, 8.6), "D@384/multi/dense": (26.5, 8.6),
    "D@jit/multi/dense": (24.8, 7.5),
    "E@256/multi/dense": (26.9, 8.7), "E@384/multi/dense": (26.7, 8.6),
    "E@jit/multi/dense": (24.8, 7.5),
    "D@jit/multi/multicrop": (24.6, 7.5), "D@jit/multi/dense+multicrop": (24.4, 7.2),
    "E@jit/multi/multicrop": (24.6, 7.4), "E@jit/multi/dense+multicrop": (24.4, 7.1),
    "7 nets/multi/dense": (24.7, 7.5),
    "D+E/multi/dense": (24.0, 7.1), "D+E/multi/multicrop": (23.9, 7.2),
    "D+E/multi/dense+multicrop": (23.7, 6.8),
}
# The ILSVRC-2014 submission (Table 6, first row): seven nets, each multi-scale dense.
SEVEN = ("D@256", "D@384", "D@jit", "C@256", "C@384", "E@256", "E@384")
ENSEMBLES = {"7 nets": SEVEN, "D+E": ("D@jit", "E@jit")}


@dataclass(frozen=True)
class EvalJob:
    """One evaluation pass of one net: its scales ("single"/"multi") and the methods it feeds."""

    net: str
    scales: str
    methods: tuple[str, ...]
    keep_posteriors: bool = False  # an ensemble cell needs them

    @property
    def id(self) -> str:
        return f"{self.net}/{self.scales}"


def eval_jobs() -> list[EvalJob]:
    jobs = [EvalJob(j.id, "single", ("dense",)) for j in net_jobs()]
    for j in net_jobs():
        if j.arch in ("A", "A-LRN"):
            continue  # Table 4 starts at B
        both = j.scale == "jit" and j.arch in ("D", "E")
        methods = ("dense", "multicrop") if both else ("dense",)
        keep = j.id in SEVEN or j.id in ENSEMBLES["D+E"]
        jobs.append(EvalJob(j.id, "multi", methods, keep))
    return jobs


def ensemble_cells() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """cell id -> (member nets, methods averaged)."""
    return {"7 nets/multi/dense": (SEVEN, ("dense",)),
            "D+E/multi/dense": (ENSEMBLES["D+E"], ("dense",)),
            "D+E/multi/multicrop": (ENSEMBLES["D+E"], ("multicrop",)),
            "D+E/multi/dense+multicrop": (ENSEMBLES["D+E"], ("dense", "multicrop"))}


# --- the report -------------------------------------------------------------------------------
Cells = Mapping[str, Mapping]  # cell id -> {"top1_err", "top5_err", "images", ...}


def _pair(cells: Cells, cid: str) -> list[str]:
    """[top-1 here, top-1 paper, top-5 here, top-5 paper] for one cell."""
    ours, paper = cells.get(cid), PAPER[cid]
    here = ([f"**{ours['top1_err']:.1f}**", f"**{ours['top5_err']:.1f}**"] if ours
            else ["not run"] * 2)
    return [here[0], f"{paper[0]:.1f}", here[1], f"{paper[1]:.1f}"]


def _scaled(text: str, factor: float) -> str:
    """"224,256,288" -> "224,256,288 (here 64,73,82)" for a reduced preset (factor = crop/224)."""
    if factor == 1.0:
        return text
    import re

    return f"{text} (here {re.sub(r'[0-9]+', lambda m: str(round(int(m.group()) * factor)), text)})"


def _q(cells: Cells, cid: str, paper_q: str, factor: float) -> str:
    """The paper's test scales, with the ones this run used (recorded in the cell) beside them."""
    used = cells.get(cid, {}).get("scales")
    if used is None:
        return _scaled(paper_q, factor)
    here = ",".join(str(q) for q in used)
    return paper_q if here == paper_q else f"{paper_q} (here {here})"


TRAIN_S = {"256": "256", "384": "384", "jit": "[256;512]"}
TEST_Q = {"single": {"256": "256", "384": "384", "jit": "384"},
          "multi": {"256": "224,256,288", "384": "352,384,416", "jit": "256,384,512"}}
ERR_HEAD = "top-1 val. error (%) | paper | top-5 val. error (%) | paper"


def tables(cells: Cells, factor: float = 1.0) -> str:
    """Tables 3-6 laid out as in the paper, with this run's number beside each of the paper's."""
    out = []
    for number, scales, title in ((3, "single", "ConvNet performance at a single test scale"),
                                  (4, "multi", "ConvNet performance at multiple test scales")):
        out += [f"### Table {number}: {title} (dense evaluation)", "",
                f"| ConvNet config. (Table 1) | train (S) | test (Q) | {ERR_HEAD} |",
                "|---|---|---|---|---|---|---|"]
        for a in ARCHS:
            first = True
            for s in TRAIN_SCALES:
                cid = f"{a}@{s}/{scales}/dense"
                if cid in PAPER:
                    row = [a if first else "", _scaled(TRAIN_S[s], factor),
                           _q(cells, cid, TEST_Q[scales][s], factor), *_pair(cells, cid)]
                    out.append("| " + " | ".join(row) + " |")
                    first = False
        out.append("")
    out += [f"### Table 5: ConvNet evaluation techniques comparison (train "
            f"S={_scaled('[256;512]', factor)}, test "
            f"Q={_q(cells, 'D@jit/multi/dense', '256,384,512', factor)})", "",
            f"| ConvNet config. (Table 1) | Evaluation method | {ERR_HEAD} |",
            "|---|---|---|---|---|---|"]
    for a in ("D", "E"):
        for i, (m, label) in enumerate((("dense", "dense"), ("multicrop", "multi-crop"),
                                        ("dense+multicrop", "multi-crop & dense"))):
            out.append(f"| {a if i == 0 else ''} | {label} | "
                       + " | ".join(_pair(cells, f"{a}@jit/multi/{m}")) + " |")
    out += ["", "### Table 6: Multiple ConvNet fusion results", "",
            f"| Combined ConvNet models | {ERR_HEAD} |", "|---|---|---|---|---|",
            "| *ILSVRC submission:* (D/256/224,256,288), (D/384/352,384,416), "
            "(D/[256;512]/256,384,512), (C/256/224,256,288), (C/384/352,384,416), "
            "(E/256/224,256,288), (E/384/352,384,416) | "
            + " | ".join(_pair(cells, "7 nets/multi/dense")) + " |"]
    de = "(D/[256;512]/256,384,512), (E/[256;512]/256,384,512)"
    for m, label in (("dense", "dense eval."), ("multicrop", "multi-crop"),
                     ("dense+multicrop", "multi-crop & dense eval.")):
        out.append(f"| *post-submission:* {de}, {label} | "
                   + " | ".join(_pair(cells, f"D+E/multi/{m}")) + " |")
    return "\n".join(out)


@dataclass(frozen=True)
class Finding:
    claim: str
    paper: str  # the paper's evidence
    ours: str  # this run's evidence
    verdict: str  # "yes", "partly (k of n)", "no", "not measured"


def _compare(cells: Cells, pairs: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """Each (better, worse) pair holds when better's top-1 error < worse's; verdict over pairs."""
    held, seen, notes = 0, 0, []
    for better, worse in pairs:
        if better not in cells or worse not in cells:
            continue
        b, w = cells[better]["top1_err"], cells[worse]["top1_err"]
        seen += 1
        held += b < w
        notes.append(f"{_short(better)} {b:.1f} {'<' if b < w else '>=' } {_short(worse)} {w:.1f}")
    if seen == 0:
        return "not measured", notes
    verdict = "yes" if held == seen else "no" if held == 0 else f"partly ({held} of {seen})"
    return verdict, notes


METHOD_NAMES = {"multicrop": "multi-crop", "dense+multicrop": "multi-crop & dense"}


def _short(cid: str) -> str:
    """"D@jit/multi/multicrop" -> "D/[256;512] multi-scale multi-crop" (the paper's notation)."""
    net, scales, method = cid.split("/")
    arch, _, s = net.partition("@")
    name = f"{arch}/{TRAIN_S[s]}" if s else arch
    return " ".join([name] + (["multi-scale"] if scales == "multi" and "@" in net else [])
                    + ([] if method == "dense" else [METHOD_NAMES[method]]))


def _best(cells: Cells, cids: list[str]) -> str | None:
    have = [c for c in cids if c in cells]
    return min(have, key=lambda c: cells[c]["top1_err"]) if have else None


def findings(cells: Cells) -> list[Finding]:
    """The paper's findings, each judged on top-1 error in the paper's direction (strictly
    lower error); "LRN does not help" holds unless A-LRN is better by more than the noise."""
    def one(cid):
        return f"{cid.split('/')[0]}/single/dense"

    out = []
    # depth: A > B > the better of D and E (the paper's E is a little worse than D at S=256)
    deep = _best(cells, [one("D@256"), one("E@256")])
    pairs = [(one("B@256"), one("A@256"))] + ([(deep, one("B@256"))] if deep else [])
    v, notes = _compare(cells, pairs)
    out.append(Finding("Depth helps (A 11 layers -> B 13 -> D/E 16/19, S=256, Q=256)",
                       "A 29.6 > B 28.7 > D 27.0 (E 27.3)", "; ".join(notes), v))
    # LRN does not help: A-LRN is not better than A by more than the noise (one standard error)
    se = standard_error(cells) or 0.0
    if one("A@256") in cells and one("A-LRN@256") in cells:
        a, lrn = cells[one("A@256")]["top1_err"], cells[one("A-LRN@256")]["top1_err"]
        v = "yes" if lrn > a - se else "no"
        note = f"A-LRN {lrn:.1f} vs A {a:.1f} (not better by more than 1 s.e. = {se:.1f}: {v})"
    else:
        v, note = "not measured", ""
    out.append(Finding("LRN does not improve A (A-LRN vs A)", "A-LRN 29.7 vs A 29.6", note, v))
    v, notes = _compare(cells, [(f"D@{s}/single/dense", f"C@{s}/single/dense")
                                for s in TRAIN_SCALES])
    out.append(Finding("3x3 convs beat 1x1 at equal depth (D vs C, every training scale)",
                       "D 27.0/26.8/25.6 < C 28.1/28.1/27.3", "; ".join(notes), v))
    pairs = [(f"{a}@jit/single/dense", f"{a}@{s}/single/dense") for a in ("C", "D", "E")
             for s in ("256", "384")]
    v, notes = _compare(cells, pairs)
    out.append(Finding("Scale jittering at training helps, even at a single test scale (C, D, E)",
                       "jittered 27.3/25.6/25.5 < fixed S 28.1/26.8/26.9 at best",
                       "; ".join(notes), v))
    pairs = [(k, k.replace("/multi/", "/single/")) for k in PAPER
             if k.endswith("/multi/dense") and "@" in k]
    v, notes = _compare(cells, pairs)
    out.append(Finding("Multi-scale testing helps (Table 4 vs Table 3, every cell)",
                       "e.g. D jittered 24.8 (multi) < 25.6 (single)", "; ".join(notes), v))
    pairs = [(f"{a}@jit/multi/dense+multicrop", f"{a}@jit/multi/{m}") for a in ("D", "E")
             for m in ("dense", "multicrop")]
    v, notes = _compare(cells, pairs)
    out.append(Finding("Dense and multi-crop evaluation are complementary (their average beats "
                       "each)",
                       "D 24.4 < 24.8 dense, 24.6 multi-crop; E 24.4 < 24.8, 24.6",
                       "; ".join(notes), v))
    pairs = [(f"D+E/multi/{m}", f"{a}@jit/multi/{m}")
             for m in ("dense", "multicrop", "dense+multicrop") for a in ("D", "E")]
    v, notes = _compare(cells, pairs)
    out.append(Finding("The D+E ensemble beats each of its nets (every evaluation method)",
                       "D+E 24.0/23.9/23.7 < D, E 24.8/24.6/24.4", "; ".join(notes), v))
    return out


def standard_error(cells: Cells) -> float | None:
    """One standard error (points) of a top-1 error near the median measured one."""
    errs = sorted(c["top1_err"] for c in cells.values())
    ns = [c["images"] for c in cells.values()]
    if not errs or not min(ns):
        return None
    p = errs[len(errs) // 2] / 100
    return 100 * math.sqrt(p * (1 - p) / min(ns))


def render_report(cells: Cells, *, title_lines: list[str], factor: float = 1.0) -> str:
    """The whole Markdown report."""
    lines = ["# Reproducing Simonyan & Zisserman (ICLR 2015), Tables 3-6", "", *title_lines, "",
             "Errors in %: **this run's**, each beside the paper's (ILSVRC-2012 validation set). "
             "Scales are the paper's, with this run's in brackets where the preset scales them."]
    se = standard_error(cells)
    if se is not None:
        lines.append(f"With {min(c['images'] for c in cells.values())} validation images, a "
                     f"top-1 error near the median here has a standard error of about {se:.1f} "
                     "points: smaller differences between cells are within noise.")
    lines += ["", tables(cells, factor), "", "## Findings", "",
              "Each is judged on top-1 error in the direction the paper reports.", "",
              "| finding | paper | this run | reproduced |", "|---|---|---|---|"]
    for f in findings(cells):
        lines.append(f"| {f.claim} | {f.paper} | {f.ours or '-'} | {f.verdict} |")
    return "\n".join(lines) + "\n"


# --- running the study --------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    """Atomically, with fsync: a crash leaves the old file or none, never half of one."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def _file(cid: str) -> str:
    return cid.replace("/", "__").replace(" ", "_") + ".json"


def load_cells(out: str | os.PathLike) -> dict[str, dict]:
    """Every finished cell in OUT/cells, by cell id."""
    folder = Path(out) / "cells"
    cells = {}
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        d = json.loads(f.read_text())
        cells[d["cell"]] = d
    return cells


class Study:
    """One study in one folder: OUT/data (the built-in dataset), OUT/nets/<net> (training runs),
    OUT/cells/*.json (results), OUT/posteriors (what ensembles need), OUT/report.md."""

    def __init__(self, settings: StudySettings, log: Callable[[str], None] = print) -> None:
        self.s, self.log = settings, log
        self.preset = settings.resolved()
        self.out = Path(settings.out)
        self.base = make_settings(self.preset.train_preset, width=settings.width,
                                  batch_size=self.preset.batch_size)
        self.crop = self.base.crop_size
        self.data = settings.data
        self.data_dir = self.out / "data"  # the built-in dataset, when no --data

    # --- data ---
    def prepare_data(self) -> None:
        """The built-in dataset unless --data; then one scan for bad files (training skips its
        own scan), refusing to start on bad files as training does."""
        from .data import check_dataset, format_bad, open_dataset
        from .synthetic import SyntheticSpec, is_made, make_synthetic

        if self.data is None:
            spec = SyntheticSpec(train_per_class=self.preset.train_per_class,
                                 val_per_class=self.preset.val_per_class)
            self.data = str(self.data_dir)
            total = spec.count("train") + spec.count("val")
            fresh = self.s.progress and not is_made(self.data, spec)
            with progress_bar(total, "writing", enabled=fresh) as bar:
                if make_synthetic(self.data, spec, progress=bar.update):
                    self.log(f"wrote the built-in dataset to {self.data}")
        dataset = open_dataset(self.data)
        with progress_bar(len(dataset.train) + len(dataset.val), "scanning",
                          enabled=self.s.progress) as bar:
            report = check_dataset(dataset, progress=bar.update)
        if report.bad:
            raise ValueError(f"{len(report.bad)} file(s) in {self.data!r} cannot be decoded; the "
                             f"study did not start:\n{format_bad(report.bad)}\nfix or remove them")
        self.dataset = report.dataset

    # --- training ---
    def net_folder(self, net: str) -> Path:
        return self.out / "nets" / net

    def train_net(self, job: NetJob) -> dict:
        from .train import train

        folder = self.net_folder(job.id)
        done = folder / "done.json"
        if done.is_file():
            return json.loads(done.read_text())
        first_stage = job.scale == "256"
        runtime = dict(device=self.s.device, precision=self.s.precision, workers=self.s.workers,
                       progress=self.s.progress)
        if (folder / "last.pt").is_file():
            self.log(f"[{job.id}] resuming the interrupted training run in {folder}")
            result = train(resume=folder, **runtime)
        else:
            settings = make_settings(
                self.preset.train_preset, data=self.data, out=str(folder), model=job.arch,
                width=self.s.width, batch_size=self.preset.batch_size,
                scale=train_scale(job.scale, self.crop),
                init_from=str(self.net_folder(job.init_from)) if job.init_from else None,
                lr=self.base.lr * job.lr_factor, batch_norm=self.preset.batch_norm or None,
                # every copied layer at this lr (job.lr_factor is already the paper's lr/10)
                transfer_lr_factor=1.0 if job.init_from else None,
                scan=False, **runtime,
                epochs=self.preset.epochs if first_stage else self.preset.finetune_epochs)
            self.log(f"[{job.id}] training VGG {job.arch} at S={list(settings.scale)}"
                     + (f", initialised from {job.init_from}, lr {settings.lr:g}"
                        if job.init_from else ""))
            result = train(settings)
        if result.status == "interrupted":
            raise KeyboardInterrupt
        summary = {"net": job.id, "status": result.status, "epochs": result.epochs,
                   "seconds": result.seconds, "best_top1_err": 100 * result.best_top1_err,
                   "best_top5_err": 100 * result.best_top5_err}
        _write_json(done, summary)
        self.log(f"[{job.id}] {result.status} after {result.epochs} epochs, "
                 f"{result.seconds / 60:.1f} min")
        return summary

    # --- evaluation ---
    def evaluate_job(self, job: EvalJob) -> None:
        from .checkpoint import atomic_save
        from .evaluate import evaluate
        from .settings import EvalSettings

        cids = [f"{job.id}/{m}" for m in job.methods]
        if len(job.methods) == 2:
            cids.append(f"{job.id}/dense+multicrop")
        post = self.out / "posteriors" / f"{job.net}__{job.scales}.pt"
        if all((self.out / "cells" / _file(c)).is_file() for c in cids) and (not job.keep_posteriors
                                                                              or post.is_file()):
            return
        ckpt = self.net_folder(job.net) / "last.pt"
        method = "dense+multicrop" if len(job.methods) == 2 else job.methods[0]
        settings = EvalSettings(method=method, multi_scale=job.scales == "multi",
                                batch_size=self.preset.eval_batch)
        r = evaluate([ckpt], self.dataset.val.samples, self.dataset.class_names, settings,
                     device=self.s.device, precision=self.s.precision, progress=self.s.progress)
        common = {"scales": r.scales[0], "skipped": len(r.skipped), "checkpoint": str(ckpt)}
        if len(job.methods) == 2:
            for m in job.methods:
                part = r.parts[f"{ckpt} / {m}"]
                _write_json(self.out / "cells" / _file(f"{job.id}/{m}"),
                            {"cell": f"{job.id}/{m}", **part, **common})
        m = r.metrics
        # the evaluation's time goes with the cell named for its method, once
        _write_json(self.out / "cells" / _file(f"{job.id}/{method}"),
                    {"cell": f"{job.id}/{method}", "top1_err": m["top1_err"],
                     "top5_err": m["top5_err"], "images": m["images"], "seconds": r.seconds,
                     **common})
        if job.keep_posteriors:
            pred = r.posteriors
            atomic_save({"kept": torch.tensor(pred.kept), "labels": r.labels,
                         **{p: pred.posteriors[(0, p)] for p in job.methods}}, post)
        self.log(f"[{job.id}] {method}: top-1 {m['top1_err']:.2f}%, top-5 {m['top5_err']:.2f}% "
                 f"({m['images']} images, {r.images_per_s:.1f}/s)")

    def ensemble(self, cid: str, members: tuple[str, ...], methods: tuple[str, ...]) -> None:
        from .checkpoint import load_checkpoint
        from .evaluate import scores

        path = self.out / "cells" / _file(cid)
        if path.is_file():
            return
        parts = [load_checkpoint(self.out / "posteriors" / f"{n}__multi.pt") for n in members]
        for n, p in zip(members[1:], parts[1:], strict=True):
            if not all(torch.equal(p[k], parts[0][k]) for k in ("kept", "labels")):
                raise ValueError(f"the posteriors of {n} and {members[0]} cover different images; "
                                 f"delete {self.out / 'posteriors'} and rerun to evaluate them "
                                 "again")
        # the paper's fusion: the mean of the members' (and methods') soft-max posteriors
        mean = torch.stack([p[m] for p in parts for m in methods]).mean(0)
        s = scores(mean, parts[0]["labels"], self.dataset.class_names)
        _write_json(path, {"cell": cid, "top1_err": s["top1_err"], "top5_err": s["top5_err"],
                           "images": s["images"], "members": list(members),
                           "methods": list(methods)})
        self.log(f"[{cid}] top-1 {s['top1_err']:.2f}%, top-5 {s['top5_err']:.2f}%")

    # --- the whole thing ---
    def run(self) -> Path:
        threads = torch.get_num_threads()
        if self.preset.threads:
            torch.set_num_threads(self.preset.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> Path:
        t0 = time.perf_counter()
        self.prepare_data()  # a bad --data is refused before the study folder is made
        self.out.mkdir(parents=True, exist_ok=True)
        trained = [self.train_net(j) for j in net_jobs()]
        for j in eval_jobs():
            self.evaluate_job(j)
        for cid, (members, methods) in ensemble_cells().items():
            self.ensemble(cid, members, methods)
        cells = load_cells(self.out)
        train_s = sum(t["seconds"] for t in trained)
        eval_s = sum(c.get("seconds", 0.0) for c in cells.values())
        d = self.dataset
        b = self.base
        title = [
            f"- Study preset `{self.s.preset}` (training preset `{self.preset.train_preset}`): VGG "
            f"width {b.width if self.s.width is None else self.s.width:g}, crop {self.crop}, batch "
            f"{b.batch_size}, lr {b.lr:g} (S=384 and jittered stages: lr/10, initialised from the "
            "previous stage; B-E at S=256 from A), "
            + (f"{self.preset.epochs} epochs per S=256 stage, {self.preset.finetune_epochs} per "
               "later stage" if self.preset.epochs else f"at most {b.epochs} epochs per stage")
            + f", lr divided by 10 after {b.lr_patience} epochs without a better validation error "
            f"(at most {b.lr_drops} times)"
            + ("; **batch norm after every conv** (not in the paper: it lets these nets learn in "
               "the few epochs a CPU allows)" if self.preset.batch_norm else ""),
            f"- Data: `{self.data}` ({d.layout}): {len(d.train):,} training and {len(d.val):,} "
            f"validation images, {len(d.class_names)} classes",
            f"- Measured time: training {train_s / 60:.1f} min (12 nets), evaluation "
            f"{eval_s / 60:.1f} min; this invocation {(time.perf_counter() - t0) / 60:.1f} min "
            f"({os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s), device "
            f"{self.s.device})",
        ]
        rows = ["", "## Training runs", "", "| net | epochs | status | minutes | best val. "
                "top-1 / top-5 (centre crop) |", "|---|---|---|---|---|"]
        rows += [f"| {t['net']} | {t['epochs']} | {t['status']} | {t['seconds'] / 60:.1f} | "
                 f"{t['best_top1_err']:.1f} / {t['best_top5_err']:.1f} |" for t in trained]
        text = (render_report(cells, title_lines=title, factor=self.crop / PAPER_CROP)
                + "\n".join(rows) + "\n")
        (self.out / "report.md").write_text(text)
        _write_json(self.out / "timing.json", {"training_s": train_s, "evaluation_s": eval_s,
                                               "invocation_s": time.perf_counter() - t0})
        return self.out / "report.md"


def reproduce_command(s: StudySettings) -> int:
    """``vggnet reproduce`` (Tables 3-6): run (or, with the --out of an earlier study, resume)
    the study, print the findings' verdicts."""
    report = Study(s).run()
    for f in findings(load_cells(s.out)):
        print(f"{f.verdict:>16}: {f.claim}")
    print(f"wrote {report}")
    return 0
