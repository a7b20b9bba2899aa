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
  fixed most of it, so those are the defaults here, and a tree whose leaves
  still hold too few of the neighbours is retrained on every point
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
from schemas.index import ID_MAP_RECORD, ScannParams, ShardInfo

BRUTE_FORCE_MAX_ROWS = 10_000
AH_MAX_ROWS = 50_000
TRAINING_POINTS_PER_LEAF = 100
PARTITION_CHECK_QUERIES = 200
PARTITION_RECALL_FLOOR = 0.9
MIN_PARTITION_SIZE = 10
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
                *, training_threads: int = 0) -> ShardInfo:
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
    searcher = build_searcher(vectors, ids, k, training_threads=training_threads)
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
    return ShardInfo(name=name, count=len(ordered), params=params, build_seconds=round(seconds, 3))


def partition_recall(searcher: Any, vectors: np.ndarray, ids: Sequence[str], k: int) -> float:
    """How well a tree's leaves hold each point's neighbours: recall@k at the default leaves, re-scoring deep.

    Re-scoring every candidate of the searched leaves takes AH's error out,
    so what is left is the partitioning's: neighbours that fell in leaves
    the query did not search. Queries are the shard's own rows (chosen by
    hashed id, so the check is the same on every build).
    """
    from retrieval.index_tuning import exact_neighbors, query_sample_keys, recall_at_k

    keys = query_sample_keys(list(ids), PARTITION_CHECK_QUERIES)
    queries = vectors[keys]
    exact_keys, exact_scores = exact_neighbors(vectors, queries, k, exclude=keys)
    rows, scores = searcher.search(queries, k + 1, pre_reorder_num_neighbors=searcher.count)
    own = rows == keys[:, None]
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    return recall_at_k(np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1),
                       exact_keys, exact_scores)


def build_searcher(vectors: np.ndarray, ids: Sequence[str], k: int, *, training_threads: int = 0,
                   partition_recall_floor: float = PARTITION_RECALL_FLOOR) -> Any:
    """A ScaNN searcher for one shard, with a training sample that gives good leaves.

    Brute force and AH are built as ``choose_params`` says. A tree is first
    trained on ``TRAINING_POINTS_PER_LEAF`` points per leaf; when its leaves
    hold less than ``partition_recall_floor`` of the neighbours at the default
    leaves searched (``partition_recall``), it is retrained on every point
    and the better of the two is kept (measured on 1M clustered vectors: a
    sample too small for the leaf count is what builds poor leaves).
    """
    from retrieval import scann_compat

    params = choose_params(len(vectors), vectors.shape[1])
    searcher = scann_compat.build(vectors, params, k, training_threads=training_threads)
    if params.algorithm != "tree_ah" or (params.training_sample_size or 0) >= len(vectors):
        return searcher
    quality = partition_recall(searcher, vectors, ids, k)
    if quality >= partition_recall_floor:
        return searcher
    retrained_params = dataclasses.replace(params, training_sample_size=len(vectors))
    retrained = scann_compat.build(vectors, retrained_params, k, training_threads=training_threads)
    retrained_quality = partition_recall(retrained, vectors, ids, k)
    return retrained if retrained_quality > quality else searcher


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
