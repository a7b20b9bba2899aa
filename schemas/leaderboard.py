"""The ``trials.json`` contract: train's leaderboard, failures and publishing decision.

``transforms.training_trials`` writes a ``Leaderboard`` once per job (whole or
not at all); ``beam_jobs.train`` and users read it back through
``Leaderboard.read``, never by literal keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from schemas import artifact_files, model_artifacts
from schemas.publication import join


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


@dataclasses.dataclass(frozen=True)
class FailedTrial:
    """A trial that produced no model, with its dead letter's reason."""

    trial_id: str
    error_type: str
    message: str


@dataclasses.dataclass(frozen=True)
class Publication:
    """What happened to ``best/`` at the end of the job (the blessing decision).

    Attributes:
      published: Whether the best trial became the published model.
      reason: Why, in one sentence.
      model_dir: The published model directory after the job (None if nothing is published).
      model_version: The published model's version after the job.
      candidate_score: The best trial's selection metric on the validation split.
      baseline_score: The previously published model's, on the same split (None without one).
    """

    published: bool
    reason: str
    model_dir: str | None = None
    model_version: str | None = None
    candidate_score: float | None = None
    baseline_score: float | None = None


@dataclasses.dataclass(frozen=True)
class Leaderboard:
    """``OUTPUT/trials.json``.

    Attributes:
      selection_metric: The validation metric trials are ranked by.
      best_trial: The best trial's id (None when every trial failed).
      best_dir: ``OUTPUT/best``: resolve it with ``schemas.publication.published_dir``.
      trials: Succeeded trials, best first (rank = position + 1).
      failed: Failed trials, by id.
      publication: The blessing decision for the best trial.
    """

    selection_metric: str
    best_trial: str | None
    best_dir: str | None
    trials: list[TrialResult]
    failed: list[FailedTrial]
    publication: Publication | None = None

    def to_dict(self) -> dict[str, Any]:
        content = dataclasses.asdict(self)
        content["trials"] = [{"rank": rank, **dataclasses.asdict(t)} for rank, t in enumerate(self.trials, start=1)]
        return content

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "trials.json") -> "Leaderboard":
        values = artifact_files.field_values(cls, content, source)
        publication = values.get("publication")
        return cls(
            selection_metric=values["selection_metric"],
            best_trial=values["best_trial"],
            best_dir=values["best_dir"],
            trials=[TrialResult(**artifact_files.field_values(TrialResult, row, source)) for row in values["trials"]],
            failed=[FailedTrial(**artifact_files.field_values(FailedTrial, row, source)) for row in values["failed"]],
            publication=Publication(**artifact_files.field_values(Publication, publication, source))
            if publication else None,
        )

    @staticmethod
    def path(output_dir: str) -> str:
        return join(output_dir.rstrip("/"), model_artifacts.TRIALS_LEADERBOARD_FILE)

    @classmethod
    def read(cls, output_dir: str) -> "Leaderboard":
        path = cls.path(output_dir)
        return cls.from_dict(artifact_files.read_json(path), path)

    def write(self, output_dir: str) -> None:
        artifact_files.write_json(self.path(output_dir), self.to_dict())
