"""The one place that imports ScaNN: building, saving, loading and querying a searcher.

Why not ``import scann``: the package's ``__init__`` loads its TensorFlow op
library (``scann_ops/cc/_scann_ops.so``), which was built against another
abseil than TF 2.21 and fails with an undefined symbol. The pybind searcher
(``scann.scann_ops.py.scann_ops_pybind``) needs no TensorFlow at all, but the
plain ``from scann.scann_ops.py import scann_ops_pybind`` still runs that
``__init__``. So ``_pybind()`` registers the ``scann`` package without
running its ``__init__`` (a module object with the installed package's
``__path__``) and imports only the pybind wrapper. Everything else in
``retrieval/`` goes through the functions below, so a future ScaNN release
that fixes its import touches this file only.

ScaNN's own docid pickle (``scann_docids.pkl``) is never used: an index
directory may come from gs://, and unpickling a downloaded file runs code.
Ids live in the index's id map (``schemas.index``); ScaNN sees row numbers.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import threading
import types
from typing import Any

import numpy as np

from schemas.index import DISTANCE, ScannParams

_IMPORT_LOCK = threading.Lock()
_PYBIND: Any = None
SCANN_PACKAGE = "scann"
# Shown to users: what a ScaNN searcher directory holds (written by ScaNN itself).
SCANN_ASSETS_FILE = "scann_assets.pbtxt"
_DISTANCE_MEASURE = {"dot_product": "dot_product"}


def _pybind() -> Any:
    """``scann.scann_ops.py.scann_ops_pybind``, imported without ``scann/__init__`` (see the module docstring)."""
    global _PYBIND
    with _IMPORT_LOCK:
        if _PYBIND is not None:
            return _PYBIND
        if SCANN_PACKAGE not in sys.modules:
            spec = importlib.util.find_spec(SCANN_PACKAGE)
            if spec is None or spec.submodule_search_locations is None:
                raise ImportError("the scann package is not installed (pip install scann)")
            package = types.ModuleType(SCANN_PACKAGE)
            package.__path__ = list(spec.submodule_search_locations)
            package.__spec__ = spec
            package.__file__ = spec.origin
            sys.modules[SCANN_PACKAGE] = package
        _PYBIND = importlib.import_module("scann.scann_ops.py.scann_ops_pybind")
        return _PYBIND


def scann_version() -> str:
    """The installed ScaNN version, recorded in ``index_info.json``."""
    return importlib.metadata.version(SCANN_PACKAGE)


class Searcher:
    """A built or loaded ScaNN searcher over ``count`` row-numbered vectors.

    Attributes:
      params: How it was built.
      count: Number of datapoints (ScaNN ids are ``0 .. count-1``).
    """

    def __init__(self, native: Any, params: ScannParams, count: int):
        self._native = native
        self.params = params
        self.count = count

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        leaves_to_search: int | None = None,
        pre_reorder_num_neighbors: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best rows for each query, on this thread only (QPS is measured per thread).

        Args:
          queries: float32 [q, dim].
          k: Neighbours wanted; clipped to ``count``.
          leaves_to_search: Tree leaves to score (tree indexes only; clipped
            to the number of leaves); None keeps the built default.
          pre_reorder_num_neighbors: Candidates the quantized scoring keeps
            for exact re-scoring (AH indexes only); None keeps the default.

        Returns:
          ``(rows, scores)``: int64 [q, k'] row numbers and float32 [q, k']
          dot products, best first, with ``k' = min(k, count)``.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.count)
        if k <= 0 or queries.shape[0] == 0:
            return np.zeros((queries.shape[0], 0), np.int64), np.zeros((queries.shape[0], 0), np.float32)
        leaves = None
        if self.params.num_leaves and leaves_to_search:
            leaves = max(1, min(int(leaves_to_search), self.params.num_leaves))
        reorder = None
        if self.params.algorithm != "brute_force" and pre_reorder_num_neighbors:
            reorder = max(k, min(int(pre_reorder_num_neighbors), self.count))
        rows, scores = self._native.search_batched(
            queries, final_num_neighbors=k, leaves_to_search=leaves, pre_reorder_num_neighbors=reorder
        )
        return np.asarray(rows, dtype=np.int64), np.asarray(scores, dtype=np.float32)

    def save(self, local_dir: str) -> None:
        """Serializes the searcher into an existing local directory, with paths relative to it."""
        self._native.serialize(local_dir, relative_path=True)


def build(vectors: np.ndarray, params: ScannParams, k: int, *, training_threads: int = 0) -> Searcher:
    """Builds a searcher over ``vectors`` (float32 [n, dim], n >= 1) as ``params`` says.

    Args:
      vectors: The datapoints; row i gets ScaNN id i.
      params: Algorithm and build parameters (``retrieval.index_build.choose_params``).
      k: The default number of neighbours.
      training_threads: Threads for k-means and AH training (0: ScaNN's choice).

    Raises:
      ValueError: No vectors, or a distance ScaNN is not given here.
    """
    return _build(vectors, params, k, training_threads, exact_scoring=params.algorithm == "brute_force")


def build_partition_probe(vectors: np.ndarray, params: ScannParams, k: int, *, training_threads: int = 0) -> Searcher:
    """A ``tree_ah`` params' tree with exact scoring inside the searched leaves, and no AH.

    What it misses at a number of leaves searched is the partitioning's doing
    alone, and it builds several times faster than the AH searcher (no AH
    training or encoding), so partitionings are compared with it
    (``retrieval.index_tuning.choose_partitioning``).

    Raises:
      ValueError: ``params`` is not a tree, or no vectors.
    """
    if params.algorithm != "tree_ah":
        raise ValueError(f"a partition probe needs tree_ah params. Received `algorithm={params.algorithm}`")
    return _build(vectors, params, k, training_threads, exact_scoring=True)


def _build(vectors: np.ndarray, params: ScannParams, k: int, training_threads: int, *, exact_scoring: bool) -> Searcher:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"a ScaNN index needs at least one vector. Received shape {vectors.shape}")
    if DISTANCE not in _DISTANCE_MEASURE:
        raise ValueError(f"unsupported distance {DISTANCE!r}")
    n = vectors.shape[0]
    builder = _pybind().builder(vectors, max(1, min(k, n)), _DISTANCE_MEASURE[DISTANCE])
    if params.algorithm == "tree_ah":
        builder = builder.tree(
            num_leaves=int(params.num_leaves or 1),
            num_leaves_to_search=int(params.leaves_to_search_default or 1),
            training_sample_size=int(params.training_sample_size or n),
            min_partition_size=int(params.min_partition_size or 1),
            spherical=params.spherical,
        )
    if exact_scoring:
        builder = builder.score_brute_force()
    else:
        builder = builder.score_ah(
            int(params.dimensions_per_block or 2),
            anisotropic_quantization_threshold=float(params.anisotropic_quantization_threshold or 0.2),
        ).reorder(int(params.reorder_default or max(k, 1)))
    if training_threads:
        builder = builder.set_n_training_threads(training_threads)
    return Searcher(builder.build(), params, n)


def load(local_dir: str, params: ScannParams, count: int) -> Searcher:
    """Loads a searcher ``Searcher.save`` wrote into a local directory.

    Raises:
      FileNotFoundError: The directory holds no ScaNN assets.
    """
    if not os.path.isfile(os.path.join(local_dir, SCANN_ASSETS_FILE)):
        raise FileNotFoundError(f"{local_dir} holds no ScaNN searcher ({SCANN_ASSETS_FILE} missing)")
    return Searcher(_pybind().load_searcher(local_dir, assets_backcompat_shim=False), params, count)
