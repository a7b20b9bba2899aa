"""Training trials as Beam elements: run each one, then publish the best.

Each element is a ``model_lib.trials.TrialSpec``. ``RunTrials`` trains it with
``model_lib.training.train_and_export`` into ``OUTPUT/trials/<trial_id>/``
(a worker that dies mid-trial is retried by the runner and resumes from the
trial's last checkpoint). A trial that fails (invalid hyperparameter,
diverging loss, anything else) becomes a dead letter with the reason while
the other trials go on. ``PublishBestTrial`` ranks the finished trials by a
validation metric, publishes the winner under ``OUTPUT/best/`` if it is at
least as good as the published model, and writes the ``OUTPUT/trials.json``
leaderboard.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from model_lib.trials import TrialSpec
from schemas import model_artifacts
from schemas.dead_letter import DeadLetter
from schemas.leaderboard import FailedTrial, Leaderboard, Publication, TrialResult
from schemas.model_artifacts import ModelInfo
from schemas.publication import OutputRun, published_dir
from transforms.dead_letters import METRICS_NAMESPACE, RejectedInput, ToDeadLetters

_LOGGER = logging.getLogger(__name__)

RUN_TRIAL_STAGE = "RunTrial"
TRIALS_SUCCEEDED_COUNTER = "trials_succeeded"
_SUMMARY_METRICS = ("accuracy", "loss", "macro_f1")


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
            validation=_summary(result.metrics.validation.to_dict()),
            test=_summary(result.metrics.test.to_dict()) if result.metrics.test else {},
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
) -> Leaderboard:
    """Ranks trials (best first; ties by lower validation loss, then trial id) into the trials.json contract."""
    ranked = sorted(results, key=functools.partial(_rank_key, metric=metric))
    return Leaderboard(
        selection_metric=metric,
        best_trial=ranked[0].trial_id if ranked else None,
        best_dir=best_dir if ranked else None,
        trials=ranked,
        failed=[
            FailedTrial(trial_id=letter.input_ref.removeprefix("trial:"), error_type=letter.error_type,
                        message=letter.message)
            for letter in sorted(failures, key=_letter_ref)
        ],
    )


def _letter_ref(letter: DeadLetter) -> str:
    return letter.input_ref


def published_model_dir(best_root: str) -> str | None:
    """The model directory ``OUTPUT/best`` currently publishes, or None when there is none."""
    current = published_dir(best_root)
    return current if FileSystems.exists(FileSystems.join(current, model_artifacts.MODEL_INFO_FILE)) else None


class PublishBestTrialFn(beam.DoFn):
    """All results (one list) -> blesses and publishes the best trial, writes ``trials.json``.

    Runs once per job on the combined results, so publishing and the
    leaderboard are done by a single worker. The best trial is copied into a
    fresh ``OUTPUT/best/run-*`` directory and ``OUTPUT/best/CURRENT`` is
    switched to it last (``schemas.publication``), so a reader never sees a
    half-copied model and a failed copy leaves the published one in place.
    It is published only if it is at least as good as the published model on
    the same split of the same dataset (``model_lib.blessing``), unless
    ``force_publish``.
    """

    def __init__(self, output_dir: str, dataset_dir: str, metric: str, force_publish: bool = False):
        self._output_dir = output_dir
        self._dataset_dir = dataset_dir
        self._metric = metric
        self._force_publish = force_publish

    def process(self, results: list[TrialResult], failures: list[DeadLetter]) -> Iterable[Leaderboard]:
        from model_lib import blessing, export, training  # TensorFlow only where publishing runs.

        best_root = FileSystems.join(self._output_dir, model_artifacts.BEST_DIR)
        board = leaderboard(results, failures, self._metric, best_root)
        baseline = published_model_dir(best_root)
        if board.best_trial is None:
            _LOGGER.error("no trial succeeded; nothing published to %s", best_root)
            publication = Publication(False, "no trial succeeded", baseline,
                                      ModelInfo.read(baseline).model_version if baseline else None)
        else:
            winner = board.trials[0]
            decision = blessing.decide(winner.model_dir, winner.validation, baseline, self._dataset_dir,
                                       self._metric, force=self._force_publish)
            if decision.publish:
                run = OutputRun.start(best_root, overwrite=True, flag="best/")
                try:
                    export.copy_model_dir(winner.model_dir, run.run_dir,
                                          exclude=(training.CHECKPOINT_DIR, training.TENSORBOARD_DIR))
                except BaseException:
                    run.abandon()
                    raise
                published = run.publish()
                _LOGGER.info("best trial %s published to %s: %s", winner.trial_id, published, decision.reason)
                publication = Publication(True, decision.reason, published, winner.model_version,
                                          decision.candidate_score, decision.baseline_score)
            else:
                _LOGGER.warning("best trial %s not published: %s", winner.trial_id, decision.reason)
                publication = Publication(False, decision.reason, baseline,
                                          ModelInfo.read(baseline).model_version if baseline else None,
                                          decision.candidate_score, decision.baseline_score)
        board = dataclasses.replace(board, publication=publication)
        board.write(self._output_dir)
        yield board


class PublishBestTrial(beam.PTransform):
    """``(results, dead_letters)`` -> a one-element PCollection with the ``Leaderboard``."""

    def __init__(self, output_dir: str, dataset_dir: str, metric: str, force_publish: bool = False):
        super().__init__()
        self._fn = PublishBestTrialFn(output_dir, dataset_dir, metric, force_publish)

    def expand(self, inputs: tuple[beam.PCollection[TrialResult], beam.PCollection[DeadLetter]]):
        results, letters = inputs
        collected = results | "CollectResults" >> beam.combiners.ToList()
        failures = letters | "CollectFailures" >> beam.combiners.ToList()
        return collected | "SelectBestTrial" >> beam.ParDo(self._fn, failures=beam.pvalue.AsSingleton(failures))
