"""Which pixels made the class: saliency maps and Grad-CAM for any VGG weights file.

- Saliency (Simonyan, Vedaldi & Zisserman 2013, "Deep inside convolutional networks"): the
  gradient of the class score (before the soft-max) w.r.t. the net's input, its absolute
  value's maximum over the colour channels: (N, H, W).
- Grad-CAM (Selvaraju et al. 2017): at a feature layer A (N, K, h, w), the channel weights
  alpha_k = spatial mean of dScore/dA_k and the map ReLU(sum_k alpha_k A_k): (N, h, w). The
  default layer is the last conv layer's rectified output, relu5_3 for VGG-16 (relu5_4 for
  VGG-19): the authors' own code's default (their Caffe net's in-place "conv5_3" blob is
  rectified); any feature layer may be named.

The core functions take the net's input (already preprocessed) and run the net with ReLUs
out of place, so a pre-activation tap (conv5_3) keeps its values and gradient. Crop-sized
input runs ``forward``, larger input ``forward_dense`` averaged over locations (the paper's
dense evaluation). The file front end centre-crops like ``predict``, renders the photo with
each heat map over it and the top-5 classes printed below, and saves the raw maps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import block_ends, check_layers
from .model import VGG
from .predict import top_k
from .settings import ExplainSettings
from .weights import LoadedModel

METHODS = ("gradcam", "saliency")
CAM_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image: (m - min) / (max - min + eps)


def default_cam_layer(model: VGG) -> str:
    """The last conv layer's rectified output: relu5_3 for D, relu5_4 for E."""
    return block_ends(model)[-1]


def scores_and_tap(model: VGG, x: torch.Tensor, layer: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class scores (N, classes) before the soft-max and the ``layer`` output on the way.

    The net's stages with every ReLU applied out of place (an in-place ReLU would overwrite a
    conv tap and its graph); dense (score map averaged over locations) unless the input is
    exactly crop-sized."""
    crop = model.config.crop_size
    dense = tuple(x.shape[-2:]) != (crop, crop)
    model._check_input(x, dense=dense)
    tap = None
    for name, fn in model.stages(dense):
        x = F.relu(x) if isinstance(fn, nn.ReLU) else fn(x)
        if name == layer:
            tap = x
    return (x.mean(dim=(2, 3)) if dense else x), tap


def pick_targets(scores: torch.Tensor, target: int | Sequence[int] | None) -> torch.Tensor:
    """(N,) class indices: the top class of each image (None), one class for all, or one each."""
    n, classes = scores.shape
    if target is None:
        return scores.argmax(dim=1)
    t = torch.as_tensor([target] * n if isinstance(target, int) else list(target), dtype=torch.long)
    if t.shape != (n,) or t.min() < 0 or t.max() >= classes:
        raise ValueError(f"target {target!r} must be a class index in [0, {classes}) (or one per "
                         f"image, {n} images)")
    return t.to(scores.device)


def _target_score(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # images are independent in eval mode, so d(sum of each image's own score)/d(image i)
    # is image i's own gradient
    return scores.gather(1, targets[:, None]).sum()


def saliency(model: VGG, x: torch.Tensor, target: int | Sequence[int] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps (N, H, W) = max over channels of |dScore/dx|, targets (N,)) for the net's input x."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        scores, _ = scores_and_tap(model.eval(), x)
        targets = pick_targets(scores.detach(), target)
        (grad,) = torch.autograd.grad(_target_score(scores, targets), x)
    return grad.abs().amax(dim=1), targets


def gradcam(model: VGG, x: torch.Tensor, layer: str | None = None,
            target: int | Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cams (N, h, w) = ReLU(sum_k alpha_k A_k) at ``layer``'s resolution, targets (N,))."""
    layer = layer or default_cam_layer(model)
    check_layers(model, [layer], "Grad-CAM layer")
    with torch.enable_grad():
        scores, act = scores_and_tap(model.eval(), x.detach(), layer)
        targets = pick_targets(scores.detach(), target)
        (grad,) = torch.autograd.grad(_target_score(scores, targets), act)
    alpha = grad.mean(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)
    return F.relu((alpha * act.detach()).sum(dim=1)), targets


def heatmap(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Raw maps (N, h, w) -> (N, H, W) in [0, 1], as pytorch-grad-cam's GradCAM returns them:
    min-max scaled, bilinear to ``size`` (half-pixel centres, as its cv2.resize), min-max
    scaled again (its eps matters for maps with a small maximum, so both scalings are kept)."""
    m = F.interpolate(_min_max(maps.float())[:, None], size=size, mode="bilinear",
                      align_corners=False)[:, 0]
    return _min_max(m)


def _min_max(m: torch.Tensor) -> torch.Tensor:
    """(N, h, w) -> (m - min) / (max - min + 1e-7) per map (scale_cam_image's formula)."""
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / (m.amax(dim=(1, 2), keepdim=True) + CAM_EPS)


def overlay(photo: np.ndarray, heat: np.ndarray, alpha: float = 0.5,
            cmap: str = "jet") -> np.ndarray:
    """(H, W, 3) uint8 photo with a (H, W) heat map in [0, 1] over it, coloured by ``cmap``:
    (1 - alpha) * photo + alpha * colour, uint8."""
    import matplotlib

    colour = matplotlib.colormaps[cmap](np.clip(heat, 0, 1))[..., :3] * 255
    out = (1 - alpha) * photo.astype(np.float64) + alpha * colour
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@dataclass
class Explanation:
    path: str
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (index, name, probability)
    target: int | None = None  # the class explained
    layer: str | None = None  # Grad-CAM's
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # raw maps, as computed
    photo: np.ndarray | None = None  # (H, W, 3) uint8: the crop the net saw
    error: str | None = None  # why the image could not be explained


def explain_pixels(loaded: LoadedModel, pixels: torch.Tensor, methods: Sequence[str] = METHODS,
                   layer: str | None = None, target: int | None = None, top: int = 5
                   ) -> Explanation:
    """One uint8 RGB image (1, 3, H, W) through the loaded net: the top classes, the class
    explained and each method's raw map (gradcam (h, w), saliency (H, W)), in float32."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown or list(methods)}; choose from {METHODS}")
    model = loaded.model.eval()
    device = next(model.parameters()).device
    x = loaded.preprocessing.normalize(pixels.to(device))
    with torch.no_grad():
        probs = scores_and_tap(model, x)[0].float().softmax(dim=1).cpu()
    ex = Explanation("", top=top_k(probs, loaded.class_names, top)[0],
                     photo=pixels[0].permute(1, 2, 0).cpu().numpy())
    if "gradcam" in methods:
        ex.layer = layer or default_cam_layer(model)
        cam, t = gradcam(model, x, ex.layer, target)
        ex.maps["gradcam"] = cam[0].float().cpu()
    if "saliency" in methods:
        sal, t = saliency(model, x, target)
        ex.maps["saliency"] = sal[0].float().cpu()
    ex.target = int(t[0])
    return ex


def render(ex: Explanation, path: str | os.PathLike, min_side: int = 224) -> Path:
    """A PNG: the photo, then the photo under each heat map, the top classes printed below
    (the explained class marked). Small crops are enlarged (nearest) to ``min_side``."""
    from PIL import Image, ImageDraw

    h, w = ex.photo.shape[:2]
    panels = [ex.photo] + [overlay(ex.photo, heatmap(m[None], (h, w))[0].numpy())
                           for m in ex.maps.values()]
    k = max(1, -(-min_side // min(h, w)))  # integer zoom: pixels stay square and sharp
    line = 14
    sheet = Image.new("RGB", (len(panels) * w * k, h * k + line * (len(ex.top) + 2)), "white")
    for i, p in enumerate(panels):
        sheet.paste(Image.fromarray(p).resize((w * k, h * k), Image.Resampling.NEAREST),
                    (i * w * k, 0))
    draw = ImageDraw.Draw(sheet)
    labels = ["photo"] + [m + (f" ({ex.layer})" if m == "gradcam" else "") for m in ex.maps]
    for i, label in enumerate(labels):
        draw.text((i * w * k + 4, h * k + 2), label, fill="black")
    for j, (idx, name, p) in enumerate(ex.top):
        mark = "  <- explained" if idx == ex.target else ""
        draw.text((4, h * k + line * (j + 1) + 2), f"{j + 1}. {name}  {100 * p:.1f}%{mark}",
                  fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def save_maps(ex: Explanation, path: str | os.PathLike) -> Path:
    """The raw maps as safetensors (one tensor per method), with the image, target, layer and
    top classes in the header metadata under "vggnet"."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"image": ex.path, "target": ex.target, "layer": ex.layer, "top": ex.top}
    save_file({k: v.contiguous() for k, v in ex.maps.items()}, str(path),
              metadata={"vggnet": json.dumps(meta)})
    return path


def explain_files(loaded: LoadedModel, paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                  methods: Sequence[str] = METHODS, layer: str | None = None,
                  target: int | None = None, raw: bool = False, progress: bool = True
                  ) -> list[Explanation]:
    """Explain each image's centre crop (as ``predict`` takes it) into ``out``: <stem>.png,
    and with ``raw`` <stem>.safetensors (a repeated stem gets -2, -3, ...). An image that
    cannot be decoded is skipped; its Explanation carries the error."""
    from tqdm import tqdm

    from .image import BadImageError
    from .protocol import centre_crop_resize
    from .transforms import EvalTransform, chw

    if layer is not None:
        check_layers(loaded.model, [layer], "Grad-CAM layer")
    crop = loaded.model.config.crop_size
    transform = EvalTransform(centre_crop_resize(crop), crop)
    out, used, results = Path(out), set(), []
    for path in tqdm(list(paths), desc="explain", unit="image", disable=not progress):
        try:
            pixels = chw(transform(path))
        except BadImageError as e:
            results.append(Explanation(str(path), error=str(e)))
            continue
        ex = explain_pixels(loaded, pixels, methods, layer, target)
        ex.path = str(path)
        stem, n = Path(path).stem, 1
        while (stem if n == 1 else f"{stem}-{n}") in used:
            n += 1
        name = stem if n == 1 else f"{stem}-{n}"
        used.add(name)
        render(ex, out / f"{name}.png")
        if raw:
            save_maps(ex, out / f"{name}.safetensors")
        results.append(ex)
    return results


def resolve_target(target: str | None, class_names: Sequence[str] | None,
                   num_classes: int) -> int | None:
    """``--target``: a class index, or a name among ``class_names`` (the name itself, e.g. a
    WordNet id, or its readable ImageNet name, any case); an unknown or ambiguous name is an
    error that shows some choices."""
    if target is None:
        return None
    if target.strip().lstrip("-").isdigit():
        index = int(target)
        if not 0 <= index < num_classes:
            raise ValueError(f"--target {index} is not a class index of these weights (0 to "
                             f"{num_classes - 1})")
        return index
    from .imagenet import describe

    names = list(class_names or [])
    wanted = target.strip().lower()
    hits = [i for i, n in enumerate(names)
            if wanted in (n.lower(), describe(n).split(" (")[0].lower())]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ValueError(f"--target {target!r} names {len(hits)} classes "
                         f"({', '.join(f'{i}: {describe(names[i])}' for i in hits)}); give the "
                         "index instead")
    shown = ", ".join(describe(n) for n in names[:5]) or "(the weights have no class names)"
    raise ValueError(f"--target {target!r} is not a class of these weights; give an index "
                     f"(0 to {num_classes - 1}) or a name, e.g. {shown}")


def explain_command(s: ExplainSettings) -> int:
    """``vggnet explain``: check the layer, target and output folder before any image, explain
    every image, list the ones skipped."""
    from .checkpoint import check_output_folder
    from .image import list_images
    from .runtime import pick_device
    from .weights import load_model

    check_output_folder(s.out, "explanations")
    loaded = load_model(s.weights, pick_device(s.device))
    methods = METHODS if s.method == "both" else (s.method,)
    if s.layer is not None:
        check_layers(loaded.model, [s.layer], "Grad-CAM layer")
    target = resolve_target(s.target, loaded.class_names, loaded.model.config.num_classes)
    results = explain_files(loaded, list_images(s.images), s.out, methods, s.layer, target,
                            s.raw, s.progress)
    from .imagenet import describe

    skipped = [r for r in results if r.error]
    for r in results:
        if r.error is None:
            name = describe(loaded.class_names[r.target]) if loaded.class_names else "class"
            print(f"{r.path}: {name} (class {r.target})")
    print(f"wrote {len(results) - len(skipped)} explanation(s) to {s.out}"
          + (f"; skipped {len(skipped)} image(s) that could not be decoded:" if skipped else ""))
    for r in skipped:
        print(f"  {r.error}")
    return 0 if len(skipped) < len(results) else 1
