"""The prediction record written by batch_predict (and streamed by stream_predict).

One row per predicted image. ``top_k`` is stored as two parallel repeated
columns (``top_k_labels[i]`` has probability ``top_k_probabilities[i]``,
highest first) because a ``RecordSchema`` field is a scalar or a flat list;
parallel lists keep the same shape in JSON, Arrow/Parquet and BigQuery.
"""

from __future__ import annotations

from apache_beam.io.filesystems import FileSystems

from schemas.fields import Field, RecordSchema
from schemas.warehouse import TableSpec

IMAGE_ID = "image_id"
URI = "uri"
LABEL = "label"
LABEL_INDEX = "label_index"
SCORE = "score"
TOP_K_LABELS = "top_k_labels"
TOP_K_PROBABILITIES = "top_k_probabilities"
TRUE_LABEL = "true_label"
SPLIT = "split"
SOURCE = "source"
MODEL_VERSION = "model_version"

PREDICTION_RECORD = RecordSchema(
    name="prediction",
    fields=(
        Field(IMAGE_ID, "string", "Stable id of the image: the same hash create_dataset uses for its URI."),
        Field(URI, "string", "Where the image was read from."),
        Field(LABEL, "string", "Predicted label (the model's top-1 class)."),
        Field(LABEL_INDEX, "int64", "Position of the predicted label in the model's labels."),
        Field(SCORE, "float", "Probability of the predicted label."),
        Field(TOP_K_LABELS, "string", "The k most probable labels, most probable first.", repeated=True),
        Field(TOP_K_PROBABILITIES, "float", "Probabilities of top_k_labels, in the same order.", repeated=True),
        Field(TRUE_LABEL, "string", "Label given with the input (manifest or dataset), when known.", nullable=True),
        Field(SPLIT, "string", "Dataset split of the input, when read from create_dataset TFRecords.", nullable=True),
        Field(SOURCE, "string", "Directory the image was read from (its URI without the file name); "
              "a slice column for evaluation.", nullable=True),
        Field(MODEL_VERSION, "string", "model_version from model_info.json of the model that predicted."),
    ),
)

# How predictions are stored as a warehouse table (bigquery:, parquet:, duckdb:).
PREDICTIONS_TABLE = TableSpec(
    record=PREDICTION_RECORD,
    default_table="predictions",
    clustering_fields=(MODEL_VERSION, LABEL),
)

# Columns eval.json can be sliced by (besides the true label, always sliced).
SLICE_COLUMNS = (SPLIT, SOURCE)

# batch_predict output layout: predictions-SSSSS-of-NNNNN.{jsonl,parquet},
# eval.json and rejected-*.jsonl (schemas.layout) in the output directory.
PREDICTIONS_PREFIX = "predictions"
PREDICTIONS_JSONL_SUFFIX = ".jsonl"
EVAL_FILE = "eval.json"


def jsonl_predictions_pattern(run_dir: str) -> str:
    """The glob of a published batch_predict run's JSON-lines shards (resolve the run with ``published_dir``)."""
    return FileSystems.join(run_dir, f"{PREDICTIONS_PREFIX}-*-of-*{PREDICTIONS_JSONL_SUFFIX}")
