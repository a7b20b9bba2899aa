"""RunTrials routes failing trials to dead letters with reasons; the leaderboard ranks deterministically."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to, is_empty

from model_lib.trials import TrialSpec
from schemas.dead_letter import DeadLetter
from schemas.leaderboard import FailedTrial, Leaderboard, TrialResult
from transforms.training_trials import RUN_TRIAL_STAGE, RunTrials, leaderboard


def _result(trial_id: str, accuracy: float, loss: float) -> TrialResult:
    return TrialResult(
        trial_id=trial_id, hparams={}, model_dir=f"/m/{trial_id}", model_version="v",
        validation={"accuracy": accuracy, "loss": loss, "macro_f1": accuracy}, test={},
        epochs_run=1, best_epoch=1, train_seconds=1.0, started_at="t0", finished_at="t1",
    )


def test_leaderboard_ranks_by_metric_then_loss_then_id():
    results = [_result("c", 0.9, 0.30), _result("a", 0.9, 0.20), _result("b", 0.95, 0.50), _result("d", 0.9, 0.20)]
    failures = [DeadLetter("trial:z", RUN_TRIAL_STAGE, "diverged", "loss nan")]
    board = leaderboard(results, failures, "val_accuracy", "/out/best")
    assert [row.trial_id for row in board.trials] == ["b", "a", "d", "c"]
    assert board.best_trial == "b" and board.best_dir == "/out/best"
    assert board.failed == [FailedTrial("z", "diverged", "loss nan")]
    assert [row["rank"] for row in board.to_dict()["trials"]] == [1, 2, 3, 4]
    assert Leaderboard.from_dict(board.to_dict()) == board
    by_loss = leaderboard(results, [], "val_loss", "/out/best")
    assert [row.trial_id for row in by_loss.trials] == ["a", "d", "c", "b"]
    assert leaderboard([], failures, "val_accuracy", "/out/best").best_trial is None


def _reason(letter: DeadLetter) -> tuple[str, str, str]:
    return letter.input_ref, letter.stage, letter.error_type


def test_failing_trials_become_dead_letters_with_reasons(digits_dataset, tmp_path):
    trials = [
        TrialSpec("diverging", {"epochs": 2, "filters": [8, 16], "learning_rate": 10.0, "lr_schedule": "constant"}),
        TrialSpec("zero-epochs", {"epochs": 0}),
        TrialSpec("typo", {"epoch": 3}),
    ]
    with TestPipeline(runner="FnApiRunner") as pipeline:
        results, letters = (
            pipeline
            | "CreateTrials" >> beam.Create(trials)
            | "RunTrials" >> RunTrials(digits_dataset.dataset_dir, str(tmp_path), "val_accuracy")
        )
        assert_that(results, is_empty(), label="CheckNoResults")
        assert_that(
            letters | "Reasons" >> beam.Map(_reason),
            equal_to([
                ("trial:diverging", RUN_TRIAL_STAGE, "diverged"),
                ("trial:zero-epochs", RUN_TRIAL_STAGE, "invalid_hyperparameter"),
                ("trial:typo", RUN_TRIAL_STAGE, "invalid_hyperparameter"),
            ]),
            label="CheckDeadLetters",
        )
