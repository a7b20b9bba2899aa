"""Pub/Sub sources and sinks of the streaming job: image messages in, JSON rows and dead letters out.

Three message formats (``--message_format``) become the same
``(image_id, ImageInput)`` the batch jobs make from files
(``transforms.image_inputs.keyed_image``), so the model handler and the row
formatting are shared:

- ``json_uri``: ``{"image_id": "...", "uri": "gs://..."}``; the image is read
  from the URI (local paths too) with the batch jobs' retrying reads;
- ``json_base64``: ``{"image_id": "...", "image_base64": "<base64 of the encoded file>"}``;
- ``raw_bytes``: the message data is the encoded file, ``image_id`` an attribute.

Every message is decoded and its image fully validated *before* batching,
so a malformed message, a missing or non-image file or an image over
``max_pixels`` is a dead letter (naming the message as ``pubsub:MESSAGE_ID``,
never carrying its bytes) and cannot fail the batch of good messages it
would have joined. The message's event time is its element timestamp: the
publish time, or ``--timestamp_attribute`` when given.

In a streaming job nothing may fail a bundle for good (the runner would
retry it forever), so storage that stays unavailable after the retries also
becomes a dead letter (``StorageUnavailable``) that can be replayed from the
dead-letter topic, unlike the batch jobs, which fail.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage, ReadFromPubSub, WriteToPubSub
from apache_beam.metrics import Metrics
from apache_beam.utils.timestamp import Timestamp

from schemas import counters, prediction
from schemas import stream_prediction as stream_schema
from schemas.dead_letter import DeadLetter
from transforms.dead_letters import METRICS_NAMESPACE, CountDeadLetters, RejectedInput
from transforms.file_reads import DEFAULT_RETRY, RetryPolicy
from transforms.image_inputs import KeyedImage, keyed_image, message_ref
from transforms.images import read_image_bytes
from transforms.prediction_rows import row_to_json

MESSAGE_FORMATS = ("json_uri", "json_base64", "raw_bytes")
DECODE_STAGE = "decode_message"
MALFORMED_MESSAGE = "malformed_message"
IMAGE_ID_KEY = "image_id"
URI_KEY = "uri"
IMAGE_BASE64_KEY = "image_base64"
MAX_IMAGE_ID_CHARS = 1024
DEAD_LETTERS = "dead_letters"
ERROR_TYPE_ATTRIBUTE = "error_type"
STAGE_ATTRIBUTE = "stage"


def message_digest(message: PubsubMessage) -> str:
    """``sha256:`` + a hash of the message's data and attributes: what a republished message keeps.

    Publishing the same message twice (a publisher's retry, a replayed
    batch) gives it a new message id; the content, and so this digest, stay
    the same.
    """
    digest = hashlib.sha256(message.data or b"")
    digest.update(json.dumps(sorted((message.attributes or {}).items())).encode("utf-8"))
    return f"sha256:{digest.hexdigest()[:32]}"


def message_id_of(message: PubsubMessage) -> str:
    """The message's Pub/Sub id; its content digest where the runner does not expose one."""
    if message.message_id:
        return str(message.message_id)
    return message_digest(message)


def _malformed(detail: str) -> RejectedInput:
    return RejectedInput(MALFORMED_MESSAGE, detail)


def _checked_id(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_IMAGE_ID_CHARS:
        raise _malformed(f"{IMAGE_ID_KEY} must be a non-empty string of at most {MAX_IMAGE_ID_CHARS} "
                         f"characters. Received {str(value)[:80]!r}")
    return value


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _malformed(f"not JSON: {error}") from error
    if not isinstance(parsed, dict):
        raise _malformed(f"expected a JSON object, got {type(parsed).__name__}")
    return parsed


def image_of_message(
    message: PubsubMessage, message_format: str, *, max_pixels: int, event_time: float,
    retry: RetryPolicy = DEFAULT_RETRY, source: str | None = None,
) -> KeyedImage:
    """Decodes one message into a validated ``(image_id, ImageInput)``.

    Raises:
      RejectedInput: ``malformed_message`` (bad JSON, missing or bad fields,
        bad base64), ``missing_file``/``empty_file``/``unreadable_file``
        (json_uri), or the image checks' reasons (``not_an_image``,
        ``too_many_pixels``, ...).
      StorageUnavailable: storage kept failing for a json_uri read.
    """
    message_id = message_id_of(message)
    data = message.data or b""
    if message_format == "raw_bytes":
        image_id = _checked_id((message.attributes or {}).get(IMAGE_ID_KEY))
        uri, image = message_ref(message_id), data
    else:
        body = _json_object(data)
        image_id = _checked_id(body.get(IMAGE_ID_KEY))
        if message_format == "json_uri":
            uri = body.get(URI_KEY)
            if not isinstance(uri, str) or not uri:
                raise _malformed(f"{URI_KEY} must be a non-empty string")
            image = read_image_bytes(uri, retry)
        elif message_format == "json_base64":
            encoded = body.get(IMAGE_BASE64_KEY)
            if not isinstance(encoded, str):
                raise _malformed(f"{IMAGE_BASE64_KEY} must be a base64 string")
            try:
                image = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as error:
                raise _malformed(f"{IMAGE_BASE64_KEY} is not valid base64: {error}") from error
            uri = message_ref(message_id)
        else:
            raise ValueError(f"message_format must be one of {MESSAGE_FORMATS}. Received `{message_format}`")
    return keyed_image(image_id, uri, image, max_pixels, source=source, message_id=message_id,
                       message_digest=message_digest(message), event_time=event_time)


TimedMessage = tuple[PubsubMessage, float]


def with_event_time(message: PubsubMessage, timestamp: Timestamp = beam.DoFn.TimestampParam) -> TimedMessage:
    """Pairs a message with its event time (epoch seconds), its element timestamp.

    A step of its own because a DoFn under ``with_exception_handling`` is not
    given ``DoFn.TimestampParam`` (Beam 2.77 passes the parameter object itself).
    """
    return message, float(timestamp.micros) / 1e6


@beam.typehints.with_output_types(KeyedImage, dead_letters=DeadLetter)
class DecodeMessageFn(beam.DoFn):
    """``(PubsubMessage, event_time)`` -> ``(image_id, ImageInput)``, or a dead letter naming the message.

    Counts every message in ``read``.
    """

    def __init__(self, message_format: str, max_pixels: int, retry: RetryPolicy = DEFAULT_RETRY,
                 source: str | None = None):
        if message_format not in MESSAGE_FORMATS:
            raise ValueError(f"message_format must be one of {MESSAGE_FORMATS}. Received `{message_format}`")
        self._format = message_format
        self._max_pixels = max_pixels
        self._retry = retry
        self._source = source

    def setup(self) -> None:
        self._read = Metrics.counter(METRICS_NAMESPACE, counters.READ)

    def process(self, timed: TimedMessage) -> Iterable[KeyedImage | beam.pvalue.TaggedOutput]:
        message, event_time = timed
        self._read.inc()
        try:
            keyed = image_of_message(message, self._format, max_pixels=self._max_pixels, event_time=event_time,
                                     retry=self._retry, source=self._source)
        except RejectedInput as rejected:
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, DeadLetter(
                input_ref=message_ref(message_id_of(message)), stage=DECODE_STAGE,
                error_type=rejected.error_type, message=str(rejected)[:2000]))
            return
        yield keyed


def message_failure_to_dead_letter(failure: tuple[TimedMessage, tuple[Any, ...]]) -> DeadLetter:
    """An unexpected decode failure ``((message, event_time), (type, repr, traceback))``, naming the message."""
    (message, _), (exc_type, exc_repr, _) = failure
    return DeadLetter(input_ref=message_ref(message_id_of(message)), stage=DECODE_STAGE,
                      error_type=getattr(exc_type, "__name__", str(exc_type)), message=str(exc_repr)[:2000])


class ReadImageMessages(beam.PTransform):
    """Reads image messages from Pub/Sub, redistributes and decodes them.

    Returns ``(images, dead_letters)``; every message counts once in ``read``
    and comes out in exactly one of the two.

    Args:
      subscription: ``projects/P/subscriptions/S``, or None to read ``topic``.
      topic: ``projects/P/topics/T`` (the runner makes a temporary subscription).
      message_format: One of ``MESSAGE_FORMATS``.
      max_pixels: Images with more pixels are dead letters.
      timestamp_attribute: Attribute holding the event time, or None for the publish time.
    """

    def __init__(self, *, subscription: str | None, topic: str | None, message_format: str, max_pixels: int,
                 timestamp_attribute: str | None = None, retry: RetryPolicy = DEFAULT_RETRY):
        super().__init__()
        if (subscription is None) == (topic is None):
            raise ValueError("exactly one of subscription and topic must be given")
        self._subscription = subscription
        self._topic = topic
        self._format = message_format
        self._max_pixels = max_pixels
        self._timestamp_attribute = timestamp_attribute
        self._retry = retry

    def expand(self, pbegin: beam.pvalue.PBegin):
        decoded = (
            pbegin
            | "ReadMessages" >> ReadFromPubSub(
                topic=self._topic, subscription=self._subscription, with_attributes=True,
                timestamp_attribute=self._timestamp_attribute)
            # Pub/Sub reads land on few workers; spread the decoding and inference over all of them.
            | "RedistributeMessages" >> beam.Reshuffle()
            | "AttachEventTimes" >> beam.Map(with_event_time)
            | "DecodeMessages" >> beam.ParDo(DecodeMessageFn(
                self._format, self._max_pixels, self._retry, self._subscription or self._topic))
            .with_exception_handling(main_tag="images")
            .with_outputs(DEAD_LETTERS)
        )
        unexpected = decoded.bad | "DescribeDecodeFailures" >> beam.Map(message_failure_to_dead_letter)
        letters = (decoded[DEAD_LETTERS], unexpected) | "MergeDecodeDeadLetters" >> beam.Flatten()
        return decoded.images, letters


def row_message(row: dict[str, Any]) -> PubsubMessage:
    """A stream prediction row as a JSON message with ``image_id`` and ``message_id`` attributes."""
    return PubsubMessage(row_to_json(row).encode("utf-8"), {
        stream_schema.IMAGE_ID_ATTRIBUTE: str(row[prediction.IMAGE_ID]),
        stream_schema.MESSAGE_ID_ATTRIBUTE: str(row[stream_schema.MESSAGE_ID]),
    })


def dead_letter_message(letter: DeadLetter) -> PubsubMessage:
    """A dead letter as its JSON (``DeadLetter.to_json``) with ``error_type`` and ``stage`` attributes."""
    return PubsubMessage(letter.to_json().encode("utf-8"),
                         {ERROR_TYPE_ATTRIBUTE: letter.error_type, STAGE_ATTRIBUTE: letter.stage})


class PublishRows(beam.PTransform):
    """Publishes stream prediction rows, one JSON message each, to ``topic``."""

    def __init__(self, topic: str):
        super().__init__()
        self._topic = topic

    def expand(self, rows: beam.PCollection[dict[str, Any]]) -> beam.pvalue.PDone:
        return (
            rows
            | "ToMessages" >> beam.Map(row_message)
            | "Publish" >> WriteToPubSub(self._topic, with_attributes=True)
        )


class PublishDeadLetters(beam.PTransform):
    """Publishes each dead letter (the same ``DeadLetter`` JSON as the batch files) to ``topic``.

    Args:
      topic: ``projects/P/topics/T``.
      count: Count them as ``rejected`` inputs; False for alerts that are not
        inputs (a refused model version), so read = predicted + rejected holds.
    """

    def __init__(self, topic: str, *, count: bool = True):
        super().__init__()
        self._topic = topic
        self._count = count

    def expand(self, letters: beam.PCollection[DeadLetter]) -> beam.pvalue.PDone:
        if self._count:
            letters = letters | "CountDeadLetters" >> CountDeadLetters()
        return (
            letters
            | "ToMessages" >> beam.Map(dead_letter_message)
            | "Publish" >> WriteToPubSub(self._topic, with_attributes=True)
        )
