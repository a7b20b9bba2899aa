"""batch_predict: bulk inference of an exported image model over many images.

Inputs (``--input``): a manifest CSV of ``uri[,label]`` rows, a glob of image
files (local or gs://), or create_dataset TFRecords (a dataset directory or a
shard glob). ``--model_dir`` is a model directory written by train
(``saved_model/`` + ``model_info.json``).

Outputs (``--output``):
- a directory: a run directory published under it (``schemas.publication``:
  ``CURRENT`` names it once the run succeeded; a non-empty directory needs
  ``--overwrite``) holding ``predictions-SSSSS-of-NNNNN.jsonl``
  (``--output_format jsonl``) or ``predictions/part-*.parquet``
  (``--output_format parquet``);
- a warehouse table: ``bigquery:PROJECT.DATASET.TABLE`` (FILE_LOADS; needs
  ``--temp_location gs://...``), ``parquet:DIR[#TABLE]`` or ``duckdb:PATH[#TABLE]``.
Rows follow ``schemas.prediction.PREDICTION_RECORD``. In the same run directory
(or one published under ``--artifacts_dir``; beside a local warehouse by
default, ``PATH.runs/`` or ``DIR/_runs/``): ``rejected-*.jsonl`` dead letters
and, when inputs carry labels, ``eval.json`` (accuracy, per-class
precision/recall/F1, slices).
The job prints ``read``, ``predicted`` and ``rejected`` counts; read =
predicted + rejected.

Example:
  vision-pipelines batch-predict --model_dir gs://bucket/model/best \\
      --input 'gs://bucket/new_images/*.jpg' --output bigquery:my-project.vision.predictions \\
      --artifacts_dir gs://bucket/predict_run --top_k 3 \\
      --runner DataflowRunner --project my-project --region us-central1 --temp_location gs://bucket/tmp
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from schemas import counters, layout, prediction
from schemas.exit_status import UNUSABLE_INPUT_EXIT, UnusableInputError
from schemas.publication import OutputExistsError, OutputRun
from schemas.redaction import redacted_console
from schemas.warehouse import WAREHOUSE_KINDS, WRITE_DISPOSITIONS, parse_warehouse_uri, run_artifacts_root
from transforms import model_handler
from transforms.dead_letters import WriteDeadLetters, counter_total
from transforms.inference_inputs import ReadImageInputs
from transforms.inference_options import InferenceConfig, InferenceOptions
from transforms.inference_preconditions import check_input_matches, check_model_dir, no_inputs_message
from transforms.model_handler import ImageModelHandler, PredictImages
from transforms.prediction_eval import WriteEvaluation
from transforms.prediction_rows import FormatPredictionFn, row_to_json
from transforms.publishing import Launch, PublishWhenWritten, finish, launch
from transforms.runner_policy import (
    is_dry_run,
    make_pipeline_options,
    report_dry_run,
    report_usage_error,
    require_flags,
    tolerate_shared_flags,
)
from transforms.warehouse import WriteToWarehouse

_LOGGER = logging.getLogger(__name__)

OUTPUT_FORMATS = ("jsonl", "parquet")
PREDICTED_COUNTER = counters.PREDICTED


class BatchPredictOptions(InferenceOptions):
    """The job's own flags; every other flag is a standard Beam option."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        tolerate_shared_flags(parser)
        parser.add_argument("--output", default=None,
                            help="Output directory, or bigquery:P.D.T / parquet:DIR[#T] / duckdb:PATH[#T].")
        parser.add_argument("--output_format", choices=OUTPUT_FORMATS, default="jsonl",
                            help="Row format when --output is a directory.")
        parser.add_argument("--artifacts_dir", default=None,
                            help="Where eval.json and rejected-*.jsonl go (default: the output directory).")
        parser.add_argument("--write_disposition", choices=WRITE_DISPOSITIONS, default="append",
                            help="For warehouse outputs: append rows or replace the table.")
        parser.add_argument("--top_k", type=int, default=5, help="Labels with probabilities kept per image.")
        parser.add_argument("--slice_column", choices=prediction.SLICE_COLUMNS, default=None,
                            help="Also slice eval.json by this column.")
        parser.add_argument("--overwrite", action="store_true",
                            help="Replace a non-empty --output / --artifacts_dir directory (published only "
                                 "when the new run succeeded).")


@dataclasses.dataclass(frozen=True)
class BatchPredictConfig:
    """Validated job configuration, built once from the options.

    Attributes:
      inference: Model, input and batching settings shared with extract_embeddings.
      output_dir: The output directory when ``--output`` is one (rows, eval.json
        and dead letters go into a run directory published under it); None for
        a warehouse table.
      output_format: Row format in ``output_dir``.
      warehouse_uri: The warehouse table when ``--output`` names one.
      artifacts_dir: ``--artifacts_dir`` as given (published under the output rule), or None.
      artifacts_root: Where per-run artifacts go beside a local warehouse when
        ``artifacts_dir`` is None.
      overwrite: Whether a non-empty output or artifacts directory may be replaced.
    """

    inference: InferenceConfig
    output_dir: str | None
    output_format: str
    warehouse_uri: str | None
    artifacts_dir: str | None
    artifacts_root: str | None
    write_disposition: str
    top_k: int
    slice_column: str | None
    overwrite: bool

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "BatchPredictConfig":
        flags = options.view_as(BatchPredictOptions)
        require_flags(flags, "output")
        if flags.top_k < 1:
            raise ValueError(f"--top_k must be >= 1. Received `top_k={flags.top_k}`")
        output = flags.output.rstrip("/")
        artifacts_dir = flags.artifacts_dir.rstrip("/") if flags.artifacts_dir else None
        output_dir = warehouse_uri = artifacts_root = None
        if output.partition(":")[0] in WAREHOUSE_KINDS:
            warehouse_uri = output
            artifacts_root = run_artifacts_root(parse_warehouse_uri(output, prediction.PREDICTIONS_TABLE.default_table))
            if artifacts_dir is None and artifacts_root is None:
                raise ValueError(f"--artifacts_dir is required with --output {output} (for eval.json and rejected)")
        else:
            output_dir = output
        return cls(
            inference=InferenceConfig.from_options(options),
            output_dir=output_dir,
            output_format=flags.output_format,
            warehouse_uri=warehouse_uri,
            artifacts_dir=artifacts_dir,
            artifacts_root=artifacts_root,
            write_disposition=flags.write_disposition,
            top_k=flags.top_k,
            slice_column=flags.slice_column,
            overwrite=flags.overwrite,
        )

    def start_runs(self) -> tuple[OutputRun | None, OutputRun]:
        """Applies the output rule: ``(output run or None, artifacts run)``, the same run when they coincide.

        Raises:
          OutputExistsError: ``--output`` or ``--artifacts_dir`` is not empty and ``--overwrite`` was not given.
        """
        output_run = OutputRun.start(self.output_dir, overwrite=self.overwrite, flag="--output") \
            if self.output_dir else None
        if self.artifacts_dir is not None:
            return output_run, OutputRun.start(self.artifacts_dir, overwrite=self.overwrite, flag="--artifacts_dir")
        if output_run is not None:
            return output_run, output_run
        return None, OutputRun.start(str(self.artifacts_root), overwrite=True)


class BatchPredict(beam.PTransform):
    """The job as one composite: ``(image_id, ImageInput)`` in, prediction rows and dead letters out."""

    def __init__(self, handler: ImageModelHandler, top_k: int):
        super().__init__()
        self._handler = handler
        self._top_k = top_k

    def expand(self, images: beam.PCollection):
        predictions, dead_letters = images | "PredictImages" >> PredictImages(self._handler)
        rows = predictions | "FormatPredictions" >> beam.ParDo(
            FormatPredictionFn(list(self._handler.model_info.labels), self._top_k)
        )
        return rows, dead_letters


def start(argv: list[str] | None = None) -> Launch:
    """Builds the job and starts it without waiting; the pipeline publishes its output and artifacts runs itself.

    Raises:
      OutputExistsError: ``--output`` or ``--artifacts_dir`` is not empty and ``--overwrite`` was not given.
    """
    options = make_pipeline_options(list(argv or []), job_options=BatchPredictOptions)
    config = BatchPredictConfig.from_options(options)
    handler = config.inference.make_handler()
    output_run, artifacts_run = config.start_runs()
    runs = [run for run in (output_run, artifacts_run) if run is not None]
    try:
        pipeline = _build_pipeline(options, config, handler, output_run, artifacts_run)
    except BaseException:
        for started in dict.fromkeys(runs):
            started.abandon()
        raise
    return launch(pipeline, runs, dry_run=is_dry_run(options))


def run(argv: list[str] | None = None) -> PipelineResult:
    """Runs the job and waits; the pipeline has published its runs when this returns."""
    return finish(start(argv))


def _build_pipeline(options: PipelineOptions, config: BatchPredictConfig, handler: ImageModelHandler,
                    output_run: OutputRun | None, artifacts_run: OutputRun) -> beam.Pipeline:
    pipeline = beam.Pipeline(options=options)
    artifacts_dir = artifacts_run.run_dir
    images, read_letters = pipeline | "ReadInputs" >> ReadImageInputs(config.inference.input_spec)
    rows, predict_letters = images | "BatchPredict" >> BatchPredict(handler, config.top_k)
    if output_run is not None and config.output_format == "jsonl":
        predictions = (
            rows
            | "FormatJsonLines" >> beam.Map(row_to_json)
            | "WriteJsonLines"
            >> beam.io.WriteToText(
                layout.join(output_run.run_dir, prediction.PREDICTIONS_PREFIX),
                file_name_suffix=prediction.PREDICTIONS_JSONL_SUFFIX,
            )
        )
    else:
        warehouse_uri = config.warehouse_uri or f"parquet:{output_run.run_dir}#{prediction.PREDICTIONS_PREFIX}"
        predictions = rows | "WriteWarehouse" >> WriteToWarehouse(
            warehouse_uri, prediction.PREDICTIONS_TABLE, write_disposition=config.write_disposition
        )
    evaluation = rows | "Evaluate" >> WriteEvaluation(
        layout.join(artifacts_dir, prediction.EVAL_FILE),
        handler.model_info.labels,
        slice_column=config.slice_column,
        model_version=handler.model_info.model_version,
    )
    dead_letters = (read_letters, predict_letters) | "MergeDeadLetters" >> beam.Flatten() | (
        "WriteDeadLetters" >> WriteDeadLetters(artifacts_dir))
    # The artifacts run is published only once the predictions are written too, wherever they go.
    _ = {"predictions": predictions, "evaluation": evaluation, "dead_letters": dead_letters} | (
        "PublishRuns" >> PublishWhenWritten([run for run in (output_run, artifacts_run) if run is not None]))
    return pipeline


def accounting(result: PipelineResult) -> dict[str, int]:
    """``read``, ``predicted``, ``rejected`` and ``model_loads`` from the run's metrics."""
    return {
        name: counter_total(result, name)
        for name in (counters.READ, PREDICTED_COUNTER, counters.REJECTED, model_handler.MODEL_LOADS_COUNTER)
    }


def main(argv: list[str] | None = None) -> int:
    try:  # Flag and configuration errors end here, in one line and exit status 2, before anything runs.
        options = make_pipeline_options(list(argv or []), job_options=BatchPredictOptions)
        config = BatchPredictConfig.from_options(options)
        flags = options.view_as(BatchPredictOptions)
    except ValueError as error:
        return report_usage_error("batch-predict", error)
    try:  # What the flags name must exist: one line and exit status 3 otherwise, before anything runs.
        check_model_dir(flags.model_dir)
        check_input_matches(config.inference.input_spec.pattern)
    except UnusableInputError as error:
        return report_usage_error("batch-predict", error)
    try:
        result = run(argv)
    except OutputExistsError as error:  # Checked when the run starts, before the pipeline is built.
        return report_usage_error("batch-predict", error)
    if is_dry_run(options):
        return report_dry_run("batch-predict", options)
    counts = accounting(result)
    print(json.dumps(counts, sort_keys=True))
    if counts[counters.READ] == 0:  # An input with no rows: say so, in a status scripts can test.
        sys.stderr.write(f"vision-pipelines batch-predict: error: {no_inputs_message(flags.input)}\n")
        return UNUSABLE_INPUT_EXIT
    if counts[counters.READ] != counts[PREDICTED_COUNTER] + counts[counters.REJECTED]:
        _LOGGER.error("Accounting mismatch: read %d != predicted %d + rejected %d",
                      counts[counters.READ], counts[PREDICTED_COUNTER], counts[counters.REJECTED])
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    with redacted_console():
        sys.exit(main(sys.argv[1:]))
