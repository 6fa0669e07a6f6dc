"""Where and how a model runs: device, precision, memory format, compilation.

Training, evaluation, prediction and the benchmarks all take their settings from here, so
a default changed here (with the benchmark that justifies it) changes everywhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(name: str = "auto") -> torch.device:
    """"auto": the first CUDA GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is available; use 'cpu' or 'auto'")
    return dev


def cpu_has_native_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for plain float32
    channels_last: bool
    compile: bool = False

    @property
    def needs_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move to the device and memory format; compile if asked (returns the compiled module)."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return torch.compile(model) if self.compile else model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device (non-blocking from pinned memory) in the model's format."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def make_runtime(device: str = "auto", precision: str = "auto", channels_last: bool | None = None,
                 compile: bool = False) -> Runtime:
    """Resolve user choices into a Runtime. "auto" precision is bf16 autocast on GPUs with bf16;
    float32 on CPUs. fp16 (with a grad scaler) is GPU only."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    dev = pick_device(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and dev.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA GPU; on the CPU use 'bf16' or 'fp32'")
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if channels_last is None:
        channels_last = dev.type == "cuda"
    return Runtime(dev, amp, channels_last, compile)
