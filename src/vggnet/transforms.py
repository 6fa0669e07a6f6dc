"""The paper's input pipeline (Section 3.1), split where it runs fastest.

In data-loader workers, per image, uint8 out (``TrainTransform``, ``EvalTransform``):
    isotropic rescale so the shorter side is S (fixed, or drawn per image from [Smin, Smax]),
    random crop, random horizontal flip. The rescale and the crop are one resampling of the
    crop's source region (``crop_resized``, torch's vectorised uint8 antialiased bilinear),
    the same samples as rescaling the whole image and cropping it, and JPEGs are decoded at
    reduced size when that still only shrinks them.
On the device, per batch (``device_batch``):
    AlexNet's PCA colour shift, then the mean-RGB subtraction of ``preprocess.paper``.
The statistics both need (mean RGB, PCA of the RGB covariance) come from the training set
(``compute_stats``) and are stored with the run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .boxes import Window
from .image import BadImageError, Decoded, load_rgb_reduced, shorter_side_size
from .preprocess import Preprocessing

PCA_STD = 0.1  # AlexNet: alpha ~ N(0, 0.1) per principal component, per image


def _window(length: int, span: float, rescaled: int, start: int,
            size: int) -> tuple[int, int, int, float]:
    """One axis of ``crop_resized``: the source pixels [a, b) to resample (of ``length``), the
    output offset k of the window in their resampling, and the scale (source pixels per output
    pixel: ``span``, the image's extent in source pixels, over ``rescaled`` output pixels)."""
    scale = span / rescaled
    # the resampled grid starts at source pixel a; output k is the window's first pixel, far
    # enough in that its filter support (max(scale, 1) source pixels) is inside [a, b)
    k = max(1, math.ceil(max(scale, 1.0) / scale - 0.5))
    if start <= k:  # near the edge (or enlarging a lot): resample from the edge, exactly
        a, k = 0, start
    else:
        a = math.floor((start - k) * scale)
    b = min(length, math.ceil(a + (k + size - 0.5) * scale + max(scale, 1.0)) + 1)
    return a, b, k, scale


def chw(a: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array (read-only from PIL) -> (1, 3, H, W) uint8 tensor (a copy)."""
    return torch.tensor(a).permute(2, 0, 1)[None]


def crop_resized(decoded: Decoded, shorter: int, box: tuple[int, int, int, int],
                 flip: bool = False) -> np.ndarray:
    """(y1 - y0, x1 - x0, 3) uint8: window ``box`` = (x0, y0, x1, y1) of the image rescaled
    so that its shorter side is ``shorter``.

    The rescale is bilinear with antialiasing (the triangle filter widened by the scale when
    shrinking: Pillow's BILINEAR and torch's ``antialias=True``), computed by torch's
    vectorised uint8 kernel, about 3x faster than Pillow's. Only the window is computed:
    the source region under it plus the filter's support is resampled at the full image's
    scale, so every output sample has the full rescale's filter and spacing. The resampled
    grid starts on a source pixel, so a window that does not start at the image's edge
    starts up to one source pixel before (x0, y0), i.e. less than one output pixel when
    shrinking: a random crop lands on a sub-pixel position, a centre crop is off centre by at
    most that much, and the whole image (x0 = y0 = 0) is the full rescale exactly.
    ``flip`` mirrors the window left-right (the training flip; in torch it costs a tenth of
    a numpy copy of a negatively strided view).
    """
    img, r = decoded.image, decoded.reduction
    w, h = decoded.full_size
    rw, rh = shorter_side_size((w, h), shorter)
    x0, y0, x1, y1 = box
    # a JPEG decoded at 1/r: decoded pixel x covers full-resolution pixels [x*r, (x+1)*r), so
    # the image spans w / r decoded pixels (its last one may be partly padding: 375 -> 188)
    ax, bx, kx, sx = _window(img.shape[1], w / r, rw, x0, x1 - x0)
    ay, by, ky, sy = _window(img.shape[0], h / r, rh, y0, y1 - y0)
    src = torch.from_numpy(img[ay:by, ax:bx]).permute(2, 0, 1)[None]
    # (1, 3, h, w) channels_last uint8 -> (1, 3, ky + ch, kx + cw); the explicit scales keep
    # the full image's sample spacing (output i at source a + (i + 0.5) * scale). Written into
    # a channels_last buffer: the kernel works in that layout, and returns planar NCHW
    # otherwise (0.18 instead of 0.11 ms here, and a slow strided gather when batching)
    out = resample_aa(src, (ky + y1 - y0, kx + x1 - x0), sy, sx)[0, :, ky:, kx:]
    return (out.flip(2) if flip else out).permute(1, 2, 0).numpy()


# torch's uint8 antialiased bilinear kernel with an out= buffer: a private aten op (the public
# F.interpolate calls the same kernel but returns planar NCHW here); guarded, with that fallback
_AA_OUT = getattr(getattr(torch.ops.aten, "_upsample_bilinear2d_aa", None), "out", None)


def resample_aa(src: torch.Tensor, size: tuple[int, int], sy: float, sx: float,
                fast: bool = True) -> torch.Tensor:
    """(1, 3, h, w) uint8 channels_last -> (1, 3, *size): antialiased bilinear resampling with
    output pixel i centred on source coordinate (i + 0.5) * scale (sy, sx source pixels per
    output pixel), whatever the output size. ``fast=False`` takes the public path (the same
    values, bit for bit; tested), which is also the fallback where the private op is missing
    or refuses."""
    if fast and _AA_OUT is not None:
        out = torch.empty(1, 3, *size, dtype=torch.uint8, memory_format=torch.channels_last)
        try:
            _AA_OUT(src, list(size), False, 1 / sy, 1 / sx, out=out)
            return out
        except (RuntimeError, NotImplementedError):
            pass
    # F.interpolate's output size is floor(in / scale); where that falls short of ``size``
    # (the window's far edge, by rounding), edge pixels are repeated to make room
    short = (max(0, math.ceil(size[0] * sy) - src.shape[2]),
             max(0, math.ceil(size[1] * sx) - src.shape[3]))
    if any(short):
        src = torch.nn.functional.pad(src.float(), (0, short[1], 0, short[0]),
                                      mode="replicate").to(torch.uint8)
    out = torch.nn.functional.interpolate(src, scale_factor=(1 / sy, 1 / sx), mode="bilinear",
                                          antialias=True, align_corners=False,
                                          recompute_scale_factor=False)
    return out[:, :, : size[0], : size[1]]


@dataclass(frozen=True)
class TrainTransform:
    """One training sample as in the paper: rescale to S, random crop, random flip.

    ``scale`` = (Smin, Smax): S is drawn per image, uniformly from the integers in that range
    (Smin == Smax is the fixed-S training of the paper). Returns the (crop, crop, 3) uint8 crop
    and the (3,) PCA colour-shift coefficients alpha for the device (``device_batch``).
    """

    scale: tuple[int, int] = (256, 256)
    crop_size: int = 224
    flip: bool = True
    pca_std: float = PCA_STD

    def __post_init__(self) -> None:
        smin, smax = self.scale
        if not self.crop_size <= smin <= smax:
            raise ValueError(f"training scale {list(self.scale)} must satisfy crop_size "
                             f"({self.crop_size}) <= Smin <= Smax; e.g. [256, 512] for crop 224")

    def draw(self, rng: np.random.Generator) -> dict:
        """All random choices for one sample, drawn in a fixed order whatever the image."""
        s = int(rng.integers(self.scale[0], self.scale[1] + 1))
        u, v = rng.random(2)
        flip = bool(rng.random() < 0.5) and self.flip
        alpha = rng.normal(0.0, self.pca_std, 3).astype(np.float32)
        return {"s": s, "u": float(u), "v": float(v), "flip": flip, "alpha": alpha}

    def window(self, full_size: tuple[int, int], choice: dict) -> Window:
        """Where ``choice`` takes the crop of an image of ``full_size`` (w, h) from; its boxes
        follow the crop with ``Window.from_image``."""
        s, c = choice["s"], self.crop_size
        rw, rh = shorter_side_size(full_size, s)
        x0 = min(int(choice["u"] * (rw - c + 1)), rw - c)
        y0 = min(int(choice["v"] * (rh - c + 1)), rh - c)
        return Window(tuple(full_size), (rw, rh), (x0, y0, x0 + c, y0 + c), choice["flip"])

    def view(self, path: str | os.PathLike, choice: dict) -> tuple[np.ndarray, Window]:
        """The crop of ``choice`` and its window in the image."""
        decoded = load_rgb_reduced(path, choice["s"])
        win = self.window(decoded.full_size, choice)
        return crop_resized(decoded, choice["s"], win.box, win.flip), win

    def apply(self, path: str | os.PathLike, choice: dict) -> np.ndarray:
        return self.view(path, choice)[0]

    def __call__(self, path: str | os.PathLike,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        choice = self.draw(rng)
        return self.apply(path, choice), choice["alpha"]


@dataclass(frozen=True)
class EvalTransform:
    """Test-time image: rescaled so the shorter side is Q, then the central ``crop_size``
    square, or (``crop_size=None``) the whole rescaled image for dense evaluation.
    Returns (H, W, 3) uint8."""

    size: int = 256
    crop_size: int | None = 224

    def __post_init__(self) -> None:
        if self.crop_size is not None and self.crop_size > self.size:
            raise ValueError(f"test scale Q={self.size} is smaller than the crop {self.crop_size}; "
                             "use Q >= crop size")

    def window(self, full_size: tuple[int, int]) -> Window:
        """The central crop (or the whole rescaled image) of an image of ``full_size`` (w, h)."""
        rw, rh = shorter_side_size(full_size, self.size)
        if self.crop_size is None:
            box = (0, 0, rw, rh)
        else:
            c = self.crop_size
            x0, y0 = int(round((rw - c) / 2)), int(round((rh - c) / 2))
            box = (x0, y0, x0 + c, y0 + c)
        return Window(tuple(full_size), (rw, rh), box)

    def view(self, path: str | os.PathLike) -> tuple[np.ndarray, Window]:
        """The test image and its window in the stored image."""
        decoded = load_rgb_reduced(path, self.size)
        win = self.window(decoded.full_size)
        return crop_resized(decoded, self.size, win.box), win

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        return self.view(path)[0]


# --- dataset statistics -----------------------------------------------------------------------
@dataclass(frozen=True)
class ColorStats:
    """Pixel statistics of a training set, stored in every checkpoint under "stats".

    mean_rgb: mean R, G, B in 0-255 (subtracted from every pixel, Section 3.1).
    eigval, eigvec: eigen-decomposition of the 3x3 covariance of RGB values scaled to [0, 1]
        (AlexNet's convention, also fb.resnet.torch's), largest first; eigvec[:, i] is the
        i-th eigenvector (columns).
    """

    mean_rgb: tuple[float, float, float]
    eigval: tuple[float, float, float]
    eigvec: tuple[tuple[float, float, float], ...]
    images: int = 0  # how many training images they were computed from

    def __post_init__(self) -> None:
        # plain Python numbers: checkpoints are read with weights_only=True, which refuses numpy
        object.__setattr__(self, "mean_rgb", tuple(float(v) for v in self.mean_rgb))
        object.__setattr__(self, "eigval", tuple(float(v) for v in self.eigval))
        object.__setattr__(self, "eigvec", tuple(tuple(float(v) for v in r) for r in self.eigvec))
        object.__setattr__(self, "images", int(self.images))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eigvec"] = [list(r) for r in self.eigvec]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ColorStats:
        try:
            mean, val, vec = d["mean_rgb"], d["eigval"], d["eigvec"]
        except KeyError as e:
            raise ValueError(f"colour statistics need mean_rgb, eigval and eigvec; missing "
                             f"{e}") from None
        if len(mean) != 3 or len(val) != 3 or np.asarray(vec).shape != (3, 3):
            raise ValueError(f"colour statistics need 3 means, 3 eigenvalues and a 3x3 eigenvector "
                             f"matrix, got {mean!r}, {val!r}, {vec!r}")
        return cls(mean, val, vec, d.get("images", 0))


def _image_moments(path: str, shorter: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-image mean (3,) and second moment E[x x^T] (3, 3) of RGB in [0, 1], or None if bad."""
    try:
        decoded = load_rgb_reduced(path, shorter)
    except BadImageError:
        return None
    w, h = shorter_side_size(decoded.full_size, shorter)
    x = crop_resized(decoded, shorter, (0, 0, w, h)).astype(np.float64).reshape(-1, 3) / 255.0
    return x.mean(0), x.T @ x / len(x)


def compute_stats(paths: Sequence[str], shorter: int = 256, max_images: int = 10_000,
                  workers: int | None = None,
                  progress: Callable[[int], None] | None = None) -> ColorStats:
    """Mean RGB and the PCA of RGB colours over the training images.

    Every image counts equally (as it does in training, one crop per image per epoch), seen
    at the training scale (shorter side ``shorter``). At most ``max_images`` evenly spaced
    images are read: the mean of 10,000 ImageNet images is within a fraction of a grey level
    of the full set's. Unreadable files are left out (the dataset scan reports them).
    ``progress(n)`` is called as images are done.
    """
    if not paths:
        raise ValueError("cannot compute colour statistics from an empty training set")
    step = max(1, len(paths) / max_images) if max_images else 1
    picked = [paths[int(i * step)] for i in range(min(len(paths), max_images or len(paths)))]
    # Pillow and torch release the GIL while decoding and resizing: threads scale on every core
    with ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool:
        moments = []
        for m in pool.map(lambda p: _image_moments(p, shorter), picked):
            if progress:
                progress(1)
            if m is not None:
                moments.append(m)
    if not moments:
        raise ValueError(f"none of the {len(picked)} training images read for the colour "
                         "statistics could be decoded; run `vggnet data check` on the dataset")
    mean = np.mean([m for m, _ in moments], axis=0)
    cov = np.mean([s for _, s in moments], axis=0) - np.outer(mean, mean)
    val, vec = np.linalg.eigh(cov)  # ascending
    order = np.argsort(val)[::-1]
    val, vec = np.clip(val[order], 0.0, None), vec[:, order]
    return ColorStats(tuple(mean * 255.0), tuple(val), tuple(tuple(r) for r in vec), len(moments))


# --- on the device -----------------------------------------------------------------------------
def color_shift(alpha: torch.Tensor, stats: ColorStats) -> torch.Tensor:
    """AlexNet's PCA lighting noise: (N, 3) alphas -> (N, 3) RGB offsets in 0-255 units,
    [p1 p2 p3] [a1*l1, a2*l2, a3*l3]^T with l and p from ``stats`` ([0, 1] units, hence * 255)."""
    vec = torch.tensor(stats.eigvec, dtype=torch.float32, device=alpha.device)
    val = torch.tensor(stats.eigval, dtype=torch.float32, device=alpha.device)
    return 255.0 * (alpha.float() * val) @ vec.T


def device_batch(images: torch.Tensor, prep: Preprocessing, dtype: torch.dtype = torch.float32,
                 alpha: torch.Tensor | None = None,
                 stats: ColorStats | None = None) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) on the device -> model input: the colour shift (training, when
    ``alpha`` (N, 3) is given) added to the pixels, then ``prep`` (mean-RGB subtraction)."""
    if alpha is None:
        return prep.normalize(images, dtype)
    if stats is None:
        raise ValueError("a colour shift needs the dataset's ColorStats (eigval, eigvec)")
    shifted = images.float() + color_shift(alpha, stats).view(-1, 3, 1, 1)
    return prep.normalize(shifted, dtype)  # normalize is affine: it applies to shifted pixels
