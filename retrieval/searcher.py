"""Searching an index directory: fan out to every shard, merge the top k.

``ShardedIndex`` is the index as vectors and row keys (what tuning,
benchmarks and the near-duplicate scan need); ``ImageSearcher`` adds the id
map and the model, and answers a vector, an image's bytes or an image_id with
``SearchHit``s (image_id, uri, label, split, score).

Keys: every indexed row has a key, its position over all shards in shard
order (shard 0's rows first). ``ShardedIndex`` hands out keys; ``entry(key)``,
``vector(key)`` and ``key_of(image_id)`` turn them into rows.

ScaNN reads a searcher only from a local directory, so shards of a gs://
index are copied once into a local cache keyed by the run directory (a
published run never changes, so a cached copy never goes stale).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import threading
import uuid
from typing import Any, Sequence

import numpy as np

from retrieval import index_build, scann_compat
from schemas import index as index_schema
from schemas.embedding import IMAGE_ID, LABEL, SPLIT, URI
from schemas.exit_status import UnusableInputError
from schemas.index import IndexInfo, SearchParams, ShardInfo
from schemas.publication import published_dir

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "vision-pipelines", "index")


class ModelVersionMismatch(UnusableInputError):
    """A query embedded by another model than the one the index was built from."""


class UnknownImageId(KeyError):
    """``search(image_id)`` for an id the index does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown image_id"


@dataclasses.dataclass(frozen=True)
class SearchHit:
    """One neighbour: the indexed image and its cosine similarity to the query."""

    image_id: str
    uri: str
    label: str | None
    split: str | None
    score: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_remote(path: str) -> bool:
    return "://" in path


def _local_scann_dir(index_dir: str, name: str, cache_dir: str | None) -> str:
    """A local directory holding the shard's ScaNN files: the shard itself, or a cached copy of a remote one."""
    if not _is_remote(index_dir):
        return index_schema.scann_dir(index_dir, name)
    root = os.path.join(cache_dir or DEFAULT_CACHE_DIR, hashlib.sha256(index_dir.encode("utf-8")).hexdigest()[:16])
    target = os.path.join(root, name)
    if os.path.isfile(os.path.join(target, scann_compat.SCANN_ASSETS_FILE)):
        return target
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}-{uuid.uuid4().hex[:6]}-", dir=root)
    try:
        index_build.copy_scann_dir_to_local(index_dir, name, staging)
        try:
            os.replace(staging, target)  # Whole or not at all; a concurrent stager may have won.
        except OSError:
            if not os.path.isfile(os.path.join(target, scann_compat.SCANN_ASSETS_FILE)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclasses.dataclass
class _Shard:
    info: ShardInfo
    offset: int
    searcher: scann_compat.Searcher | None
    vectors: np.ndarray
    entries: list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Neighbors:
    """Merged search results of a query batch: keys and scores [q, k'], best first (k' = min(k, count))."""

    keys: np.ndarray
    scores: np.ndarray


class ShardedIndex:
    """Every shard of one index run, loaded; searches fan out to all shards and merge the top k."""

    def __init__(self, run_dir: str, shards: list[_Shard], dimension: int, search: SearchParams,
                 info: IndexInfo | None):
        self.run_dir = run_dir
        self.dimension = dimension
        self.search_params = search
        self.info = info
        self._shards = shards
        self._key_of: dict[str, int] | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, index_dir: str, *, cache_dir: str | None = None) -> "ShardedIndex":
        """Loads the published index under ``index_dir`` (an output directory or a run directory).

        Raises:
          FileNotFoundError: No published index there.
          ValueError: index_info.json lacks a field of the contract.
        """
        run_dir = published_dir(index_dir)
        try:
            info = IndexInfo.read(run_dir)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{index_dir} holds no published index (no {index_schema.INDEX_INFO_FILE}); "
                                    "build one with `vision-pipelines build-index`") from error
        return cls.open(run_dir, info.shards, info.dimension, info.search, info=info, cache_dir=cache_dir)

    @classmethod
    def open(cls, run_dir: str, shards: Sequence[ShardInfo], dimension: int, search: SearchParams | None = None,
             *, info: IndexInfo | None = None, cache_dir: str | None = None) -> "ShardedIndex":
        """Opens shards by their entries (tuning does this before ``index_info.json`` exists)."""
        loaded = []
        offset = 0
        for shard in shards:
            vectors = index_build.read_vectors(run_dir, shard.name)
            entries = index_build.read_id_map(run_dir, shard.name)
            if len(entries) != shard.count or vectors.shape != (shard.count, dimension):
                raise ValueError(f"{run_dir}/{shard.name}: id map has {len(entries)} rows and vectors "
                                 f"{vectors.shape}; index_info.json says {shard.count} x {dimension}")
            searcher = None
            if shard.count and shard.params is not None:
                local = _local_scann_dir(run_dir, shard.name, cache_dir)
                searcher = scann_compat.load(local, shard.params, shard.count)
            loaded.append(_Shard(shard, offset, searcher, vectors, entries))
            offset += shard.count
        return cls(run_dir, loaded, dimension, search or SearchParams(), info)

    @property
    def count(self) -> int:
        return sum(shard.info.count for shard in self._shards)

    @property
    def shard_infos(self) -> list[ShardInfo]:
        return [shard.info for shard in self._shards]

    def _locate(self, key: int) -> tuple[_Shard, int]:
        if not 0 <= key < self.count:
            raise IndexError(f"key {key} out of range [0, {self.count})")
        for shard in reversed(self._shards):
            if key >= shard.offset and shard.info.count:
                return shard, key - shard.offset
        raise IndexError(f"key {key} out of range")

    def entry(self, key: int) -> dict[str, Any]:
        """The id map row (``schemas.index.ID_MAP_RECORD`` dict) of a key."""
        shard, row = self._locate(key)
        return shard.entries[row]

    def vector(self, key: int) -> np.ndarray:
        shard, row = self._locate(key)
        return shard.vectors[row]

    def all_vectors(self) -> np.ndarray:
        """Every vector, float32 [count, dimension], row = key."""
        return np.concatenate([shard.vectors for shard in self._shards], axis=0)

    def all_image_ids(self) -> list[str]:
        """Every image_id, position = key."""
        return [entry[IMAGE_ID] for shard in self._shards for entry in shard.entries]

    def key_of(self, image_id: str) -> int:
        """The key of an image_id.

        Raises:
          UnknownImageId: The index does not hold it.
        """
        with self._lock:
            if self._key_of is None:
                self._key_of = {image_id: key for key, image_id in enumerate(self.all_image_ids())}
        if image_id not in self._key_of:
            raise UnknownImageId(f"image_id {image_id!r} is not in the index {self.run_dir}")
        return self._key_of[image_id]

    def search(self, queries: np.ndarray, k: int, search: SearchParams | None = None) -> Neighbors:
        """The k best keys per query over all shards (one thread, shards in turn).

        Args:
          queries: float32 [q, dimension] unit vectors.
          k: Neighbours per query.
          search: Search-time parameters; default the index's tuned ones.

        Returns:
          Keys and dot-product scores, best first; ties broken by the smaller key.

        Raises:
          ValueError: Queries of the wrong dimension.
        """
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dimension:
            raise ValueError(f"queries have dimension {queries.shape[1]}; the index has {self.dimension}")
        search = search or self.search_params
        keys, scores = [], []
        for shard in self._shards:
            if shard.searcher is None:
                continue
            rows, shard_scores = shard.searcher.search(
                queries, k, leaves_to_search=search.leaves_to_search,
                pre_reorder_num_neighbors=search.pre_reorder_num_neighbors)
            keys.append(rows + shard.offset)
            scores.append(shard_scores)
        q = queries.shape[0]
        if not keys:
            return Neighbors(np.zeros((q, 0), np.int64), np.zeros((q, 0), np.float32))
        all_keys = np.concatenate(keys, axis=1)
        all_scores = np.concatenate(scores, axis=1)
        width = min(k, all_keys.shape[1])
        # lexsort: last key is primary -> best score first, then smaller key.
        order = np.lexsort((all_keys, -all_scores), axis=-1)[:, :width]
        return Neighbors(np.take_along_axis(all_keys, order, axis=1), np.take_along_axis(all_scores, order, axis=1))


def normalized_query(vector: Sequence[float] | np.ndarray, dimension: int) -> np.ndarray:
    """A query vector as a float32 unit vector of the index's dimension.

    Raises:
      ValueError: Wrong length, NaN/inf or zero vector (the message says which).
    """
    try:
        return index_build.checked_unit_vector(vector, dimension, "query")
    except index_build.InvalidVector as error:
        raise ValueError(str(error)) from error


class ImageSearcher:
    """Search an index by vector, image bytes or image_id.

    Example:
      searcher = ImageSearcher.load("out/index", model_dir="out/model/best")
      for hit in searcher.search(open("cat.png", "rb").read(), k=5):
          print(hit.image_id, hit.label, hit.score)
    """

    def __init__(self, index: ShardedIndex, model_dir: str | None):
        if index.info is None:
            raise ValueError("ImageSearcher needs a published index (with index_info.json)")
        self.index = index
        self.info: IndexInfo = index.info
        self._model_dir = model_dir
        self._embedder: Any = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, index_dir: str, *, model_dir: str | None = None, cache_dir: str | None = None) -> "ImageSearcher":
        """Loads the published index under ``index_dir`` (local or gs://).

        Args:
          index_dir: build_index's ``--output_dir`` (or one of its run directories).
          model_dir: The model to embed query images with; default the one
            recorded at build time. Its model_version must equal the index's.
          cache_dir: Where shards of a gs:// index are copied.

        Raises:
          FileNotFoundError: No published index there.
          ModelVersionMismatch: ``model_dir`` holds another model_version.
        """
        searcher = cls(ShardedIndex.load(index_dir, cache_dir=cache_dir), model_dir)
        if model_dir is not None:
            searcher._check_model(model_dir)
        return searcher

    @property
    def model_dir(self) -> str | None:
        return self._model_dir or self.info.model_dir

    def _check_model(self, model_dir: str) -> None:
        from schemas.model_artifacts import ModelInfo

        model_version = ModelInfo.read(published_dir(model_dir)).model_version
        if model_version != self.info.model_version:
            raise ModelVersionMismatch(
                f"model {model_dir} has model_version {model_version}, but the index {self.index.run_dir} was "
                f"built from {self.info.model_version}: its vectors are not comparable; use the model the index "
                f"was built from, or rebuild the index from that model's embeddings")

    def embed_image(self, image_bytes: bytes) -> np.ndarray:
        """The embedding of one encoded image, through the same model and function extract_embeddings uses.

        Raises:
          ValueError: No model to embed with, or the image cannot be decoded.
          ModelVersionMismatch: The model is not the index's.
        """
        with self._lock:
            if self._embedder is None:
                if self.model_dir is None:
                    raise ValueError("searching by image needs the model the index was built from: pass "
                                     "--model_dir (the index recorded none)")
                self._check_model(self.model_dir)
                from transforms.embedding_rows import QueryEmbedder

                self._embedder = QueryEmbedder(self.model_dir)
            embedder = self._embedder
        vector, model_version = embedder.embed(image_bytes)
        if model_version != self.info.model_version:
            raise ModelVersionMismatch(f"query embedded by {model_version}; index built from {self.info.model_version}")
        return vector

    def search(self, query: np.ndarray | Sequence[float] | bytes | str, k: int = 10,
               search: SearchParams | None = None) -> list[SearchHit]:
        """The k nearest indexed images to a query.

        Args:
          query: A vector (the index's model and dimension), encoded image
            bytes, or an indexed image_id (that image itself is left out of
            its own results).
          k: How many neighbours.
          search: Search-time parameters; default the tuned ones.

        Raises:
          ValueError: A bad vector, k < 1, or an image that cannot be embedded.
          UnknownImageId: An image_id the index does not hold.
          ModelVersionMismatch: The query image's model is not the index's.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1. Received `k={k}`")
        exclude = None
        if isinstance(query, str):
            exclude = self.index.key_of(query)
            vector = self.index.vector(exclude)
        elif isinstance(query, (bytes, bytearray)):
            vector = normalized_query(self.embed_image(bytes(query)), self.info.dimension)
        else:
            vector = normalized_query(query, self.info.dimension)
        wanted = k + (1 if exclude is not None else 0)
        neighbors = self.index.search(vector[None, :], wanted, search)
        hits = []
        for key, score in zip(neighbors.keys[0], neighbors.scores[0]):
            if int(key) == exclude:
                continue
            entry = self.index.entry(int(key))
            hits.append(SearchHit(entry[IMAGE_ID], entry[URI], entry[LABEL], entry[SPLIT], float(score)))
        return hits[:k]
