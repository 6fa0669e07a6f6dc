"""Helpers for tests: small image files of every kind a dataset may hold, good and bad."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour noise (compresses like a photo, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3),
                                         dtype=np.uint8))
    a = np.asarray(small.resize((w, h), Image.BICUBIC), np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, side: int = 17_000) -> Path:
    """A PNG whose header claims side x side pixels (289 M for 17,000): refused before decoding."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _png_chunk(b"IEND", b""))
    return path


def good_files(folder: Path, w: int = 48, h: int = 40) -> dict[str, Path]:
    """Readable images in every mode the decoder converts: name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = noise_image(w, h, seed=len(str(folder)))
    out = {}

    def save(name, im, **kw):
        out[name] = folder / name
        im.save(out[name], **kw)

    save("rgb.jpg", rgb, quality=90)
    save("gray.png", rgb.convert("L"))
    save("cmyk.jpg", rgb.convert("CMYK"))
    save("palette.png", rgb.convert("P"))
    save("rgba.png", rgb.convert("RGBA"))
    save("deep16.png", Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated by 90 degrees
    save("exif_rotated.jpg", rgb.transpose(Image.Transpose.ROTATE_90), exif=exif)
    return out


def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Unreadable files: name -> (path, words the reason must contain)."""
    folder.mkdir(parents=True, exist_ok=True)
    jpg = folder / "_src.jpg"
    noise_image(64, 48).save(jpg, quality=90)
    data = jpg.read_bytes()
    jpg.unlink()
    out = {}

    def put(name, content, reason):
        (folder / name).write_bytes(content)
        out[name] = (folder / name, reason)

    put("truncated.jpg", data[: len(data) // 2], "truncated")
    put("zero.jpg", b"", "empty file")
    put("notes.txt", b"not a picture\n", "not an image")
    dht = data.index(b"\xff\xc4")  # a Huffman table overwritten: the decoder must fail
    put("corrupt.jpg", data[:dht + 4] + b"\xff" * 30 + data[dht + 34:], "broken data stream")
    put("garbage.jpg", b"\xff\xd8\xff" + bytes(range(256)) * 4, "not an image")
    bomb_png(folder / "bomb.png")
    out["bomb.png"] = (folder / "bomb.png", "decompression bomb")
    return out


def class_tree(root: Path, classes=("a", "b", "c"), per_class: int = 4, w: int = 48, h: int = 40,
               split: str = "train") -> Path:
    for ci, c in enumerate(classes):
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = noise_image(w + 4 * i, h, seed=100 * ci + i)
            image.save(root / split / c / f"{i}.jpg", quality=90)
    return root
