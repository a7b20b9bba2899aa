"""Transient storage errors are retried; storage that stays down fails the pipeline, not the inputs.

``FlakyFileSystem`` is a real Beam FileSystem for the test-only scheme
``flakytest://``: local files whose opens fail with an I/O error as many times
as the test asks (or always), the way a flaky disk or a GCS outage does.
"""

from __future__ import annotations

import collections
import errno
import io

import apache_beam as beam
import pytest
from apache_beam.io.filesystem import CompressionTypes, FileMetadata, MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from google.api_core import exceptions as google_exceptions
from PIL import Image

from schemas import dataset
from transforms.dataset_records import BuildRecords, LoadImages
from transforms.file_reads import RetryPolicy, is_transient
from transforms.images import MISSING_FILE, NOT_AN_IMAGE, UNREADABLE_FILE, ImageSpec
from transforms.inference_inputs import InputSpec, ReadImageInputs
from transforms.labeling import LabeledImage
from transforms.splitting import SplitSpec

SCHEME = "flakytest"
ALWAYS = -1
FAST_RETRY = RetryPolicy(attempts=3, initial_delay_s=0.01, max_delay_s=0.02)
# Local path -> opens still to fail (ALWAYS: every one); and opens attempted per path.
FAILURES: dict[str, int] = {}
OPENS: collections.Counter = collections.Counter()


class FlakyFileSystem(LocalFileSystem):
    """Local files under ``flakytest://``; opens of a path in ``FAILURES`` raise EIO."""

    @classmethod
    def scheme(cls) -> str:
        return SCHEME

    @staticmethod
    def _local(path: str) -> str:
        # Inherited methods call these overrides with local paths too.
        return path.removeprefix(f"{SCHEME}://")

    def exists(self, path: str) -> bool:
        return super().exists(self._local(path))

    def match(self, patterns: list[str], limits: list[int] | None = None) -> list[MatchResult]:
        results = super().match([self._local(pattern) for pattern in patterns], limits)
        return [
            MatchResult(f"{SCHEME}://{result.pattern}", [
                FileMetadata(f"{SCHEME}://{m.path}", m.size_in_bytes, m.last_updated_in_seconds)
                for m in result.metadata_list
            ])
            for result in results
        ]

    def open(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        local = self._local(path)
        OPENS[local] += 1
        left = FAILURES.get(local, 0)
        if left:
            FAILURES[local] = left if left == ALWAYS else left - 1
            raise OSError(errno.EIO, "Input/output error (simulated)", path)
        return super().open(local, mime_type, compression_type)


@pytest.fixture(autouse=True)
def _reset_flakiness():
    FAILURES.clear()
    OPENS.clear()


def _png(tmp_path, name: str, value: int) -> str:
    path = tmp_path / name
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return str(path)


def _labeled(local_path: str) -> LabeledImage:
    uri = f"{SCHEME}://{local_path}"
    return LabeledImage(uri=uri, label="a", input_ref=f"manifest.csv:{uri}", votes=1, label_index=0)


def record_uri(record: dict) -> str:
    return record[dataset.URI]


def letter_fields(letter) -> tuple[str, str]:
    return letter.input_ref, letter.error_type


def test_transient_failures_are_retried_and_the_record_is_written(tmp_path):
    flaky = _png(tmp_path, "flaky.png", 10)
    steady = _png(tmp_path, "steady.png", 200)
    FAILURES[flaky] = FAST_RETRY.attempts - 1
    (tmp_path / "a_directory.png").mkdir()
    unreadable, missing = str(tmp_path / "a_directory.png"), str(tmp_path / "missing.png")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    inputs = [_labeled(path) for path in (flaky, steady, unreadable, missing, str(text))]
    with TestPipeline(runner="FnApiRunner") as p:
        loaded, load_letters = p | beam.Create(inputs) | LoadImages(ImageSpec(image_size=8), FAST_RETRY)
        records, _ = loaded | BuildRecords(SplitSpec.parse("1", "train"), "uri")
        assert_that(records | beam.Map(record_uri), equal_to([inputs[0].uri, inputs[1].uri]), label="CheckRecords")
        assert_that(
            load_letters | beam.Map(letter_fields),
            equal_to([(inputs[2].input_ref, UNREADABLE_FILE), (inputs[3].input_ref, MISSING_FILE),
                      (inputs[4].input_ref, NOT_AN_IMAGE)]),
            label="CheckDeadLetters",
        )
    assert OPENS[flaky] == FAST_RETRY.attempts
    assert OPENS[unreadable] == 1  # A directory is a fact about the input: never retried.


def test_storage_that_keeps_failing_fails_the_pipeline(tmp_path):
    down = _png(tmp_path, "down.png", 10)
    FAILURES[down] = ALWAYS
    with pytest.raises(Exception, match=f"failed {FAST_RETRY.attempts} times"):
        with TestPipeline(runner="FnApiRunner") as p:
            _ = p | beam.Create([_labeled(down)]) | LoadImages(ImageSpec(image_size=8), FAST_RETRY)
    assert OPENS[down] == FAST_RETRY.attempts


def keyed_uri(item) -> str:
    return item[1].uri


def test_inference_inputs_retry_manifests_images_and_globs(tmp_path):
    flaky = _png(tmp_path, "flaky.png", 10)
    steady = _png(tmp_path, "steady.png", 200)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"flaky.png,a\n{SCHEME}://{steady},b\n")
    FAILURES.update({flaky: 2, str(manifest): 2})
    expected = [f"{SCHEME}://{flaky}", f"{SCHEME}://{steady}"]
    with TestPipeline(runner="FnApiRunner") as p:
        keyed, letters = p | ReadImageInputs(InputSpec(f"{SCHEME}://{manifest}", "manifest", retry=FAST_RETRY))
        assert_that(keyed | beam.Map(keyed_uri), equal_to(expected), label="CheckImages")
        assert_that(letters, equal_to([]), label="CheckNoDeadLetters")
    assert OPENS[str(manifest)] == OPENS[flaky] == FAST_RETRY.attempts

    FAILURES[steady] = 1
    with TestPipeline(runner="FnApiRunner") as p:
        keyed, _ = p | ReadImageInputs(InputSpec(f"{SCHEME}://{tmp_path}/*.png", "images", retry=FAST_RETRY))
        assert_that(keyed | beam.Map(keyed_uri), equal_to(expected), label="CheckGlobImages")

    FAILURES[flaky] = ALWAYS
    with pytest.raises(Exception, match=f"failed {FAST_RETRY.attempts} times"):
        with TestPipeline(runner="FnApiRunner") as p:
            _ = p | ReadImageInputs(InputSpec(f"{SCHEME}://{manifest}", "manifest", retry=FAST_RETRY))


@pytest.mark.parametrize("error, transient", [
    (OSError(errno.EIO, "Input/output error"), True),
    (ConnectionResetError("connection reset by peer"), True),
    (TimeoutError("read timed out"), True),
    (google_exceptions.ServiceUnavailable("backend error"), True),
    (google_exceptions.TooManyRequests("rate limited"), True),
    (PermissionError(errno.EACCES, "Permission denied"), False),
    (IsADirectoryError(errno.EISDIR, "Is a directory"), False),
    (FileNotFoundError(errno.ENOENT, "No such file"), False),
    (google_exceptions.Forbidden("no access"), False),
    (google_exceptions.NotFound("no object"), False),
    (ValueError("not a storage error"), False),
])
def test_transient_errors_are_told_from_facts_about_the_file(error, transient):
    assert is_transient(error) is transient
