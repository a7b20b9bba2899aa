"""``tf.train.Example`` and the tf.Transform schema proto, without importing TensorFlow.

create_dataset writes every record as a ``tf.train.Example``, and its
``schema.pbtxt`` is a ``tensorflow_metadata`` Schema. Getting the Example
classes from ``tensorflow.core.example`` imports all of TensorFlow (about 6 s
and 0.5 GiB per process, on every worker), and the schema from tf.Transform's
converter does too, although a ``--skip_analysis`` run never runs a TF op.

So the Example messages are declared here from TensorFlow's own
``feature.proto``/``example.proto`` (same package, message names and field
numbers) in a private descriptor pool, which cannot clash with TensorFlow's
when both are loaded in one process. The wire format is the proto's, so the
bytes are TensorFlow's bytes: ``tests/schemas/test_tf_example.py`` checks
them, and the schema proto, against TensorFlow and tf.Transform themselves.
"""

from __future__ import annotations

from typing import Any, Iterable

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from tensorflow_metadata.proto.v0 import schema_pb2

_PACKAGE = "tensorflow"
_LABEL_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_LABEL_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
_TYPE_BYTES = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
_TYPE_FLOAT = descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT
_TYPE_INT64 = descriptor_pb2.FieldDescriptorProto.TYPE_INT64
_TYPE_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_TYPE_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE


def _add_field(message: descriptor_pb2.DescriptorProto, name: str, number: int, label: int, kind: int,
               type_name: str | None = None, oneof_index: int | None = None) -> None:
    field = message.field.add(name=name, number=number, label=label, type=kind)
    if type_name:
        field.type_name = f".{_PACKAGE}.{type_name}"
    if oneof_index is not None:
        field.oneof_index = oneof_index


def _example_file() -> descriptor_pb2.FileDescriptorProto:
    """``tensorflow/core/example/{feature,example}.proto`` as one proto3 file (repeated scalars packed)."""
    file = descriptor_pb2.FileDescriptorProto(name="vision_pipelines/tf_example.proto", package=_PACKAGE,
                                              syntax="proto3")
    for name, kind in (("BytesList", _TYPE_BYTES), ("FloatList", _TYPE_FLOAT), ("Int64List", _TYPE_INT64)):
        _add_field(file.message_type.add(name=name), "value", 1, _LABEL_REPEATED, kind)
    feature = file.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate(
            (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")), start=1):
        _add_field(feature, name, number, _LABEL_OPTIONAL, _TYPE_MESSAGE, type_name, oneof_index=0)
    features = file.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    _add_field(entry, "key", 1, _LABEL_OPTIONAL, _TYPE_STRING)
    _add_field(entry, "value", 2, _LABEL_OPTIONAL, _TYPE_MESSAGE, "Feature")
    _add_field(features, "feature", 1, _LABEL_REPEATED, _TYPE_MESSAGE, "Features.FeatureEntry")
    _add_field(file.message_type.add(name="Example"), "features", 1, _LABEL_OPTIONAL, _TYPE_MESSAGE, "Features")
    return file


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_example_file())


def _message_class(name: str) -> Any:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.{name}"))


Example = _message_class("Example")

# Field kinds (``schemas.fields``) to the Schema's feature types, as tf.Transform maps tf.io dtypes.
_SCHEMA_TYPES = {"bytes": schema_pb2.BYTES, "string": schema_pb2.BYTES, "int64": schema_pb2.INT,
                 "float": schema_pb2.FLOAT}


def metadata_schema(features: Iterable[tuple[str, str, bool, str]]) -> schema_pb2.Schema:
    """The Schema tf.Transform's ``schema_from_feature_spec`` makes, from ``(name, kind, repeated, comment)``.

    Features sorted by name, as the converter writes them. A scalar
    (``tf.io.FixedLenFeature([])``) is present in every record with an empty
    shape; a repeated field (``tf.io.VarLenFeature``) has neither.
    """
    schema = schema_pb2.Schema()
    for name, kind, repeated, comment in sorted(features):
        feature = schema.feature.add(name=name, type=_SCHEMA_TYPES[kind])
        if not repeated:
            feature.presence.min_fraction = 1.0
            feature.shape.SetInParent()
        feature.annotation.comment.append(comment)
    return schema
