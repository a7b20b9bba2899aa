"""Near-duplicate pairs through the ScaNN index: every indexed vector's k nearest, kept above a threshold.

The SQL ``near_duplicates`` query blocks pairs by LSH inside the warehouse
engine and refuses tables whose candidate pairs it estimates too many; this
is the route for those tables. Each worker loads the index once per process
(``shared.Shared``), takes a batch of index keys, searches their vectors
(``retrieval.searcher.ShardedIndex.search``, the index's tuned settings,
k + 1 because a vector finds itself), and emits each neighbour at or above
the threshold as an unordered pair. Both members of a pair usually find each
other, so pairs are deduplicated; the similarity is recomputed exactly from
the stored float32 vectors (in float64), so both directions give the same
value and the output does not depend on which found which.

A vector whose k-th neighbour is still above the threshold may have more
near-duplicates than k: those queries are counted (``saturated``) so the job
can say to raise ``--k``.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from typing import Any, Iterable, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from retrieval.searcher import ShardedIndex
from schemas.embedding import CREATED_AT, MODEL_VERSION
from schemas.near_duplicates import IMAGE_ID_A, IMAGE_ID_B, SIMILARITY
from transforms.dead_letters import METRICS_NAMESPACE

SEARCHED_COUNTER = "near_duplicate_queries"
SATURATED_COUNTER = "near_duplicate_queries_saturated"
PAIRS_COUNTER = "near_duplicate_pairs"


@dataclasses.dataclass(frozen=True)
class NearDuplicateSpec:
    """What to search: the published index run, how many neighbours, which similarity counts.

    Attributes:
      run_dir: The index's published run directory (``schemas.publication.published_dir``).
      count: Vectors in the index (every key 0..count-1 is searched once).
      model_version: Stamped on every pair.
      k: Neighbours searched per vector, itself not counted.
      threshold: Minimum cosine similarity of a pair.
      batch_size: Keys searched per batch (one ``search`` call).
      created_at: Stamped on every pair: when the run started.
    """

    run_dir: str
    count: int
    model_version: str
    k: int
    threshold: float
    batch_size: int
    created_at: datetime.datetime


class _LoadedIndex:
    """The index and its vectors, held per process by ``shared.Shared`` (which needs a weak-referenceable class)."""

    def __init__(self, run_dir: str):
        self.index = ShardedIndex.load(run_dir)
        self.vectors = np.ascontiguousarray(self.index.all_vectors(), dtype=np.float32)
        self.image_ids = self.index.all_image_ids()


class SearchNearDuplicatesFn(beam.DoFn):
    """``(start, stop)`` key range -> ``(image_id_a, image_id_b, similarity)`` for each neighbour above the threshold.

    Pairs come out with ``image_id_a < image_id_b``, once per direction that
    found them (``FindNearDuplicates`` removes the repeat).
    """

    def __init__(self, spec: NearDuplicateSpec):
        self._spec = spec
        self._shared_handle = shared.Shared()
        self._loaded: _LoadedIndex | None = None
        self._searched = Metrics.counter(METRICS_NAMESPACE, SEARCHED_COUNTER)
        self._saturated = Metrics.counter(METRICS_NAMESPACE, SATURATED_COUNTER)

    def setup(self) -> None:
        run_dir = self._spec.run_dir
        self._loaded = self._shared_handle.acquire(functools.partial(_LoadedIndex, run_dir), tag=run_dir)

    def process(self, key_range: tuple[int, int]) -> Iterator[tuple[str, str, float]]:
        assert self._loaded is not None
        start, stop = key_range
        vectors, image_ids = self._loaded.vectors, self._loaded.image_ids
        neighbors = self._loaded.index.search(vectors[start:stop], self._spec.k + 1)
        threshold = self._spec.threshold
        for row, (keys, scores) in enumerate(zip(neighbors.keys, neighbors.scores)):
            query = start + row
            others = [(int(key), float(score)) for key, score in zip(keys, scores) if key != query]
            if len(others) >= self._spec.k and others[self._spec.k - 1][1] >= threshold:
                self._saturated.inc()
            for key, score in others:
                if score < threshold - 1e-4:  # Sorted best first: nothing after this can pass.
                    break
                first, second = sorted((query, key), key=image_ids.__getitem__)  # One order: one value.
                similarity = float(np.dot(vectors[first].astype(np.float64), vectors[second].astype(np.float64)))
                if similarity >= threshold:
                    yield image_ids[first], image_ids[second], similarity
        self._searched.inc(stop - start)


def key_ranges(count: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` batches covering keys 0..count-1."""
    return [(start, min(count, start + batch_size)) for start in range(0, count, batch_size)]


class _ToRowFn(beam.DoFn):
    def __init__(self, spec: NearDuplicateSpec):
        self._spec = spec
        self._pairs = Metrics.counter(METRICS_NAMESPACE, PAIRS_COUNTER)

    def process(self, pair: tuple[str, str, float]) -> Iterable[dict[str, Any]]:
        self._pairs.inc()
        yield {IMAGE_ID_A: pair[0], IMAGE_ID_B: pair[1], SIMILARITY: pair[2],
               MODEL_VERSION: self._spec.model_version, CREATED_AT: self._spec.created_at}


class FindNearDuplicates(beam.PTransform):
    """PBegin -> near-duplicate rows (``schemas.near_duplicates.NEAR_DUPLICATE_RECORD`` dicts), each pair once."""

    def __init__(self, spec: NearDuplicateSpec):
        super().__init__()
        self._spec = spec

    def expand(self, root: beam.pvalue.PBegin) -> beam.PCollection[dict[str, Any]]:
        return (
            root
            | "CreateKeyRanges" >> beam.Create(key_ranges(self._spec.count, self._spec.batch_size))
            | "SpreadKeyRanges" >> beam.Reshuffle()
            | "SearchNeighbors" >> beam.ParDo(SearchNearDuplicatesFn(self._spec))
            | "DropRepeatedPairs" >> beam.Distinct()
            | "ToRows" >> beam.ParDo(_ToRowFn(self._spec))
        )
