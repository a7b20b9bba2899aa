"""Beam steps of build_index: embedding rows in, index shards and ``index_info.json`` out.

``BuildIndex`` takes ``schemas.embedding`` rows of one model_version and
writes a complete, tuned index into an (unpublished) run directory:

1. ``ToIndexRowFn`` checks each vector (dimension, NaN/inf, zero) and
   normalizes it; bad rows become dead letters with a reason code.
2. Rows are keyed by ``schemas.index.shard_for_id`` and grouped: one
   ``BuildShardFn`` call per shard, on any worker, builds and writes that
   shard (``retrieval.index_build.build_shard``). N=1 is the same code.
3. Within its shard (every row of an image_id hashes there) ``BuildShardFn``
   keeps one row per image_id (the first by uri, label, split, vector, so the
   choice never depends on arrival order); the others are dead letters
   ``duplicate_image_id``. The warehouse reader already reads the newest row
   per (image_id, model_version), so this only fires on tables written by
   other tools.
4. ``FinalizeIndexFn`` receives the list of every shard, writes the empty
   ones (no rows hashed there), tunes the fan-out search to the recall
   target and writes ``index_info.json`` (``retrieval.index_tuning``). If the
   target cannot be met it raises and the job publishes nothing.

Counters: ``read`` (by the reader), ``indexed`` (rows in shards), ``rejected``
(dead letters); read = indexed + rejected. ``check_accounting`` checks the
same equation inside the pipeline, from the rows read and the written
``IndexInfo``, before build_index publishes the run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from retrieval import index_build, index_tuning
from schemas import index as index_schema
from schemas.dead_letter import DeadLetter
from schemas.embedding import EMBEDDING, IMAGE_ID, LABEL, SPLIT, URI
from schemas.index import IndexInfo, ShardInfo
from transforms.dead_letters import METRICS_NAMESPACE

STAGE = "build_index"
INDEXED_COUNTER = "indexed"
DEAD_LETTERS = "dead_letters"


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """What the index is built from and to what standard.

    Attributes:
      run_dir: The run directory the shards and index_info.json go to.
      model_version: The version every row must have.
      dimension: The vector length every row must have.
      num_shards: Shards to partition into.
      k: Neighbours recall is measured at.
      target_recall: recall@k the tuned search must reach.
      source: The warehouse URI (recorded in index_info.json).
      model_dir: The model directory to record for query images, or None.
      query_sample_size: Held-out queries for tuning (None: 10%, at most 500).
    """

    run_dir: str
    model_version: str
    dimension: int
    num_shards: int
    k: int
    target_recall: float
    source: str
    model_dir: str | None = None
    query_sample_size: int | None = None


class UnbalancedAccountingError(RuntimeError):
    """Rows were read but neither indexed nor dead-lettered (or counted twice); nothing is published."""


def check_accounting(*, read: list[int], index_info: list[IndexInfo], **_: list[Any]) -> None:
    """build_index's check before publishing (a ``PublishWhenWritten`` check): read = indexed + rejected.

    Args:
      read: The number of rows read (one count).
      index_info: The written ``IndexInfo`` (one), whose ``count`` and ``rejected`` it checks against.

    Raises:
      UnbalancedAccountingError: The numbers differ.
    """
    (rows,), (info,) = read, index_info
    if rows != info.count + info.rejected:
        raise UnbalancedAccountingError(
            f"read {rows} != indexed {info.count} + rejected {info.rejected}; the index was not published")


def _input_ref(row: dict[str, Any]) -> str:
    return f"{row.get(IMAGE_ID)} ({row.get(URI)})"


def _letter(row: dict[str, Any], reason: str, message: str) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(DEAD_LETTERS, DeadLetter(input_ref=_input_ref(row)[:2000], stage=STAGE,
                                                             error_type=reason, message=message[:2000]))


class ToIndexRowFn(beam.DoFn):
    """Embedding row -> ``IndexRow`` with a unit vector, or a dead letter saying why it cannot be indexed.

    Only the vector is judged here (the reason codes of
    ``retrieval.index_build``); a malformed row of any other kind is a bug in
    the reader and fails the job.
    """

    def __init__(self, dimension: int):
        self._dimension = dimension

    def process(self, row: dict[str, Any]) -> Iterable[Any]:
        try:
            vector = index_build.checked_unit_vector(row[EMBEDDING], self._dimension, str(row[IMAGE_ID]))
        except index_build.InvalidVector as error:
            yield _letter(row, error.reason, str(error))
            return
        yield index_build.IndexRow(str(row[IMAGE_ID]), str(row[URI]), row[LABEL], row[SPLIT], vector)


def _row_order(row: index_build.IndexRow) -> tuple:
    return (row.uri, row.label or "", row.split or "", row.vector.tobytes())


def dedupe_image_ids(rows: Iterable[index_build.IndexRow]) -> tuple[list[index_build.IndexRow], list[Any]]:
    """One row per image_id (the first by ``_row_order``), and a dead letter for every other row."""
    by_id: dict[str, list[index_build.IndexRow]] = {}
    for row in rows:
        by_id.setdefault(row.image_id, []).append(row)
    kept, letters = [], []
    for image_id, candidates in by_id.items():
        ordered = sorted(candidates, key=_row_order)
        kept.append(ordered[0])
        letters.extend(
            _letter({IMAGE_ID: image_id, URI: extra.uri}, index_build.DUPLICATE_IMAGE_ID,
                    f"{image_id} appears {len(ordered)} times; kept the row of {ordered[0].uri}")
            for extra in ordered[1:])
    return kept, letters


# What travels through the shard grouping: plain fields and the vector's float32 bytes, which
# pickle several times faster than a dataclass holding a numpy array.
PackedRow = tuple[str, str, "str | None", "str | None", bytes]


def shard_key(row: index_build.IndexRow, num_shards: int) -> tuple[int, PackedRow]:
    packed = (row.image_id, row.uri, row.label, row.split, row.vector.astype(np.float32).tobytes())
    return index_schema.shard_for_id(row.image_id, num_shards), packed


def unpack_row(packed: PackedRow) -> index_build.IndexRow:
    image_id, uri, label, split, vector = packed
    return index_build.IndexRow(image_id, uri, label, split, np.frombuffer(vector, dtype=np.float32))


class BuildShardFn(beam.DoFn):
    """``(shard, rows)`` -> the shard written under the run directory, as its ``ShardInfo``; duplicates dead-lettered.

    All rows of one image_id hash to the same shard, so duplicates are found
    here, without a grouping by image_id of their own.
    """

    def __init__(self, spec: IndexSpec):
        self._spec = spec

    def setup(self) -> None:
        self._indexed = Metrics.counter(METRICS_NAMESPACE, INDEXED_COUNTER)

    def process(self, element: tuple[int, Iterable[PackedRow]]) -> Iterable[Any]:
        shard, rows = element
        kept, letters = dedupe_image_ids(unpack_row(row) for row in rows)
        yield from letters
        info = index_build.build_shard(self._spec.run_dir, shard, self._spec.num_shards, kept,
                                       self._spec.dimension, self._spec.k, target_recall=self._spec.target_recall)
        self._indexed.inc(info.count)
        yield info


class FinalizeIndexFn(beam.DoFn):
    """Every ``ShardInfo`` (one list) and the rejected count -> tuned ``index_info.json``; yields its IndexInfo."""

    def __init__(self, spec: IndexSpec):
        self._spec = spec

    def process(self, shards: list[ShardInfo], rejected: int) -> Iterable[Any]:
        spec = self._spec
        present = {shard.name for shard in shards}
        empty = [index_build.build_shard(spec.run_dir, number, spec.num_shards, [], spec.dimension, spec.k)
                 for number in range(spec.num_shards)
                 if index_schema.shard_name(number, spec.num_shards) not in present]
        yield index_tuning.finalize_index(
            spec.run_dir, list(shards) + empty, model_version=spec.model_version, dimension=spec.dimension,
            k=spec.k, target_recall=spec.target_recall, rejected=int(rejected), source=spec.source,
            model_dir=spec.model_dir, query_sample_size=spec.query_sample_size)


class BuildIndex(beam.PTransform):
    """Embedding rows -> a tuned, sharded index in ``spec.run_dir``.

    Returns ``(index_info, dead_letters)``: a one-element PCollection of the
    written ``IndexInfo``, and the ``DeadLetter``s of rows not indexed.
    """

    def __init__(self, spec: IndexSpec):
        super().__init__()
        self._spec = spec

    def expand(self, rows: beam.PCollection[dict[str, Any]]):
        spec = self._spec
        checked = rows | "CheckVectors" >> beam.ParDo(ToIndexRowFn(spec.dimension)).with_outputs(
            DEAD_LETTERS, main="rows")
        shards = (
            checked.rows
            | "KeyByShard" >> beam.Map(shard_key, num_shards=spec.num_shards)
            | "GroupByShard" >> beam.GroupByKey()
            | "BuildShards" >> beam.ParDo(BuildShardFn(spec)).with_outputs(DEAD_LETTERS, main="shards")
        )
        dead_letters = (checked[DEAD_LETTERS], shards[DEAD_LETTERS]) | "MergeDeadLetters" >> beam.Flatten()
        rejected = dead_letters | "CountRejected" >> beam.combiners.Count.Globally()
        info = (
            shards.shards
            | "CollectShards" >> beam.combiners.ToList()
            | "FinalizeIndex" >> beam.ParDo(FinalizeIndexFn(spec), rejected=beam.pvalue.AsSingleton(rejected))
        )
        return info, dead_letters


def _image_id(row: index_build.IndexRow) -> str:
    return row.image_id

