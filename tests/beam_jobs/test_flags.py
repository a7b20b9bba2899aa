"""Strict flags through the ``vision-pipelines`` command: typos and bad values end in one line and exit 2."""

from __future__ import annotations

import logging

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import DebugOptions, DirectOptions, PortableOptions, SetupOptions

from beam_jobs import batch_predict, cli, create_dataset, extract_embeddings, train
from transforms.runner_policy import make_pipeline_options

JOB_OPTIONS = {
    "create-dataset": create_dataset.CreateDatasetOptions,
    "train": train.TrainOptions,
    "batch-predict": batch_predict.BatchPredictOptions,
    "extract-embeddings": extract_embeddings.ExtractEmbeddingsOptions,
}
VALID_BEAM_FLAGS = [
    "--runner", "FnApiRunner", "--temp_location", "/tmp/beam_temp", "--direct_num_workers", "2",
    "--experiments", "a", "--experiments", "b", "--setup_file", "./setup.py", "--job_endpoint", "embed",
]


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "no error printed"
    return lines[-1]


def test_a_misspelled_job_flag_exits_2_with_a_suggestion_before_anything_runs(tmp_path, capsys):
    output_dir = tmp_path / "dataset"
    code = cli.main(["create-dataset", "--manifest", str(tmp_path / "m.csv"), "--output_dir", str(output_dir),
                     "--image_sise", "32"])
    assert code == 2
    assert _error_line(capsys) == (
        "vision-pipelines create-dataset: error: unknown flag --image_sise (did you mean --image_size?)")
    assert not output_dir.exists()


def test_a_misspelled_write_disposition_is_refused_not_appended(tmp_path, capsys):
    warehouse = tmp_path / "w.duckdb"
    code = cli.main(["extract-embeddings", "--model_dir", str(tmp_path / "model"), "--input", str(tmp_path / "d"),
                     "--warehouse", f"duckdb:{warehouse}", "--write_dispositon", "truncate"])
    assert code == 2
    assert _error_line(capsys) == (
        "vision-pipelines extract-embeddings: error: unknown flag --write_dispositon "
        "(did you mean --write_disposition?)")
    assert not warehouse.exists()


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("train", ["--runer", "DataflowRunner"], "unknown flag --runer (did you mean --runner?)"),
        ("create-dataset", ["--output_d", "out"], "unknown flag --output_d (did you mean --output_dir?)"),
        ("batch-predict", ["--output_form", "jsonl"], "unknown flag --output_form (did you mean --output_format?)"),
        ("batch-predict", ["--image_size", "32"], "unknown flag --image_size"),  # create-dataset's, not this job's
        ("train", ["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
        ("create-dataset", ["--skip_analysis", "yes"], "unexpected argument 'yes' after --skip_analysis"),
    ],
)
def test_every_job_refuses_unknown_and_malformed_flags(command, argv, message, capsys):
    assert cli.main([command, *argv]) == 2
    error = _error_line(capsys)
    assert error.startswith(f"vision-pipelines {command}: error: {message}"), error


@pytest.mark.parametrize("command", sorted(JOB_OPTIONS))
def test_beam_and_runner_flags_pass_for_every_job(command):
    options = make_pipeline_options(VALID_BEAM_FLAGS, job_options=JOB_OPTIONS[command])
    assert options.view_as(DebugOptions).experiments == ["a", "b"]
    assert options.view_as(DirectOptions).direct_num_workers == 2
    assert options.view_as(PortableOptions).job_endpoint == "embed"
    assert options.view_as(SetupOptions).setup_file == "./setup.py"


def test_accepted_flags_reach_the_configuration_check(capsys):
    # Everything here is a known flag, so the job gets as far as its own validation.
    assert cli.main(["batch-predict", "--model_dir", "m", "--input", "x.csv", *VALID_BEAM_FLAGS]) == 2
    assert _error_line(capsys) == "vision-pipelines batch-predict: error: --output is required"


def test_repeatable_job_flags_and_values_that_start_with_a_dash_parse(tmp_path):
    options = make_pipeline_options(
        ["--manifest", "a.csv", "--manifest=b.csv", "--labels_file=-labels.txt", "--skip_analysis"],
        job_options=create_dataset.CreateDatasetOptions)
    flags = options.view_as(create_dataset.CreateDatasetOptions)
    assert (flags.manifest, flags.labels_file, flags.skip_analysis) == (["a.csv", "b.csv"], "-labels.txt", True)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--min_batch_size", "0", "--min_batch_size must be >= 1. Received `min_batch_size=0`"),
        ("--max_batch_size", "0", "--max_batch_size must be >= 1. Received `max_batch_size=0`"),
        ("--max_batch_bytes", "-1", "--max_batch_bytes must be >= 1. Received `max_batch_bytes=-1`"),
        ("--model_copies", "0", "--model_copies must be >= 1. Received `model_copies=0`"),
        ("--max_pixels", "0", "--max_pixels must be >= 1. Received `max_pixels=0`"),
        ("--max_batch_size", "2.5", "argument --max_batch_size: invalid int value: '2.5'"),
    ],
)
@pytest.mark.parametrize("command", ["batch-predict", "extract-embeddings"])
def test_bad_numeric_inference_flags_fail_at_parse_time(command, flag, value, message, tmp_path, capsys):
    output = {"batch-predict": ["--output", str(tmp_path / "out")],
              "extract-embeddings": ["--warehouse", f"duckdb:{tmp_path / 'out' / 'w.duckdb'}"]}[command]
    argv = ["--model_dir", str(tmp_path / "no_model"), "--input", str(tmp_path / "no_input.csv"), *output, flag, value]
    assert cli.main([command, *argv]) == 2
    assert _error_line(capsys) == f"vision-pipelines {command}: error: {message}"
    assert not (tmp_path / "out").exists()


def test_batch_sizes_must_be_consistent_and_top_k_positive(tmp_path, capsys):
    base = ["batch-predict", "--model_dir", "m", "--input", "x.csv", "--output", str(tmp_path / "out")]
    assert cli.main([*base, "--min_batch_size", "8", "--max_batch_size", "4"]) == 2
    assert _error_line(capsys).endswith(
        "--max_batch_size must be >= --min_batch_size. Received `max_batch_size=4`, `min_batch_size=8`")
    assert cli.main([*base, "--top_k", "0"]) == 2
    assert _error_line(capsys).endswith("Received `top_k=0`")


def test_help_prints_the_jobs_flags(capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["train", "--help"])
    assert raised.value.code == 0
    text = capsys.readouterr().out
    assert "--dataset_dir" in text and "--selection_metric" in text and "--warehouse" not in text


@pytest.mark.parametrize(
    "job_options, argv",
    [
        # The README's own command, which used to print four "Unparseable argument" warnings.
        (extract_embeddings.ExtractEmbeddingsOptions,
         ["--model_dir", "out/model/best", "--input", "out/dataset", "--write_disposition", "truncate"]),
        (batch_predict.BatchPredictOptions,
         ["--model_dir", "m", "--input", "x.csv", "--top_k", "3", "--write_disposition", "truncate"]),
    ],
)
def test_a_jobs_own_flags_draw_no_unparseable_warnings(job_options, argv, tmp_path, caplog):
    # Beam logs each unparseable message once per process: a fresh path makes a regression visible.
    unique = f"duckdb:{tmp_path / 'warehouse.duckdb'}"
    flag = "--warehouse" if job_options is extract_embeddings.ExtractEmbeddingsOptions else "--output"
    options = make_pipeline_options([*argv, flag, unique], job_options=job_options)
    with caplog.at_level(logging.WARNING):
        with beam.Pipeline(options=options) as pipeline:  # run() parses with every registered options class.
            _ = pipeline | beam.Create([1]) | beam.Map(abs)
        every_option = options.get_all_options()
    assert every_option[flag.lstrip("-")] == unique and every_option["write_disposition"] == "truncate"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "Unparseable" in w or "Discarding" in w], warnings
