"""Writes an offline sample dataset: image files, a ``uri,label`` manifest and labels.txt.

Example:
  vision-pipelines make-sample-data --dataset digits --output_dir /tmp/digits
  vision-pipelines make-sample-data --dataset synthetic --count 2000 --size 256 --output_dir /tmp/shapes
"""

from __future__ import annotations

import argparse
import logging

from model_lib import sample_data
from schemas.redaction import redacted_console


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vision-pipelines make-sample-data", description=__doc__)
    parser.add_argument("--dataset", choices=("digits", "synthetic"), default="digits")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--image_format", choices=("png", "jpeg"), default=None,
                        help="Default: png for digits, jpeg for synthetic.")
    parser.add_argument("--size", type=int, default=None, help="Image side (default 32 digits, 256 synthetic).")
    parser.add_argument("--count", type=int, default=1000, help="synthetic only: number of images.")
    parser.add_argument("--limit", type=int, default=None, help="digits only: write the first N digits.")
    parser.add_argument("--seed", type=int, default=0, help="synthetic only.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dataset == "digits":
        written = sample_data.write_digits(
            args.output_dir, size=args.size or 32, image_format=args.image_format or "png", limit=args.limit
        )
    else:
        written = sample_data.write_synthetic(
            args.output_dir, count=args.count, size=args.size or 256,
            image_format=args.image_format or "jpeg", seed=args.seed,
        )
    print(f"wrote {written.count} images, manifest {written.manifest}, labels {written.labels_file}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    with redacted_console():
        raise SystemExit(main())
