"""Publishing a job's run directory from inside its pipeline, once every sink has written.

A batch job writes one run directory (``schemas.publication.OutputRun``) from
several branches: TFRecord shards, dead letters, a warehouse table, JSON
artifacts. Publishing it from the launching process after
``wait_until_finish`` fails where nobody waits: a Dataflow Flex Template
launch submits the job and returns, so the run would never become current.
``PublishWhenWritten`` makes publishing the pipeline's last step instead: a
one-element branch whose DoFn takes every sink's output as a side input. A
side input is handed to a step only once the PCollection is complete (in a
batch pipeline's global window: once every bundle of the step producing it
has committed), so the DoFn runs after every sink has written; it then runs
the job's check (raising fails the job and publishes nothing), removes the
run's scratch space and publishes.

Each sink must return a PCollection that is complete only when its output
is: the file names Beam's file sinks return after finalizing,
``WriteDeadLetters``, ``WriteToWarehouse`` (after the DuckDB load, after
BigQuery's load and copy jobs), ``WriteDatasetInfo``, ``WriteEvaluation``,
``BuildIndex``'s IndexInfo. Nothing the DoFn receives is large: file names,
one summary record.

The launching process, when it waits (``finish``), only verifies that the
run was published, abandons the run when the pipeline failed, and turns the
check's error back into the job's own exception type (``failure_of``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.runners.runner import PipelineResult

from schemas.publication import SUCCESS_FILE, OutputRun, join
from transforms.dead_letters import METRICS_NAMESPACE

_LOGGER = logging.getLogger(__name__)

PUBLISHED_COUNTER = "published"  # Runs published by the pipeline itself.
# Beam appends this to the message of an exception a step raised.
_STEP_NOTE = re.compile(r"\s*\[while running '[^']*'\]")

# A job-specific check: receives each side input by its name, as a list; raises to publish nothing.
PublishCheck = Callable[..., None]


class NotPublishedError(RuntimeError):
    """The pipeline finished but its run was not published (the publishing step never ran)."""


def remove_scratch(paths: Sequence[str]) -> None:
    """Deletes the directories a run no longer needs (tf.Transform's scratch space); missing ones are fine."""
    for path in paths:
        if FileSystems.exists(path):
            FileSystems.delete([path])


class PublishRunsFn(beam.DoFn):
    """One element in, the published run directories out; every sink's output arrives as a side input.

    Retrying the bundle is harmless: the check is a pure function of the
    side inputs, removing scratch space twice finds nothing the second time,
    and ``OutputRun.publish`` of a run already published changes nothing.
    """

    def __init__(self, runs: Sequence[OutputRun], check: PublishCheck | None, scratch: Sequence[str]):
        self._runs = list(runs)
        self._check = check
        self._scratch = list(scratch)

    def setup(self) -> None:
        self._published = Metrics.counter(METRICS_NAMESPACE, PUBLISHED_COUNTER)

    def process(self, _: None, **written: list[Any]) -> Iterable[str]:
        if self._check is not None:
            self._check(**written)
        remove_scratch(self._scratch)
        for run in self._runs:
            published = run.publish()
            self._published.inc()
            _LOGGER.info("published %s", published)
            yield published


class PublishWhenWritten(beam.PTransform):
    """Publishes runs once every sink named in the input dict has written.

    Input: a dict ``name -> PCollection``, each complete only when its sink
    finished (see the module docstring); names must be Python identifiers.
    Output: the published run directories (one per run).

    Args:
      runs: The run or runs the pipeline writes (one publish each, in order).
      check: Called as ``check(**{name: list of elements})`` before anything
        is published; raising fails the job and publishes nothing.
      scratch: Directories to delete before publishing (they may lie inside
        the run, which must not be published with them).
    """

    def __init__(self, runs: OutputRun | Sequence[OutputRun], *, check: PublishCheck | None = None,
                 scratch: Sequence[str] = ()):
        super().__init__()
        runs = [runs] if isinstance(runs, OutputRun) else list(dict.fromkeys(runs))
        if not runs:
            raise ValueError("PublishWhenWritten needs at least one run")
        self._fn = PublishRunsFn(runs, check, scratch)

    def expand(self, done: Mapping[str, beam.PCollection]) -> beam.PCollection[str]:
        if not done:
            raise ValueError("PublishWhenWritten needs the output of at least one sink")
        pipeline = next(iter(done.values())).pipeline
        sides = {name: beam.pvalue.AsList(written) for name, written in done.items()}
        return (
            pipeline
            | "StartPublishing" >> beam.Create([None])
            | "PublishRuns" >> beam.ParDo(self._fn, **sides)
        )


def failure_of(error: BaseException, kind: type[BaseException]) -> str | None:
    """The message of the ``kind`` exception that failed a pipeline, or None when something else failed it.

    In-process runners re-raise the step's own exception (Beam appends
    `` [while running 'STEP']`` to its message, or raises a RuntimeError
    ``Kind: message [while running ...]`` when the type cannot be rebuilt);
    portable runners and Dataflow raise an error whose text holds the
    worker's traceback, ending in ``module.Kind: message``. Matching the
    type's name in that text is what is left to recognize it by.
    """
    text = str(error)
    if not isinstance(error, kind):
        match = re.search(rf"(?:^|[\s.]){re.escape(kind.__name__)}: (.+)", text)
        if match is None:
            return None
        text = match.group(1)
    lines = text.strip().splitlines()
    return _STEP_NOTE.sub("", lines[0] if lines else "").strip()


@dataclasses.dataclass(frozen=True)
class Launch:
    """A pipeline that has been started and publishes its runs itself.

    Attributes:
      result: What ``pipeline.run()`` returned (a running job on Dataflow and
        portable runners; a finished one on the in-process runner).
      runs: The runs its ``PublishWhenWritten`` step publishes.
      dry_run: Whether the job was only built (nothing ran, nothing is published).
      scratch: The scratch directories the publishing step removes; ``finish``
        removes them too when the pipeline failed.
      explain: Called with a pipeline failure before the runs are abandoned;
        raises the job's own exception for a failure it recognizes (it may
        read the run directory, which still exists then).
    """

    result: PipelineResult
    runs: tuple[OutputRun, ...]
    dry_run: bool = False
    scratch: tuple[str, ...] = ()
    explain: Callable[[BaseException], None] | None = None


def _fail(runs: Sequence[OutputRun], scratch: Sequence[str], explain: Callable[[BaseException], None] | None,
          error: BaseException) -> None:
    """Explains a failed pipeline, then abandons its runs and scratch space; the caller re-raises."""
    try:
        if explain is not None:
            explain(error)
    finally:
        for run in dict.fromkeys(runs):
            run.abandon()
        try:
            remove_scratch(scratch)
        except OSError as cleanup_error:  # Best effort: the job's failure is what the user needs to see.
            _LOGGER.warning("could not remove scratch space %s: %s", list(scratch), cleanup_error)


def launch(pipeline: beam.Pipeline, runs: Sequence[OutputRun], *, dry_run: bool = False,
           scratch: Sequence[str] = (), explain: Callable[[BaseException], None] | None = None) -> Launch:
    """Starts a pipeline that ends in ``PublishWhenWritten``, as a Flex Template launch does: no waiting.

    Raises:
      Whatever ``pipeline.run()`` raised (the in-process runner runs the whole
      pipeline there), after ``explain`` and abandoning the runs.
    """
    try:
        result = pipeline.run()
    except BaseException as error:
        _fail(runs, scratch, explain, error)
        raise
    return Launch(result, tuple(dict.fromkeys(runs)), dry_run, tuple(scratch), explain)


def finish(started: Launch) -> PipelineResult:
    """What the launching process does when it waits: waits, then verifies the pipeline published its runs.

    A dry run built the job and ran nothing: its (empty) runs are abandoned.
    A failed pipeline is explained (``Launch.explain``) and its runs
    abandoned; the previously published output stays current.

    Raises:
      NotPublishedError: The pipeline succeeded without publishing.
      Whatever the pipeline failed with, or the job's exception ``explain`` raised.
    """
    try:
        started.result.wait_until_finish()
    except BaseException as error:
        _fail(started.runs, started.scratch, started.explain, error)
        raise
    if started.dry_run:
        for run in started.runs:
            run.abandon()
        return started.result
    missing = [run.run_dir for run in started.runs if not FileSystems.exists(join(run.run_dir, SUCCESS_FILE))]
    if missing:
        raise NotPublishedError(f"the pipeline finished but did not publish {', '.join(missing)}")
    return started.result
