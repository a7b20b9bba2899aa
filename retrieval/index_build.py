"""Building one index shard: checking vectors, choosing ScaNN parameters by size, writing the shard files.

No Beam here: ``beam_jobs.build_index`` runs ``build_shard`` once per shard
in parallel workers, and ``build_index_in_process`` runs the same steps in
one process (benchmarks, near-duplicate tests, small tools). The directory
layout is ``schemas.index``'s.

Parameters follow ScaNN's own guidance, sized per shard:

- up to ``BRUTE_FORCE_MAX_ROWS`` rows: brute force (exact; nothing to tune);
- up to ``AH_MAX_ROWS``: asymmetric hashing over every point plus exact
  re-scoring of the best candidates (the re-scoring depth is tuned);
- above: a k-means tree with about sqrt(n) leaves in front of AH + re-scoring
  (leaves searched and re-scoring depth are tuned). Measured on 1M clustered
  vectors, ScaNN's defaults (2,000 leaves trained on a 100k sample with
  ``min_partition_size=50``) built poor leaves; a training sample of
  ``TRAINING_POINTS_PER_LEAF`` points per leaf and ``min_partition_size=10``
  fixed most of it, so those are the defaults here, and a tree shard is
  built with a small grid of training samples and ``min_partition_size``
  values around them, keeping the fastest at the recall target
  (``build_searcher``).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import shutil
import tempfile
import time
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from schemas import index as index_schema
from schemas.embedding import IMAGE_ID, LABEL, SPLIT, URI
from schemas.index import ID_MAP_RECORD, PartitionTrial, ScannParams, ShardInfo

BRUTE_FORCE_MAX_ROWS = 10_000
AH_MAX_ROWS = 50_000
TRAINING_POINTS_PER_LEAF = 100
MIN_PARTITION_SIZE = 10
DEFAULT_TARGET_RECALL = 0.95  # build_index's --target_recall default.
AH_DIMENSIONS_PER_BLOCK = 2
AH_THRESHOLD = 0.2
ZERO_NORM = 1e-12

# Dead-letter reason codes of vectors that cannot be indexed.
WRONG_DIMENSION = "wrong_dimension"
NON_FINITE_VECTOR = "non_finite_vector"
ZERO_VECTOR = "zero_vector"
DUPLICATE_IMAGE_ID = "duplicate_image_id"


class InvalidVector(ValueError):
    """A vector that cannot be indexed; ``reason`` is one of the reason codes above."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def checked_unit_vector(embedding: Sequence[float], dimension: int, image_id: str = "") -> np.ndarray:
    """The embedding as a float32 unit vector, or InvalidVector saying why it cannot be indexed.

    Vectors are normalized here (they should already be unit length), so
    the dot product every index scores with is the cosine similarity.

    Raises:
      InvalidVector: Wrong length, NaN/inf, or zero norm.
    """
    vector = np.asarray(embedding if embedding is not None else [], dtype=np.float64).reshape(-1)
    if vector.shape[0] != dimension:
        raise InvalidVector(WRONG_DIMENSION, f"{image_id}: embedding has {vector.shape[0]} values; "
                                             f"the index has dimension {dimension}")
    if not np.all(np.isfinite(vector)):
        raise InvalidVector(NON_FINITE_VECTOR, f"{image_id}: embedding holds NaN or infinite values")
    norm = float(np.linalg.norm(vector))
    if norm <= ZERO_NORM:
        raise InvalidVector(ZERO_VECTOR, f"{image_id}: embedding is the zero vector (no direction to compare)")
    return (vector / norm).astype(np.float32)


def choose_params(count: int, dimension: int) -> ScannParams:
    """ScaNN parameters for a shard of ``count`` vectors (see the module docstring).

    Raises:
      ValueError: ``count`` < 1 or ``dimension`` < 1.
    """
    if count < 1 or dimension < 1:
        raise ValueError(f"need count >= 1 and dimension >= 1. Received `count={count}`, `dimension={dimension}`")
    if count <= BRUTE_FORCE_MAX_ROWS:
        return ScannParams(algorithm="brute_force")
    # AH codes need at least one block; odd dimensions put the remainder in the last block.
    per_block = min(AH_DIMENSIONS_PER_BLOCK, dimension)
    ah = dict(dimensions_per_block=per_block, anisotropic_quantization_threshold=AH_THRESHOLD, reorder_default=100)
    if count <= AH_MAX_ROWS:
        return ScannParams(algorithm="ah", **ah)
    num_leaves = max(2, int(round(math.sqrt(count))))
    return ScannParams(
        algorithm="tree_ah",
        num_leaves=num_leaves,
        training_sample_size=min(count, TRAINING_POINTS_PER_LEAF * num_leaves),
        min_partition_size=MIN_PARTITION_SIZE,
        spherical=True,
        leaves_to_search_default=max(1, num_leaves // 20),
        **ah,
    )


@dataclasses.dataclass(frozen=True)
class IndexRow:
    """One row to index: its id map entry and its unit vector."""

    image_id: str
    uri: str
    label: str | None
    split: str | None
    vector: np.ndarray = dataclasses.field(repr=False, compare=False)

    def id_map_entry(self) -> dict[str, Any]:
        return {IMAGE_ID: self.image_id, URI: self.uri, LABEL: self.label, SPLIT: self.split}


def _write_bytes(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def _read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()


def _copy_tree_to(local_dir: str, target_dir: str) -> None:
    """Copies a local directory's files to ``target_dir`` (local or gs://)."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            source = os.path.join(root, name)
            relative = os.path.relpath(source, local_dir)
            with open(source, "rb") as handle:
                _write_bytes(FileSystems.join(target_dir, *relative.split(os.sep)), handle.read())


def build_shard(index_dir: str, shard: int, num_shards: int, rows: Iterable[IndexRow], dimension: int, k: int,
                *, target_recall: float = DEFAULT_TARGET_RECALL, sweep_partitions: bool = True,
                training_threads: int = 0) -> ShardInfo:
    """Builds and writes one shard: ScaNN searcher, id map and vectors, rows sorted by image_id.

    Sorting makes the shard a function of its rows, whatever order they
    arrived in, so two builds from the same rows are identical.

    Args:
      index_dir: The (unpublished) run directory, local or gs://.
      shard: This shard's number.
      num_shards: How many shards the index has.
      rows: The shard's rows (unique image_ids, unit vectors of ``dimension``).
      dimension: Vector length (used for an empty shard's vectors file).
      k: Default neighbours of the searcher.
      target_recall: recall@k a tree's partitioning is chosen for (``build_searcher``).
      sweep_partitions: Whether to choose a tree's partitioning (``build_searcher``).
      training_threads: ScaNN training threads (0: ScaNN's choice).

    Returns:
      The shard's entry of ``index_info.json``.

    Raises:
      ValueError: Two rows share an image_id (the caller must dead-letter duplicates first).
    """

    ordered = sorted(rows, key=lambda row: row.image_id)
    ids = [row.image_id for row in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError(f"shard {shard} received duplicate image_ids; duplicates must be dead-lettered first")
    name = index_schema.shard_name(shard, num_shards)
    vectors = (np.stack([row.vector for row in ordered]).astype(np.float32) if ordered
               else np.zeros((0, dimension), np.float32))
    table = pa.Table.from_pylist([row.id_map_entry() for row in ordered], schema=ID_MAP_RECORD.arrow_schema())
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    _write_bytes(index_schema.id_map_path(index_dir, name), buffer.getvalue())
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    _write_bytes(index_schema.vectors_path(index_dir, name), buffer.getvalue())
    if not ordered:
        return ShardInfo(name=name, count=0, params=None)
    started = time.monotonic()
    searcher, trials = build_searcher(vectors, ids, k, target_recall=target_recall,
                                      sweep_partitions=sweep_partitions, training_threads=training_threads)
    params = searcher.params
    seconds = time.monotonic() - started
    target = index_schema.scann_dir(index_dir, name)
    if "://" in index_dir:
        local = tempfile.mkdtemp(prefix="scann-shard-")
        try:
            searcher.save(local)
            _copy_tree_to(local, target)
        finally:
            shutil.rmtree(local, ignore_errors=True)
    else:
        os.makedirs(target, exist_ok=True)
        searcher.save(target)
    return ShardInfo(name=name, count=len(ordered), params=params, build_seconds=round(seconds, 3),
                     partition_trials=trials)


def build_searcher(vectors: np.ndarray, ids: Sequence[str], k: int, *, target_recall: float = DEFAULT_TARGET_RECALL,
                   sweep_partitions: bool = True, training_threads: int = 0) -> tuple[Any, list[PartitionTrial]]:
    """A ScaNN searcher for one shard, and the tree partitionings tried for it (empty unless a tree).

    Brute force and AH are built as ``choose_params`` says. For a tree, a
    small grid of training samples and ``min_partition_size`` values is
    compared first and the AH searcher is built on the one that searches
    fastest at ``target_recall`` (``retrieval.index_tuning.choose_partitioning``);
    ``sweep_partitions=False`` keeps ``choose_params``' partitioning (benchmarks
    measure what the sweep buys with it).
    """
    from retrieval import index_tuning, scann_compat

    params = choose_params(len(vectors), vectors.shape[1])
    trials: list[PartitionTrial] = []
    if params.algorithm == "tree_ah" and sweep_partitions:
        params, trials = index_tuning.choose_partitioning(
            vectors, ids, params, k, target_recall,
            lambda candidate: scann_compat.build_partition_probe(vectors, candidate, k,
                                                                 training_threads=training_threads))
    return scann_compat.build(vectors, params, k, training_threads=training_threads), trials


def read_id_map(index_dir: str, name: str) -> list[dict[str, Any]]:
    """A shard's id map rows (``ID_MAP_RECORD`` dicts), row i = ScaNN datapoint i."""
    table = pq.read_table(pa.BufferReader(_read_bytes(index_schema.id_map_path(index_dir, name))))
    return table.to_pylist()


def read_vectors(index_dir: str, name: str) -> np.ndarray:
    """A shard's vectors, float32 [count, dimension]."""
    return np.load(io.BytesIO(_read_bytes(index_schema.vectors_path(index_dir, name))), allow_pickle=False)


def copy_scann_dir_to_local(index_dir: str, name: str, local_dir: str) -> None:
    """Copies a shard's ScaNN files to a local directory (ScaNN loads only from local paths)."""
    source = index_schema.scann_dir(index_dir, name).rstrip("/") + "/"
    matches = FileSystems.match([FileSystems.join(source, "**")])[0].metadata_list
    for match in matches:
        relative = match.path[len(source):]
        destination = os.path.join(local_dir, *relative.split("/"))
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        with open(destination, "wb") as handle:
            handle.write(_read_bytes(match.path))
