"""Importers: each test writes a file in the source framework's own layout from random weights,
imports it, and compares our logits with an independent implementation of that framework's
forward pass (its tensor layout, flatten order and input preprocessing) on the same pixels."""

import h5py
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from torch import nn

from vggnet import preprocess
from vggnet.cli import main
from vggnet.convert import convert, file_sha256, import_weights
from vggnet.imagenet import describe, imagenet_classes
from vggnet.weights import load_model

W = 1 / 16  # reduced width: the real layouts and key names, 1/256 of the multiply-adds
# conv widths per block of Table 1, written out independently of vggnet.model.CFGS
BLOCKS = {"A": [1, 1, 2, 2, 2], "B": [2, 2, 2, 2, 2], "D": [2, 2, 3, 3, 3], "E": [2, 2, 4, 4, 4]}
WIDTHS = [64, 128, 256, 512, 512]
BGR_MEAN = np.array([103.939, 116.779, 123.68])


def _pixels(n, h, w, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8))


def _ours(loaded, pixels):
    with torch.no_grad():
        return loaded.model(loaded.preprocessing.normalize(pixels)).double().numpy()


def _check_logits(ours, ref):
    assert ref.std() > 0.1, ("reference logits are nearly constant: "
                             "the comparison would prove nothing")
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# --- torchvision ---------------------------------------------------------------------------
class TorchvisionVGG(nn.Module):
    """torchvision.models.vgg.VGG as its source defines it: features.N, 7x7 adaptive pool,
    classifier.N."""

    def __init__(self, arch, bn, classes):
        super().__init__()
        layers, c = [], 3
        for n, width in zip(BLOCKS[arch], WIDTHS, strict=True):
            for _ in range(n):
                layers += [nn.Conv2d(c, int(width * W), 3, padding=1)]
                layers += [nn.BatchNorm2d(int(width * W))] if bn else []
                layers += [nn.ReLU(inplace=True)]
                c = int(width * W)
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        fc = int(4096 * W)
        self.classifier = nn.Sequential(nn.Linear(c * 49, fc), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(fc, fc), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(fc, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _randomize(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.normal_(0, 0.5, generator=g)
                m.weight.add_(1)
                m.running_var.uniform_(0.5, 2, generator=g)
    return net.eval()


@pytest.mark.parametrize("arch,bn", [("D", False), ("A", True)])
def test_torchvision_state_dict(tmp_path, arch, bn):
    ref = _randomize(TorchvisionVGG(arch, bn, 1000), seed=1)
    torch.save(ref.state_dict(), tmp_path / "vgg.pth")
    loaded = import_weights(tmp_path / "vgg.pth")
    c = loaded.model.config
    assert (c.arch, c.batch_norm, c.width, c.crop_size, c.num_classes) == (arch, bn, W, 224, 1000)
    assert loaded.preprocessing == preprocess.TORCHVISION
    assert loaded.class_names[0] == "n01440764" and loaded.class_names[999] == "n15075141"
    x = _pixels(2, 224, 224)
    # torchvision's input: RGB in [0, 1], ImageNet mean/std
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = ref((x.float() / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)).double().numpy()
    _check_logits(_ours(loaded, x), expected)


# --- Keras -----------------------------------------------------------------------------------
def _keras_weights(arch, size, classes, seed):
    """Random Keras VGG weights: [(name, kernel HWIO | (in, out), bias)] in model order."""
    rng = np.random.default_rng(seed)
    out, c = [], 3
    for b, (n, width) in enumerate(zip(BLOCKS[arch], WIDTHS, strict=True), 1):
        for i in range(1, n + 1):
            o = int(width * W)
            out.append((f"block{b}_conv{i}", rng.normal(0, (2 / (9 * c)) ** 0.5, (3, 3, c, o)),
                        rng.normal(0, 0.1, o)))
            c = o
    fc, flat = int(4096 * W), c * (size // 32) ** 2
    for name, i, o in (("fc1", flat, fc), ("fc2", fc, fc), ("predictions", fc, classes)):
        out.append((name, rng.normal(0, (2 / i) ** 0.5, (i, o)), rng.normal(0, 0.1, o)))
    return [(n, k.astype(np.float32), b.astype(np.float32)) for n, k, b in out]


def keras_forward(weights, pixels):
    """Keras VGG16/19 on 'caffe'-preprocessed input: NHWC, 'same' 3x3 convs, 2x2 pools,
    Flatten in (h, w, c) order, Dense layers. float64 numpy, no torch."""
    x = pixels.numpy().transpose(0, 2, 3, 1)[..., ::-1].astype(np.float64) - BGR_MEAN  # RGB->BGR
    convs = [(n, k, b) for n, k, b in weights if k.ndim == 4]
    for j, (name, k, b) in enumerate(convs):
        h, w = x.shape[1:3]
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = np.maximum(sum(xp[:, i:i + h, jj:jj + w, :] @ k[i, jj]
                           for i in range(3) for jj in range(3)) + b, 0)
        if j + 1 == len(convs) or convs[j + 1][0].split("_")[0] != name.split("_")[0]:
            n, h, w, c = x.shape
            x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    x = x.reshape(len(x), -1)
    dense = [(k, b) for _, k, b in weights if k.ndim == 2]
    for i, (k, b) in enumerate(dense):
        x = x @ k + b
        x = np.maximum(x, 0) if i < 2 else x
    return x


def _write_keras2(path, weights, whole_model):
    """Keras 2 HDF5: root (or model_weights/) attrs layer_names; <layer>/<layer>/kernel:0,
    bias:0."""
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if whole_model else f
        if whole_model:
            f.attrs["model_config"] = "{}"
            f.create_group("optimizer_weights")
        names = ["input_1"]
        for name, k, b in weights:
            names.append(name)
            g = root.create_group(name)
            g.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            g.create_dataset(f"{name}/kernel:0", data=k)
            g.create_dataset(f"{name}/bias:0", data=b)
            if name.endswith("conv1"):  # an empty group, like Keras writes for pooling layers
                root.create_group(name.replace("conv1", "pool")).attrs["weight_names"] = []
        root.create_group("input_1").attrs["weight_names"] = []
        root.attrs["layer_names"] = [n.encode() for n in names]
        root.attrs["backend"], root.attrs["keras_version"] = b"tensorflow", b"2.15.0"


def _write_keras3(path, weights):
    """Keras 3 .weights.h5: layers/<class_snake_case>[_i]/vars/0 (kernel), 1 (bias)."""
    with h5py.File(path, "w") as f:
        layers = f.create_group("layers")
        layers.create_group("input_layer").create_group("vars")
        counts = {}
        for _, k, b in weights:
            base = "conv2d" if k.ndim == 4 else "dense"
            i = counts[base] = counts.get(base, -1) + 1
            v = layers.create_group(base if i == 0 else f"{base}_{i}").create_group("vars")
            v["0"], v["1"] = k, b
        layers.create_group("max_pooling2d").create_group("vars")
        f.create_group("vars")


@pytest.mark.parametrize("layout,arch", [("keras2", "D"), ("keras2-model", "D"), ("keras3", "E")])
def test_keras_weights(tmp_path, layout, arch):
    size = 96  # pool5 3x3: fc1's (h, w, c) -> (c, h, w) row permutation is not trivial
    weights = _keras_weights(arch, size, 1000, seed=2)
    path = tmp_path / ("vgg.weights.h5" if layout == "keras3" else "vgg.h5")
    if layout == "keras3":
        _write_keras3(path, weights)
    else:
        _write_keras2(path, weights, whole_model=layout == "keras2-model")
    loaded = import_weights(path)
    c = loaded.model.config
    assert (c.arch, c.batch_norm, c.width, c.crop_size) == (arch, False, W, size)
    assert loaded.preprocessing == preprocess.CAFFE and len(loaded.class_names) == 1000
    x = _pixels(2, size, size, seed=3)
    _check_logits(_ours(loaded, x), keras_forward(weights, x))


# --- Caffe -----------------------------------------------------------------------------------
def _caffe_writer_classes():
    """NetParameter written with Caffe's own field types (packed float data, int32 dims, the
    V1 LayerType enum as its integer), independent of vggnet.caffe_proto's reading schema."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="caffe_writer.proto", package="caffe",
                                             syntax="proto2")

    def msg(name, *fields):
        m = fdp.message_type.add(name=name)
        for fname, num, label, ftype, tname in fields:
            f = m.field.add(name=fname, number=num, label=label, type=ftype)
            if tname:
                f.type_name = tname
            if fname in ("data", "dim"):
                f.options.packed = True
    OPT, REP = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    msg("BlobShape", ("dim", 1, REP, F.TYPE_INT64, None))
    msg("BlobProto", ("num", 1, OPT, F.TYPE_INT32, None), ("channels", 2, OPT, F.TYPE_INT32, None),
        ("height", 3, OPT, F.TYPE_INT32, None), ("width", 4, OPT, F.TYPE_INT32, None),
        ("data", 5, REP, F.TYPE_FLOAT, None), ("shape", 7, OPT, F.TYPE_MESSAGE, ".caffe.BlobShape"))
    msg("LayerParameter",
        ("name", 1, OPT, F.TYPE_STRING, None), ("type", 2, OPT, F.TYPE_STRING, None),
        ("bottom", 3, REP, F.TYPE_STRING, None), ("top", 4, REP, F.TYPE_STRING, None),
        ("blobs", 7, REP, F.TYPE_MESSAGE, ".caffe.BlobProto"))
    msg("V1LayerParameter",
        ("bottom", 2, REP, F.TYPE_STRING, None), ("top", 3, REP, F.TYPE_STRING, None),
        ("name", 4, OPT, F.TYPE_STRING, None), ("type", 5, OPT, F.TYPE_INT32, None),
        ("blobs", 6, REP, F.TYPE_MESSAGE, ".caffe.BlobProto"))
    msg("NetParameter", ("name", 1, OPT, F.TYPE_STRING, None),
        ("layers", 2, REP, F.TYPE_MESSAGE, ".caffe.V1LayerParameter"),
        ("input", 3, REP, F.TYPE_STRING, None), ("input_dim", 4, REP, F.TYPE_INT32, None),
        ("layer", 100, REP, F.TYPE_MESSAGE, ".caffe.LayerParameter"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe.NetParameter"))


def _caffe_net(arch, size, seed):
    """[(name, type, [arrays])] in Caffe's layouts: conv (out, in, kh, kw), fc (out, in) on a
    channel-major flatten of pool5."""
    rng = np.random.default_rng(seed)
    layers, c = [], 3
    for b, (n, width) in enumerate(zip(BLOCKS[arch], WIDTHS, strict=True), 1):
        for i in range(1, n + 1):
            o = int(width * W)
            layers.append((f"conv{b}_{i}", "CONV",
                           [rng.normal(0, (2 / (9 * c)) ** 0.5, (o, c, 3, 3)),
                            rng.normal(0, 0.1, o)]))
            layers.append((f"relu{b}_{i}", "RELU", []))
            c = o
        layers.append((f"pool{b}", "POOL", []))
    fc, flat = int(4096 * W), c * (size // 32) ** 2
    for name, i, o in (("fc6", flat, fc), ("fc7", fc, fc), ("fc8", fc, 1000)):
        layers.append((name, "FC", [rng.normal(0, (2 / i) ** 0.5, (o, i)), rng.normal(0, 0.1, o)]))
        if name != "fc8":
            layers += [(name.replace("fc", "relu"), "RELU", []),
                       (name.replace("fc", "drop"), "DROPOUT", [])]
    layers.append(("prob", "SOFTMAX", []))
    return [(n, t, [a.astype(np.float32) for a in arrays]) for n, t, arrays in layers]


def caffe_forward(layers, pixels):
    """Caffe's forward on BGR 0-255 minus the mean pixel: NCHW cross-correlation, 2x2 max pools
    (ceil mode; sizes here are even), InnerProduct on the channel-major flatten. float64 numpy."""
    x = pixels.numpy()[:, ::-1].astype(np.float64) - BGR_MEAN.reshape(1, 3, 1, 1)
    for _, kind, arrays in layers:
        if kind == "CONV":
            k, b = arrays
            h, w = x.shape[2:]
            xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
            x = sum(np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + w], k[:, :, i, j])
                    for i in range(3) for j in range(3)) + b.reshape(1, -1, 1, 1)
        elif kind == "RELU":
            x = np.maximum(x, 0)
        elif kind == "POOL":
            n, c, h, w = x.shape
            x = x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
        elif kind == "FC":
            x = x.reshape(len(x), -1) @ arrays[0].T + arrays[1]
    return x


V1_TYPES = {"CONV": 4, "RELU": 18, "POOL": 17, "FC": 14, "DROPOUT": 6, "SOFTMAX": 20}
NEW_TYPES = {"CONV": "Convolution", "RELU": "ReLU", "POOL": "Pooling", "FC": "InnerProduct",
             "DROPOUT": "Dropout", "SOFTMAX": "Softmax"}


def _write_caffemodel(path, layers, v1):
    net = _caffe_writer_classes()(name="VGG_ILSVRC_16_layers")
    for name, kind, arrays in layers:
        if v1:  # the authors' release: V1 layers, 4-D num/channels/height/width blobs
            layer = net.layers.add(name=name, type=V1_TYPES[kind])
            for a in arrays:
                dims = (1,) * (4 - a.ndim) + a.shape
                blob = layer.blobs.add(num=dims[0], channels=dims[1], height=dims[2], width=dims[3])
                blob.data.extend(a.ravel().tolist())
        else:
            layer = net.layer.add(name=name, type=NEW_TYPES[kind])
            for a in arrays:
                blob = layer.blobs.add()
                blob.shape.dim.extend(a.shape)
                blob.data.extend(a.ravel().tolist())
    path.write_bytes(net.SerializeToString())


DEPLOY_V1 = """name: "VGG_ILSVRC_16_layers"
input: "data"
input_dim: 10
input_dim: 3
input_dim: 224
input_dim: 224
{layers}
"""


@pytest.mark.parametrize("v1", [True, False])
def test_caffe_model(tmp_path, v1):
    size = 64
    layers = _caffe_net("D", size, seed=4)
    _write_caffemodel(tmp_path / "vgg.caffemodel", layers, v1)
    prototxt = None
    if v1:  # the deploy definition, in the release's V1 text format with per-layer params
        v1_type = {"CONV": "CONVOLUTION", "RELU": "RELU", "POOL": "POOLING",
                   "FC": "INNER_PRODUCT", "DROPOUT": "DROPOUT", "SOFTMAX": "SOFTMAX"}
        conv_param = ("  convolution_param {\n    num_output: 4\n    pad: 1\n"
                      "    kernel_size: 3\n  }\n")
        text = "\n".join(
            f'layers {{\n  bottom: "x"\n  top: "{n}"\n  name: "{n}"\n  type: {v1_type[k]}\n'
            + (conv_param if k == "CONV" else "")
            + "}" for n, k, _ in layers)
        prototxt = tmp_path / "deploy.prototxt"
        prototxt.write_text(DEPLOY_V1.format(layers=text))
    out = tmp_path / "vgg16.safetensors"
    convert(tmp_path / "vgg.caffemodel", out, prototxt=prototxt)
    loaded = load_model(out)
    c = loaded.model.config
    assert (c.arch, c.width, c.crop_size, c.num_classes) == ("D", W, size, 1000)
    assert loaded.preprocessing == preprocess.CAFFE
    assert loaded.meta["provenance"]["source_format"] == "caffe"
    x = _pixels(2, size, size, seed=5)
    _check_logits(_ours(loaded, x), caffe_forward(layers, x))


# --- choices, checks and errors --------------------------------------------------------------
@pytest.fixture(scope="module")
def tv_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "vgg16.pth"
    torch.save(_randomize(TorchvisionVGG("D", False, 10), seed=6).state_dict(), path)
    return path


def test_model_override_and_mismatch_errors(tv_file):
    assert import_weights(tv_file, model="vgg16").model.config.arch == "D"
    with pytest.raises(ValueError, match=r"--model E: VGG E has 16 conv layers but the file has "
                                         r"13 \(it fits D\)"):
        import_weights(tv_file, model="E")
    # C has D's conv count but 1x1 kernels: the first differing key, with both shapes
    with pytest.raises(ValueError, match=r"features.conv3_3.weight has shape \[16, 16, 3, 3\] "
                                         r"in the file and \[16, 16, 1, 1\] in the model"):
        import_weights(tv_file, model="C")


def test_sha256(tv_file, tmp_path):
    digest = file_sha256(tv_file)
    assert import_weights(tv_file, sha256=digest[:8].upper()).meta["provenance"]["sha256"] == digest
    bad = ("0" if digest[0] != "0" else "1") + digest[1:]
    assert main(["convert", str(tv_file), str(tmp_path / "o.safetensors"), "--sha256", bad]) == 2
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_cli_writes_our_format(tv_file, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    assert main(["convert", str(tv_file), str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "reading, then writing: " in captured.err  # a progress bar
    assert "torchvision" in printed and "VGG D" in printed and "RGB" in printed
    loaded = load_model(out)
    assert loaded.class_names is None and loaded.model.config.num_classes == 10  # not ImageNet
    # our own file converts to itself (same tensors)
    assert main(["convert", str(out), str(tmp_path / "again.safetensors")]) == 0
    again = load_model(tmp_path / "again.safetensors")
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])


def test_missing_tensor_is_named(tv_file, tmp_path):
    state = torch.load(tv_file, weights_only=True)
    del state["features.5.bias"]  # conv2_1 (features.0, 2 are block 1's convs, 4 its pool)
    torch.save(state, tmp_path / "no_bias.pth")
    with pytest.raises(ValueError, match=r"missing \['features.conv2_1.bias'\]"):
        import_weights(tmp_path / "no_bias.pth")


def test_unrecognised_files(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"\xff\xfe not a model")
    with pytest.raises(ValueError, match="not a weights file vggnet recognises"):
        import_weights(tmp_path / "junk.bin")
    torch.save({"state_dict": {"features.0.weight": torch.zeros(1)}}, tmp_path / "wrapped.pt")
    with pytest.raises(ValueError, match=r"not a torchvision VGG state dict: "
                                         r"unexpected keys \['state_dict'\]"):
        import_weights(tmp_path / "wrapped.pt")


def test_imagenet_classes():
    classes = imagenet_classes()
    assert len(classes) == 1000 and len({c.wnid for c in classes}) == 1000
    assert [c.wnid for c in classes] == sorted(c.wnid for c in classes)
    assert (classes[0].wnid, classes[0].name) == ("n01440764", "tench")
    assert (classes[999].wnid, classes[999].name) == ("n15075141", "toilet tissue")
    assert describe("n01440764") == "tench (n01440764)" and describe("cat") == "cat"
