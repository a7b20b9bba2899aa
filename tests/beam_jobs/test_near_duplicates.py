"""The near-duplicates job: a real Beam pipeline over a real index, pairs written to real warehouses.

Digits (real data, planted copies) check the pairs against brute force and against the SQL query on the
same rows; a clustered synthetic index (ScaNN with quantization and two shards) checks that every planted
pair is found through approximate search; flag and input errors end in one line.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest

from beam_jobs import cli
from benchmarks.vectors import clustered_unit_vectors, plant_duplicates
from retrieval import sql_queries as sq
from retrieval.index_build import IndexRow, checked_unit_vector
from retrieval.local_build import build_index_in_process
from tests.fixtures import warehouses as wh


def _index(path: str, ids: list[str], vectors: np.ndarray, model_version: str, num_shards: int = 1) -> str:
    rows = [IndexRow(image_id, f"/images/{image_id}.png", None, None, checked_unit_vector(vector, vectors.shape[1]))
            for image_id, vector in zip(ids, vectors)]
    build_index_in_process(path, rows, model_version=model_version, dimension=vectors.shape[1],
                           num_shards=num_shards)
    return path


def _pairs(warehouse_uri: str) -> list[dict[str, Any]]:
    engine = sq.open_engine(warehouse_uri)
    try:
        return sq.run_sql(engine, "SELECT * FROM {raw_table} ORDER BY image_id_a, image_id_b").records()
    finally:
        engine.close()


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(["near-duplicates", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_pairs_equal_brute_force_and_the_sql_query_on_digits(
        tmp_path, capsys: pytest.CaptureFixture[str], embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    rows = embedding_warehouses.rows[wh.V1]  # 300 digits (16-d PCA) + 3 planted copies.
    ids = [r["image_id"] for r in rows]
    vectors = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
    index_dir = _index(str(tmp_path / "index"), ids, vectors, wh.V1, num_shards=2)
    threshold = 0.95
    warehouse = f"duckdb:{tmp_path / 'pairs.duckdb'}"
    code, out, err = _run(capsys, ["--index_dir", index_dir, "--warehouse", warehouse, "--threshold", str(threshold),
                                   "--k", "400", "--batch_size", "64"])
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["near_duplicate_queries"] == summary["indexed"] == len(ids)
    found = _pairs(f"{warehouse}#near_duplicates")
    unit = vectors.astype(np.float64) / np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True)
    similarity = unit @ unit.T
    truth = {(min(ids[i], ids[j]), max(ids[i], ids[j])): similarity[i, j]
             for i in range(len(ids)) for j in range(i + 1, len(ids)) if similarity[i, j] >= threshold}
    assert {(r["image_id_a"], r["image_id_b"]) for r in found} == set(truth)
    assert {tuple(sorted(p)) for p in wh.DUPLICATE_OF.items()} <= set(truth)
    assert len(found) == summary["near_duplicate_pairs"] and len(truth) > len(wh.DUPLICATE_OF)
    for record in found:
        assert record["image_id_a"] < record["image_id_b"] and record["model_version"] == wh.V1
        assert record["similarity"] == pytest.approx(truth[(record["image_id_a"], record["image_id_b"])], abs=1e-6)
    # The SQL route over the embeddings warehouse, told to score every pair (exact), answers the same pairs.
    engine = sq.open_engine(embedding_warehouses.duckdb)
    try:
        by_sql = sq.run_named_query(engine, "near_duplicates", {"model_version": wh.V1, "threshold": threshold,
                                                                "bands": 1, "band_bits": 0, "limit": 100_000}).records()
    finally:
        engine.close()
    assert {(r["image_id_a"], r["image_id_b"]) for r in by_sql} == set(truth)


def test_every_planted_pair_is_found_through_a_quantized_sharded_index(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    count = 30_000  # Above the brute-force size: each shard is AH with exact re-scoring, tuned to recall@10.
    vectors = clustered_unit_vectors(count, 32, cluster_size=300, spread=1.0, seed=7)
    similarities = np.linspace(0.951, 0.999, 30)
    originals = np.random.default_rng(8).choice(count, size=len(similarities), replace=False)
    ids = [f"img-{i:05d}" for i in range(count)] + [f"dup-{i:05d}" for i in originals]
    index_dir = _index(str(tmp_path / "index"), ids, np.vstack([vectors, plant_duplicates(vectors, originals,
                                                                                          similarities)]),
                       "synthetic-v1", num_shards=2)
    warehouse = f"parquet:{tmp_path / 'warehouse'}"
    code, out, err = _run(capsys, ["--index_dir", index_dir, "--warehouse", warehouse, "--threshold", "0.95"])
    assert code == 0, err
    found = {(r["image_id_a"], r["image_id_b"]) for r in _pairs(f"{warehouse}#near_duplicates")}
    planted = {(f"dup-{i:05d}", f"img-{i:05d}") for i in originals}
    assert planted <= found
    assert found == planted  # Clusters sit near cosine 0.5: nothing else is that close.


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--threshold", "1.5"], "--threshold must be a cosine similarity in (-1, 1]. Received `--threshold=1.5`"),
        (["--threshold", "nan"], "Received `--threshold=nan`"),
        (["--k", "0"], "--k must be in [1, 1000]. Received `--k=0`"),
        (["--batch_size", "0"], "Received `--batch_size=0`"),
        (["--treshold", "0.9"], "--treshold"),
    ],
)
def test_flag_errors_end_in_one_line(tmp_path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                     message: str) -> None:
    code, out, err = _run(capsys, ["--index_dir", str(tmp_path), "--warehouse", f"duckdb:{tmp_path / 'w.duckdb'}",
                                   *argv])
    assert code == 2 and out == "" and message in err, err
    assert err.startswith("vision-pipelines near-duplicates: error: ") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "w.duckdb")


def test_a_directory_without_a_published_index_is_refused(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--index_dir", str(tmp_path / "absent")], ["--index_dir", str(tmp_path)]):
        code, out, err = _run(capsys, [*argv, "--warehouse", f"duckdb:{tmp_path / 'w.duckdb'}"])
        assert code == 3 and out == "" and "holds no published index" in err and err.count("\n") == 1, err
    code, _, err = _run(capsys, ["--index_dir", str(tmp_path), "--warehouse", "nosuch:x"])
    assert code == 2 and "warehouse" in err.lower() and err.count("\n") == 1, err
