"""Retrieval descriptors: poolings by hand and against cirtorch's formulas, the R-MAC grid,
multi-scale combination, ranking, and the file front end (descriptors, CSV, contact sheet)."""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vggnet
from vggnet import preprocess
from vggnet.retrieval import (
    DescriptorSettings,
    combine_scales,
    describe,
    pool,
    rank,
    read_scaled,
    retrieve_files,
    rmac,
    rmac_regions,
)
from vggnet.runtime import make_runtime
from vggnet.weights import LoadedModel

X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]]])  # (1, 2, 2, 2)


def unit(v):
    v = torch.tensor(v, dtype=torch.float32)
    return (v / (v.norm() + 1e-6))[None]


@pytest.mark.parametrize("method,want", [
    ("mac", [4.0, 8.0]),
    ("spoc", [2.5, 2.0]),
    ("gem", [25 ** (1 / 3), ((3 * 1e-18 + 512) / 4) ** (1 / 3)]),  # zeros clamp to 1e-6
])
def test_pooling_by_hand(method, want):
    torch.testing.assert_close(pool(X, method), unit(want))


def test_gem_p1_is_spoc_and_large_p_approaches_mac():
    x = torch.rand(2, 5, 3, 4, generator=torch.Generator().manual_seed(0)) + 0.1
    torch.testing.assert_close(pool(x, "gem", p=1.0), pool(x, "spoc"))
    torch.testing.assert_close(pool(x, "gem", p=200.0), pool(x, "mac"), atol=2e-2, rtol=0)


def test_rmac_regions_by_hand():
    ones = [(r, c, 1) for r in range(3) for c in range(3)]
    assert rmac_regions(3, 3) == [(0, 0, 3), (0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)] + ones
    # 4 x 6: one extra region along the width (2 at level 1: overlap 0.5, nearest to 0.4)
    assert rmac_regions(4, 6) == (
        [(0, 0, 4), (0, 2, 4)]
        + [(r, c, 2) for r in (0, 2) for c in (0, 2, 4)]
        + [(r, c, 2) for r in (0, 1, 2) for c in (0, 1, 2, 4)])


def cirtorch_rmac(x, L=3, eps=1e-6):
    """cirtorch/layers/functional.py's rmac, written out: the same float32 tensor arithmetic
    for the step choice and the region centres, regions gathered by index lists."""
    ovr, steps = 0.4, torch.Tensor([2, 3, 4, 5, 6, 7])
    W, H = x.size(3), x.size(2)
    w = min(W, H)
    b = (max(H, W) - w) / (steps - 1)
    _, idx = torch.min(torch.abs(((w ** 2 - w * b) / w ** 2) - ovr), 0)
    Wd = idx.item() + 1 if H < W else 0
    Hd = idx.item() + 1 if H > W else 0
    v = F.max_pool2d(x, (x.size(-2), x.size(-1)))
    v = v / (torch.norm(v, p=2, dim=1, keepdim=True) + eps).expand_as(v)
    for l in range(1, L + 1):  # noqa: E741
        wl = math.floor(2 * w / (l + 1))
        wl2 = math.floor(wl / 2 - 1)
        b = 0 if l + Wd == 1 else (W - wl) / (l + Wd - 1)
        cenW = torch.floor(wl2 + torch.Tensor(range(l - 1 + Wd + 1)) * b) - wl2
        b = 0 if l + Hd == 1 else (H - wl) / (l + Hd - 1)
        cenH = torch.floor(wl2 + torch.Tensor(range(l - 1 + Hd + 1)) * b) - wl2
        for i_ in cenH.tolist():
            for j_ in cenW.tolist():
                if wl == 0:
                    continue
                # cirtorch: (int(i_) + torch.Tensor(range(wl)).long()).tolist(), the same list
                R = x[:, :, [int(i_) + k for k in range(wl)], :]
                R = R[:, :, :, [int(j_) + k for k in range(wl)]]
                vt = F.max_pool2d(R, (R.size(-2), R.size(-1)))
                vt = vt / (torch.norm(vt, p=2, dim=1, keepdim=True) + eps).expand_as(vt)
                v += vt
    return v[:, :, 0, 0]


def test_poolings_match_cirtorch_at_small_sizes():
    gen = torch.Generator().manual_seed(1)
    sizes = (1, 2, 3, 4, 5, 7, 9, 12, 14, 21)  # square, wide and tall maps; 1-7 regions across
    for h in sizes:
        for w in sizes:
            x = torch.rand(2, 3, h, w, generator=gen)
            torch.testing.assert_close(rmac(x), cirtorch_rmac(x), rtol=1e-6, atol=1e-6)
            kernel = (h, w)
            torch.testing.assert_close(pool(x, "mac"),
                                       F.normalize(F.max_pool2d(x, kernel)[..., 0, 0], eps=0),
                                       rtol=1e-5, atol=1e-6)
            spoc = F.avg_pool2d(x, kernel)[..., 0, 0]
            torch.testing.assert_close(pool(x, "spoc"),
                                       spoc / (spoc.norm(dim=1, keepdim=True) + 1e-6))
            g = F.avg_pool2d(x.clamp(min=1e-6).pow(3), kernel).pow(1 / 3)[..., 0, 0]
            torch.testing.assert_close(pool(x, "gem"), g / (g.norm(dim=1, keepdim=True) + 1e-6))


def test_combine_scales_is_cirtorchs_extract_ms():
    a, b = unit([1.0, 2.0, 2.0]), unit([2.0, 0.0, 1.0])
    torch.testing.assert_close(combine_scales([a, b], "gem", 3.0),
                               unit((((a ** 3 + b ** 3) / 2) ** (1 / 3))[0].tolist()))
    torch.testing.assert_close(combine_scales([a, b], "mac"), unit(((a + b) / 2)[0].tolist()))


def test_rank_by_cosine():
    db = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    sims, idx = rank(torch.tensor([[1.0, 0.1]]), db, k=5)
    assert idx.tolist() == [[0, 2, 1]]  # k is capped at the database size
    want = [1 / math.sqrt(1.01), 1.1 / math.sqrt(2 * 1.01), 0.1 / math.sqrt(1.01)]
    torch.testing.assert_close(sims, torch.tensor([want]), rtol=1e-5, atol=2e-6)
    with pytest.raises(ValueError, match=r"same C, got \(1, 3\) and \(3, 2\)"):
        rank(torch.ones(1, 3), db)


def tiny():
    model = vggnet.create_model("A", num_classes=3, width=1 / 16, crop_size=32, seed=0).eval()
    return LoadedModel(model, preprocess.CAFFE)


def picture(path, seed, size=(48, 36)):
    """Smooth random blobs (an upsampled 4x3 noise image)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    small.resize(size, Image.Resampling.BICUBIC).save(path)
    return path


@pytest.mark.parametrize("method", ["gem", "rmac"])
def test_describe_is_the_pooled_last_relu(tmp_path, method):
    loaded = tiny()
    path = picture(tmp_path / "a.png", 0, size=(60, 40))
    settings = DescriptorSettings(pool=method, size=50, scales=(1.0, 0.5))
    rt = make_runtime("cpu", "fp32", channels_last=False)
    descs, kept, skipped = describe(loaded, [path], settings, rt, progress=False)
    images = read_scaled(path, 50, (1.0, 0.5))
    assert [tuple(x.shape) for x in images] == [(1, 3, 33, 50), (1, 3, 17, 25)]
    per_scale = []
    for x in images:
        fmap = loaded.model.extract(loaded.preprocessing.normalize(x), ["relu5_2"])["relu5_2"]
        per_scale.append(pool(fmap, method))
    assert kept == [str(path)] and skipped == []
    torch.testing.assert_close(descs, combine_scales(per_scale, method), rtol=1e-5, atol=1e-6)


def colour_net():
    """A net whose relu5_2 channels 0-2 are the image's R, G, B max-pooled 16x (every conv
    passes channels 0-2 through by its centre tap, the rest is zero): descriptors are colour
    statistics, so a random net's near-constant features do not blur the test."""
    model = vggnet.create_model("A", num_classes=3, width=1 / 16, crop_size=32, seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, m in model.features.named_children():
            if name.startswith("conv"):
                for c in range(3):
                    m.weight[c, c, 1, 1] = 1.0
    return LoadedModel(model, preprocess.paper((0.0, 0.0, 0.0)))


COLOURS = [(200, 40, 40), (40, 180, 60), (50, 60, 210), (190, 180, 30)]


@pytest.mark.parametrize("method", ["mac", "gem", "rmac"])
def test_retrieve_files_finds_the_copies(tmp_path, method):
    rng = np.random.default_rng(0)
    db = []
    for i, rgb in enumerate(COLOURS):
        a = np.clip(np.array(rgb) + rng.normal(0, 25, (36, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(tmp_path / f"db{i}.png")
        db.append(tmp_path / f"db{i}.png")
    queries = []
    for i in (2, 0, 3):  # resized copies of database images 2, 0 and 3
        with Image.open(db[i]) as im:
            im.resize((40, 30), Image.Resampling.BILINEAR).save(tmp_path / f"q{i}.png")
        queries.append(tmp_path / f"q{i}.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    Image.new("RGB", (10, 10)).save(tmp_path / "tiny.png")
    out = tmp_path / "out"
    result = retrieve_files(colour_net(), queries + [tmp_path / "bad.jpg"],
                            db + [tmp_path / "tiny.png"], out, k=3,
                            settings=DescriptorSettings(pool=method, size=64),
                            runtime=make_runtime("cpu", "fp32"), progress=False)
    assert result.idx[:, 0].tolist() == [2, 0, 3]
    assert len(result.skipped) == 2 and "bad.jpg" in result.skipped[0]
    assert "tiny.png: too small for the net" in result.skipped[1]
    with open(out / "topk.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and rows[0]["rank"] == "1" and rows[0]["match"].endswith("db2.png")
    assert float(rows[0]["similarity"]) == pytest.approx(result.sims[0, 0].item(), abs=1e-6)
    with Image.open(out / "contact_sheet.png") as im:
        assert im.size == (4 * 136, 3 * 150)  # query + 3 matches; a row per query


def test_bad_settings():
    with pytest.raises(ValueError, match="pooling must be one of .* got 'max'"):
        DescriptorSettings(pool="max")
    with pytest.raises(ValueError, match="GeM's p must be > 0"):
        DescriptorSettings(p=0)
