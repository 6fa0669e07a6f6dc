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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write, check_writable_output
from .image import list_images
from .progress import progress_bar
from .protocol import transfer_scales
from .runtime import Runtime, make_runtime
from .settings import FeaturesSettings
from .transforms import EvalTransform, chw
from .weights import LoadedModel, load_model

FEATURE_SUFFIXES = (".npz", ".safetensors")  # the two formats save_features writes
TRANSFER_LAYER = "relu7"  # FC7 after ReLU: the paper's 4096-d image descriptor


@torch.no_grad()
def layer_taps(loaded: LoadedModel, paths: Sequence[str | os.PathLike], layers: Sequence[str],
               size: int | None = None, runtime: Runtime | None = None) -> dict[str, torch.Tensor]:
    """Outputs of ``layers`` (e.g. relu1_2, relu2_2, relu3_3, relu4_3) for size x size centre
    crops of the images rescaled to shorter side ``size`` (default: the crop size), as float32
    CPU tensors (N, C, h, w); FC taps are (N, C) at the crop size, maps at larger sizes."""
    rt = runtime or make_runtime()
    model = loaded.model.eval()
    rt.prepare_inference(model, keep_layer_outputs=True)  # conv/bn taps stay pre-ReLU
    crop = model.config.crop_size
    size = size or crop
    transform = EvalTransform(size, size)
    batch = torch.cat([chw(transform(p)) for p in paths])
    with rt.autocast():
        x = loaded.preprocessing.normalize(rt.input(batch))
        taps = model.extract(x, layers, dense=size != crop)
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
    scales = list(scales or transfer_scales(model.config.crop_size))
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
                fmap = model.extract(loaded.preprocessing.normalize(rt.input(x)),
                                     [TRANSFER_LAYER], dense=True)
            total += fmap[TRANSFER_LAYER].float().mean(dim=(0, 2, 3)).cpu()  # locations and flips
        out.append(total / len(scales))
    return torch.nn.functional.normalize(torch.stack(out), dim=1)


def extract_files(loaded: LoadedModel, paths: Sequence[str | os.PathLike],
                  layers: Sequence[str] | None = None, size: int | None = None,
                  scales: Sequence[int] | None = None, batch_size: int = 16,
                  runtime: Runtime | None = None, progress: bool = False,
                  desc: str = "features") -> dict[str, torch.Tensor]:
    """Taps for ``layers``, or (``layers`` None) the transfer descriptor under "features",
    ``batch_size`` images at a time. An unreadable image raises ``BadImageError`` naming it."""
    rt = runtime or make_runtime()
    parts: dict[str, list[torch.Tensor]] = {}
    with progress_bar(len(paths), desc, enabled=progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            if layers:
                got = layer_taps(loaded, chunk, layers, size=size, runtime=rt)
            else:
                got = {"features": transfer_features(loaded, chunk, scales=scales, runtime=rt)}
            for k, v in got.items():
                parts.setdefault(k, []).append(v)
            bar.update(len(chunk))
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


def features_command(s: FeaturesSettings) -> int:
    """``vggnet features``: extract, then save with what was extracted and how (the weights,
    the image paths in row order, the layers and size, or the descriptor's scales)."""
    if s.pool is not None:
        return pooled_features(s)
    check_features_output(s.out)
    loaded = load_model(s.weights)
    rt = make_runtime(s.device, s.precision)
    layers = [n.strip() for n in s.layers.split(",") if n.strip()] if s.layers else None
    if layers:
        loaded.model.check_layers(layers)  # before any image is read
    paths = list_images(s.inputs)
    tensors = extract_files(loaded, paths, layers=layers, size=s.size, scales=s.scales,
                            batch_size=s.batch_size, runtime=rt, progress=s.progress)
    crop = loaded.model.config.crop_size
    meta = {"weights": str(s.weights), "paths": [str(p) for p in paths]}
    if layers:
        meta |= {"layers": layers, "size": s.size or crop}
    else:
        meta |= {"transfer": TRANSFER_LAYER, "l2_normalised": True,
                 "scales": list(s.scales or transfer_scales(crop))}
    save_features(s.out, tensors, meta)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
    print(f"{len(paths)} images: {shapes} -> {s.out}")
    return 0


def pooled_features(s: FeaturesSettings) -> int:
    """``vggnet features --pool``: descriptors of every readable image into ``s.out`` (rows in
    the order of meta["paths"]), the skipped ones listed."""
    from .retrieval import describe, descriptor_layer, descriptor_settings, report_skipped

    check_features_output(s.out)
    settings = descriptor_settings(s.pool, s.gem_p, s.scales)
    loaded = load_model(s.weights)
    descs, kept, skipped = describe(loaded, list_images(s.inputs), settings,
                                    make_runtime(s.device, s.precision), s.progress)
    meta = {"weights": str(s.weights), "paths": kept, "skipped": skipped, "pool": s.pool,
            "gem_p": s.gem_p if s.pool == "gem" else None, "layer": descriptor_layer(loaded),
            "longer_sides": [round(f * settings.size) for f in settings.scales],
            "l2_normalised": True}
    save_features(s.out, {"descriptors": descs}, meta)
    print(f"{len(kept)} images: descriptors {tuple(descs.shape)} -> {s.out}")
    report_skipped(skipped)
    return 0 if kept else 1
