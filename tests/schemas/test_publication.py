"""The output rule on real directories: local disk and the Cloud Storage emulator."""

from __future__ import annotations

import os

import pytest
from apache_beam.io.filesystems import FileSystems

from schemas import publication
from schemas.publication import OutputExistsError, OutputRun, published_dir


def _write(path: str, text: str) -> None:
    with FileSystems.create(path) as handle:
        handle.write(text.encode("utf-8"))


def _read(path: str) -> str:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read().decode("utf-8")


def _publish(output_dir: str, text: str, *, overwrite: bool) -> OutputRun:
    run = OutputRun.start(output_dir, overwrite=overwrite)
    _write(FileSystems.join(run.run_dir, "part-00000-of-00001.txt"), text)
    run.publish()
    return run


def _names(output_dir: str) -> set[str]:
    prefix = output_dir.rstrip("/") + "/"
    paths = [m.path for m in FileSystems.match([FileSystems.join(output_dir, "**")])[0].metadata_list]
    return {p[len(prefix):].split("/", 1)[0] for p in paths}


@pytest.fixture(params=["local", "gcs"])
def output_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path)
    emulator = request.getfixturevalue("gcs_emulator")
    return f"gs://{emulator.create_bucket()}"


def test_a_run_is_invisible_until_published_and_a_rerun_needs_overwrite(output_root):
    out = f"{output_root}/out"
    assert published_dir(out) == out  # No pointer: a plain directory resolves to itself.
    first = OutputRun.start(out, overwrite=False)
    _write(FileSystems.join(first.run_dir, "part-00000-of-00001.txt"), "first")
    assert published_dir(out) == out  # Written, not yet published.
    first.publish()
    assert published_dir(out) == first.run_dir
    assert FileSystems.exists(FileSystems.join(first.run_dir, publication.SUCCESS_FILE))

    with pytest.raises(OutputExistsError, match="--overwrite"):
        OutputRun.start(out, overwrite=False)
    second = _publish(out, "second", overwrite=True)
    assert second.replaced == first.run_name
    assert _read(FileSystems.join(published_dir(out), "part-00000-of-00001.txt")) == "second"
    # The replaced run stays for readers that resolved it a moment ago.
    assert _read(FileSystems.join(first.run_dir, "part-00000-of-00001.txt")) == "first"

    third = _publish(out, "third", overwrite=True)
    assert _names(out) == {publication.POINTER_FILE, second.run_name, third.run_name}


def test_a_failed_run_leaves_the_published_one_untouched(output_root):
    out = f"{output_root}/out"
    published = _publish(out, "good", overwrite=False)
    failed = OutputRun.start(out, overwrite=True)
    _write(FileSystems.join(failed.run_dir, "part-00000-of-00002.txt"), "half")
    failed.abandon()
    assert published_dir(out) == published.run_dir
    assert _names(out) == {publication.POINTER_FILE, published.run_name}


def test_publish_keeps_recent_unpublished_runs_and_removes_long_abandoned_ones(tmp_path):
    out = str(tmp_path / "out")
    old = _publish(out, "old", overwrite=False)
    abandoned = f"{publication.RUN_PREFIX}20000101T000000-deadbeef"  # Killed years ago, never published.
    os.makedirs(os.path.join(out, abandoned))
    open(os.path.join(out, abandoned, "part-00000-of-00003.txt"), "w").write("stale")
    running = OutputRun.start(out, overwrite=True)  # A concurrent job still writing.
    _write(FileSystems.join(running.run_dir, "part-00000-of-00001.txt"), "in progress")
    new = _publish(out, "new", overwrite=True)
    names = set(os.listdir(out))
    assert abandoned not in names
    assert {old.run_name, running.run_name, new.run_name} <= names


def test_nothing_is_published_from_an_empty_run_and_a_bad_pointer_is_an_error(tmp_path):
    out = str(tmp_path / "out")
    run = OutputRun.start(out, overwrite=False)
    with pytest.raises(FileNotFoundError, match="holds no files"):
        run.publish()
    assert published_dir(out) == out
    open(os.path.join(out, publication.POINTER_FILE), "w").write("../../etc\n")
    with pytest.raises(ValueError, match="does not name a run directory"):
        published_dir(out)


def test_atomic_writes_replace_whole_files_and_leave_no_temporary(tmp_path):
    path = str(tmp_path / "info.json")
    publication.write_file_atomically(path, b'{"a": 1}')
    publication.write_file_atomically(path, b'{"a": 2}')
    assert open(path, "rb").read() == b'{"a": 2}'
    assert os.listdir(tmp_path) == ["info.json"]


def test_publishing_again_is_harmless_and_a_published_run_is_never_abandoned(output_root):
    """The pipeline's publishing step may be retried, and the launcher abandons a run when the job failed after it."""
    out = f"{output_root}/out"
    first = _publish(out, "first", overwrite=False)
    second = _publish(out, "second", overwrite=True)
    third = _publish(out, "third", overwrite=True)
    assert _names(out) == {publication.POINTER_FILE, second.run_name, third.run_name}
    assert third.publish() == third.run_dir  # A retried publish: same pointer, nothing else removed.
    assert published_dir(out) == third.run_dir
    assert _names(out) == {publication.POINTER_FILE, second.run_name, third.run_name}
    assert third.is_published() and not second.is_published() and first.run_name not in _names(out)

    third.abandon()
    assert published_dir(out) == third.run_dir
    assert _read(FileSystems.join(third.run_dir, "part-00000-of-00001.txt")) == "third"
