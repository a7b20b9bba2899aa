"""The search index directory that build_index writes and every searcher reads.

An index output follows the output rule (``schemas.publication``): readers
resolve ``OUTPUT`` with ``published_dir`` and read one whole run::

    OUTPUT/CURRENT
    OUTPUT/run-.../index_info.json              IndexInfo below, written last
    OUTPUT/run-.../shard-00000-of-00003/scann/  ScaNN's own files (row-numbered datapoints)
    OUTPUT/run-.../shard-00000-of-00003/id_map.parquet   ID_MAP_RECORD rows; row i = ScaNN datapoint i
    OUTPUT/run-.../shard-00000-of-00003/vectors.npy      float32 [count, dimension], row i = datapoint i
    OUTPUT/run-.../rejected-*.jsonl             dead letters (wrong dimension, NaN/zero vector, duplicate id)

Rows go to shard ``shard_for_id(image_id, num_shards)``, so the same rows
always land in the same shard. An empty shard (more shards than rows hash
to) has an id map and vectors with zero rows and no ``scann/`` directory.
The vectors are kept beside ScaNN's files because search by image_id, exact
recall checks and near-duplicate scans need the stored vector and ScaNN's
files are its own format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Literal

from schemas import artifact_files, layout
from schemas.embedding import IMAGE_ID, LABEL, SPLIT, URI
from schemas.fields import Field, RecordSchema

INDEX_INFO_FILE = "index_info.json"
SHARD_PREFIX = "shard"
SCANN_DIR = "scann"
ID_MAP_FILE = "id_map.parquet"
VECTORS_FILE = "vectors.npy"
# Scores are dot products of L2-normalized vectors (cosine similarity);
# build_index normalizes every vector and searchers normalize every query.
DISTANCE = "dot_product"

Algorithm = Literal["brute_force", "ah", "tree_ah"]
ALGORITHMS: tuple[Algorithm, ...] = ("brute_force", "ah", "tree_ah")

ID_MAP_RECORD = RecordSchema(
    name="index_id_map",
    fields=(
        Field(IMAGE_ID, "string", "The embedding row's image_id; unique in the index."),
        Field(URI, "string", "Where the image was read from."),
        Field(LABEL, "string", "Label of the embedding row, when known.", nullable=True),
        Field(SPLIT, "string", "Dataset split of the embedding row, when known.", nullable=True),
    ),
)


def shard_name(shard: int, num_shards: int) -> str:
    """``shard-00001-of-00003``: the directory of one shard."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}). Received `shard={shard}`")
    return f"{SHARD_PREFIX}-{shard:05d}-of-{num_shards:05d}"


def shard_for_id(image_id: str, num_shards: int) -> int:
    """The shard an image_id belongs to: a stable hash, the same on every machine and run."""
    digest = hashlib.sha256(f"shard:{image_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def shard_dir(index_dir: str, name: str) -> str:
    return layout.join(index_dir, name)


def scann_dir(index_dir: str, name: str) -> str:
    return layout.join(index_dir, name, SCANN_DIR)


def id_map_path(index_dir: str, name: str) -> str:
    return layout.join(index_dir, name, ID_MAP_FILE)


def vectors_path(index_dir: str, name: str) -> str:
    return layout.join(index_dir, name, VECTORS_FILE)


@dataclasses.dataclass(frozen=True)
class ScannParams:
    """How one shard's ScaNN searcher was built (``retrieval.index_build.choose_params``).

    Attributes:
      algorithm: ``brute_force`` (exact), ``ah`` (asymmetric hashing scores
        every point, then exact re-scoring of the best) or ``tree_ah`` (a
        k-means tree picks leaves first).
      num_leaves: Tree leaves (``tree_ah`` only).
      training_sample_size: Points the tree's k-means trains on.
      min_partition_size: Smallest leaf k-means keeps (ScaNN's default 50
        builds poor leaves when the sample is small for the leaf count).
      spherical: Spherical k-means (right for unit vectors).
      leaves_to_search_default: Leaves searched when the query names none.
      dimensions_per_block: AH dimensions per 4-bit code.
      anisotropic_quantization_threshold: AH's anisotropic loss threshold.
      reorder_default: Candidates re-scored exactly when the query names none.
    """

    algorithm: Algorithm
    num_leaves: int | None = None
    training_sample_size: int | None = None
    min_partition_size: int | None = None
    spherical: bool = False
    leaves_to_search_default: int | None = None
    dimensions_per_block: int | None = None
    anisotropic_quantization_threshold: float | None = None
    reorder_default: int | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}. Received `algorithm={self.algorithm}`")
        if self.algorithm == "tree_ah" and not (self.num_leaves and self.num_leaves >= 1):
            raise ValueError(f"tree_ah needs num_leaves >= 1. Received `num_leaves={self.num_leaves}`")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "scann params") -> "ScannParams":
        return cls(**artifact_files.field_values(cls, content, source))


@dataclasses.dataclass(frozen=True)
class SearchParams:
    """Search-time settings every shard is queried with (chosen by tuning).

    Attributes:
      leaves_to_search: Tree leaves scored per query (clipped to each shard's leaves).
      pre_reorder_num_neighbors: Candidates re-scored exactly per shard.
    """

    leaves_to_search: int | None = None
    pre_reorder_num_neighbors: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "search params") -> "SearchParams":
        return cls(**artifact_files.field_values(cls, content, source))


@dataclasses.dataclass(frozen=True)
class PartitionTrial:
    """One tree partitioning the build tried for a shard (``retrieval.index_tuning.choose_partitioning``).

    Measured on a partition probe (the tree over exact scoring, no AH), so
    the figures are the partitioning's alone, not the index's.

    Attributes:
      training_sample_size: Points the tree's k-means trained on.
      min_partition_size: Smallest leaf k-means kept.
      build_seconds: Wall time of building the probe.
      leaves_to_search: The fewest leaves searched (of the bounded sweep)
        that reached the target, or the most leaves when none did.
      recall: Shard-local recall@k at those leaves.
      qps: Single-thread QPS of the probe at those leaves.
      met_target: Whether the bounded sweep reached the target.
    """

    training_sample_size: int
    min_partition_size: int
    build_seconds: float
    leaves_to_search: int | None
    recall: float
    qps: float
    met_target: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "partition trial") -> "PartitionTrial":
        return cls(**artifact_files.field_values(cls, content, source))


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One shard: its directory name, how many vectors it holds, how its searcher was built.

    ``partition_trials`` lists every tree partitioning tried for a tree
    shard (empty for brute force, AH, and indexes written before the sweep);
    the chosen one's values are ``params.training_sample_size`` and
    ``params.min_partition_size``, and ``build_seconds`` counts every trial.
    """

    name: str
    count: int
    params: ScannParams | None  # None for an empty shard (no searcher).
    build_seconds: float = 0.0
    partition_trials: list[PartitionTrial] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "count": self.count, "build_seconds": self.build_seconds,
                "params": None if self.params is None else self.params.to_dict(),
                "partition_trials": [trial.to_dict() for trial in self.partition_trials]}

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "shard") -> "ShardInfo":
        values = artifact_files.field_values(cls, content, source)
        params = values.get("params")
        trials = values.get("partition_trials") or []
        return cls(name=str(values["name"]), count=int(values["count"]),
                   params=None if params is None else ScannParams.from_dict(params, f"{source} params"),
                   build_seconds=float(values.get("build_seconds", 0.0)),
                   partition_trials=[PartitionTrial.from_dict(t, f"{source} partition_trials[{i}]")
                                     for i, t in enumerate(trials)])


@dataclasses.dataclass(frozen=True)
class SweepBounds:
    """How far the tuning sweep may go, so a tuned index never silently becomes brute force.

    Attributes:
      max_leaves_fraction: Leaves searched are at most this fraction of a
        tree shard's leaves (rounded up, at least 1).
      max_reorder_per_k: Candidates re-scored exactly per shard are at most
        this many times k, or ``max_reorder_fraction`` of the largest
        quantized shard's rows, whichever is more.
      max_reorder_fraction: See ``max_reorder_per_k``.
      max_leaves_to_search: The resulting cap on this index (None: no tree shard).
      max_pre_reorder_num_neighbors: The resulting cap on this index (None: no AH shard).
    """

    max_leaves_fraction: float
    max_reorder_per_k: int
    max_reorder_fraction: float
    max_leaves_to_search: int | None = None
    max_pre_reorder_num_neighbors: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "sweep bounds") -> "SweepBounds":
        return cls(**artifact_files.field_values(cls, content, source))


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    """``index_info.json``: what an index holds and how well it searches, measured when it was built.

    Attributes:
      model_version: The model every vector came from; queries must come from it too.
      count: Vectors indexed, all shards together.
      dimension: Vector length.
      distance: ``dot_product`` of L2-normalized vectors (cosine similarity).
      num_shards: Shard count; ``shards`` lists each.
      shards: Per shard, in shard order.
      search: The tuned search-time parameters.
      k: The k recall was measured at.
      target_recall: The recall@k the tuning had to reach.
      recall_at_k: Measured recall@k of the fan-out search with ``search``
        against exact brute force, on ``query_sample_size`` held-out
        queries (each query's own row excluded from both sides).
      qps: Measured queries per second (one thread, all shards in turn).
      query_sample_size: Queries the two figures were measured on.
      build_seconds: Wall time of building the shards (sum over shards).
      tuning_seconds: Wall time of the tuning sweep.
      rejected: Rows read but not indexed (dead letters).
      source: The warehouse URI the rows were read from.
      model_dir: The model directory given at build time, used to embed
        query images (None when none was given).
      package_version: vision-pipelines version that built the index.
      scann_version: ScaNN version that built it.
      created_at: ISO-8601 UTC time.
      sweep_bounds: The limits the tuning sweep searched within (None in
        indexes written before the sweep was bounded).
    """

    model_version: str
    count: int
    dimension: int
    distance: str
    num_shards: int
    shards: list[ShardInfo]
    search: SearchParams
    k: int
    target_recall: float
    recall_at_k: float
    qps: float
    query_sample_size: int
    build_seconds: float
    tuning_seconds: float
    rejected: int
    source: str
    model_dir: str | None
    package_version: str
    scann_version: str
    created_at: str
    sweep_bounds: SweepBounds | None = None

    def __post_init__(self) -> None:
        if len(self.shards) != self.num_shards:
            raise ValueError(f"index_info lists {len(self.shards)} shards; num_shards is {self.num_shards}")
        if sum(s.count for s in self.shards) != self.count:
            raise ValueError(f"index_info shard counts sum to {sum(s.count for s in self.shards)}; count is {self.count}")

    def to_dict(self) -> dict[str, Any]:
        content = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        content["shards"] = [shard.to_dict() for shard in self.shards]
        content["search"] = self.search.to_dict()
        content["sweep_bounds"] = None if self.sweep_bounds is None else self.sweep_bounds.to_dict()
        return content

    def to_json(self) -> str:
        return artifact_files.to_json_text(self.to_dict())

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = INDEX_INFO_FILE) -> "IndexInfo":
        values = artifact_files.field_values(cls, content, source)
        values["shards"] = [ShardInfo.from_dict(s, f"{source} shards[{i}]") for i, s in enumerate(values["shards"])]
        values["search"] = SearchParams.from_dict(values["search"], f"{source} search")
        bounds = values.get("sweep_bounds")
        values["sweep_bounds"] = None if bounds is None else SweepBounds.from_dict(bounds, f"{source} sweep_bounds")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str, source: str = INDEX_INFO_FILE) -> "IndexInfo":
        return cls.from_dict(json.loads(text), source)

    @classmethod
    def read(cls, index_dir: str) -> "IndexInfo":
        """Reads ``index_dir/index_info.json`` (a run directory: resolve ``OUTPUT`` with ``published_dir`` first).

        Raises:
          FileNotFoundError: No index_info.json there (not an index, or a run that never finished).
          ValueError: The file lacks a field of the contract.
        """
        path = layout.join(index_dir, INDEX_INFO_FILE)
        return cls.from_dict(artifact_files.read_json(path), path)

    def write(self, index_dir: str) -> str:
        """Writes ``index_dir/index_info.json`` whole or not at all; returns its path."""
        path = layout.join(index_dir, INDEX_INFO_FILE)
        artifact_files.write_json(path, self.to_dict())
        return path
