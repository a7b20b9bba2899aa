"""Security checks as tests: what an input can make a job or service do.

Covered elsewhere, not repeated here:

- SQL is read-only and parameters are bound: ``tests/retrieval/test_sql_read_only.py``
  (every write, ATTACH, file read and multi-statement escape refused by name on
  DuckDB, Parquet and the BigQuery emulator) and
  ``tests/retrieval/test_sql_queries.py::test_a_sql_injection_attempt_in_a_parameter_is_treated_as_data``
  (``x'; DROP TABLE embeddings; --`` matches nothing and the table survives);
  the ``sql`` job's refusals: ``tests/beam_jobs/test_sql.py``.
- Uploads over ``--max_upload_bytes`` get 413: ``tests/retrieval/test_search_service.py``.
- The serving signature refuses PNG/JPEG/GIF/BMP/WebP that declare too many
  pixels before decoding: ``tests/model_lib/test_export.py``.
- serve-search binds 127.0.0.1 by default: the ``service`` fixture of
  ``tests/retrieval/test_search_service.py`` asserts ``config.host``; it is the
  only service (stream_predict serves nothing; the Pub/Sub emulator helper binds 127.0.0.1).

Added here: a decompression bomb posted to the search service's embedder,
manifest paths that point outside every directory, and credentials in URIs:
redacted in dead letters (``schemas.dead_letter.DeadLetter``) and in what a
failing job shows, its error line, traceback and logs, run through the CLI
or as ``python -m beam_jobs.JOB`` (``schemas.redaction``; the filter itself
and SDK workers: ``tests/schemas/test_redaction.py``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import resource
import struct
import subprocess
import sys
import time
import zlib

import pytest

from beam_jobs import create_dataset
from model_lib import sample_data
from schemas.dead_letter import REDACTED, DeadLetter
from schemas.exit_status import UNUSABLE_INPUT_EXIT
from schemas.publication import published_dir
from schemas.redaction import redact_secrets
from transforms import images
from transforms.dead_letters import read_dead_letters
from transforms.embedding_rows import InvalidQueryImage, QueryEmbedder

SECRET = "s3cr3t-SIGNATURE"
# Signed URLs, an OAuth token and a password in URIs a manifest may hold.
SECRET_URIS = [
    f"https://storage.googleapis.com/bucket/img.png?X-Goog-Algorithm=GOOG4-RSA-SHA256"
    f"&X-Goog-Credential=sa%40project.iam.{SECRET}&X-Goog-Signature={SECRET}",
    f"https://bucket.s3.amazonaws.com/img.png?X-Amz-Signature={SECRET}&X-Amz-Credential={SECRET}",
    f"https://user:{SECRET}@example.com/img.png",
    f"missing.png?access_token={SECRET}",
]
# Relative climbs and absolute paths: inputs may live anywhere, outputs only under --output_dir.
ESCAPING_URIS = ["../../../../../../../../etc/hostname", "/etc/passwd", "../../escape/../../x.png"]
ESCAPING_LABEL = "../../../escape"
GOOD = 12
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares ``width`` x ``height`` grey pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * 4096, 9)  # Decompresses to far more once a decoder follows the header.
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _files(root: str) -> set[str]:
    return {os.path.join(d, f) for d, _, names in os.walk(root) for f in names}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> tuple[str, str, set[str], int, str]:
    """create_dataset (``main``, as the CLI runs it) over good digits plus escaping and secret-bearing rows.

    Returns:
      (root, output_dir, files under root before the run, exit status, everything logged or printed).
    """
    root = str(tmp_path_factory.mktemp("hostile"))
    digits = sample_data.write_digits(os.path.join(root, "digits"), size=16, limit=GOOD)
    with open(digits.manifest) as handle:
        good_rows = handle.read().splitlines()
    good_rows[0] = f"{good_rows[0].split(',')[0]},{ESCAPING_LABEL}"  # A label that looks like a path.
    manifest = os.path.join(root, "manifests", "deep", "hostile.csv")
    os.makedirs(os.path.dirname(manifest))
    with open(manifest, "w") as handle:
        handle.write("\n".join([*good_rows, *(f"{uri},1" for uri in ESCAPING_URIS + SECRET_URIS)]) + "\n")
    output_dir = os.path.join(root, "jobs", "a", "out")
    before = _files(root)

    log, logger = io.StringIO(), logging.getLogger()
    handler, level = logging.StreamHandler(log), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            status = create_dataset.main(["--manifest", manifest, "--output_dir", output_dir, "--image_size", "16",
                                          "--channels", "1", "--image_format", "png", "--skip_analysis"])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return root, output_dir, before, status, log.getvalue()


def test_manifest_paths_cannot_make_a_job_write_outside_its_output_dir(hostile_run):
    root, output_dir, before, status, _ = hostile_run
    assert status == 0
    outside = {path for path in _files(root) - before if not path.startswith(output_dir + os.sep)}
    assert outside == set()
    assert not os.path.exists("/etc/x.png") and not os.path.exists(os.path.join(root, "escape"))
    reasons = sorted(letter.error_type for letter in read_dead_letters(published_dir(output_dir))
                     if REDACTED not in letter.message)
    # /etc/hostname and /etc/passwd were read (and are not images); nothing was written there.
    assert reasons == [images.MISSING_FILE, images.NOT_AN_IMAGE, images.NOT_AN_IMAGE]


def test_credentials_in_uris_are_redacted_in_dead_letters_and_logs(hostile_run):
    _, output_dir, _, _, text = hostile_run
    letters = read_dead_letters(published_dir(output_dir))
    secret_letters = [letter for letter in letters if REDACTED in letter.message]
    assert len(secret_letters) == len(SECRET_URIS)
    written = "".join(open(path, errors="replace").read() for path in _files(output_dir))
    assert SECRET not in written and SECRET not in text
    # What stays is enough to find the input: host, path and harmless parameters, without the credentials.
    assert any("storage.googleapis.com/bucket/img.png?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=REDACTED"
               in letter.message for letter in secret_letters)


def test_a_dead_letter_built_anywhere_is_redacted():
    letter = DeadLetter(f"gs://bucket/x.png?token={SECRET}", "load_image", "missing_file",
                        f"no file at gs://bucket/x.png?token={SECRET}; also https://u:{SECRET}@h/y.png")
    assert SECRET not in letter.to_json()
    assert DeadLetter.from_json(letter.to_json()) == letter
    assert letter.input_ref == f"gs://bucket/x.png?token={REDACTED}"


def test_a_decompression_bomb_sent_to_search_is_refused_before_decoding(trained_digits_model):
    bomb = _png_declaring(100_000, 100_000)  # 10^10 pixels: 10 GB once decoded, in a ~100-byte upload.
    assert len(bomb) < 200
    embedder = QueryEmbedder(trained_digits_model)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(InvalidQueryImage) as refused:
        embedder.embed(bomb)
    assert refused.value.reason == images.TOO_MANY_PIXELS  # The service answers 400 with this reason.
    assert "100000x100000" in str(refused.value)
    assert time.monotonic() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024  # KiB: < 100 MiB.


def _signed(path: str) -> str:
    return f"{path}?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p.{SECRET}&X-Goog-Signature={SECRET}"


@pytest.fixture(scope="module")
def failing_command_lines(tmp_path_factory) -> dict[str, tuple[str, subprocess.CompletedProcess]]:
    """Jobs that fail on a URI holding a signed URL's credentials, each as a user runs it, all at once.

    Returns:
      name -> (the URI as given, redacted, so a test can check it is still shown; the finished process).
    """
    root = tmp_path_factory.mktemp("secret_uris")
    manifest, index_dir = _signed(str(root / "missing" / "manifest.csv")), _signed(str(root / "no_index"))
    dataset = ["--manifest", manifest, "--output_dir", str(root / "out"), "--image_size", "16", "--skip_analysis"]
    runs = {  # A traceback (no file matches) from the CLI and without it; a job's own error line (search).
        "cli_traceback": (manifest, ["beam_jobs.cli", "create-dataset", *dataset]),
        "module_traceback": (manifest, ["beam_jobs.create_dataset", *dataset]),
        "cli_error_line": (index_dir, ["beam_jobs.cli", "search", "--index_dir", index_dir, "--image_id", "x"]),
    }
    env = {**os.environ, "VISION_PIPELINES_VERBOSE": "1"}  # Every library's INFO log on stderr too.
    started = {name: (uri, subprocess.Popen(["timeout", "300", sys.executable, "-m", *args], cwd=_ROOT, env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
               for name, (uri, args) in runs.items()}
    finished = {}
    for name, (uri, process) in started.items():
        out, err = process.communicate()
        finished[name] = (redact_secrets(uri), subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return finished


@pytest.mark.parametrize("run", ["cli_traceback", "module_traceback"])
def test_a_traceback_a_job_lets_out_shows_the_input_without_its_credentials(failing_command_lines, run):
    uri, completed = failing_command_lines[run]
    assert completed.returncode == 1, completed.stderr
    assert SECRET not in completed.stdout + completed.stderr
    assert "Traceback (most recent call last)" in completed.stderr
    assert f"FileNotFoundError: no file matches {uri!r}" in completed.stderr  # Path and algorithm still readable.


def test_an_error_line_a_job_prints_itself_shows_the_input_without_its_credentials(failing_command_lines):
    uri, completed = failing_command_lines["cli_error_line"]
    assert completed.returncode == UNUSABLE_INPUT_EXIT, completed.stderr
    assert SECRET not in completed.stdout + completed.stderr
    assert f"vision-pipelines search: error: {uri} holds no published index" in completed.stderr


def test_a_usage_error_and_the_logs_of_a_job_run_in_process_show_no_credentials(tmp_path, capfd, caplog):
    manifest = _signed("https://storage.googleapis.com/bucket/manifests/train.csv")
    with caplog.at_level(logging.DEBUG):
        status = create_dataset.main(["--manifest", manifest, "--output_dir", str(tmp_path / "out")])
    printed = capfd.readouterr()
    assert status == 2  # Beam has no https filesystem for manifests here: refused before anything runs.
    assert SECRET not in printed.out + printed.err + caplog.text
    assert f"Path specified: {redact_secrets(manifest)}" in printed.err
