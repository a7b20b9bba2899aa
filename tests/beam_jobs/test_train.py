"""The train job end to end: a two-trial grid plus an invalid trial, on digits from create_dataset."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from beam_jobs import train
from schemas import model_artifacts
from schemas.classification_metrics import ModelMetrics
from schemas.leaderboard import FailedTrial, Leaderboard
from schemas.model_artifacts import ModelInfo
from schemas.publication import published_dir
from transforms.dead_letters import read_dead_letters

TRIALS_SPEC = """
base: {epochs: 2, filters: [8, 16], embedding_dim: 16, batch_size: 32}
grid:
  learning_rate: [0.003, 0.00001]
trials:
  - {id: bad, arch: no_such_model}
"""


@pytest.fixture(scope="module")
def trained_job(digits_dataset, tmp_path_factory):
    """Runs the job once, two workers in parallel, and returns (output_dir, exit status)."""
    directory = tmp_path_factory.mktemp("train_job")
    spec = directory / "trials.yaml"
    spec.write_text(TRIALS_SPEC)
    output = str(directory / "out")
    status = train.main([
        "--dataset_dir", digits_dataset.dataset_dir,
        "--output_dir", output,
        "--trials", str(spec),
        "--direct_num_workers", "2",
        "--direct_running_mode", "multi_processing",
    ])
    return output, status


def test_both_trials_are_written_and_the_best_is_published(trained_job):
    output, status = trained_job
    assert status == 0
    board = Leaderboard.read(output)
    assert {row.hparams["learning_rate"] for row in board.trials} == {0.003, 0.00001}
    first, second = board.trials
    # The usable learning rate wins over the one that barely moves the weights.
    assert first.hparams["learning_rate"] == 0.003
    assert first.validation["accuracy"] > second.validation["accuracy"]
    assert board.best_trial == first.trial_id

    for row in board.trials:
        trial_dir = os.path.join(output, model_artifacts.TRIALS_DIR, row.trial_id)
        assert row.model_dir == trial_dir
        assert ModelInfo.read(trial_dir).model_version == row.model_version
        assert ModelMetrics.read(trial_dir).validation.accuracy == pytest.approx(row.validation["accuracy"])

    best = os.path.join(output, model_artifacts.BEST_DIR)
    assert board.best_dir == best
    assert board.publication.published and board.publication.reason == "no model was published yet"
    published = published_dir(best)
    assert published != best and board.publication.model_dir == published
    assert ModelInfo.read(published).model_version == first.model_version
    assert os.path.isfile(os.path.join(published, model_artifacts.SAVED_MODEL_DIR, "saved_model.pb"))
    assert os.path.isfile(os.path.join(published, model_artifacts.KERAS_MODEL_FILE))
    assert "checkpoints" not in os.listdir(published)
    with open(os.path.join(output, model_artifacts.TRIALS_LEADERBOARD_FILE)) as handle:
        assert [row["rank"] for row in json.load(handle)["trials"]] == [1, 2]


def test_a_worse_model_is_not_published_unless_forced(trained_job, digits_dataset, tmp_path, capsys):
    output = str(tmp_path / "out")
    shutil.copytree(trained_job[0], output)  # Its own copy: the other tests read the original leaderboard.
    best = os.path.join(output, model_artifacts.BEST_DIR)
    before = published_dir(best)
    published_version = ModelInfo.read(before).model_version
    spec = tmp_path / "worse.yaml"
    spec.write_text("trials: [{id: worse, epochs: 1, filters: [8, 16], embedding_dim: 16, learning_rate: 0.00001}]\n")
    argv = ["--dataset_dir", digits_dataset.dataset_dir, "--output_dir", output, "--trials", str(spec)]

    assert train.main(argv) == 0
    board = Leaderboard.read(output)
    assert board.best_trial == "worse"
    assert not board.publication.published
    assert board.publication.reason.startswith("worse: val_accuracy")
    assert board.publication.candidate_score < board.publication.baseline_score
    assert board.publication.model_version == published_version
    assert published_dir(best) == before
    assert "NOT published (worse: val_accuracy" in capsys.readouterr().out

    assert train.main([*argv, "--force_publish"]) == 0
    board = Leaderboard.read(output)
    assert board.publication.published and board.publication.reason.startswith("--force_publish")
    assert ModelInfo.read(published_dir(best)).model_version == board.trials[0].model_version != published_version
    # The model it replaced stays readable for readers that resolved it before the switch.
    assert ModelInfo.read(before).model_version == published_version


def test_the_invalid_trial_is_a_dead_letter_and_the_job_succeeds(trained_job):
    output, status = trained_job
    assert status == 0
    letters = read_dead_letters(output)
    assert [(letter.input_ref, letter.error_type) for letter in letters] == [("trial:bad", "invalid_hyperparameter")]
    assert "arch='no_such_model'" in letters[0].message
    board = Leaderboard.read(output)
    assert board.failed == [FailedTrial("bad", "invalid_hyperparameter", letters[0].message)]
    assert not os.path.exists(os.path.join(output, model_artifacts.TRIALS_DIR, "bad", model_artifacts.SAVED_MODEL_DIR))


def test_two_workers_train_two_trials_at_the_same_time(trained_job):
    first, second = sorted(Leaderboard.read(trained_job[0]).trials, key=lambda t: t.started_at)[:2]
    assert first.started_at < second.finished_at
    assert second.started_at < first.finished_at


def test_a_job_where_no_trial_succeeds_exits_non_zero(digits_dataset, tmp_path):
    output = str(tmp_path / "out")
    spec = tmp_path / "bad.yaml"
    spec.write_text("trials: [{id: zero, epochs: 0}]\n")
    status = train.main(["--dataset_dir", digits_dataset.dataset_dir, "--output_dir", output, "--trials", str(spec)])
    assert status == 1
    board = Leaderboard.read(output)
    assert board.best_trial is None and board.trials == []
    assert [f.error_type for f in board.failed] == ["invalid_hyperparameter"]
    assert not board.publication.published
    assert not os.path.exists(os.path.join(output, model_artifacts.BEST_DIR))


def test_a_bad_hyperparameter_flag_fails_before_launch(digits_dataset, tmp_path, capsys):
    output = str(tmp_path / "out")
    status = train.main(["--dataset_dir", digits_dataset.dataset_dir, "--output_dir", output, "--epochs", "0"])
    assert status == 2
    assert "epochs" in capsys.readouterr().err
    assert not os.path.exists(output)


def test_flags_override_the_spec_base_and_bad_paths_fail_before_launch(digits_dataset, tmp_path):
    spec = tmp_path / "trials.yaml"
    spec.write_text("base: {epochs: 5, dropout: 0.1}\ntrials: [{id: a}, {id: b, epochs: 7}]\n")
    options = train.make_pipeline_options([
        "--dataset_dir", digits_dataset.dataset_dir, "--output_dir", str(tmp_path), "--trials", str(spec),
        "--epochs", "2", "--trial_accelerator", "type:nvidia-tesla-t4;count:1",
    ], job_options=train.TrainOptions)
    config = train.TrainConfig.from_options(options)
    assert [(t.trial_id, dict(t.hparams)) for t in config.trials] == [
        ("a", {"epochs": 2, "dropout": 0.1}), ("b", {"epochs": 7, "dropout": 0.1}),
    ]
    assert config.resource_hints == {"accelerator": "type:nvidia-tesla-t4;count:1"}
    with pytest.raises(ValueError, match="not a create_dataset output"):
        train.TrainConfig.from_options(train.make_pipeline_options(
            ["--dataset_dir", str(tmp_path), "--output_dir", str(tmp_path)], job_options=train.TrainOptions))
    with pytest.raises(ValueError, match="--dataset_dir is required"):
        train.TrainConfig.from_options(
            train.make_pipeline_options(["--output_dir", str(tmp_path)], job_options=train.TrainOptions))
