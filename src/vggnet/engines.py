"""Other inference engines on the same weights: ONNX Runtime and OpenVINO (the optional extra
``pip install -e '.[engines]'``), run from vggnet's exported ONNX graph.

The benchmark times them beside vggnet's own path, and anyone can run a trained net through
them with ``open_engine``. Every engine is checked against PyTorch float32 on a probe batch
before it is handed over: one that fails to load, or whose logits differ by more than its
precision explains, raises ``EngineError`` naming the engine and the difference, and
``engine_or_pytorch`` then falls back to PyTorch and says so. Never a silent change of results.

Precisions: "fp32"; "bf16" (OpenVINO's inference precision hint; only where the CPU computes
bf16 natively, elsewhere it would be emulated and slower); "int8": ONNX Runtime's static
quantization of the graph (QDQ, int8 weights per output channel, uint8 activations with
ranges from the calibration batches), which OpenVINO also runs as int8.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model import VGG

ENGINES = ("onnxruntime", "openvino")
# relative error of an engine's output vs PyTorch float32 (norm of the difference / norm of
# the reference) above which it is refused. bf16 rounds to 8 bits of mantissa (measured 0.8%
# on VGG-16); int8 to 256 levels per tensor, which on a random probe through an untrained net
# drifts by tens of percent, so its bound only catches a broken graph (unrelated outputs of
# equal norm are sqrt(2) = 1.41 apart); its real cost is the top-1 agreement the bench measures
TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2, "int8": 0.5}


class EngineError(RuntimeError):
    """An engine that is missing, failed to load or run, or gives different numbers."""


def installed(name: str) -> bool:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {ENGINES}")
    return importlib.util.find_spec(name) is not None


def precisions(name: str) -> tuple[str, ...]:
    """What ``name`` runs on this CPU: float32, bf16 where it is native, int8."""
    from .runtime import cpu_has_native_bf16

    bf16 = name == "openvino" and cpu_has_native_bf16()
    return ("fp32", "bf16", "int8") if bf16 else ("fp32", "int8")


@dataclass
class Engine:
    """A loaded engine: ``engine(x)`` takes normalised float input (N, C, H, W) like the
    PyTorch model and returns float32 logits (or the dense score map) as a torch tensor."""

    name: str
    precision: str
    dense: bool
    run: Callable[[np.ndarray], np.ndarray]
    difference: float = float("nan")  # relative error vs PyTorch float32 on the probe batch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.run(np.ascontiguousarray(x.float().numpy()))))

    def describe(self) -> str:
        graph = "dense" if self.dense else "classifier"
        return f"{self.name} {self.precision} ({graph} graph)"


def export_graph(model: VGG, path: str | os.PathLike, dense: bool = False) -> Path:
    """The float32 ONNX graph of ``model`` (classifier, or the dense one), no metadata."""
    from .export import onnx_graph

    return onnx_graph(model, path, dense)


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over an iterable of batches."""

    def __init__(self, name: str, batches: Iterable[torch.Tensor]) -> None:
        self.name, self.it = name, iter(batches)

    def get_next(self) -> dict | None:
        x = next(self.it, None)
        return None if x is None else {self.name: x.float().numpy()}

    def rewind(self) -> None:  # older onnxruntime calls it between calibration passes
        pass


def quantize_graph(fp32: str | os.PathLike, out: str | os.PathLike,
                   calibration: Iterable[torch.Tensor]) -> Path:
    """ONNX Runtime static int8 of an exported graph: QDQ, per-channel int8 weights, uint8
    activations over the ranges the calibration batches reach."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "consider pre-processing before quantization" and the like
    try:
        quantize_static(str(fp32), str(out), _Batches("image", calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        root.setLevel(level)
    return Path(out)


def _load_onnxruntime(path: Path, precision: str, threads: int) -> Callable:
    import onnxruntime as ort

    if precision == "bf16":
        raise EngineError("onnxruntime has no bf16 convolutions on the CPU; use fp32 or int8")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # idle threads sleep instead of spinning, as torch's and OpenVINO's do between calls:
    # spinning threads would take the cores from whatever runs next in the same process
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _load_openvino(path: Path, precision: str, threads: int) -> Callable:
    import openvino as ov

    core = ov.Core()
    # int8 graphs carry their own precision (QDQ); the hint sets what the rest runs in
    hint = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}[precision]
    # no pinning: OpenVINO would pin its worker threads to cores, which torch's threads (and
    # any process forked later, e.g. a data loader worker) share; torch pins nothing either
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[0]


def probe_difference(engine: Engine, model: VGG, x: torch.Tensor) -> float:
    """Relative error (norm of the difference / norm of PyTorch's) of the engine's output on
    ``x`` against the float32 model's; raises EngineError on a shape mismatch."""
    with torch.no_grad():
        ref = (model.forward_dense(x) if engine.dense else model(x)).float()
    got = engine(x)
    if got.shape != ref.shape:
        raise EngineError(f"{engine.describe()} gave shape {tuple(got.shape)}, PyTorch "
                          f"{tuple(ref.shape)}")
    return ((got - ref).norm() / ref.norm()).item()


def open_engine(model: VGG, name: str, precision: str = "fp32", dense: bool = False,
                calibration: Iterable[torch.Tensor] | None = None,
                graphs: Graphs | None = None, threads: int | None = None) -> Engine:
    """Export ``model`` (float32, eval mode, left unchanged), load it into engine ``name`` in
    ``precision``, and check it against PyTorch on a probe batch; EngineError if it cannot.

    int8 runs the classifier graph and needs ``calibration`` batches (normalised crops).
    ``graphs``: exported graphs to reuse across engines (default: exported here, then removed).
    """
    if not installed(name):
        raise EngineError(f"{name} is not installed (pip install -e '.[engines]')")
    if precision not in precisions(name):
        raise EngineError(f"{name} does not run {precision!r} on this CPU; it runs "
                          f"{', '.join(precisions(name))}")
    if precision == "int8" and (calibration is None or dense):
        raise ValueError("int8 runs the classifier graph (crop-sized input) and needs "
                         "calibration batches (normalised crops)")
    if model.features[0].weight.dtype != torch.float32 or model.training:
        raise ValueError("open_engine takes the float32 model in eval mode (before "
                         "prepare_inference): the engines compile their own precision from it")
    with contextlib.ExitStack() as stack:
        graphs = graphs or stack.enter_context(Graphs(model))
        path = graphs.int8(calibration) if precision == "int8" else graphs.fp32(dense)
        load = _load_onnxruntime if name == "onnxruntime" else _load_openvino
        try:
            engine = Engine(name, precision, dense,
                            load(path, precision, threads or torch.get_num_threads()))
        except EngineError:
            raise
        except Exception as e:  # each engine raises its own kinds of error
            raise EngineError(f"{name} {precision} failed to load the graph: "
                              f"{str(e).strip().splitlines()[0][:200]}") from e
    return _checked(engine, model)


class Graphs:
    """A model's exported ONNX graphs in a temporary folder, each made once when first asked
    for: ``with Graphs(model) as g: g.fp32(dense)``, ``g.int8(calibration)``."""

    def __init__(self, model: VGG) -> None:
        self.model = model
        self._tmp = tempfile.TemporaryDirectory(prefix="vggnet-graphs-")
        self.folder = Path(self._tmp.name)
        self._made: dict[str, Path] = {}

    def fp32(self, dense: bool = False) -> Path:
        key = "dense" if dense else "classifier"
        if key not in self._made:
            self._made[key] = export_graph(self.model, self.folder / f"{key}.onnx", dense)
        return self._made[key]

    def int8(self, calibration: Iterable[torch.Tensor]) -> Path:
        if "int8" not in self._made:
            self._made["int8"] = quantize_graph(self.fp32(), self.folder / "int8.onnx", calibration)
        return self._made["int8"]

    def __enter__(self) -> Graphs:
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()


def _checked(engine: Engine, model: VGG) -> Engine:
    c, crop = model.config.in_channels, model.config.crop_size
    size = (crop + 32, crop + 64) if engine.dense else (crop, crop)
    x = torch.randn(2, c, *size, generator=torch.Generator().manual_seed(0))
    try:
        engine.difference = probe_difference(engine, model, x)
    except EngineError:
        raise
    except Exception as e:
        raise EngineError(f"{engine.describe()} failed on a probe batch: "
                          f"{str(e).strip().splitlines()[0][:200]}") from e
    if not engine.difference <= TOLERANCE[engine.precision]:
        raise EngineError(f"{engine.describe()} differs from PyTorch float32 by "
                          f"{engine.difference:.3g} (relative) on a probe batch, more than the "
                          f"{TOLERANCE[engine.precision]:g} its precision explains")
    return engine


def engine_or_pytorch(model: VGG, name: str, precision: str = "fp32", dense: bool = False,
                      **kwargs) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """``open_engine``, or, when the engine is missing, fails or differs, the float32 PyTorch
    model itself; returns (callable, a line saying which one runs and why)."""
    try:
        engine = open_engine(model, name, precision, dense, **kwargs)
    except EngineError as e:
        def pytorch(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model.forward_dense(x) if dense else model(x)
        return pytorch, f"{e}; running PyTorch float32 instead"
    return engine, (f"{engine.describe()}: relative difference from PyTorch float32 "
                    f"{engine.difference:.2e} on a probe batch")
