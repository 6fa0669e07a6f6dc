import numpy as np
import pytest
import torch
from PIL import Image

import vggnet.image as image
from imagefiles import bad_files, good_files, noise_image
from vggnet import preprocess
from vggnet.image import BadImageError, load_rgb, resize_shorter


def test_normalize_conventions():
    x = torch.tensor([[[[0]], [[128]], [[255]]]], dtype=torch.uint8)  # R=0, G=128, B=255
    caffe = preprocess.CAFFE.normalize(x)[0, :, 0, 0]
    torch.testing.assert_close(caffe, torch.tensor([255 - 103.939, 128 - 116.779, 0 - 123.68]))
    tv = preprocess.TORCHVISION.normalize(x)[0, :, 0, 0]
    expected = ((torch.tensor([0, 128, 255]) / 255 - torch.tensor([0.485, 0.456, 0.406]))
                / torch.tensor([0.229, 0.224, 0.225]))
    torch.testing.assert_close(tv, expected)
    own = preprocess.paper((120.0, 110.0, 100.0)).normalize(x)[0, :, 0, 0]
    torch.testing.assert_close(own, torch.tensor([-120.0, 18.0, 155.0]))
    p = preprocess.TORCHVISION
    assert preprocess.Preprocessing.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="'RBG'"):
        preprocess.Preprocessing("RBG")


def _save(tmp_path, name, im, **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return p


def test_load_rgb_converts_modes(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    for name, im, kw in [("g.png", rgb.convert("L"), {}), ("p.png", rgb.convert("P"), {}),
                         ("a.png", rgb.convert("RGBA"), {}), ("c.jpg", rgb.convert("CMYK"), {}),
                         ("x.jpg", rgb, {})]:
        out = load_rgb(_save(tmp_path, name, im, **kw))
        assert out.mode == "RGB" and out.size == (30, 20), name
    a16 = Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16))
    assert np.asarray(load_rgb(_save(tmp_path, "w16.png", a16))).min() == 255


def test_load_rgb_applies_exif_rotation(tmp_path):
    im = Image.new("RGB", (40, 20))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    p = tmp_path / "r.jpg"
    im.save(p, exif=exif)
    assert load_rgb(p).size == (20, 40)


@pytest.mark.parametrize("content,reason", [(b"", "empty file"), (b"hello", "not an image")])
def test_bad_files(tmp_path, content, reason):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(BadImageError, match=reason):
        load_rgb(p)


def test_truncated_and_bomb(tmp_path, monkeypatch):
    p = _save(tmp_path, "t.jpg", Image.new("RGB", (64, 64), "red"))
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(BadImageError, match="t.jpg: cannot decode"):
        load_rgb(p)
    monkeypatch.setattr(image, "MAX_PIXELS", 100)
    with pytest.raises(BadImageError, match="20x20 pixels: decompression bomb refused: more than "
                       "the limit of 100 pixels"):
        load_rgb(_save(tmp_path, "big.png", Image.new("RGB", (20, 20))))


def test_one_pixel_limit_for_every_format(tmp_path):
    """Pillow's own limit (89.5 M) refused a PNG that a JPEG of the same size passed (256 M):
    now both are held to MAX_PIXELS. The PNGs below only claim their size (no pixel data), so
    one under the limit fails as truncated, after the size check, and one over it is a bomb."""
    from imagefiles import bomb_png

    under = bomb_png(tmp_path / "under.png", side=10_000)  # 100 M pixels
    with pytest.raises(BadImageError, match="under.png: cannot decode: .*truncated"):
        load_rgb(under)
    over = bomb_png(tmp_path / "over.png", side=17_000)  # 289 M pixels
    with pytest.raises(BadImageError, match="over.png: decompression bomb refused: more than the "
                       "limit of 256,000,000 pixels .*the same for every format"):
        load_rgb(over)


def test_float_tiff_in_0_1_is_scaled_to_0_255(tmp_path):
    """A float TIFF holds intensities with white = 1.0; it decoded almost black (x / 255)."""
    a = np.linspace(0.0, 1.0, 64 * 32, dtype=np.float32).reshape(32, 64)
    p = _save(tmp_path, "f.tif", Image.fromarray(a, "F"))
    got = np.asarray(load_rgb(p))
    assert got.shape == (32, 64, 3)
    expected = np.clip(a.astype(np.float64) * 255 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got[..., 0], expected)
    assert (got[..., 0] == got[..., 2]).all() and got.max() == 255
    # floats in 0-255 stay as they are
    big = _save(tmp_path, "f255.tif", Image.fromarray(a * 200, "F"))
    assert np.asarray(load_rgb(big)).max() == 200


def test_resize_shorter():
    assert resize_shorter(Image.new("RGB", (500, 375)), 256).size == (341, 256)
    assert resize_shorter(Image.new("RGB", (300, 600)), 256).size == (256, 512)


def _pillow_decode(path, draft=None) -> np.ndarray:
    """What Pillow alone makes of a JPEG (the reference for the simplejpeg fast path)."""
    with Image.open(path) as im:
        if draft:
            im.draft("RGB", draft)
        return np.asarray(im.convert("RGB"), np.int16)


@pytest.mark.parametrize("mode,progressive", [("RGB", False), ("RGB", True), ("L", False)])
def test_fast_jpeg_path_matches_pillow(tmp_path, mode, progressive):
    p = _save(tmp_path, "x.jpg", noise_image(203, 150).convert(mode), quality=92,
              progressive=progressive)
    for shorter, draft, r in ((150, None, 1), (70, (95, 70), 2), (36, (49, 36), 4)):
        fast = image._decode_jpeg_fast(p, lambda w, h, d=draft: d)
        assert fast is not None and fast.reduction == r and fast.full_size == (203, 150)
        ref = _pillow_decode(p, draft)
        assert fast.image.shape == ref.shape and fast.image.flags.writeable
        # the same libjpeg-turbo algorithms (islow IDCT, fancy upsampling): equal up to rounding
        assert np.abs(fast.image.astype(np.int16) - ref).max() <= 1, (shorter, r)
        assert image.load_rgb_reduced(p, shorter).reduction == r


def test_fast_jpeg_path_leaves_the_rest_to_pillow(tmp_path, monkeypatch):
    good = good_files(tmp_path / "good")
    for name in ("cmyk.jpg", "exif_rotated.jpg", "gray.png"):  # CMYK, EXIF orientation, not a JPEG
        assert image._decode_jpeg_fast(good[name], lambda w, h: None) is None, name
    for name, (path, reason) in bad_files(tmp_path / "bad").items():
        if path.suffix == ".jpg" and path.stat().st_size:
            assert image._decode_jpeg_fast(path, lambda w, h: None) is None, name
        with pytest.raises(BadImageError, match=reason):  # Pillow's words, as before
            load_rgb(path)
    # without simplejpeg everything still decodes, through Pillow, to the same pixels
    with_fast = np.asarray(load_rgb(good["rgb.jpg"]), np.int16)
    monkeypatch.setattr(image, "simplejpeg", None)
    assert np.abs(np.asarray(load_rgb(good["rgb.jpg"]), np.int16) - with_fast).max() <= 1
