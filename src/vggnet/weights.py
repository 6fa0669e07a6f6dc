"""Our weights format and the one loader for every file the project writes.

A weights file is safetensors (tensors only, no code can run on load) whose header metadata
holds one JSON document under the key "vggnet":
    {"format": "vggnet.weights/1", "model_config": {...}, "preprocessing": {...},
     "class_names": [...] or null, "provenance": {...}}
Training checkpoints (``.pt``, see checkpoint.py) carry the same keys beside the optimizer
state; ``load_model`` reads either.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import atomic_write, load_checkpoint
from .model import VGG, VGGConfig, build
from .preprocess import Preprocessing

WEIGHTS_FORMAT = "vggnet.weights/1"


@dataclass
class LoadedModel:
    model: VGG
    preprocessing: Preprocessing
    class_names: list[str] | None = None
    meta: dict = field(default_factory=dict)  # everything else the file said (provenance, training settings)


def save_weights(path: str | os.PathLike, model: VGG, preprocessing: Preprocessing,
                 class_names: list[str] | None = None, provenance: dict | None = None) -> Path:
    """Write ``model`` as safetensors with its config, preprocessing and class names."""
    from safetensors.torch import save

    if class_names is not None and len(class_names) != model.config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with "
                         f"{model.config.num_classes} classes")
    meta = {"format": WEIGHTS_FORMAT, "model_config": model.config.to_dict(),
            "preprocessing": preprocessing.to_dict(), "class_names": class_names,
            "provenance": provenance or {}}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = save(tensors, metadata={"vggnet": json.dumps(meta)})
    return atomic_write(path, lambda f: f.write(data))


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def file_kind(path: str | os.PathLike) -> str:
    """"safetensors", "torch" (torch.save zip or legacy pickle), "hdf5" or "other", from the
    first bytes. safetensors is tested first: its little-endian header length may start with
    0x80, a pickle's first byte."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    return "hdf5" if head.startswith(HDF5_MAGIC) else "other"


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) from a vggnet weights file or training checkpoint."""
    path = Path(path)
    if file_kind(path) == "torch":
        ckpt = load_checkpoint(path)
        if "model_config" not in ckpt or "model" not in ckpt:
            raise ValueError(f"{str(path)!r} is a torch file but not a vggnet checkpoint (no "
                             "'model_config'/'model' keys); import foreign weights with `vggnet convert`")
        meta = {k: v for k, v in ckpt.items() if k != "model"}
        return ckpt["model"], meta
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("vggnet")
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{str(path)!r} is neither a vggnet checkpoint nor a readable safetensors "
                         f"file: {e}") from e
    if raw is None:
        raise ValueError(f"{str(path)!r} is a safetensors file without vggnet metadata; import "
                         "foreign weights with `vggnet convert`")
    return state, json.loads(raw)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model from the file alone and load its weights (strict)."""
    state, meta = read_file(path)
    config = VGGConfig.from_dict(meta["model_config"])
    model = build(config, init=None)
    load_state_checked(model, state, source=str(path))
    model.to(map_location).eval()
    prep = Preprocessing.from_dict(meta["preprocessing"]) if meta.get("preprocessing") else Preprocessing()
    rest = {k: v for k, v in meta.items() if k not in ("model_config", "preprocessing", "class_names")}
    return LoadedModel(model, prep, meta.get("class_names"), rest)


def load_state_checked(model: VGG, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load ``state`` only if every key and shape matches; otherwise leave the model untouched
    and name the first difference."""
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise ValueError(f"{source} does not match VGG {model.config.name}: "
                         + (f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "")
                         + ("; " if missing and unexpected else "")
                         + (f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}" if unexpected else ""))
    for k, v in target.items():
        if state[k].shape != v.shape:
            raise ValueError(f"{source} does not match VGG {model.config.name}: {k} has shape "
                             f"{list(state[k].shape)} in the file and {list(v.shape)} in the model")
    model.load_state_dict(state, strict=True)
