"""Training trials as Beam elements: run each one, then publish the best.

Each element is a ``model_lib.trials.TrialSpec``. ``RunTrials`` trains it with
``model_lib.training.train_and_export`` into ``OUTPUT/trials/<trial_id>/``
(a worker that dies mid-trial is retried by the runner and resumes from the
trial's last checkpoint). A trial that fails (invalid hyperparameter,
diverging loss, anything else) becomes a dead letter with the reason while
the other trials go on. ``PublishBestTrial`` ranks the finished trials by a
validation metric, copies the winner to ``OUTPUT/best/`` and writes the
``OUTPUT/trials.json`` leaderboard.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from model_lib.trials import TrialSpec
from schemas import model_artifacts
from schemas.dead_letter import DeadLetter
from transforms.dead_letters import METRICS_NAMESPACE, RejectedInput, ToDeadLetters

_LOGGER = logging.getLogger(__name__)

RUN_TRIAL_STAGE = "RunTrial"
TRIALS_SUCCEEDED_COUNTER = "trials_succeeded"
_SUMMARY_METRICS = ("accuracy", "loss", "macro_f1")


@dataclasses.dataclass(frozen=True)
class TrialResult:
    """A finished trial: where its model is and how it scored.

    Attributes:
      trial_id: The trial's id.
      hparams: The full hyperparameters it trained with (defaults filled in).
      model_dir: ``OUTPUT/trials/<trial_id>``, an exported model directory.
      model_version: Hash of the trained weights (model_info.json).
      validation: accuracy, loss and macro_f1 on the validation split.
      test: The same on the test split (empty without a test split).
      epochs_run: Epochs completed.
      best_epoch: Epoch whose weights were kept.
      train_seconds: Fitting time of the last run.
      started_at: UTC ISO time the trial started (shows which trials ran in parallel).
      finished_at: UTC ISO time the trial finished.
    """

    trial_id: str
    hparams: dict[str, Any]
    model_dir: str
    model_version: str
    validation: dict[str, float]
    test: dict[str, float]
    epochs_run: int
    best_epoch: int
    train_seconds: float
    started_at: str
    finished_at: str

    def score(self, metric: str) -> tuple[float, float]:
        """Sort key, larger is better: the selection metric, then lower validation loss."""
        if metric == "val_loss":
            return (-self.validation["loss"], 0.0)
        return (self.validation[metric.removeprefix("val_")], -self.validation["loss"])


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def trial_dir(output_dir: str, trial_id: str) -> str:
    """``OUTPUT/trials/<trial_id>``."""
    return FileSystems.join(output_dir, model_artifacts.TRIALS_DIR, trial_id)


def _summary(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(metrics[name]) for name in _SUMMARY_METRICS}


class RunTrialFn(beam.DoFn):
    """``TrialSpec`` -> ``TrialResult``: trains, evaluates and exports one model.

    Raises (routed to dead letters by ``with_exception_handling``) the
    training errors, whose ``error_type`` is ``invalid_hyperparameter`` or
    ``diverged``; other failures are named by their exception type.

    Args:
      dataset_dir: The create_dataset output to train on.
      output_dir: The job's output; the trial writes under ``trials/<id>/``.
      selection_metric: Filled into trials that do not set their own, so each
        trial early-stops on the metric the job selects by.
    """

    def __init__(self, dataset_dir: str, output_dir: str, selection_metric: str):
        self._dataset_dir = dataset_dir
        self._output_dir = output_dir
        self._selection_metric = selection_metric

    def setup(self) -> None:
        self._succeeded = Metrics.counter(METRICS_NAMESPACE, TRIALS_SUCCEEDED_COUNTER)

    def process(self, trial: TrialSpec) -> Iterable[TrialResult]:
        # Imported here: TensorFlow loads only in workers that train.
        from model_lib import training

        started_at = _now()
        directory = trial_dir(self._output_dir, trial.trial_id)
        try:
            hparams = training.HParams.from_dict({"selection_metric": self._selection_metric, **trial.hparams})
            _LOGGER.info("trial %s: training into %s", trial.trial_id, directory)
            result = training.train_and_export(self._dataset_dir, directory, hparams)
        except (training.InvalidHyperparameter, training.TrainingDiverged) as error:
            # Known trial failures keep their stable reason code in the dead letter.
            raise RejectedInput(error.error_type, str(error)) from error
        self._succeeded.inc()
        yield TrialResult(
            trial_id=trial.trial_id,
            hparams=hparams.to_dict(),
            model_dir=directory,
            model_version=result.model_info.model_version,
            validation=_summary(result.metrics["validation"]),
            test=_summary(result.metrics["test"]) if "test" in result.metrics else {},
            epochs_run=result.epochs_run,
            best_epoch=result.best_epoch,
            train_seconds=round(result.train_seconds, 3),
            started_at=started_at,
            finished_at=_now(),
        )


class RunTrials(beam.PTransform):
    """``PCollection[TrialSpec]`` -> ``(PCollection[TrialResult], PCollection[DeadLetter])``.

    Args:
      dataset_dir: The create_dataset output to train on.
      output_dir: The job's output directory.
      selection_metric: See ``RunTrialFn``.
      resource_hints: Beam resource hints for the training step only, e.g.
        ``{"accelerator": "type:nvidia-tesla-t4;count:1;install-nvidia-driver"}``
        on Dataflow; runners without support ignore them.
    """

    def __init__(self, dataset_dir: str, output_dir: str, selection_metric: str,
                 resource_hints: dict[str, str] | None = None):
        super().__init__()
        self._fn = RunTrialFn(dataset_dir, output_dir, selection_metric)
        self._resource_hints = dict(resource_hints or {})

    def expand(self, trials: beam.PCollection[TrialSpec]):
        train = beam.ParDo(self._fn)
        if self._resource_hints:
            train = train.with_resource_hints(**self._resource_hints)
        results, failures = (
            trials
            # One trial per bundle, so parallel workers pick up different trials.
            | "SpreadTrials" >> beam.Reshuffle()
            | "TrainTrial" >> train.with_exception_handling()
        )
        letters = failures | "TrialFailures" >> ToDeadLetters(RUN_TRIAL_STAGE)
        return results, letters


def _rank_key(result: TrialResult, metric: str) -> tuple[tuple[float, ...], str]:
    return tuple(-v for v in result.score(metric)), result.trial_id


def leaderboard(
    results: list[TrialResult], failures: list[DeadLetter], metric: str, best_dir: str | None
) -> dict[str, Any]:
    """Ranks trials (best first; ties by lower validation loss, then trial id) into trials.json content."""
    ranked = sorted(results, key=functools.partial(_rank_key, metric=metric))
    return {
        "selection_metric": metric,
        "best_trial": ranked[0].trial_id if ranked else None,
        "best_dir": best_dir if ranked else None,
        "trials": [{"rank": rank, **dataclasses.asdict(r)} for rank, r in enumerate(ranked, start=1)],
        "failed": [
            {"trial_id": letter.input_ref.removeprefix("trial:"), "error_type": letter.error_type,
             "message": letter.message}
            for letter in sorted(failures, key=lambda f: f.input_ref)
        ],
    }


class PublishBestTrialFn(beam.DoFn):
    """All results (one list) -> copies the best to ``OUTPUT/best`` and writes ``trials.json``.

    Runs once per job on the combined results, so the copy and the
    leaderboard are written by a single worker.
    """

    def __init__(self, output_dir: str, metric: str):
        self._output_dir = output_dir
        self._metric = metric

    def process(self, results: list[TrialResult], failures: list[DeadLetter]) -> Iterable[dict[str, Any]]:
        from model_lib import export, training  # TensorFlow only where the copy runs.

        best_dir = FileSystems.join(self._output_dir, model_artifacts.BEST_DIR)
        board = leaderboard(results, failures, self._metric, best_dir)
        if board["best_trial"] is not None:
            winner = trial_dir(self._output_dir, board["best_trial"])
            export.copy_model_dir(winner, best_dir, exclude=(training.CHECKPOINT_DIR, training.TENSORBOARD_DIR))
            _LOGGER.info("best trial %s copied to %s", board["best_trial"], best_dir)
        else:
            _LOGGER.error("no trial succeeded; nothing published to %s", best_dir)
        path = FileSystems.join(self._output_dir, model_artifacts.TRIALS_LEADERBOARD_FILE)
        with FileSystems.create(path) as handle:
            handle.write(json.dumps(board, indent=2, sort_keys=True).encode("utf-8"))
        yield board


class PublishBestTrial(beam.PTransform):
    """``(results, dead_letters)`` -> a one-element PCollection with the leaderboard dict."""

    def __init__(self, output_dir: str, metric: str):
        super().__init__()
        self._output_dir = output_dir
        self._metric = metric

    def expand(self, inputs: tuple[beam.PCollection[TrialResult], beam.PCollection[DeadLetter]]):
        results, letters = inputs
        collected = results | "CollectResults" >> beam.combiners.ToList()
        failures = letters | "CollectFailures" >> beam.combiners.ToList()
        return collected | "SelectBestTrial" >> beam.ParDo(
            PublishBestTrialFn(self._output_dir, self._metric), failures=beam.pvalue.AsSingleton(failures)
        )
