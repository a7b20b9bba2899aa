"""The embedding row written by extract_embeddings and read by build_index and the SQL queries.

One row per image and model: the model's L2-normalized ``embedding`` output
with the keys needed to join it back to the dataset. ``model_version`` travels
with every row so rows of different models in one table are never mixed: every
query filters on a single version.
"""

from __future__ import annotations

from schemas.fields import Field, RecordSchema
from schemas.warehouse import TableSpec

IMAGE_ID = "image_id"
URI = "uri"
LABEL = "label"
SPLIT = "split"
EMBEDDING = "embedding"
MODEL_VERSION = "model_version"
CREATED_AT = "created_at"

EMBEDDING_RECORD = RecordSchema(
    name="embedding_row",
    fields=(
        Field(IMAGE_ID, "string", "Stable id of the image: the same hash create_dataset uses for its URI."),
        Field(URI, "string", "Where the image was read from."),
        Field(LABEL, "string", "Label given with the input, when known.", nullable=True),
        Field(SPLIT, "string", "Dataset split of the input, when known.", nullable=True),
        Field(EMBEDDING, "float", "The model's L2-normalized embedding; length is model_info.json's "
              "embedding_dim.", repeated=True),
        Field(MODEL_VERSION, "string", "model_version from model_info.json of the model that embedded."),
        Field(CREATED_AT, "timestamp", "When the row was computed (UTC); the BigQuery partitioning column."),
    ),
)

# Where embedding rows live in a warehouse: the table name used in DuckDB and
# Parquet warehouses, BigQuery day partitions on created_at (queries over
# recent runs scan few partitions) and clustering on the columns every query
# filters or groups by.
EMBEDDINGS_TABLE = TableSpec(
    record=EMBEDDING_RECORD,
    default_table="embeddings",
    partition_field=CREATED_AT,
    clustering_fields=(MODEL_VERSION, LABEL),
)
