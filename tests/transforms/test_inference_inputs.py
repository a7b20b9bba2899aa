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

from schemas import counters, dataset, layout
from transforms import images
from transforms.dead_letters import RejectedInput, counter_total
from transforms.image_inputs import KeyedImage
from transforms.inference_inputs import (
    CORRUPT_RECORD,
    CORRUPT_TFRECORD,
    InputSpec,
    ReadImageInputs,
    image_source,
)
from transforms.serving_bytes import serving_bytes
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


def served_sha(path: str) -> str:
    """The sha256 of the bytes the model is handed: the file's own, or a PNG of its pixels (serving_bytes)."""
    with open(path, "rb") as handle:
        data = handle.read()
    return hashlib.sha256(serving_bytes(data, images.check_image(data, MAX_PIXELS))).hexdigest()


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
        (image_id_for_uri(uri), image_id_for_uri(uri), uri, label, None, os.path.dirname(uri), served_sha(uri))
        for uri, label in good.items()
    ]
    # The EXIF-rotated JPEG travels on as an upright PNG; every other good file as read.
    assert [uri for uri in good if served_sha(uri) != file_sha(uri)] == [
        uri for uri in good if uri.endswith("exif_rotated.jpg")]
    expected_letters = [(uri, counters.LOAD_IMAGE_STAGE, reason) for uri, reason in bad.items()]
    expected_letters.append((f"{manifest}:{len(rows) + 1}", counters.READ_MANIFEST_STAGE, "malformed_row"))

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
            equal_to([(str(tmp_path / "img_bad.png"), counters.LOAD_IMAGE_STAGE, images.NOT_AN_IMAGE)]),
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


def _write_shard(path: str, records: list[dict], compression: str = "GZIP") -> None:
    with tf.io.TFRecordWriter(path, tf.io.TFRecordOptions(compression_type=compression)) as writer:
        for record in records:
            writer.write(dataset.DATASET_RECORD.to_tf_example(record))


def _readable_prefix(path: str, compression: str) -> int:
    """How many records TensorFlow's own reader gets from a damaged shard before it fails."""
    count = 0
    try:
        for _ in tf.data.TFRecordDataset(path, compression_type=compression):
            count += 1
    except tf.errors.DataLossError:
        pass
    return count


def image_id_of(element: KeyedImage) -> str:
    return element[0]


def test_damaged_shards_dead_letter_their_unreadable_tail_and_the_rest_is_read(tmp_path):
    records = [_dataset_record(i, _png(i * 7 % 256), "test") for i in range(30)]
    good = str(tmp_path / "train-00000-of-00003.tfrecord.gz")
    truncated = str(tmp_path / "test-00001-of-00003.tfrecord.gz")
    corrupt = str(tmp_path / "test-00002-of-00003.tfrecord")
    _write_shard(good, records[:5])
    _write_shard(truncated, records[5:25])
    with open(truncated, "rb") as handle:
        data = handle.read()
    with open(truncated, "wb") as handle:
        handle.write(data[: len(data) * 6 // 10])
    _write_shard(corrupt, records[25:], compression="")
    with open(corrupt, "r+b") as handle:  # Flip one payload byte of the third record: its CRC fails.
        record_size = len(dataset.DATASET_RECORD.to_tf_example(records[25])) + 16
        handle.seek(2 * record_size + 40)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    kept_truncated = _readable_prefix(truncated, "GZIP")
    kept_corrupt = _readable_prefix(corrupt, "")
    assert 0 < kept_truncated < 20 and kept_corrupt == 2
    expected_ids = [r[dataset.IMAGE_ID] for r in records[:5] + records[5:5 + kept_truncated] + records[25:27]]
    expected_letters = [
        (f"{truncated}@record:{kept_truncated}", "read_dataset_shard", CORRUPT_TFRECORD),
        (f"{corrupt}@record:{kept_corrupt}", "read_dataset_shard", CORRUPT_TFRECORD),
    ]

    p = TestPipeline(runner="FnApiRunner")
    keyed, letters = p | ReadImageInputs(InputSpec(str(tmp_path / "*-of-*"), "dataset"))
    assert_that(keyed | beam.Map(image_id_of), equal_to(expected_ids), label="CheckImages")
    assert_that(letters | beam.Map(letter_reason), equal_to(expected_letters), label="CheckDeadLetters")
    result = p.run()
    result.wait_until_finish()
    # Each unreadable tail is one input read and rejected: read == images + dead letters.
    assert counter_total(result, "read") == len(expected_ids) + len(expected_letters)
