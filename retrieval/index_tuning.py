"""Tuning an index's search-time parameters to a recall target, and writing ``index_info.json``.

The search that users get must be measured, not assumed: ``tune`` holds out
a query sample (indexed rows chosen by a hash of their image_id, so the
sample is the same on every build of the same rows), computes each query's
exact top k by brute force over every shard's vectors, then sweeps leaves to
search (tree shards) and re-scoring depth (AH shards) of the fan-out search
and keeps the setting with the best single-thread QPS whose recall@k reaches
the target with a margin of two standard errors (``required_sample_recall``),
so the target also holds for queries outside the sample. Each query's own
row is left out on both sides (it would be a free hit). A neighbour counts as
found when it is one of the exact k or scores at least the exact k-th score
(ties are not misses).

The sweep is bounded so that a tuned index never silently turns into brute
force: leaves searched stop at ``MAX_LEAVES_FRACTION`` of a tree's leaves
(rounded up) and re-scoring depth at ``MAX_REORDER_PER_K`` x k candidates
per shard or ``MAX_REORDER_FRACTION`` of the largest shard's rows, whichever
is more (``sweep_bounds``, recorded in ``index_info.json`` as
``sweep_bounds``). Searching every leaf and re-scoring every candidate is
exact search at more than brute force's cost and meets any target on any
data; within the bounds, a target that cannot be met means the data does not
partition or quantize well enough for it (near-uniform directions, or
clusters of near-duplicates larger than the re-scoring depth), and
``TargetRecallNotMet`` is raised: the job publishes nothing. The fraction of
the rows is there for tight clusters: measured on 40k 16-d vectors in
clusters of 1,000 at within-cluster cosine 0.9, AH cannot order a cluster's
points and recall@10 needs about 1,000 re-scored candidates (0.81 at 500,
0.999 at 1,000), still 1/40 of the rows. Brute-force shards (up to
``retrieval.index_build.BRUTE_FORCE_MAX_ROWS`` rows) are exact by choice and
have nothing to bound. There is no QPS floor against brute force: measured
QPS on a shared machine is too noisy to fail a build on, and the bounds
limit the work per query by construction.

A tree shard's partitioning (training sample size and ``min_partition_size``)
is chosen per shard when it is built: ``choose_partitioning`` compares a
small grid of candidate trees with the same bounded sweep and keeps the one
that searches fastest at the target; every trial is recorded in the shard's
``partition_trials``.
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
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from retrieval.index_build import MIN_PARTITION_SIZE, TRAINING_POINTS_PER_LEAF
from retrieval.searcher import Neighbors, ShardedIndex
from schemas.index import DISTANCE, IndexInfo, PartitionTrial, ScannParams, SearchParams, ShardInfo, SweepBounds

_LOGGER = logging.getLogger(__name__)

QUERY_SAMPLE_MAX = 500
QUERY_SAMPLE_FRACTION = 0.1
TIE_TOLERANCE = 1e-5  # float32 dot products of unit vectors: ScaNN's exact re-scoring vs numpy's.
_EXACT_CHUNK_ROWS = 8_192
_MIN_TIMED_SECONDS = 0.05
_SATURATED = 1e-3  # Recall gained by doubling the re-scoring depth below which it stops growing it.
PACKAGE = "vision-pipelines"
MAX_LEAVES_FRACTION = 0.1  # A tenth of the leaves with AH scoring: still tens of times cheaper than brute force.
MAX_REORDER_PER_K = 100
MAX_REORDER_FRACTION = 0.05
LARGE_TRAINING_POINTS_PER_LEAF = 400
SCANN_DEFAULT_MIN_PARTITION_SIZE = 50
MIN_PARTITION_SIZES = (MIN_PARTITION_SIZE, SCANN_DEFAULT_MIN_PARTITION_SIZE)
PROBE_QPS_MARGIN = 1.2


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
    """The chosen setting (``best``; None when no setting met the target) and every trial of the sweep.

    Attributes:
      best: The fastest trial that met ``required``, or None.
      required: The recall the sample had to show (``required_sample_recall``).
      query_sample_size: Held-out queries measured.
      trials: Every measured setting, in sweep order.
      seconds: Wall time of the sweep.
      bounds: The limits swept within.
    """

    best: Trial | None
    required: float
    query_sample_size: int
    trials: list[Trial]
    seconds: float
    bounds: SweepBounds


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


def search_without_self(index: _Searchable, queries: np.ndarray, query_keys: np.ndarray, k: int,
                        search: SearchParams) -> tuple[np.ndarray, np.ndarray]:
    """Top k of each query with the query's own row left out (asks for k + 1)."""
    return _without_self(index.search(queries, k + 1, search), query_keys, k)


def _without_self(neighbors: Neighbors, query_keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    own = neighbors.keys == query_keys[:, None]
    # Push each query's own row to the end (stable), then keep k.
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    width = min(k, neighbors.keys.shape[1] - int(own.any(axis=1).min(initial=0)) if len(own) else 0)
    return (np.take_along_axis(neighbors.keys, order, axis=1)[:, :width],
            np.take_along_axis(neighbors.scores, order, axis=1)[:, :width])


def _timed_search(index: _Searchable, queries: np.ndarray, k: int,
                  search: SearchParams) -> tuple[Neighbors, float]:
    """The first pass's k + 1 neighbours and the single-thread QPS of the fan-out search.

    QPS is the best of two or three timed passes (the machine may be shared).
    """
    best = float("inf")
    passes = 0
    total = 0.0
    first: Neighbors | None = None
    while passes < 3 and (passes < 2 or total < _MIN_TIMED_SECONDS):
        started = time.perf_counter()
        neighbors = index.search(queries, k + 1, search)
        elapsed = time.perf_counter() - started
        if first is None:
            first = neighbors
        best = min(best, elapsed)
        total += elapsed
        passes += 1
    assert first is not None
    return first, queries.shape[0] / max(best, 1e-9)


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


def sweep_bounds(k: int, num_leaves: int | None, largest_quantized: int | None) -> SweepBounds:
    """The limits of the sweep (module docstring): a fraction of the leaves, a bounded re-scoring depth.

    Args:
      k: Neighbours recall is measured at.
      num_leaves: The most leaves of any tree shard, or None when no shard is a tree.
      largest_quantized: Rows of the largest AH / tree shard, or None when every shard is brute force.
    """
    leaves = max(1, math.ceil(MAX_LEAVES_FRACTION * num_leaves)) if num_leaves else None
    reorder = None
    if largest_quantized:
        depth = max(MAX_REORDER_PER_K * k, math.ceil(MAX_REORDER_FRACTION * largest_quantized))
        reorder = max(k, min(depth, largest_quantized))
    return SweepBounds(MAX_LEAVES_FRACTION, MAX_REORDER_PER_K, MAX_REORDER_FRACTION, leaves, reorder)


class _Searchable(Protocol):
    def search(self, queries: np.ndarray, k: int, search: SearchParams | None = None) -> Neighbors: ...


class OneSearcher:
    """One in-memory ScaNN searcher with ``ShardedIndex.search``'s signature (partition probes are swept through it)."""

    def __init__(self, searcher: Any):
        self._searcher = searcher

    def search(self, queries: np.ndarray, k: int, search: SearchParams | None = None) -> Neighbors:
        search = search or SearchParams()
        rows, scores = self._searcher.search(queries, k, leaves_to_search=search.leaves_to_search,
                                             pre_reorder_num_neighbors=search.pre_reorder_num_neighbors)
        return Neighbors(rows, scores)


@dataclasses.dataclass(frozen=True)
class _HeldOut:
    """The held-out queries of a sweep and their exact top k (computed once, shared by partition trials)."""

    keys: np.ndarray
    queries: np.ndarray
    exact_keys: np.ndarray
    exact_scores: np.ndarray
    required: float

    @classmethod
    def of(cls, vectors: np.ndarray, image_ids: Sequence[str], k: int, target_recall: float,
           size: int | None) -> "_HeldOut":
        keys = query_sample_keys(image_ids, size)
        queries = vectors[keys]
        exact_keys, exact_scores = exact_neighbors(vectors, queries, k, exclude=keys)
        return cls(keys, queries, exact_keys, exact_scores, required_sample_recall(target_recall, len(keys), k))


def _sweep(index: _Searchable, held_out: _HeldOut, k: int, bounds: SweepBounds) -> TuningResult:
    """The bounded sweep over one searchable thing; ``best`` is None when no setting met the target.

    The bounds' corner (most leaves, deepest re-scoring) is measured first:
    recall only grows with either, so when the corner misses the target
    every setting does, and a build that cannot succeed fails in one search.
    """
    started = time.monotonic()
    leaves_grid: list[int | None] = (_geometric(1, bounds.max_leaves_to_search) if bounds.max_leaves_to_search
                                     else [None])
    reorder_grid: list[int | None] = (_geometric(2 * k, bounds.max_pre_reorder_num_neighbors)
                                      if bounds.max_pre_reorder_num_neighbors else [None])

    trials: list[Trial] = []

    def measure(search: SearchParams) -> Trial:
        neighbors, qps = _timed_search(index, held_out.queries, k, search)
        found_keys, found_scores = _without_self(neighbors, held_out.keys, k)
        trial = Trial(search, recall_at_k(found_keys, found_scores, held_out.exact_keys, held_out.exact_scores), qps)
        trials.append(trial)
        _LOGGER.info("tuning: %s recall@%d %.4f, %.0f QPS", search, k, trial.recall, trial.qps)
        return trial

    def result(best: Trial | None) -> TuningResult:
        return TuningResult(best, held_out.required, int(len(held_out.keys)), trials, time.monotonic() - started,
                            bounds)

    corner: Trial | None = None
    if len(leaves_grid) * len(reorder_grid) > 1:
        corner = measure(SearchParams(leaves_grid[-1], reorder_grid[-1]))
        if corner.recall < held_out.required:
            return result(None)
    best: Trial | None = None
    reorder_cap = len(reorder_grid)
    for leaves_to_search in leaves_grid:
        met_at = None
        previous = -1.0
        for position, reorder in enumerate(reorder_grid[:reorder_cap]):
            trial = measure(SearchParams(leaves_to_search, reorder))
            if position == 0 and best is not None and trial.qps < best.qps:
                met_at = -1  # Even the shallowest re-scoring at more leaves is slower than the best: stop.
                break
            if trial.recall >= held_out.required:
                met_at = position
                if best is None or trial.qps > best.qps:
                    best = trial
                break
            if leaves_to_search != leaves_grid[-1] and trial.recall <= previous + _SATURATED:
                break  # Deeper re-scoring finds nothing more: the neighbours missed are in leaves not searched.
            previous = trial.recall
        if met_at == -1 or met_at == 0:
            break
        if met_at is not None:
            reorder_cap = met_at + 1  # More leaves only pays if it needs less re-scoring.
    return result(best or corner)  # The corner met the target even if the pruned sweep did not.


def tune(index: ShardedIndex, k: int, target_recall: float, *, query_sample_size: int | None = None) -> TuningResult:
    """The fastest search setting whose recall@k reaches the target (see the module docstring).

    Raises:
      TargetRecallNotMet: No setting within the sweep's bounds reaches it.
      ValueError: Fewer than 2 rows, or a target outside (0, 1].
    """
    _check_target(target_recall)
    if index.count < 2:
        raise ValueError(f"an index needs at least 2 rows to measure recall. Received {index.count}")
    vectors = np.ascontiguousarray(index.all_vectors(), dtype=np.float32)
    infos = [s for s in index.shard_infos if s.params is not None]
    leaves = max((s.params.num_leaves or 0) for s in infos) if infos else 0
    quantized = [s.count for s in infos if s.params.algorithm != "brute_force"]
    bounds = sweep_bounds(k, leaves or None, max(quantized) if quantized else None)
    held_out = _HeldOut.of(vectors, index.all_image_ids(), k, target_recall, query_sample_size)
    result = _sweep(index, held_out, k, bounds)
    if result.best is None:
        top = max(result.trials, key=lambda t: t.recall)
        raise TargetRecallNotMet(
            f"no search setting reached recall@{k} >= {target_recall} (>= {result.required:.4f} on "
            f"{result.query_sample_size} held-out queries): the best was {top.recall:.4f} at "
            f"leaves_to_search={top.search.leaves_to_search}, "
            f"pre_reorder_num_neighbors={top.search.pre_reorder_num_neighbors}. {_bounds_text(bounds)}: beyond "
            f"that an approximate index is little faster than exact search, so the data does not partition or "
            f"quantize well enough for this target (near-uniform directions, or clusters of near-duplicates larger than the "
            f"re-scoring depth). Lower --target_recall")
    return result


def _bounds_text(bounds: SweepBounds) -> str:
    limits = []
    if bounds.max_leaves_to_search:
        limits.append(f"{bounds.max_leaves_to_search} leaves searched ({bounds.max_leaves_fraction:.0%} of the leaves)")
    if bounds.max_pre_reorder_num_neighbors:
        limits.append(f"{bounds.max_pre_reorder_num_neighbors} re-scored candidates (the more of "
                      f"{bounds.max_reorder_per_k} x k and {bounds.max_reorder_fraction:.0%} of the largest shard)")
    return "The sweep stops at " + " and ".join(limits) if limits else "Exact search"


def _check_target(target_recall: float) -> None:
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1]. Received `target_recall={target_recall}`")


def partition_candidates(count: int, params: ScannParams) -> list[tuple[int, int]]:
    """The (training_sample_size, min_partition_size) pairs a tree shard of ``count`` rows is built with.

    Two training samples (``TRAINING_POINTS_PER_LEAF`` and
    ``LARGE_TRAINING_POINTS_PER_LEAF`` points per leaf, each at most every
    row) times two smallest-leaf sizes (``MIN_PARTITION_SIZES``, each at most
    half the sample's mean points per leaf); pairs that clip to the same
    values are built once. The default pair (``choose_params``) comes first.
    """
    leaves = int(params.num_leaves or 1)
    samples = [min(count, per_leaf * leaves) for per_leaf in (TRAINING_POINTS_PER_LEAF, LARGE_TRAINING_POINTS_PER_LEAF)]
    pairs = [(sample, max(1, min(size, sample // leaves // 2))) for sample in samples for size in MIN_PARTITION_SIZES]
    default = (int(params.training_sample_size or count), int(params.min_partition_size or 1))
    return list(dict.fromkeys([default, *pairs]))


def choose_partitioning(vectors: np.ndarray, image_ids: Sequence[str], params: ScannParams, k: int,
                        target_recall: float, build_probe: Callable[[ScannParams], Any]
                        ) -> tuple[ScannParams, list[PartitionTrial]]:
    """The tree partitioning of one shard that searches fastest at the target, and every trial.

    Each candidate of ``partition_candidates`` is built as a partition probe
    (``build_probe(params)``: the tree over exact scoring,
    ``retrieval.scann_compat.build_partition_probe``) and swept over leaves
    searched within the bounds, on the shard's own held-out rows with the
    index tuning's margin. Kept: the candidate that reaches the target at the
    fewest leaves (recall is deterministic, and with the same number of
    leaves, fewer searched is less work); among those, an earlier one (the
    default first) unless a later one is more than ``PROBE_QPS_MARGIN`` times
    as fast (the same setting's QPS varies by more than 1.3x between runs on a
    shared machine, so smaller differences are noise). When none reaches the
    target, the one with the best recall at the most leaves is kept (the
    index's tuning then fails loudly).

    Why probes: what a partitioning changes is which neighbours sit in the
    leaves searched and how many points those leaves hold, and a probe
    measures exactly that; AH is trained on the raw vectors (no residuals),
    so it does not depend on the partitioning, and building AH once instead
    of once per candidate keeps the grid cheap. Why per shard: the fan-out
    search costs the sum of its shards' costs, and shards are built in
    parallel workers. Why sweep at all: measured on 1M clustered vectors,
    2,000 leaves trained on a 100k sample with ``min_partition_size=50``
    built poor leaves; whether a larger sample or smaller leaves fixes it
    depends on the data.

    Returns:
      ``(params, trials)``: the chosen params (``training_sample_size`` and
      ``min_partition_size`` set) and one ``PartitionTrial`` per candidate.
    """
    _check_target(target_recall)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    bounds = sweep_bounds(k, params.num_leaves, None)
    held_out = _HeldOut.of(vectors, image_ids, k, target_recall, None)
    trials: list[PartitionTrial] = []
    best: tuple[PartitionTrial, ScannParams] | None = None
    for sample, min_size in partition_candidates(len(vectors), params):
        candidate = dataclasses.replace(params, training_sample_size=sample, min_partition_size=min_size)
        started = time.monotonic()
        probe = build_probe(candidate)
        seconds = time.monotonic() - started
        result = _sweep(OneSearcher(probe), held_out, k, bounds)
        chosen = result.best or max(result.trials, key=lambda t: t.recall)
        trial = PartitionTrial(sample, min_size, round(seconds, 3), chosen.search.leaves_to_search,
                               round(chosen.recall, 6), round(chosen.qps, 1), result.best is not None)
        trials.append(trial)
        _LOGGER.info("partition trial: %s", trial)
        if best is None or _better_partitioning(trial, best[0]):
            best = (trial, candidate)
    assert best is not None  # partition_candidates always returns the default pair.
    return best[1], trials


def _better_partitioning(trial: PartitionTrial, kept: PartitionTrial) -> bool:
    """Whether ``trial`` replaces the partitioning kept so far (``choose_partitioning``)."""
    if trial.met_target != kept.met_target:
        return trial.met_target
    if not trial.met_target:
        return trial.recall > kept.recall
    if trial.leaves_to_search != kept.leaves_to_search:
        return (trial.leaves_to_search or 0) < (kept.leaves_to_search or 0)
    return trial.qps > PROBE_QPS_MARGIN * kept.qps


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
    assert result.best is not None  # tune raises otherwise.
    info = IndexInfo(
        model_version=model_version,
        count=index.count,
        dimension=dimension,
        distance=DISTANCE,
        num_shards=len(shards),
        shards=list(shards),
        search=result.best.search,
        k=k,
        target_recall=target_recall,
        recall_at_k=round(result.best.recall, 6),
        qps=round(result.best.qps, 1),
        query_sample_size=result.query_sample_size,
        build_seconds=round(sum(s.build_seconds for s in shards), 3),
        tuning_seconds=round(result.seconds, 3),
        rejected=rejected,
        source=source,
        model_dir=model_dir,
        package_version=package_version(),
        scann_version=scann_compat.scann_version(),
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        sweep_bounds=result.bounds,
    )
    info.write(run_dir)
    return info
