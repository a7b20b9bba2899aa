"""The TF-free Example and Schema protos are TensorFlow's and tf.Transform's own, byte for byte."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import tensorflow as tf
from tensorflow.core.example import example_pb2
from tensorflow_transform.tf_metadata import schema_utils

from schemas import dataset, embedding
from schemas.fields import Field, RecordSchema

MIXED = RecordSchema(name="mixed", fields=(
    Field("z_label", "string", "Unicode text."),
    Field("count", "int64", "A scalar int."),
    Field("scores", "float", "Repeated floats.", repeated=True),
    Field("ids", "int64", "Repeated ints, negative too.", repeated=True),
    Field("blob", "bytes", "Raw bytes."),
    Field("tags", "string", "Repeated text.", repeated=True),
    Field("a_ratio", "float", "A scalar float."),
))
MIXED_RECORD = {"z_label": "chat \u00e9t\u00e9 \u732b", "count": -7, "scores": [0.5, -1.25, 3e-8], "ids": [2**40, -3, 0],
                "blob": b"\x00\xff\xd8", "tags": [], "a_ratio": 0.1}


def tensorflow_example(schema: RecordSchema, record: dict) -> bytes:
    """The same record built with TensorFlow's own classes."""
    features = {}
    for f in schema.fields:
        values = record[f.name] if f.repeated else [record[f.name]]
        if f.kind == "int64":
            features[f.name] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        elif f.kind == "float":
            features[f.name] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
        else:
            features[f.name] = tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[v.encode("utf-8") if isinstance(v, str) else v for v in values]))
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def test_examples_are_tensorflows_bytes_and_parse_with_the_feature_spec():
    serialized = MIXED.to_tf_example(MIXED_RECORD)
    assert serialized == tensorflow_example(MIXED, MIXED_RECORD)
    assert example_pb2.Example.FromString(serialized).features.feature["count"].int64_list.value == [-7]
    parsed = tf.io.parse_single_example(serialized, MIXED.feature_spec())
    assert parsed["z_label"].numpy().decode("utf-8") == MIXED_RECORD["z_label"]
    assert tf.sparse.to_dense(parsed["ids"]).numpy().tolist() == MIXED_RECORD["ids"]
    assert math.isclose(float(parsed["a_ratio"].numpy()), 0.1, rel_tol=1e-7)
    round_trip = MIXED.from_tf_example(serialized)
    assert round_trip["scores"] == pytest.approx(MIXED_RECORD["scores"], rel=1e-7)
    assert {k: v for k, v in round_trip.items() if k not in ("scores", "a_ratio")} == {
        k: v for k, v in MIXED_RECORD.items() if k not in ("scores", "a_ratio")}


def test_tensorflows_examples_parse_here():
    assert MIXED.from_tf_example(tensorflow_example(MIXED, MIXED_RECORD))["ids"] == MIXED_RECORD["ids"]


@pytest.mark.parametrize("schema", [MIXED, dataset.DATASET_RECORD], ids=lambda s: s.name)
def test_metadata_schema_is_tf_transforms_conversion_of_the_feature_spec(schema):
    expected = schema_utils.schema_from_feature_spec(schema.feature_spec())
    for feature in expected.feature:
        feature.annotation.comment.append(schema.field(feature.name).description)
    assert schema.metadata_schema() == expected


def test_a_timestamp_field_has_no_metadata_schema():
    with pytest.raises(ValueError, match="timestamps have no tf.Example form"):
        embedding.EMBEDDING_RECORD.metadata_schema()


def test_writing_examples_and_the_schema_does_not_import_tensorflow():
    code = ("import sys; from schemas import dataset; "
            "record = dataset.DATASET_RECORD.from_tf_example(dataset.DATASET_RECORD.to_tf_example(RECORD)); "
            "dataset.DATASET_RECORD.metadata_schema_pbtxt(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_transform', 'keras')))")
    record = {f.name: (0 if f.kind == "int64" else "x") for f in dataset.DATASET_RECORD.fields}
    code = f"RECORD = {record!r}; {code}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
