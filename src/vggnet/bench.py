"""The benchmark suite: our defaults against "the plain way", measured in the same run.

The baseline is always the same architecture run the plain way: our ``VGG`` module (the
same layers as torchvision's VGG, whose adaptive 7x7 average pool is a no-op at 224) in
eager PyTorch, float32, NCHW, default settings, ``torch.no_grad()`` for inference and
``torch.optim.SGD`` with its default (per-parameter loop) implementation for training.
"Ours" is whatever ``runtime.make_runtime()`` picks by default for the device.

Every timed item runs its candidates in turns (ours, baseline, a large matmul, ours,
baseline, ...) after a warm-up and reports medians, so that a change of machine load hits
all of them alike; the matmul gives the machine's limit measured alongside, so each figure
also reads as a fraction of it. Memory is measured in fresh subprocesses (peak RSS on the
CPU, peak allocated memory on a GPU). The same code runs on a GPU through the runtime.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .bench_timing import Peak, Result, best_peak, interleaved, settled, sync
from .engines import ENGINES
from .info import summarize
from .model import VGGConfig, build
from .protocol import PRESETS
from .runtime import Runtime, cpu_has_native_bf16, make_runtime, peak_rss_mib
from .settings import BenchSettings


@dataclass
class Settings:
    """Sizes of one benchmark run; ``quick()`` is a seconds-long smoke run at tiny size."""

    arch: str = "D"
    crop: int = 224
    width: float = 1.0
    inference_batches: tuple[int, ...] = (1, 8)
    train_batch: int = 8
    train_steps: int = 5  # timed VGG-16 steps per candidate (also the loss curve compared)
    # the reduced preset's net and batch (vggnet.protocol.PRESETS["reduced"])
    reduced_width: float = PRESETS["reduced"]["width"]
    reduced_crop: int = PRESETS["reduced"]["crop_size"]
    reduced_batch: int = PRESETS["reduced"]["batch_size"]
    reduced_steps: int = 30  # cheap enough for a longer loss curve
    eval_width: float = 0.25  # dense vs multi-crop: the full net takes minutes per image on a CPU
    eval_scales: tuple[int, ...] = (256, 384, 512)
    eval_images: int = 4
    pipeline_images: int = 200
    pipeline_repeats: int = 3
    repeats: int = 5
    matmul_n: int = 4096
    memory: bool = True
    compile: bool = False  # also time inference through torch.compile (inductor, frozen weights)
    engines: tuple[str, ...] = ENGINES  # peers: the other engines timed beside ours
    dense_size: tuple[int, int] = (384, 512)  # peers: one image through the dense graph

    @classmethod
    def for_device(cls, device: torch.device) -> Settings:
        """The defaults above are sized for a CPU; a GPU gets the issue's GPU sizes: VGG-16
        training at batch 256, inference up to batch 256, full-width dense evaluation."""
        if device.type != "cuda":
            return cls()
        return cls(inference_batches=(1, 8, 256), train_batch=256, train_steps=10,
                   reduced_steps=50, eval_width=1.0, eval_images=32, matmul_n=8192, repeats=10)

    @classmethod
    def quick(cls) -> Settings:
        return cls(crop=32, width=1 / 16, inference_batches=(2,), train_batch=2, train_steps=2,
                   reduced_width=1 / 16, reduced_crop=32, reduced_batch=8, reduced_steps=3,
                   eval_width=1 / 16, eval_scales=(32, 48), eval_images=1, pipeline_images=4,
                   pipeline_repeats=1, repeats=2, matmul_n=256, dense_size=(48, 64))


# --- timing -------------------------------------------------------------------------------
def matmul_candidates(dtype: torch.dtype, n: int, device: torch.device) -> dict[str, Callable]:
    """Ways to multiply two n x n matrices: torch.mm, and on the CPU also oneDNN's matmul with
    a prepacked weight (torch.mm's float32 path is MKL, which on AMD CPUs runs far below
    what oneDNN, the library behind our convolutions, reaches)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    fns = {"torch.mm": lambda: torch.mm(a, b)}
    if device.type == "cpu":
        onednn = _onednn_matmul(a, b)
        if onednn is not None:
            fns["oneDNN"] = onednn
    return fns


def _onednn_matmul(a: torch.Tensor, b: torch.Tensor) -> Callable | None:
    """oneDNN's prepacked matmul of a @ b, or None where this torch or CPU has none.

    These are private ops: they may be missing from a build, and oneDNN refuses a dtype the
    CPU cannot run (bf16 needs AVX-512 or avx_ne_convert: an AVX2-only CPU raises). The
    matmul peak is then torch.mm's alone.
    """
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(b, b.shape[0])
        def fn():
            return torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
        fn()
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return fn


def matmul_peak(dtype: torch.dtype, n: int, device: torch.device, repeats: int) -> Peak:
    """The best GFLOP/s of an n x n x n matmul in ``dtype`` (median of ``repeats``)."""
    return best_peak(str(dtype).removeprefix("torch."), matmul_candidates(dtype, n, device), n,
                     repeats, device)


# --- models -------------------------------------------------------------------------------
def _config(s: Settings, num_classes: int = 1000, width: float | None = None,
            crop: int | None = None) -> VGGConfig:
    return VGGConfig(arch=s.arch, num_classes=num_classes,
                     width=s.width if width is None else width,
                     crop_size=s.crop if crop is None else crop)


def forward_flops(cfg: VGGConfig) -> float:
    """FLOPs (2 x multiply-adds) of one image at the crop size."""
    return 2.0 * summarize(cfg)["macs"]


def baseline_runtime(device: torch.device) -> Runtime:
    return make_runtime(str(device), "fp32", channels_last=False, compile=False)


def _label(cfg: VGGConfig) -> str:
    name = {"D": "VGG-16", "E": "VGG-19", "A": "VGG-11", "B": "VGG-13"}.get(cfg.arch, cfg.arch)
    return name + (f" width {cfg.width:g}" if cfg.width != 1 else "") + f" {cfg.crop_size}"


# --- item 1: inference --------------------------------------------------------------------
def bench_inference(s: Settings, rt: Runtime, peak: Peak, batch: int) -> Result:
    """Images/s of a forward pass at the crop size, ours vs the baseline, plus how far our
    logits are from float32 on the same batch."""
    cfg = _config(s)
    base = build(cfg, seed=0).eval().to(rt.device)
    ours = rt.prepare_inference(copy.deepcopy(base))
    x = torch.randn(batch, 3, cfg.crop_size, cfg.crop_size,
                    generator=torch.Generator().manual_seed(1)).to(rt.device)
    xo = rt.input(x)

    def run_base():
        with torch.no_grad():
            return base(x)

    def run_ours():
        with rt.inference():
            return ours(xo)

    notes = []
    if rt.compile:  # the first call compiles
        sync(rt.device)
        start = time.perf_counter()
        run_ours()
        sync(rt.device)
        notes.append(f"compiled: first call {time.perf_counter() - start:.1f} s")
    t = interleaved({"ours": run_ours, "baseline": run_base, "peak": peak.fn}, s.repeats,
                    rt.device, warmup=settled())
    ref, out = run_base().float(), run_ours().float()
    rel = ((out - ref).norm() / ref.norm()).item()
    flops = forward_flops(cfg) * batch
    return Result(f"inference {_label(cfg)} batch {batch}" + (", compiled" if rt.compile else ""),
                  "img/s", batch / t["ours"], batch / t["baseline"],
                  target=">= 2.2x, >= 85% of peak" if batch >= 8 else "",
                  gflops=flops / t["ours"] / 1e9, peak=peak.flops / t["peak"] / 1e9,
                  notes=notes + [f"logits vs float32: relative error {rel:.2e}"])


# --- item 2: training step -----------------------------------------------------------------
def make_sgd(model: torch.nn.Module, **options) -> torch.optim.SGD:
    """The paper's optimiser (momentum 0.9, weight decay 5e-4) at lr 1e-2."""
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-4, **options)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, rt: Runtime,
               x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    """One SGD step on (x, y); dropout masks drawn from ``seed`` so that two runs see the same."""
    torch.manual_seed(seed)
    with rt.autocast():
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def bench_training(s: Settings, rt: Runtime, peak: Peak, cfg: VGGConfig, batch: int,
                   steps: int) -> Result:
    """Images/s of a training step (forward, backward, SGD update), ours vs the baseline, both
    from the same weights on the same batches; their loss curves are compared step by step."""
    base_rt = baseline_runtime(rt.device)
    base = build(cfg, seed=0).train().to(rt.device)
    ours = rt.prepare(copy.deepcopy(base))
    base_opt, ours_opt = make_sgd(base), make_sgd(ours, **rt.optimizer_options())
    g = torch.Generator().manual_seed(2)
    # a few fixed batches, cycled: the loss falls as the net memorises them
    batches = [(torch.randn(batch, 3, cfg.crop_size, cfg.crop_size, generator=g),
                torch.randint(0, cfg.num_classes, (batch,), generator=g)) for _ in range(2)]
    base_batches = [(x.to(rt.device), y.to(rt.device)) for x, y in batches]
    ours_batches = [(rt.input(x), y.to(rt.device)) for x, y in batches]
    losses: dict[str, list[float]] = {"ours": [], "baseline": []}

    def stepper(name, model, opt, runtime, data):
        def step():
            i = len(losses[name])
            x, y = data[i % len(data)]
            losses[name].append(train_step(model, opt, runtime, x, y, seed=i))
        return step

    fns = {"ours": stepper("ours", ours, ours_opt, rt, ours_batches),
           "baseline": stepper("baseline", base, base_opt, base_rt, base_batches),
           "peak": peak.fn}
    t = interleaved(fns, steps, rt.device)
    diffs = [abs(a - b) for a, b in zip(losses["ours"], losses["baseline"], strict=True)]
    flops = 3 * forward_flops(cfg) * batch  # forward + two backward products per layer
    shown = sorted({round(i * (len(diffs) - 1) / 7) for i in range(8)})  # at most 8 steps
    curve = ", ".join(f"{i}: {losses['ours'][i]:.4f}/{losses['baseline'][i]:.4f}" for i in shown)
    rel = 100 * max(d / b for d, b in zip(diffs, losses["baseline"], strict=True))
    return Result(f"training step {_label(cfg)} batch {batch}", "img/s", batch / t["ours"],
                  batch / t["baseline"],
                  target=">= 1.8x, loss within 0.5% of float32 at every step",
                  gflops=flops / t["ours"] / 1e9, peak=peak.flops / t["peak"] / 1e9,
                  notes=[f"loss ours/float32 at step {curve} (step 0: the warm-up)",
                         f"max |loss difference| {max(diffs):.4f} "
                         f"({rel:.2f}%)"])


# --- item 1b: agreement on a trained model ---------------------------------------------------
def find_demo_checkpoint(root: str | os.PathLike = "runs") -> str | None:
    """The newest ``runs/demo-*/best.pt`` written by ``make demo``, if any."""
    found = sorted(Path(root).glob("demo-*/best.pt"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


def _eval_batches(samples, q: int, crop: int, prep, device, batch_size: int = 64):
    """(normalised centre crops at Q, labels) batches of (path, label) samples; files that
    failed to decode are left out."""
    from .data import EvalImages, make_loader
    from .transforms import EvalTransform

    for batch in make_loader(EvalImages(samples, EvalTransform(q, crop)), batch_size, workers=0):
        keep = batch.labels >= 0  # -1: a file that failed to decode
        yield prep.normalize(batch.images[keep].to(device)), batch.labels[keep]


@dataclass
class TrainedSet:
    """A trained model and the validation images it is judged on, as the demo evaluates it:
    centre crops at the test scale its training implies (Q = S)."""

    loaded: object  # weights.LoadedModel
    samples: list  # (path, label) validation samples
    calibration: list  # (path, label) training samples for int8 ranges
    q: int
    where: str  # what was measured on, after a count: "validation images of ... through ..."

    def crops(self, samples=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised centre crops, labels) batches on the CPU."""
        cfg, prep = self.loaded.model.config, self.loaded.preprocessing
        return list(_eval_batches(self.samples if samples is None else samples, self.q,
                                  cfg.crop_size, prep, "cpu"))

    def whole_images(self) -> list[torch.Tensor]:
        """Each validation image rescaled to shorter side Q, normalised, (1, 3, H, W)."""
        from .transforms import EvalTransform, chw

        t = EvalTransform(self.q, None)
        return [self.loaded.preprocessing.normalize(chw(t(p))) for p, _ in self.samples]


CALIBRATION_IMAGES = 256  # training images that set int8's ranges


def trained_set(checkpoint: str, data: str | None = None,
                calibration_images: int = CALIBRATION_IMAGES
                ) -> TrainedSet:
    """Load a trained checkpoint or weights file and its dataset's validation split."""
    from .data import open_dataset
    from .protocol import centre_crop_resize, default_test_scale
    from .weights import load_model

    loaded = load_model(checkpoint)
    settings = loaded.meta.get("train_settings") or {}
    data = data or settings.get("data")
    if not data:
        raise ValueError(f"{checkpoint!r} does not say which dataset it was trained on; "
                         "give its folder with --data")
    cfg = loaded.model.config
    q = (default_test_scale(settings["scale"]) if "scale" in settings
         else centre_crop_resize(cfg.crop_size))
    dataset = open_dataset(data)
    step = max(1, len(dataset.train.samples) // calibration_images)
    calib = dataset.train.samples[::step][:calibration_images]
    where = f"validation images of {data} (Q={q}) through {checkpoint}"
    return TrainedSet(loaded, dataset.val.samples, calib, q, where)


def pixel_noise_agreement(model: torch.nn.Module, batches: list[torch.Tensor], preprocessing,
                          levels: tuple[int, ...] = (1, 2), seed: int = 0) -> dict[int, float]:
    """% of the images in ``batches`` (normalised crops) on which float32 ``model`` keeps its
    top-1 class when every pixel moves by up to +-``level`` grey levels (uniform noise): the
    scale of a top-1 agreement figure on this model, whose near-ties any rounding can flip."""
    g = torch.Generator().manual_seed(seed)
    grey, _ = preprocessing.affine()  # (1, 3, 1, 1): one grey level in input units
    with torch.no_grad():
        ref = torch.cat([model(x).argmax(1) for x in batches])
        out = {}
        for lv in levels:
            moved = torch.cat([model(x + (2 * torch.rand(x.shape, generator=g) - 1) * lv * grey)
                               .argmax(1) for x in batches])
            out[lv] = 100 * (moved == ref).float().mean().item()
    return out


def bench_agreement(rt: Runtime, checkpoint: str, data: str | None = None,
                    int8: bool = False, calibration_images: int = CALIBRATION_IMAGES
                    ) -> list[Result]:
    """Top-1 agreement with float32 on a trained model (a training checkpoint or weights file)
    over the validation split of its dataset, centre crops: our default inference path, and
    with ``int8`` also ``quantize.quantize_int8`` calibrated on ``calibration_images``
    training images."""
    ts = trained_set(checkpoint, data, calibration_images)
    base, cfg = ts.loaded.model.eval(), ts.loaded.model.config
    ours = rt.prepare_inference(copy.deepcopy(base))
    runs = {"float32": base, "ours": lambda x: ours(rt.input(x))}
    if int8:
        from .quantize import quantize_int8

        runs["int8"] = quantize_int8(base, (x for x, _ in ts.crops(ts.calibration)))
    batches = ts.crops()
    y = torch.cat([label for _, label in batches])
    p = {}
    for k, r in runs.items():
        with rt.inference() if k == "ours" else torch.no_grad():
            p[k] = torch.cat([r(x).argmax(1).cpu() for x, _ in batches])
    acc = {k: 100 * (v == y).float().mean().item() for k, v in p.items()}
    where = f"{len(y)} {ts.where}, centre crops"

    def agree(k: str) -> float:
        return 100 * (p[k] == p["float32"]).float().mean().item()

    noise = pixel_noise_agreement(base, [x for x, _ in batches], ts.loaded.preprocessing)
    where += ("; for scale, float32 itself keeps its top-1 class on "
              + " / ".join(f"{v:.1f}%" for v in noise.values()) + " of them under uniform pixel "
              "noise of " + " / ".join(f"+-{lv}" for lv in noise) + " grey levels")

    results = [Result(f"top-1 agreement with float32, trained {_label(cfg)} ({cfg.name})", "%",
                      agree("ours"), None, target=">= 99%",
                      notes=[f"{where}; top-1 accuracy ours {acc['ours']:.2f}%, "
                             f"float32 {acc['float32']:.2f}%"])]
    if int8:
        results.append(Result(
            f"top-1 agreement with float32, int8 (quantize_int8), trained {_label(cfg)}", "%",
            agree("int8"), None, target=">= 99%",
            notes=[f"{where}; calibrated on {len(ts.calibration)} training images; top-1 "
                   f"accuracy int8 {acc['int8']:.2f}%, float32 {acc['float32']:.2f}%"]))
    return results


# --- items 3 and 4: the input pipeline and dense evaluation ---------------------------------
def bench_pipeline(s: Settings) -> list[Result]:
    """Training input pipeline, images/s of one loader worker (one process, one thread) on
    ImageNet-sized JPEGs: ours against the plain Pillow pipeline and against JPEG decoding
    alone, through ``bench_pipeline.measure`` (best of its repeats)."""
    from .bench_pipeline import measure

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one loader worker has
    try:
        r = measure(s.pipeline_images, s.pipeline_repeats, 32)
    finally:
        torch.set_num_threads(threads)
    return [Result(f"input pipeline, {name}", "img/s", ours, plain,
                   target=">= 2x plain, >= 75% of JPEG decoding alone",
                   notes=[f"JPEG decoding alone {r['decode']:.0f} img/s: ours is "
                          f"{100 * ours / r['decode']:.0f}% of it; {s.pipeline_images} JPEGs of "
                          f"500x375/375x500 ({r['kb']:.0f} kB), one worker, best of repeats "
                          "(vggnet.bench_pipeline)"])
            for name, (plain, ours) in r["settings"].items()]


def bench_evaluation(s: Settings, rt: Runtime) -> Result:
    """Dense multi-scale evaluation against 150 crops at the same scales, through
    ``bench_evaluation.measure`` (best of its repeats, alternating)."""
    from .bench_evaluation import measure

    cfg = _config(s, width=s.eval_width)
    r = measure(cfg.arch, cfg.width, cfg.crop_size, list(s.eval_scales), s.eval_images,
                16, 0, rt, s.repeats)
    scales = ",".join(map(str, s.eval_scales))
    return Result(f"evaluation dense vs {50 * len(s.eval_scales)} crops, {_label(cfg)}, "
                  f"Q={{{scales}}}", "img/s", r["dense"], r["multicrop"], target=">= 5x",
                  notes=[f"baseline here = multi-crop through the same runtime; {s.eval_images} "
                         "images of 500x375/375x500, best of repeats (vggnet.bench_evaluation); "
                         f"multiply-adds per image dense {r['dense_macs'] / 1e9:.1f} G, "
                         f"multi-crop {r['multicrop_macs'] / 1e9:.1f} G"])


# --- item 5: memory -----------------------------------------------------------------------
_PROBE = """
import json, sys
from vggnet.bench import memory_probe
print(json.dumps(memory_probe(*json.loads(sys.argv[1]))))
"""


def memory_probe(kind: str, which: str, config: dict, batch: int, device: str) -> dict:
    """Run in a fresh process: build the model, run two inference batches or training steps,
    report peak memory (MiB): RSS on the CPU, allocated device memory on a GPU."""
    start = peak_rss_mib()  # Python + torch
    rt = make_runtime(device)
    cfg = VGGConfig.from_dict(config)
    run_rt = rt if which == "ours" else baseline_runtime(rt.device)
    model = build(cfg, seed=0).to(rt.device)
    x = torch.randn(batch, 3, cfg.crop_size, cfg.crop_size).to(rt.device)
    y = torch.zeros(batch, dtype=torch.long, device=rt.device)
    if kind == "inference":
        model = run_rt.prepare_inference(model) if which == "ours" else model.eval()
        for _ in range(2):
            if which == "ours":
                with run_rt.inference():
                    model(run_rt.input(x))
            else:
                with torch.no_grad():
                    model(x)
    else:
        model = run_rt.prepare(model.train())
        opt = make_sgd(model, **(run_rt.optimizer_options() if which == "ours" else {}))
        for i in range(2):
            train_step(model, opt, run_rt, run_rt.input(x), y, seed=i)
    if rt.device.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated(rt.device) / 2**20,
                "what": "GPU allocated",
                "start_mib": 0.0}
    return {"peak_mib": peak_rss_mib(), "what": "RSS",
            "start_mib": start}


def run_probes(probes: Sequence[tuple]) -> list[dict]:
    """Run ``memory_probe(*args)`` for each args tuple, each in its own fresh process, all at
    once (peak memory is per process, so running them side by side changes nothing but time)."""
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE, json.dumps(args)],
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in probes]
    results = []
    for args, proc in zip(probes, procs, strict=True):
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {args[:2]} failed:\n{err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def bench_memory(rt: Runtime, cases: Sequence[tuple[str, VGGConfig, int]]) -> list[Result]:
    """Peak memory of each (kind, config, batch) case, ours and the baseline."""
    probes = [(kind, which, cfg.to_dict(), batch, str(rt.device))
              for kind, cfg, batch in cases for which in ("ours", "baseline")]
    res = iter(run_probes(probes))
    results = []
    for kind, cfg, batch in cases:
        ours, base = next(res), next(res)
        idle = "" if rt.device.type == "cuda" else \
            f"; includes {base['start_mib']:.0f} MiB of Python + torch before the model"
        results.append(Result(f"peak memory, {kind} {_label(cfg)} batch {batch}", "MiB",
                              ours["peak_mib"], base["peak_mib"], target="report",
                              notes=[f"peak {ours['what']} in a fresh process{idle}"]))
    return results


# --- the suite ----------------------------------------------------------------------------
@dataclass
class Report:
    header: list[str]
    peaks: dict[str, Peak]
    results: list[Result]

    def to_dict(self) -> dict:
        return {"header": self.header,
                "peaks": {k: {"gflops": p.gflops, "by": p.by, "all": p.all}
                          for k, p in self.peaks.items()},
                "results": [r.to_dict() for r in self.results]}


def machine_line() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return (f"{model} ({bf16}), {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch "
            f"threads{gpu}, torch {torch.__version__}")


def _load() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


@dataclass
class Context:
    """What every item gets: the settings, the runtime, the matmul peak in its compute dtype,
    the trained model's validation set (None without one) and the log."""

    s: Settings
    rt: Runtime
    peak: Peak
    trained: tuple[str, str | None] | None  # (checkpoint, its dataset folder or None)
    log: Callable[[str], None]

    def no_trained(self, what: str) -> None:
        self.log(f"{what}: skipped, no trained model (run `make demo`, or give --trained "
                 "CHECKPOINT [--data DIR])")


def _item_inference(c: Context) -> Iterator[Result]:
    for b in c.s.inference_batches:
        yield bench_inference(c.s, c.rt, c.peak, b)
    if c.s.compile and not c.rt.compile:
        for b in c.s.inference_batches:
            yield bench_inference(c.s, dataclasses.replace(c.rt, compile=True), c.peak, b)


def _item_agreement(c: Context, int8: bool = False) -> Iterator[Result]:
    if c.trained is None:
        c.no_trained("top-1 agreement with float32")
        return
    path, data = c.trained
    yield from bench_agreement(c.rt, path, data, int8=int8)


def _item_int8(c: Context) -> Iterator[Result]:
    if c.rt.device.type != "cpu":
        return
    from . import bench_int8

    cfg, batch = _config(c.s), max(c.s.inference_batches)
    peak = bench_int8.int8_peak(c.s.matmul_n, c.s.repeats)
    if peak is None:
        c.log("int8 matmul peak: not measured, this torch has no int8 matmul")
    else:
        c.log(peak.line("int8 matmul peak", c.s.matmul_n, "GOP/s"))
    yield bench_int8.speed(cfg, _label(cfg), c.rt, batch, c.s.repeats, peak, forward_flops(cfg))
    yield from (r for r in _item_agreement(c, int8=True) if "int8" in r.item)


def _item_int8curve(c: Context) -> Iterator[Result]:
    # its own item: about 30 quantizations of the trained model (seconds for the demo net,
    # tens of minutes for a full VGG-16 on a CPU)
    if c.rt.device.type != "cpu":
        return
    if c.trained is None:
        c.no_trained("int8 accuracy/speed curve")
        return
    from . import bench_int8

    cfg = _config(c.s)
    ts = trained_set(*c.trained, calibration_images=3 * CALIBRATION_IMAGES)
    trained = _label(ts.loaded.model.config)
    c.log(f"int8 curve: ranking the layers of {trained}, then 3 calibrations per variant")
    yield from bench_int8.curve(ts, trained, c.rt, cfg, _label(cfg), max(c.s.inference_batches),
                                c.s.repeats)


def _item_peers(c: Context) -> Iterator[Result]:
    from . import bench_peers

    if c.rt.device.type != "cpu":
        c.log("peers: skipped, ONNX Runtime and OpenVINO are compared on the CPU")
        return
    agree = {}
    if c.trained is None:
        c.no_trained("peers, top-1 agreement")
    else:
        agree = bench_peers.trained_agreement(trained_set(*c.trained), c.rt, c.s.engines, c.log)
    cfg = _config(c.s)
    yield from bench_peers.measure(c.s, cfg, _label(cfg), c.rt, agree, c.log)


def _item_training(c: Context) -> Iterator[Result]:
    s = c.s
    yield bench_training(s, c.rt, c.peak, _config(s), s.train_batch, s.train_steps)
    reduced = _config(s, num_classes=10, width=s.reduced_width, crop=s.reduced_crop)
    yield bench_training(s, c.rt, c.peak, reduced, s.reduced_batch, s.reduced_steps)


def _item_memory(c: Context) -> Iterator[Result]:
    if c.s.memory:
        yield from bench_memory(c.rt, [("inference", _config(c.s), max(c.s.inference_batches)),
                                       ("training", _config(c.s), c.s.train_batch)])


# peers last: the engines it loads stay in the process (OpenVINO's threads, notably), and
# nothing else should run beside them
ITEM_RUNNERS: dict[str, Callable[[Context], Iterable[Result]]] = {
    "inference": _item_inference, "agreement": _item_agreement, "int8": _item_int8,
    "int8curve": _item_int8curve,
    "training": _item_training, "pipeline": lambda c: bench_pipeline(c.s),
    "evaluation": lambda c: [bench_evaluation(c.s, c.rt)], "memory": _item_memory,
    "peers": _item_peers}
ITEMS = tuple(ITEM_RUNNERS)


def header_lines(s: Settings, rt: Runtime) -> list[str]:
    base = baseline_runtime(rt.device).describe()
    return [f"vggnet bench, {datetime.datetime.now().isoformat(timespec='minutes')}",
            f"machine: {machine_line()}",
            f"load average at start (1/5/15 min): {_load()}",
            f"ours: {rt.describe()} (make_runtime defaults); baseline: {base} eager",
            f"timing: median of {s.repeats} interleaved repetitions after a warm-up"]


def measure_peaks(s: Settings, rt: Runtime, log: Callable[[str], None]) -> dict[str, Peak]:
    """float32's matmul peak, and bf16's where it is native (a CPU without bf16 dot products
    emulates it at a small fraction of float32's rate: minutes for one n=4096 product)."""
    peaks = {}
    bf16 = rt.device.type == "cuda" or cpu_has_native_bf16()
    if not bf16:
        log("matmul peak bfloat16: not measured, this CPU has no native bf16")
    for dtype in (torch.float32, torch.bfloat16) if bf16 else (torch.float32,):
        p = matmul_peak(dtype, s.matmul_n, rt.device, s.repeats)
        peaks[p.dtype] = p
        log(p.line(f"matmul peak {p.dtype}", s.matmul_n))
    return peaks


def run(s: Settings | None = None, rt: Runtime | None = None, items: Sequence[str] = ITEMS,
        log: Callable[[str], None] = print, trained: str | None = None,
        data: str | None = None) -> Report:
    """Run the chosen items; ``log`` gets each result line as soon as it is measured.

    ``trained``: a trained checkpoint or weights file for the agreement, int8 and peers items
    (default: the newest ``make demo`` run under ./runs), ``data`` its dataset folder
    (default: the one its training settings name).
    """
    s = s or Settings()
    rt = rt or make_runtime()
    unknown = sorted(set(items) - set(ITEMS))
    if unknown:
        raise ValueError(f"unknown benchmark item(s) {unknown}; choose from {', '.join(ITEMS)}")
    header = header_lines(s, rt)
    for line in header:
        log(line)
    peaks = measure_peaks(s, rt, log)
    peak = peaks["bfloat16" if rt.amp_dtype == torch.bfloat16 else "float32"]
    trained = trained or find_demo_checkpoint()
    c = Context(s, rt, peak, (trained, data) if trained else None, log)
    results: list[Result] = []
    for item in ITEMS:
        for r in ITEM_RUNNERS[item](c) if item in items else ():
            results.append(r)
            log(format_result(r))
    log(f"load average at end: {_load()}")
    return Report(header, peaks, results)


def format_result(r: Result) -> str:
    fmt = {"%": "{:.1f}", "MiB": "{:.0f}", "loss": "{:.4f}"}.get(r.unit, "{:.3g}").format
    line = f"{r.item}: ours {fmt(r.ours)} {r.unit}"
    if r.baseline is not None:
        line += f", baseline {fmt(r.baseline)} {r.unit}, ratio {r.ratio:.2f}x"
    if r.gflops is not None:
        line += (f"; ours {r.gflops:.0f} {r.ops} = {100 * r.of_peak:.0f}% of the {r.peak:.0f} "
                 f"{r.ops} {r.peak_name}")
    if r.target:
        line += f" [target {r.target}]"
    return "\n    ".join([line] + r.notes)


def bench_command(b: BenchSettings) -> int:
    """``vggnet bench``: the suite (or ``b.items``) at the device's sizes, or tiny (``quick``);
    the results also as JSON with ``b.json``."""
    rt = make_runtime(b.device)
    s = Settings.quick() if b.quick else Settings.for_device(rt.device)
    if b.repeats is not None:
        s.repeats = b.repeats
    s.compile = b.compile
    if b.threads is not None:
        torch.set_num_threads(b.threads)
    report = run(s, rt, b.items.split(",") if b.items else ITEMS, trained=b.trained, data=b.data)
    if b.json:
        with open(b.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    return 0
