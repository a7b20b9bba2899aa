"""The near-duplicates table: pairs of indexed images whose embeddings are nearly the same.

Written by the near-duplicates job (``beam_jobs.near_duplicates``) through
``transforms.warehouse.WriteToWarehouse`` into the same warehouse as the
embeddings, so SQL can join a pair back to its rows on ``image_id`` and
``model_version``. Each unordered pair appears once per run, with
``image_id_a < image_id_b``.
"""

from __future__ import annotations

from schemas.embedding import CREATED_AT, MODEL_VERSION
from schemas.fields import Field, RecordSchema
from schemas.warehouse import TableSpec

IMAGE_ID_A = "image_id_a"
IMAGE_ID_B = "image_id_b"
SIMILARITY = "similarity"

NEAR_DUPLICATE_RECORD = RecordSchema(
    name="near_duplicate_pair",
    fields=(
        Field(IMAGE_ID_A, "string", "The pair's smaller image_id."),
        Field(IMAGE_ID_B, "string", "The pair's larger image_id."),
        Field(SIMILARITY, "float", "Cosine similarity of the two embeddings (exact, from the indexed vectors)."),
        Field(MODEL_VERSION, "string", "model_version of the index (and of both embeddings)."),
        Field(CREATED_AT, "timestamp", "When the run that found the pair started (UTC); the partitioning column."),
    ),
)

NEAR_DUPLICATES_TABLE = TableSpec(
    record=NEAR_DUPLICATE_RECORD,
    default_table="near_duplicates",
    partition_field=CREATED_AT,
    clustering_fields=(MODEL_VERSION, IMAGE_ID_A),
)
