"""A record layout declared once, from which every other form is derived.

Each data contract in this package (dataset example, prediction, embedding row)
is a ``RecordSchema``: an ordered list of ``Field``s. The tf.train.Example
feature spec, the tensorflow_metadata schema, the Arrow schema and the BigQuery
schema are all computed from that one list, so they can never drift apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

import pyarrow as pa

from schemas import tf_example

FieldKind = Literal["bytes", "string", "int64", "float", "timestamp"]

_ARROW_TYPES: dict[str, pa.DataType] = {
    "bytes": pa.binary(),
    "string": pa.string(),
    "int64": pa.int64(),
    "float": pa.float32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}
_BIGQUERY_TYPES = {
    "bytes": "BYTES",
    "string": "STRING",
    "int64": "INT64",
    "float": "FLOAT64",
    "timestamp": "TIMESTAMP",
}


@dataclasses.dataclass(frozen=True)
class Field:
    """One column of a record.

    Attributes:
      name: Column / feature key.
      kind: Logical type; ``string`` is UTF-8 text, ``bytes`` is opaque.
      repeated: True for a variable-length list of ``kind`` values.
      nullable: Whether the value may be absent (Arrow/BigQuery NULLABLE).
      description: Why the column exists; copied into BigQuery descriptions.
    """

    name: str
    kind: FieldKind
    description: str
    repeated: bool = False
    nullable: bool = False

    def arrow_type(self) -> pa.DataType:
        base = _ARROW_TYPES[self.kind]
        return pa.list_(base) if self.repeated else base

    def bigquery_field(self) -> dict[str, str]:
        mode = "REPEATED" if self.repeated else ("NULLABLE" if self.nullable else "REQUIRED")
        return {
            "name": self.name,
            "type": _BIGQUERY_TYPES[self.kind],
            "mode": mode,
            "description": self.description,
        }


@dataclasses.dataclass(frozen=True)
class RecordSchema:
    """An ordered set of fields with derived schemas for every storage format."""

    name: str
    fields: tuple[Field, ...]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name!r}; fields are {self.names}")

    def arrow_schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(f.name, f.arrow_type(), nullable=f.nullable or f.repeated) for f in self.fields]
        )

    def bigquery_schema(self) -> dict[str, list[dict[str, str]]]:
        """The schema in the JSON form accepted by ``WriteToBigQuery(schema=...)``."""
        return {"fields": [f.bigquery_field() for f in self.fields]}

    def feature_spec(self) -> dict[str, Any]:
        """``tf.io`` parsing spec; scalars are FixedLen, repeated fields VarLen."""
        import tensorflow as tf  # Imported lazily: schemas must stay cheap to import.

        dtypes = {
            "bytes": tf.string,
            "string": tf.string,
            "int64": tf.int64,
            "float": tf.float32,
        }
        spec: dict[str, Any] = {}
        for f in self.fields:
            if f.kind == "timestamp":
                raise ValueError(f"{self.name}.{f.name}: timestamps have no tf.Example form")
            if f.repeated:
                spec[f.name] = tf.io.VarLenFeature(dtypes[f.kind])
            else:
                spec[f.name] = tf.io.FixedLenFeature([], dtypes[f.kind])
        return spec

    def to_tf_example(self, record: Mapping[str, Any]) -> bytes:
        """Serializes a dict with exactly this schema's keys to a tf.train.Example (without TensorFlow)."""
        missing = [n for n in self.names if n not in record]
        if missing:
            raise ValueError(f"{self.name} record lacks fields {missing}")
        example = tf_example.Example()
        features = example.features.feature
        for f in self.fields:
            value = record[f.name]
            values = list(value) if f.repeated else [value]
            if f.kind == "int64":
                features[f.name].int64_list.value.extend(int(v) for v in values)
            elif f.kind == "float":
                features[f.name].float_list.value.extend(float(v) for v in values)
            else:
                features[f.name].bytes_list.value.extend(
                    v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values)
        return example.SerializeToString(deterministic=True)

    def from_tf_example(self, serialized: bytes) -> dict[str, Any]:
        """Parses a serialized tf.train.Example back into a dict of this schema's fields."""
        example = tf_example.Example.FromString(serialized)
        record: dict[str, Any] = {}
        for f in self.fields:
            feature = example.features.feature[f.name]
            if f.kind == "int64":
                values: list[Any] = list(feature.int64_list.value)
            elif f.kind == "float":
                values = list(feature.float_list.value)
            elif f.kind == "string":
                values = [v.decode("utf-8") for v in feature.bytes_list.value]
            else:
                values = list(feature.bytes_list.value)
            record[f.name] = values if f.repeated else values[0]
        return record

    def metadata_schema(self) -> Any:
        """The tensorflow_metadata ``Schema`` proto that tf.Transform and TFDV consume.

        The one tf.Transform's ``schema_from_feature_spec(self.feature_spec())``
        makes (a test holds them equal), built without importing TensorFlow.
        """
        timestamps = [f.name for f in self.fields if f.kind == "timestamp"]
        if timestamps:
            raise ValueError(f"{self.name}.{timestamps[0]}: timestamps have no tf.Example form")
        return tf_example.metadata_schema((f.name, f.kind, f.repeated, f.description) for f in self.fields)

    def metadata_schema_pbtxt(self) -> str:
        """``metadata_schema`` in protobuf text format (the ``schema.pbtxt`` file)."""
        from google.protobuf import text_format

        return text_format.MessageToString(self.metadata_schema())
