"""batch_predict and extract_embeddings: a wrong model directory or an empty input ends in one line, exit 3.

Before, a directory that is not a model failed in a worker with a
``FileNotFoundError`` traceback, an empty glob with Beam's ``Empty match ...
Disallowed``, and a manifest without rows "succeeded" having read nothing.
"""

from __future__ import annotations

import pytest

from beam_jobs import batch_predict, extract_embeddings
from schemas.exit_status import UNUSABLE_INPUT_EXIT

JOBS = {
    "batch-predict": (batch_predict.main, "--output"),
    "extract-embeddings": (extract_embeddings.main, "--warehouse"),
}


def output_flag(job: str, tmp_path) -> list[str]:
    flag = JOBS[job][1]
    return [flag, f"duckdb:{tmp_path}/w.duckdb" if flag == "--warehouse" else str(tmp_path / "out")]


@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_directory_that_is_not_a_model_is_refused(job, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("a.png,0\n")
    (tmp_path / "not_a_model").mkdir()
    argv = ["--model_dir", str(tmp_path / "not_a_model"), "--input", str(manifest), *output_flag(job, tmp_path)]
    assert JOBS[job][0](argv) == UNUSABLE_INPUT_EXIT
    err = capsys.readouterr().err.strip()
    assert err == (f"vision-pipelines {job}: error: --model_dir {tmp_path}/not_a_model is not a model directory "
                   f"(holds no model_info.json); pass a train output's best/ or trials/<id>/ directory")


@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_glob_that_matches_nothing_is_refused(job, trained_digits_model, tmp_path, capsys):
    argv = ["--model_dir", trained_digits_model, "--input", f"{tmp_path}/none/*.png", *output_flag(job, tmp_path)]
    assert JOBS[job][0](argv) == UNUSABLE_INPUT_EXIT
    assert "matches no files: nothing to read" in capsys.readouterr().err


@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_manifest_without_rows_exits_3_after_reading_nothing(job, trained_digits_model, tmp_path, capsys):
    manifest = tmp_path / "header_only.csv"
    manifest.write_text("uri,label\n")
    argv = ["--model_dir", trained_digits_model, "--input", str(manifest), *output_flag(job, tmp_path)]
    assert JOBS[job][0](argv) == UNUSABLE_INPUT_EXIT
    assert f"--input {manifest} held no images (0 read)" in capsys.readouterr().err


def test_stream_predict_refuses_a_directory_that_is_not_a_model(tmp_path, capsys):
    from beam_jobs import stream_predict

    argv = ["--model_dir", str(tmp_path), "--input_subscription", "projects/p/subscriptions/images",
            "--output_topic", "projects/p/topics/predictions", "--dead_letter_topic", "projects/p/topics/dead"]
    assert stream_predict.main(argv) == UNUSABLE_INPUT_EXIT
    assert f"--model_dir {tmp_path} is not a model directory" in capsys.readouterr().err
