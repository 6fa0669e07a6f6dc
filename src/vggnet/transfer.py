"""How layers taken from another net train: their learning rate, and which stay fixed.

A run that starts from trained weights (``--init-from``, ``vggnet finetune``) trains the
layers it copied at ``lr_factor`` times the learning rate (0.1 by default: the paper's
lr/10 for nets that start from trained ones, 1e-3 against 1e-2 from scratch) and its new
layers (a new fc8) at the learning rate; the copied layers up to ``freeze_until`` are kept
fixed. The paper's stage chaining (net A's layers in a deeper net) keeps the full rate:
"we did not decrease the learning rate for the pre-initialised layers".

A fixed layer's parameters are left out of the optimizer (no update, no weight decay), and
a fixed batch-norm layer keeps its running statistics (momentum 0) while it normalises with
the batch's own statistics in training, as any batch norm does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .fields import known_fields
from .model import VGGConfig, build

FINE_TUNE_LR_FACTOR = 0.1  # the paper's 1e-3 for nets initialised from trained ones


@dataclass(frozen=True)
class Transfer:
    """The layers a run copied from ``source``, their lr multiplier and the fixed ones; stored
    in the run's checkpoints (so a resumed run rebuilds the same optimizer groups)."""

    source: str
    copied: tuple[str, ...]  # layer names (conv1_1, bn1_1, ..., fc7)
    lr_factor: float
    frozen: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "copied": list(self.copied),
                "frozen": list(self.frozen)}

    @classmethod
    def from_dict(cls, d: dict) -> Transfer:
        d = known_fields(cls, d, "transfer keys")
        return cls(d["source"], tuple(d["copied"]), float(d["lr_factor"]),
                   tuple(d.get("frozen", ())))

    def describe(self) -> str:
        fixed = (f"{self.frozen[0]} ... {self.frozen[-1]} ({len(self.frozen)} layers)"
                 if self.frozen else "")
        if set(self.copied) <= set(self.frozen):
            return f"every copied layer fixed: {fixed}"
        text = f"copied layers train at {self.lr_factor:g} x lr"
        return text + (f"; fixed: {fixed}" if fixed else "")


def parameter_layers(model: nn.Module) -> list[str]:
    """The names of the layers that hold parameters, in order (conv1_1, bn1_1, ..., fc8)."""
    return [name for name, m in (*model.features.named_children(),
                                 *model.classifier.named_children())
            if any(True for _ in m.parameters(recurse=False))]


def check_layer_name(config: VGGConfig, until: str) -> list[str]:
    """The parameter layers of ``config``'s net (built on the meta device: nothing allocated)
    if ``until`` is one that may be kept fixed (any but fc8); else an error listing them."""
    with torch.device("meta"):
        layers = parameter_layers(build(config, init=None))
    if until not in layers or until == layers[-1]:
        raise ValueError(f"--freeze-until {until!r} is not a layer that can be kept fixed in VGG "
                         f"{config.name}; choose one of {', '.join(layers[:-1])}")
    return layers


def frozen_layers(model: nn.Module, until: str | None, copied: tuple[str, ...]) -> tuple[str, ...]:
    """The layers from the first to ``until`` (a conv takes its batch norm along), all of
    which must have been copied; an unknown or uncopied name is an error naming the choices."""
    if until is None:
        return ()
    layers = check_layer_name(model.config, until)
    end = layers.index(until) + 1
    if end < len(layers) and layers[end] == until.replace("conv", "bn"):
        end += 1
    frozen = tuple(layers[:end])
    new = [n for n in frozen if n not in copied]
    if new:
        raise ValueError(f"--freeze-until {until} would keep {', '.join(new[:5])} fixed, which "
                         "--init-from did not copy (they are freshly initialised); choose an "
                         "earlier layer")
    return frozen


def freeze(model: nn.Module, frozen: tuple[str, ...]) -> None:
    """No gradient for the ``frozen`` layers' parameters; their batch norms keep their running
    statistics."""
    modules = dict((*model.features.named_children(), *model.classifier.named_children()))
    for name in frozen:
        modules[name].requires_grad_(False)
        if isinstance(modules[name], nn.modules.batchnorm._BatchNorm):
            modules[name].momentum = 0.0  # running = (1 - 0) * running + 0 * batch


def param_groups(model: nn.Module, transfer: Transfer | None) -> list[dict]:
    """The optimizer's parameter groups, each with its "lr_scale": the copied layers (at
    ``transfer.lr_factor``) then the others (at 1), the ``freeze``d layers left out; one group at 1
    without a transfer. Empty groups are dropped; the order is the model's."""
    if transfer is None:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    copied, new = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (copied if name.split(".")[1] in transfer.copied else new).append(p)
    groups = [{"params": copied, "lr_scale": transfer.lr_factor},
              {"params": new, "lr_scale": 1.0}]
    return [g for g in groups if g["params"]]
