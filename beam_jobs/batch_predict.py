"""batch_predict: bulk inference of an exported image model over many images.

Inputs (``--input``): a manifest CSV of ``uri[,label]`` rows, a glob of image
files (local or gs://), or create_dataset TFRecords (a dataset directory or a
shard glob). ``--model_dir`` is a model directory written by train
(``saved_model/`` + ``model_info.json``).

Outputs (``--output``):
- a directory: ``predictions-SSSSS-of-NNNNN.jsonl`` (``--output_format jsonl``)
  or ``predictions/part-*.parquet`` (``--output_format parquet``);
- a warehouse table: ``bigquery:PROJECT.DATASET.TABLE`` (FILE_LOADS; needs
  ``--temp_location gs://...``), ``parquet:DIR[#TABLE]`` or ``duckdb:PATH[#TABLE]``.
Rows follow ``schemas.prediction.PREDICTION_RECORD``. Next to them (or in
``--artifacts_dir``): ``rejected-*.jsonl`` dead letters and, when inputs carry
labels, ``eval.json`` (accuracy, per-class precision/recall/F1, slices).
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
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from schemas import layout, prediction
from schemas.warehouse import WAREHOUSE_KINDS, WRITE_DISPOSITIONS, parse_warehouse_uri
from transforms import model_handler
from transforms.dead_letters import METRICS_NAMESPACE, WriteDeadLetters, counter_total
from transforms.inference_inputs import ReadImageInputs
from transforms.inference_options import InferenceConfig, InferenceOptions
from transforms.model_handler import ImageModelHandler, KeyedPrediction, PredictImages
from transforms.prediction_eval import WriteEvaluation
from transforms.runner_policy import make_pipeline_options, report_usage_error, tolerate_shared_flags
from transforms.warehouse import WriteToWarehouse

_LOGGER = logging.getLogger(__name__)

OUTPUT_FORMATS = ("jsonl", "parquet")
PREDICTED_COUNTER = "predicted"


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


@dataclasses.dataclass(frozen=True)
class BatchPredictConfig:
    """Validated job configuration, built once from the options.

    Attributes:
      inference: Model, input and batching settings shared with extract_embeddings.
      warehouse_uri: Where rows go when they go to a warehouse table; None
        writes JSON lines under ``artifacts_dir``.
    """

    inference: InferenceConfig
    warehouse_uri: str | None
    artifacts_dir: str
    write_disposition: str
    top_k: int
    slice_column: str | None

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "BatchPredictConfig":
        flags = options.view_as(BatchPredictOptions)
        if not flags.output:
            raise ValueError("--output is required")
        if flags.top_k < 1:
            raise ValueError(f"--top_k must be >= 1. Received `top_k={flags.top_k}`")
        output = flags.output.rstrip("/")
        scheme = output.partition(":")[0]
        if scheme in WAREHOUSE_KINDS:
            warehouse = parse_warehouse_uri(output, prediction.PREDICTIONS_TABLE.default_table)
            warehouse_uri: str | None = output
            artifacts_dir = flags.artifacts_dir or (warehouse.location if warehouse.kind == "parquet" else None)
            if artifacts_dir is None:
                raise ValueError(f"--artifacts_dir is required with --output {output} (for eval.json and rejected)")
        else:
            artifacts_dir = flags.artifacts_dir or output
            warehouse_uri = (
                f"parquet:{output}#{prediction.PREDICTIONS_PREFIX}" if flags.output_format == "parquet" else None
            )
        return cls(
            inference=InferenceConfig.from_options(options),
            warehouse_uri=warehouse_uri,
            artifacts_dir=artifacts_dir.rstrip("/"),
            write_disposition=flags.write_disposition,
            top_k=flags.top_k,
            slice_column=flags.slice_column,
        )


class FormatPredictionFn(beam.DoFn):
    """``(key, PredictionResult)`` -> a ``PREDICTION_RECORD`` dict, counted as predicted."""

    def __init__(self, labels: list[str], top_k: int):
        self._labels = labels
        self._top_k = min(top_k, len(labels))

    def setup(self) -> None:
        self._predicted = beam.metrics.Metrics.counter(METRICS_NAMESPACE, PREDICTED_COUNTER)

    def process(self, result: KeyedPrediction) -> Iterable[dict[str, Any]]:
        self._predicted.inc()
        yield model_handler.prediction_row(result, self._labels, self._top_k)


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


def row_to_json(row: dict[str, Any]) -> str:
    return json.dumps(row)


def run(argv: list[str] | None = None) -> PipelineResult:
    """Builds and runs the job; returns the finished pipeline's result."""
    options = make_pipeline_options(list(argv or []), job_options=BatchPredictOptions)
    config = BatchPredictConfig.from_options(options)
    handler = config.inference.make_handler()
    pipeline = beam.Pipeline(options=options)
    images, read_letters = pipeline | "ReadInputs" >> ReadImageInputs(config.inference.input_spec)
    rows, predict_letters = images | "BatchPredict" >> BatchPredict(handler, config.top_k)
    if config.warehouse_uri is None:
        _ = (
            rows
            | "FormatJsonLines" >> beam.Map(row_to_json)
            | "WriteJsonLines"
            >> beam.io.WriteToText(
                layout.join(config.artifacts_dir, prediction.PREDICTIONS_PREFIX), file_name_suffix=".jsonl"
            )
        )
    else:
        _ = rows | "WriteWarehouse" >> WriteToWarehouse(
            config.warehouse_uri, prediction.PREDICTIONS_TABLE, write_disposition=config.write_disposition
        )
    _ = rows | "Evaluate" >> WriteEvaluation(
        layout.join(config.artifacts_dir, prediction.EVAL_FILE),
        handler.model_info.labels,
        slice_column=config.slice_column,
        model_version=handler.model_info.model_version,
    )
    _ = (read_letters, predict_letters) | "MergeDeadLetters" >> beam.Flatten() | "WriteDeadLetters" >> WriteDeadLetters(
        config.artifacts_dir
    )
    result = pipeline.run()
    result.wait_until_finish()
    return result


def accounting(result: PipelineResult) -> dict[str, int]:
    """``read``, ``predicted``, ``rejected`` and ``model_loads`` from the run's metrics."""
    return {
        name: counter_total(result, name)
        for name in ("read", PREDICTED_COUNTER, "rejected", model_handler.MODEL_LOADS_COUNTER)
    }


def main(argv: list[str] | None = None) -> int:
    try:  # Flag and configuration errors end here, in one line and exit status 2, before anything runs.
        BatchPredictConfig.from_options(make_pipeline_options(list(argv or []), job_options=BatchPredictOptions))
    except ValueError as error:
        return report_usage_error("batch-predict", error)
    counts = accounting(run(argv))
    print(json.dumps(counts, sort_keys=True))
    if counts["read"] != counts[PREDICTED_COUNTER] + counts["rejected"]:
        _LOGGER.error("Accounting mismatch: read %d != predicted %d + rejected %d",
                      counts["read"], counts[PREDICTED_COUNTER], counts["rejected"])
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
