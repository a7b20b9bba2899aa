"""The keyed image every inference job feeds the model, and how any source's bytes become one.

These types live apart from ``transforms.model_handler`` on purpose: that
module loads TensorFlow, and the steps that read manifests, dataset records or
Pub/Sub messages (and the workers that only run them) should not pay for it.

``keyed_image`` is the one way bytes become a ``KeyedImage``: it fully decodes
the image first (``transforms.images.check_image``), so a file, a dataset
record and a Pub/Sub message are validated identically and a bad image is a
dead letter before it can join, and fail, a batch. The bytes it keeps are the
ones the serving signature will decode (``transforms.serving_bytes``): the
file itself, or, for a TIFF or an EXIF-rotated image, a PNG of the pixels
create_dataset would have used.
"""

from __future__ import annotations

import dataclasses

from transforms import images
from transforms.dead_letters import RejectedInput
from transforms.serving_bytes import serving_bytes


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """One image to run through the model.

    Attributes:
      image_id: Stable id (``transforms.splitting.image_id_for_uri``, the
        dataset record's id, or the id a Pub/Sub message carries).
      uri: Where the image was read from (a path, or a message reference such
        as ``pubsub:MESSAGE_ID``); names it in dead letters.
      image_bytes: The encoded image as the serving signature takes it,
        already validated: the file itself, or a PNG of its pixels for a
        TIFF or an EXIF-rotated image (``transforms.serving_bytes``); emptied
        in prediction results so bytes do not travel on.
      label: The known (true) label, if any.
      split: The dataset split, if read from a dataset.
      source: The directory (or subscription) the image was read from.
      message_id: The Pub/Sub message it arrived in (streaming only).
      message_digest: A digest of that message's data and attributes
        (streaming only): the same for the same message published twice.
      event_time: That message's publish time, epoch seconds (streaming
        only), carried in the element because batching does not keep
        element timestamps.
    """

    image_id: str
    uri: str
    image_bytes: bytes = dataclasses.field(repr=False)
    label: str | None = None
    split: str | None = None
    source: str | None = None
    message_id: str | None = None
    message_digest: str | None = None
    event_time: float | None = None

    @property
    def input_ref(self) -> str:
        """What dead letters name this input by (never the bytes): its message, else its URI."""
        return self.uri if self.message_id is None else message_ref(self.message_id)


MESSAGE_REF_PREFIX = "pubsub:"


def message_ref(message_id: str) -> str:
    """How a dead letter names a Pub/Sub message (``pubsub:MESSAGE_ID``)."""
    return f"{MESSAGE_REF_PREFIX}{message_id}"


KeyedImage = tuple[str, ImageInput]


def keyed_image(
    image_id: str,
    uri: str,
    data: bytes,
    max_pixels: int,
    *,
    label: str | None = None,
    split: str | None = None,
    source: str | None = None,
    message_id: str | None = None,
    message_digest: str | None = None,
    event_time: float | None = None,
) -> KeyedImage:
    """Validates encoded image bytes and keys them by ``image_id``, ready for the serving signature.

    Raises:
      RejectedInput: ``empty_file``, ``not_an_image``, ``unsupported_format``,
        ``corrupt_image`` or ``too_many_pixels`` (see ``images.check_image``).
    """
    if not data:
        raise RejectedInput(images.EMPTY_FILE, f"{uri} has zero bytes")
    decoded = images.check_image(data, max_pixels)
    return image_id, ImageInput(
        image_id=image_id, uri=uri, image_bytes=serving_bytes(data, decoded), label=label, split=split, source=source,
        message_id=message_id, message_digest=message_digest, event_time=event_time,
    )
