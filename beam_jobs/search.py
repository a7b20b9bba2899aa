"""search: the nearest indexed images to a query image or an indexed image_id.

Not a Beam pipeline: it loads the index build_index published
(``--index_dir``, local or gs://; gs:// shards are copied to a local cache
once) and runs one query through ``retrieval.searcher.ImageSearcher``: the
same fan-out over shards with the tuned settings recorded in
``index_info.json``.

- ``--image PATH`` (local or gs://) is embedded with the model the index was
  built from (``--model_dir``, default the one build_index recorded), through
  the same serving signature and row function extract_embeddings uses; a
  model of another model_version is refused.
- ``--image_id ID`` searches with that indexed image's stored vector and
  leaves the image itself out of its results.

Output: image_id, uri, label, split and score (cosine similarity) per
neighbour, as an aligned table, ``--format json`` or ``--format csv``.
Errors print one line on stderr: a bad flag exits with status 2; no index,
an unknown image_id, a query file that is missing or not an image, or a model
of another model_version exit with status 3.

Example::

    vision-pipelines search --index_dir out/index --image sample.png --k 5
    vision-pipelines search --index_dir out/index --image_id 3f1c... --format json
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import sys
from typing import Literal

from apache_beam.io.filesystems import FileSystems

from retrieval.searcher import ImageSearcher, SearchHit, UnknownImageId
from schemas.exit_status import UNUSABLE_INPUT_EXIT, USAGE_ERROR_EXIT
from schemas.redaction import redacted_console

OutputFormat = Literal["table", "json", "csv"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("table", "json", "csv")
COLUMNS = ("rank", "image_id", "uri", "label", "split", "score")
MAX_K = 1000


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Validated command line of the search command."""

    index_dir: str
    image: str | None
    image_id: str | None
    k: int
    model_dir: str | None
    output_format: OutputFormat
    cache_dir: str | None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vision-pipelines search", allow_abbrev=False,
                                     description="Nearest indexed images to a query image or image_id.")
    parser.add_argument("--index_dir", required=True, help="build_index's --output_dir (local or gs://).")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", help="A query image file (local or gs://), embedded with the index's model.")
    query.add_argument("--image_id", help="An indexed image_id; the image itself is left out of its results.")
    parser.add_argument("--k", type=int, default=10, help="Neighbours to return (default 10).")
    parser.add_argument("--model_dir", default=None,
                        help="Model to embed --image with (default: the one recorded by build_index).")
    parser.add_argument("--format", dest="output_format", choices=OUTPUT_FORMATS, default="table",
                        help="Output: aligned table (default), json or csv.")
    parser.add_argument("--cache_dir", default=None, help="Local copy of a gs:// index's shards.")
    return parser


def parse_config(argv: list[str]) -> SearchConfig:
    """argparse exits with status 2 on unknown flags; an out-of-range --k raises ValueError."""
    args = _parser().parse_args(argv)
    if not 1 <= args.k <= MAX_K:
        raise ValueError(f"--k must be in [1, {MAX_K}]. Received `--k={args.k}`")
    return SearchConfig(args.index_dir, args.image, args.image_id, args.k, args.model_dir, args.output_format,
                        args.cache_dir)


def _read_image(path: str) -> bytes:
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"--image {path} does not exist")
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()


def run(config: SearchConfig) -> list[SearchHit]:
    """Loads the index and answers the query.

    Raises:
      FileNotFoundError: No published index, or no such image file.
      UnknownImageId: The index does not hold ``--image_id``.
      ValueError: Not an image, no model to embed with, or another model_version.
    """
    searcher = ImageSearcher.load(config.index_dir, model_dir=config.model_dir, cache_dir=config.cache_dir)
    query: bytes | str = _read_image(config.image) if config.image is not None else str(config.image_id)
    return searcher.search(query, k=config.k)


def _cells(rank: int, hit: SearchHit) -> list[str]:
    return [str(rank), hit.image_id, hit.uri, hit.label or "", hit.split or "", f"{hit.score:.6f}"]


def format_table(hits: list[SearchHit]) -> str:
    rows = [list(COLUMNS)] + [_cells(rank, hit) for rank, hit in enumerate(hits, 1)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines) + "\n"


def format_json(hits: list[SearchHit]) -> str:
    return json.dumps([{"rank": rank, **hit.to_dict()} for rank, hit in enumerate(hits, 1)], indent=1) + "\n"


def format_csv(hits: list[SearchHit]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for rank, hit in enumerate(hits, 1):
        writer.writerow([rank, hit.image_id, hit.uri, hit.label or "", hit.split or "", f"{hit.score:.6f}"])
    return buffer.getvalue()


_FORMATTERS = {"table": format_table, "json": format_json, "csv": format_csv}


def main(argv: list[str] | None = None) -> int:
    """Prints the neighbours; an error is one line on stderr, exit status 2 (flags) or 3 (what they name)."""
    try:
        config = parse_config(list(sys.argv[1:] if argv is None else argv))
    except ValueError as error:
        sys.stderr.write(f"vision-pipelines search: error: {error}\n")
        return USAGE_ERROR_EXIT
    try:
        hits = run(config)
    except (FileNotFoundError, UnknownImageId, ValueError) as error:
        sys.stderr.write(f"vision-pipelines search: error: {error}\n")
        return UNUSABLE_INPUT_EXIT
    sys.stdout.write(_FORMATTERS[config.output_format](hits))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    with redacted_console():
        sys.exit(main())
