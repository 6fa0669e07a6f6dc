"""Folding eval-mode batch norm into the convolution before it (inference only): what both
of the CPU inference convolutions (``fuse.PackedConv2d``, ``winograd.WinogradConv2d``) run."""

from __future__ import annotations

import torch
from torch import nn


def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) in float32 of conv followed by eval-mode ``bn``: the same function up to
    float rounding. weight (O, I, kh, kw) scaled per output channel by gamma / sqrt(var + eps)."""
    w = conv.weight.detach().float()
    b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(w.shape[0])
    if bn is None:
        return w, b
    scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
    shift = bn.bias.detach().float() - bn.running_mean.float() * scale
    return w * scale[:, None, None, None], b * scale + shift
