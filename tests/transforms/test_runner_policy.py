"""The runner policy: local defaults, pass-through of named runners, Dataflow setup file."""

from __future__ import annotations

import os

from apache_beam.options.pipeline_options import DirectOptions, GoogleCloudOptions, SetupOptions, StandardOptions

from transforms.runner_policy import make_pipeline_options


def test_local_defaults_never_use_the_prism_downloading_direct_runner():
    assert make_pipeline_options([]).view_as(StandardOptions).runner == "FnApiRunner"
    streaming = make_pipeline_options([], streaming=True).view_as(StandardOptions)
    assert streaming.runner == "BundleBasedDirectRunner" and streaming.streaming


def test_named_runners_and_their_options_pass_through_untouched():
    options = make_pipeline_options(["--runner", "SparkRunner", "--direct_num_workers=2"])
    assert options.view_as(StandardOptions).runner == "SparkRunner"
    assert options.view_as(DirectOptions).direct_num_workers == 2
    assert options.view_as(SetupOptions).setup_file is None


def test_dataflow_gets_the_package_setup_file_unless_given():
    flags = ["--runner", "DataflowRunner", "--project", "p", "--region", "us-central1",
             "--temp_location", "gs://b/tmp"]
    options = make_pipeline_options(flags)
    setup_file = options.view_as(SetupOptions).setup_file
    assert setup_file and os.path.basename(setup_file) == "setup.py" and os.path.isfile(setup_file)
    assert options.view_as(GoogleCloudOptions).temp_location == "gs://b/tmp"
    mine = make_pipeline_options(flags + ["--setup_file", "/src/other/setup.py"])
    assert mine.view_as(SetupOptions).setup_file == "/src/other/setup.py"
