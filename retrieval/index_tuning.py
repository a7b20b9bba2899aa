"""Tuning an index's search-time parameters to a recall target, and writing ``index_info.json``.

The search that users get must be measured, not assumed: ``tune`` holds out
a query sample (indexed rows chosen by a hash of their image_id, so the
sample is the same on every build of the same rows), computes each query's
exact top k by brute force over every shard's vectors, then sweeps leaves to
search (tree shards) and re-scoring depth (AH shards) of the fan-out search
and keeps the setting with the best single-thread QPS whose recall@k reaches
the target with a margin of two standard errors (``required_sample_recall``),
so the target also holds for queries outside the sample. Each query's own row is left out on both sides (it would be a
free hit). A neighbour counts as found when it is one of the exact k or
scores at least the exact k-th score (ties are not misses).

When no setting reaches the target ``TargetRecallNotMet`` is raised and the
job publishes nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import logging
import math
import shutil
import tempfile
import time
from typing import Sequence

import numpy as np

from retrieval.searcher import ShardedIndex
from schemas.index import DISTANCE, IndexInfo, SearchParams, ShardInfo

_LOGGER = logging.getLogger(__name__)

QUERY_SAMPLE_MAX = 500
QUERY_SAMPLE_FRACTION = 0.1
TIE_TOLERANCE = 1e-5  # float32 dot products of unit vectors: ScaNN's exact re-scoring vs numpy's.
_EXACT_CHUNK_ROWS = 8_192
_MIN_TIMED_SECONDS = 0.05
PACKAGE = "vision-pipelines"


class TargetRecallNotMet(RuntimeError):
    """No search-time setting reached ``--target_recall``; nothing is published."""


@dataclasses.dataclass(frozen=True)
class Trial:
    """One measured setting of the sweep."""

    search: SearchParams
    recall: float
    qps: float


@dataclasses.dataclass(frozen=True)
class TuningResult:
    """The chosen setting, its measured figures and every trial of the sweep."""

    search: SearchParams
    recall: float
    qps: float
    query_sample_size: int
    trials: list[Trial]
    seconds: float


def query_sample_keys(image_ids: Sequence[str], size: int | None = None) -> np.ndarray:
    """Keys of the held-out queries: the rows whose hashed image_id sorts first (stable across builds).

    Default size: 10% of the rows, at least 1 and at most ``QUERY_SAMPLE_MAX`` (500 queries x k
    neighbours measure recall@10 to about +-0.003).
    """
    if size is None:
        size = min(QUERY_SAMPLE_MAX, max(1, int(len(image_ids) * QUERY_SAMPLE_FRACTION)))
    size = min(size, len(image_ids))
    ranked = sorted(range(len(image_ids)), key=lambda key: hashlib.sha256(f"query:{image_ids[key]}".encode()).digest())
    return np.asarray(sorted(ranked[:size]), dtype=np.int64)


def exact_neighbors(vectors: np.ndarray, queries: np.ndarray, k: int,
                    exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k by dot product (brute force, chunked over rows so memory stays bounded).

    Args:
      vectors: float32 [n, d], row = key.
      queries: float32 [q, d].
      k: Neighbours wanted (clipped to the rows available).
      exclude: Per query, one key to leave out (its own row), or None.

    Returns:
      ``(keys, scores)`` [q, k'], best first, ties by the smaller key.
    """
    q = queries.shape[0]
    n = vectors.shape[0]
    width = min(k, n - (1 if exclude is not None else 0))
    best_keys = np.zeros((q, 0), np.int64)
    best_scores = np.zeros((q, 0), np.float32)
    for start in range(0, n, _EXACT_CHUNK_ROWS):
        chunk = vectors[start:start + _EXACT_CHUNK_ROWS]
        scores = queries @ chunk.T
        if exclude is not None:
            inside = (exclude >= start) & (exclude < start + chunk.shape[0])
            scores[np.flatnonzero(inside), exclude[inside] - start] = -np.inf
        keys = np.broadcast_to(np.arange(start, start + chunk.shape[0], dtype=np.int64), scores.shape)
        if scores.shape[1] > width:  # Keep each query's best `width` of the chunk before the exact sort.
            part = np.argpartition(-scores, width - 1, axis=1)[:, :width]
            keys = np.take_along_axis(keys, part, axis=1)
            scores = np.take_along_axis(scores, part, axis=1)
        keys = np.concatenate([best_keys, keys], axis=1)
        scores = np.concatenate([best_scores, scores], axis=1)
        order = np.lexsort((keys, -scores), axis=-1)[:, :width]
        best_keys = np.take_along_axis(keys, order, axis=1)
        best_scores = np.take_along_axis(scores, order, axis=1)
    return best_keys, best_scores


def recall_at_k(found_keys: np.ndarray, found_scores: np.ndarray, exact_keys: np.ndarray,
                exact_scores: np.ndarray) -> float:
    """Mean fraction of the exact k found; a found neighbour scoring at least the exact k-th is a hit (ties)."""
    k = exact_keys.shape[1]
    if k == 0 or exact_keys.shape[0] == 0:
        return 1.0
    hits = 0
    for i in range(exact_keys.shape[0]):
        exact = set(exact_keys[i].tolist())
        kth = exact_scores[i, -1]
        found = sum(1 for key, score in zip(found_keys[i][:k], found_scores[i][:k])
                    if int(key) in exact or score >= kth - TIE_TOLERANCE)
        hits += min(found, k)
    return hits / (k * exact_keys.shape[0])


def search_without_self(index: ShardedIndex, queries: np.ndarray, query_keys: np.ndarray, k: int,
                        search: SearchParams) -> tuple[np.ndarray, np.ndarray]:
    """Top k of each query with the query's own row left out (asks for k + 1)."""
    neighbors = index.search(queries, k + 1, search)
    own = neighbors.keys == query_keys[:, None]
    # Push each query's own row to the end (stable), then keep k.
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    width = min(k, neighbors.keys.shape[1] - int(own.any(axis=1).min(initial=0)) if len(own) else 0)
    return (np.take_along_axis(neighbors.keys, order, axis=1)[:, :width],
            np.take_along_axis(neighbors.scores, order, axis=1)[:, :width])


def _timed_search(index: ShardedIndex, queries: np.ndarray, k: int, search: SearchParams) -> float:
    """Single-thread QPS of the fan-out search: the best of a few timed passes (the machine may be shared)."""
    best = float("inf")
    passes = 0
    total = 0.0
    while passes < 3 and (passes < 1 or total < _MIN_TIMED_SECONDS):
        started = time.perf_counter()
        index.search(queries, k + 1, search)
        elapsed = time.perf_counter() - started
        best = min(best, elapsed)
        total += elapsed
        passes += 1
    return queries.shape[0] / max(best, 1e-9)


def required_sample_recall(target_recall: float, queries: int, k: int) -> float:
    """The recall a setting must reach on the sample so that it reaches ``target_recall`` beyond it.

    A setting that only just reaches the target on the sample falls short on
    other queries about half the time; asking for two standard errors more
    (``2 * sqrt(t (1 - t) / (queries k))``, about 0.006 for 0.95 on 500
    queries at k=10) makes the target hold on new queries from the same data.
    """
    margin = 2.0 * math.sqrt(target_recall * (1.0 - target_recall) / max(1, queries * k))
    return min(1.0, target_recall + margin)


def _geometric(low: int, high: int) -> list[int]:
    values = []
    value = max(1, low)
    while value < high:
        values.append(value)
        value *= 2
    values.append(max(1, high))
    return sorted(set(values))


def tune(index: ShardedIndex, k: int, target_recall: float, *, query_sample_size: int | None = None) -> TuningResult:
    """The fastest search setting whose recall@k reaches the target (see the module docstring).

    Raises:
      TargetRecallNotMet: No setting of the sweep reaches it.
      ValueError: Fewer than 2 rows, or a target outside (0, 1].
    """
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1]. Received `target_recall={target_recall}`")
    if index.count < 2:
        raise ValueError(f"an index needs at least 2 rows to measure recall. Received {index.count}")
    started = time.monotonic()
    vectors = np.ascontiguousarray(index.all_vectors(), dtype=np.float32)
    query_keys = query_sample_keys(index.all_image_ids(), query_sample_size)
    queries = vectors[query_keys]
    exact_keys, exact_scores = exact_neighbors(vectors, queries, k, exclude=query_keys)
    required = required_sample_recall(target_recall, len(query_keys), k)
    infos = [s for s in index.shard_infos if s.params is not None]
    leaves = max((s.params.num_leaves or 0) for s in infos) if infos else 0
    quantized = any(s.params.algorithm != "brute_force" for s in infos)
    largest = max((s.count for s in infos), default=1)
    leaves_grid: list[int | None] = _geometric(1, leaves) if leaves else [None]
    reorder_grid: list[int | None] = _geometric(2 * k, largest) if quantized else [None]

    trials: list[Trial] = []

    def measure(search: SearchParams) -> Trial:
        found_keys, found_scores = search_without_self(index, queries, query_keys, k, search)
        trial = Trial(search, recall_at_k(found_keys, found_scores, exact_keys, exact_scores),
                      _timed_search(index, queries, k, search))
        trials.append(trial)
        _LOGGER.info("tuning: %s recall@%d %.4f, %.0f QPS", search, k, trial.recall, trial.qps)
        return trial

    best: Trial | None = None
    reorder_cap = len(reorder_grid)
    for leaves_to_search in leaves_grid:
        met_at = None
        for position, reorder in enumerate(reorder_grid[:reorder_cap]):
            trial = measure(SearchParams(leaves_to_search, reorder))
            if position == 0 and best is not None and trial.qps < best.qps:
                met_at = -1  # Even the shallowest re-scoring at more leaves is slower than the best: stop.
                break
            if trial.recall >= required:
                met_at = position
                if best is None or trial.qps > best.qps:
                    best = trial
                break
        if met_at == -1 or met_at == 0:
            break
        if met_at is not None:
            reorder_cap = met_at + 1  # More leaves only pays if it needs less re-scoring.
    seconds = time.monotonic() - started
    if best is None:
        top = max(trials, key=lambda t: t.recall)
        raise TargetRecallNotMet(
            f"no search setting reached recall@{k} >= {target_recall} (>= {required:.4f} on the sample): "
            f"the best was {top.recall:.4f} "
            f"({top.search}) over {len(trials)} settings on {len(query_keys)} held-out queries; "
            f"lower --target_recall (the sweep went up to every leaf and {reorder_grid[-1]} re-scored candidates)")
    return TuningResult(best.search, best.recall, best.qps, int(len(query_keys)), trials, seconds)


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def finalize_index(run_dir: str, shards: Sequence[ShardInfo], *, model_version: str, dimension: int, k: int,
                   target_recall: float, rejected: int, source: str, model_dir: str | None,
                   query_sample_size: int | None = None, cache_dir: str | None = None) -> IndexInfo:
    """Tunes the shards written under ``run_dir`` and writes ``index_info.json`` (the run's last file).

    Raises:
      TargetRecallNotMet: See ``tune``; index_info.json is not written.
    """
    from retrieval import scann_compat

    shards = sorted(shards, key=lambda s: s.name)
    # A gs:// run's shards are staged for tuning into a temporary cache that goes afterwards: the
    # worker doing this never searches the index again.
    own_cache = tempfile.mkdtemp(prefix="index-tuning-") if cache_dir is None and "://" in run_dir else None
    try:
        index = ShardedIndex.open(run_dir, shards, dimension, cache_dir=cache_dir or own_cache)
        result = tune(index, k, target_recall, query_sample_size=query_sample_size)
    finally:
        if own_cache is not None:
            shutil.rmtree(own_cache, ignore_errors=True)
    info = IndexInfo(
        model_version=model_version,
        count=index.count,
        dimension=dimension,
        distance=DISTANCE,
        num_shards=len(shards),
        shards=list(shards),
        search=result.search,
        k=k,
        target_recall=target_recall,
        recall_at_k=round(result.recall, 6),
        qps=round(result.qps, 1),
        query_sample_size=result.query_sample_size,
        build_seconds=round(sum(s.build_seconds for s in shards), 3),
        tuning_seconds=round(result.seconds, 3),
        rejected=rejected,
        source=source,
        model_dir=model_dir,
        package_version=package_version(),
        scann_version=scann_compat.scann_version(),
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    info.write(run_dir)
    return info
