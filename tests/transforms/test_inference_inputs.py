"""ReadImageInputs: manifests, image globs and dataset TFRecords become validated, keyed images."""

from __future__ import annotations

import hashlib
import io
import os

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from schemas import dataset, layout
from transforms import images
from transforms.dead_letters import RejectedInput
from transforms.inference_inputs import (
    CORRUPT_RECORD,
    InputSpec,
    ReadImageInputs,
    image_source,
)
from transforms.model_handler import KeyedImage
from transforms.splitting import image_id_for_uri

# The corpus's bomb is 25M pixels; the default guard allows 50M.
MAX_PIXELS = 1_000_000


def describe(element: KeyedImage) -> tuple:
    key, image = element
    return key, image.image_id, image.uri, image.label, image.split, image.source, hashlib.sha256(
        image.image_bytes).hexdigest()


def letter_reason(letter) -> tuple[str, str, str]:
    return letter.input_ref, letter.stage, letter.error_type


def file_sha(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def run_read(spec: InputSpec) -> None:
    """Runs only the read, for tests that check construction-time failures."""
    with TestPipeline(runner="FnApiRunner") as p:
        _ = p | ReadImageInputs(spec)


def test_manifest_rows_are_keyed_and_bad_files_are_dead_lettered(image_corpus, tmp_path):
    manifest = tmp_path / "manifest.csv"
    rows = image_corpus.manifest_rows()
    manifest.write_text("".join(f"{uri},{label}\n" for uri, label in rows) + '"unterminated,1\n')
    good = {uri: label for uri, label in rows if image_corpus.expected[uri] in (None, "unknown_label")}
    bad = {uri: reason for uri, reason in image_corpus.expected.items() if reason not in (None, "unknown_label")}
    expected_images = [
        (image_id_for_uri(uri), image_id_for_uri(uri), uri, label, None, os.path.dirname(uri), file_sha(uri))
        for uri, label in good.items()
    ]
    expected_letters = [(uri, "load_image", reason) for uri, reason in bad.items()]
    expected_letters.append((f"{manifest}:{len(rows) + 1}", "read_manifest", "malformed_row"))

    with TestPipeline(runner="FnApiRunner") as p:
        keyed, letters = p | ReadImageInputs(InputSpec.resolve(str(manifest), max_pixels=MAX_PIXELS))
        assert_that(keyed | beam.Map(describe), equal_to(expected_images), label="CheckImages")
        assert_that(letters | beam.Map(letter_reason), equal_to(expected_letters), label="CheckDeadLetters")


def test_image_glob_reads_every_file_without_labels(tmp_path):
    paths = []
    for i in range(5):
        path = tmp_path / f"img_{i}.png"
        Image.new("L", (8, 8), i * 40).save(path)
        paths.append(str(path))
    (tmp_path / "img_bad.png").write_bytes(b"not an image")
    expected = [
        (image_id_for_uri(p), image_id_for_uri(p), p, None, None, str(tmp_path), file_sha(p)) for p in paths
    ]
    spec = InputSpec.resolve(str(tmp_path / "img_*.png"))
    assert spec.kind == "images"
    with TestPipeline(runner="FnApiRunner") as p:
        keyed, letters = p | ReadImageInputs(spec)
        assert_that(keyed | beam.Map(describe), equal_to(expected), label="CheckImages")
        assert_that(
            letters | beam.Map(letter_reason),
            equal_to([(str(tmp_path / "img_bad.png"), "load_image", images.NOT_AN_IMAGE)]),
            label="CheckDeadLetters",
        )


def test_empty_glob_fails_instead_of_predicting_nothing(tmp_path):
    with pytest.raises(Exception, match="Empty match"):
        run_read(InputSpec(str(tmp_path / "nothing_*.png"), "images"))


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


def _dataset_record(i: int, image: bytes, split: str) -> dict:
    uri = f"gs://bucket/images/{i}.png"
    return {
        dataset.IMAGE_ID: image_id_for_uri(uri), dataset.URI: uri, dataset.LABEL: str(i % 3),
        dataset.LABEL_INDEX: i % 3, dataset.SPLIT: split, dataset.IMAGE: image, dataset.FORMAT: "png",
        dataset.HEIGHT: 8, dataset.WIDTH: 8, dataset.CHANNELS: 1, dataset.ORIGINAL_HEIGHT: 8,
        dataset.ORIGINAL_WIDTH: 8, dataset.SHA256: hashlib.sha256(image).hexdigest(),
    }


def test_dataset_tfrecords_keep_ids_labels_and_splits(tmp_path):
    records = [_dataset_record(i, _png(i * 20), "train" if i < 4 else "test") for i in range(6)]
    corrupt = _dataset_record(6, b"\x89PNG\r\n\x1a\n truncated", "test")
    (tmp_path / layout.DATASET_INFO_FILE).write_text("{}")
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    with tf.io.TFRecordWriter(str(tmp_path / f"train-00000-of-00001{layout.TFRECORD_SUFFIX}"), options) as w:
        for record in records[:4]:
            w.write(dataset.DATASET_RECORD.to_tf_example(record))
    with tf.io.TFRecordWriter(str(tmp_path / f"test-00000-of-00001{layout.TFRECORD_SUFFIX}"), options) as w:
        for record in records[4:]:
            w.write(dataset.DATASET_RECORD.to_tf_example(record))
        w.write(dataset.DATASET_RECORD.to_tf_example(corrupt))
        w.write(b"not a tf.Example")
    expected = [
        (r[dataset.IMAGE_ID], r[dataset.IMAGE_ID], r[dataset.URI], r[dataset.LABEL], r[dataset.SPLIT],
         "gs://bucket/images", r[dataset.SHA256])
        for r in records
    ]
    spec = InputSpec.resolve(str(tmp_path))
    assert spec.kind == "dataset"
    with TestPipeline(runner="FnApiRunner") as p:
        keyed, letters = p | ReadImageInputs(spec)
        assert_that(keyed | beam.Map(describe), equal_to(expected), label="CheckImages")
        assert_that(
            letters | beam.Map(lambda letter: (letter.stage, letter.error_type)),
            equal_to([("parse_dataset_record", images.CORRUPT_IMAGE), ("parse_dataset_record", CORRUPT_RECORD)]),
            label="CheckDeadLetters",
        )


@pytest.mark.parametrize(
    "flag, kind",
    [("gs://b/all_data.csv", "manifest"), ("gs://b/d/train-*.tfrecord.gz", "dataset"), ("/data/*.jpg", "images")],
)
def test_input_kind_is_detected_from_the_flag(flag, kind):
    assert InputSpec.resolve(flag).kind == kind


def test_explicit_input_kind_wins_and_is_validated():
    assert InputSpec.resolve("/data/list.txt", "manifest").kind == "manifest"
    with pytest.raises(ValueError, match="kind=csv"):
        InputSpec("/data/x", "csv")


def test_check_image_reasons(image_corpus):
    for path, reason in image_corpus.expected.items():
        if reason in (images.EMPTY_FILE, images.MISSING_FILE):
            continue
        with open(path, "rb") as handle:
            data = handle.read()
        if reason in (None, "unknown_label"):
            images.check_image(data, MAX_PIXELS)
        else:
            with pytest.raises(RejectedInput) as raised:
                images.check_image(data, MAX_PIXELS)
            assert raised.value.error_type == reason, path


def test_image_source_is_the_directory():
    assert image_source("gs://bucket/a/b/c.jpg") == "gs://bucket/a/b"
    assert image_source("/data/x/y.png") == "/data/x"
