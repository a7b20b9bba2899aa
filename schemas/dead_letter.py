"""The dead-letter record every job writes for inputs it could not process.

A rejected input's reference and error message often quote its URI, and a URI
can carry credentials: a signed URL's ``X-Goog-Signature``/``X-Amz-Signature``,
an ``access_token`` query parameter, a ``user:password@`` part. Dead letters
are kept and shared far more widely than the inputs, so ``DeadLetter`` redacts
those values when it is built (``schemas.redaction.redact_secrets``), before
any sink, log or summary sees it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from schemas.fields import Field, RecordSchema
from schemas.redaction import REDACTED as REDACTED  # Re-exported: readers of dead letters test for it.
from schemas.redaction import redact_secrets

DEAD_LETTER_RECORD = RecordSchema(
    name="dead_letter",
    fields=(
        Field("input_ref", "string", "What was rejected: a URI, a CSV line reference or an id; never image bytes."),
        Field("stage", "string", "The pipeline step that rejected it."),
        Field("error_type", "string", "A stable machine-readable reason, e.g. not_an_image."),
        Field("message", "string", "Human-readable detail."),
    ),
)


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One rejected input with the reason it was rejected.

    ``error_type`` is a short stable code (``missing_file``, ``corrupt_image``,
    ...) so rejections can be counted and grouped; ``message`` carries detail.
    """

    input_ref: str
    stage: str
    error_type: str
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_ref", redact_secrets(self.input_ref))
        object.__setattr__(self, "message", redact_secrets(self.message))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> "DeadLetter":
        data: dict[str, Any] = json.loads(line)
        return cls(**{k: data[k] for k in DEAD_LETTER_RECORD.names})
