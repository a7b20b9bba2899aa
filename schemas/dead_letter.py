"""The dead-letter record every job writes for inputs it could not process.

A rejected input's reference and error message often quote its URI, and a URI
can carry credentials: a signed URL's ``X-Goog-Signature``/``X-Amz-Signature``,
an ``access_token`` query parameter, a ``user:password@`` part. Dead letters
are kept and shared far more widely than the inputs, so ``DeadLetter`` redacts
those values when it is built, before any sink, log or summary sees it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from schemas.fields import Field, RecordSchema

DEAD_LETTER_RECORD = RecordSchema(
    name="dead_letter",
    fields=(
        Field("input_ref", "string", "What was rejected: a URI, a CSV line reference or an id; never image bytes."),
        Field("stage", "string", "The pipeline step that rejected it."),
        Field("error_type", "string", "A stable machine-readable reason, e.g. not_an_image."),
        Field("message", "string", "Human-readable detail."),
    ),
)


REDACTED = "REDACTED"
# Query parameters that carry credentials: signed-URL signatures and credentials, tokens, keys.
_SECRET_PARAMETER = re.compile(
    r"([?&;](?:x-goog-signature|x-goog-credential|x-amz-signature|x-amz-credential|x-amz-security-token"
    r"|signature|sig|token|access_token|id_token|key|api_key|apikey|password|credential)=)[^&#,\s'\"]*",
    re.IGNORECASE,
)
_USER_INFO = re.compile(r"(://)[^/?#@\s'\"]+@")


def redact_secrets(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``REDACTED``."""
    return _USER_INFO.sub(rf"\1{REDACTED}@", _SECRET_PARAMETER.sub(rf"\1{REDACTED}", text))


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
