"""The subset of Caffe's ``caffe.proto`` needed to read a ``.caffemodel`` and its ``.prototxt``,
built at run time with protobuf's descriptor API (no Caffe, no protoc, no generated code).

Field numbers and types follow BVLC Caffe's proto2 schema. Two deliberate departures:
- ``BlobProto.data`` is declared ``repeated bytes`` instead of ``repeated float [packed=true]``.
  A packed float field is one length-delimited record of raw little-endian float32s, exactly
  what a bytes field holds, so the weights arrive as bytes for ``np.frombuffer`` instead of
  100 million Python floats. (Caffe always writes packed floats; unpacked ones would land in
  the unknown fields, and ``blob_array`` says so.)
- Integer fields (num, channels, ..., input_dim) are int64: the same varint wire format as
  Caffe's int32, and wide enough for either.
Every other field of Caffe's messages is simply unknown here: skipped when parsing binary,
skipped with ``allow_unknown_field`` when parsing text.
"""

from __future__ import annotations

from functools import cache

import numpy as np

# V1LayerParameter.LayerType (the enum of the V1 ``layers`` field the authors' release uses).
V1_LAYER_TYPES = {
    "NONE": 0, "ABSVAL": 35, "ACCURACY": 1, "ARGMAX": 30, "BNLL": 2, "CONCAT": 3,
    "CONTRASTIVE_LOSS": 37, "CONVOLUTION": 4, "DATA": 5, "DECONVOLUTION": 39, "DROPOUT": 6,
    "DUMMY_DATA": 32, "EUCLIDEAN_LOSS": 7, "ELTWISE": 25, "EXP": 38, "FLATTEN": 8,
    "HDF5_DATA": 9, "HDF5_OUTPUT": 10, "HINGE_LOSS": 28, "IM2COL": 11, "IMAGE_DATA": 12,
    "INFOGAIN_LOSS": 13, "INNER_PRODUCT": 14, "LRN": 15, "MEMORY_DATA": 29,
    "MULTINOMIAL_LOGISTIC_LOSS": 16, "MVN": 34, "POOLING": 17, "POWER": 26, "RELU": 18,
    "SIGMOID": 19, "SIGMOID_CROSS_ENTROPY_LOSS": 27, "SILENCE": 36, "SOFTMAX": 20,
    "SOFTMAX_LOSS": 21, "SPLIT": 22, "SLICE": 33, "TANH": 23, "WINDOW_DATA": 24, "THRESHOLD": 31,
}
# V1 enum name -> the string type of the current ``layer`` field, for the types that matter here
V1_TO_TYPE = {"CONVOLUTION": "Convolution", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN"}


@cache
def net_parameter_class():
    """The ``caffe.NetParameter`` message class (built once)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    fdp = descriptor_pb2.FileDescriptorProto(name="vggnet_caffe_subset.proto", package="caffe",
                                             syntax="proto2")

    def message(name, *fields, enums=()):
        m = fdp.message_type.add(name=name)
        for fname, number, label, ftype, type_name in fields:
            f = m.field.add(name=fname, number=number, label=label, type=ftype)
            if type_name:
                f.type_name = type_name
        for ename, values in enums:
            e = m.enum_type.add(name=ename)
            for vname, v in values.items():
                e.value.add(name=vname, number=v)
        return m

    message("BlobShape", ("dim", 1, rep, F.TYPE_INT64, None))
    message("BlobProto",
            ("num", 1, opt, F.TYPE_INT64, None), ("channels", 2, opt, F.TYPE_INT64, None),
            ("height", 3, opt, F.TYPE_INT64, None), ("width", 4, opt, F.TYPE_INT64, None),
            ("data", 5, rep, F.TYPE_BYTES, None),  # packed float32s, see the module docstring
            ("shape", 7, opt, F.TYPE_MESSAGE, ".caffe.BlobShape"))
    message("InputParameter", ("shape", 1, rep, F.TYPE_MESSAGE, ".caffe.BlobShape"))
    message("LayerParameter",
            ("name", 1, opt, F.TYPE_STRING, None), ("type", 2, opt, F.TYPE_STRING, None),
            ("bottom", 3, rep, F.TYPE_STRING, None), ("top", 4, rep, F.TYPE_STRING, None),
            ("blobs", 7, rep, F.TYPE_MESSAGE, ".caffe.BlobProto"),
            ("input_param", 143, opt, F.TYPE_MESSAGE, ".caffe.InputParameter"))
    message("V1LayerParameter",
            ("bottom", 2, rep, F.TYPE_STRING, None), ("top", 3, rep, F.TYPE_STRING, None),
            ("name", 4, opt, F.TYPE_STRING, None),
            ("type", 5, opt, F.TYPE_ENUM, ".caffe.V1LayerParameter.LayerType"),
            ("blobs", 6, rep, F.TYPE_MESSAGE, ".caffe.BlobProto"),
            enums=[("LayerType", V1_LAYER_TYPES)])
    message("NetParameter",
            ("name", 1, opt, F.TYPE_STRING, None),
            ("layers", 2, rep, F.TYPE_MESSAGE, ".caffe.V1LayerParameter"),
            ("input", 3, rep, F.TYPE_STRING, None), ("input_dim", 4, rep, F.TYPE_INT64, None),
            ("input_shape", 8, rep, F.TYPE_MESSAGE, ".caffe.BlobShape"),
            ("layer", 100, rep, F.TYPE_MESSAGE, ".caffe.LayerParameter"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe.NetParameter"))


def parse_caffemodel(data: bytes):
    """Binary ``NetParameter`` (a .caffemodel) -> message. Raises ``DecodeError`` on garbage."""
    net = net_parameter_class()()
    net.ParseFromString(data)
    return net


def parse_prototxt(text: str):
    """Text-format ``NetParameter`` (a deploy .prototxt); fields outside the subset are skipped."""
    from google.protobuf import text_format

    net = net_parameter_class()()
    text_format.Parse(text, net, allow_unknown_field=True)
    return net


def layer_type(layer) -> str:
    """The current-style type string ("Convolution", "InnerProduct", ...) of a V1 or new layer."""
    if layer.DESCRIPTOR.name == "V1LayerParameter":
        name = layer.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[layer.type].name
        return V1_TO_TYPE.get(name, name)
    return layer.type


def net_layers(net) -> list:
    """The net's layers in order, from whichever field (new ``layer`` or V1 ``layers``) it uses."""
    return list(net.layer) if len(net.layer) else list(net.layers)


def blob_shape(blob) -> tuple[int, ...]:
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    return tuple(int(d) for d in (blob.num, blob.channels, blob.height, blob.width))


def blob_array(blob, where: str) -> np.ndarray:
    """A blob's float32 values in its stored shape (4-D num/channels/height/width in V1 files)."""
    shape = blob_shape(blob)
    raw = bytearray().join(blob.data)  # writable, so torch can take it without a copy
    values = np.frombuffer(raw, dtype="<f4")
    if values.size != int(np.prod(shape)):
        extra = ("" if raw else
                 " (its values are not packed float32, or it has only double_data)")
        raise ValueError(f"Caffe blob of {where} has shape {list(shape)} but {values.size} float32 "
                         f"values{extra}")
    return values.reshape(shape)
