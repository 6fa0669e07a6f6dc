"""Evaluating localisation nets from their files: the paper's two test protocols over a
dataset with ground-truth boxes, one net or the fusion of several (``vggnet localize
evaluate``).

A ``Member`` is a localisation net read from its file alone (``localize.load_localizer``)
with the classifier that rates its boxes in protocol 2 (by default the one it was trained
from, recorded in its checkpoint). Protocol 2 is computed per (net, Q) "unit": each image's
dense boxes and posteriors of every unit once, then any row (one net at some scales, or the
paper's fusion of nets) is the union of its units' predictions (``DensePredictions.union``,
the same as one pass over all the row's views).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .annotations import BoxedSample, attach_boxes, read_boxes
from .image import BadImageError
from .localize import (
    DensePredictions,
    Localizer,
    dense_predictions,
    image_views,
    load_localizer,
    protocol1_error,
    top5_correct,
    top5_guesses,
)
from .localize_report import results_table
from .localize_train import box_file, load_classifier
from .model import VGG
from .progress import progress_bar
from .protocol import default_test_scales
from .runtime import Runtime, make_runtime
from .settings import LocalizeEvaluateCommand
from .train import resolve_checkpoint
from .weights import LoadedModel


@dataclass
class Member:
    """A localisation net, what its file says, and (protocol 2) its classifier."""

    name: str
    localizer: Localizer
    loaded: LoadedModel
    classifier: VGG | None = None

    @property
    def scale(self) -> int:
        """Its training scale S: the paper tests each net at Q = S by default (a file without
        training settings: 256/224 of its crop)."""
        return default_test_scales(self.loaded.meta.get("train_settings"),
                                   self.localizer.net.config.crop_size)[0]


def load_member(path: str, classifier: str | None = None, device: torch.device | str = "cpu",
                with_classifier: bool = False) -> Member:
    """A localisation net from a run folder (best.pt), checkpoint or weights file; with
    ``with_classifier`` also its classifier: ``classifier``, else the recorded one."""
    file = resolve_checkpoint(path)
    loc, loaded = load_localizer(file, device)
    member = Member(str(path), loc.eval(), loaded)
    if with_classifier:
        source = classifier or (loaded.meta.get("localisation_run") or {}).get("classifier")
        if not source:
            raise ValueError(f"{str(file)!r} does not say which classifier it was trained from; "
                             "give --classifier CLASSIFIER for protocol 2")
        clf = load_classifier(source)
        if clf.class_names != loaded.class_names:
            raise ValueError(f"the classifier {source!r} knows other classes than the "
                             f"localisation net {str(file)!r}; give the classifier it was "
                             "trained from")
        member.classifier = clf.model.to(device).eval()
    return member


def boxed_samples(samples: Sequence[tuple[str, int]], class_names: Sequence[str],
                  boxes_path: str) -> tuple[list[BoxedSample], str]:
    """The samples that have a ground-truth box of their own class, and what pairing found."""
    paired, report = attach_boxes(samples, *read_boxes(boxes_path))
    kept = [b for b in paired if len(b.boxes_of(class_names[b.label]))]
    note = (f"boxes ({boxes_path}): {report.summary()}; {len(paired) - len(kept)} with no box "
            "of their own class left out")
    if not kept:
        raise ValueError(f"no image has a ground-truth box of its class: {note}")
    return kept, note


def check_classes(members: Sequence[Member], class_names: Sequence[str]) -> None:
    for m in members:
        if list(m.loaded.class_names or []) != list(class_names):
            raise ValueError(f"{m.name!r} was trained on other classes than the dataset's "
                             f"({len(m.loaded.class_names or [])} vs {len(class_names)}); its "
                             "box k is class k's, so evaluate it on its own classes")


# --- the protocols over a dataset -----------------------------------------------------------------
def protocol1_rows(members: Sequence[Member], samples: Sequence[BoxedSample],
                   class_names: Sequence[str], scales: Sequence[int] | None, runtime: Runtime,
                   batch_size: int = 32) -> dict[str, dict]:
    """Table 8's test for every net at each of ``scales`` (default: its training S)."""
    rows = {}
    for name, m in zip(row_names(members), members, strict=True):
        for q in scales or [m.scale]:
            t = time.perf_counter()
            with runtime.autocast():
                r = protocol1_error(m.localizer, samples, class_names, q,
                                    m.loaded.preprocessing, batch_size)
            rows[name if not scales or len(scales) == 1 else f"{name} @ {q}"] = {
                "error": r.error, "images": len(r.correct), "scales": [q],
                "seconds": time.perf_counter() - t}
    return rows


def row_names(members: Sequence[Member]) -> list[str]:
    """Each net's name in the tables: as given, numbered where two are given alike."""
    names = [m.name for m in members]
    return [n if names.count(n) == 1 else f"{n} (#{i + 1})" for i, n in enumerate(names)]


Unit = tuple[int, int]  # (member index, Q)


def protocol2_rows(members: Sequence[Member], rows: Mapping[str, Sequence[Unit]],
                   samples: Sequence[BoxedSample], class_names: Sequence[str], runtime: Runtime,
                   flip: bool = False, threshold: float = 1.0,
                   progress: bool = False) -> dict[str, dict]:
    """Table 9's test (top-5 localisation error) for each row: the union of its units'
    dense predictions (one unit: one net at one Q). Images that fail to decode are left out
    and counted ("skipped")."""
    units = sorted({u for parts in rows.values() for u in parts})
    seconds = dict.fromkeys([*units, *rows], 0.0)
    correct: dict[str, list[bool]] = {name: [] for name in rows}
    skipped = 0
    with progress_bar(len(samples), "protocol 2", enabled=progress) as bar:
        for s in samples:
            try:
                preds = {u: _unit(members, u, s.path, flip, runtime, seconds) for u in units}
            except BadImageError:
                skipped += 1
                bar.update(1)
                continue
            truth = s.boxes_of(class_names[s.label])
            for name, parts in rows.items():
                t = time.perf_counter()
                pred = functools.reduce(DensePredictions.union, [preds[u] for u in parts])
                guesses = top5_guesses(pred, threshold=threshold)
                correct[name].append(top5_correct(guesses, s.label, truth))
                seconds[name] += time.perf_counter() - t
            bar.update(1)
    out = {}
    for name, parts in rows.items():
        c, nets = correct[name], sorted({mi for mi, _ in parts})
        out[name] = {"error": 100 * (1 - sum(c) / len(c)) if c else float("nan"),
                     "images": len(c), "skipped": skipped,
                     "scales": [[q for mi, q in parts if mi == i] for i in nets],
                     "members": [members[i].name for i in nets],
                     "seconds": seconds[name] + sum(seconds[u] for u in parts)}
    return out


def _unit(members: Sequence[Member], unit: Unit, path: str, flip: bool, runtime: Runtime,
          seconds: dict) -> DensePredictions:
    """One image's dense predictions of one net at one Q (and its mirror image if ``flip``)."""
    t = time.perf_counter()
    m, q = members[unit[0]], unit[1]
    views = image_views(path, [q], m.loaded.preprocessing, flip, runtime.device)
    with runtime.autocast():
        pred = dense_predictions(m.localizer, m.classifier, views)
    seconds[unit] += time.perf_counter() - t
    return pred


def default_rows(members: Sequence[Member], scales: Sequence[int] | None
                 ) -> dict[str, list[Unit]]:
    """Each net alone at ``scales`` (default: its training S), then, for several, their
    fusion: the union of all of them."""
    rows = {name: [(i, q) for q in scales or [m.scale]]
            for i, (name, m) in enumerate(zip(row_names(members), members, strict=True))}
    if len(members) > 1:
        rows[f"fusion of the {len(members)} nets"] = [u for r in rows.values() for u in r]
    return rows


# --- the command ----------------------------------------------------------------------------------
def localize_evaluate_command(c: LocalizeEvaluateCommand) -> int:
    """``vggnet localize evaluate``: the table on stdout, results.json in --out."""
    from .checkpoint import check_output_folder
    from .evaluate import list_eval_data
    from .runlog import dated_folder, round_floats

    out = check_output_folder(c.out or dated_folder(Path("localisation"), "evaluation"),
                              "evaluation")
    samples, class_names = list_eval_data(c.data, c.split, c.val_labels)
    boxed, note = boxed_samples(samples, class_names,
                                box_file(c.data, c.split, c.boxes, "--boxes"))
    print(note)
    rt = make_runtime(c.device, c.precision)
    members = [load_member(p, c.classifier, rt.device, with_classifier=c.protocol == 2)
               for p in c.localizers]
    check_classes(members, class_names)
    if c.protocol == 1:
        rows = protocol1_rows(members, boxed, class_names, c.scales, rt, c.batch_size)
    else:
        rows = protocol2_rows(members, default_rows(members, c.scales), boxed, class_names, rt,
                              c.flip, c.threshold, c.progress)
    print(results_table(rows, c.protocol))
    out.mkdir(parents=True, exist_ok=True)
    result = {"protocol": c.protocol, "data": str(c.data), "split": c.split, "flip": c.flip,
              "threshold": c.threshold, "device": str(rt.device), "precision": rt.precision,
              "rows": rows}
    (out / "results.json").write_text(json.dumps(round_floats(result), indent=1) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0
