"""Image retrieval with VGG descriptors, the conventions of cnnimageretrieval-pytorch
(Radenović, Tolias & Chum; ``cirtorch``).

A descriptor pools the last conv layer's rectified output (relu5_3 for VGG-16: after its ReLU,
before pool5) over all locations into one C-vector, L2-normalised:
- mac: maximum (Tolias et al. 2016); spoc: mean (Babenko & Lempitsky 2015);
- gem: generalised mean (mean of x^p)^(1/p) over x clamped at 1e-6, p = 3 by default
  (Radenović et al. 2018; p=1 is spoc, p -> inf mac);
- rmac: the whole map's MAC plus the MACs of square regions on a grid of ``levels`` scales,
  each L2-normalised before the sum (Tolias et al. 2016, cirtorch's grid, 40% overlap).
Several scales: the image at each scale (``scales``, e.g. 1, 1/sqrt(2), 1/2 of ``size``), the
descriptors combined as cirtorch's extract_ms: (mean of v_s^m)^(1/m), m = p for gem and 1
otherwise, then L2-normalised. Images are first shrunk (never enlarged) to longer side ``size``
as cirtorch's loader does (1024 there); each other scale resamples that image with Pillow
(antialiased; cirtorch interpolates the tensor without antialiasing).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbone import Trunk, WeightsLike, block_ends, resolve
from .runtime import Runtime, make_runtime
from .settings import POOLINGS, RETRIEVAL_SIZE, RetrieveSettings

EPS = 1e-6  # cirtorch's, in gem's clamp and every L2 normalisation
RMAC_OVERLAP = 0.4  # desired overlap of neighbouring regions
RMAC_STEPS = (2, 3, 4, 5, 6, 7)  # region counts considered along the longer side


def l2n(v: torch.Tensor) -> torch.Tensor:
    """(N, C) -> v / (|v| + 1e-6) per row (cirtorch's l2n)."""
    return v / (v.norm(dim=1, keepdim=True) + EPS)


def mac(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=(2, 3))


def spoc(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


def gem(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    return x.clamp(min=EPS).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def rmac_regions(h: int, w: int, levels: int = 3) -> list[tuple[int, int, int]]:
    """Square regions (top, left, side) of an h x w map, cirtorch's grid: at level l the side
    is floor(2 min(h, w) / (l + 1)), l regions across the shorter side and l + d across the
    longer, d chosen so that neighbours overlap by about 40%. Computed in float32 as cirtorch
    computes it (its floors of float32 products decide edge cases)."""
    side = min(h, w)
    steps = torch.tensor(RMAC_STEPS, dtype=torch.float32)
    b = (max(h, w) - side) / (steps - 1)
    cost = torch.abs((side ** 2 - side * b) / side ** 2 - RMAC_OVERLAP)
    extra = min(range(len(RMAC_STEPS)), key=lambda i: float(cost[i])) + 1  # first minimum
    wd, hd = (extra, 0) if h < w else (0, extra) if h > w else (0, 0)
    regions = []
    for level in range(1, levels + 1):
        wl = math.floor(2 * side / (level + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        starts = []
        for length, d in ((h, hd), (w, wd)):
            stride = (length - wl) / (level + d - 1) if level + d > 1 else 0
            grid = torch.arange(level + d, dtype=torch.float32) * stride
            starts.append([int(v) - wl2 for v in torch.floor(wl2 + grid).tolist()])
        regions += [(top, left, wl) for top in starts[0] for left in starts[1]]
    return regions


def rmac(x: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """(N, C, h, w) -> (N, C): l2n(MAC of the whole map) + sum over regions of l2n(MAC)."""
    v = l2n(mac(x))
    for top, left, s in rmac_regions(x.shape[2], x.shape[3], levels):
        v = v + l2n(mac(x[:, :, top:top + s, left:left + s]))
    return v


def pool(fmap: torch.Tensor, method: str = "gem", p: float = 3.0, levels: int = 3) -> torch.Tensor:
    """A descriptor per map: (N, C, h, w) -> (N, C) float32, L2-normalised."""
    if method not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {method!r}")
    if method == "gem" and not p > 0:
        raise ValueError(f"GeM's p must be > 0 (1 = spoc, 3 = the default), got {p!r}")
    x = fmap.float()
    v = {"mac": mac, "spoc": spoc, "gem": lambda t: gem(t, p),
         "rmac": lambda t: rmac(t, levels)}[method](x)
    return l2n(v)


def combine_scales(descs: Sequence[torch.Tensor], method: str, p: float = 3.0) -> torch.Tensor:
    """Per-scale descriptors (each (N, C)) -> one (N, C): cirtorch's extract_ms,
    l2n(mean_s(v_s^m)^(1/m)) with m = p for gem, 1 otherwise."""
    m = p if method == "gem" else 1.0
    return l2n(torch.stack([d.pow(m) for d in descs]).mean(dim=0).pow(1.0 / m))


def rank(query: torch.Tensor, database: torch.Tensor,
         k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of each query (Q, C) with each database row (M, C): the top ``k``
    (at most M) as (similarities (Q, k), database indices (Q, k)), best first."""
    if query.ndim != 2 or database.ndim != 2 or query.shape[1] != database.shape[1]:
        raise ValueError(f"descriptors must be (Q, C) and (M, C) with the same C, got "
                         f"{tuple(query.shape)} and {tuple(database.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    sims = l2n(query.float()) @ l2n(database.float()).T
    return sims.topk(min(k, database.shape[0]), dim=1)


@dataclass(frozen=True)
class DescriptorSettings:
    pool: str = "gem"
    p: float = 3.0  # GeM's power
    size: int = RETRIEVAL_SIZE  # images shrunk to this longer side first (cirtorch's test size)
    scales: tuple[float, ...] = (1.0,)  # e.g. (1, 2**-0.5, 0.5), cirtorch's multi-scale
    levels: int = 3  # R-MAC's region scales

    def __post_init__(self) -> None:
        if self.pool not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pool!r}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive factors of size, got {self.scales!r}")
        if self.pool == "gem" and not self.p > 0:
            raise ValueError(f"GeM's p must be > 0 (1 = spoc, 3 = the default), got {self.p!r}")


def descriptor_layer(weights: WeightsLike) -> str:
    """The last conv layer's rectified output, the map every pooling reads (relu5_3 for D)."""
    return block_ends(resolve(weights).model)[-1]


def read_scaled(path: str | os.PathLike, size: int, scales: Sequence[float]) -> list[torch.Tensor]:
    """uint8 RGB (1, 3, h, w) of the image at each scale: shrunk to longer side ``size``
    (never enlarged), then resized by each factor (Pillow, antialiased bilinear)."""
    import numpy as np
    from PIL import Image

    from .image import load_rgb

    im = load_rgb(path)
    base = min(1.0, size / max(im.size))
    out = []
    for s in scales:
        w, h = (max(1, round(d * base * s)) for d in im.size)
        scaled = im if (w, h) == im.size else im.resize((w, h), Image.Resampling.BILINEAR)
        out.append(torch.from_numpy(np.asarray(scaled).copy()).permute(2, 0, 1)[None])
    return out


def describe(weights: WeightsLike, paths: Sequence[str | os.PathLike],
             settings: DescriptorSettings = DescriptorSettings(), runtime: Runtime | None = None,
             progress: bool = True) -> tuple[torch.Tensor, list[str], list[str]]:
    """Descriptors (N, C) float32 of the images that could be read, their paths, and one
    "path: reason" line per image skipped (undecodable, or too small for the net: the map
    needs the image at least 16 pixels on its shorter side at every scale)."""
    from tqdm import tqdm

    from .image import BadImageError

    rt = runtime or make_runtime()
    loaded = resolve(weights)
    trunk = rt.prepare_inference(Trunk(loaded, [descriptor_layer(loaded)], (0.0, 255.0)))
    tap, s = trunk.taps[0], settings
    descs, kept, skipped = [], [], []
    for path in tqdm(list(paths), desc="describe", unit="image", disable=not progress):
        try:
            images = read_scaled(path, s.size, s.scales)
        except BadImageError as e:
            skipped.append(str(e))
            continue
        small = [tuple(x.shape[-2:]) for x in images if min(x.shape[-2:]) < 16]
        if small:
            skipped.append(f"{path}: too small for the net at scale(s) {small} (h, w); the "
                           "descriptor needs at least 16 pixels on the shorter side")
            continue
        per_scale = []
        for x in images:
            with rt.inference():
                fmap = trunk(rt.input(x.float()))[tap]
            per_scale.append(pool(fmap, s.pool, s.p, s.levels).cpu())
        descs.append(combine_scales(per_scale, s.pool, s.p))
        kept.append(str(path))
    width = loaded.model.config.scaled(512)
    return (torch.cat(descs) if descs else torch.zeros(0, width)), kept, skipped


def write_topk_csv(path: str | os.PathLike, queries: Sequence[str], database: Sequence[str],
                   sims: torch.Tensor, idx: torch.Tensor) -> Path:
    """One row per (query, rank): query, rank (1 = best), match, similarity (cosine)."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "rank", "match", "similarity"])
        for q, row_s, row_i in zip(queries, sims.tolist(), idx.tolist(), strict=True):
            for r, (s, i) in enumerate(zip(row_s, row_i, strict=True), start=1):
                w.writerow([q, r, database[i], f"{s:.6f}"])
    return path


def contact_sheet(path: str | os.PathLike, queries: Sequence[str], database: Sequence[str],
                  sims: torch.Tensor, idx: torch.Tensor, thumb: int = 128) -> Path:
    """A PNG with one row per query: the query, then its matches best first, each thumbnail
    (longer side ``thumb``) captioned with its rank and cosine similarity."""
    from PIL import Image, ImageDraw

    from .image import load_rgb

    cell, caption = thumb + 8, 14
    cols = 1 + idx.shape[1]
    sheet = Image.new("RGB", (cols * cell, len(queries) * (cell + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, q in enumerate(queries):
        matches = zip(sims[r].tolist(), idx[r].tolist(), strict=True)
        row = [(q, "query")] + [(database[i], f"#{k + 1}  {s:.3f}")
                                for k, (s, i) in enumerate(matches)]
        for c, (file, label) in enumerate(row):
            im = load_rgb(file)
            im.thumbnail((thumb, thumb))
            x0, y0 = c * cell + 4, r * (cell + caption) + 4
            sheet.paste(im, (x0, y0))
            draw.text((x0, y0 + thumb + 2), label, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


@dataclass
class Retrieval:
    queries: list[str]
    database: list[str]
    sims: torch.Tensor  # (Q, k)
    idx: torch.Tensor  # (Q, k) indices into database
    skipped: list[str]  # "path: reason" for every image left out


def retrieve_files(weights: WeightsLike, queries: Sequence[str | os.PathLike],
                   database: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
                   k: int = 10, settings: DescriptorSettings = DescriptorSettings(),
                   runtime: Runtime | None = None, progress: bool = True) -> Retrieval:
    """Describe both sets, rank the database for each query, and (with ``out``) write
    out/topk.csv and out/contact_sheet.png."""
    loaded = resolve(weights)
    qd, qp, qs = describe(loaded, queries, settings, runtime, progress)
    dd, dp, ds = describe(loaded, database, settings, runtime, progress)
    if not qp or not dp:
        raise ValueError(f"no readable {'query' if not qp else 'database'} images; skipped: "
                         f"{(qs if not qp else ds)[:3]}")
    sims, idx = rank(qd, dd, k)
    result = Retrieval(qp, dp, sims, idx, qs + ds)
    if out is not None:
        write_topk_csv(Path(out) / "topk.csv", qp, dp, sims, idx)
        contact_sheet(Path(out) / "contact_sheet.png", qp, dp, sims, idx)
    return result


def descriptor_settings(pool: str, p: float, scales: Sequence[int] | None) -> DescriptorSettings:
    """The command line's longer sides in pixels (e.g. 1024,724,512) as ``DescriptorSettings``:
    shrink to the largest, then each scale as a factor of it."""
    sides = tuple(scales or (RETRIEVAL_SIZE,))
    if min(sides) < 16:
        raise ValueError(f"--scales are longer image sides in pixels (e.g. 1024,724,512), got "
                         f"{','.join(map(str, sides))}")
    top = max(sides)
    return DescriptorSettings(pool=pool, p=p, size=top, scales=tuple(q / top for q in sides))


def report_skipped(skipped: Sequence[str]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} image(s):")
        for line in skipped:
            print(f"  {line}")


def retrieve_command(s: RetrieveSettings) -> int:
    """``vggnet retrieve``: rank, write, print each query's best match and the skipped."""
    from .checkpoint import check_output_folder
    from .image import list_images

    check_output_folder(s.out, "retrieval")
    queries, database = list_images([s.query]), list_images([s.database])
    r = retrieve_files(s.weights, queries, database, s.out, s.k,
                       descriptor_settings(s.pool, s.gem_p, s.scales),
                       make_runtime(s.device, s.precision), s.progress)
    for q, sims, idx in zip(r.queries, r.sims.tolist(), r.idx.tolist(), strict=True):
        print(f"{q}: best {r.database[idx[0]]} ({sims[0]:.3f})")
    print(f"wrote {Path(s.out) / 'topk.csv'} and {Path(s.out) / 'contact_sheet.png'} "
          f"({len(r.queries)} queries x top {r.idx.shape[1]} of {len(r.database)})")
    report_skipped(r.skipped)
    return 0
