"""Features from a trained net: layer taps (perceptual and style losses) and the paper's transfer
descriptor (Appendix B).

Appendix B: the 4096-d output of the penultimate layer (FC7 after its ReLU) is computed densely,
i.e. with the fully convolutional net on the whole image rescaled to each scale Q, averaged over
locations, over the image and its mirror image, and over the scales, then L2-normalised. A
linear classifier on it (probe.py) is the paper's transfer-learning recipe.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write, check_writable_output
from .predict import chw
from .runtime import Runtime, make_runtime
from .transforms import EvalTransform
from .weights import LoadedModel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FEATURE_SUFFIXES = (".npz", ".safetensors")  # the two formats save_features writes
TRANSFER_LAYER = "relu7"  # FC7 after ReLU: the paper's 4096-d image descriptor


def list_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named directly, plus every image under named folders (sorted, recursive)."""
    inputs, out = [Path(i) for i in inputs], []
    for item in inputs:
        if item.is_dir():
            out += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.is_file():
            out.append(item)
        else:
            raise FileNotFoundError(f"{str(item)!r} is neither an image file nor a folder")
    if not out:
        raise ValueError(f"no images found in {[str(i) for i in inputs]} (looked for "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return out


def default_transfer_scales(crop_size: int) -> list[int]:
    """The paper's Q = {256, 384, 512} for a 224 crop, scaled for other crop sizes."""
    return [round(crop_size * q / 224) for q in (256, 384, 512)]


@torch.no_grad()
def layer_taps(loaded: LoadedModel, paths: Sequence[str | os.PathLike], layers: Sequence[str],
               size: int | None = None, runtime: Runtime | None = None) -> dict[str, torch.Tensor]:
    """Outputs of ``layers`` (e.g. relu1_2, relu2_2, relu3_3, relu4_3) for size x size centre
    crops of the images rescaled to shorter side ``size`` (default: the crop size), as float32
    CPU tensors (N, C, h, w); FC taps are (N, C) at the crop size, maps at larger sizes."""
    rt = runtime or make_runtime()
    model = loaded.model.eval()
    rt.prepare_inference(model)
    crop = model.config.crop_size
    size = size or crop
    transform = EvalTransform(size, size)
    batch = torch.cat([chw(transform(p)) for p in paths])
    with rt.autocast():
        taps = model.extract(loaded.preprocessing.normalize(rt.input(batch)), layers, dense=size != crop)
    return {k: v.float().cpu() for k, v in taps.items()}


@torch.no_grad()
def transfer_features(loaded: LoadedModel, paths: Sequence[str | os.PathLike],
                      scales: Sequence[int] | None = None, flip: bool = True,
                      runtime: Runtime | None = None) -> torch.Tensor:
    """Appendix B descriptors (N, 4096*width): dense relu7, averaged over locations, flips and
    scales, L2-normalised. Scales must be at least the crop size."""
    rt = runtime or make_runtime()
    model = loaded.model.eval()
    rt.prepare_inference(model)
    scales = list(scales or default_transfer_scales(model.config.crop_size))
    if min(scales) < model.config.crop_size:
        raise ValueError(f"transfer scales must be at least the crop size {model.config.crop_size} "
                         f"(dense evaluation), got {scales}")
    whole = [EvalTransform(q, None) for q in scales]
    out = []
    for path in paths:
        total = torch.zeros(model.config.fc_width)
        for transform in whole:
            x = chw(transform(path))
            x = torch.cat([x, x.flip(-1)]) if flip else x
            with rt.autocast():
                fmap = model.extract(loaded.preprocessing.normalize(rt.input(x)), [TRANSFER_LAYER], dense=True)
            total += fmap[TRANSFER_LAYER].float().mean(dim=(0, 2, 3)).cpu()  # locations and flips
        out.append(total / len(scales))
    return torch.nn.functional.normalize(torch.stack(out), dim=1)


def extract_files(loaded: LoadedModel, paths: Sequence[str | os.PathLike], layers: Sequence[str] | None = None,
                  size: int | None = None, scales: Sequence[int] | None = None, batch_size: int = 16,
                  runtime: Runtime | None = None) -> dict[str, torch.Tensor]:
    """Taps for ``layers``, or (``layers`` None) the transfer descriptor under "features",
    ``batch_size`` images at a time. An unreadable image raises ``BadImageError`` naming it."""
    rt = runtime or make_runtime()
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        if layers:
            got = layer_taps(loaded, chunk, layers, size=size, runtime=rt)
        else:
            got = {"features": transfer_features(loaded, chunk, scales=scales, runtime=rt)}
        for k, v in got.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def save_features(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """``.npz`` (numpy arrays plus a JSON "meta" string) or ``.safetensors`` (metadata in the
    header), chosen by the suffix; any other suffix, a folder or an unwritable place is refused
    (``check_features_output``, which callers run before extracting). Written atomically."""
    path = check_features_output(path)
    if path.suffix.lower() == ".npz":
        arrays = {k: v.numpy() for k, v in tensors.items()}
        return atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()},
                metadata={"vggnet": json.dumps(meta)})
    return atomic_write(path, lambda f: f.write(data))


def check_features_output(path: str | os.PathLike) -> Path:
    """Refuse a features output that ``save_features`` could not write, before any work."""
    return check_writable_output(path, "features", FEATURE_SUFFIXES)
