"""Dense multi-scale evaluation vs the paper's 150-crop protocol, measured in one run.

Both run through ``vggnet.evaluate.compute_posteriors`` on the same images (ImageNet-like
500x375 and 375x500 JPEGs, written to a temporary folder) at the same test scales, with
flips: dense runs the fully convolutional net once per scale and flip (6 passes per image);
multi-crop runs 5x5 crops x 2 flips x 3 scales = 150 crops per image. The two alternate
``--repeats`` times and each keeps its best run, so a burst of load on a shared machine does
not decide the ratio. Prints images/s of each and the ratio.

The `evaluation` item of ``vggnet bench``; ``benchmarks/eval_dense_vs_multicrop.py`` runs it
alone with its own options.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .evaluate import compute_posteriors
from .info import summarize
from .model import create_model
from .preprocess import paper
from .weights import LoadedModel


def make_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (500, 375) if i % 4 else (375, 500)  # ImageNet val is mostly 4:3 landscape
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        p = folder / f"{i:04d}.jpg"
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(p, quality=90)
        paths.append(str(p))
    return paths


def measure(arch: str, width: float, crop: int, scales: list[int], images: int, batch_size: int,
            workers: int | None, rt, repeats: int) -> dict:
    """Images/s of dense and of multi-crop evaluation (best of ``repeats``, alternating), and
    the multiply-adds each protocol needs for a 500x375 image. Also what ``vggnet bench`` runs."""
    model = create_model(arch, num_classes=1000, width=width, crop_size=crop, seed=0).eval()
    loaded = LoadedModel(model, paper((123.7, 116.3, 103.5)), None)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), images)
        # warm-up: first calls pick kernels for each new shape
        compute_posteriors([loaded], paths[:1], [scales], ("dense", "multicrop"),
                           batch_size=batch_size, workers=0, runtime=rt)
        rate = {"dense": 0.0, "multicrop": 0.0}
        for _ in range(repeats):
            for method in rate:
                pred = compute_posteriors([loaded], paths, [scales], (method,),
                                          batch_size=batch_size, workers=workers, runtime=rt)
                rate[method] = max(rate[method], len(pred.kept) / pred.seconds)
    # the arithmetic each protocol needs for a 500x375 image, for reference
    dense = sum(summarize(model.config, (q, round(q * 4 / 3)))["macs"] for q in scales) * 2
    crops = summarize(model.config)["macs"] * 50 * len(scales)
    return {**rate, "scales": scales, "dense_macs": dense, "multicrop_macs": crops}

