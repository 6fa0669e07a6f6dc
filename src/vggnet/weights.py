"""Our weights format and the one loader for every file the project writes.

A weights file is safetensors (tensors only, no code can run on load) whose header metadata
holds one JSON document under the key "vggnet":
    {"format": "vggnet.weights/1", "model_config": {...}, "preprocessing": {...},
     "class_names": [...] or null, "provenance": {...}}
and, for a localisation net (``vggnet.localize``), "localisation": {"regression", "num_classes"}
(fc8 then regresses boxes of the ``class_names`` objects instead of scoring them)
and "checksum": {"algorithm": "sha256", "digest": ...} over the tensors and the rest of the
metadata (integrity.py). Training checkpoints (``.pt``, see checkpoint.py) carry the same keys
beside the optimizer state; ``load_model`` reads either. Whatever a file claims is checked
against the tensors it holds before a net is built from it (``check_state_fits``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import integrity
from .checkpoint import atomic_write, check_input_file, load_checkpoint
from .model import VGG, VGGConfig, build
from .preprocess import Preprocessing

WEIGHTS_FORMAT = "vggnet.weights/1"


@dataclass
class LoadedModel:
    model: VGG
    preprocessing: Preprocessing
    class_names: list[str] | None = None
    # everything else the file said (provenance, training settings)
    meta: dict = field(default_factory=dict)


def save_weights(path: str | os.PathLike, model: VGG, preprocessing: Preprocessing,
                 class_names: list[str] | None = None, provenance: dict | None = None,
                 localisation: dict | None = None) -> Path:
    """Write ``model`` as safetensors with its config, preprocessing, class names and the
    checksum of all of it (integrity.py). ``localisation``: a localisation net's
    ``LocalizerSpec.to_dict()``, whose ``num_classes`` the class names then count."""
    from safetensors.torch import save

    classes = localisation["num_classes"] if localisation else model.config.num_classes
    if class_names is not None and len(class_names) != classes:
        raise ValueError(f"{len(class_names)} class names for a model with {classes} classes")
    meta = {"format": WEIGHTS_FORMAT, "model_config": model.config.to_dict(),
            "preprocessing": preprocessing.to_dict(), "class_names": class_names,
            "provenance": provenance or {}}
    if localisation:
        meta["localisation"] = dict(localisation)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta[integrity.KEY] = integrity.record(integrity.metadata_content(meta, tensors))
    data = save(tensors, metadata={"vggnet": json.dumps(meta)})
    return atomic_write(path, lambda f: f.write(data))


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def file_kind(path: str | os.PathLike) -> str:
    """"safetensors", "torch" (torch.save zip or legacy pickle), "hdf5" or "other", from the
    first bytes. safetensors is tested first: its little-endian header length may start with
    0x80, a pickle's first byte."""
    path = check_input_file(path, "weights file")
    with open(path, "rb") as f:
        head = f.read(16)
    header_length = int.from_bytes(head[:8], "little")
    if len(head) > 8 and head[8:9] == b"{" and header_length <= path.stat().st_size - 8:
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    return "hdf5" if head.startswith(HDF5_MAGIC) else "other"


# --- what a file claims, checked against what it holds, before anything is built --------------
def state_shapes(config: VGGConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every state-dict entry of ``config``'s net, from a build on the meta
    device: no memory is allocated whatever the config says."""
    with torch.device("meta"):
        model = build(config, init=None)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def shape_difference(expected: Mapping[str, Sequence[int]], actual: Mapping[str, Sequence[int]],
                     expected_in: str = "in the model") -> str | None:
    """The first difference between two {name: shape} maps, in words; None if they agree."""
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    if missing or unexpected:
        return "; ".join(f"{what} {names[:3]}{'...' if len(names) > 3 else ''}"
                         for what, names in (("missing", missing), ("unexpected", unexpected))
                         if names)
    for k, shape in expected.items():
        if tuple(actual[k]) != tuple(shape):
            return f"{k} has shape {list(actual[k])} in the file and {list(shape)} {expected_in}"
    return None


def describe_config(c: VGGConfig) -> str:
    return (f"VGG {c.name} (width {c.width:g}, {c.num_classes} classes, crop {c.crop_size}, "
            f"{c.in_channels} input channels)")


def file_config(meta: dict, source: str) -> VGGConfig:
    """The model config a file's metadata claims, or a one-line error naming the file."""
    raw = meta.get("model_config")
    if not isinstance(raw, dict):
        raise ValueError(f"{source} has no model config in its metadata, so it is not a vggnet "
                         "weights file or checkpoint; import foreign weights with `vggnet convert`")
    try:
        return VGGConfig.from_dict(raw)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{source} claims an impossible model config ({e}); the file is damaged "
                         "or was edited") from e


def check_state_fits(config: VGGConfig, state: Mapping[str, torch.Tensor | Sequence[int]],
                     source: str, claim: str = "") -> None:
    """Refuse (ValueError) unless ``state`` (name -> tensor or shape) has exactly the keys and
    shapes of ``config``'s net. Nothing is built or allocated: call it before building a net
    from a config that came from a file, so that a small file claiming a huge net costs
    nothing. ``claim``: where the config came from, for the message."""
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)
              for k, v in state.items()}
    problem = shape_difference(state_shapes(config), shapes, expected_in="by that config")
    if problem:
        raise ValueError(f"{source} holds tensors that do not fit the {describe_config(config)} "
                         f"{claim or 'it claims'}: {problem}; refused before building anything "
                         "(the file is damaged or was edited)")


# --- reading -----------------------------------------------------------------------------------
def read_file(path: str | os.PathLike, *,
              verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) from a vggnet weights file or training checkpoint.

    The metadata's model config is checked against the tensors' shapes (read from the
    safetensors header before any data) and, with ``verify``, the content against its
    stored checksum. The metadata returned has no checksum record."""
    path = Path(path)
    source = repr(str(path))
    kind = file_kind(path)
    if kind == "hdf5":
        raise ValueError(f"{source} is a Keras HDF5 file, not vggnet weights; import it with "
                         f"`vggnet convert {path} OUT.safetensors`")
    if kind == "other":
        with open(path, "rb") as f:
            head = f.read(16)
        raise ValueError(f"{source} is neither a vggnet weights file nor a checkpoint (it begins "
                         f"{head!r}); {integrity.other_copy_hint(path)}, or import foreign weights "
                         "(Caffe) with `vggnet convert`")
    if kind == "torch":
        ckpt = load_checkpoint(path, verify=verify)
        if "model_config" not in ckpt or not isinstance(ckpt.get("model"), dict):
            raise ValueError(f"{source} is a torch file but not a vggnet checkpoint (no "
                             "'model_config'/'model' keys); import foreign weights with "
                             "`vggnet convert`")
        state = ckpt["model"]
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{source}: its 'model' entry holds things other than tensors")
        meta = {k: v for k, v in ckpt.items() if k != "model"}
        check_state_fits(file_config(meta, source), state, source)
        return state, meta
    meta, shapes = _safetensors_header(path)
    check_state_fits(file_config(meta, source), shapes, source)
    from safetensors.torch import load_file

    state = load_file(str(path))
    stored = meta.pop(integrity.KEY, None)
    if verify:
        integrity.verify(stored, integrity.metadata_content(meta, state), path)
    return state, meta


def read_metadata(path: str | os.PathLike) -> dict:
    """What a weights file or checkpoint says about itself (model config, preprocessing, class
    names, ...), with its model config checked; a safetensors file's tensors are not read."""
    path = Path(path)
    if file_kind(path) != "safetensors":
        return read_file(path)[1]
    meta, shapes = _safetensors_header(path)
    check_state_fits(file_config(meta, repr(str(path))), shapes, repr(str(path)))
    meta.pop(integrity.KEY, None)
    return meta


def _safetensors_header(path: Path) -> tuple[dict, dict[str, list[int]]]:
    """(vggnet metadata, {tensor name: shape}) from the header alone: no tensor data is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("vggnet")
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{str(path)!r} is neither a vggnet checkpoint nor a readable safetensors "
                         f"file: {e}") from e
    if raw is None:
        raise ValueError(f"{str(path)!r} is a safetensors file without vggnet metadata; import "
                         "foreign weights with `vggnet convert`")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{str(path)!r} has damaged vggnet metadata ({e}); "
                         f"{integrity.other_copy_hint(path)}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{str(path)!r} has vggnet metadata that is not a JSON object")
    return meta, shapes


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
               verify: bool = True) -> LoadedModel:
    """Rebuild the model from the file alone and load its weights (strict). Every check of
    ``read_file`` comes first: memory stays bounded by the file's size whatever it claims."""
    state, meta = read_file(path, verify=verify)
    model = build(VGGConfig.from_dict(meta["model_config"]), init=None)
    load_state_checked(model, state, source=str(path))
    model.to(map_location).eval()
    prep = (Preprocessing.from_dict(meta["preprocessing"]) if meta.get("preprocessing")
            else Preprocessing())
    rest = {k: v for k, v in meta.items()
            if k not in ("model_config", "preprocessing", "class_names")}
    return LoadedModel(model, prep, meta.get("class_names"), rest)


def require_classifier(loaded: LoadedModel, source: str | os.PathLike) -> LoadedModel:
    """``loaded`` if it scores classes; a localisation net (its outputs are boxes) is refused
    with what to use instead."""
    spec = loaded.meta.get("localisation")
    if spec:
        raise ValueError(f"{str(source)!r} is a localisation net ({spec.get('regression')} box "
                         "regression), not a classifier; use `vggnet localize evaluate|predict` "
                         "with it, or give a classifier")
    return loaded


def load_state_checked(model: VGG, state: dict[str, torch.Tensor],
                       source: str = "state dict") -> None:
    """Load ``state`` only if every key and shape matches; otherwise leave the model untouched
    and name the first difference."""
    problem = shape_difference({k: v.shape for k, v in model.state_dict().items()},
                               {k: v.shape for k, v in state.items()})
    if problem:
        raise ValueError(f"{source} does not match VGG {model.config.name}: {problem}")
    model.load_state_dict(state, strict=True)
