"""The "peers" benchmark item: vggnet's default inference path against ONNX Runtime and
OpenVINO on the same weights, in the same run, interleaved with the plain baseline.

Candidates, each fed the same normalised float32 NCHW batch and timed in turns:
- plain: eager float32 NCHW PyTorch (the baseline of every ratio);
- vggnet: ``Runtime.prepare_inference``, what predict, features, evaluate and dense use;
- vggnet int8: ``quantize.quantize_int8`` (crop-sized input only);
- onnxruntime / openvino in each precision they run on this CPU (``engines.precisions``),
  from vggnet's exported ONNX graph (int8: ONNX Runtime's static quantization of it).
Rows: VGG-16 at the crop size for each inference batch, then one image at ``dense_size``
through the dense graph. Each row's top-1 agreement with float32 comes from the same
candidate built from a trained model (``make demo``'s) on its validation images: centre
crops for the crop rows, whole images rescaled to Q (averaged score map) for the dense rows.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable

import torch

from .bench_timing import Result, interleaved, settled
from .engines import ENGINES, EngineError, Graphs, installed, open_engine, precisions
from .model import VGG
from .runtime import Runtime
from .winograd import ran_winograd

Run = Callable[[torch.Tensor], torch.Tensor]
ALL_INT8 = "vggnet int8 all layers"  # every layer in int8, as the peers' int8 graphs


def pytorch_candidates(model: VGG, rt: Runtime, dense: bool,
                       calibration: list[torch.Tensor]) -> dict[str, Run]:
    """plain, vggnet (the default path) and, for crops on the CPU, vggnet int8 (its first and
    last layers in float32) and vggnet int8 all layers (like the peers' int8)."""
    ours = rt.prepare_inference(copy.deepcopy(model))

    def plain(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.forward_dense(x) if dense else model(x)

    def vggnet(x: torch.Tensor) -> torch.Tensor:
        with rt.inference():
            return ours.forward_dense(rt.input(x)) if dense else ours(rt.input(x))

    vggnet.model = ours  # rows() reports which layers ran Winograd
    runs = {"plain": plain, "vggnet": vggnet}
    if not dense and rt.device.type == "cpu":
        from .quantize import FLOAT_LAYERS, quantize_int8

        for name, float_layers in (("vggnet int8", FLOAT_LAYERS), (ALL_INT8, ())):
            int8 = quantize_int8(model, calibration, float_layers=float_layers)

            def vggnet_int8(x: torch.Tensor, int8=int8) -> torch.Tensor:
                with torch.no_grad():
                    return int8(x)

            runs[name] = vggnet_int8
    return runs


def engine_candidates(model: VGG, graphs: Graphs, dense: bool, calibration: list[torch.Tensor],
                      engines: Iterable[str], log: Callable[[str], None]) -> dict[str, Run]:
    """Each installed engine in each precision it runs here (no int8 for the dense graph);
    one that is missing, fails or differs is logged and left out."""
    runs = {}
    for name in engines:
        if not installed(name):
            log(f"peers: {name} skipped, not installed (pip install -e '.[engines]')")
            continue
        for precision in precisions(name):
            if dense and precision == "int8":
                continue
            try:
                runs[f"{name} {precision}"] = open_engine(
                    model, name, precision, dense, calibration if precision == "int8" else None,
                    graphs)
            except EngineError as e:
                log(f"peers: {name} {precision} left out: {e}")
    return runs


def candidates(model: VGG, rt: Runtime, dense: bool, calibration: list[torch.Tensor],
               engines: Iterable[str] = ENGINES,
               log: Callable[[str], None] = print) -> tuple[dict[str, Run], Graphs]:
    """Every candidate for ``model`` (float32, eval mode, on the CPU); close the returned
    Graphs when done with the engines."""
    graphs = Graphs(model)
    runs = pytorch_candidates(model, rt, dense, calibration)
    runs.update(engine_candidates(model, graphs, dense, calibration, engines, log))
    return runs, graphs


def top1(run: Run, inputs: Iterable[torch.Tensor], dense: bool) -> torch.Tensor:
    """Top-1 classes over the inputs; a dense score map is averaged over its locations."""
    out = []
    for x in inputs:
        scores = run(x).float()
        out.append((scores.mean(dim=(2, 3)) if dense else scores).argmax(1).cpu())
    return torch.cat(out)


def agreement(runs: dict[str, Run], inputs: list[torch.Tensor], dense: bool) -> dict[str, float]:
    """% of inputs on which each candidate's top-1 class is plain float32's."""
    ref = top1(runs["plain"], inputs, dense)
    return {k: 100 * (top1(r, inputs, dense) == ref).float().mean().item() for k, r in runs.items()}


# --- the benchmark item ---------------------------------------------------------------------
def trained_agreement(ts, rt: Runtime, engines: Iterable[str],
                      log: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """Each candidate's top-1 agreement with float32 on a trained model (``bench.TrainedSet``):
    {"crop": {candidate: %}, "dense": {candidate: %}}."""
    model = ts.loaded.model.float().eval()
    calibration = [x for x, _ in ts.crops(ts.calibration)]
    out = {}
    for dense, inputs in ((False, [x for x, _ in ts.crops()]), (True, ts.whole_images())):
        runs, graphs = candidates(model, rt, dense, calibration, engines, log)
        with graphs:
            out["dense" if dense else "crop"] = agreement(runs, inputs, dense)
    return out


def measure(s, cfg, label: str, rt: Runtime, agree: dict[str, dict[str, float]],
            log: Callable[[str], None]):
    """Yield the item's results (``bench.Result``): every candidate at each inference batch,
    then dense on one image, then how vggnet compares with the fastest peer."""
    from .model import build

    model = build(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    crop = (3, cfg.crop_size, cfg.crop_size)
    # random calibration: int8 ranges change the numbers, not the speed
    calibration = [torch.randn(max(s.inference_batches), *crop, generator=g)]
    runs, graphs = candidates(model, rt, False, calibration, s.engines, log)
    with graphs:
        for b in s.inference_batches:
            yield from rows(f"inference {label} batch {b}", runs,
                            torch.randn(b, *crop, generator=g), s.repeats, agree.get("crop"))
    del runs
    runs, graphs = candidates(model, rt, True, calibration, s.engines, log)
    with graphs:
        h, w = s.dense_size
        yield from rows(f"dense {label} one {h}x{w} image", runs,
                        torch.randn(1, 3, h, w, generator=g), s.repeats, agree.get("dense"))


def rows(label: str, runs: dict[str, Run], x: torch.Tensor, repeats: int,
         agree: dict[str, float] | None) -> list:
    """Time the candidates on ``x`` in turns; one result per candidate, then the verdicts."""
    t = interleaved({k: (lambda r=r: r(x)) for k, r in runs.items()}, repeats,
                    torch.device("cpu"), warmup=settled())
    rate = {k: x.shape[0] / v for k, v in t.items()}
    out = []
    for k in runs:
        a = (agree or {}).get(k)
        note = (f"top-1 agreement with float32 on the trained model: {a:.1f}%" if a is not None
                else "top-1 agreement: not measured, no trained model (run `make demo` or give "
                "--trained)" if not agree else "top-1 agreement: not measured, this candidate "
                "was left out on the trained model (see above)")
        notes = [note] + winograd_note(runs[k])
        out.append(Result(f"peers, {label}, {k}", "img/s", rate[k], rate["plain"],
                          target="report", notes=notes))
    return out + verdicts(label, rate, agree)


def winograd_note(run: Run) -> list[str]:
    """Which of vggnet's layers ran Winograd in the timed calls (winograd.PickedConv2d)."""
    model = getattr(run, "model", None)
    if model is None:
        return []
    names = [n.rsplit(".", 1)[-1] for n in ran_winograd(model)]
    return [f"Winograd ran in {', '.join(names) or 'no layer'} (the others: direct)"]


def verdicts(label: str, rate: dict[str, float], agree: dict[str, float] | None) -> list:
    """vggnet against the fastest peer that keeps 99% agreement, and vggnet int8 against the
    default and against the fastest peer int8."""
    def kept(k: str) -> str:
        return "" if agree is None or k not in agree else f", {agree[k]:.1f}% agreement"

    peers = [k for k in rate if k.split()[0] in ENGINES]
    good = [k for k in peers if agree is None or agree.get(k, 0) >= 99]
    out = []
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    uncapped = [k for k in good if cap and k.startswith("onnxruntime")]
    if set(good) - set(uncapped):
        best = max(set(good) - set(uncapped), key=rate.get)
        # a simulated CPU class: ONNX Runtime's own (MLAS) kernels do not read oneDNN's cap and
        # still run the full instruction set (measured: 188% of the AVX2 float32 peak)
        notes = [f"{', '.join(uncapped)} left out of this verdict: ONNX Runtime ignores "
                 f"ONEDNN_MAX_CPU_ISA={cap}, so its rows are not that class's figures"
                 ] if uncapped else []
        out.append(Result(f"peers, {label}: vggnet{kept('vggnet')} against the fastest peer "
                          f"with >= 99% agreement, {best}{kept(best)}", "img/s", rate["vggnet"],
                          rate[best], target=">= 1.1x", notes=notes))
    if "vggnet int8" in rate:
        notes = []
        int8_peers = [k for k in peers if k.endswith(" int8")]
        if int8_peers:
            best = max(int8_peers, key=rate.get)
            notes.append(f"fastest peer int8, {best}{kept(best)}: {rate[best]:.3g} img/s; "
                         f"vggnet int8 is {rate['vggnet int8'] / rate[best]:.2f}x it")
            if ALL_INT8 in rate:
                notes.append(f"like for like, every layer in int8: {ALL_INT8}{kept(ALL_INT8)} "
                             f"is {rate[ALL_INT8] / rate[best]:.2f}x {best}")
        out.append(Result(f"peers, {label}: vggnet int8{kept('vggnet int8')} against the "
                          f"vggnet default", "img/s", rate["vggnet int8"], rate["vggnet"],
                          target=">= 1.8x, >= 99% agreement", notes=notes))
    return out
