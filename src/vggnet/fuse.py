"""Inference-only rewrites of a VGG on the CPU: oneDNN convolutions on weights laid out once,
with eval-mode batch norm folded in and ReLU fused, Winograd convolutions where they time
faster (``winograd.py``), linear layers on weights laid out once, and a faster 2x2 max-pool.

Why (measured, docs/benchmarks.md): an eager ``nn.Conv2d`` hands oneDNN plain (O, I, kh, kw)
weights, which oneDNN reorders into its blocked layout on every call; a float32 VGG-16 forward
pass at batch 8 spent about a third of its time there. ``torch.ops.mkldnn`` has the ops that
torch.compile's freezing pass uses for the same purpose (reorder once, convolve with a fused
post-op), callable from eager code without compiling anything per input shape.

Those ops are private: a torch build may lack them and oneDNN refuses a dtype the CPU cannot
run (bf16 on an AVX2-only CPU). ``packing_works`` tries them once per dtype on a small
convolution and compares with ``F.conv2d``; where they fail or differ, ``fuse_for_inference``
leaves the layers as they are (the plain eager path) and says why in its returned notes;
``linear_packing_works`` does the same for ``PackedLinear``.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .folding import fold_batch_norm
from .winograd import RULES, PickedConv2d, WinogradConv2d, winograd_works


class MaxPool2x2(nn.Module):
    """nn.MaxPool2d(2, 2) (floor mode) as the maximum of strided views.

    Same values, bit for bit (a max of the same four numbers), and the output keeps the
    input's memory format. On the CPU it is several times faster than max_pool2d, which
    computes argmax indices even when nobody asks for them. Inference only: its gradient
    splits ties where max_pool2d picks one input.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H//2, W//2)
        n, c, h, w = x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and c > 1:
            # NHWC memory seen as (N, H/2, 2, W/2, 2, C): the first maximum reads runs of 2C
            # contiguous values (rows 2i and 2i+1), the second the two halves of each run;
            # 1.5-1.8x faster than four strided (stride 2C) views (bf16, VGG-16's pool1)
            y = x.permute(0, 2, 3, 1)[:, : h // 2 * 2, : w // 2 * 2]
            y = y.unflatten(1, (h // 2, 2)).unflatten(3, (w // 2, 2))
            rows = torch.maximum(y[:, :, 0], y[:, :, 1])  # (N, H/2, W/2, 2, C)
            return torch.maximum(rows[..., 0, :], rows[..., 1, :]).permute(0, 3, 1, 2)
        x = x[..., : h // 2 * 2, : w // 2 * 2]
        top = torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2])
        return torch.maximum(top, torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


def is_plain_2x2_pool(m: nn.Module) -> bool:
    return (isinstance(m, nn.MaxPool2d) and m.kernel_size in (2, (2, 2)) and m.stride in (2, (2, 2))
            and m.padding in (0, (0, 0)) and m.dilation in (1, (1, 1)) and not m.ceil_mode
            and not m.return_indices)


class PackedConv2d(nn.Module):
    """Conv2d (+ folded batch norm) (+ ReLU) as one oneDNN call on weights reordered once per
    input shape.

    oneDNN picks its kernel, and with it the weight layout, per input shape (N, C, H, W); a
    weight laid out for another shape is reordered again on every call (measured under the
    AVX2 cap: VGG-16's 512x512 convs laid out for batch 8 and run at batch 1 spent 87 ms a
    call reordering). So the layout is kept per shape, for the ``SHAPES`` most recently seen
    (dense evaluation meets a new size per image size; a miss costs one reorder, as before).
    Input in any float dtype is cast to ``dtype`` (what autocast would do); output is
    ``dtype``. The conv's own ``weight`` and ``bias`` stay registered, so the model's
    state_dict keeps its keys and values; changing them later does not change the packing.
    """

    SHAPES = 4

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu: bool, dtype: torch.dtype,
                 input_size: tuple[int, int, int, int]) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"PackedConv2d takes explicit zero padding, got {conv.padding!r}")
        self.weight, self.bias = conv.weight, conv.bias
        weight, bias = fold_batch_norm(conv, bn)
        self.dtype, self.relu, self.folded = dtype, relu, bn is not None
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        # plain attributes, not buffers: .to(), channels_last or a state_dict must never touch
        # the packed weights, whose (O, I, kh, kw) shape hides oneDNN's blocked layout
        self._weight, self._bias = weight.to(dtype).contiguous(), bias.to(dtype)
        self._packed: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.packed_for(tuple(input_size))

    def packed_for(self, size: tuple[int, ...]) -> torch.Tensor:
        """The weights laid out for input ``size`` (N, C, H, W), made on first use."""
        if size in self._packed:
            self._packed.move_to_end(size)
            return self._packed[size]
        self._packed[size] = torch.ops.mkldnn._reorder_convolution_weight(
            self._weight, self.padding, self.stride, self.dilation, self.groups, list(size))
        if len(self._packed) > self.SHAPES:
            self._packed.popitem(last=False)
        return self._packed[size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(self.dtype), self.packed_for(tuple(x.shape)), self._bias, self.padding,
            self.stride, self.dilation, self.groups, "relu" if self.relu else "none", [], "")

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, {self.dtype}" + (", batch norm folded" * self.folded)
                + (", ReLU fused" * self.relu))


class Folded(nn.Module):
    """The slot of a layer fused into the conv before it: passes its input through, and keeps
    the layer's parameters and buffers under their names, so the state_dict is unchanged."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.what = type(layer).__name__
        for name, p in layer.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in layer.named_buffers(recurse=False):
            self.register_buffer(name, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.what} fused into the conv before it"


@functools.cache
def packing_works(dtype: torch.dtype) -> str | None:
    """None when packed convolutions run in ``dtype`` here and match F.conv2d; else why not."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 12, 10, generator=g).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            got = PackedConv2d(conv, None, True, dtype, (2, 16, 12, 10))(x).float()
            ref = F.relu(F.conv2d(x.to(dtype), conv.weight.to(dtype), conv.bias.to(dtype),
                                  padding=1))
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        return f"torch.ops.mkldnn convolution refused {dtype}: {str(e).splitlines()[0][:120]}"
    err = ((got - ref.float()).norm() / ref.float().norm()).item()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    if err <= tol:
        return None
    return f"packed convolution differs from F.conv2d by {err:.2e} ({dtype})"


def fuse_for_inference(features: nn.Sequential, dtype: torch.dtype, input_size: tuple[int, ...],
                       keep_layer_outputs: bool = False) -> list[str]:
    """Rewrite a VGG's ``features`` in place for CPU inference; returns notes on what was done.

    Each conv becomes its ``conv_for`` form: a ``PackedConv2d`` (laid out for ``input_size``,
    the first layer's (N, C, H, W)) or, where ``winograd.RULES`` allows, the faster of it and
    a ``winograd.WinogradConv2d`` by timing (``winograd.PickedConv2d``); unless
    ``keep_layer_outputs``, the batch norm and ReLU after it are folded and fused into it and
    their slots become ``Folded`` (so the convX_Y and bnX_Y outputs that ``VGG.extract``
    returns would be post-ReLU: pass True to keep every layer's output). Plain 2x2 max-pools
    become ``MaxPool2x2`` in every case.
    """
    notes = []
    for name, child in list(features.named_children()):
        if is_plain_2x2_pool(child):
            setattr(features, name, MaxPool2x2())
    why = packing_works(dtype)
    if why:
        return notes + [f"convolutions left unpacked ({why})"]
    n, _, h, w = input_size
    layers = list(features.named_children())
    winograd = []
    for i, (name, m) in enumerate(layers):
        if isinstance(m, MaxPool2x2):
            h, w = h // 2, w // 2
        if not isinstance(m, nn.Conv2d):
            continue
        nxt = [mod for _, mod in layers[i + 1: i + 3]]
        fold = nxt and isinstance(nxt[0], nn.BatchNorm2d) and not keep_layer_outputs
        bn = nxt[0] if fold else None
        after = nxt[1 if bn is not None else 0] if len(nxt) > (bn is not None) else None
        relu = isinstance(after, nn.ReLU) and not keep_layer_outputs
        fast = conv_for(m, bn, relu, dtype, (n, m.in_channels, h, w))
        winograd += [name] if not isinstance(fast, PackedConv2d) else []
        setattr(features, name, fast)
        for j in range(i + 1, i + 1 + (bn is not None) + relu):
            setattr(features, layers[j][0], Folded(layers[j][1]))
    fused = "" if keep_layer_outputs else " with batch norm folded and ReLU fused"
    notes.append(f"convolutions on oneDNN weights laid out once{fused}")
    if winograd:
        how = ("always (VGGNET_WINOGRAD=1)" if winograd_mode() == "1" else
               "where it times faster than the direct convolution (winograd.PickedConv2d)")
        notes.append(f"Winograd F({RULES[dtype].m}x{RULES[dtype].m}, 3x3) for "
                     f"{', '.join(winograd)} (winograd.RULES), {how}")
    return notes


def conv_for(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu: bool, dtype: torch.dtype,
             input_size: tuple[int, int, int, int]) -> nn.Module:
    """The inference form of ``conv``: ``PackedConv2d``, or where ``winograd.RULES`` makes it a
    Winograd candidate for ``dtype`` and Winograd runs correctly here (``winograd_works``),
    the faster of both by timing (``PickedConv2d``), or Winograd alone when
    ``VGGNET_WINOGRAD=1``."""
    rule, mode = RULES.get(dtype), winograd_mode()
    if (mode == "0" or rule is None or not rule.applies(conv)
            or winograd_works(dtype, rule.m) is not None):
        return PackedConv2d(conv, bn, relu, dtype, input_size)
    fast = WinogradConv2d(conv, bn, relu, dtype, rule.m)
    if mode == "1":
        return fast
    return PickedConv2d(PackedConv2d(conv, bn, relu, dtype, input_size), fast)


def winograd_mode() -> str:
    """``VGGNET_WINOGRAD``: unset or "auto" (picked per layer and input size by timing,
    ``winograd.PickedConv2d``), "1" (always, where ``winograd.RULES`` allows) or "0" (never)."""
    mode = os.environ.get("VGGNET_WINOGRAD", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"VGGNET_WINOGRAD must be auto, 0 or 1, got {mode!r}")
    return mode


class PackedLinear(nn.Linear):
    """nn.Linear on oneDNN weights laid out once (``torch.ops.mkldnn._reorder_linear_weight``).

    Why: ``F.linear`` hands oneDNN (bf16) or MKL (float32) the plain weights on every call;
    fc6 of VGG-16 (103M weights) at batch 1 took 20-30 ms in bf16 that way and 10-11 ms packed
    (1 thread), float32 at batch 8 81 -> 33 ms. Still an nn.Linear to everything that looks
    (its ``weight`` and ``bias`` stay registered: the state_dict is unchanged; changing them
    later changes nothing here). Input of any float dtype is cast to ``dtype``; ``relu``: a
    ReLU after it, fused. The price: the packed copy of the weights (fc6: 205 MB in bf16) next
    to the module's own.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, batch: int,
                 relu: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.dtype, self.relu = dtype, relu
        # plain attributes, not buffers (as in PackedConv2d): never moved or saved
        self._packed = torch.ops.mkldnn._reorder_linear_weight(
            linear.weight.detach().to(dtype).contiguous(), batch)
        self._bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self._packed, self._bias,
                                                  "relu" if self.relu else "none", [], "")

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, {self.dtype}, oneDNN weights"
                + ", ReLU fused" * self.relu)


@functools.cache
def linear_packing_works(dtype: torch.dtype) -> str | None:
    """None when ``PackedLinear`` runs in ``dtype`` here and matches F.linear; else why not."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(48, 24)
    x = torch.randn(3, 48, generator=g)
    try:
        with torch.no_grad():
            got = PackedLinear(linear, dtype, 3, relu=True)(x).float()
            ref = F.relu(F.linear(x.to(dtype), linear.weight.to(dtype),
                                  linear.bias.to(dtype))).float()
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        return f"torch.ops.mkldnn linear refused {dtype}: {str(e).splitlines()[0][:120]}"
    err = ((got - ref).norm() / ref.norm()).item()
    if err <= (1e-2 if dtype == torch.bfloat16 else 1e-5):
        return None
    return f"packed linear differs from F.linear by {err:.2e} ({dtype})"


def pack_linears(classifier: nn.Sequential, dtype: torch.dtype, batch: int) -> list[str]:
    """Each nn.Linear of ``classifier`` becomes a ``PackedLinear`` (in place); returns notes."""
    why = linear_packing_works(dtype)
    if why:
        return [f"linear layers left unpacked ({why})"]
    for name, m in list(classifier.named_children()):
        if type(m) is nn.Linear:
            setattr(classifier, name, PackedLinear(m, dtype, batch))
    return ["linear layers on oneDNN weights laid out once"]


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> str:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    Why: every forward pass allocates its activations anew (VGG-16's conv1_2 output at batch 8
    is 51 MB), and glibc serves blocks over 32 MB with fresh mmap pages that the kernel must
    fault in and zero on first touch, then unmaps them on free. With VGG-16 in bf16 at batch 8
    that cost conv1_1, conv1_2, pool1 and conv2_2 a third of their time (329 -> 266 ms a
    batch, measured layer by layer; OpenVINO and ONNX Runtime reuse their own buffers). The
    price: the process keeps its peak heap instead of shrinking after it. Process-wide, once;
    ``VGGNET_KEEP_FREED_MEMORY=0`` leaves malloc alone. Returns a note on what was done.
    """
    import ctypes
    import os
    import platform

    if os.environ.get("VGGNET_KEEP_FREED_MEMORY", "1") == "0":
        return "malloc left as it is (VGGNET_KEEP_FREED_MEMORY=0)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "malloc left as it is (not glibc)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
    except (OSError, AttributeError) as e:
        return f"malloc left as it is ({e})"
    return ("malloc keeps freed memory for reuse (no fresh pages per pass)" if ok
            else "malloc left as it is (mallopt refused)")
