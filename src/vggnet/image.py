"""Decoding images inside a guard: every file either becomes an 8-bit RGB image or a
``BadImageError`` that says which file and why. Never a crash, never a silent change.

The common case, a baseline or progressive JPEG in YCbCr or grayscale without EXIF, is
decoded by libjpeg-turbo through simplejpeg straight into a numpy array, skipping Pillow's
``Image.open`` header parsing, EXIF lookup and copy out of its buffer: in one run, 889
against 695 S=256 training crops per second of 500x375 photos, one worker. Every
other file, and any file simplejpeg does not decode cleanly, goes through Pillow, which
converts the exotic modes, applies EXIF orientation and words the errors.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

try:
    import simplejpeg
except ImportError:  # optional: Pillow decodes everything without it, somewhat slower
    simplejpeg = None

# Decompression-bomb guard: refuse images above this many pixels (about 16k x 16k), whatever
# the format. Pillow's own check (in Image.open, 89.5 M pixels by default: PNG, TIFF, ... were
# refused from there while JPEG went to 256 M) is set to the same limit; it only warns below
# 2x its limit, and here the warning is an error too.
MAX_PIXELS = 256_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ORIENTATION = 0x0112  # the EXIF tag


class BadImageError(ValueError):
    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")


def load_rgb(path: str | os.PathLike, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open any image Pillow reads as 8-bit RGB, upright (EXIF orientation applied).

    ``draft`` (w, h): let the JPEG decoder downscale by 1/2, 1/4 or 1/8 while decoding, never
    below that size (much faster for big photos; the result is then resized exactly anyway).
    Grayscale, palette, CMYK, RGBA (alpha dropped) and 16-bit images are converted.
    """
    return Image.fromarray(_decode(path, lambda w, h: draft).image)


class Decoded(NamedTuple):
    image: np.ndarray  # (h, w, 3) uint8 RGB, upright, writable
    full_size: tuple[int, int]  # upright (w, h) of the image at full resolution
    reduction: int  # 1, 2, 4 or 8: full-resolution pixels per decoded pixel (JPEG draft)


def load_rgb_reduced(path: str | os.PathLike, shorter: int) -> Decoded:
    """``load_rgb`` for an image about to be rescaled so that its shorter side is ``shorter``.

    A JPEG is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT-domain scaling) only while
    its shorter side stays >= ``shorter``, so the rescale that follows still shrinks it (and
    still low-passes it). Callers compute boxes in full-resolution coordinates and divide them
    by ``reduction``: decoded pixel x covers full-resolution pixels [x*r, (x+1)*r).
    """
    def target(w: int, h: int) -> tuple[int, int] | None:
        r = shorter / min(w, h)
        return (math.ceil(w * r), math.ceil(h * r)) if r <= 0.5 else None

    return _decode(path, target)


def _draft_reduction(full: tuple[int, int], size: tuple[int, int] | None) -> int:
    """The JPEG DCT scaling Pillow's ``draft`` picks for a requested size: the largest of
    8, 4, 2, 1 that keeps both sides at least that size."""
    if size is None:
        return 1
    fit = min(full[0] // max(1, size[0]), full[1] // max(1, size[1]))
    return next(r for r in (8, 4, 2, 1) if fit >= r)


def _may_have_exif(jpeg: bytes) -> bool:
    """Whether a JPEG's header segments (walked from SOI to the start of scan) include an EXIF
    APP1 segment; True too when they cannot be walked (Pillow's path then decides)."""
    i = 2
    while i + 4 <= len(jpeg) and jpeg[i] == 0xFF:
        marker = jpeg[i + 1]
        if marker == 0xDA:  # start of scan: the headers are over
            return False
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xE1 and jpeg[i + 4:i + 10] == b"Exif\x00\x00":
            return True
        i += 2 + int.from_bytes(jpeg[i + 2:i + 4], "big")
    return True


def _decode_jpeg_fast(path: Path, draft_for) -> Decoded | None:
    """simplejpeg for a JPEG in YCbCr or grayscale without an EXIF block (which may hold an
    orientation), within the pixel limit; None for anything else or any decoding trouble, so
    that Pillow's path decodes it or reports why it cannot."""
    if simplejpeg is None:
        return None
    with open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\xff\xd8\xff" or _may_have_exif(data):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray") or w * h > MAX_PIXELS:
            return None
        r = _draft_reduction((w, h), draft_for(w, h))
        # factor exactly r: at least r, and no smaller than the 1/r size (libjpeg rounds up)
        rh, rw = -(-h // r), -(-w // r)
        image = simplejpeg.decode_jpeg(data, "RGB", min_factor=r, min_height=rh, min_width=rw)
    except ValueError:  # corrupt, truncated (strict), unsupported: Pillow says what is wrong
        return None
    return Decoded(image, (w, h), r) if image.shape == (rh, rw, 3) else None


def _decode(path: str | os.PathLike, draft_for) -> Decoded:
    """The one guarded decoder. ``draft_for(w, h)`` -> JPEG draft size or None."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        fast = _decode_jpeg_fast(path, draft_for)
        if fast is not None:
            return fast
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                full = im.size
                if im.width * im.height > MAX_PIXELS:  # Image.MAX_IMAGE_PIXELS may be changed
                    raise BadImageError(path, f"{im.width}x{im.height} pixels: {_over_limit()}")
                size, reduction = draft_for(*full), 1
                if size is not None and im.format == "JPEG":
                    im.draft("RGB", size)
                    reduction = im.decoderconfig[0] if im.decoderconfig else 1
                im.load()
                orientation = im.getexif().get(ORIENTATION, 1)
                if orientation != 1:
                    if orientation in (5, 6, 7, 8):  # transposes swap width and height
                        full = full[::-1]
                    ImageOps.exif_transpose(im, in_place=True)
                return Decoded(np.array(_to_rgb8(im)), full, reduction)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(path, f"{_over_limit()} ({e})") from e
    except Image.UnidentifiedImageError:
        raise BadImageError(path, "not an image Pillow can identify") from None
    except Exception as e:  # truncated, corrupt, broken EXIF, unreadable: every decoder failure
        raise BadImageError(path, f"cannot decode: {type(e).__name__}: {e}") from e


def _over_limit() -> str:
    return (f"decompression bomb refused: more than the limit of {MAX_PIXELS:,} pixels "
            "(vggnet.image.MAX_PIXELS, the same for every format)")


def _to_rgb8(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit/32-bit grayscale: Pillow's convert would clip at 255; scale to the range.
        # Floats in [0, 1] (float TIFFs) are intensities with white = 1.
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        top = (65535.0 if im.mode.startswith("I;16") or a.max() > 255
               else 1.0 if im.mode == "F" and a.max() <= 1.0 else 255.0)
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode in ("P", "PA") and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def shorter_side_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(w, h) after an isotropic rescale that makes the smaller side ``shorter``."""
    w, h = size
    if w <= h:
        return shorter, max(1, round(h * shorter / w))
    return max(1, round(w * shorter / h)), shorter


def resize_shorter(im: Image.Image, size: int) -> Image.Image:
    """Isotropic rescale so that the smaller side is ``size`` (the paper's S or Q)."""
    if min(im.size) == size:
        return im
    return im.resize(shorter_side_size(im.size, size), Image.BILINEAR, reducing_gap=None)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def list_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named directly, plus every image under named folders (sorted, recursive)."""
    inputs, out = [Path(i) for i in inputs], []
    for item in inputs:
        if item.is_dir():
            out += sorted(p for p in item.rglob("*")
                          if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.is_file():
            out.append(item)
        else:
            raise FileNotFoundError(f"{str(item)!r} is neither an image file nor a folder")
    if not out:
        raise ValueError(f"no images found in {[str(i) for i in inputs]} (looked for "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return out
