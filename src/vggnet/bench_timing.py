"""What every benchmark item shares: a result line and interleaved timing."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


# --- results ------------------------------------------------------------------------------
@dataclass
class Result:
    """One line of the report: our figure, the baseline's, and their ratio (ours / baseline)."""

    item: str
    unit: str  # "img/s" (higher is better), "MiB" (lower is better) or "%"
    ours: float
    baseline: float | None  # None: nothing to compare with (the agreement item)
    target: str = ""  # the target, e.g. ">= 2.2x, >= 85% of bf16 peak"
    gflops: float | None = None  # our achieved GFLOP/s (int8: GOP/s)
    peak: float | None = None  # matmul GFLOP/s in our compute dtype, measured alongside
    notes: list[str] = field(default_factory=list)
    ops: str = "GFLOP/s"  # the unit of gflops and peak
    peak_name: str = "matmul peak"

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else math.nan

    @property
    def of_peak(self) -> float | None:
        return self.gflops / self.peak if self.gflops and self.peak else None

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "of_peak": self.of_peak}


@dataclass
class Peak:
    """The best rate of one large matmul in ``dtype`` and which implementation reached it."""

    dtype: str
    gflops: float
    by: str  # which implementation reached it
    all: dict[str, float]
    fn: Callable[[], object] = field(repr=False, default=None)
    flops: float = 0.0

    def line(self, name: str, n: int, ops: str = "GFLOP/s") -> str:
        """The log line: "<name> (n=N): <rate> <ops> (<each candidate's rate>)"."""
        alts = ", ".join(f"{k} {v:.0f}" for k, v in self.all.items())
        return f"{name} (n={n}): {self.gflops:.0f} {ops} ({alts})"


def best_peak(dtype: str, fns: dict[str, Callable[[], object]], n: int, repeats: int,
              device: torch.device) -> Peak:
    """The fastest of ``fns``, each an n x n x n matmul, timed in turns (median of
    ``repeats``), as a Peak in G(FL)OP/s."""
    t = interleaved(fns, repeats, device)
    rate = {k: 2 * n**3 / s / 1e9 for k, s in t.items()}
    best = max(rate, key=rate.get)
    return Peak(dtype, rate[best], best, rate, fns[best], 2.0 * n**3)


# --- timing -------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def settled() -> int:
    """Warm-up calls that take vggnet's default inference path past the calls in which its
    layers pick their form (``winograd.PickedConv2d.EXPLORE``), so that its steady state is
    timed, and every candidate timed beside it gets the same warm-up."""
    from .winograd import PickedConv2d

    return PickedConv2d.EXPLORE + 1


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns (a, b, c, a, b, c, ...)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
