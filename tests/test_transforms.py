import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imagefiles import good_files, noise_image
from vggnet import preprocess
from vggnet.image import load_rgb, load_rgb_reduced, resize_shorter, shorter_side_size
from vggnet.protocol import default_test_scale
from vggnet.synthetic import SyntheticSpec, render
from vggnet.transforms import (
    ColorStats,
    EvalTransform,
    TrainTransform,
    color_shift,
    compute_stats,
    crop_resized,
    device_batch,
    resample_aa,
)


def _full_rescale(path, shorter: int) -> np.ndarray:
    """The whole image rescaled by torch's antialiased bilinear: what crop_resized takes
    windows of."""
    img = load_rgb(path)
    w, h = shorter_side_size(img.size, shorter)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=(h, w), mode="bilinear", antialias=True)
    return out[0].permute(1, 2, 0).numpy()


# windows whose start falls on the full rescale's grid (source pixel a at output k): sc = 2
# (any x0), sc = 1.5 (odd x0, y0), sc = 0.5 (upscaling, even), at the origin and at the far
# edges, near the edge of a much enlarged image, and the whole image at a scale with no alignment
@pytest.mark.parametrize("size,shorter,box", [
    ((200, 120), 60, (11, 7, 43, 39)), ((150, 96), 64, (21, 5, 53, 37)),
    ((50, 40), 80, (10, 4, 42, 36)), ((200, 120), 60, (68, 28, 100, 60)),
    ((97, 61), 40, (0, 0, 32, 32)), ((97, 61), 40, (0, 0, 64, 40)),
    ((12, 10), 64, (3, 2, 35, 34))])  # enlarged 6.4x, near the edge
def test_window_equals_resize_then_crop(tmp_path, size, shorter, box):
    p = tmp_path / "x.png"
    noise_image(*size).save(p)
    x0, y0, x1, y1 = box
    full = _full_rescale(p, shorter)
    fast = crop_resized(load_rgb_reduced(p, shorter), shorter, box)
    # bit-identical: the filter at every sample sees the source pixels the full rescale's does
    assert np.array_equal(fast, full[y0:y1, x0:x1])
    flipped = crop_resized(load_rgb_reduced(p, shorter), shorter, box, flip=True)
    assert np.array_equal(flipped, fast[:, ::-1])


def test_resampling_is_pillows_bilinear(tmp_path):
    p = tmp_path / "x.png"
    noise_image(97, 61).save(p)
    for shorter in (40, 61, 150):  # shrink, identity, enlarge
        pillow = np.asarray(resize_shorter(load_rgb(p), shorter), np.int16)
        ours = crop_resized(load_rgb_reduced(p, shorter), shorter, (0, 0, *pillow.shape[1::-1]))
        ours = ours.astype(np.int16)
        assert np.abs(pillow - ours).max() <= 1 and np.abs(pillow - ours).mean() < 0.5, shorter


def _assert_samples(got: np.ndarray, start: int, scale: float) -> None:
    """``got``: pixel values along one axis of a window of a ramp image (value = source
    coordinate) rescaled by 1/scale. An antialiased bilinear sample of a ramp is the source
    coordinate of its centre, so these say where the samples were taken: at the full
    rescale's spacing, starting at most one source pixel before the window's nominal start
    (plus half a grey level of rounding). Samples whose filter reaches the image edge (the
    first two and last two) are biased by the clipping and left out."""
    nominal = (start + np.arange(len(got)) + 0.5) * scale - 0.5
    shift = (nominal - got.astype(float))[2:-2]
    assert shift.min() > -0.51 and shift.max() < 1.51, (start, scale, shift)
    assert np.ptp(shift) <= 1.0, (start, scale, shift)  # the spacing is the full rescale's


def _ramp_image(w, h):
    """R = x, G = y (in pixels): the colour of a pixel says where it came from."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)


def test_window_anywhere_samples_the_full_rescale_grid(tmp_path):
    p = tmp_path / "ramp.png"
    Image.fromarray(_ramp_image(250, 180)).save(p)
    for shorter in (61, 97, 150, 240):
        rw, rh = shorter_side_size((250, 180), shorter)
        sx, sy = 250 / rw, 180 / rh  # rounding rw makes the two scales differ slightly
        corners = ((0, 0), (1, 3), (7, 2), (rw - 40, rh - 40), ((rw - 40) // 2, (rh - 40) // 3))
        for x0, y0 in corners:
            out = crop_resized(load_rgb_reduced(p, shorter), shorter, (x0, y0, x0 + 40, y0 + 40))
            assert out.shape == (40, 40, 3)
            if shorter == 240:  # enlarging: x values run past 255, check the rows only
                _assert_samples(out[:, 0, 1], y0, sy)
                continue
            _assert_samples(out[0, :, 0], x0, sx)
            _assert_samples(out[:, 0, 1], y0, sy)


def test_reduced_jpeg_decoding_is_used_and_close(tmp_path):
    p = tmp_path / "big.jpg"
    image = render(SyntheticSpec(min_side=300, max_side=300), "train", 3)[0]
    image.resize((400, 300)).save(p, quality=90)
    d = load_rgb_reduced(p, 64)
    assert d.reduction == 4 and d.image.shape == (75, 100, 3) and d.full_size == (400, 300)
    assert load_rgb_reduced(p, 151).reduction == 1  # 1/2 would give 150 < 151: full decode
    fast = np.asarray(crop_resized(d, 64, (0, 0, 85, 64)), np.float32)
    exact = np.asarray(resize_shorter(load_rgb(p), 64), np.float32)
    assert exact.shape == fast.shape == (64, 85, 3)
    # DCT-domain 1/4 scaling + bilinear vs bilinear from full size: mean |difference| 0.54 grey
    # levels here (under 2 on white-noise-like images)
    assert np.abs(fast - exact).mean() < 1.0


def test_exif_rotated_jpeg_reduced_keeps_upright_size(tmp_path):
    p = good_files(tmp_path, w=160, h=64)["exif_rotated.jpg"]
    d = load_rgb_reduced(p, 16)
    assert d.full_size == (160, 64) and d.reduction == 4 and d.image.shape == (16, 40, 3)


def test_train_transform_scale_crop_flip(tmp_path):
    p = tmp_path / "coords.png"
    Image.fromarray(_ramp_image(120, 80)).save(p)
    t = TrainTransform(scale=(40, 80), crop_size=32)
    rng = np.random.default_rng(0)
    draws = [t.draw(rng) for _ in range(2000)]
    s = np.array([d["s"] for d in draws])
    # every integer in [Smin, Smax]
    assert s.min() == 40 and s.max() == 80 and len(np.unique(s)) == 41
    assert abs(s.mean() - 60) < 1.0
    assert 0.45 < np.mean([d["flip"] for d in draws]) < 0.55
    # S = 80 is the image's own shorter side: no rescale, the crop is a window of the image
    xs, ys = set(), set()
    for d in draws[:300]:
        d = dict(d, s=80)
        out = t.apply(p, d)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        r = out[..., 0].astype(int)
        x0 = r[0].min()
        expected_row = np.arange(x0, x0 + 32)[::-1] if d["flip"] else np.arange(x0, x0 + 32)
        assert np.array_equal(r[0], expected_row)
        assert np.array_equal(out[:, 0, 1], np.arange(out[0, 0, 1], out[0, 0, 1] + 32))
        xs.add(x0)
        ys.add(int(out[0, 0, 1]))
    assert min(xs) == 0 and max(xs) == 120 - 32 and min(ys) == 0 and max(ys) == 80 - 32
    # any S: that crop of the image rescaled to S (starting less than a source pixel early)
    for d in draws[:20]:
        out = t.apply(p, dict(d, flip=False))
        rw, rh = shorter_side_size((120, 80), d["s"])
        x0, y0 = int(d["u"] * (rw - 31)), int(d["v"] * (rh - 31))
        _assert_samples(out[0, :, 0], x0, 120 / rw)
        _assert_samples(out[:, 0, 1], y0, 80 / rh)


def test_train_transform_rejects_crop_larger_than_scale():
    with pytest.raises(ValueError, match=r"crop_size \(64\) <= Smin"):
        TrainTransform(scale=(56, 80), crop_size=64)


def test_eval_transform_centre_crop_and_whole(tmp_path):
    p = tmp_path / "coords.png"
    Image.fromarray(_ramp_image(100, 60)).save(p)
    out = EvalTransform(60, 32)(p)
    assert out.shape == (32, 32, 3) and out[0, 0, 0] == 34 and out[0, 0, 1] == 14
    assert EvalTransform(30, None)(p).shape == (30, 50, 3)
    assert default_test_scale([256, 512]) == 384 and default_test_scale((256, 256)) == 256


def _stats():
    vec = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    return ColorStats((120.0, 110.0, 100.0), (0.2, 0.02, 0.005), tuple(map(tuple, vec)))


def test_colour_shift_statistics():
    stats = _stats()
    t = TrainTransform(scale=(32, 32), crop_size=32)
    rng = np.random.default_rng(0)
    alpha = torch.from_numpy(np.stack([t.draw(rng)["alpha"] for _ in range(20000)]))
    assert abs(alpha.std().item() - 0.1) < 0.003 and abs(alpha.mean().item()) < 0.003
    shift = color_shift(alpha, stats)  # (N, 3), 0-255 units
    along = shift.double() @ torch.tensor(stats.eigvec, dtype=torch.float64)  # onto eigenvectors
    expected = 255 * 0.1 * torch.tensor(stats.eigval, dtype=torch.float64)
    torch.testing.assert_close(along.std(0), expected, rtol=0.03, atol=0)
    assert shift.mean(0).abs().max() < 0.05 * expected[0]


def test_mean_subtraction_and_shift_on_device():
    stats = _stats()
    prep = preprocess.paper(stats.mean_rgb)
    x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    plain = device_batch(x, prep)
    torch.testing.assert_close(plain, x.float() - torch.tensor(stats.mean_rgb).view(1, 3, 1, 1))
    alpha = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.0, 0.0]])
    shifted = device_batch(x, prep, alpha=alpha, stats=stats)
    torch.testing.assert_close(shifted - plain,
                               color_shift(alpha, stats).view(2, 3, 1, 1).expand_as(plain))
    assert torch.equal(shifted[1], plain[1])


def test_compute_stats_of_two_colours(tmp_path):
    a, b = np.array([200, 40, 40]), np.array([40, 40, 200])
    paths = []
    for i, c in enumerate([a, b] * 3):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 30), tuple(int(v) for v in c)).save(p)
        paths.append(str(p))
    (tmp_path / "bad.png").write_bytes(b"")
    stats = compute_stats(paths + [str(tmp_path / "bad.png")], shorter=16)
    assert stats.images == 6
    np.testing.assert_allclose(stats.mean_rgb, (a + b) / 2, atol=1e-6)
    # all variance lies along (b - a): one eigenvalue, that eigenvector
    d = (b - a) / 255.0
    np.testing.assert_allclose(stats.eigval, [d @ d / 4, 0, 0], atol=1e-9)
    np.testing.assert_allclose(np.abs(np.array(stats.eigvec)[:, 0]), np.abs(d) / np.linalg.norm(d),
                               atol=1e-9)
    assert ColorStats.from_dict(stats.to_dict()) == stats


@pytest.mark.cpu_sensitive
@pytest.mark.parametrize("shape,size,scale", [((40, 52), (17, 23), (2.3, 2.2)),
                                              ((30, 30), (41, 45), (0.7, 0.66)),
                                              ((64, 48), (27, 20), (2.37, 2.37))])
def test_resample_public_fallback_equals_the_private_op(shape, size, scale):
    # the private out= kernel and the public F.interpolate path give the same bytes
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (1, *shape, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    fast, public = resample_aa(src, size, *scale), resample_aa(src, size, *scale, fast=False)
    assert fast.shape == public.shape == (1, 3, *size)
    assert torch.equal(fast, public)
    assert fast.is_contiguous(memory_format=torch.channels_last)


def test_resample_fallback_pads_a_short_window():
    # an output one pixel longer than floor(in / scale): the edge is repeated, no error
    src = torch.full((1, 3, 10, 10), 7, dtype=torch.uint8)
    src = src.contiguous(memory_format=torch.channels_last)
    out = resample_aa(src, (5, 5), 2.2, 2.2, fast=False)
    assert out.shape == (1, 3, 5, 5) and bool((out == 7).all())
