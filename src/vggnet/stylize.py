"""Neural style transfer by optimising the image (Gatys, Ecker & Bethge, CVPR 2016).

The image starts as the content photo (or seeded noise) and is optimised, with L-BFGS or
Adam, to keep the content photo's features at ``content_layers`` and take the style image's
Gram matrices (normalised by C*H*W) at ``style_layers``, through a frozen VGG with average
pools (Gatys's choice). Each term is divided by its target's mean square, a constant during
the optimisation: the same objective as Gatys's alpha * content + beta * style, with weights
that mean the same whatever the weights' input convention (Caffe's 0-255 input makes feature
maps about 100 times larger than torchvision's, and Gram differences 10^8 times).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .backbone import Trunk, WeightsLike
from .image import load_rgb
from .losses import feature_distance, gram
from .settings import StylizeCommand, StylizeSettings


class _Objective:
    """content and style terms of an image (1, 3, H, W) in [0, 1], relative to the targets."""

    def __init__(self, trunk: Trunk, settings: StylizeSettings, content, style) -> None:
        self.trunk, self.s = trunk, settings
        with torch.no_grad():
            fc, fs = trunk(content), trunk(style)
            self.content = {k: fc[k] for k in settings.content_layers}
            self.grams = {k: gram(fs[k]) for k in settings.style_layers}
        # the targets' mean squares: the constant scale of each term (see module docstring)
        self.scale = {k: v.float().pow(2).mean().clamp_min(1e-12)
                      for k, v in (self.content | self.grams).items()}

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.trunk(image)
        content = sum(feature_distance(f[k], t, "l2").sum() / self.scale[k]
                      for k, t in self.content.items()) / len(self.content)
        style = sum(feature_distance(gram(f[k]), g, "l2").sum() / self.scale[k]
                    for k, g in self.grams.items()) / len(self.grams)
        return content, style


def stylize(content: torch.Tensor, style: torch.Tensor, weights: WeightsLike,
            settings: StylizeSettings | None = None, progress: bool = True
            ) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """The stylised image (1, 3, H, W) in [0, 1] (content's size and device) and the loss
    history (one dict per step: content, style, total, weighted). ``content`` and ``style``:
    RGB (1, 3, H, W) in [0, 1]."""
    s = settings or StylizeSettings()
    layers = list(dict.fromkeys(s.content_layers + s.style_layers))
    trunk = Trunk(weights, layers, (0.0, 1.0), s.pool).to(content.device)
    objective = _Objective(trunk, s, content, style.to(content.device))
    if s.init == "content":
        image = content.detach().clone(memory_format=torch.contiguous_format)
    else:
        gen = torch.Generator().manual_seed(s.seed)
        image = torch.rand(content.shape, generator=gen).to(content.device)
    image.requires_grad_(True)
    if s.optimizer == "lbfgs":  # one iteration per step; its history persists across steps
        opt = torch.optim.LBFGS([image], lr=1.0, max_iter=1, history_size=50)
    else:
        opt = torch.optim.Adam([image], lr=s.lr)
    history: list[dict[str, float]] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        c, st = objective(image)
        total = s.content_weight * c + s.style_weight * st
        total.backward()
        history.append({"content": c.item(), "style": st.item(), "total": total.item()})
        return total

    with tqdm(total=s.steps, desc="stylize", unit="step", disable=not progress) as bar:
        for _ in range(s.steps):
            opt.step(closure)
            with torch.no_grad():
                image.clamp_(0.0, 1.0)
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['total']:.4g}")
    return image.detach(), history


def read_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """An image file as RGB (1, 3, h, w) float in [0, 1], its longer side rescaled to ``size``."""
    im = load_rgb(path)
    scale = size / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float().contiguous() / 255


def save_image(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """(1, 3, H, W) in [0, 1] -> an 8-bit PNG (or any format Pillow infers from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (image[0].detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
    Image.fromarray(a.numpy()).save(path)
    return path


def stylize_files(content: str | os.PathLike, style: str | os.PathLike, weights: WeightsLike,
                  out: str | os.PathLike, settings: StylizeSettings | None = None,
                  device: str | torch.device = "cpu",
                  progress: bool = True) -> list[dict[str, float]]:
    """``stylize`` two image files (each at longer side ``settings.size``) into ``out``."""
    settings = settings or StylizeSettings()
    c = read_image(content, settings.size).to(device)
    st = read_image(style, settings.size)
    image, history = stylize(c, st, weights, settings, progress)
    save_image(image, out)
    return history


IMAGE_OUTPUTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def stylize_command(c: StylizeCommand) -> int:
    """``vggnet stylize``: check the output first, stylize, say how far each term fell."""
    from .checkpoint import check_writable_output
    from .runtime import pick_device
    from .weights import load_model

    check_writable_output(c.out, "stylized image", IMAGE_OUTPUTS)
    device = pick_device(c.device)
    history = stylize_files(c.content, c.style, load_model(c.weights, device), c.out, c.settings,
                            device, c.progress)
    first, last = history[0], history[-1]
    print(f"{len(history)} objective evaluations: content {first['content']:.4g} -> "
          f"{last['content']:.4g}, style {first['style']:.4g} -> {last['style']:.4g}; "
          f"wrote {c.out}")
    return 0
