"""Deployable graphs of a trained net, checked against PyTorch before they are handed over.

Two graphs:
- classifier: the training-size crop -> logits, input (N, 3, crop, crop), dynamic N;
- dense (``dense=True``): the paper's fully convolutional net, any image of at least the crop
  size -> class score map (N, classes, H/32 - crop/32 + 1, W/32 - crop/32 + 1), dynamic N, H, W.
Both take the *normalised* input (``Preprocessing.normalize``); the preprocessing, config and
class names travel as metadata (ONNX metadata_props / a TorchScript extra file "vggnet.json").
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import check_writable_output
from .model import VGG
from .progress import progress_bar
from .settings import EXPORT_FORMATS, ExportSettings
from .weights import LoadedModel


class DenseVGG(nn.Module):
    """``forward`` = ``VGG.forward_dense``, so exporters see the fully convolutional graph."""

    def __init__(self, model: VGG) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_dense(x)


@dataclass
class ExportReport:
    path: Path
    max_abs_diff: dict[str, float]  # input shape "NxCxHxW" -> max |exported - PyTorch|


def metadata(loaded: LoadedModel, dense: bool) -> dict:
    """Everything a consumer of the exported graph needs, with no vggnet at hand: how to
    resize and crop an image, how to turn its pixels into the graph's input, what the output
    is, and the classes by name (docs/weights.md has a 15-line onnxruntime script using it)."""
    from .imagenet import readable_name
    from .protocol import centre_crop_resize

    prep, crop = loaded.preprocessing, loaded.model.config.crop_size
    a, b = prep.affine()
    names = loaded.class_names or [str(i) for i in range(loaded.model.config.num_classes)]
    return {
        "format": "vggnet.export/1", "graph": "dense" if dense else "classifier",
        "input": "image: float32 (N, 3, H, W), normalised as 'normalize' says; "
                 + (f"any H, W >= {crop}" if dense else f"H = W = {crop}"),
        "output": ("scores (N, classes, h, w): average over h and w, then soft-max (the "
                   "paper's dense evaluation)" if dense
                   else "logits (N, classes): soft-max gives the probabilities"),
        "resize": {"shorter_side": centre_crop_resize(crop), "crop": crop,
                   "rule": f"rescale the image so that its shorter side is "
                           f"{centre_crop_resize(crop)} (the longer side rounded), bilinear "
                           f"with antialiasing (Pillow's resize), then take the central "
                           f"{crop}x{crop} crop, left = round((width - {crop}) / 2), likewise "
                           "top" + ("; dense: the whole rescaled image, at any shorter side "
                                    f">= {crop}" if dense else "")},
        "normalize": {"channel_order": prep.channel_order, "scale": prep.scale,
                      "mean": list(prep.mean), "std": list(prep.std),
                      "rule": "pixels p in 0-255, channels in channel_order: x = (p * scale / "
                              "255 - mean) / std (scale 255: 0-255 pixels; scale 1: [0, 1]), "
                              "i.e. x = p * multiply + add",
                      "multiply": a.flatten().tolist(), "add": b.flatten().tolist()},
        "class_names": names, "class_labels": [readable_name(n) for n in names],
        "model_config": loaded.model.config.to_dict(), "preprocessing": prep.to_dict()}


def _metadata(loaded: LoadedModel, dense: bool) -> str:
    return json.dumps(metadata(loaded, dense))


def check_shapes(model: VGG, dense: bool) -> list[tuple[int, ...]]:
    """Inputs the exported graph is checked on: two batch sizes; for dense, two image sizes too."""
    c, crop = model.config.in_channels, model.config.crop_size
    if dense:
        return [(1, c, crop, crop), (2, c, crop + 32, crop + 64)]
    return [(1, c, crop, crop), (3, c, crop, crop)]


def onnx_graph(model: VGG, path: str | os.PathLike, dense: bool = False) -> Path:
    """The float32 ONNX graph of a CPU float32 ``model`` (no metadata): dynamic batch, and for
    the dense graph dynamic height and width (at least the crop size)."""
    module = DenseVGG(model).eval() if dense else model.eval()
    c, crop = model.config.in_channels, model.config.crop_size
    shapes = {0: torch.export.Dim("batch")}
    if dense:
        shapes |= {2: torch.export.Dim("height", min=crop), 3: torch.export.Dim("width", min=crop)}
    example = torch.randn(2, c, crop + 32 * dense, crop + 64 * dense)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # not "torchvision is not installed, skipping nms" & co
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export internals
            torch.onnx.export(module, (example,), str(path), dynamo=True, verbose=False,
                              external_data=False, input_names=["image"],
                              output_names=["scores" if dense else "logits"],
                              dynamic_shapes={"x": shapes})
    finally:
        onnx_log.setLevel(level)
    return path


def export_onnx(loaded: LoadedModel, path: str | os.PathLike, dense: bool = False) -> Path:
    import onnx

    path = onnx_graph(loaded.model.eval().cpu(), path, dense)
    proto = onnx.load(str(path))
    proto.metadata_props.add(key="vggnet", value=_metadata(loaded, dense))
    onnx.save(proto, str(path))
    return path


def export_torchscript(loaded: LoadedModel, path: str | os.PathLike, dense: bool = False) -> Path:
    model = loaded.model.eval().cpu()
    module = DenseVGG(model).eval() if dense else model
    c, crop = model.config.in_channels, model.config.crop_size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Tracing records the ops, not the Python shape checks (hence the TracerWarnings, silenced);
    # torch.jit is deprecated in favour of torch.export, but it is what libtorch (C++) loads.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, torch.randn(1, c, crop + 32 * dense, crop + 64 * dense))
        torch.jit.save(traced, str(path), _extra_files={"vggnet.json": _metadata(loaded, dense)})
    return path


def run_exported(path: str | os.PathLike, fmt: str, x: torch.Tensor) -> np.ndarray:
    """Run an exported graph outside vggnet's model code: onnxruntime, or the TorchScript loader."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path))(x).numpy()


def export(loaded: LoadedModel, path: str | os.PathLike, fmt: str = "onnx", dense: bool = False,
           tolerance: float = 1e-4, seed: int = 0, progress: bool = False) -> ExportReport:
    """Export, then check the graph against PyTorch on random inputs of ``check_shapes``; a
    difference above ``tolerance`` (relative to the largest output) is an error.
    ``progress``: a bar over the export and the checks."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {EXPORT_FORMATS}")
    model = loaded.model
    shapes = check_shapes(model, dense)
    with progress_bar(1 + len(shapes), f"{fmt} export and checks", unit="step",
                      enabled=progress) as bar:
        path = (export_onnx if fmt == "onnx" else export_torchscript)(loaded, path, dense)
        bar.update(1)
        diffs = _check(path, fmt, model, dense, shapes, tolerance, seed, bar)
    return ExportReport(path, diffs)


def _check(path: Path, fmt: str, model: VGG, dense: bool, shapes: list[tuple[int, ...]],
           tolerance: float, seed: int, bar) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    diffs = {}
    for shape in shapes:
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            ref = (model.forward_dense(x) if dense else model(x)).numpy()
        got = run_exported(path, fmt, x)
        if got.shape != ref.shape:
            raise RuntimeError(f"exported {fmt} graph gave shape {got.shape} for input {shape}, "
                               f"PyTorch {ref.shape}")
        diff = float(np.abs(got - ref).max())
        diffs["x".join(map(str, shape))] = diff
        if diff > tolerance * max(1.0, float(np.abs(ref).max())):
            path.unlink()
            raise RuntimeError(f"exported {fmt} graph differs from PyTorch by {diff:.3g} on input "
                               f"{shape} (tolerance {tolerance:g}); the file {str(path)!r} is "
                               "not usable")
        bar.update(1)
    return diffs


def export_command(s: ExportSettings) -> int:
    """``vggnet export``: export, then print the largest difference found on each check
    (--out checked first: not a folder, not read-only, in an existing folder)."""
    from .weights import load_model

    check_writable_output(s.out, f"{s.format} export")
    report = export(load_model(s.weights), s.out, fmt=s.format, dense=s.dense,
                    progress=s.progress)
    print(f"wrote {report.path} ({s.format}, {'dense' if s.dense else 'classifier'} graph)")
    for shape, diff in report.max_abs_diff.items():
        print(f"  checked on {shape}: max |{s.format} - PyTorch| = {diff:.2e}")
    return 0
