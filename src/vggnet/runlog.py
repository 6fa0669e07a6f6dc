"""What a training run writes, all through one object (rank 0 only): checkpoints, metrics
(CSV, JSONL, TensorBoard), plots and text files such as the report."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .checkpoint import atomic_save, atomic_write

METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_top1_err", "val_loss",
                  "val_top1_err", "val_top5_err", "images_per_s", "epoch_s", "bad_files",
                  "skipped_steps", "event")


class RunLog:
    """The run folder: checkpoints, metrics (CSV, JSONL, TensorBoard), plots and the report.
    Every write of a run goes through here; on ranks other than 0 every method does nothing.

    Nothing is written before the first write the run asks for (``save``, ``write_text``,
    ``epoch``): a run that fails or is stopped while it starts leaves no files. The metrics
    files are then rewritten from the checkpoint's history, so a resumed run has exactly one
    row per finished epoch whatever happened after the last save, and every later row
    rewrites them atomically (a kill never leaves half a row)."""

    def __init__(self, folder: Path, enabled: bool = True,
                 history: list[dict] | None = None) -> None:
        self.folder, self.enabled = folder, enabled
        self.history = list(history or [])
        self.tb = None
        self.saved_at = time.perf_counter()  # when last.pt/best.pt were last written
        if enabled:  # imported now (a second), so that starting to write is quick
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter

    def _start(self) -> None:
        """The metrics files from the history so far, and the TensorBoard writer (purging any
        events after the history's last epoch)."""
        if self.tb is not None:
            return
        self._write_metrics()
        self.tb = self._writer(str(self.folder / "tensorboard"), purge_step=(
            self.history[-1]["epoch"] + 1 if self.history else None))

    def _write_metrics(self) -> None:
        csv = ",".join(METRIC_COLUMNS) + "\n" + "".join(map(self._csv_row, self.history))
        jsonl = "".join(json.dumps(round_floats(r)) + "\n" for r in self.history)
        atomic_write(self.folder / "metrics.csv", lambda f: f.write(csv.encode()))
        atomic_write(self.folder / "metrics.jsonl", lambda f: f.write(jsonl.encode()))

    @staticmethod
    def _csv_row(row: dict) -> str:
        row = round_floats(row)
        return ",".join("" if row.get(c) is None else str(row[c]) for c in METRIC_COLUMNS) + "\n"

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def save(self, name: str, checkpoint: dict) -> None:
        if self.enabled:
            self._start()
            atomic_save(checkpoint, self.folder / name)
        self.saved_at = time.perf_counter()  # every rank keeps the same clock

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            self._start()
            atomic_write(self.folder / name, lambda f: f.write(text.encode()))

    def epoch(self, row: dict) -> None:
        """One finished epoch's row: call it before saving that epoch's checkpoint, so that
        after a kill the metrics are never behind last.pt (a row ahead is rewritten on resume)."""
        if not self.enabled:
            return
        self._start()
        self.history.append(row)
        self._write_metrics()
        for key in ("lr", "train_loss", "train_top1_err", "val_loss", "val_top1_err",
                    "val_top5_err", "images_per_s"):
            group = next((g for g in ("train", "val") if key.startswith(g)), "run")
            self.tb.add_scalar(f"{group}/{key.split('_', 1)[1] if group != 'run' else key}",
                               row[key], row["epoch"])
        self.tb.flush()

    def plots(self, history: list[dict], title: str = "", what: dict | None = None) -> list[Path]:
        """loss.png, error.png and, when the lr changed, lr.png (``history_figures``)."""
        if not self.enabled or not history:
            return []
        import matplotlib.pyplot as plt

        out = []
        for name, fig in history_figures(history, title, what).items():
            fig.savefig(self.folder / f"{name}.png")
            plt.close(fig)
            out.append(self.folder / f"{name}.png")
        return out

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def dated_folder(parent: Path, name: str) -> Path:
    """``parent/name-YYYYmmdd-HHMMSS``, a folder not there yet (``-2``, ``-3``, ... appended
    when one is): default output folders are new per run and never overwrite an earlier one."""
    base = parent / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def round_floats(value, digits: int = 6):
    """``value`` with every float rounded to ``digits`` significant digits, for files people
    read (metrics.csv, results.json): 23.1, not 23.100000619888306. Checkpoints keep the
    exact numbers."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value


# what a run's plots show: plot name -> ([(legend label, metrics column)], y-axis label); a
# task names its own (``Task.plots``: a localisation run's loss and errors are not these)
CLASSIFICATION_PLOTS = {
    "loss": ([("train", "train_loss"), ("val", "val_loss")], "cross-entropy loss"),
    "error": ([("train top-1", "train_top1_err"), ("val top-1", "val_top1_err"),
               ("val top-5", "val_top5_err")], "error (%)"),
}


def history_figures(history: list[dict], title: str = "", what: dict | None = None) -> dict:
    """The run's plots as matplotlib figures: "loss" and "error" per epoch (``what``:
    ``CLASSIFICATION_PLOTS`` by default), and "lr" when the lr changed (otherwise the loss
    plot's legend states it); each titled ``title`` (the run and the net), with the epoch
    that best.pt holds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_epoch(history)
    plots = dict(what or CLASSIFICATION_PLOTS)
    if lr_changed(history):
        plots["lr"] = ([("learning rate", "lr")], "learning rate")
    figures = {}
    for name, (series, ylabel) in plots.items():
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        scale = 100 if name == "error" else 1
        for label, key in series:
            ax.plot([r["epoch"] for r in history], [r[key] * scale for r in history],
                    marker="o", ms=3, label=label)
        if best is not None:
            ax.axvline(best, color="0.4", ls="--", lw=1, label=f"best.pt (epoch {best})")
        if name == "lr":
            ax.set_yscale("log")
        elif name == "loss" and "lr" not in plots:
            ax.plot([], [], " ", label=f"lr {history[0]['lr']:g} throughout")
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        figures[name] = fig
    return figures


def lr_changed(history: list[dict]) -> bool:
    """Whether the lr ever dropped: then lr.png is drawn, else the loss plot states the lr."""
    return len({r["lr"] for r in history}) > 1


def best_epoch(history: list[dict]) -> int | None:
    """The epoch best.pt holds: the last one whose validation error improved."""
    return next((r["epoch"] for r in reversed(history) if r["event"] == "improved"), None)


def rate(per_s: float) -> str:
    """Images per second as printed: whole numbers, one decimal under 10 (a full-size net on
    a CPU trains at 0.5 images/s, not "0")."""
    return f"{per_s:.1f}" if per_s < 10 else f"{per_s:.0f}"


def epoch_line(row: dict, epochs: int) -> str:
    """One epoch's metrics on one line, as the run prints them."""
    return (f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.0e}  train loss "
            f"{row['train_loss']:.3f} top-1 err {100 * row['train_top1_err']:5.1f}%  |  val loss "
            f"{row['val_loss']:.3f} top-1 err {100 * row['val_top1_err']:5.1f}% top-5 err "
            f"{100 * row['val_top5_err']:5.1f}%  |  {rate(row['images_per_s'])} img/s, "
            f"{row['epoch_s']:.0f} s  {row['event']}")
