"""int8 inference: post-training static quantization of a VGG for crop-sized inputs.

A choice to make, not a default: on this project's CPU (AVX512-VNNI) VGG-16 at batch 8 ran
about 2.4x faster in int8 than the default bf16 path, but int8 rounds activations to 256
levels per tensor, so predictions move more than bf16's do; `vggnet bench` measures both the
speed and the top-1 agreement with float32 on a trained model (docs/benchmarks.md).

    int8 = quantize_int8(model, calibration_batches)   # preprocessed (N, 3, crop, crop) floats
    logits = int8(x)                                    # float32 logits, CPU only

torch.ao's FX graph mode does the work: conv + batch norm + ReLU are fused, weights become
int8 per output channel, activations int8 per tensor with the ranges observed while the
calibration batches run through the float model (a few hundred training images are plenty).
torch 2.13 marks torch.ao.quantization deprecated (its successor, torchao, has no CPU int8
convolution path yet); its warnings are silenced here and the tests pin its behaviour.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
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


def quantize_int8(model: VGG, calibration: Iterable[torch.Tensor], backend: str = "x86") -> nn.Module:
    """An int8 copy of ``model`` (left unchanged) for crop-sized float input, CPU only.

    ``calibration``: preprocessed float batches like the ones the model will see (normalised
    crops, (N, 3, crop, crop)); their activation ranges set the int8 scales. ``backend``:
    torch's quantized engine, "x86" (oneDNN/fbgemm, VNNI) or "qnnpack" (ARM).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        return _quantize(model, calibration, backend)


def _quantize(model: VGG, calibration: Iterable[torch.Tensor], backend: str) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if backend not in torch.backends.quantized.supported_engines:
        raise ValueError(f"quantized engine {backend!r} is not in this torch build "
                         f"(available: {torch.backends.quantized.supported_engines})")
    if not isinstance(model, VGG):
        raise TypeError(f"quantize_int8 takes a vggnet VGG, got {type(model).__name__}")
    torch.backends.quantized.engine = backend
    crop = model.config.crop_size
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ValueError("quantize_int8 needs at least one calibration batch to set the int8 ranges")
    if first.dim() != 4 or tuple(first.shape[1:]) != (model.config.in_channels, crop, crop):
        raise ValueError(f"calibration batches must be (N, {model.config.in_channels}, {crop}, {crop}) "
                         f"crops, got {tuple(first.shape)}")
    plain = _Classifier(copy.deepcopy(model).float().cpu().eval()).eval()
    # our LRN builds its band from the input's channel count: run it as a float module
    custom = PrepareCustomConfig().set_non_traceable_module_classes([LocalResponseNorm])
    prepared = prepare_fx(plain, get_default_qconfig_mapping(backend), (first.float(),),
                          prepare_custom_config=custom)
    with torch.no_grad():
        for x in (first, *batches):
            prepared(x.float().cpu())
    return convert_fx(prepared).eval()
