"""extract_embeddings end to end on real digits with the trained digits model.

One multi-processing run writes a DuckDB warehouse from a manifest with a
corrupt and a missing image and a few deliberately flipped labels; one
in-process run writes the same images to the BigQuery emulator.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import duckdb
import numpy as np
import pytest
import tensorflow as tf

from beam_jobs import extract_embeddings
from model_lib import sample_data
from retrieval import sql_queries as sq
from schemas import model_artifacts
from schemas.model_artifacts import ModelInfo
from schemas.publication import published_dir
from schemas.warehouse import RUNS_SUFFIX
from transforms.dead_letters import read_dead_letters
from transforms.splitting import image_id_for_uri

IMAGES = 200
FLIPPED_ROWS = (3, 17, 58, 101, 150)  # Manifest rows whose label is replaced by the next digit.
MULTI_PROCESSING = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


@dataclasses.dataclass(frozen=True)
class Corpus:
    manifest: str
    uris: list[str]  # Good images, in manifest order.
    true_labels: dict[str, str]  # image_id -> real digit.
    given_labels: dict[str, str]  # image_id -> label in the manifest (flipped for FLIPPED_ROWS).
    bad_uris: list[str]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("embed_corpus")
    written = sample_data.write_digits(str(root), limit=IMAGES)
    with open(written.manifest) as handle:
        rows = [line.split(",") for line in handle.read().splitlines()]
    corrupt = os.path.join(root, "corrupt.png")
    with open(corrupt, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\nnot really a png")
    missing = os.path.join(root, "missing.png")
    lines, given = [], {}
    for i, (uri, label) in enumerate(rows):
        label = str((int(label) + 1) % 10) if i in FLIPPED_ROWS else label
        lines.append(f"{uri},{label}")
        given[image_id_for_uri(uri)] = label
    lines += [f"{corrupt},1", f"{missing},2"]
    manifest = os.path.join(root, "manifest.csv")
    with open(manifest, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return Corpus(
        manifest=manifest,
        uris=[uri for uri, _ in rows],
        true_labels={image_id_for_uri(uri): label for uri, label in rows},
        given_labels=given,
        bad_uris=[corrupt, missing],
    )


@dataclasses.dataclass(frozen=True)
class Run:
    warehouse: str
    artifacts_dir: str
    exit_code: int
    rows: list[dict[str, Any]]


@pytest.fixture(scope="module")
def duckdb_run(corpus: Corpus, trained_digits_model: str, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("embed_duckdb")
    warehouse = f"duckdb:{out / 'warehouse.duckdb'}"
    code = extract_embeddings.main([
        "--model_dir", trained_digits_model, "--input", corpus.manifest, "--warehouse", warehouse,
        "--max_batch_size", "32", *MULTI_PROCESSING,
    ])
    with duckdb.connect(str(out / "warehouse.duckdb"), read_only=True) as connection:
        cursor = connection.execute("SELECT * FROM embeddings ORDER BY image_id")
        columns = [d[0] for d in cursor.description]
        rows = [dict(zip(columns, row)) for row in cursor.fetchall()]
    return Run(warehouse, str(out / f"warehouse.duckdb{RUNS_SUFFIX}"), code, rows)


def test_accounting_holds_and_bad_images_are_dead_letters(corpus: Corpus, duckdb_run: Run) -> None:
    assert duckdb_run.exit_code == 0
    letters = read_dead_letters(duckdb_run.artifacts_dir)
    assert sorted(letter.input_ref for letter in letters) == sorted(corpus.bad_uris)
    # Parallel writers produced a complete table: images minus dead letters.
    assert len(duckdb_run.rows) == len(corpus.uris) + len(corpus.bad_uris) - len(letters)
    assert sorted(r["image_id"] for r in duckdb_run.rows) == sorted(corpus.true_labels)


def test_embeddings_equal_the_saved_model_output(corpus: Corpus, duckdb_run: Run, trained_digits_model: str) -> None:
    info = ModelInfo.read(trained_digits_model)
    loaded = tf.saved_model.load(os.path.join(trained_digits_model, model_artifacts.SAVED_MODEL_DIR))
    signature = loaded.signatures[model_artifacts.SERVING_SIGNATURE]
    images = []
    for uri in corpus.uris:
        with open(uri, "rb") as handle:
            images.append(handle.read())
    expected = signature(**{model_artifacts.IMAGE_BYTES_INPUT: tf.constant(images)})[
        model_artifacts.OUTPUT_EMBEDDING].numpy()
    by_id = {r["image_id"]: r for r in duckdb_run.rows}
    got = np.asarray([by_id[image_id_for_uri(uri)]["embedding"] for uri in corpus.uris], dtype=np.float32)
    assert got.shape == (len(corpus.uris), info.embedding_dim)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert {r["model_version"] for r in duckdb_run.rows} == {info.model_version}
    assert len({r["created_at"] for r in duckdb_run.rows}) == 1
    assert all(r["label"] == corpus.given_labels[r["image_id"]] for r in duckdb_run.rows)


def _precision_at_5(engine: sq.SqlEngine, corpus: Corpus, probes: list[str]) -> float:
    hits = 0
    for image_id in probes:
        neighbors = sq.run_named_query(engine, "neighbors", {"image_id": image_id, "k": 5}).records()
        hits += sum(corpus.true_labels[n["image_id"]] == corpus.true_labels[image_id] for n in neighbors)
    return hits / (5 * len(probes))


def test_neighbors_of_a_digit_are_the_same_digit(corpus: Corpus, duckdb_run: Run) -> None:
    probes = sorted(corpus.true_labels)[:40]
    engine = sq.open_engine(duckdb_run.warehouse)
    try:
        assert _precision_at_5(engine, corpus, probes) >= 0.9
    finally:
        engine.close()


def test_label_outliers_rank_the_flipped_labels_near_the_top(corpus: Corpus, duckdb_run: Run) -> None:
    flipped = {image_id_for_uri(corpus.uris[i]) for i in FLIPPED_ROWS}
    engine = sq.open_engine(duckdb_run.warehouse)
    try:
        top = sq.run_named_query(engine, "label_outliers", {"limit": 2 * len(flipped)}).records()
    finally:
        engine.close()
    assert flipped <= {r["image_id"] for r in top}


def test_bigquery_warehouse_gives_the_same_neighbors_as_duckdb(
    corpus: Corpus, duckdb_run: Run, trained_digits_model: str, bigquery_emulator
) -> None:
    bucket = bigquery_emulator.gcs.create_bucket()
    warehouse = f"bigquery:{bigquery_emulator.create_dataset()}.embeddings"
    code = extract_embeddings.main([
        "--model_dir", trained_digits_model, "--input", corpus.manifest, "--warehouse", warehouse,
        "--artifacts_dir", f"gs://{bucket}/artifacts", f"--temp_location=gs://{bucket}/tmp",
        f"--project={bigquery_emulator.project}",
    ])
    assert code == 0
    engines = {"duckdb": sq.open_engine(duckdb_run.warehouse), "bigquery": sq.open_engine(warehouse)}
    try:
        for image_id in sorted(corpus.true_labels)[:5]:
            results = {kind: sq.run_named_query(e, "neighbors", {"image_id": image_id, "k": 5}).records()
                       for kind, e in engines.items()}
            assert [r["image_id"] for r in results["bigquery"]] == [r["image_id"] for r in results["duckdb"]]
            np.testing.assert_allclose([r["similarity"] for r in results["bigquery"]],
                                       [r["similarity"] for r in results["duckdb"]], rtol=1e-6)
    finally:
        for engine in engines.values():
            engine.close()


def test_dataset_input_carries_split_and_label_into_parquet(digits_dataset, trained_digits_model: str,
                                                            tmp_path) -> None:
    from beam_jobs import cli
    from schemas import dataset, layout
    from schemas.dataset import DATASET_RECORD

    pattern = layout.split_pattern(published_dir(digits_dataset.dataset_dir), "test")
    expected = {}
    for record in tf.data.TFRecordDataset(tf.io.gfile.glob(pattern), compression_type="GZIP"):
        parsed = DATASET_RECORD.from_tf_example(record.numpy())
        expected[parsed[dataset.IMAGE_ID]] = parsed[dataset.LABEL]
    warehouse = f"parquet:{tmp_path / 'warehouse'}"
    assert cli.main(["extract-embeddings", "--model_dir", trained_digits_model, "--input", pattern,
                     "--warehouse", warehouse]) == 0
    engine = sq.open_engine(warehouse)
    try:
        rows = sq.run_sql(engine, "SELECT image_id, label, split FROM {table}").records()
    finally:
        engine.close()
    assert {r["image_id"]: r["label"] for r in rows} == expected and len(rows) == len(expected)
    assert {r["split"] for r in rows} == {"test"}
