"""Winograd convolution F(m x m, 3 x 3) for VGG's 3x3 stride-1 layers (Lavin & Gray 2015).

Why: a direct 3x3 convolution does 9 multiply-adds per output per input channel. Winograd's
minimal filtering computes an m x m block of outputs from an (m+2) x (m+2) input tile with
(m+2)^2 products per channel pair instead of 9 m^2: 2.25x fewer for F(2x2, 3x3), 4x fewer for
F(4x4, 3x3). oneDNN has no Winograd for these CPUs (OpenVINO runs the same direct kernels as
``fuse.PackedConv2d``), so this is where vggnet can do less work than its peers.

How, per block of tiles (``tile_blocks``: whole images or rows of tiles, a few hundred tiles,
so the intermediates stay in cache), all in the compute dtype with plain torch ops:

1. input transform: the overlapping (m+2)^2 tiles of the zero-padded NHWC input are gathered
   (one copy, (a*a, T*C), a = m + 2) and multiplied by kron(B^T, B^T) (one matmul);
2. the a*a products: one batched matmul (a*a, T, C) @ (a*a, C, O) with the filters
   transformed once at construction (``filter_transform``, batch norm folded first);
3. output transform: kron(A^T, A^T) @ (a*a, T*O) (one matmul), the bias added to the one
   slot that every output sums with weight 1, then scattered to NHWC with ReLU fused.

Numerics: exact in real arithmetic; in floating point the transforms amplify rounding.
Measured against float64 on random data: float32 F(4x4) ~3e-6 relative (direct: ~1e-7);
bf16 F(2x2) ~5e-3 (direct bf16: ~2.4e-3), bf16 F(4x4) ~3e-2, which cost top-1 agreement on
the demo model (98.2%), so bf16 uses F(2x2) only. Which layers may use it and which m:
``RULES``; whether a layer does, for each input size, on this machine, now: ``PickedConv2d``.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .folding import fold_batch_norm

# (B^T, G, A^T) of F(m x m, 3 x 3), Lavin & Gray 2015 (interpolation points 0, +-1 and for
# m = 4 also +-2, then infinity)
MATRICES = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}
# column of A^T that is all ones (interpolation point 1): a bias added to that slot of the
# products reaches every output of the tile once
_ONES_COLUMN = 1


@dataclass(frozen=True)
class Rule:
    """Where Winograd replaces the direct convolution for one compute dtype: F(m x m, 3 x 3)
    for 3x3 stride-1 layers with at least ``min_in`` input and ``min_out`` output channels."""

    m: int
    min_in: int
    min_out: int

    def applies(self, conv: nn.Conv2d) -> bool:
        return (fits(conv) and conv.in_channels >= self.min_in
                and conv.out_channels >= self.min_out)


# the candidates (PickedConv2d times them against the direct form), measured per layer of
# VGG-16 against fuse.PackedConv2d, 1 thread, batch 1 and 8 (docs/benchmarks.md, "Past
# parity"): bf16 F(2x2) wins 1.05-1.6x from conv3_1 (128 -> 256) on and loses 0.4-1.0x on the
# 64- and 128-channel layers, where the transforms cost more than the products save; float32
# F(4x4) (AVX2 cap) wins 1.1-2.7x from conv2_1 (64 -> 128) on and loses on conv1_2 (0.86x).
RULES = {torch.bfloat16: Rule(m=2, min_in=128, min_out=256),
         torch.float32: Rule(m=4, min_in=64, min_out=128)}


def fits(conv: nn.Conv2d) -> bool:
    """A plain 3x3 convolution, stride 1, zero padding 1, no dilation or groups."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros")


def filter_transform(weight: torch.Tensor, m: int) -> torch.Tensor:
    """G w G^T of each 3x3 filter: (O, I, 3, 3) -> (a*a, I, O) float64, a = m + 2."""
    g = torch.tensor(MATRICES[m][1], dtype=torch.float64)
    u = torch.einsum("ak,oikl,bl->abio", g, weight.double(), g)
    return u.reshape(g.shape[0] ** 2, weight.shape[1], weight.shape[0])


def tile_blocks(n: int, th: int, tw: int, target: int) -> list[tuple[int, int, int, int]]:
    """(n0, n1, r0, r1): images n0..n1-1, tile rows r0..r1-1, about ``target`` tiles each
    (whole images when one image has fewer tiles, else rows of tiles of one image)."""
    if th * tw >= target:
        rows = max(1, target // tw)
        return [(i, i + 1, r, min(th, r + rows)) for i in range(n) for r in range(0, th, rows)]
    k = max(1, target // (th * tw))
    return [(i, min(n, i + k), 0, th) for i in range(0, n, k)]


class WinogradConv2d(nn.Module):
    """Conv2d 3x3 stride 1 padding 1 (+ folded batch norm) (+ ReLU) by Winograd F(m x m, 3x3).

    Same interface as ``fuse.PackedConv2d``: input in any float dtype is cast to ``dtype``,
    output is ``dtype`` in channels_last memory; the conv's ``weight`` and ``bias`` stay
    registered (the state_dict is unchanged) and changing them later changes nothing here.
    """

    TILES = 512  # tiles per block: measured 256-1024 within noise, 512 keeps V in L2/L3

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu: bool, dtype: torch.dtype,
                 m: int) -> None:
        super().__init__()
        if not fits(conv) or m not in MATRICES:
            raise ValueError(f"WinogradConv2d takes a 3x3 stride-1 padding-1 convolution and m "
                             f"in {sorted(MATRICES)}, got {conv} and m={m}")
        self.weight, self.bias = conv.weight, conv.bias
        weight, bias = fold_batch_norm(conv, bn)
        self.dtype, self.relu, self.folded, self.m = dtype, relu, bn is not None, m
        bt, _, at = (torch.tensor(t, dtype=torch.float64) for t in MATRICES[m])
        # plain attributes, not buffers (as in PackedConv2d): never moved or saved
        self._u = filter_transform(weight, m).to(dtype).contiguous()  # (a*a, I, O)
        self._bias = bias.to(dtype)
        self._kb = torch.kron(bt, bt).to(dtype)  # (a*a, a*a) input transform
        self._ka = torch.kron(at, at).to(dtype)  # (m*m, a*a) output transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, O, H, W)
        m, (n, c, h, w) = self.m, x.shape
        th, tw = -(-h // m), -(-w // m)
        # NHWC, zero-padded by 1 and up to whole tiles: (N, m*th + 2, m*tw + 2, C)
        xp = x.new_zeros((n, m * th + 2, m * tw + 2, c), dtype=self.dtype)
        xp[:, 1:h + 1, 1:w + 1] = x.permute(0, 2, 3, 1)
        out = xp.new_empty((n, th, m, tw, m, self._u.shape[-1]))
        for n0, n1, r0, r1 in tile_blocks(n, th, tw, self.TILES):
            self._block(xp[n0:n1, m * r0: m * r1 + 2], out[n0:n1, r0:r1])
        y = out.view(n, m * th, m * tw, -1)
        if (m * th, m * tw) != (h, w):
            y = y[:, :h, :w].contiguous()
        return y.permute(0, 3, 1, 2)

    def _block(self, xp: torch.Tensor, out: torch.Tensor) -> None:
        """Tiles of ``xp`` (n, m*th + 2, m*tw + 2, C) into ``out`` (n, th, m, tw, m, O)."""
        m, a = self.m, self.m + 2
        n, th, _, tw, _, o = out.shape
        c = xp.shape[-1]
        s = xp.stride()
        # tile (t, u)'s element (i, j) is xp[:, m*t + i, m*u + j]: (a, a, n, th, tw, C) view
        tiles = xp.as_strided((a, a, n, th, tw, c), (s[1], s[2], s[0], m * s[1], m * s[2], 1))
        v = torch.mm(self._kb, tiles.reshape(a * a, -1)).view(a * a, -1, c)  # (a*a, T, C)
        prod = torch.bmm(v, self._u)  # (a*a, T, O)
        prod[_ONES_COLUMN * a + _ONES_COLUMN] += self._bias
        y = torch.mm(self._ka, prod.view(a * a, -1)).view(m, m, n, th, tw, o)
        y = y.permute(2, 3, 0, 4, 1, 5)  # (n, th, m, tw, m, O)
        if self.relu:
            torch.clamp_min(y, 0, out=out)
        else:
            out.copy_(y)

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, {self.dtype}, F({self.m}x{self.m}, 3x3)"
                + (", batch norm folded" * self.folded) + (", ReLU fused" * self.relu))


class PickedConv2d(nn.Module):
    """One 3x3 layer in both forms, direct (``fuse.PackedConv2d``) and ``WinogradConv2d``; each
    call runs the form measured faster, here and now, for inputs of that size.

    Why measured, not ruled (docs/benchmarks.md, "Winograd picked by timing"): which form wins
    depends on the CPU, the batch and image size (per layer at 2 threads, bf16: 0.9-1.5x),
    and on load: Winograd is several small OpenMP regions per block of tiles, and when another
    process holds a core each waits for its descheduled partner (measured with one busy core:
    0.58x the direct convolution at batch 1, 0.75x at batch 8). So the first ``EXPLORE``
    calls for a size class (``size_class``) run the two forms in turns, timed, and the form
    with the lower median time is kept, leaving out each form's first ``SETUP`` calls (they
    pay oneDNN's kernel setup and fresh memory: measured 1.1-2.7x the steady time for the
    first two calls of a VGG-16 layer at batch 1, which picked the wrong form when counted).
    Every later call is timed; ``STRIKES`` calls in a row slower than ``SLOWER`` x that median
    (the machine got busy) and the size class is explored again. No call runs twice:
    exploring costs only the slower form's extra time.

    Same interface as its forms; the conv's ``weight`` and ``bias`` stay registered under the
    layer's name (the forms are plain attributes: the state_dict is unchanged).
    """

    EXPLORE, SETUP, STRIKES, SLOWER = 10, 2, 3, 2.0
    FORMS = ("direct", "winograd")
    clock = staticmethod(time.perf_counter)

    def __init__(self, direct: nn.Module, winograd: WinogradConv2d) -> None:
        super().__init__()
        self.weight, self.bias = winograd.weight, winograd.bias
        self._forms = {"direct": direct, "winograd": winograd}  # not submodules: see above
        # size class -> seconds of each call of each form while exploring
        self._trials: dict[int, dict[str, list[float]]] = {}
        # size class -> [form, its median seconds, slow calls in a row]
        self._picked: dict[int, list] = {}
        self.last = ""  # the form the last call ran (reports: which layers ran Winograd)

    @staticmethod
    def size_class(x: torch.Tensor) -> int:
        """Inputs within a factor 2^(1/4) of positions (N x H x W) share a choice: dense
        evaluation meets a new image size per image, and the choice follows the work."""
        n, _, h, w = x.shape
        return round(4 * math.log2(n * h * w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = self.size_class(x)
        picked = self._picked.get(key)
        if picked is None:
            trials = self._trials.setdefault(key, {f: [] for f in self.FORMS})
            self.last = min(self.FORMS, key=lambda f: len(trials[f]))  # in turns
        else:
            self.last = picked[0]
        start = self.clock()
        y = self._forms[self.last](x)
        seconds = self.clock() - start
        if picked is None:
            trials[self.last].append(seconds)
            if sum(map(len, trials.values())) >= self.EXPLORE:
                medians = {f: statistics.median(t[self.SETUP:])
                           for f, t in self._trials.pop(key).items()}
                best = min(medians, key=medians.get)
                self._picked[key] = [best, medians[best], 0]
        else:
            picked[2] = picked[2] + 1 if seconds > self.SLOWER * picked[1] else 0
            if picked[2] >= self.STRIKES:
                del self._picked[key]  # explore again from the next call
        return y

    def choices(self) -> dict[int, str]:
        """Size class -> the form picked for it ("direct" or "winograd")."""
        return {k: v[0] for k, v in self._picked.items()}

    def extra_repr(self) -> str:
        return f"{self._forms['winograd'].extra_repr()} or direct, picked by timing"


def ran_winograd(model: nn.Module) -> list[str]:
    """Names of ``model``'s convolutions whose last call ran Winograd."""
    return [name for name, m in model.named_modules()
            if isinstance(m, WinogradConv2d) or getattr(m, "last", "") == "winograd"]


@functools.cache
def winograd_works(dtype: torch.dtype, m: int) -> str | None:
    """None when ``WinogradConv2d`` runs in ``dtype`` here and matches F.conv2d (within what
    its precision explains); else why not."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    with torch.no_grad():  # the same probe every time, whatever the global RNG's state
        conv.weight.copy_(torch.randn(16, 8, 3, 3, generator=g) / 8)
        conv.bias.copy_(torch.randn(16, generator=g) / 8)
    x = torch.randn(2, 8, 9, 11, generator=g).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            got = WinogradConv2d(conv, None, True, dtype, m)(x).float()
            ref = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))
    except (RuntimeError, NotImplementedError) as e:
        return f"Winograd F({m}x{m}, 3x3) failed in {dtype}: {str(e).splitlines()[0][:120]}"
    err = ((got - ref).norm() / ref.norm()).item()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    if err <= tol:
        return None
    return f"Winograd F({m}x{m}, 3x3) differs from F.conv2d by {err:.2e} ({dtype})"
