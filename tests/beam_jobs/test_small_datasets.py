"""Small and odd datasets get a clear answer: warnings from create_dataset, refusals from train.

Each case is a dataset people make when they start (six photos of two labels,
three of one label, an empty manifest, a --skip_analysis dataset), built by the
real create_dataset job and handed to the real train job's ``main``, which
must exit with a status scripts can test and one line naming the problem and
the fix, instead of ``StopIteration`` from inside a trial.
"""

from __future__ import annotations

import csv
import os

import pytest

from beam_jobs import create_dataset, train
from model_lib import sample_data
from schemas.classification_metrics import ModelMetrics
from schemas.dataset_info import DatasetInfo, SplitCounts
from schemas.exit_status import UNUSABLE_INPUT_EXIT
from schemas.leaderboard import Leaderboard
from schemas.publication import published_dir
from transforms.dataset_checks import dataset_warnings, small_dataset_advice

SIZE = 16


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory) -> dict[str, list[str]]:
    """Image paths of the first 60 digits, by label."""
    source = sample_data.write_digits(str(tmp_path_factory.mktemp("digit_files")), size=SIZE, limit=60)
    by_label: dict[str, list[str]] = {}
    with open(source.manifest, newline="") as handle:
        for uri, label in csv.reader(handle):
            by_label.setdefault(label, []).append(uri)
    return by_label


def write_manifest(path: str, rows: list[tuple[str, str]]) -> str:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def make_dataset(tmp_path, name: str, rows: list[tuple[str, str]], *extra: str) -> tuple[int, str]:
    """Runs create-dataset's main on ``rows``; returns its exit status and output directory."""
    manifest = write_manifest(str(tmp_path / f"{name}.csv"), rows)
    output_dir = str(tmp_path / name)
    status = create_dataset.main([
        "--manifest", manifest, "--output_dir", output_dir, "--image_size", str(SIZE), "--channels", "1",
        "--image_format", "png", *extra,
    ])
    return status, output_dir


def run_train(dataset_dir: str, output_dir: str) -> int:
    return train.main(["--dataset_dir", dataset_dir, "--output_dir", output_dir, "--epochs", "1",
                       "--batch_size", "8"])


def codes(dataset_dir: str) -> set[str]:
    return {warning.code for warning in DatasetInfo.read(published_dir(dataset_dir)).warnings}


def test_six_photos_warn_and_strict_publishes_nothing(tmp_path, digit_files, capsys):
    rows = [(uri, label) for label in ("0", "1") for uri in digit_files[label][:3]]
    status, dataset_dir = make_dataset(tmp_path, "six", rows)
    assert status == 0
    assert {"few_images_for_label", "small_dataset"} <= codes(dataset_dir)
    out = capsys.readouterr().out
    assert "warning [small_dataset]: 6 images are too few for the requested split" in out
    assert "try --split 50,25,25" in out

    status, strict_dir = make_dataset(tmp_path, "six_strict", rows, "--strict")
    assert status == 1
    err = capsys.readouterr().err
    assert "with --strict; nothing was published" in err
    assert "warning [few_images_for_label]" in err
    assert not os.path.exists(os.path.join(strict_dir, "CURRENT"))


def test_one_label_warns_and_train_refuses(tmp_path, digit_files, capsys):
    status, dataset_dir = make_dataset(tmp_path, "three", [(uri, "0") for uri in digit_files["0"][:3]])
    assert status == 0
    assert "single_label" in codes(dataset_dir)
    capsys.readouterr()
    assert run_train(dataset_dir, str(tmp_path / "model")) == UNUSABLE_INPUT_EXIT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "1 label(s) in its 'train' split" in err and "at least 2" in err
    assert not os.path.exists(tmp_path / "model")  # Refused before any model was built.


def test_empty_manifest_warns_and_train_refuses(tmp_path, capsys):
    status, dataset_dir = make_dataset(tmp_path, "empty", [])
    assert status == 0
    info = DatasetInfo.read(published_dir(dataset_dir))
    assert [w.code for w in info.warnings] == ["no_images"]
    assert "the manifests hold no data rows" in info.warnings[0].message
    capsys.readouterr()
    assert run_train(dataset_dir, str(tmp_path / "model")) == UNUSABLE_INPUT_EXIT
    assert "has no images" in capsys.readouterr().err


def test_empty_train_split_is_refused_by_train(tmp_path, digit_files, capsys):
    rows = [(uri, label) for label in ("0", "1") for uri in digit_files[label][:3]]
    _, dataset_dir = make_dataset(tmp_path, "no_train", rows, "--split", "0,50,50")
    assert "empty_split" in codes(dataset_dir)
    capsys.readouterr()
    assert run_train(dataset_dir, str(tmp_path / "model")) == UNUSABLE_INPUT_EXIT
    err = capsys.readouterr().err
    assert "no images in its 'train' split" in err and "train=0%" in err


def test_skip_analysis_dataset_is_refused_naming_the_flag(tmp_path, digit_files, capsys):
    rows = [(uri, label) for label in ("0", "1", "2") for uri in digit_files[label]]
    _, dataset_dir = make_dataset(tmp_path, "skipped", rows, "--skip_analysis", "--split", "50,50,0")
    capsys.readouterr()
    assert run_train(dataset_dir, str(tmp_path / "model")) == UNUSABLE_INPUT_EXIT
    err = capsys.readouterr().err
    assert "no transform_fn/ (it was created with --skip_analysis)" in err
    assert "rerun create-dataset without --skip_analysis" in err


def test_empty_test_split_trains_without_inventing_test_metrics(tmp_path, digit_files, capsys):
    rows = [(uri, label) for label in ("0", "1", "2") for uri in digit_files[label]]
    _, dataset_dir = make_dataset(tmp_path, "no_test", rows, "--split", "50,50,0")
    assert "empty_split" not in codes(dataset_dir)  # A split requested at 0% may be empty.
    capsys.readouterr()
    model_dir = str(tmp_path / "model")
    assert run_train(dataset_dir, model_dir) == 0
    board = Leaderboard.read(model_dir)
    assert [row.test for row in board.trials] == [{}]
    assert ModelMetrics.read(published_dir(board.best_dir)).test is None
    assert "no test metrics (empty test split)" in capsys.readouterr().out


def counts(**per_split: dict[str, int]) -> dict[str, SplitCounts]:
    return {name: SplitCounts(sum(labels.values()), labels) for name, labels in per_split.items()}


def test_label_missing_from_train_is_named():
    warnings = dataset_warnings(
        counts(train={"cat": 40}, valid={"cat": 5, "dog": 5}, test={"cat": 5, "dog": 5}),
        ["train", "valid", "test"], [0.8, 0.1, 0.1], ["cat", "dog"], read=60)
    assert [w.code for w in warnings] == ["label_missing_from_train"]
    assert "'dog'" in warnings[0].message


def test_no_small_dataset_advice_once_every_split_expects_enough():
    assert small_dataset_advice(50, ["train", "valid", "test"], [0.8, 0.1, 0.1]) is None
    advice = small_dataset_advice(30, ["train", "valid", "test"], [0.8, 0.1, 0.1])
    assert "try --split 66,17,17" in advice and "about 50" in advice
