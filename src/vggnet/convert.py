"""Import public VGG weights into our model: torchvision, Keras (.h5), the authors' Caffe release.

Every reader turns its file into a ``SourceNet``: the conv layers and the three FC layers in
network order, already in PyTorch's layouts (conv weight (out, in, kh, kw); FC weight
(out, in) with fc6's input in channel-major (C, H, W) order, which is torch.flatten's and
Caffe's). The paper column, width, classes and crop size are inferred from the shapes, the
tensors get our paper names (conv3_2, fc6, ...) and ``load_state_checked`` verifies every key
and shape before a single value is copied.

Each source's input convention is recorded with the weights (see paper-notes "Public
weights"): torchvision RGB in [0, 1] with ImageNet mean/std; Keras and Caffe BGR 0-255
minus the mean pixel.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__, preprocess
from .checkpoint import check_input_file, check_writable_output, load_checkpoint
from .imagenet import NUM_CLASSES, imagenet_wnids
from .model import CFGS, VGGConfig, build, resolve_name
from .preprocess import Preprocessing
from .progress import progress_bar
from .settings import ConvertSettings
from .weights import LoadedModel, file_kind, load_model, load_state_checked, save_weights

FORMATS = ("torchvision", "keras", "caffe", "vggnet")
FC_NAMES = ("fc6", "fc7", "fc8")


@dataclass
class SourceNet:
    """A foreign file's weights in network order, in PyTorch layouts (see module docstring)."""

    format: str
    convs: list[dict[str, torch.Tensor]]  # {"weight": (out, in, kh, kw), "bias": (out,)}
    fcs: list[dict[str, torch.Tensor]]  # {"weight": (out, in), "bias": (out,)}
    preprocessing: Preprocessing
    bns: list[dict[str, torch.Tensor]] | None = None  # one per conv: BatchNorm2d state
    notes: dict = field(default_factory=dict)  # provenance details from the reader


# --- detecting and checking files ------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """"keras" (HDF5), "torch" (torch.save: torchvision state dict or vggnet checkpoint),
    "safetensors" (vggnet weights or a torchvision state dict), else "caffe" (protobuf has
    no magic number; parsing decides)."""
    kind = file_kind(path)
    return {"hdf5": "keras", "other": "caffe"}.get(kind, kind)


def file_sha256(path: str | os.PathLike, expected: str | None = None) -> str:
    """SHA-256 of a file; with ``expected`` (the full 64 hex digits or a prefix of at least 8,
    like the 8 in torchvision's file names) a mismatch is an error."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if expected is not None:
        want = expected.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{8,64}", want):
            raise ValueError(f"--sha256 must be 8 to 64 hex digits, got {expected!r}")
        if not digest.startswith(want):
            raise ValueError(f"{str(path)!r} has SHA-256 {digest}, expected {want}: the file is "
                             "corrupt, truncated or not the one you meant; download it again")
    return digest


# --- readers -----------------------------------------------------------------------------
def _optional(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"reading {what} needs the '{module.split('.')[0]}' package: "
                          "pip install 'vggnet[convert]' (h5py and protobuf)") from e


def _t(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _by_index(state: dict, prefix: str) -> dict[int, dict[str, torch.Tensor]]:
    """{"features.3.weight": w, ...} -> {3: {"weight": w}, ...} for one prefix."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        idx, _, param = rest.partition(".")
        if head == prefix and idx.isdigit() and param:
            out.setdefault(int(idx), {})[param] = v
    return dict(sorted(out.items()))


def torchvision_source(state: dict, where: str) -> SourceNet:
    """torchvision's VGG state dict: features.N (conv, [bn], relu, ..., pool) and classifier.0/3/6.

    Its adaptive 7x7 average pool before the classifier is the identity at 224x224, so the
    weights are ours with other names; fc6's input is channel-major (torch.flatten)."""
    stray = [k for k, v in state.items()
             if not (k.startswith(("features.", "classifier.")) and isinstance(v, torch.Tensor))]
    if stray:
        raise ValueError(f"{where} is not a torchvision VGG state dict: unexpected keys "
                         f"{stray[:5]} (expected only features.N.* and classifier.N.*)")
    convs, bns = [], []
    for idx, params in _by_index(state, "features").items():
        w = params.get("weight")
        if w is not None and w.ndim == 4:
            # a missing bias is reported later
            convs.append({"weight": w, "bias": params.get("bias")})
        elif "running_mean" in params:
            if len(bns) != len(convs) - 1:
                raise ValueError(f"{where}: batch norm features.{idx} does not follow a conv")
            bns.append(params)
        else:
            raise ValueError(f"{where}: features.{idx} holds {sorted(params)}, neither a conv nor "
                             "a batch norm")
    fcs = [{"weight": p["weight"], "bias": p.get("bias")}
           for p in _by_index(state, "classifier").values()
           if "weight" in p and p["weight"].ndim == 2]
    if bns and len(bns) != len(convs):
        raise ValueError(f"{where}: {len(bns)} batch norms for {len(convs)} convs")
    return SourceNet("torchvision", convs, fcs, preprocess.TORCHVISION, bns=bns or None)


def _natural_key(name: str) -> list:
    # "conv2d_10" after "conv2d_9"; "block2_conv1" after "block1_conv2"; "fc2" before "predictions"
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def read_keras(path: Path) -> SourceNet:
    """Keras VGG16/VGG19 weights, channels-last (TensorFlow ordering), in either layout:

    - Keras 2 HDF5 (``save_weights`` or ``model_weights/`` of a whole-model ``.h5``): one group
      per layer in the order of the root's ``layer_names``, datasets ``<layer>/kernel:0``,
      ``bias:0``;
    - Keras 3 ``.weights.h5``: ``layers/<name>/vars/0`` (kernel) and ``vars/1`` (bias), named
      by layer class (``conv2d``, ``conv2d_1``, ...; ``dense``, ...), whose numbering is the order.

    Conv kernels are (kh, kw, in, out), dense kernels (in, out). Keras flattens pool5 (h, w, c)
    in height-width-channel order, so fc1's input rows are permuted to our (c, h, w) order.
    """
    h5py = _optional("h5py", "Keras .h5 files")

    layers: list[tuple[str, dict[str, np.ndarray]]] = []
    with h5py.File(path, "r") as f:
        k3 = next((f[g] for g in ("layers", "_layer_checkpoint_dependencies") if g in f), None)
        if k3 is not None:
            for name in sorted(k3, key=_natural_key):
                v = k3[name].get("vars")
                if v is not None and len(v):
                    layers.append((name, {"kernel": v["0"][()],
                                          "bias": v["1"][()] if "1" in v else None}))
        else:
            root = f["model_weights"] if "model_weights" in f else f
            names = [n.decode() if isinstance(n, bytes) else str(n)
                     for n in root.attrs.get("layer_names", sorted(root, key=_natural_key))]
            for name in names:
                arrays: dict[str, np.ndarray] = {}  # "kernel" -> <layer>/<layer>/kernel:0's array

                def collect(key, obj, arrays=arrays):
                    if isinstance(obj, h5py.Dataset):
                        arrays[key.rsplit("/", 1)[-1].split(":")[0]] = obj[()]

                root[name].visititems(collect)
                if "kernel" in arrays:
                    layers.append((name, {"kernel": arrays["kernel"], "bias": arrays.get("bias")}))
    if not layers:
        raise ValueError(f"{str(path)!r} is an HDF5 file without Keras layer weights (no "
                         "'layers/*/vars' nor layer groups with kernel/bias datasets)")
    convs = [{"weight": _t(p["kernel"].transpose(3, 2, 0, 1)), "bias": _t(p["bias"])}
             for _, p in layers if p["kernel"].ndim == 4]
    dense = [(n, p) for n, p in layers if p["kernel"].ndim == 2]
    if not convs or len(dense) != 3:
        raise ValueError(f"{str(path)!r}: found {len(convs)} conv and {len(dense)} dense layers "
                         f"({', '.join(n for n, _ in layers)}); a VGG classifier file has 3 dense "
                         "layers (fc1, fc2, predictions). Files saved with include_top=False "
                         "(\"notop\") have no classifier and cannot be imported")
    fcs = [{"weight": _t(p["kernel"].T), "bias": _t(p["bias"])} for _, p in dense]
    # fc1 input rows are (h, w, c)-ordered: view (out, k, k, c) and reorder to (out, c, k, k)
    c5 = convs[-1]["weight"].shape[0]
    w = fcs[0]["weight"]
    k = math.isqrt(w.shape[1] // c5)
    if k * k * c5 != w.shape[1]:
        raise ValueError(f"{str(path)!r}: fc1 takes {w.shape[1]} inputs, not a square pool5 of "
                         f"{c5} channels")
    fcs[0]["weight"] = (w.reshape(w.shape[0], k, k, c5).permute(0, 3, 1, 2)
                        .reshape(w.shape[0], -1).contiguous())
    return SourceNet("keras", convs, fcs, preprocess.CAFFE,
                     notes={"layers": [n for n, _ in layers]})


def read_caffe(path: Path, prototxt: str | os.PathLike | None = None) -> SourceNet:
    """The authors' Caffe release (VGG_ILSVRC_16_layers.caffemodel, ...), V1 ``layers`` or
    current ``layer`` format, without Caffe. With a deploy ``.prototxt``, the prototxt defines
    the net and weights are taken from the caffemodel by layer name (as Caffe does)."""
    DecodeError = _optional("google.protobuf.message", "Caffe .caffemodel files").DecodeError

    from .caffe_proto import blob_array, layer_type, net_layers, parse_caffemodel, parse_prototxt

    try:
        net = parse_caffemodel(path.read_bytes())
    except DecodeError as e:
        raise ValueError(f"{str(path)!r} is not a weights file vggnet recognises (not torch, "
                         f"safetensors, HDF5/Keras, nor a Caffe NetParameter: {e})") from e
    weighted = {layer.name: layer for layer in net_layers(net) if len(layer.blobs)}
    if not weighted:
        raise ValueError(f"{str(path)!r} is not a weights file vggnet recognises (not torch, "
                         "safetensors, HDF5/Keras, and as a Caffe NetParameter it has no layer "
                         "with weights)")
    order = net_layers(net)
    if prototxt is not None:
        order = net_layers(parse_prototxt(Path(prototxt).read_text()))
    convs, fcs = [], []
    for layer in order:
        kind = layer_type(layer)
        if kind == "LRN":  # Caffe's LRN defaults (k=1) differ from A-LRN's (k=2); none was released
            raise ValueError(f"Caffe layer {layer.name!r} is an LRN layer; only the LRN-free "
                             "columns (A, B, C, D, E; the authors released D and E) can be "
                             "imported")
        if kind not in ("Convolution", "InnerProduct"):
            continue
        src = weighted.get(layer.name)
        if src is None:
            raise ValueError(f"layer {layer.name!r} of {str(prototxt)!r} has no weights in "
                             f"{str(path)!r} (it has: {', '.join(weighted)})")
        if len(src.blobs) != 2:
            raise ValueError(f"Caffe layer {layer.name!r} has {len(src.blobs)} blobs; expected "
                             "weights and bias")
        w = blob_array(src.blobs[0], layer.name)
        b = blob_array(src.blobs[1], layer.name).reshape(-1)
        if kind == "Convolution":
            convs.append({"weight": _t(w), "bias": _t(b)})
        else:  # V1 stores (1, 1, out, in); current files (out, in)
            fcs.append({"weight": _t(w.reshape(-1, w.shape[-1])), "bias": _t(b)})
    return SourceNet("caffe", convs, fcs, preprocess.CAFFE,
                     notes={"net_name": net.name, "prototxt": str(prototxt) if prototxt else None})


# --- from a source net to our model --------------------------------------------------------
def _conv_kernels(arch: str) -> list[int]:
    return [t[1] if isinstance(t, tuple) else 3 for t in CFGS[arch] if t not in ("M", "L")]


def infer_config(src: SourceNet, model: str | None = None) -> VGGConfig:
    """The VGGConfig the weights fit: column from the conv count and kernel sizes (or ``model``),
    width from conv1_1, classes from fc8, crop from fc6's input (pool5 of crop/32 squared)."""
    if len(src.fcs) != 3:
        raise ValueError(f"the {src.format} file has {len(src.fcs)} fully connected layers; a VGG "
                         "classifier has 3 (fc6, fc7, fc8)")
    kernels = [int(c["weight"].shape[-1]) for c in src.convs]
    fits = [a for a in CFGS if _conv_kernels(a) == kernels]
    if model is not None:
        arch, bn = resolve_name(model)
        bn = bn or src.bns is not None
        if len(_conv_kernels(arch)) != len(kernels):
            raise ValueError(f"--model {model}: VGG {arch} has {len(_conv_kernels(arch))} conv "
                             f"layers but the file has {len(kernels)}"
                             + (f" (it fits {' or '.join(fits)})" if fits else ""))
    elif not fits:
        raise ValueError(f"the {src.format} file has {len(kernels)} conv layers with kernel sizes "
                         f"{kernels}, which is no VGG column of Table 1 (A: 8, B: 10, C/D: 13, "
                         "E: 16 convs)")
    else:
        arch = fits[0]  # A rather than A-LRN: no importable file has an LRN layer
        bn = src.bns is not None
    first, c5 = src.convs[0]["weight"], int(src.convs[-1]["weight"].shape[0])
    fc6_in = int(src.fcs[0]["weight"].shape[1])
    k = math.isqrt(fc6_in // c5)
    if k < 1 or k * k * c5 != fc6_in:
        raise ValueError(f"fc6 takes {fc6_in} inputs, which is not pool5's {c5} channels times a "
                         "square k*k; the file's layers are not in VGG order")
    return VGGConfig(arch=arch, num_classes=int(src.fcs[-1]["weight"].shape[0]), batch_norm=bn,
                     width=int(first.shape[0]) / 64, crop_size=32 * k,
                     in_channels=int(first.shape[1]))


def source_state_dict(src: SourceNet, conv_names: list[str]) -> dict[str, torch.Tensor]:
    """Our keys for the source's tensors: convs in order onto ``conv_names``, then fc6-fc8."""
    state: dict[str, torch.Tensor] = {}
    for i, (name, conv) in enumerate(zip(conv_names, src.convs, strict=True)):
        state |= {f"features.{name}.{k}": v for k, v in conv.items()}
        state |= {f"features.bn{name[len('conv'):]}.{k}": v
                  for k, v in (src.bns[i] if src.bns else {}).items()}
    for name, fc in zip(FC_NAMES, src.fcs, strict=True):
        state |= {f"classifier.{name}.{k}": v for k, v in fc.items()}
    # a tensor the file lacks (None) stays out, so load_state_checked names it as missing
    return {k: v for k, v in state.items() if v is not None}


def read_source(path: str | os.PathLike,
                prototxt: str | os.PathLike | None = None) -> SourceNet | LoadedModel:
    """Read any supported file: a SourceNet for foreign weights, a LoadedModel for our own."""
    path = Path(path)
    fmt = detect_format(path)
    if prototxt is not None and fmt != "caffe":
        raise ValueError(f"--prototxt goes with a .caffemodel, but {str(path)!r} is a {fmt} file")
    if fmt == "keras":
        return read_keras(path)
    if fmt == "caffe":
        return read_caffe(path, prototxt)
    if fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            if "vggnet" in (f.metadata() or {}):
                return load_model(path)
        return torchvision_source(load_file(str(path)), repr(str(path)))
    # weights_only=True: a malicious pickle is refused here. Foreign files carry no vggnet
    # checksum (--sha256 checks them); our own are verified by load_model.
    state = load_checkpoint(path, verify=False)
    if "model_config" in state:  # our own training checkpoint
        return load_model(path)
    return torchvision_source(state, repr(str(path)))


def import_weights(path: str | os.PathLike, model: str | None = None, sha256: str | None = None,
                   prototxt: str | os.PathLike | None = None) -> LoadedModel:
    """Build our model from a torchvision, Keras or Caffe file (or our own weights/checkpoint).

    ``model`` ("D", "vgg19", "A-LRN", ...) overrides the column inferred from the file;
    ``sha256`` (hex digest or prefix) is checked before the file is parsed.
    """
    digest = file_sha256(check_input_file(path, "weights file"), sha256)
    src = read_source(path, prototxt)
    if isinstance(src, LoadedModel):
        own = (src.model.config.arch, src.model.config.batch_norm)
        if model is not None and resolve_name(model) != own:
            raise ValueError(f"--model {model} given for {str(path)!r}, a vggnet file of VGG "
                             f"{src.model.config.name}; vggnet files carry their own config")
        return src
    config = infer_config(src, model)
    net = build(config, init=None)
    conv_names = [n for n in net.layer_names() if n.startswith("conv")]
    load_state_checked(net, source_state_dict(src, conv_names), source=repr(str(path)))
    names = imagenet_wnids() if config.num_classes == NUM_CLASSES else None
    provenance = {"source_format": src.format, "source_file": Path(path).name, "sha256": digest,
                  "converted_by": f"vggnet {__version__}",
                  **{k: v for k, v in src.notes.items() if v}}
    return LoadedModel(net.eval(), src.preprocessing, names, {"provenance": provenance})


def convert(path: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
            sha256: str | None = None, prototxt: str | os.PathLike | None = None,
            progress: bool = False) -> LoadedModel:
    """``import_weights`` then write our safetensors format (config, preprocessing, classes).
    ``out`` is checked first (a .safetensors name in a writable folder), so that a bad output
    costs no conversion; a write that fails (a full disk) replaces nothing. ``progress``: a
    bar over the two steps (VGG-16's 528 MB took 24 s on a loaded 2-core machine)."""
    check_writable_output(out, "converted weights", (".safetensors",))
    with progress_bar(2, "reading, then writing", unit="step", enabled=progress) as bar:
        loaded = import_weights(path, model=model, sha256=sha256, prototxt=prototxt)
        bar.update(1)
        save_weights(out, loaded.model, loaded.preprocessing, loaded.class_names,
                     loaded.meta.get("provenance"), loaded.meta.get("localisation"))
        bar.update(1)
    return loaded


def convert_command(s: ConvertSettings) -> int:
    """``vggnet convert``: import, write, and print what the file was found to be."""
    from .imagenet import describe

    loaded = convert(s.input, s.output, model=s.model, sha256=s.sha256, prototxt=s.prototxt,
                     progress=s.progress)
    c, p = loaded.model.config, loaded.preprocessing
    prov = loaded.meta.get("provenance", {})
    print(f"{s.input}: {prov.get('source_format', 'vggnet')} weights, sha256 "
          f"{prov.get('sha256', '-')}")
    print(f"  model: VGG {c.name}, width {c.width:g}, {c.num_classes} classes, crop {c.crop_size}")
    print(f"  input: {p.channel_order}, white = {p.scale:g}, mean {list(p.mean)}, "
          f"std {list(p.std)}")
    names = loaded.class_names
    print(f"  class names: {f'{len(names)} ({describe(names[0])}, ...)' if names else 'none'}")
    print(f"wrote {s.output}")
    return 0
