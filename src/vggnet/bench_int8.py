"""The "int8" benchmark item's measurements: ``quantize.quantize_int8`` against the CPU's int8
limit and the default path, and on a trained model its accuracy/speed curve (issue 11,
item 4; docs/benchmarks.md, "int8").

- ``int8_peak``: the best rate of one large u8 x s8 matmul with 32-bit sums, the arithmetic
  of int8 convolutions, so the speed row reads as a fraction of what the CPU can do in int8
  and says how fast int8 could be at best (every multiply-add at that peak, nothing else);
- ``curve``: top-1 agreement with float32 (over several calibration sets: one set's figure
  moves by more than the differences between variants) and speed against the default path,
  with every layer in int8, then with ``quantize.FLOAT_LAYERS`` in float32 (``quantize_int8``'s
  default: the first conv and the logits), then keeping 1, 2, 3 more in float32, most
  sensitive first (``quantize.layer_sensitivity``).
"""

from __future__ import annotations

import copy
import statistics
import warnings
from collections.abc import Callable, Sequence

import torch

from .bench_timing import Peak, Result, best_peak, interleaved, settled
from .model import VGG, VGGConfig, build
from .quantize import (
    FLOAT_LAYERS,
    default_backend,
    layer_sensitivity,
    quantize_int8,
    weighted_layers,
)
from .runtime import Runtime

CPU = torch.device("cpu")


def int8_matmul_candidates(n: int) -> dict[str, Callable[[], object]]:
    """Ways to multiply two n x n int8 matrices with 32-bit sums here: torch._int_mm (s8 x s8),
    and a quantized linear layer (u8 activations x s8 weights, as in ``quantize_int8``'s
    layers) packed by ``quantize_int8``'s engine (``default_backend``) and, on x86, also by
    oneDNN's (the x86 engine runs linear layers on fbgemm, convolutions on oneDNN)."""
    from torch.ao.nn.quantized import Linear

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g)
    fns: dict[str, Callable[[], object]] = {}
    try:
        torch._int_mm(a[:32, :32], b[:32, :32])
        fns["torch._int_mm"] = lambda: torch._int_mm(a, b)
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    x = torch.quantize_per_tensor(torch.rand(n, n, generator=g), 1 / 255, 0, torch.quint8)
    w = torch.quantize_per_channel(torch.randn(n, n, generator=g), torch.full((n,), 0.02),
                                   torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    engines = torch.backends.quantized.supported_engines
    names = ["onednn"] if "x86" in engines else []
    try:
        names.insert(0, default_backend())
    except RuntimeError:  # no quantized engine in this build: _int_mm alone, if that
        pass
    engine = torch.backends.quantized.engine
    try:
        for name in dict.fromkeys(e for e in names if e in engines):
            torch.backends.quantized.engine = name  # the weights are packed for this engine
            layer = Linear(n, n)
            try:  # an engine may refuse per-channel weights or the size: left out
                layer.set_weight_bias(w, None)
                layer(x[:32])
            except (RuntimeError, NotImplementedError):
                continue
            fns[f"quantized linear ({name})"] = lambda layer=layer: layer(x)
    finally:
        torch.backends.quantized.engine = engine
    return fns


def int8_peak(n: int, repeats: int) -> Peak | None:
    """The best GOP/s of an n x n x n int8 matmul (median of ``repeats``); None where this
    torch has no int8 matmul."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantiz.*deprecated")
        fns = int8_matmul_candidates(n)
        return best_peak("int8", fns, n, repeats, CPU) if fns else None


def _timed(model, x: torch.Tensor, ctx=torch.no_grad) -> Callable[[], object]:
    def fn():
        with ctx():
            return model(x)
    return fn


def speed(cfg: VGGConfig, label: str, rt: Runtime, batch: int, repeats: int,
          peak: Peak | None, flops: float) -> Result:
    """Images/s of ``quantize_int8`` (calibrated on a random batch: the ranges do not change
    the speed) against the float32 baseline, with the default path and the int8 matmul peak
    timed alongside; ``flops``: 2 x multiply-adds of one image."""
    base = build(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    shape = (batch, 3, cfg.crop_size, cfg.crop_size)
    x = torch.randn(shape, generator=g)
    int8 = quantize_int8(base, [torch.randn(shape, generator=g)])
    ours = rt.prepare_inference(copy.deepcopy(base))
    fns = {"int8": _timed(int8, x), "baseline": _timed(base, x),
           "ours": _timed(ours, rt.input(x), rt.inference)}
    if peak is not None:
        fns["peak"] = peak.fn
    t = interleaved(fns, repeats, CPU, warmup=settled())
    notes = [f"the default path ({rt.describe()}) alongside: {batch / t['ours']:.3g} img/s, so "
             f"int8 is {t['ours'] / t['int8']:.2f}x it; its accuracy cost: the int8 agreement "
             "item"]
    rate = peak_rate = None
    if peak is not None:
        rate, peak_rate = flops * batch / t["int8"] / 1e9, peak.flops / t["peak"] / 1e9
        best = peak_rate * 1e9 / flops  # img/s with every multiply-add at the peak
        notes.append(f"the net's multiply-adds alone at the int8 peak measured alongside "
                     f"({peak.by}): {best:.3g} img/s, {best * t['ours'] / batch:.2f}x the default "
                     "path")
    return Result(f"inference int8 {label} batch {batch} (quantize_int8, a flag)", "img/s",
                  batch / t["int8"], batch / t["baseline"], target="report", gflops=rate,
                  peak=peak_rate, ops="GOP/s", peak_name="int8 matmul peak", notes=notes)


# --- the accuracy/speed curve -----------------------------------------------------------------
def _top1(model, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x).argmax(1) for x in batches])


def variants(sensitivity: dict[str, float], more: int) -> list[tuple[str, ...]]:
    """The float32 layer sets of the curve: none, ``FLOAT_LAYERS``, then ``FLOAT_LAYERS`` and
    the 1, 2, ... ``more`` most sensitive others."""
    order = [n for n in sensitivity if n not in FLOAT_LAYERS]
    return [(), FLOAT_LAYERS] + [FLOAT_LAYERS + tuple(order[:k])
                                 for k in range(1, min(more, len(order)) + 1)]


def curve(ts, trained_label: str, rt: Runtime, cfg: VGGConfig, label: str, batch: int,
          repeats: int, sets: int = 3, more: int = 3, sensitivity_images: int = 64
          ) -> list[Result]:
    """One row per ``variants`` set on the trained model of ``ts`` (``bench.TrainedSet``):
    mean top-1 agreement with float32 over ``sets`` calibration sets (disjoint slices of
    ``ts.calibration``) and, on a ``cfg`` net with the same layers in float32 (those it has),
    images/s at ``batch`` against the default path, all timed in turns."""
    model: VGG = ts.loaded.model.float().eval()
    val = [x for x, _ in ts.crops()]
    ref = _top1(model, val)
    k = max(1, min(sets, len(ts.calibration)))
    calib = [[x for x, _ in ts.crops(ts.calibration[i::k])] for i in range(k)]
    ranked_on = ts.calibration[:sensitivity_images]
    ranking = [x for x, _ in ts.crops(ranked_on)]
    sensitivity = layer_sensitivity(model, ranking)
    rows = variants(sensitivity, more)
    agreement = [[100 * (_top1(quantize_int8(model, c, float_layers=v), val) == ref)
                  .float().mean().item() for c in calib] for v in rows]
    # speed on the bench's net: the variants' float layers it has
    net = build(cfg, seed=0).eval()
    have = set(weighted_layers(net))
    g = torch.Generator().manual_seed(1)
    shape = (batch, 3, cfg.crop_size, cfg.crop_size)
    x, c = torch.randn(shape, generator=g), [torch.randn(shape, generator=g)]
    kept = [[n for n in v if n in have] for v in rows]
    ours = rt.prepare_inference(copy.deepcopy(net))
    fns = {"ours": _timed(ours, rt.input(x), rt.inference)}
    for i, v in enumerate(kept):
        fns[i] = _timed(quantize_int8(net, c, float_layers=v), x)
    t = interleaved(fns, repeats, CPU, warmup=settled())
    ranked = ", ".join(f"{n} {s:.1e}" for n, s in sensitivity.items())
    out = []
    for i, v in enumerate(rows):
        a = agreement[i]
        notes = [f"agreement over {k} calibration sets of about {len(ts.calibration) // k} "
                 f"training images each: {min(a):.1f}-{max(a):.1f}%",
                 f"{label} batch {batch} with those layers in float32 "
                 f"({', '.join(kept[i]) or 'none'}): {batch / t[i]:.3g} img/s, "
                 f"{t['ours'] / t[i]:.2f}x the default path"]
        if i == 0:
            notes.append(f"the default path ({rt.describe()}) in the same turns: "
                         f"{batch / t['ours']:.3g} img/s")
            notes.append(f"sensitivity (KL from float32 with only that layer in int8, nats per "
                         f"image, on {len(ranked_on)} calibration images): {ranked}")
        out.append(Result(f"int8 curve, trained {trained_label}: float32 layers "
                          f"{', '.join(v) or 'none'}", "%", statistics.mean(a), None,
                          target="report", notes=notes))
    return out
