"""The dataset record's derived forms agree with each other and with real parsing."""

from __future__ import annotations

import pyarrow as pa
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2
from tensorflow_transform.tf_metadata import schema_utils

from schemas import dataset
from schemas.dead_letter import DeadLetter

RECORD = {
    "image_id": "ab" * 16, "uri": "gs://b/cat.jpg", "label": "cat", "label_index": 3, "split": "train",
    "image": b"\xff\xd8\xff", "format": "jpeg", "height": 8, "width": 8, "channels": 3,
    "original_height": 480, "original_width": 640, "sha256": "cd" * 32,
}


def test_example_round_trips_and_parses_with_the_feature_spec():
    serialized = dataset.DATASET_RECORD.to_tf_example(RECORD)
    assert dataset.DATASET_RECORD.from_tf_example(serialized) == RECORD
    parsed = tf.io.parse_single_example(serialized, dataset.DATASET_RECORD.feature_spec())
    assert parsed["label_index"].numpy() == 3
    assert parsed["image"].numpy() == b"\xff\xd8\xff"


def test_schema_pbtxt_converts_back_to_the_same_feature_spec():
    schema = text_format.Parse(dataset.DATASET_RECORD.metadata_schema_pbtxt(), schema_pb2.Schema())
    assert schema_utils.schema_as_feature_spec(schema).feature_spec == dataset.DATASET_RECORD.feature_spec()


def test_arrow_schema_accepts_a_record():
    table = pa.Table.from_pylist([RECORD], schema=dataset.DATASET_RECORD.arrow_schema())
    assert table.column_names == dataset.DATASET_RECORD.names
    assert table.schema.field("image").type == pa.binary()


def test_dead_letter_json_round_trip():
    letter = DeadLetter("m.csv:3", "read_manifest", "malformed_row", "expected `uri,label`")
    assert DeadLetter.from_json(letter.to_json()) == letter
