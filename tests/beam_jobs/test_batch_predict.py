"""batch_predict end to end: real images, the real exported digits model, outputs read back."""

from __future__ import annotations

import collections
import csv
import glob
import json
import os
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from sklearn.metrics import precision_recall_fscore_support

from beam_jobs import batch_predict, cli
from model_lib import sample_data
from schemas import model_artifacts, prediction
from schemas.classification_metrics import EvalReport, ModelMetrics
from schemas.dataset import DATASET_RECORD
from schemas.model_artifacts import ModelInfo
from schemas.publication import published_dir
from tests.fixtures.image_corpus import bad_idat_crc_png, model_refused_png
from transforms import images
from transforms.dead_letters import read_dead_letters
from transforms.model_handler import INFERENCE_FAILED
from transforms.prediction_eval import evaluation_report
from transforms.runner_policy import make_pipeline_options
from transforms.serving_bytes import serving_bytes
from transforms.splitting import image_id_for_uri

DIGITS = 48
MAX_PIXELS = 1_000_000  # The corpus's 25M-pixel bomb must be rejected.


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> sample_data.SampleData:
    return sample_data.write_digits(str(tmp_path_factory.mktemp("digits")), limit=DIGITS)


@pytest.fixture(scope="module")
def serving(trained_digits_model):
    """The SavedModel's own serving signature, called without Beam on the bytes the jobs hand it."""
    loaded = tf.saved_model.load(os.path.join(trained_digits_model, model_artifacts.SAVED_MODEL_DIR))
    signature = loaded.signatures[model_artifacts.SERVING_SIGNATURE]

    def predict(path: str) -> dict[str, np.ndarray] | None:
        with open(path, "rb") as handle:
            data = handle.read()
        data = serving_bytes(data, images.check_image(data, MAX_PIXELS))
        try:
            outputs = signature(**{model_artifacts.IMAGE_BYTES_INPUT: tf.constant([data])})
        except tf.errors.InvalidArgumentError:
            return None
        return {key: value.numpy()[0] for key, value in outputs.items()}

    return predict


def write_manifest(path: str, rows: list[tuple[str, str]]) -> str:
    with open(path, "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    return path


def read_rows(output_dir: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(prediction.jsonl_predictions_pattern(published_dir(output_dir)))):
        with open(path) as handle:
            rows.extend(json.loads(line) for line in handle if line.strip())
    return rows


def assert_rows_match_saved_model(rows: list[dict], serving, model_dir: str, top_k: int) -> None:
    info = ModelInfo.read(model_dir)
    for row in rows:
        assert list(row) == prediction.PREDICTION_RECORD.names
        want = serving(row["uri"])
        assert want is not None, row["uri"]
        probabilities = want[model_artifacts.OUTPUT_PROBABILITIES]
        assert row["image_id"] == image_id_for_uri(row["uri"])
        assert row["label"] == want[model_artifacts.OUTPUT_LABEL].decode("utf-8")
        assert row["label_index"] == int(want[model_artifacts.OUTPUT_LABEL_INDEX])
        assert row["score"] == pytest.approx(float(probabilities[row["label_index"]]), abs=1e-5)
        assert len(row["top_k_labels"]) == top_k
        assert row["top_k_labels"][0] == row["label"]
        np.testing.assert_allclose(
            row["top_k_probabilities"], [probabilities[info.labels.index(lb)] for lb in row["top_k_labels"]],
            atol=1e-5)
        assert row["top_k_probabilities"] == sorted(row["top_k_probabilities"], reverse=True)
        assert row["model_version"] == info.model_version


def write_file(path: str, data: bytes) -> str:
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def test_predicts_good_images_dead_letters_bad_ones_and_accounts_for_all(
    trained_digits_model, serving, digits, image_corpus, tmp_path
):
    with open(digits.manifest) as handle:
        rows = [tuple(r) for r in csv.reader(handle)]
    rows += image_corpus.manifest_rows()
    # The jobs' checks accept it, the model's decoder refuses it: only a retried batch saves its mates.
    model_refused = write_file(str(tmp_path / "unknown_critical_chunk.png"), model_refused_png())
    # Pillow would load it, the model's decoder would not: the jobs' PNG CRC check refuses it first.
    bad_idat = write_file(str(tmp_path / "bad_idat_crc.png"), bad_idat_crc_png())
    rows += [(model_refused, "4"), (bad_idat, "4")]
    random.Random(3).shuffle(rows)
    manifest = write_manifest(str(tmp_path / "manifest.csv"), rows)
    out = str(tmp_path / "out")

    result = batch_predict.run([
        "--model_dir", trained_digits_model, "--input", manifest, "--output", out, "--top_k", "3",
        "--min_batch_size", "4", "--max_batch_size", "8", "--max_pixels", str(MAX_PIXELS),
        "--slice_column", "source",
    ])

    predicted = read_rows(out)
    letters = read_dead_letters(out)
    # Expected outcome of every input: Pillow's reason, or the model's own verdict on the image alone.
    expected_letters = {uri: reason for uri, reason in image_corpus.expected.items()
                        if reason not in (None, "unknown_label")}
    expected_letters[bad_idat] = images.CORRUPT_IMAGE
    for uri, _ in rows:
        if uri not in expected_letters and serving(uri) is None:
            expected_letters[uri] = INFERENCE_FAILED
    assert expected_letters[model_refused] == INFERENCE_FAILED
    assert {letter.input_ref: letter.error_type for letter in letters} == expected_letters
    assert sorted(row["uri"] for row in predicted) == sorted(uri for uri, _ in rows if uri not in expected_letters)
    assert_rows_match_saved_model(predicted, serving, trained_digits_model, top_k=3)
    labels = dict(rows)
    assert all(row["true_label"] == labels[row["uri"]] for row in predicted)
    assert all(row["source"] == os.path.dirname(row["uri"]) for row in predicted)

    counts = batch_predict.accounting(result)
    assert counts["read"] == len(rows) == counts["predicted"] + counts["rejected"]
    assert counts["predicted"] == len(predicted) and counts["rejected"] == len(letters)
    assert counts["model_loads"] == 1

    report = EvalReport.read(os.path.join(published_dir(out), prediction.EVAL_FILE))
    truth = [row["true_label"] for row in predicted]
    guess = [row["label"] for row in predicted]
    classes = report.labels
    assert set(truth) | set(guess) <= set(classes)
    precision, recall, f1, support = precision_recall_fscore_support(truth, guess, labels=classes, zero_division=0)
    assert report.count == len(predicted)
    assert report.accuracy == pytest.approx(np.mean(np.array(truth) == np.array(guess)))
    for i, label in enumerate(classes):
        got = report.per_class[label]
        assert (got.precision, got.recall, got.f1) == pytest.approx((precision[i], recall[i], f1[i]))
        assert got.support == support[i]
    assert sum(s.count for s in report.slices["true_label"].values()) == len(predicted)
    by_source = report.slices["source"]
    assert set(by_source) == {row["source"] for row in predicted}
    assert sum(s.count for s in by_source.values()) == len(predicted)


def test_parquet_output_reads_back_with_the_schema(trained_digits_model, serving, digits, tmp_path):
    out = str(tmp_path / "out")
    assert cli.main([
        "batch-predict", "--model_dir", trained_digits_model, "--input", os.path.join(digits.image_dir, "*", "*.png"),
        "--output", out, "--output_format", "parquet", "--top_k", "2",
    ]) == 0
    table = pq.read_table(os.path.join(published_dir(out), prediction.PREDICTIONS_PREFIX))
    assert table.schema.remove_metadata() == prediction.PREDICTION_RECORD.arrow_schema()
    rows = table.to_pylist()
    assert len(rows) == DIGITS
    assert all(row["true_label"] is None for row in rows)
    for row in rows:
        row["top_k_probabilities"] = [float(p) for p in row["top_k_probabilities"]]
    assert_rows_match_saved_model(rows, serving, trained_digits_model, top_k=2)
    # No labels in the input: nothing to evaluate.
    assert not os.path.exists(os.path.join(published_dir(out), prediction.EVAL_FILE))
    assert read_dead_letters(out) == []


def test_bigquery_output_through_the_emulator(trained_digits_model, digits, bigquery_emulator, tmp_path):
    table_id = f"{bigquery_emulator.create_dataset()}.predictions"
    bucket = bigquery_emulator.gcs.create_bucket()
    artifacts = str(tmp_path / "artifacts")
    result = batch_predict.run([
        "--model_dir", trained_digits_model, "--input", digits.manifest, "--output", f"bigquery:{table_id}",
        "--artifacts_dir", artifacts, f"--temp_location=gs://{bucket}/tmp", f"--project={bigquery_emulator.project}",
    ])
    assert batch_predict.accounting(result)["predicted"] == DIGITS
    client = bigquery_emulator.client()
    table = client.get_table(table_id)
    assert [(f.name, f.field_type, f.mode) for f in table.schema] == [
        (f["name"], f["type"], f["mode"]) for f in prediction.PREDICTION_RECORD.bigquery_schema()["fields"]
    ]
    stored = {r["uri"]: dict(r) for r in client.query(f"SELECT * FROM `{table_id}`").result()}
    with open(digits.manifest) as handle:
        labels = dict(csv.reader(handle))
    assert set(stored) == set(labels)
    assert all(row["true_label"] == labels[uri] and len(row["top_k_labels"]) == 5 for uri, row in stored.items())
    loads = [job for job in client.list_jobs() if job.job_type == "load"
             and job.destination is not None and job.destination.table_id == table.table_id]
    assert loads, "rows must arrive through a load job (FILE_LOADS)"
    assert os.path.exists(os.path.join(published_dir(artifacts), prediction.EVAL_FILE))


def test_runs_on_two_worker_processes(trained_digits_model, serving, digits, tmp_path):
    out = str(tmp_path / "out")
    result = batch_predict.run([
        "--model_dir", trained_digits_model, "--input", digits.manifest, "--output", out, "--max_batch_size", "4",
        "--direct_running_mode=multi_processing", "--direct_num_workers=2",
    ])
    rows = read_rows(out)
    assert len(rows) == DIGITS
    assert_rows_match_saved_model(rows, serving, trained_digits_model, top_k=5)
    counts = batch_predict.accounting(result)
    assert counts["read"] == counts["predicted"] == DIGITS
    assert 1 <= counts["model_loads"] <= 2, "at most one load per worker process"


def test_dataset_tfrecords_are_predicted_with_their_ids_and_sliced_by_split(
    trained_digits_model, digits_dataset, tmp_path
):
    records = {}
    shards = glob.glob(os.path.join(published_dir(digits_dataset.dataset_dir), "*.tfrecord.gz"))
    for raw in tf.data.TFRecordDataset(shards, compression_type="GZIP"):
        record = DATASET_RECORD.from_tf_example(raw.numpy())
        records[record["image_id"]] = record
    out = str(tmp_path / "out")
    batch_predict.run(["--model_dir", trained_digits_model, "--input", digits_dataset.dataset_dir, "--output", out,
                       "--slice_column", "split"])
    rows = read_rows(out)
    assert sorted(row["image_id"] for row in rows) == sorted(records)
    for row in rows:
        record = records[row["image_id"]]
        assert (row["uri"], row["true_label"], row["split"]) == (record["uri"], record["label"], record["split"])
    report = EvalReport.read(os.path.join(published_dir(out), prediction.EVAL_FILE))
    splits = {row["split"] for row in rows}
    assert set(report.slices["split"]) == splits == {"train", "valid", "test"}
    for split in splits:
        in_split = [row for row in rows if row["split"] == split]
        assert report.slices["split"][split].count == len(in_split)
        assert report.slices["split"][split].accuracy == pytest.approx(
            np.mean([row["label"] == row["true_label"] for row in in_split]))
    # The trained model is good on digits; a broken input path (e.g. mismatched preprocessing) would not be.
    assert report.slices["split"]["test"].accuracy > 0.9
    # batch_predict's evaluation of the test split's rows is train's test evaluation, number for number.
    test_counts = collections.Counter((row["true_label"], row["label"]) for row in rows if row["split"] == "test")
    batch_side = evaluation_report({"confusion": test_counts, "slices": collections.Counter()},
                                   ModelInfo.read(trained_digits_model).labels)
    assert batch_side.shared_values() == ModelMetrics.read(trained_digits_model).test.shared_values()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--input", "x.csv", "--output", "o"], "--model_dir is required"),
        (["--model_dir", "m", "--input", "x.csv", "--output", "bigquery:my-project.ds.t"], "--artifacts_dir"),
        (["--model_dir", "m", "--input", "x.csv", "--output", "o", "--top_k", "0"], "top_k=0"),
    ],
)
def test_invalid_configuration_fails_before_launch(argv, message):
    with pytest.raises(ValueError, match=message):
        batch_predict.BatchPredictConfig.from_options(
            make_pipeline_options(argv, job_options=batch_predict.BatchPredictOptions))


def test_output_forms_resolve_to_rows_and_artifacts_locations(tmp_path):
    def config(*argv: str) -> batch_predict.BatchPredictConfig:
        return batch_predict.BatchPredictConfig.from_options(
            make_pipeline_options(["--model_dir", "m", "--input", "x.csv", *argv],
                                  job_options=batch_predict.BatchPredictOptions))

    jsonl = config("--output", "/out/")
    assert (jsonl.output_dir, jsonl.warehouse_uri, jsonl.artifacts_dir) == ("/out", None, None)
    parquet = config("--output", "/out", "--output_format", "parquet")
    assert (parquet.output_dir, parquet.output_format, parquet.warehouse_uri) == ("/out", "parquet", None)
    bigquery = config("--output", "bigquery:my-project.ds.t", "--artifacts_dir", "gs://b/run")
    assert (bigquery.warehouse_uri, bigquery.artifacts_dir) == ("bigquery:my-project.ds.t", "gs://b/run")
    duckdb = config("--output", "duckdb:/w/db.duckdb")
    assert (duckdb.artifacts_dir, duckdb.artifacts_root) == (None, "/w/db.duckdb.runs")
