"""The JSON artifact contracts: written whole, read back equal, incomplete files refused by name."""

from __future__ import annotations

import json
import os

import pytest

from schemas import layout, model_artifacts
from schemas.classification_metrics import ClassMetrics, ModelMetrics, SplitEvaluation
from schemas.dataset_info import Accounting, DatasetInfo, SplitCounts


def dataset_info(read: int = 5, written: int = 4, rejected: int = 1) -> DatasetInfo:
    return DatasetInfo(
        counts={"train": SplitCounts(3, {"a": 2, "b": 1}), "valid": SplitCounts(1, {"a": 1}), "test": SplitCounts(0, {})},
        split_names=["train", "valid", "test"],
        labels=["a", "b"],
        rejected={"not_an_image": rejected} if rejected else {},
        rejected_ratings={"malformed_row": 2},
        accounting=Accounting(read=read, written=written, rejected=rejected),
        fingerprint="ab" * 32,
        image_size=32,
        channels=1,
        resize_method="stretch",
        image_format="png",
        parameters={"split_names": ["train", "valid", "test"], "dedupe": "uri"},
        created_at="2024-01-01T00:00:00+00:00",
    )


def test_dataset_info_round_trips_through_its_file(tmp_path):
    info = dataset_info()
    path = info.write(str(tmp_path))
    assert path == layout.join(str(tmp_path), layout.DATASET_INFO_FILE)
    assert DatasetInfo.read(str(tmp_path)) == info
    assert DatasetInfo.from_json(info.to_json()) == info
    # Only the file itself: the temporary file it was written through is gone.
    assert os.listdir(tmp_path) == [layout.DATASET_INFO_FILE]
    with open(path) as handle:
        assert json.load(handle)["accounting"]["balanced"] is True  # Derived, written for people.


def test_rewriting_replaces_the_whole_file(tmp_path):
    dataset_info(read=500, written=499).write(str(tmp_path))
    dataset_info().write(str(tmp_path))
    assert DatasetInfo.read(str(tmp_path)).accounting == Accounting(5, 4, 1)


def test_an_incomplete_file_is_refused_with_its_path_and_missing_fields(tmp_path):
    content = dataset_info().to_dict()
    del content["fingerprint"], content["split_names"]
    (tmp_path / layout.DATASET_INFO_FILE).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"dataset_info.json is not a valid DatasetInfo: missing fingerprint, split_names"):
        DatasetInfo.read(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        DatasetInfo.read(str(tmp_path / "elsewhere"))


def test_accounting_says_which_numbers_disagree():
    assert Accounting(5, 4, 1).mismatch() is None
    assert Accounting(7, 4, 1).mismatch() == "read 7 != written 4 + rejected 1 (= 5): 2 row(s) unaccounted for"
    assert Accounting(4, 4, 1).mismatch() == "read 4 != written 4 + rejected 1 (= 5): 1 row(s) too many"
    assert not Accounting(4, 4, 1).balanced


def test_model_metrics_round_trip_with_and_without_a_test_split(tmp_path):
    split = SplitEvaluation(
        labels=["a", "b"], count=3, accuracy=2 / 3, macro_precision=0.75, macro_recall=0.75, macro_f1=2 / 3,
        per_class={"a": ClassMetrics(1.0, 0.5, 2 / 3, 2), "b": ClassMetrics(0.5, 1.0, 2 / 3, 1)},
        confusion_matrix=[[1, 1], [0, 1]], loss=0.4,
    )
    metrics = ModelMetrics(
        model_version="v", selection_metric="val_accuracy", validation=split, test=None, epochs_run=2,
        best_epoch=1, initial_epoch=0, train_seconds=1.5, replicas=1, global_batch_size=8,
        history={"val_accuracy": [0.5, 0.6]},
    )
    metrics.write(str(tmp_path))
    assert os.listdir(tmp_path) == [model_artifacts.METRICS_FILE]
    assert ModelMetrics.read(str(tmp_path)) == metrics
    with_test = ModelMetrics(**{**metrics.__dict__, "test": split})
    assert ModelMetrics.from_json(with_test.to_json()) == with_test
    assert ModelMetrics.from_json(with_test.to_json()).test.value("accuracy") == 2 / 3
