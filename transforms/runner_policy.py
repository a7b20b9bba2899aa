"""The one place that decides which runner a job uses when the user names none.

Beam 2.77's DirectRunner first tries to download the Prism runner, which hangs
or fails offline. Local runs therefore default to the FnApiRunner (batch) or
the BundleBasedDirectRunner (streaming). Every runner the user does name
(DataflowRunner, SparkRunner, FlinkRunner, PortableRunner, ...) and every other
standard option passes through untouched.
"""

from __future__ import annotations

import argparse
import logging
import os

from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

_LOGGER = logging.getLogger(__name__)

LOCAL_BATCH_RUNNER = "FnApiRunner"
LOCAL_STREAMING_RUNNER = "BundleBasedDirectRunner"


def package_setup_file() -> str | None:
    """The project's setup.py when running from a source checkout, else None."""
    candidate = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    return candidate if os.path.isfile(candidate) else None


def make_pipeline_options(beam_args: list[str], *, streaming: bool = False) -> PipelineOptions:
    """Builds PipelineOptions from the user's Beam flags, applying the local-runner policy.

    Args:
      beam_args: The flags the job's own parser did not consume.
      streaming: Whether the job is a streaming job.

    Returns:
      Options with a runner always set; DataflowRunner also gets the package's
      setup.py as ``--setup_file`` when the user gave none, so workers can
      import this project's DoFns.
    """
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    if streaming:
        standard.streaming = True
    if not standard.runner:
        standard.runner = LOCAL_STREAMING_RUNNER if streaming else LOCAL_BATCH_RUNNER
    if str(standard.runner).split(".")[-1] in ("DataflowRunner", "TestDataflowRunner"):
        setup = options.view_as(SetupOptions)
        if not setup.setup_file:
            setup.setup_file = package_setup_file()
            if setup.setup_file is None:
                _LOGGER.warning(
                    "DataflowRunner without --setup_file and no setup.py beside the package: "
                    "workers will not have this project's code."
                )
    return options


def tolerate_shared_flags(parser: argparse.ArgumentParser) -> None:
    """Lets a flag be defined by several jobs' PipelineOptions classes.

    Beam parses the flags of *every* imported PipelineOptions subclass with one
    parser (``get_all_options``, called when a pipeline runs). Two jobs that
    define the same flag (``--output_dir``, ``--model_dir``, ...), or a job
    module imported twice (``python -m``), would make argparse raise and every
    pipeline in the process fail. With "resolve", a later definition replaces
    the earlier one in that combined parser; each job's own view still parses
    its flags with its own definitions. Every job's ``_add_argparse_args``
    calls this first.
    """
    for container in (parser, *parser._action_groups):  # Groups keep their own copy of the handler.
        container.conflict_handler = "resolve"

