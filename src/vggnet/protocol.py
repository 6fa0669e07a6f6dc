"""The paper's protocol as numbers and rules, in one place (Sections 3.1, 3.2, 4.1-4.3, App. B).

Every scale the paper gives is in pixels for 224-pixel crops. A net trained at another crop
size (the ``reduced`` preset's 64 pixels) keeps the paper's ratios: each scale is multiplied
by crop / 224 (``for_crop``), so S = 256 becomes 73 at crop 64 and the S +- 32 test offsets
become +- 9. No module computes a scale from a crop size in any other way.

Pure Python on purpose: the command line reads it to build its options without importing
torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PAPER_CROP = 224  # the training crop of every net in the paper
PAPER_S = 256  # the smallest training scale; Q = 256 is also the usual centre-crop resize
SCALE_STEP = 32  # multi-scale testing at fixed S uses Q = {S - 32, S, S + 32} (Section 4.2)
# the training scales of Tables 3-6 (Smin, Smax), in paper pixels: fixed 256, fixed 384,
# and jittered [256; 512]
TRAIN_SCALES: dict[str, tuple[int, int]] = {"256": (256, 256), "384": (384, 384),
                                            "jit": (256, 512)}
TRANSFER_SCALES = (256, 384, 512)  # the transfer descriptor's Q (Appendix B)
# initialisation (Section 3.1): the paper's N(0, 0.01) for net A, Glorot (the authors' finding
# after the submission), and torchvision's He/normal mix (vggnet.initialize)
INIT_SCHEMES = ("paper", "glorot", "kaiming")

# Section 3.2 / 4.3: the evaluation methods and the passes over the data each one needs
# (their soft-max posteriors are averaged)
METHODS = ("center", "dense", "multicrop", "dense+multicrop")
PASSES: dict[str, tuple[str, ...]] = {"center": ("center",), "dense": ("dense",),
                                      "multicrop": ("multicrop",),
                                      "dense+multicrop": ("dense", "multicrop")}


def for_crop(pixels: int, crop: int) -> int:
    """A paper scale in pixels for nets trained at ``crop``: 256 -> 73 at crop 64."""
    return round(pixels * crop / PAPER_CROP)


def centre_crop_resize(crop: int) -> int:
    """The shorter side a centre crop is cut from when nothing else is known (imported
    weights, ``predict``): Q = 256/224 of the crop, i.e. 256 for 224."""
    return for_crop(PAPER_S, crop)


def train_scale(key: str, crop: int) -> tuple[int, int]:
    """One of ``TRAIN_SCALES`` for this crop: "jit" -> (73, 146) at crop 64."""
    lo, hi = TRAIN_SCALES[key]
    return for_crop(lo, crop), for_crop(hi, crop)


def default_test_scale(scale: Sequence[int]) -> int:
    """The paper's single test scale for training scale [Smin, Smax]: Q = S for a fixed S,
    the middle of the range otherwise (Q = 384 for S in [256, 512])."""
    return (int(scale[0]) + int(scale[1])) // 2


def default_test_scales(train_settings: Mapping | None, crop: int,
                        multi_scale: bool = False) -> tuple[int, ...]:
    """The paper's test scales for a net trained at ``train_settings["scale"]``.

    Fixed S: Q = S, or {S-32, S, S+32}. Jittered S: Q = (Smin+Smax)/2, or {Smin, mid, Smax}.
    The step 32 scales with the crop (9 for 64 crops). A file without training settings
    (imported weights) gets ``centre_crop_resize``. Scales below the crop are raised to it
    (S - 32 is the crop itself in the paper).
    """
    if train_settings and train_settings.get("scale"):
        smin, smax = (int(s) for s in train_settings["scale"])
    else:
        smin = smax = centre_crop_resize(crop)
    if smin == smax:
        step = max(1, for_crop(SCALE_STEP, crop))
        scales = (smin - step, smin, smin + step) if multi_scale else (smin,)
    else:
        mid = default_test_scale((smin, smax))
        scales = (smin, mid, smax) if multi_scale else (mid,)
    return tuple(sorted({max(crop, q) for q in scales}))


def transfer_scales(crop: int) -> list[int]:
    """The transfer descriptor's Q = {256, 384, 512} for a 224 crop, scaled for others."""
    return [for_crop(q, crop) for q in TRANSFER_SCALES]


# --- training presets ------------------------------------------------------------------------
# The paper's recipe, and the same recipe scaled down for CPUs and small datasets: the ratios
# are kept (S = 256/224 of the crop, jitter range [S, 2S], 5 pools, 3 FC layers, dropout), and
# so are batch 256 and lr 1e-2: a smaller batch at the same lr (4x the step noise per image)
# kills most fc6/fc7 ReLUs in the first epochs of a narrow net, and the run never leaves
# chance level. Small datasets have few steps per epoch and a long initial plateau, hence
# more patience. Values not named here are ``TrainSettings``' defaults (the paper's).
REDUCED_CROP = 64
PRESETS: dict[str, dict] = {
    "paper": dict(width=1.0, crop_size=PAPER_CROP, scale=(PAPER_S, PAPER_S), batch_size=256,
                  lr=1e-2, epochs=74, lr_patience=2, lr_drops=3, stats_images=10_000),
    "reduced": dict(width=0.125, crop_size=REDUCED_CROP, scale=train_scale("256", REDUCED_CROP),
                    batch_size=256, lr=1e-2, epochs=30, lr_patience=5, lr_drops=3,
                    stats_images=2_000),
}


# --- localisation (Appendix A) ----------------------------------------------------------------
REGRESSIONS = ("single-class", "per-class")  # SCR: one box for every class; PCR: one per class
FINETUNE = ("all", "fc")  # fc: fc6, fc7 and the box regressor only (OverFeat's choice)
LOCALISATION_PROTOCOLS = (1, 2)  # Table 8: central crop, true class; Table 9: dense, top-5
# Localisation runs: the classifier's net at a fixed S, with these on top of the training
# preset. The paper: lr 1e-3 (Section A.1); its epochs are not given, so the plateau schedule
# decides. Reduced: lr 0.05, because boxes encoded in [0, 1] give small losses and gradients:
# after 4 epochs lr 1e-3 was at 89.1% protocol-1 error (a constant box: 88.5%), 0.05 at 62.6%
# (docs/localisation.md). Batch 64 as the reduced classification study (batch norm nets).
LOCALISATION_PRESETS: dict[str, dict] = {
    "paper": dict(lr=1e-3, batch_size=256, epochs=74, lr_patience=2),
    "reduced": dict(lr=0.05, batch_size=64, epochs=4, lr_patience=5),
}
