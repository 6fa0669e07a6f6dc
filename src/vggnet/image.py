"""Decoding images inside a guard: every file either becomes an 8-bit RGB image or a
``BadImageError`` that says which file and why. Never a crash, never a silent change."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Decompression-bomb guard: refuse images above this many pixels (about 16k x 16k). Pillow's
# own check only warns below 2x its limit; here the warning is an error too.
MAX_PIXELS = 256_000_000


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
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise BadImageError(path, f"{im.width}x{im.height} pixels exceeds the "
                                        f"decompression-bomb limit of {MAX_PIXELS:,}")
                if draft is not None and im.format == "JPEG":
                    im.draft("RGB", draft)
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb8(im)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(path, f"decompression bomb refused: {e}") from e
    except Image.UnidentifiedImageError:
        raise BadImageError(path, "not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated, corrupt, unreadable
        raise BadImageError(path, f"cannot decode: {type(e).__name__}: {e}") from e


def _to_rgb8(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit/32-bit grayscale: Pillow's convert would clip at 255; scale to the range
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode in ("P", "PA") and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def resize_shorter(im: Image.Image, size: int) -> Image.Image:
    """Isotropic rescale so that the smaller side is ``size`` (the paper's S or Q)."""
    w, h = im.size
    if min(w, h) == size:
        return im
    if w <= h:
        new = (size, max(1, round(h * size / w)))
    else:
        new = (max(1, round(w * size / h)), size)
    return im.resize(new, Image.BILINEAR, reducing_gap=None)


def center_crop(im: Image.Image, size: int) -> Image.Image:
    """The central size x size square (the image must be at least that large)."""
    w, h = im.size
    if w < size or h < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {w}x{h} image; rescale it first")
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def to_uint8_tensor(im: Image.Image):
    """RGB PIL image -> uint8 tensor (3, H, W), what ``Preprocessing.normalize`` takes batched."""
    import torch

    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()
