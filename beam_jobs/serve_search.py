"""serve-search: the image search page and JSON API over a published index (FastAPI + uvicorn).

Not a Beam pipeline: it loads the index build_index published (``--index_dir``,
local or gs://) and the model it was built from (``--model_dir``, default the
one build_index recorded; another model_version is refused at start), then
serves ``retrieval.search_service``'s application:

- ``GET /``: upload or pick an image, see its neighbours' thumbnails with labels and scores;
- ``POST /api/search?k=10`` with the image bytes as the body;
- ``GET /api/neighbors?image_id=ID&k=10``; ``GET /api/thumbnail/ID``; ``GET /api/info``.

It binds to 127.0.0.1 by default: the page serves thumbnails of indexed
images, so exposing it (``--host 0.0.0.0``) is a decision to make on purpose.
Uploads over ``--max_upload_bytes`` get 413, bodies that are not images 400.

Example::

    vision-pipelines serve-search --index_dir out/index --port 8080
    curl --data-binary @sample.png 'http://127.0.0.1:8080/api/search?k=5'
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from retrieval.search_service import DEFAULT_MAX_UPLOAD_BYTES, create_app
from retrieval.searcher import ImageSearcher
from schemas.redaction import redacted_console

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


@dataclasses.dataclass(frozen=True)
class ServeSearchConfig:
    """Validated command line of serve-search."""

    index_dir: str
    model_dir: str | None
    host: str
    port: int
    max_upload_bytes: int
    cache_dir: str | None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vision-pipelines serve-search", allow_abbrev=False,
                                     description="Serve the image search page and JSON API over an index.")
    parser.add_argument("--index_dir", required=True, help="build_index's --output_dir (local or gs://).")
    parser.add_argument("--model_dir", default=None,
                        help="Model to embed uploads with (default: the one recorded by build_index).")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"Address to bind (default {DEFAULT_HOST}: this machine only).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Port (default {DEFAULT_PORT}).")
    parser.add_argument("--max_upload_bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES,
                        help=f"Largest upload accepted; larger ones get 413 (default {DEFAULT_MAX_UPLOAD_BYTES}).")
    parser.add_argument("--cache_dir", default=None, help="Local copy of a gs:// index's shards.")
    return parser


def parse_config(argv: list[str]) -> ServeSearchConfig:
    """argparse exits with status 2 on unknown flags; out-of-range values raise ValueError."""
    args = _parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535]. Received `--port={args.port}`")
    if args.max_upload_bytes < 1:
        raise ValueError(f"--max_upload_bytes must be >= 1. Received `--max_upload_bytes={args.max_upload_bytes}`")
    return ServeSearchConfig(args.index_dir, args.model_dir, args.host, args.port, args.max_upload_bytes,
                             args.cache_dir)


def build_app(config: ServeSearchConfig):
    """The application for a config: loads the index and checks the model before anything is served."""
    searcher = ImageSearcher.load(config.index_dir, model_dir=config.model_dir, cache_dir=config.cache_dir)
    return create_app(searcher, max_upload_bytes=config.max_upload_bytes)


def main(argv: list[str] | None = None) -> int:
    """Serves until interrupted; a bad flag, a missing index or another model_version exits 2 in one line."""
    import uvicorn

    try:
        config = parse_config(list(sys.argv[1:] if argv is None else argv))
        app = build_app(config)
    except (FileNotFoundError, ValueError) as error:
        sys.stderr.write(f"vision-pipelines serve-search: error: {error}\n")
        return 2
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    with redacted_console():
        sys.exit(main())
