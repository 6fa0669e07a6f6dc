"""The main job (`make demo`): the built-in dataset, a reduced VGG trained with the paper's
recipe, its evaluation on the validation split, and a run folder with everything.

1. Generate the built-in synthetic dataset as JPEG image folders (reused when already there).
2. Train VGG A, the paper's first network, with batch norm (vgg11_bn) and the ``reduced``
   preset: the paper's recipe (SGD, momentum 0.9, weight decay 5e-4, dropout 0.5, lr 1e-2
   with plateau drops, rescale to a fixed S, random crops, flips, PCA colour shift, mean-RGB
   subtraction) at crop 64, S=73, width 1/8, for 35 epochs at batch 64. Batch norm because a
   few CPU minutes are a few thousand steps, in which plain A barely leaves chance on this
   data; batch 64 rather than 256 because 5,000 images are only 19 steps an epoch at 256
   (with batch norm the smaller batch is stable; plain nets need 256, see
   ``protocol.PRESETS``). The measurements behind both choices are in docs/training.md.
3. Reload best.pt through the public loader and evaluate it (centre crop at Q=S).
4. The run folder holds best.pt/last.pt, metrics (CSV, JSONL, TensorBoard), plots and report.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .progress import progress_bar
from .settings import DemoSettings, TrainSettings, make_settings
from .synthetic import is_made, make_synthetic


@dataclass
class DemoResult:
    folder: Path
    status: str
    top1_err: float
    top5_err: float
    epochs: int
    seconds: float
    data_seconds: float
    train_seconds: float


def demo_precision() -> str:
    """bf16 autocast on a CPU that computes bf16 natively (AVX512-BF16/AMX): 1.3x the images/s
    of fp32 for this net, measured on the 2-core machine the README's numbers come from. GPUs
    get the runtime's own choice."""
    import torch

    from .runtime import cpu_has_native_bf16

    if torch.cuda.is_available():
        return "auto"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def evaluate_checkpoint(path: Path, val_samples, workers: int) -> dict:
    """Top-1/top-5 error of a saved model on (path, label) samples: centre crop at the test
    scale its training settings imply (Q = S for a fixed S)."""
    from .data import EvalImages, make_loader
    from .protocol import default_test_scale
    from .runtime import make_runtime
    from .train import validate
    from .transforms import EvalTransform
    from .weights import load_model

    loaded = load_model(path)
    s = loaded.meta["train_settings"]
    runtime = make_runtime(precision=s.get("precision", "auto"))
    model = runtime.prepare(loaded.model)
    images = EvalImages(val_samples, EvalTransform(default_test_scale(s["scale"]), s["crop_size"]))
    return validate(model, make_loader(images, 128, workers), runtime, loaded.preprocessing)


def demo_train_settings(d: DemoSettings) -> TrainSettings:
    """The training the main job runs: the reduced preset with the demo's model, epochs and
    batch (what `vggnet train --preset reduced --model vgg11_bn --batch-size 64 --epochs 35`
    trains, the README's command)."""
    out = d.out or str(Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    return make_settings("reduced", data=d.data_dir, out=out, model=d.model, epochs=d.epochs,
                         batch_size=d.batch_size, workers=d.workers, progress=d.progress,
                         precision=d.precision or demo_precision(), width=d.width,
                         crop_size=d.crop_size, scale=d.scale)


def run_demo(d: DemoSettings) -> DemoResult:
    from .data import open_dataset
    from .model import config_for
    from .train import default_loader_workers, train

    t0 = time.perf_counter()
    cached = is_made(d.data_dir, d.dataset)
    if not cached:
        print(f"generating the built-in dataset in {d.data_dir} ({d.dataset.count('train')} "
              f"train + {d.dataset.count('val')} val JPEGs, seed {d.dataset.seed}) ...",
              flush=True)
    total = d.dataset.count("train") + d.dataset.count("val")
    with progress_bar(total, "writing", enabled=d.progress and not cached) as bar:
        make_synthetic(d.data_dir, d.dataset, progress=bar.update)
    data_s = time.perf_counter() - t0
    print(f"dataset {d.data_dir}: {'already there' if cached else f'written in {data_s:.0f} s'}",
          flush=True)

    t1 = time.perf_counter()
    r = train(demo_train_settings(d))
    train_s = time.perf_counter() - t1
    if r.status == "interrupted":
        return DemoResult(r.folder, r.status, float("nan"), float("nan"), r.epochs,
                          time.perf_counter() - t0, data_s, train_s)

    workers = d.workers if d.workers is not None else default_loader_workers()
    val = evaluate_checkpoint(r.folder / "best.pt", open_dataset(d.data_dir).val.samples, workers)
    total = time.perf_counter() - t0
    result = DemoResult(r.folder, r.status, val["top1_err"], val["top5_err"], r.epochs, total,
                        data_s, train_s)
    chance = 1 - 1 / d.dataset.num_classes
    section = (
        "\n## Main job\n\n"
        f"- Built-in synthetic dataset `{d.data_dir}` (seed {d.dataset.seed}, "
        f"{d.dataset.num_classes} classes, {d.dataset.count('train')} train / "
        f"{d.dataset.count('val')} val JPEGs): "
        f"{'reused' if cached else f'generated in {data_s:.0f} s'}\n"
        f"- Training: {r.epochs} epoch(s) in {train_s / 60:.1f} min\n"
        f"- best.pt reloaded with `vggnet.weights.load_model` and evaluated on the {val['images']} "
        f"validation images (centre crop): **top-1 error {100 * val['top1_err']:.2f}%, top-5 error "
        f"{100 * val['top5_err']:.2f}%** (chance: {100 * chance:.0f}% top-1)\n"
        f"- Whole job: {total / 60:.1f} min\n")
    with open(r.folder / "report.md", "a") as f:
        f.write(section)
    print(f"main job done in {total / 60:.1f} min: {config_for(d.model).label} (reduced) "
          f"reached top-1 error {100 * val['top1_err']:.2f}%, top-5 error "
          f"{100 * val['top5_err']:.2f}% on the {val['images']} validation images (chance "
          f"{100 * chance:.0f}%)\nrun folder: {r.folder} (report.md, best.pt, metrics.csv, "
          "loss.png, error.png, tensorboard/)")
    return result


def demo_command(d: DemoSettings) -> int:
    """``vggnet demo``: exit code 130 when interrupted (the run can be resumed)."""
    return 130 if run_demo(d).status == "interrupted" else 0
