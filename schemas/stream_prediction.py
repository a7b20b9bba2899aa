"""The prediction message stream_predict publishes for every input message (and its BigQuery row).

The same prediction fields as batch_predict's ``PREDICTION_RECORD`` (label,
top-k, model_version), plus what a stream needs to join and measure: the
Pub/Sub message id of the input (also the BigQuery insert id, so a redelivered
message does not make a second row), its event time (the input's publish
time) and the processing time, so end-to-end latency is their difference.
"""

from __future__ import annotations

from schemas import prediction
from schemas.fields import Field, RecordSchema
from schemas.warehouse import TableSpec

MESSAGE_ID = "message_id"
EVENT_TIME = "event_time"
PROCESSING_TIME = "processing_time"

# Attributes of every output and dead-letter message, so subscribers can filter without parsing.
IMAGE_ID_ATTRIBUTE = prediction.IMAGE_ID
MESSAGE_ID_ATTRIBUTE = MESSAGE_ID

STREAM_PREDICTION_RECORD = RecordSchema(
    name="stream_prediction",
    fields=(
        Field(prediction.IMAGE_ID, "string", "The image id the input message carried."),
        Field(MESSAGE_ID, "string", "Pub/Sub message id of the input message."),
        Field(prediction.URI, "string", "The image's URI (json_uri messages) or pubsub:MESSAGE_ID."),
        Field(prediction.LABEL, "string", "Predicted label (the model's top-1 class)."),
        Field(prediction.LABEL_INDEX, "int64", "Position of the predicted label in the model's labels."),
        Field(prediction.SCORE, "float", "Probability of the predicted label."),
        Field(prediction.TOP_K_LABELS, "string", "The k most probable labels, most probable first.", repeated=True),
        Field(prediction.TOP_K_PROBABILITIES, "float", "Probabilities of top_k_labels, in the same order.",
              repeated=True),
        Field(prediction.MODEL_VERSION, "string", "model_version of the model that predicted."),
        Field(EVENT_TIME, "timestamp", "Publish time of the input message."),
        Field(PROCESSING_TIME, "timestamp", "When the prediction was made."),
    ),
)

STREAM_PREDICTIONS_TABLE = TableSpec(
    record=STREAM_PREDICTION_RECORD,
    default_table="stream_predictions",
    partition_field=EVENT_TIME,
    clustering_fields=(prediction.MODEL_VERSION, prediction.LABEL),
)
