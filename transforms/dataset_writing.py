"""Writing dataset records as sharded, gzipped TFRecords per split."""

from __future__ import annotations

from typing import Any

import apache_beam as beam

from schemas import dataset, layout


def serialize_record(record: dict[str, Any]) -> tuple[str, bytes]:
    """(split, serialized tf.train.Example) for one dataset record."""
    return record[dataset.SPLIT], dataset.DATASET_RECORD.to_tf_example(record)


class WriteDatasetSplits(beam.PTransform):
    """Writes ``{split}-SSSSS-of-NNNNN.tfrecord.gz`` for every configured split.

    Returns ``(examples, written)``: a dict of split name -> PCollection of
    serialized examples, so the caller can analyze the train split without
    reading the files back, and the names of every written shard, complete
    only once all splits are finalized (what a job publishes its run after).
    Every split gets at least one (possibly empty) shard, so readers can tell
    an empty split from a missing one.
    """

    def __init__(self, output_dir: str, split_names: tuple[str, ...], num_shards: int = 0):
        super().__init__()
        if num_shards < 0:
            raise ValueError(f"num_shards must be >= 0 (0 = automatic). Received `num_shards={num_shards}`")
        self._output_dir = output_dir
        self._split_names = split_names
        self._num_shards = num_shards

    def _partition(self, element: tuple[str, bytes], num_partitions: int) -> int:
        return self._split_names.index(element[0])

    def expand(
        self, records: beam.PCollection[dict[str, Any]]
    ) -> tuple[dict[str, beam.PCollection[bytes]], beam.PCollection[str]]:
        keyed = records | "SerializeExamples" >> beam.Map(serialize_record)
        parts = keyed | "PartitionBySplit" >> beam.Partition(self._partition, len(self._split_names))
        by_split: dict[str, beam.PCollection[bytes]] = {}
        shards: list[beam.PCollection[str]] = []
        for name, part in zip(self._split_names, parts):
            examples = part | f"DropSplitKey[{name}]" >> beam.Values()
            shards.append(examples | f"WriteShards[{name}]" >> beam.io.WriteToTFRecord(
                layout.split_prefix(self._output_dir, name),
                file_name_suffix=layout.TFRECORD_SUFFIX,
                num_shards=self._num_shards,
            ))
            by_split[name] = examples
        return by_split, tuple(shards) | "FlattenWrittenShards" >> beam.Flatten()
