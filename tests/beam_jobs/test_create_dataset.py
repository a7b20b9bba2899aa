"""create_dataset end to end: real files through real pipelines, outputs read back."""

from __future__ import annotations

import csv
import importlib.metadata
import io
import os
import shutil

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from beam_jobs import create_dataset
from model_lib import sample_data
from model_lib.dataset_io import read_dataset
from model_lib.preprocessing import PIXELS
from schemas import dataset, layout
from schemas.dataset_info import Accounting, DatasetInfo
from schemas.publication import published_dir
from transforms.dead_letters import read_dead_letters
from transforms.runner_policy import make_pipeline_options

DIGITS = 240


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> sample_data.SampleData:
    return sample_data.write_digits(str(tmp_path_factory.mktemp("digits")), limit=DIGITS)


def _run(manifest: str, output_dir: str, *extra: str) -> DatasetInfo:
    create_dataset.run(["--manifest", manifest, "--output_dir", output_dir, *extra])
    return create_dataset.read_dataset_info(published_dir(output_dir))


def _records(output_dir: str, split_names=("train", "valid", "test")) -> list[dict]:
    records = []
    for split in split_names:
        files = tf.io.gfile.glob(layout.split_pattern(published_dir(output_dir), split))
        assert files, f"no shard for split {split}"
        for raw in tf.data.TFRecordDataset(files, compression_type="GZIP"):
            records.append(dataset.DATASET_RECORD.from_tf_example(raw.numpy()))
    return records


def _membership(records: list[dict]) -> set[tuple]:
    return {(r["image_id"], r["split"], r["label"], r["sha256"], r["image"]) for r in records}


def _write_manifest(path: str, rows: list[tuple[str, ...]], header: bool = False) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        if header:
            writer.writerow(["uri", "label"])
        writer.writerows(rows)
    return path


def test_png_round_trip_returns_every_image_exactly_with_its_label(digits, tmp_path):
    out = str(tmp_path / "ds")
    info = _run(digits.manifest, out, "--labels_file", digits.labels_file, "--image_size", "32",
                "--channels", "1", "--image_format", "png")
    out = published_dir(out)
    assert info.accounting == Accounting(read=DIGITS, written=DIGITS, rejected=0)
    expected = dict(csv.reader(open(digits.manifest)))
    seen = {}
    for split in ("train", "valid", "test"):
        for example in read_dataset(layout.split_pattern(out, split)):
            uri = example["uri"].numpy().decode()
            seen[uri] = example
            assert example["label"].numpy().decode() == expected[uri]
            assert digits.labels[int(example["label_index"])] == expected[uri]
            decoded = tf.io.decode_png(example["image"], channels=1).numpy()[..., 0]
            np.testing.assert_array_equal(decoded, np.asarray(Image.open(uri)))
    assert set(seen) == set(expected)
    for name in (layout.LABELS_FILE, layout.SCHEMA_FILE, layout.DATASET_INFO_FILE):
        assert os.path.exists(os.path.join(out, name)), name
    assert open(os.path.join(out, layout.LABELS_FILE)).read().split() == digits.labels
    assert info.counts["train"].total > info.counts["test"].total > 0
    assert info.parameters["package_version"] == importlib.metadata.version("vision-pipelines")
    assert sum(c.total for c in info.counts.values()) == DIGITS

    # The transform graph standardizes pixels with train-split statistics.
    transform = tft.TFTransformOutput(out)
    batch = next(iter(read_dataset(layout.split_pattern(out, "train"), batch_size=64)))
    pixels = transform.transform_features_layer()({dataset.IMAGE: batch[dataset.IMAGE]})[PIXELS]
    assert pixels.shape == (64, 32, 32, 1)
    assert abs(float(tf.reduce_mean(pixels))) < 0.3
    assert 0.7 < float(tf.math.reduce_std(pixels)) < 1.3
    assert not os.path.exists(os.path.join(out, "tft_temp"))


def test_jpeg_round_trip_is_within_jpeg_tolerance(digits, tmp_path):
    out = str(tmp_path / "ds")
    _run(digits.manifest, out, "--image_size", "32", "--channels", "3", "--image_format", "jpeg",
         "--jpeg_quality", "95", "--skip_analysis")
    records = _records(out)
    assert len(records) == DIGITS
    for record in records[:50]:
        decoded = tf.io.decode_jpeg(record["image"]).numpy().astype(np.int32)
        source = np.asarray(Image.open(record["uri"]).convert("RGB")).astype(np.int32)
        assert decoded.shape == (32, 32, 3)
        assert np.abs(decoded - source).mean() < 4.0


def test_runs_and_shard_counts_give_the_same_records(digits, tmp_path):
    flags = ("--image_size", "16", "--channels", "1", "--image_format", "png", "--skip_analysis")
    first = _run(digits.manifest, str(tmp_path / "a"), *flags)
    second = _run(digits.manifest, str(tmp_path / "b"), *flags, "--num_shards", "3")
    assert len(tf.io.gfile.glob(layout.split_pattern(published_dir(str(tmp_path / "b")), "train"))) == 3
    assert _membership(_records(str(tmp_path / "a"))) == _membership(_records(str(tmp_path / "b")))
    assert first.fingerprint == second.fingerprint
    assert first.counts == second.counts


def test_bad_inputs_are_dead_lettered_with_reasons_and_accounted(image_corpus, digits, tmp_path):
    manifest = str(tmp_path / "manifest.csv")
    _write_manifest(manifest, image_corpus.manifest_rows(), header=True)
    with open(manifest, "a") as handle:
        handle.write("a,b,c,d\n")  # too many fields
        handle.write('"unterminated,3\n')  # broken quoting
        handle.write(",5\n")  # no uri
    out = str(tmp_path / "ds")
    info = _run(manifest, out, "--labels_file", digits.labels_file, "--image_size", "24", "--max_pixels",
                "1000000", "--skip_analysis")
    letters = read_dead_letters(out)
    by_ref = {letter.input_ref: letter for letter in letters}
    rows = {uri: line for line, (uri, _) in enumerate(image_corpus.manifest_rows(), start=2)}
    for path, reason in image_corpus.expected.items():
        ref = f"{manifest}:{rows[path]}"
        if reason is None:
            assert ref not in by_ref, by_ref.get(ref)
        else:
            assert by_ref[ref].error_type == reason, (path, by_ref[ref])
    malformed = [letter for letter in letters if letter.error_type == "malformed_row"]
    assert sorted(letter.input_ref for letter in malformed) == [f"{manifest}:{n}" for n in (15, 16, 17)]
    written = {r["uri"] for r in _records(out)}
    assert written == {p for p, reason in image_corpus.expected.items() if reason is None}
    good, bad = len(written), sum(1 for r in image_corpus.expected.values() if r is not None) + 3
    assert info.accounting == Accounting(read=good + bad, written=good, rejected=bad)
    assert info.rejected["malformed_row"] == 3
    assert len(letters) == bad


def test_ratings_vote_on_unlabeled_images(digits, tmp_path):
    paths = [row[0] for row in csv.reader(open(digits.manifest))][:4]
    manifest = _write_manifest(str(tmp_path / "m.csv"), [(p, "") for p in paths])
    ratings = _write_manifest(str(tmp_path / "r.csv"), [
        (paths[0], "ann", "7"), (paths[0], "bob", "7"), (paths[0], "cy", "1"),
        (paths[1], "ann", "2"), (paths[1], "bob", "3"),
        (paths[3], "ann", "4"),
        (str(tmp_path / "elsewhere.png"), "ann", "4"),
    ])
    out = str(tmp_path / "ds")
    info = _run(manifest, out, "--ratings", ratings, "--min_agreement", "0.6", "--image_size", "16",
                "--skip_analysis", "--split", "1", "--split_names", "train")
    assert {(r["uri"], r["label"]) for r in _records(out, ("train",))} == {(paths[0], "7"), (paths[3], "4")}
    assert info.rejected == {"no_label": 1, "tied_vote": 1}
    assert info.rejected_ratings == {"rating_for_unknown_image": 1}
    assert info.labels == ["4", "7"]
    assert info.accounting.balanced


def test_content_dedupe_merges_identical_files_into_one_record(digits, tmp_path):
    rows = list(csv.reader(open(digits.manifest)))[:6]
    copy = str(tmp_path / "copy_of_first.png")
    shutil.copy(rows[0][0], copy)
    manifest = _write_manifest(str(tmp_path / "m.csv"), rows + [(copy, rows[0][1])])
    out = str(tmp_path / "ds")
    info = _run(manifest, out, "--dedupe", "content", "--image_size", "16", "--skip_analysis")
    records = _records(out)
    assert len(records) == 6
    letters = read_dead_letters(out)
    assert [(letter.error_type, letter.input_ref) for letter in letters] == [("duplicate_content", f"{manifest}:7")]
    first = next(r for r in records if r["uri"] == rows[0][0])
    assert first["image_id"] == first["sha256"][:32]
    assert info.accounting == Accounting(read=7, written=6, rejected=1)


def test_multi_processing_runner_gives_the_same_records(digits, tmp_path):
    flags = ("--image_size", "16", "--channels", "1", "--image_format", "png", "--skip_analysis")
    _run(digits.manifest, str(tmp_path / "in_memory"), *flags)
    _run(digits.manifest, str(tmp_path / "multi"), *flags, "--direct_running_mode=multi_processing",
         "--direct_num_workers=2")
    assert _membership(_records(str(tmp_path / "in_memory"))) == _membership(_records(str(tmp_path / "multi")))


def test_pipeline_round_trips_through_the_runner_api(digits, tmp_path):
    options = make_pipeline_options(["--manifest", digits.manifest, "--output_dir", str(tmp_path / "x")],
                                    job_options=create_dataset.CreateDatasetOptions)
    config = create_dataset.CreateDatasetConfig.from_options(options)
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | "CreateDataset" >> create_dataset.CreateDataset(config, str(tmp_path / "x"), str(tmp_path / "t"))
    proto = pipeline.to_runner_api()
    restored = beam.Pipeline.from_runner_api(proto, pipeline.runner, options)
    names = {t.unique_name for t in restored.to_runner_api().components.transforms.values()}
    assert any("AnalyzeTrainSplit" in name for name in names)
    assert any("WriteDeadLetters" in name for name in names)


def test_gcs_input_and_output_through_the_storage_emulator(gcs_emulator, digits):
    bucket = gcs_emulator.create_bucket()
    rows = list(csv.reader(open(digits.manifest)))[:30]
    gs_rows = []
    for uri, label in rows:
        gs_uri = f"gs://{bucket}/images/{os.path.basename(uri)}"
        with FileSystems.create(gs_uri) as handle:
            handle.write(open(uri, "rb").read())
        gs_rows.append((gs_uri, label))
    gs_rows.append((f"gs://{bucket}/images/missing.png", "1"))
    manifest = f"gs://{bucket}/all_data.csv"
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(gs_rows)
    with FileSystems.create(manifest) as handle:
        handle.write(text.getvalue().encode())
    out = f"gs://{bucket}/dataset"
    # tf.Transform writes through TensorFlow's own GCS client, which cannot be
    # pointed at an emulator; everything Beam reads and writes goes to it here.
    info = _run(manifest, out, "--image_size", "16", "--channels", "1", "--image_format", "png",
                "--skip_analysis")
    assert info.accounting == Accounting(read=31, written=30, rejected=1)
    assert [letter.error_type for letter in read_dead_letters(out)] == ["missing_file"]
    published = published_dir(out)
    assert published != out
    shards = FileSystems.match([layout.split_pattern(published, "train")])[0].metadata_list
    assert shards
    local = [gcs_emulator.local_path(m.path) for m in shards]
    uris = {dataset.DATASET_RECORD.from_tf_example(raw.numpy())["uri"]
            for raw in tf.data.TFRecordDataset(local, compression_type="GZIP")}
    assert uris and uris <= {uri for uri, _ in gs_rows}
    assert FileSystems.exists(layout.join(published, layout.SCHEMA_FILE))
    assert FileSystems.exists(layout.join(published, layout.LABELS_FILE))
