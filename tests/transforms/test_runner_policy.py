"""The runner policy: local defaults, pass-through of named runners, Dataflow setup file, strict flags."""

from __future__ import annotations

import logging
import os
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    PortableOptions,
    SetupOptions,
    StandardOptions,
)
from apache_beam.testing.util import assert_that, equal_to

from transforms.runner_policy import (
    LOCAL_MULTI_PROCESS_RUNNER,
    FlagError,
    UnknownFlagError,
    make_pipeline_options,
    tolerate_shared_flags,
)


class TileOptions(PipelineOptions):
    """A job's flags, declared the way every job declares them."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        tolerate_shared_flags(parser)
        parser.add_argument("--tile_size", type=int, default=224)
        parser.add_argument("--tile_dir", default=None)
        parser.add_argument("--tile_source", action="append", default=[])
        parser.add_argument("--skip_tiles", action="store_true")


class MosaicOptions(TileOptions):
    """A job whose options class derives from a shared one (as batch_predict's does)."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        tolerate_shared_flags(parser)
        parser.add_argument("--mosaic_layout", choices=("grid", "strip"), default="grid")


class OtherJobOptions(PipelineOptions):
    """Another job imported into the same process: its flags are not TileOptions' flags."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        tolerate_shared_flags(parser)
        parser.add_argument("--tile_count", type=int, default=1)


def test_local_defaults_never_use_the_prism_downloading_direct_runner():
    assert make_pipeline_options([], job_options=PipelineOptions).view_as(StandardOptions).runner == "FnApiRunner"
    streaming = make_pipeline_options([], job_options=PipelineOptions, streaming=True).view_as(StandardOptions)
    assert streaming.runner == "BundleBasedDirectRunner" and streaming.streaming


@pytest.mark.parametrize("flags, streaming, runner", [
    (["--direct_running_mode", "multi_processing"], False, LOCAL_MULTI_PROCESS_RUNNER),
    (["--direct_running_mode=multi_threading"], False, "FnApiRunner"),
    (["--direct_running_mode", "multi_processing"], True, "BundleBasedDirectRunner"),
    (["--runner", "FnApiRunner", "--direct_running_mode", "multi_processing"], False, "FnApiRunner"),
])
def test_only_a_local_multi_process_batch_run_gets_the_runner_that_fails_on_a_dead_worker(flags, streaming, runner):
    options = make_pipeline_options(flags, job_options=PipelineOptions, streaming=streaming)
    assert options.view_as(StandardOptions).runner == runner


def test_a_multi_process_run_that_loses_no_worker_is_unchanged(caplog):
    options = make_pipeline_options(["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"],
                                    job_options=PipelineOptions)
    pipeline = beam.Pipeline(options=options)
    assert type(pipeline.runner).__name__ == "WatchedFnApiRunner"
    squares = pipeline | beam.Create(range(40)) | beam.Reshuffle() | beam.Map(lambda x: x * x)
    assert_that(squares | beam.CombineGlobally(sum), equal_to([sum(x * x for x in range(40))]))
    with caplog.at_level(logging.INFO, logger="transforms.worker_watchdog"):
        assert pipeline.run().wait_until_finish() == "DONE"
    assert not [r for r in caplog.records if r.name == "transforms.worker_watchdog"]  # A normal shutdown is no death.


def test_named_runners_and_their_options_pass_through_untouched():
    options = make_pipeline_options(["--runner", "SparkRunner", "--direct_num_workers=2"], job_options=PipelineOptions)
    assert options.view_as(StandardOptions).runner == "SparkRunner"
    assert options.view_as(DirectOptions).direct_num_workers == 2
    assert options.view_as(SetupOptions).setup_file is None


def test_dataflow_gets_the_package_setup_file_unless_given():
    flags = ["--runner", "DataflowRunner", "--project", "p", "--region", "us-central1",
             "--temp_location", "gs://b/tmp"]
    options = make_pipeline_options(flags, job_options=PipelineOptions)
    setup_file = options.view_as(SetupOptions).setup_file
    assert setup_file and os.path.basename(setup_file) == "setup.py" and os.path.isfile(setup_file)
    assert options.view_as(GoogleCloudOptions).temp_location == "gs://b/tmp"
    mine = make_pipeline_options(flags + ["--setup_file", "/src/other/setup.py"], job_options=PipelineOptions)
    assert mine.view_as(SetupOptions).setup_file == "/src/other/setup.py"


def test_job_and_beam_flags_parse_in_every_form_beam_accepts():
    options = make_pipeline_options([
        "--tile_size=32", "--tile_dir=-tiles", "--tile_source", "a", "--tile_source=b", "--skip_tiles",
        "--mosaic_layout", "strip",
        "--runner", "FnApiRunner", "--temp_location", "/tmp/t", "--direct_num_workers", "2",
        "--experiments", "a", "--experiments=b", "--setup_file", "./setup.py", "--job_endpoint", "embed",
    ], job_options=MosaicOptions)
    tiles = options.view_as(MosaicOptions)
    assert (tiles.tile_size, tiles.tile_dir, tiles.tile_source, tiles.skip_tiles, tiles.mosaic_layout) == (
        32, "-tiles", ["a", "b"], True, "strip")
    assert options.view_as(DebugOptions).experiments == ["a", "b"]
    assert options.view_as(PortableOptions).job_endpoint == "embed"
    assert options.view_as(DirectOptions).direct_num_workers == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tile_sise", "32"], "unknown flag --tile_sise (did you mean --tile_size?)"),
        (["--mosaic_layuot=grid"], "unknown flag --mosaic_layuot (did you mean --mosaic_layout?)"),
        (["--runer", "DataflowRunner"], "unknown flag --runer (did you mean --runner?)"),
        (["--temp_locaton", "gs://b/t"], "unknown flag --temp_locaton (did you mean --temp_location?)"),
        # Beam's parser takes no abbreviations, so neither may the check.
        (["--tile_d", "x"], "unknown flag --tile_d (did you mean --tile_dir?)"),
        (["-runner", "FnApiRunner"], "unknown flag -runner (did you mean --runner?)"),
        # Another job's flag is not this job's, even with that job imported.
        (["--tile_count", "3"], "unknown flag --tile_count"),
        (["--zzz"], "unknown flag --zzz"),
    ],
)
def test_unknown_flags_fail_with_the_closest_known_flag(argv, message):
    with pytest.raises(UnknownFlagError) as raised:
        make_pipeline_options(["--tile_size", "8", *argv], job_options=MosaicOptions)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_every_unknown_flag_is_named_at_once():
    with pytest.raises(UnknownFlagError, match=r"--tile_sise .*; unknown flag --runer "):
        make_pipeline_options(["--tile_sise", "1", "--runer", "x"], job_options=TileOptions)


def test_a_suggestion_prefers_the_jobs_own_flag_over_an_equally_close_beam_flag():
    # --num_worker is as close to Beam's --num_workers as to the job's --num_workerb.
    class WorkerCountOptions(PipelineOptions):
        @classmethod
        def _add_argparse_args(cls, parser: Any) -> None:
            tolerate_shared_flags(parser)
            parser.add_argument("--num_workerb", type=int)

    with pytest.raises(UnknownFlagError, match=r"did you mean --num_workerb\?"):
        make_pipeline_options(["--num_worker", "2"], job_options=WorkerCountOptions)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tile_size", "big"], "argument --tile_size: invalid int value: 'big'"),
        (["--tile_dir", "-tiles"], "--name=VALUE for a value that starts with '-'"),
        (["--skip_tiles", "true"], "unexpected argument 'true' after --skip_tiles"),
        (["--mosaic_layout", "circle"], "argument --mosaic_layout: invalid choice: 'circle'"),
        (["--direct_num_workers", "two"], "argument --direct_num_workers: invalid int value: 'two'"),
    ],
)
def test_malformed_known_flags_fail_instead_of_exiting(argv, message):
    with pytest.raises(FlagError) as raised:
        make_pipeline_options(argv, job_options=MosaicOptions)
    assert not isinstance(raised.value, UnknownFlagError)
    assert message in str(raised.value)


def test_help_lists_the_jobs_flags(capsys):
    with pytest.raises(SystemExit) as raised:
        make_pipeline_options(["--tile_size", "8", "--help"], job_options=MosaicOptions)
    assert raised.value.code == 0
    text = capsys.readouterr().out
    assert "--tile_size" in text and "--mosaic_layout" in text and "--tile_count" not in text


def test_a_derived_jobs_flags_draw_no_unparseable_warnings_when_the_pipeline_runs(tmp_path, caplog):
    # Beam logs each unparseable message once per process: a fresh path makes any regression visible.
    tile_dir = str(tmp_path / "tiles")
    options = make_pipeline_options(["--tile_dir", tile_dir, "--mosaic_layout", "strip", "--skip_tiles"],
                                    job_options=MosaicOptions)
    with caplog.at_level(logging.WARNING):
        with beam.Pipeline(options=options) as pipeline:  # run() parses with every registered options class.
            _ = pipeline | beam.Create([1, 2]) | beam.Map(abs)
        every_option = options.get_all_options()
    assert (every_option["tile_dir"], every_option["mosaic_layout"]) == (tile_dir, "strip")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "Unparseable" in w or "Discarding" in w], warnings
