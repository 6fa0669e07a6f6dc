"""int8 inference: post-training static quantization of a VGG for crop-sized inputs.

A choice to make, not a default: int8 rounds activations to 256 levels per tensor, so
predictions move more than bf16's do; `vggnet bench` measures both the speed and the top-1
agreement with float32 on a trained model (docs/benchmarks.md).

    int8 = quantize_int8(model, calibration_batches)   # preprocessed (N, 3, crop, crop) floats
    logits = int8(x)                                    # float32 logits, CPU only

torch.ao's FX graph mode does the work: conv + batch norm + ReLU are fused, weights become
int8 per output channel, activations uint8 per tensor with the ranges a histogram observer
picks while the calibration batches run through the float model. Measured on the demo net
(vgg11_bn width 1/8, 1,000 validation images; docs/benchmarks.md), each choice below moved
the top-1 agreement with float32:
- the full 8-bit activation range where the CPU has VNNI: torch's x86 default keeps 7 bits
  (``reduce_range``) so that AVX2's 16-bit intermediate sums cannot saturate; with VNNI
  (32-bit sums) the eighth bit is free: 94.1% -> 96.1%;
- the last linear layer left in float32: its int8 output would round the logits themselves
  to 256 levels: 96.0% -> 98.5% (mean over 4 calibration sets), for 0.03% of VGG-16's work;
- the first conv too (3 input channels, raw pixels in): over 8 calibration sets of 256
  images, 98.96% -> 99.24% on the float32-trained demo model (better in 7 of the 8 sets) and
  98.45% -> 98.55% on the bf16-trained one, for 5% of the int8 speed (measured in one
  process, batch 1 and 8). No other layer kept in float32 moved agreement beyond what
  changing the calibration images does, while each costs 10-20% of the speed
  (``vggnet bench --items int8curve`` measures this curve, ``layer_sensitivity`` ranks the
  layers);
- more calibration images (1,024 instead of 256) or other observers (min/max, moving
  average, 8192 histogram bins) moved it by less than the +-0.5% that 1,000 images resolve.
torch 2.13 marks torch.ao.quantization deprecated (its successor, torchao, has no CPU int8
convolution path yet); its warnings are silenced here and the tests pin its behaviour.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .model import VGG, LocalResponseNorm


class _Classifier(nn.Module):
    """features -> flatten -> classifier: VGG.forward without its input checks, which a
    symbolic trace cannot follow."""

    def __init__(self, model: VGG) -> None:
        super().__init__()
        self.features, self.classifier = model.features, model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


FLOAT_LAYERS = ("conv1_1", "fc8")  # the first conv and the logits stay float32 (see above)


def has_vnni() -> bool:
    """Whether the CPU has 8-bit dot products with 32-bit sums (AVX512-VNNI or AVX-VNNI)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_vnni") or caps.get("avx_vnni"))


def default_backend(engines: Sequence[str] | None = None) -> str:
    """torch's quantized engine for this CPU: "x86" (oneDNN/fbgemm) where the build has it,
    else "qnnpack" (ARM builds), else "onednn". ``engines``: the build's
    (``torch.backends.quantized.supported_engines``)."""
    engines = list(torch.backends.quantized.supported_engines if engines is None else engines)
    for name in ("x86", "qnnpack", "onednn"):
        if name in engines:
            return name
    raise RuntimeError(f"this torch build has no quantized engine for int8 (it has "
                       f"{engines}); int8 needs an x86 or ARM CPU build of torch")


def quantize_int8(model: VGG, calibration: Iterable[torch.Tensor], backend: str | None = None,
                  float_layers: Sequence[str] = FLOAT_LAYERS,
                  reduce_range: bool | None = None) -> nn.Module:
    """An int8 copy of ``model`` (left unchanged) for crop-sized float input, CPU only.

    ``calibration``: preprocessed float batches like the ones the model will see (normalised
    crops, (N, 3, crop, crop)); their activation ranges set the int8 scales. ``backend``:
    torch's quantized engine, "x86" (oneDNN/fbgemm, VNNI) or "qnnpack" (ARM); None:
    ``default_backend()``. ``float_layers``: layer names (``model.layer_names()``) kept in
    float32. ``reduce_range`` (x86): 7-bit activations (None: only where the CPU lacks VNNI).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        return _quantize(model, calibration, backend or default_backend(), tuple(float_layers),
                         (not has_vnni()) if reduce_range is None else reduce_range)


def weighted_layers(model: VGG) -> list[str]:
    """Names of the layers int8 can take (convolutions and linear layers), in order."""
    return [name for name, m in (*model.features.named_children(),
                                 *model.classifier.named_children())
            if isinstance(m, (nn.Conv2d, nn.Linear))]


def layer_sensitivity(model: VGG, calibration: Sequence[torch.Tensor],
                      backend: str | None = None, reduce_range: bool | None = None
                      ) -> dict[str, float]:
    """How far int8 moves the output through each layer alone, most sensitive first.

    For each of ``weighted_layers(model)``: the model with only that layer in int8 (weights
    and its input, ranges set on ``calibration``), its mean KL divergence from float32's
    soft-max over the ``calibration`` batches (nats per image). Where to spend float32 layers
    first; the cost is one quantization and two passes over ``calibration`` per layer, so a
    few batches are enough to rank them.
    """
    layers = weighted_layers(model)
    base = copy.deepcopy(model).float().cpu().eval()
    with torch.no_grad():
        ref = [F.log_softmax(base(x.float()), 1) for x in calibration]
    out = {}
    for name in layers:
        q = quantize_int8(model, calibration, backend, [n for n in layers if n != name],
                          reduce_range)
        with torch.no_grad():
            kl = sum(F.kl_div(F.log_softmax(q(x.float()), 1), r, log_target=True,
                              reduction="sum").item()
                     for x, r in zip(calibration, ref, strict=True))
        # KL >= 0; float rounding can leave a layer that changes nothing a hair below
        out[name] = max(kl, 0.0) / sum(len(x) for x in calibration)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def qconfig_mapping(model: VGG, backend: str, float_layers: tuple[str, ...],
                    reduce_range: bool):
    """torch's defaults for ``backend`` with our activation range and float layers."""
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import HistogramObserver, PerChannelMinMaxObserver

    unknown = sorted(set(float_layers) - set(model.layer_names()))
    if unknown:
        raise ValueError(f"float_layers {unknown} are not layers of this VGG "
                         f"{model.config.arch}; choose from {model.layer_names()}")
    mapping = get_default_qconfig_mapping(backend)
    if backend == "x86":
        mapping.set_global(QConfig(
            activation=HistogramObserver.with_args(reduce_range=reduce_range),
            weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                      qscheme=torch.per_channel_symmetric)))
    for name in float_layers:
        where = "features" if name in model.features._modules else "classifier"
        mapping.set_module_name(f"{where}.{name}", None)
    return mapping


def _quantize(model: VGG, calibration: Iterable[torch.Tensor], backend: str,
              float_layers: tuple[str, ...], reduce_range: bool) -> nn.Module:
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if backend not in torch.backends.quantized.supported_engines:
        raise ValueError(f"quantized engine {backend!r} is not in this torch build "
                         f"(available: {torch.backends.quantized.supported_engines})")
    if not isinstance(model, VGG):
        raise TypeError(f"quantize_int8 takes a vggnet VGG, got {type(model).__name__}")
    mapping = qconfig_mapping(model, backend, float_layers, reduce_range)
    torch.backends.quantized.engine = backend
    crop, c = model.config.crop_size, model.config.in_channels
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ValueError("quantize_int8 needs at least one calibration batch to set the int8 "
                         "ranges")
    if first.dim() != 4 or tuple(first.shape[1:]) != (c, crop, crop):
        raise ValueError(f"calibration batches must be (N, {c}, {crop}, {crop}) crops, got "
                         f"{tuple(first.shape)}")
    plain = _Classifier(copy.deepcopy(model).float().cpu().eval()).eval()
    # our LRN builds its band from the input's channel count: run it as a float module
    custom = PrepareCustomConfig().set_non_traceable_module_classes([LocalResponseNorm])
    prepared = prepare_fx(plain, mapping, (first.float(),), prepare_custom_config=custom)
    with torch.no_grad():
        for x in (first, *batches):
            prepared(x.float().cpu())
    return Int8VGG(convert_fx(prepared).eval(), (first.shape[0], c, crop, crop))


class Int8VGG(nn.Module):
    """The converted graph, fed channels_last input (the int8 convolutions' own layout: NCHW
    input is reordered by every one of them), its float layers on oneDNN weights laid out
    once where ``fuse.packing_works`` / ``fuse.linear_packing_works``, as the default path
    runs them (convolutions with their ReLU fused: an eager NCHW float32 conv1_1 cost a third
    of the int8 net's time, measured in docs/benchmarks.md; linear layers: see
    ``fuse.PackedLinear``); malloc keeps freed memory (``fuse.keep_freed_memory``) as for the
    default path. ``packed``: the names of the layers so run."""

    def __init__(self, graph: nn.Module, input_size: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.graph = graph
        from .fuse import keep_freed_memory

        keep_freed_memory()  # as prepare_inference does: no fresh pages for each pass
        self.packed = _pack_float_convs(graph, input_size)
        self.packed += _pack_float_linears(graph.classifier, input_size[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, crop, crop) -> logits
        return self.graph(x.contiguous(memory_format=torch.channels_last))


def _float_layer(layer: nn.Module, kind: type) -> tuple[nn.Module, bool] | None:
    """(layer, ReLU fused) of a ``kind`` layer (nn.Conv2d or nn.Linear) the conversion left in
    float32: the plain layer, or the layer + ReLU fused by FX (batch norm already folded into
    a conv); else None."""
    if type(layer) is kind:
        return layer, False
    if (isinstance(layer, nn.Sequential) and len(layer) == 2 and type(layer[0]) is kind
            and isinstance(layer[1], nn.ReLU)):
        return layer[0], True
    return None


def _pack_float_convs(graph: nn.Module, input_size: tuple[int, ...]) -> list[str]:
    """Each float conv of ``graph.features`` becomes a ``fuse.PackedConv2d`` laid out for the
    input size it meets (found by one pass of zeros through ``graph``); returns the names
    replaced."""
    from .fuse import PackedConv2d, packing_works

    features = graph.features
    convs = {name: fc for name, layer in features.named_children()
             if (fc := _float_layer(layer, nn.Conv2d)) is not None}
    if not convs or packing_works(torch.float32) is not None:
        return []
    sizes: dict[str, tuple[int, ...]] = {}

    def seen(name: str):
        def hook(_module, args) -> None:  # returning None leaves the input alone
            sizes[name] = tuple(args[0].shape)
        return hook

    hooks = [getattr(features, name).register_forward_pre_hook(seen(name)) for name in convs]
    with torch.no_grad():
        graph(torch.zeros(input_size).contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    for name, (conv, relu) in convs.items():
        setattr(features, name, PackedConv2d(conv, None, relu, torch.float32, sizes[name]))
    return list(convs)


def _pack_float_linears(classifier: nn.Module, batch: int) -> list[str]:
    """Each float nn.Linear of ``classifier`` becomes a ``fuse.PackedLinear``; returns the names
    replaced."""
    from .fuse import PackedLinear, linear_packing_works

    linears = {name: fl for name, layer in classifier.named_children()
               if (fl := _float_layer(layer, nn.Linear)) is not None}
    if linear_packing_works(torch.float32) is not None:
        return []
    for name, (linear, relu) in linears.items():
        setattr(classifier, name, PackedLinear(linear, torch.float32, batch, relu))
    return list(linears)
