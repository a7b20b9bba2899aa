"""The dataset record written by create_dataset and read by every later job."""

from __future__ import annotations

from schemas.fields import Field, RecordSchema

IMAGE_ID = "image_id"
URI = "uri"
LABEL = "label"
LABEL_INDEX = "label_index"
SPLIT = "split"
IMAGE = "image"
FORMAT = "format"
HEIGHT = "height"
WIDTH = "width"
CHANNELS = "channels"
ORIGINAL_HEIGHT = "original_height"
ORIGINAL_WIDTH = "original_width"
SHA256 = "sha256"

DATASET_RECORD = RecordSchema(
    name="dataset_record",
    fields=(
        Field(IMAGE_ID, "string", "Stable hash of the normalized URI (or of the content with --dedupe content)."),
        Field(URI, "string", "Where the source image was read from."),
        Field(LABEL, "string", "Class label text."),
        Field(LABEL_INDEX, "int64", "Position of the label in labels.txt."),
        Field(SPLIT, "string", "Split name, a pure function of image_id."),
        Field(IMAGE, "bytes", "Encoded uint8 image (JPEG or PNG) at the dataset's image size."),
        Field(FORMAT, "string", "Encoding of `image`: jpeg or png."),
        Field(HEIGHT, "int64", "Stored image height in pixels."),
        Field(WIDTH, "int64", "Stored image width in pixels."),
        Field(CHANNELS, "int64", "Stored image channels (1 or 3)."),
        Field(ORIGINAL_HEIGHT, "int64", "Source image height before resizing."),
        Field(ORIGINAL_WIDTH, "int64", "Source image width before resizing."),
        Field(SHA256, "string", "Hex SHA-256 of the source file bytes."),
    ),
)

# The raw features tf.Transform analyzes and that serving feeds through the
# same transform graph: the decoded-image tensor is built from IMAGE inside
# the preprocessing_fn, LABEL feeds the vocabulary.
TRANSFORM_INPUT_KEYS = (IMAGE, LABEL)
