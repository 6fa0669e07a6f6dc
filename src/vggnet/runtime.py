"""Where and how a model runs: device, precision, memory format, compilation.

Training, evaluation, prediction and the benchmarks all take their settings from here, so
a default changed here (with the benchmark that justifies it) changes everywhere.
The defaults and the measurements behind them are in docs/benchmarks.md:

- precision "auto": bf16 autocast on GPUs with bf16 and on CPUs with native bf16 instructions
  (AVX512-BF16 / AMX), float32 elsewhere. On CPUs that only emulate bf16 it would be slower.
- channels_last: on by default everywhere (oneDNN and cuDNN both run NHWC convs faster).
- inference (``prepare_inference``): weights stored in the compute dtype once instead of cast
  on every call by autocast; on the CPU convolutions on oneDNN weights laid out once, with
  batch norm folded and ReLU fused (``fuse.py``), and a 2x2 max-pool made of strided maxima,
  several times faster than PyTorch's CPU max_pool2d (which also computes indices).
- fused optimizer kernels (``optimizer_options``): one multi-tensor kernel instead of a
  Python loop over 32 parameters, several times faster on the CPU.
- torch.compile stays off by default: it costs seconds to minutes per input shape (dense
  evaluation sees a new shape per image size) and gains little over the above; ask for it
  with compile=True for long fixed-shape runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .settings import PRECISIONS


def pick_device(name: str = "auto") -> torch.device:
    """"auto": the first CUDA GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is available; use 'cpu' "
                         "or 'auto'")
    return dev


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below the first one with bf16 dot products
_ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                             "AVX512_CORE_VNNI")


def cpu_has_native_bf16() -> bool:
    """True when oneDNN computes bf16 with the CPU's own dot-product instructions (x86
    AVX512-BF16 or AMX-BF16), as opposed to emulating it or not at all.

    oneDNN also runs bf16 on plain AVX-512 by emulation (what torch's own
    ``_is_mkldnn_bf16_supported`` reports), but emulated bf16 convolutions are slower than
    float32, so only native support makes bf16 the default. The hardware flags are not enough:
    ``ONEDNN_MAX_CPU_ISA`` can cap oneDNN below them (how CI runs the AVX2 path on an
    AVX-512 machine), and then bf16 would be emulated or refused.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if not (caps.get("avx512_bf16") or caps.get("amx_bf16")):
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_CAPS_WITHOUT_BF16:
        return False
    try:  # respects the cap too (False under AVX2); a torch without the op keeps the flags' word
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for plain float32
    channels_last: bool
    compile: bool = False

    @property
    def needs_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def describe(self) -> str:
        """One line for logs and reports, e.g. "cpu bf16 channels_last"."""
        layout = "channels_last" if self.channels_last else "NCHW"
        parts = [str(self.device), self.precision, layout]
        return " ".join(parts + (["compiled"] if self.compile else []))

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def inference(self):
        """``with rt.inference(): model(x)``: no autograd bookkeeping, autocast on."""
        with torch.inference_mode(), self.autocast():
            yield

    def optimizer_options(self) -> dict:
        """Keyword arguments for torch.optim.SGD/Adam/AdamW: the fused kernels where torch has
        them for this device (the same update; on 2 CPU cores VGG-16's SGD step with momentum
        and weight decay goes from ~650 ms to ~100 ms)."""
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return {"fused": True} if self.device.type in _get_fused_kernels_supported_devices() else {}

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move to the device and memory format; compile if asked (returns the compiled module).

        For training and anything that keeps changing the weights; see ``prepare_inference``
        for a model that is only run.
        """
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return torch.compile(model) if self.compile else model

    def prepare_inference(self, model: nn.Module, keep_layer_outputs: bool = False,
                          batch: int = 8) -> nn.Module:
        """Make a model fast to run (not to train), in place; returns it (or its compiled form).

        Puts it in eval mode, moves it, stores linear weights in the autocast dtype (what
        autocast would compute with anyway, without casting 120M weights on every call),
        switches to channels_last, and on the CPU rewrites a VGG's convolutional part
        (``fuse.fuse_for_inference``): convolutions on oneDNN weights laid out once for
        ``batch`` crops or by Winograd where ``winograd.RULES`` picks it, batch norm folded and
        ReLU fused into them (unless ``keep_layer_outputs``: then every layer's output stays
        what ``VGG.extract`` documents), 2x2 max-pools as ``MaxPool2x2``, the classifier's
        linear layers on oneDNN weights laid out once (``fuse.pack_linears``); and asks malloc
        to keep freed memory for reuse (``fuse.keep_freed_memory``). What was done is in
        ``model.inference_notes``. Call it inside ``rt.autocast()`` / ``rt.inference()`` like
        any other model. Changes the model in place: pass ``copy.deepcopy(model)`` to keep the
        original for training.
        """
        model = model.eval().to(self.device)
        if self.amp_dtype is not None:
            for m in model.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.to(self.amp_dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        features, config = getattr(model, "features", None), getattr(model, "config", None)
        # compiled: inductor's freezing packs and fuses by itself (and would trace through
        # PackedConv2d's per-shape cache in Python)
        if (self.device.type == "cpu" and isinstance(features, nn.Sequential) and config
                and not self.compile):
            from .fuse import fuse_for_inference, keep_freed_memory, pack_linears

            size = (batch, config.in_channels, config.crop_size, config.crop_size)
            dtype = self.amp_dtype or torch.float32
            model.inference_notes = fuse_for_inference(features, dtype, size, keep_layer_outputs)
            if isinstance(getattr(model, "classifier", None), nn.Sequential):
                model.inference_notes += pack_linears(model.classifier, dtype, batch)
            model.inference_notes.append(keep_freed_memory())
        if not self.compile:
            return model
        # freezing lets inductor constant-fold the weights: prepacked oneDNN weights and
        # ReLU fused into each conv on the CPU. It only applies to graphs compiled without
        # autograd, so training compiles are unaffected.
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        return torch.compile(model)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device (non-blocking from pinned memory) in the model's format."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def pin_memory(self) -> bool:
        """Whether data loaders should pin host memory (only pays with a GPU to copy to)."""
        return self.device.type == "cuda"


def default_precision(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def make_runtime(device: str = "auto", precision: str = "auto", channels_last: bool | None = None,
                 compile: bool = False) -> Runtime:
    """Resolve user choices into a Runtime. "auto" precision is bf16 autocast on GPUs with
    bf16 and on CPUs with native bf16, float32 elsewhere. fp16 (with a grad scaler) is GPU
    only. channels_last defaults to on."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    dev = pick_device(device)
    if precision == "auto":
        precision = default_precision(dev)
    if precision == "fp16" and dev.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA GPU; on the CPU use 'bf16' or 'fp32'")
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if channels_last is None:
        channels_last = True
    return Runtime(dev, amp, channels_last, compile)


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec;
    getrusage's ru_maxrss would carry over the peak of the process that forked us."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what): the peak of this process's memory so far on ``device``: CUDA memory
    allocated by PyTorch on a GPU, the resident memory of the process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "GPU memory"
    return peak_rss_mib(), "resident memory"
