"""Flags and configuration shared by every job that runs the exported model over images.

Two groups, declared once so they cannot drift apart (names, defaults,
validation): ``ModelOptions`` (the model and how its batches form), taken by
every inference job, batch or streaming; and ``InputOptions`` (``--input``
files), taken only by the batch jobs (batch_predict, extract_embeddings),
whose ``InferenceOptions`` is both. stream_predict takes ``ModelOptions``
alone, with its Pub/Sub flags instead of ``--input``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

from schemas.publication import published_dir
from transforms import model_handler
from transforms.images import ImageSpec
from transforms.inference_inputs import INPUT_KINDS, InputSpec
from transforms.runner_policy import require_flags, tolerate_shared_flags


class ModelOptions(PipelineOptions):
    """Model and batching flags of every inference job."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        tolerate_shared_flags(parser)
        parser.add_argument("--model_dir", default=None,
                            help="Exported model dir (saved_model/, model_info.json), or a dir whose CURRENT "
                                 "pointer names one (train's best/).")
        parser.add_argument("--min_batch_size", type=int, default=model_handler.DEFAULT_MIN_BATCH_SIZE)
        parser.add_argument("--max_batch_size", type=int, default=model_handler.DEFAULT_MAX_BATCH_SIZE)
        parser.add_argument("--max_batch_bytes", type=int, default=model_handler.DEFAULT_MAX_BATCH_BYTES,
                            help="Cap on the encoded bytes of one batch, so large images don't blow memory.")
        parser.add_argument("--large_model", action="store_true",
                            help="One model copy per machine shared by its processes (for big models).")
        parser.add_argument("--model_copies", type=int, default=None,
                            help="Exact model copies per machine (shares across processes).")
        parser.add_argument("--max_pixels", type=int, default=ImageSpec.max_pixels,
                            help="Reject images with more pixels before decoding.")


class InputOptions(PipelineOptions):
    """The file-input flags of the batch inference jobs."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        tolerate_shared_flags(parser)
        parser.add_argument("--input", default=None,
                            help="Manifest CSV (uri[,label]), image glob, or dataset dir / TFRecord glob.")
        parser.add_argument("--input_format", choices=("auto", *INPUT_KINDS), default="auto")


class InferenceOptions(ModelOptions, InputOptions):
    """Model, batching and input flags of the batch inference jobs."""


def check_numeric_flags(flags: ModelOptions) -> None:
    """Refuses out-of-range batching and size flags while parsing, not when the first batch forms.

    ImageModelHandler checks the same bounds for library callers; checking
    here names the flag and fails before any input is listed or model read.

    Raises:
      ValueError: A flag is out of range; the message quotes the received value.
    """
    for name in ("min_batch_size", "max_batch_size", "max_batch_bytes", "max_pixels"):
        _check_at_least(name, getattr(flags, name), 1)
    if flags.model_copies is not None:
        _check_at_least("model_copies", flags.model_copies, 1)
    if flags.max_batch_size < flags.min_batch_size:
        raise ValueError(
            "--max_batch_size must be >= --min_batch_size. "
            f"Received `max_batch_size={flags.max_batch_size}`, `min_batch_size={flags.min_batch_size}`"
        )


def _check_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"--{name} must be >= {minimum}. Received `{name}={value}`")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Validated model and batching settings.

    Attributes:
      model_dir: ``--model_dir`` resolved through its ``CURRENT`` pointer (the
        export a batch job reads for its whole run).
      watched_dir: ``--model_dir`` as given: the directory whose pointer a
        streaming job watches to refresh its model.
      max_pixels: Images with more pixels are rejected before decoding.
    """

    model_dir: str
    watched_dir: str
    min_batch_size: int
    max_batch_size: int
    max_batch_bytes: int
    large_model: bool
    model_copies: int | None
    max_pixels: int

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "ModelConfig":
        flags = options.view_as(ModelOptions)
        require_flags(flags, "model_dir")
        check_numeric_flags(flags)
        return cls(
            model_dir=published_dir(flags.model_dir),
            watched_dir=flags.model_dir.rstrip("/"),
            min_batch_size=flags.min_batch_size,
            max_batch_size=flags.max_batch_size,
            max_batch_bytes=flags.max_batch_bytes,
            large_model=flags.large_model,
            model_copies=flags.model_copies,
            max_pixels=flags.max_pixels,
        )

    def make_handler(self) -> model_handler.ImageModelHandler:
        return model_handler.ImageModelHandler(
            self.model_dir,
            min_batch_size=self.min_batch_size,
            max_batch_size=self.max_batch_size,
            max_batch_bytes=self.max_batch_bytes,
            large_model=self.large_model,
            model_copies=self.model_copies,
        )


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """Validated model, batching and input settings of a batch inference job."""

    model: ModelConfig
    input_spec: InputSpec

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "InferenceConfig":
        flags = options.view_as(InferenceOptions)
        require_flags(flags, "model_dir", "input")
        model = ModelConfig.from_options(options)
        return cls(model=model, input_spec=InputSpec.resolve(flags.input, flags.input_format, model.max_pixels))

    def make_handler(self) -> model_handler.ImageModelHandler:
        return self.model.make_handler()
