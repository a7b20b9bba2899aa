"""Synthetic clustered unit vectors: the stand-in for a large embeddings table in benchmarks and scale tests.

Real embeddings cluster (by class, by near-identical shots), and that is what
makes both LSH blocking and ANN partitioning hard: unrelated rows of one
cluster look alike. ``clustered_unit_vectors`` draws cluster centres
uniformly on the sphere and puts each point at its centre plus isotropic
Gaussian noise of about the centre's length (``spread``), then normalizes,
so two points of one cluster sit near cosine 1 / (1 + spread^2) = 0.5 and
points of different clusters near 0. ``plant_duplicates`` adds copies of
chosen rows with tiny noise, at a known similarity, for tests that must find
every one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def clustered_unit_vectors(count: int, dimension: int = 128, *, cluster_size: int = 1_000, spread: float = 1.0,
                           seed: int = 0) -> np.ndarray:
    """``count`` unit vectors (float32) in clusters of about ``cluster_size``.

    Args:
      count: Rows.
      dimension: Vector length.
      cluster_size: Mean points per cluster (clusters = count // cluster_size, at least 1).
      spread: Noise length relative to the centre's (1.0: within-cluster cosine about 0.5).
      seed: Random seed; the same arguments give the same vectors.
    """
    if count < 1 or dimension < 2 or cluster_size < 1 or spread < 0:
        raise ValueError(f"need count >= 1, dimension >= 2, cluster_size >= 1, spread >= 0. Received "
                         f"`count={count}`, `dimension={dimension}`, `cluster_size={cluster_size}`, `spread={spread}`")
    rng = np.random.default_rng(seed)
    clusters = max(1, count // cluster_size)
    centres = rng.standard_normal((clusters, dimension))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = np.empty((count, dimension), dtype=np.float32)
    step = 100_000  # Rows per block keep the float64 temporaries small at 1M rows.
    for start in range(0, count, step):
        stop = min(count, start + step)
        block = centres[rng.integers(0, clusters, stop - start)]
        block = block + rng.standard_normal((stop - start, dimension)) * (spread / np.sqrt(dimension))
        vectors[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return vectors


def plant_duplicates(vectors: np.ndarray, originals: np.ndarray, similarities: np.ndarray,
                     seed: int = 1) -> np.ndarray:
    """Copies of ``vectors[originals]`` turned away from their original to exactly the given cosine similarities.

    Returns:
      float32 unit vectors, one per original: ``cos(copy, original) = similarity``.
    """
    rng = np.random.default_rng(seed)
    base = vectors[originals].astype(np.float64)
    noise = rng.standard_normal(base.shape)
    noise -= np.sum(noise * base, axis=1, keepdims=True) * base  # Orthogonal to the original.
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    s = np.asarray(similarities, dtype=np.float64)[:, None]
    return (s * base + np.sqrt(1.0 - s**2) * noise).astype(np.float32)


def embedding_table(vectors: np.ndarray, image_ids: list[str], model_version: str) -> pa.Table:
    """An Arrow table in the embeddings warehouse schema (``schemas.embedding``), for loading into DuckDB directly.

    Benchmarks and scale tests of the queries load a large table this way
    instead of through ``WriteToWarehouse`` (which has its own tests), so
    that building the table does not dominate the measurement.
    """
    import datetime

    from schemas.embedding import EMBEDDING_RECORD

    created = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    count = len(image_ids)
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    columns = {
        "image_id": pa.array(image_ids),
        "uri": pa.array([f"/synthetic/{image_id}.png" for image_id in image_ids]),
        "label": pa.nulls(count, pa.string()),
        "split": pa.nulls(count, pa.string()),
        "embedding": pa.ListArray.from_arrays(pa.array(np.arange(0, count * vectors.shape[1] + 1, vectors.shape[1],
                                                                 dtype=np.int32)), flat),
        "model_version": pa.array([model_version] * count),
        "created_at": pa.array([created] * count, pa.timestamp("us", tz="UTC")),
    }
    schema = EMBEDDING_RECORD.arrow_schema()
    return pa.Table.from_arrays([columns[name].cast(schema.field(name).type) for name in schema.names], schema=schema)
