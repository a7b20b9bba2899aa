"""ReadCsvRows: manifests are decoded line by line, and relative paths follow the manifest, on gs:// too."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.dead_letters import counter_total
from transforms.manifests import INVALID_UTF8, ReadCsvRows


def row_fields(row) -> tuple[str, str, str]:
    return row.uri, row.label, row.input_ref


def letter_fields(letter) -> tuple[str, str, str]:
    return letter.input_ref, letter.stage, letter.error_type


def test_one_invalid_utf8_line_rejects_only_that_line(tmp_path):
    manifest = tmp_path / "all_data.csv"
    manifest.write_bytes(
        b"\xef\xbb\xbfuri,label\n"
        b"a.png,cat\n"
        b"caf\xe9.png,dog\n"  # Latin-1, not UTF-8.
        b"\xc3\xa9t\xc3\xa9.png,dog\r\n"  # Valid UTF-8, Windows line end.
        b"\n"
        b"sub/b.png,cat\n"
    )
    expected_rows = [
        (str(tmp_path / "a.png"), "cat", f"{manifest}:2"),
        (str(tmp_path / "\u00e9t\u00e9.png"), "dog", f"{manifest}:4"),
        (str(tmp_path / "sub" / "b.png"), "cat", f"{manifest}:6"),
    ]
    p = TestPipeline(runner="FnApiRunner")
    rows, letters = p | ReadCsvRows([str(manifest)], "manifest")
    assert_that(rows | beam.Map(row_fields), equal_to(expected_rows), label="CheckRows")
    assert_that(
        letters | beam.Map(letter_fields),
        equal_to([(f"{manifest}:3", "read_manifest", INVALID_UTF8)]),
        label="CheckDeadLetters",
    )
    result = p.run()
    result.wait_until_finish()
    # Every non-empty row but the header is read once: three rows and the rejected one.
    assert counter_total(result, "read") == 4


def test_relative_paths_in_a_gcs_manifest_resolve_against_its_directory(gcs_emulator):
    bucket = gcs_emulator.create_bucket()
    manifest = f"gs://{bucket}/data/v1/all_data.csv"
    with FileSystems.create(manifest) as handle:
        handle.write(b"images/a.png,cat\n./b.png,dog\n../shared/c.png,cat\ngs://other/d.png,dog\n/abs/e.png,cat\n")
    expected = [
        (f"gs://{bucket}/data/v1/images/a.png", "cat", f"{manifest}:1"),
        (f"gs://{bucket}/data/v1/b.png", "dog", f"{manifest}:2"),
        (f"gs://{bucket}/data/shared/c.png", "cat", f"{manifest}:3"),
        ("gs://other/d.png", "dog", f"{manifest}:4"),
        ("/abs/e.png", "cat", f"{manifest}:5"),
    ]
    with TestPipeline(runner="FnApiRunner") as p:
        rows, letters = p | ReadCsvRows([manifest], "manifest")
        assert_that(rows | beam.Map(row_fields), equal_to(expected), label="CheckRows")
        assert_that(letters | beam.Map(letter_fields), equal_to([]), label="CheckNoDeadLetters")
