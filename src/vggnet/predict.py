"""Classify images with a weights file; its preprocessing, crop size and class names come from
the file, so the user never has to remember them.

Two modes (Section 3.2 of the paper, kept simple; full dense + multi-crop evaluation over a
dataset lives in evaluate.py):
- centre crop (default): rescale the shorter side to 256/224 of the crop
  (``protocol.centre_crop_resize``), take the central crop, one forward pass;
- dense: rescale the shorter side to each scale Q, run the net fully convolutionally on the
  whole image and on its mirror image, average the class score map over locations, then
  average the soft-max posteriors over flips and scales.
With ``int8_calibration`` (centre crop only, CPU) an int8 copy of the model
(``quantize.quantize_int8``), calibrated on those images, does the forward passes: faster,
less exact (docs/benchmarks.md).
Images are read with the evaluation transform of the data pipeline (``transforms.EvalTransform``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .image import BadImageError, list_images
from .progress import progress_bar
from .protocol import centre_crop_resize
from .runtime import Runtime, make_runtime
from .settings import PredictSettings
from .transforms import EvalTransform, chw
from .weights import LoadedModel, load_model, require_classifier


@dataclass
class Prediction:
    path: str
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (index, name, probability)
    error: str | None = None  # why the image could not be classified


@torch.no_grad()
def posteriors(loaded: LoadedModel, pixels: torch.Tensor, dense: bool,
               runtime: Runtime) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> soft-max posteriors (N, classes), float32 on the CPU. Dense:
    the score map is averaged over locations before the soft-max (the paper's sum-pooling)."""
    model = loaded.model
    x = loaded.preprocessing.normalize(runtime.input(pixels))
    with runtime.autocast():
        out = model.forward_dense(x) if dense else model(x)
    scores = out.float().mean(dim=(2, 3)) if dense else out.float()
    return scores.softmax(dim=1).cpu()


def top_k(probs: torch.Tensor, class_names: Sequence[str] | None,
          k: int) -> list[list[tuple[int, str, float]]]:
    p, idx = probs.topk(min(k, probs.shape[1]), dim=1)
    name = (lambda i: class_names[i]) if class_names else str
    return [[(int(i), name(int(i)), float(v)) for v, i in zip(pr, ir, strict=True)]
            for pr, ir in zip(p, idx, strict=True)]


def int8_model(loaded: LoadedModel, calibration: Sequence[str | os.PathLike],
               transform: EvalTransform, images: int = 256, batch_size: int = 32,
               float_layers: Sequence[str] | None = None) -> torch.nn.Module:
    """``quantize_int8`` of the loaded model, calibrated on centre crops of up to ``images``
    evenly spaced files of ``calibration`` (unreadable ones are skipped); ``float_layers``:
    the layers kept in float32 (None: ``quantize.FLOAT_LAYERS``)."""
    from .quantize import FLOAT_LAYERS, quantize_int8

    float_layers = FLOAT_LAYERS if float_layers is None else tuple(float_layers)
    loaded.model.check_layers(float_layers)  # before any image is read

    files = list(calibration)[:: max(1, len(calibration) // images)][:images]

    def batches():
        crops = []
        for path in files:
            try:
                crops.append(chw(transform(path)))
            except BadImageError:
                continue
            if len(crops) == batch_size:
                yield loaded.preprocessing.normalize(torch.cat(crops))
                crops = []
        if crops:
            yield loaded.preprocessing.normalize(torch.cat(crops))

    return quantize_int8(loaded.model, batches(), float_layers=float_layers)


def predict(loaded: LoadedModel, paths: Iterable[str | os.PathLike], top: int = 5,
            dense: bool = False, scales: Sequence[int] | None = None, batch_size: int = 16,
            runtime: Runtime | None = None,
            int8_calibration: Sequence[str | os.PathLike] | None = None,
            int8_float: Sequence[str] | None = None,
            progress: bool = False) -> list[Prediction]:
    """Top-k classes for each image file; an unreadable image gets an ``error``, not an
    exception. ``int8_float``: with ``int8_calibration``, the layers kept in float32.
    ``progress``: a bar with the time left."""
    crop = loaded.model.config.crop_size
    if top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    scales = list(scales or [centre_crop_resize(crop)])
    if min(scales) < crop:
        raise ValueError(f"scales must be at least the crop size {crop}, got {scales}")
    centre = EvalTransform(scales[0], crop)
    rt = runtime or make_runtime()
    if int8_calibration is not None:
        if dense:
            raise ValueError("int8 runs crop-sized input only: use the centre crop (no --dense) "
                             "with --int8")
        # before prepare_inference changes the model
        int8 = int8_model(loaded, int8_calibration, centre, float_layers=int8_float)
    else:
        rt.prepare_inference(loaded.model)
    whole = [EvalTransform(q, None) for q in scales]
    paths = [str(p) for p in paths]
    results: list[Prediction] = []
    bar = progress_bar(len(paths), "predicting", enabled=progress)
    for start in range(0, len(paths), batch_size):
        decoded: list[tuple[Prediction, torch.Tensor | list[torch.Tensor]]] = []
        for path in paths[start:start + batch_size]:
            try:  # missing, empty, corrupt or huge files are reported, not raised
                inputs = [chw(t(path)) for t in whole] if dense else chw(centre(path))
            except BadImageError as e:
                results.append(Prediction(path, error=e.reason))
                continue
            results.append(Prediction(path))
            decoded.append((results[-1], inputs))
        if dense:  # one image at a time (sizes differ): image and mirror image at every scale
            for pred, xs in decoded:
                p = sum(posteriors(loaded, torch.cat([x, x.flip(-1)]), True, rt).mean(0)
                        for x in xs)
                pred.top = top_k((p / len(xs))[None], loaded.class_names, top)[0]
        elif decoded:
            pixels = torch.cat([x for _, x in decoded])
            if int8_calibration is None:
                probs = posteriors(loaded, pixels, False, rt)
            else:
                with torch.no_grad():
                    probs = int8(loaded.preprocessing.normalize(pixels)).softmax(dim=1)
            for (pred, _), best in zip(decoded, top_k(probs, loaded.class_names, top), strict=True):
                pred.top = best
        bar.update(len(paths[start:start + batch_size]))
    bar.close()
    return results


PREDICTION_SUFFIXES = (".csv", ".json")


def write_predictions(path: str | os.PathLike, predictions: Sequence[Prediction],
                      about: dict) -> Path:
    """``.csv``: one row per image (path, error, then index, class, name and probability of
    each of the top k); ``.json``: ``about`` (weights, method, scales) and the predictions.
    Written atomically, with the usual permissions."""
    from .checkpoint import atomic_write
    from .imagenet import readable_name
    from .runlog import round_floats

    path = Path(path)
    k = max((len(p.top) for p in predictions), default=0)
    rows = [{"path": p.path, "error": p.error or "",
             "top": [{"index": i, "class": c, "name": readable_name(c), "probability": prob}
                     for i, c, prob in p.top]} for p in predictions]
    if path.suffix.lower() == ".json":
        text = json.dumps(round_floats({**about, "predictions": rows}), indent=1) + "\n"
    else:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["path", "error"] + [f"{c}_{r}" for r in range(1, k + 1)
                                        for c in ("index", "class", "name", "probability")])
        for row in round_floats(rows):
            top = [t[c] for t in row["top"] for c in ("index", "class", "name", "probability")]
            w.writerow([row["path"], row["error"], *top] + [""] * (4 * k - len(top)))
        text = out.getvalue()
    return atomic_write(path, lambda f: f.write(text.encode()))


def predict_command(s: PredictSettings) -> int:
    """``vggnet predict``: the top classes of each image (files, and every image under the
    folders given) on stdout, or with --out in a CSV or JSON file; the files that cannot be
    read are listed on stderr with their reasons and the exit code is 1."""
    from .checkpoint import check_writable_output
    from .data import BadFile, format_bad
    from .imagenet import describe

    if s.out is not None:
        check_writable_output(s.out, "predictions", PREDICTION_SUFFIXES)
    paths = list_images(s.images)
    loaded = require_classifier(load_model(s.weights), s.weights)
    if s.int8_float is not None and not s.int8:
        raise ValueError("--int8-float chooses the float32 layers of the int8 model: give "
                         "--int8 CALIBRATION_DIR with it")
    calibration = list_images([s.int8]) if s.int8 else None
    preds = predict(loaded, paths, top=s.top, dense=s.dense, scales=s.scales,
                    runtime=make_runtime(s.device, s.precision), int8_calibration=calibration,
                    int8_float=s.int8_float, progress=s.progress and len(paths) > 1)
    bad = [BadFile(p.path, p.error) for p in preds if p.error]
    if s.out is not None:
        scales = list(s.scales or [centre_crop_resize(loaded.model.config.crop_size)])
        about = {"weights": str(s.weights), "method": "dense" if s.dense else "centre crop",
                 "scales": scales if s.dense else scales[:1]}
        write_predictions(s.out, preds, about)
        print(f"{len(preds) - len(bad)} image(s) classified: top {s.top} classes in {s.out}")
    else:
        for pred in (p for p in preds if not p.error):
            print(pred.path)
            for rank, (index, name, prob) in enumerate(pred.top, 1):
                print(f"  {rank}. {prob:7.2%}  {describe(name)} [{index}]")
    if bad:
        print(f"vggnet predict: {len(bad)} of {len(preds)} file(s) could not be read:\n"
              f"{format_bad(bad)}", file=sys.stderr)
    return 1 if bad else 0
