"""Writes the reliability suite's bad-input corpus to a directory, for looking at it or feeding a job by hand.

The corpus is generated, not committed: this calls the builder the tests use
(``tests.fixtures.image_corpus.build_bad_input_corpus``) and prints each
input with the reason each kind of job must give it when run with
``--max_pixels 1000000`` (``CORPUS_MAX_PIXELS``).

    python -m tests.testdata.make_bad_inputs /tmp/bad_inputs
    vision-pipelines create-dataset --manifest /tmp/bad_inputs/manifest.csv --output_dir /tmp/ds --max_pixels 1000000 ...
"""

from __future__ import annotations

import argparse
import os

from tests.fixtures.image_corpus import DATASET_JOB, INFERENCE_JOB, build_bad_input_corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="Where to write the files and manifest.csv (created if missing).")
    args = parser.parse_args(argv)
    corpus = build_bad_input_corpus(args.directory)
    print(f"manifest: {corpus.manifest}")
    print(f"{'input':<28} {'create_dataset':<20} inference jobs")
    for path in corpus.images():
        print(f"{os.path.basename(path):<28} {corpus.reason(DATASET_JOB, path) or 'written':<20} "
              f"{corpus.reason(INFERENCE_JOB, path) or 'written'}")
    for ref, reason in corpus.rows.items():
        print(f"{'manifest line ' + ref.rsplit(':', 1)[1]:<28} {reason:<20} {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
