"""train: a create_dataset output -> trained, evaluated, exported models, one Beam element per trial.

Inputs: ``--dataset_dir`` (create_dataset output) and either ``--trials``
(a YAML/JSON grid or list of hyperparameter sets, see ``model_lib.trials``)
or hyperparameter flags for a single trial (flags also override the spec's
``base``).

Outputs in ``--output_dir``: ``trials/<trial_id>/`` per trial (SavedModel with
serving signatures, model.keras, model_info.json, metrics.json, plots,
checkpoints, TensorBoard logs), ``best/`` (the best trial by
``--selection_metric`` on the validation split, published as
``best/CURRENT`` -> ``best/run-*/`` only when it is at least as good as the
model published before on the same split of the same dataset, or with
``--force_publish``), ``trials.json`` (the leaderboard, failures and the
publishing decision) and ``rejected-*.jsonl`` (failed trials). Rerunning into
the same ``--output_dir`` resumes unfinished trials from their checkpoints.

Examples:
  vision-pipelines train --dataset_dir /tmp/digits_ds --output_dir /tmp/digits_model
  vision-pipelines train --dataset_dir D --output_dir O --trials trials.yaml \\
      --direct_num_workers 2 --direct_running_mode multi_processing
  vision-pipelines train --dataset_dir gs://b/ds --output_dir gs://b/models --trials gs://b/trials.yaml \\
      --trial_accelerator "type:nvidia-tesla-t4;count:1;install-nvidia-driver" \\
      --runner DataflowRunner --project P --region R --temp_location gs://b/tmp
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from model_lib.trials import TrialSpec, load_trials
from schemas import layout
from schemas.dataset_info import DatasetInfo
from schemas.exit_status import UnusableInputError
from schemas.leaderboard import Leaderboard
from schemas.publication import published_dir
from schemas.redaction import redacted_console
from transforms.dataset_checks import trainability_problem
from transforms.dead_letters import WriteDeadLetters
from transforms.runner_policy import (
    is_dry_run,
    make_pipeline_options,
    report_dry_run,
    report_usage_error,
    require_flags,
    tolerate_shared_flags,
)
from transforms.training_trials import PublishBestTrial, RunTrials

_LOGGER = logging.getLogger(__name__)

SELECTION_METRICS = ("val_accuracy", "val_loss")
# Hyperparameter flags: name -> type. Only the flags given override the trial spec.
HPARAM_FLAGS: dict[str, type] = {
    "arch": str,
    "epochs": int,
    "batch_size": int,
    "learning_rate": float,
    "lr_schedule": str,
    "optimizer": str,
    "weights": str,
    "embedding_dim": int,
    "dropout": float,
    "fine_tune_layers": int,
    "fine_tune_epochs": int,
    "fine_tune_learning_rate": float,
    "early_stopping_patience": int,
    "seed": int,
    "serving_uri_prefix": str,
    "serving_max_pixels": int,
}


class TrainOptions(PipelineOptions):
    """The job's own flags; every other flag is a standard Beam option."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        tolerate_shared_flags(parser)
        parser.add_argument("--dataset_dir", default=None, help="create_dataset output (local or gs://).")
        parser.add_argument("--output_dir", default=None, help="Where trials/, best/ and trials.json go.")
        parser.add_argument("--trials", default=None, help="YAML/JSON trial spec (grid and/or list).")
        parser.add_argument("--selection_metric", choices=SELECTION_METRICS, default="val_accuracy",
                            help="Validation metric that picks the best trial and each trial's best epoch.")
        parser.add_argument("--trial_accelerator", default=None,
                            help="Resource hint for the training step, e.g. "
                                 "'type:nvidia-tesla-t4;count:1;install-nvidia-driver' (Dataflow).")
        parser.add_argument("--trial_min_ram", default=None, help="Resource hint for the training step, e.g. 16GB.")
        parser.add_argument("--force_publish", action="store_true",
                            help="Publish the best trial to best/ even if the published model scores better.")
        for name, kind in HPARAM_FLAGS.items():
            parser.add_argument(f"--{name}", type=kind, default=None,
                                help=f"Hyperparameter {name} for every trial (see model_lib.training.HParams).")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Validated job configuration, built once from the options."""

    dataset_dir: str
    output_dir: str
    trials: tuple[TrialSpec, ...]
    selection_metric: str
    resource_hints: dict[str, str]
    force_publish: bool = False

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "TrainConfig":
        flags = options.view_as(TrainOptions)
        require_flags(flags, "dataset_dir", "output_dir")
        dataset_dir = published_dir(flags.dataset_dir)
        check_trainable(flags.dataset_dir, dataset_dir)
        overrides = {name: getattr(flags, name) for name in HPARAM_FLAGS if getattr(flags, name) is not None}
        check_hparam_flags(overrides)
        hints = {"accelerator": flags.trial_accelerator, "min_ram": flags.trial_min_ram}
        return cls(
            dataset_dir=dataset_dir,
            output_dir=flags.output_dir.rstrip("/"),
            trials=tuple(load_trials(flags.trials, overrides)),
            selection_metric=flags.selection_metric,
            resource_hints={k: v for k, v in hints.items() if v},
            force_publish=flags.force_publish,
        )


def check_trainable(named_dir: str, dataset_dir: str) -> None:
    """Refuses, before any model is built, a dataset that no trial could train on.

    Args:
      named_dir: ``--dataset_dir`` as the user gave it (for the message).
      dataset_dir: Its published run.

    Raises:
      UnusableInputError: Not a create_dataset output, an empty train or
        validation split, fewer than two labels in train, or no transform_fn/.
    """
    if not FileSystems.exists(layout.join(dataset_dir, layout.DATASET_INFO_FILE)):
        raise UnusableInputError(f"--dataset_dir {named_dir} is not a create_dataset output "
                                 f"(no {layout.DATASET_INFO_FILE})")
    has_transform_fn = FileSystems.exists(layout.join(dataset_dir, layout.TRANSFORM_FN_DIR))
    problem = trainability_problem(DatasetInfo.read(dataset_dir), named_dir, has_transform_fn)
    if problem:
        raise UnusableInputError(problem)


def check_hparam_flags(overrides: dict[str, Any]) -> None:
    """Validates hyperparameter flags before launch: they apply to every trial, so a bad one fails the job.

    (A bad value inside a trial spec fails only its own trial, as a dead letter.)

    Raises:
      ValueError: A flag value ``model_lib.training.HParams`` rejects, named by its flag.
    """
    if not overrides:
        return
    from model_lib import training  # The launcher validates with the same rules the trials use.

    try:
        training.HParams.from_dict(overrides)
    except training.InvalidHyperparameter as error:
        raise ValueError(f"invalid hyperparameter flag: {error}") from error


class Train(beam.PTransform):
    """The whole job as one composite: trials in; results, dead letters and the leaderboard out."""

    def __init__(self, config: TrainConfig):
        super().__init__()
        self._config = config

    def expand(self, trials: beam.PCollection[TrialSpec]) -> dict[str, beam.PCollection]:
        config = self._config
        results, letters = trials | "RunTrials" >> RunTrials(
            config.dataset_dir, config.output_dir, config.selection_metric, config.resource_hints
        )
        board = (results, letters) | "PublishBestTrial" >> PublishBestTrial(
            config.output_dir, config.dataset_dir, config.selection_metric, config.force_publish
        )
        return {"results": results, "dead_letters": letters, "leaderboard": board}


def run(argv: list[str] | None = None) -> PipelineResult:
    """Builds and runs the job; returns the finished pipeline's result."""
    options = make_pipeline_options(list(sys.argv[1:] if argv is None else argv), job_options=TrainOptions)
    return execute(options, TrainConfig.from_options(options))


def execute(options: PipelineOptions, config: TrainConfig) -> PipelineResult:
    """Runs the job for an already parsed configuration (the trial spec is read once)."""
    _LOGGER.info("training %d trial(s) on %s", len(config.trials), config.dataset_dir)
    pipeline = beam.Pipeline(options=options)
    # No reshuffle here: RunTrials spreads the trials itself, one per worker in turn.
    trials = pipeline | "CreateTrials" >> beam.Create(list(config.trials), reshuffle=False)
    outputs = trials | "Train" >> Train(config)
    _ = outputs["dead_letters"] | "WriteDeadLetters" >> WriteDeadLetters(config.output_dir)
    result = pipeline.run()
    result.wait_until_finish()
    return result


def format_summary(board: Leaderboard) -> str:
    """The leaderboard, the best trial's test metrics and the publishing decision, for the terminal."""
    lines = [f"{len(board.trials)} trial(s) succeeded, {len(board.failed)} failed; ranked by {board.selection_metric}"]
    for rank, row in enumerate(board.trials, start=1):
        test = row.test
        test_text = (f"test accuracy {test['accuracy']:.4f} macro_f1 {test['macro_f1']:.4f}" if test
                     else "no test metrics (empty test split)")
        lines.append(
            f"  #{rank} {row.trial_id:<24} {row.hparams['arch']:<16} "
            f"val accuracy {row.validation['accuracy']:.4f} loss {row.validation['loss']:.4f}  "
            f"{test_text}  ({row.epochs_run} epochs, {row.train_seconds:.0f}s)"
        )
    for failure in board.failed:
        lines.append(f"  FAILED {failure.trial_id}: {failure.error_type}: {failure.message[:200]}")
    publication = board.publication
    if board.best_trial and publication is not None:
        verb = "published" if publication.published else "NOT published"
        lines.append(f"best: {board.best_trial} {verb} ({publication.reason})")
    if publication is not None and publication.model_dir:
        lines.append(f"published model: {publication.model_dir} (model_version {publication.model_version}); "
                     f"read it as --model_dir {board.best_dir}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the job and prints the leaderboard.

    Returns:
      0, or 1 when no trial succeeded or trials read != succeeded + failed,
      2 for a flag or configuration error, 3 for a dataset no trial could train
      on (both before anything runs).
    """
    try:
        options = make_pipeline_options(list(sys.argv[1:] if argv is None else argv), job_options=TrainOptions)
        config = TrainConfig.from_options(options)
    except ValueError as error:
        return report_usage_error("train", error)
    execute(options, config)
    if is_dry_run(options):  # The Dataflow job was only built: no trial ran.
        return report_dry_run("train", options)
    board = Leaderboard.read(config.output_dir)
    print(format_summary(board))
    accounted = len(board.trials) + len(board.failed)
    if accounted != len(config.trials):
        _LOGGER.error("accounting mismatch: %d trials read, %d succeeded + %d failed",
                      len(config.trials), len(board.trials), len(board.failed))
        return 1
    return 0 if board.best_trial else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    with redacted_console():
        raise SystemExit(main())
