"""Named queries: the same answers on DuckDB, Parquet and the BigQuery emulator, checked against numpy."""

from __future__ import annotations

import datetime
import math
from typing import Any, Iterator

import numpy as np
import pytest

from retrieval import sql_queries as sq
from tests.fixtures import warehouses as wh

V1_VECTOR = ",".join(["0.5"] * 16)

# (query, params) pairs run on every engine; version-scoped ones name a version
# except the last stats entry, which relies on the newest-version default.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("versions", {}),
    ("stats", {"model_version": wh.V1}),
    ("stats", {}),
    ("neighbors", {"model_version": wh.V1, "image_id": "digit-0003", "k": 7}),
    ("neighbors", {"model_version": wh.V1, "vector": V1_VECTOR, "k": 5}),
    ("neighbors", {"model_version": wh.V2, "image_id": "digit-0003", "k": 5}),
    ("label_centroids", {"model_version": wh.V1}),
    ("label_centroids", {"model_version": wh.V2}),
    ("label_outliers", {"model_version": wh.V1, "limit": 15}),
    ("near_duplicates", {"model_version": wh.V1, "threshold": 0.98}),
    ("near_duplicates", {"model_version": wh.V2, "threshold": 0.97, "bands": 10, "band_bits": 8, "limit": 40}),
]


@pytest.fixture(scope="module")
def engines(embedding_warehouses: wh.EmbeddingWarehouses) -> Iterator[dict[str, sq.SqlEngine]]:
    opened = {kind: sq.open_engine(uri) for kind, uri in embedding_warehouses.all().items()}
    yield opened
    for engine in opened.values():
        engine.close()


def _rows_by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["image_id"]: r for r in rows}


def _assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9), where
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_every_named_query_gives_the_same_answer_on_every_engine(
    engines: dict[str, sq.SqlEngine], name: str, params: dict[str, Any]
) -> None:
    results = {kind: sq.run_named_query(engine, name, params) for kind, engine in engines.items()}
    reference = results["duckdb"]
    assert reference.rows, f"{name} returned nothing; the comparison would be empty"
    for kind, result in results.items():
        assert result.columns == reference.columns, kind
        assert result.model_version == reference.model_version, kind
        assert len(result.rows) == len(reference.rows), kind
        for i, (row, want) in enumerate(zip(result.rows, reference.rows)):
            for column, x, y in zip(result.columns, row, want):
                _assert_same(x, y, f"{kind} {name} row {i} {column}")


def test_default_model_version_is_the_newest(engines: dict[str, sq.SqlEngine]) -> None:
    for engine in engines.values():
        assert sq.newest_model_version(engine) == wh.V2
        result = sq.run_named_query(engine, "stats")
        assert result.model_version == wh.V2
        assert {r["model_version"] for r in result.records()} == {wh.V2}


def test_rows_of_two_model_versions_never_mix(
    engines: dict[str, sq.SqlEngine], embedding_warehouses: wh.EmbeddingWarehouses
) -> None:
    dims = {wh.V1: 16, wh.V2: 64}
    for kind, engine in engines.items():
        for version, rows in embedding_warehouses.rows.items():
            ids = {r["image_id"] for r in rows}
            stats = sq.run_named_query(engine, "stats", {"model_version": version}).records()
            assert sum(r["row_count"] for r in stats) == len(rows), kind
            assert {(r["min_dim"], r["max_dim"]) for r in stats} == {(dims[version], dims[version])}, kind
            neighbors = sq.run_named_query(engine, "neighbors", {"model_version": version, "image_id": "digit-0150",
                                                                 "k": 500}).records()
            assert len(neighbors) == len(rows) - 1 and {r["image_id"] for r in neighbors} <= ids, kind
            centroids = sq.run_named_query(engine, "label_centroids", {"model_version": version}).records()
            assert {len(r["centroid"]) for r in centroids} == {dims[version]}, kind
            assert sum(r["images"] for r in centroids) == len(rows), kind
            outliers = sq.run_named_query(engine, "label_outliers", {"model_version": version, "limit": 1000})
            assert {r["image_id"] for r in outliers.records()} == ids, kind
            pairs = sq.run_named_query(engine, "near_duplicates", {"model_version": version, "threshold": -1.0,
                                                                   "limit": 100000}).records()
            assert {p["image_id_a"] for p in pairs} | {p["image_id_b"] for p in pairs} <= ids, kind


def test_neighbors_equal_brute_force_cosine_similarity(
    engines: dict[str, sq.SqlEngine], embedding_warehouses: wh.EmbeddingWarehouses
) -> None:
    rows = embedding_warehouses.rows[wh.V1]
    ids = [r["image_id"] for r in rows]
    matrix = np.asarray([r["embedding"] for r in rows], dtype=np.float32).astype(np.float64)
    probe = ids.index("digit-0003")
    similarity = matrix @ matrix[probe] / np.linalg.norm(matrix, axis=1) / np.linalg.norm(matrix[probe])
    order = [i for i in sorted(range(len(ids)), key=lambda i: (-similarity[i], ids[i])) if i != probe][:7]
    for engine in engines.values():
        got = sq.run_named_query(engine, "neighbors", {"model_version": wh.V1, "image_id": "digit-0003", "k": 7})
        assert [r["image_id"] for r in got.records()] == [ids[i] for i in order]
        np.testing.assert_allclose([r["similarity"] for r in got.records()], similarity[order], rtol=1e-6)


def test_neighbors_of_a_digit_are_mostly_the_same_digit(engines: dict[str, sq.SqlEngine],
                                                        embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    rows = [r for r in embedding_warehouses.rows[wh.V1]
            if r["image_id"].startswith("digit-") and r["image_id"] not in wh.FLIPPED_IDS]
    labels = _rows_by_id(embedding_warehouses.rows[wh.V1])
    probes = [r for r in rows if r["split"] == "eval"][:20]
    hits = 0
    for probe in probes:
        got = sq.run_named_query(engines["duckdb"], "neighbors", {"model_version": wh.V1,
                                                                 "image_id": probe["image_id"], "k": 5})
        hits += sum(labels[r["image_id"]]["label"] == probe["label"] for r in got.records())
    assert hits / (5 * len(probes)) >= 0.8  # 16-dim PCA of raw pixels; the trained model is tested at 0.9.


def test_label_centroids_are_the_label_means(engines: dict[str, sq.SqlEngine],
                                             embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    rows = embedding_warehouses.rows[wh.V1]
    for engine in engines.values():
        for record in sq.run_named_query(engine, "label_centroids", {"model_version": wh.V1}).records():
            members = np.asarray([r["embedding"] for r in rows if r["label"] == record["label"]], dtype=np.float32)
            assert record["images"] == len(members)
            np.testing.assert_allclose(record["centroid"], members.astype(np.float64).mean(axis=0), rtol=1e-9,
                                       atol=1e-12)


def test_label_outliers_rank_flipped_labels_first(engines: dict[str, sq.SqlEngine],
                                                  embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    true_label = {r["image_id"]: r["uri"].split("/")[-2] for r in embedding_warehouses.rows[wh.V1]}
    for engine in engines.values():
        top = sq.run_named_query(engine, "label_outliers", {"model_version": wh.V1,
                                                            "limit": len(wh.FLIPPED_IDS) + 3}).records()
        top_ids = [r["image_id"] for r in top]
        assert set(wh.FLIPPED_IDS) <= set(top_ids)
        for record in top:
            if record["image_id"] in wh.FLIPPED_IDS:
                assert record["nearest_other_label"] == true_label[record["image_id"]]
                assert record["margin"] < 0


def test_near_duplicates_finds_the_planted_copies_and_agrees_with_brute_force(
    engines: dict[str, sq.SqlEngine], embedding_warehouses: wh.EmbeddingWarehouses
) -> None:
    for engine in engines.values():
        planted = sq.run_named_query(engine, "near_duplicates", {"model_version": wh.V1, "threshold": 0.999})
        assert {frozenset((r["image_id_a"], r["image_id_b"])) for r in planted.records()} == {
            frozenset(pair) for pair in wh.DUPLICATE_OF.items()
        }
    rows = embedding_warehouses.rows[wh.V1]
    ids = [r["image_id"] for r in rows]
    matrix = np.asarray([r["embedding"] for r in rows], dtype=np.float32).astype(np.float64)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    similarity = matrix @ matrix.T
    threshold = 0.95
    truth = {frozenset((ids[i], ids[j])) for i in range(len(ids)) for j in range(i + 1, len(ids))
             if similarity[i, j] >= threshold}
    found = sq.run_named_query(engines["duckdb"], "near_duplicates",
                               {"model_version": wh.V1, "threshold": threshold, "limit": 100000}).records()
    found_pairs = {frozenset((r["image_id_a"], r["image_id_b"])) for r in found}
    assert found_pairs <= truth  # Every reported pair really is above the threshold...
    assert len(found_pairs) >= 0.95 * len(truth) and len(truth) > 3  # ...and blocking misses few.


def test_near_duplicates_scores_only_pairs_within_blocks(engines: dict[str, sq.SqlEngine],
                                                        embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    n = len(embedding_warehouses.rows[wh.V1])
    for engine in engines.values():
        # threshold -1 keeps every scored pair, so the result is the set of candidate pairs.
        scored = sq.run_named_query(engine, "near_duplicates", {"model_version": wh.V1, "threshold": -1.0,
                                                                "bands": 2, "band_bits": 8, "limit": 10**6})
        assert 0 < len(scored.rows) < 0.1 * n * (n - 1) / 2
        assert {frozenset(p) for p in wh.DUPLICATE_OF.items()} <= {
            frozenset((r["image_id_a"], r["image_id_b"])) for r in scored.records()}


def test_a_sql_injection_attempt_in_a_parameter_is_treated_as_data(engines: dict[str, sq.SqlEngine]) -> None:
    attacks = ["digit-0001' OR '1'='1", "x'; DROP TABLE embeddings; --", 'x"; DROP TABLE "embeddings"; --']
    for engine in engines.values():
        before = sq.run_named_query(engine, "versions").rows
        for attack in attacks:
            assert sq.run_named_query(engine, "neighbors", {"model_version": wh.V1, "image_id": attack}).rows == []
            assert sq.run_named_query(engine, "stats", {"model_version": attack}).rows == []
        assert sq.run_named_query(engine, "versions").rows == before


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("neighbors", {"model_version": wh.V1}, "exactly one of"),
        ("neighbors", {"model_version": wh.V1, "image_id": "a", "vector": "1,2"}, "exactly one of"),
        ("neighbors", {"model_version": wh.V1, "image_id": "a", "k": "ten"}, "k must be int64"),
        ("neighbors", {"model_version": wh.V1, "image_id": "a", "k": 0}, "k must be >= 1"),
        ("stats", {"model_version": wh.V1, "k": 3}, "stats takes"),
        ("near_duplicates", {"model_version": wh.V1, "threshold": 2}, "threshold"),
        ("no_such_query", {}, "unknown query"),
    ],
)
def test_bad_parameters_are_rejected_before_running(engines: dict[str, sq.SqlEngine], name: str,
                                                    params: dict[str, Any], message: str) -> None:
    with pytest.raises(sq.QueryError, match=message):
        sq.run_named_query(engines["duckdb"], name, params)


def test_every_declared_parameter_is_bound_in_both_dialects() -> None:
    for query in sq.NAMED_QUERIES.values():
        names = [p.name for p in query.params if p.in_sql] + (
            [sq.MODEL_VERSION_PARAM] if query.by_model_version else [])
        for name in names:
            assert f"@{name}" in query.bigquery, (query.name, name)
            assert query.duckdb is None or f"${name}" in query.duckdb, (query.name, name)
        if query.duckdb is None:  # BigQuery only: reads the stored table so BigQuery can use its vector index.
            assert "{raw_table}" in query.bigquery
        else:
            assert "{table}" in query.bigquery and "{table}" in query.duckdb


# --------------------------------------------------------------------------- reruns: newest row wins

RERUN_VERSION = "rerun-v1"
RERUN_RELABELED = ("digit-0004", "digit-0009")
RERUN_CASES: list[tuple[str, dict[str, Any]]] = [
    ("versions", {}),
    ("stats", {}),
    ("neighbors", {"image_id": "digit-0003", "k": 8}),
    ("neighbors", {"vector": ",".join(["0.25"] * 16), "k": 5}),
    ("label_centroids", {}),
    ("label_outliers", {"limit": 50}),
    ("near_duplicates", {"threshold": 0.5, "limit": 500}),
]


@pytest.fixture(scope="module")
def rerun_warehouses(tmp_path_factory: pytest.TempPathFactory,
                     bigquery_emulator: Any) -> Iterator[dict[str, dict[str, str]]]:
    """Per warehouse kind: ``twice`` got a first run, then a rerun; ``once`` got only the rerun.

    The rerun has the same images with a later created_at, two of them relabeled, so only the
    newest-row-wins rule makes ``twice`` answer like ``once``.
    """
    first_created = wh.V1_CREATED_AT
    first = wh.digits_embedding_rows(RERUN_VERSION, count=60, method="pca", created_at=first_created)
    rerun = [{**row, "created_at": first_created + datetime.timedelta(days=1),
              "label": "9" if row["image_id"] in RERUN_RELABELED else row["label"]} for row in first]
    root = tmp_path_factory.mktemp("rerun")
    bucket = bigquery_emulator.gcs.create_bucket()
    bigquery_args = [f"--temp_location=gs://{bucket}/tmp", f"--project={bigquery_emulator.project}"]
    uris: dict[str, dict[str, str]] = {}
    for label in ("twice", "once"):
        uris[label] = {
            "duckdb": f"duckdb:{root / label}.duckdb",
            "parquet": f"parquet:{root / label}",
            "bigquery": f"bigquery:{bigquery_emulator.create_dataset()}.embeddings",
        }
    for kind in ("duckdb", "parquet", "bigquery"):
        args = bigquery_args if kind == "bigquery" else []
        wh.write_rows(first, uris["twice"][kind], args)
        wh.write_rows(rerun, uris["twice"][kind], args)
        wh.write_rows(rerun, uris["once"][kind], args)
    yield uris


def test_a_rerun_gives_every_named_query_the_answer_of_one_run(rerun_warehouses: dict[str, dict[str, str]]) -> None:
    for kind in ("duckdb", "parquet", "bigquery"):
        twice, once = sq.open_engine(rerun_warehouses["twice"][kind]), sq.open_engine(rerun_warehouses["once"][kind])
        try:
            assert sq.run_sql(twice, "SELECT COUNT(*) AS n FROM {raw_table}").rows == [(120,)], kind
            assert sq.run_sql(twice, "SELECT COUNT(*) AS n FROM {table}").rows == [(60,)], kind
            for name, params in RERUN_CASES:
                got, want = sq.run_named_query(twice, name, params), sq.run_named_query(once, name, params)
                assert want.rows, f"{kind} {name} returned nothing; the comparison would be empty"
                assert got.columns == want.columns and len(got.rows) == len(want.rows), (kind, name)
                for i, (row, expected) in enumerate(zip(got.rows, want.rows)):
                    for column, x, y in zip(got.columns, row, expected):
                        _assert_same(x, y, f"{kind} {name} row {i} {column}")
            stats = sq.run_named_query(twice, "stats").records()
            assert sum(r["row_count"] for r in stats) == 60, kind
            centroids = {r["label"]: r["images"] for r in sq.run_named_query(twice, "label_centroids").records()}
            assert centroids == {r["label"]: r["images"] for r in sq.run_named_query(once, "label_centroids").records()}
        finally:
            twice.close()
            once.close()


def test_ties_on_created_at_are_broken_the_same_way_every_time(tmp_path) -> None:
    created = wh.V1_CREATED_AT
    rows = wh.digits_embedding_rows(RERUN_VERSION, count=4, method="pixels", created_at=created)
    tied = [{**row, "label": "x"} for row in rows]  # Same key, same created_at, different label.
    uri_a, uri_b = f"duckdb:{tmp_path / 'a.duckdb'}", f"duckdb:{tmp_path / 'b.duckdb'}"
    wh.write_rows(rows + tied, uri_a)
    wh.write_rows(tied + rows, uri_b)
    answers = []
    for uri in (uri_a, uri_b):
        engine = sq.open_engine(uri)
        try:
            answers.append(sq.run_sql(engine, "SELECT image_id, label FROM {table} ORDER BY image_id").rows)
        finally:
            engine.close()
    assert answers[0] == answers[1] and {label for _, label in answers[0]} == {"x"}  # label DESC: 'x' > digits.
