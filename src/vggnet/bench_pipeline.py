"""Input pipeline benchmark: images per second per worker, ours vs a plain Pillow pipeline.

Generates ImageNet-sized JPEGs (500x375 and 375x500, about 100 kB) and runs, in one process
with one thread (what one data-loader worker is), per image and with batching:
  decode   JPEG decode alone (Pillow, full size, RGB): the floor nothing can beat without
           decoding less
  plain    full decode, resize the shorter side to S, random crop, flip, float tensor,
           normalise (torchvision's Resize/RandomCrop/ToTensor/Normalize, done with Pillow)
  ours     vggnet.transforms.TrainTransform: only the crop's source region resampled (torch's
           vectorised uint8 antialiased bilinear, Pillow's filter), JPEG decoded at reduced
           size when it still only shrinks, uint8 out (the colour shift and normalisation run
           later on the device, on the whole batch)
for the paper's fixed S=256, its jittered S in [256, 512] (crop 224), and the reduced preset
(S=73, crop 64). Prints images/s and the ratios ours/plain (target >= 2) and ours/decode
(target >= 0.75).

The `pipeline` item of ``vggnet bench``; ``benchmarks/pipeline.py`` runs it alone:

    .venv/bin/python benchmarks/pipeline.py [--images 200] [--repeat 3]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import collate
from .synthetic import SyntheticSpec, render
from .transforms import TrainTransform

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def make_jpegs(folder: Path, n: int) -> list[str]:
    """n JPEGs of ImageNet's usual size and weight: 500x375 (3 in 4) or 375x500, quality 95,
    about 100 kB (the built-in dataset's scenes plus fine texture; decoding time grows with
    the bytes to entropy-decode, so file size matters as much as pixel count)."""
    spec = SyntheticSpec(seed=7, min_side=375, max_side=375)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(n):
        size = (500, 375) if i % 4 else (375, 500)
        img = np.asarray(render(spec, "train", i)[0].resize(size, Image.BICUBIC), np.float32)
        grain = rng.normal(128, 16, (size[1] // 2, size[0] // 2, 3)).clip(0, 255).astype(np.uint8)
        grain = np.asarray(Image.fromarray(grain).resize(size, Image.BILINEAR), np.float32)
        img = img + grain - 128
        p = folder / f"{i:04d}.jpg"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(p, quality=95)
        paths.append(str(p))
    return paths


def decode_only(path: str, rng: np.random.Generator):
    with Image.open(path) as im:
        return im.convert("RGB")


def plain(path: str, rng: np.random.Generator, s_range: tuple[int, int], crop: int) -> torch.Tensor:
    with Image.open(path) as im:
        img = im.convert("RGB")
    s = int(rng.integers(s_range[0], s_range[1] + 1))
    w, h = img.size
    size = (s, round(h * s / w)) if w <= h else (round(w * s / h), s)
    img = img.resize(size, Image.BILINEAR)
    x0, y0 = int(rng.integers(0, size[0] - crop + 1)), int(rng.integers(0, size[1] - crop + 1))
    img = img.crop((x0, y0, x0 + crop, y0 + crop))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    t = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return t.float().div(255).sub_(MEAN).div_(STD)


def run(fn, paths: list[str], batch: int, collate_fn) -> float:
    """images/s of fn over paths, batching like a loader worker does."""
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    items = []
    for p in paths:
        items.append(fn(p, rng))
        if len(items) == batch:
            collate_fn(items)
            items = []
    return len(paths) / (time.perf_counter() - t)


def best_of(repeat: int, *args) -> float:
    return max(run(*args) for _ in range(repeat))


SETTINGS = (("paper S=256, crop 224", (256, 256), 224),
            ("paper S=[256,512], 224", (256, 512), 224),
            ("reduced S=73, crop 64", (73, 73), 64))


def measure(images: int, repeat: int, batch: int, settings=SETTINGS) -> dict:
    """Images/s of JPEG decoding alone and, per (name, S range, crop) setting, of the plain
    pipeline and ours, in this process (best of ``repeat``). Also what ``vggnet bench`` runs."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), images)
        kb = np.mean([Path(p).stat().st_size for p in paths]) / 1024
        for p in paths:  # warm the page cache
            Path(p).read_bytes()
        dec = best_of(repeat, decode_only, paths, batch, lambda items: None)
        results = {}
        for name, s_range, crop in settings:
            t = TrainTransform(s_range, crop)
            ours = best_of(repeat, lambda p, rng, t=t: (*t(p, rng), []), paths, batch,
                           lambda items: collate([(i, 0, al, b) for i, al, b in items]))
            pl = best_of(repeat, lambda p, rng, s=s_range, c=crop: plain(p, rng, s, c), paths,
                         batch,
                         torch.stack)
            results[name] = (pl, ours)
    return {"kb": kb, "decode": dec, "settings": results}

