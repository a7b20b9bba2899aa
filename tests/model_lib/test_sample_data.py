"""The offline sample datasets: real digits and deterministic synthetic shapes."""

from __future__ import annotations

import csv
import filecmp
import os

import numpy as np
from PIL import Image

from beam_jobs import cli
from model_lib import sample_data


def test_digits_are_written_in_the_books_manifest_format(tmp_path):
    written = sample_data.write_digits(str(tmp_path), limit=30, size=32)
    rows = list(csv.reader(open(written.manifest)))
    assert len(rows) == 30 and all(len(row) == 2 for row in rows)
    assert rows[0][1] == "0" and rows[1][1] == "1"  # scikit-learn's first digits are 0, 1, 2, ...
    image = Image.open(rows[0][0])
    assert image.size == (32, 32) and image.mode == "L"
    assert np.asarray(image).max() > 100  # real strokes, not a blank image
    assert open(written.labels_file).read().split() == [str(d) for d in range(10)]


def test_synthetic_images_are_deterministic_and_labeled_by_shape(tmp_path):
    a = sample_data.write_synthetic(str(tmp_path / "a"), count=8, size=64)
    b = sample_data.write_synthetic(str(tmp_path / "b"), count=8, size=64)
    rows_a = list(csv.reader(open(a.manifest)))
    rows_b = list(csv.reader(open(b.manifest)))
    assert [label for _, label in rows_a] == [label for _, label in rows_b]
    assert {label for _, label in rows_a} == set(sample_data.SHAPES)
    for (path_a, _), (path_b, _) in zip(rows_a, rows_b):
        assert filecmp.cmp(path_a, path_b, shallow=False)
    assert Image.open(rows_a[0][0]).size == (64, 64)


def test_cli_runs_the_sample_data_command(tmp_path, capsys):
    assert cli.main(["make-sample-data", "--dataset", "synthetic", "--count", "4", "--size", "32",
                     "--output_dir", str(tmp_path)]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    assert os.path.exists(tmp_path / sample_data.MANIFEST_FILE)
    assert cli.main(["no-such-command"]) == 2
