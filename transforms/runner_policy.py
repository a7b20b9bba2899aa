"""The one place that decides which runner a job uses and which flags it accepts.

Beam 2.77's DirectRunner first tries to download the Prism runner, which hangs
or fails offline. Local runs therefore default to the FnApiRunner (batch) or
the BundleBasedDirectRunner (streaming); a batch run with
``--direct_running_mode multi_processing`` gets ``LOCAL_MULTI_PROCESS_RUNNER``,
the FnApiRunner that fails the job when an SDK worker process dies instead of
hanging (``transforms.worker_watchdog``). Every runner the user does name
(DataflowRunner, SparkRunner, FlinkRunner, PortableRunner, ...) and every other
standard option passes through untouched.

Beam itself ignores a flag it does not know (at most it logs "Unparseable
argument"), so a typo such as ``--image_sise 32`` would silently train at the
default size. ``make_pipeline_options`` therefore refuses any flag that is
neither the job's own nor one of Beam's registered options, before anything
runs.

It also makes credentials in flag values and URIs stay out of logs and error
messages (``schemas.redaction``): in this process, and, through
``--beam_plugins``, in SDK workers of their own (``transforms.worker_redaction``).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys

from apache_beam.options.pipeline_options import (
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    TestOptions,
    _BeamArgumentParser,
)

from schemas.exit_status import UNUSABLE_INPUT_EXIT, USAGE_ERROR_EXIT, UnusableInputError
from schemas.redaction import install_redaction, redact_secrets

_LOGGER = logging.getLogger(__name__)

LOCAL_BATCH_RUNNER = "FnApiRunner"
LOCAL_STREAMING_RUNNER = "BundleBasedDirectRunner"
# Beam creates a runner named by its import path; the module is imported only for such runs.
LOCAL_MULTI_PROCESS_RUNNER = "transforms.worker_watchdog.WatchedFnApiRunner"
_DATAFLOW_RUNNERS = ("DataflowRunner", "TestDataflowRunner")
# Beam's validator treats a Dataflow endpoint on localhost as "not the service" and skips the
# checks that only matter for a submission (and reach GCS to create a default bucket).
_DRY_RUN_ENDPOINT = "http://localhost"
_DRY_RUN_TRUE = ("True", "true")

# Beam's own option classes all live in this package; classes defined elsewhere
# (other jobs imported into the same process) are not this job's flags.
_BEAM_PACKAGE = "apache_beam."
# A job's own flag wins over a Beam flag that is about as close to a typo.
_OWN_FLAG_BONUS = 0.05
_SUGGESTION_CUTOFF = 0.6
_HELP_FLAGS = ("-h", "--help")
# Imported by SDK workers at startup; installs redaction there (see its docstring).
WORKER_REDACTION_PLUGIN = "transforms.worker_redaction"


class FlagError(ValueError):
    """A command-line flag the job cannot take: malformed, of the wrong type, or unknown."""


class UnknownFlagError(FlagError):
    """A flag that is neither the job's own nor a Beam/runner option."""


class _StrictParser(_BeamArgumentParser):
    """Beam's parser (value-provider arguments, no abbreviations) that raises instead of exiting."""

    def error(self, message: str) -> None:
        if message.endswith("expected one argument"):
            message += " (write --name=VALUE for a value that starts with '-')"
        raise FlagError(message)


def package_setup_file() -> str | None:
    """The project's setup.py when running from a source checkout, else None."""
    candidate = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    return candidate if os.path.isfile(candidate) else None


def make_pipeline_options(
    beam_args: list[str], *, job_options: type[PipelineOptions], streaming: bool = False
) -> PipelineOptions:
    """Builds PipelineOptions from the command line, applying the flag and local-runner policies.

    Args:
      beam_args: The job's command line (its own flags and Beam's).
      job_options: The job's options class; its flags (and its bases') plus
        Beam's registered options are the only flags accepted. Pass
        ``PipelineOptions`` itself for Beam's flags alone.
      streaming: Whether the job is a streaming job.

    Returns:
      Options with a runner always set (the local one by the policy in the
      module docstring) and ``WORKER_REDACTION_PLUGIN`` among
      ``--beam_plugins``; DataflowRunner also gets the package's setup.py as
      ``--setup_file`` when the user gave none, so workers can import this
      project's DoFns. Log records and uncaught tracebacks of this process
      are redacted from then on (``install_redaction``): a job run as
      ``python -m beam_jobs.JOB`` gets that without the CLI.

    Raises:
      UnknownFlagError: A flag is neither the job's nor Beam's (the message
        suggests the closest known flag).
      FlagError: A known flag is malformed (missing or mistyped value, a stray
        positional argument).
      SystemExit: ``--help`` was given (the job's flags are printed first).
    """
    install_redaction()
    check_flags(beam_args, job_options)
    _register_with_beam(job_options)
    options = PipelineOptions(beam_args)
    _check_dry_run(options)
    setup = options.view_as(SetupOptions)
    if WORKER_REDACTION_PLUGIN not in (setup.beam_plugins or []):
        setup.beam_plugins = [*(setup.beam_plugins or []), WORKER_REDACTION_PLUGIN]
    standard = options.view_as(StandardOptions)
    if streaming:
        standard.streaming = True
    if not standard.runner:
        standard.runner = _local_runner(options, streaming)
    if _is_dataflow(options):
        if setup.setup_file:  # Beam stages a bare "setup.py" from os.path.dirname(""), which fails.
            setup.setup_file = os.path.abspath(setup.setup_file)
        _offline_dry_run(options)
        if not setup.setup_file:
            setup.setup_file = package_setup_file()
            if setup.setup_file is None:
                _LOGGER.warning(
                    "DataflowRunner without --setup_file and no setup.py beside the package: "
                    "workers will not have this project's code."
                )
    return options


def _local_runner(options: PipelineOptions, streaming: bool) -> str:
    if streaming:
        return LOCAL_STREAMING_RUNNER
    if options.view_as(DirectOptions).direct_running_mode == "multi_processing":
        return LOCAL_MULTI_PROCESS_RUNNER
    return LOCAL_BATCH_RUNNER


def _is_dataflow(options: PipelineOptions) -> bool:
    return str(options.view_as(StandardOptions).runner).split(".")[-1] in _DATAFLOW_RUNNERS


def is_dry_run(options: PipelineOptions) -> bool:
    """Whether this run only builds the Dataflow job (``--runner DataflowRunner --dry_run=True``).

    Beam 2.77 defines ``--dry_run`` in ``TestOptions``; DataflowRunner then
    builds the job (graph, environment, staged setup_file sdist) and returns a
    DONE result without submitting it, so nothing ran: a job must publish
    nothing, write nothing and report the dry run instead of results. Other
    runners ignore the flag (``make_pipeline_options`` refuses it there).
    """
    return _is_dataflow(options) and bool(options.view_as(TestOptions).dry_run)


def _offline_dry_run(options: PipelineOptions) -> None:
    """Makes a Dataflow dry run contact nothing.

    Beam's service-only validation creates a default GCS bucket over the
    network when ``--temp_location``/``--staging_location`` are not valid
    bucket paths (``gs://b/tmp``: bucket names have 3+ characters) and rejects
    placeholder project ids (``p``). A dry run submits nothing, so, unless
    the user named an endpoint, it names a local one, which makes Beam skip
    exactly those checks; the job is built as for the service.
    """
    if not is_dry_run(options):
        return
    cloud = options.view_as(GoogleCloudOptions)
    if cloud.dataflow_endpoint == GoogleCloudOptions.DATAFLOW_ENDPOINT:
        cloud.dataflow_endpoint = _DRY_RUN_ENDPOINT


def report_dry_run(command: str, options: PipelineOptions) -> int:
    """Prints the one line a dry run ends with; returns main's exit status (0)."""
    cloud = options.view_as(GoogleCloudOptions)
    print(f"vision-pipelines {command}: Dataflow job built (dry run): not submitted, nothing written "
          f"(project {cloud.project}, region {cloud.region})")
    return 0


def check_flags(argv: list[str], job_options: type[PipelineOptions]) -> None:
    """Refuses a command line that holds anything but the job's flags and Beam's.

    It parses with the same definitions and conventions as Beam
    (``--flag value`` and ``--flag=value``, repeatable flags, no prefix
    abbreviations), so whatever passes here parses the same way in Beam.

    Raises:
      UnknownFlagError, FlagError, SystemExit: as ``make_pipeline_options``.
    """
    if any(arg in _HELP_FLAGS for arg in argv):
        parser = argparse.ArgumentParser(
            prog=os.path.basename(sys.argv[0]),
            epilog="Every Beam pipeline option (--runner, --project, --region, --temp_location, "
            "--experiments, ...) is accepted too.",
        )
        _add_job_flags(parser, job_options)
        parser.print_help()
        raise SystemExit(0)
    own = _StrictParser(allow_abbrev=False, add_help=False)
    _add_job_flags(own, job_options)
    parser = _StrictParser(allow_abbrev=False, add_help=False)
    tolerate_shared_flags(parser)
    for cls in _beam_option_classes():
        cls._add_argparse_args(parser)  # Beam's classes do this themselves in get_all_options.
    _add_job_flags(parser, job_options)  # Last, so the job's definition of a shared name wins.
    _, unknown = parser.parse_known_args(argv)
    flags = [arg for arg in unknown if _looks_like_flag(arg)]
    if flags:
        own_names, all_names = _option_strings(own), _option_strings(parser)
        raise UnknownFlagError(
            "; ".join(_describe_unknown(arg.split("=", 1)[0], own_names, all_names) for arg in flags)
        )
    if unknown:
        stray = unknown[0]
        after = argv.index(stray) - 1
        where = f" after {argv[after]}" if after >= 0 else ""
        raise FlagError(f"unexpected argument {stray!r}{where} (a switch takes no value; "
                        "other flags take --name VALUE or --name=VALUE)")


def _check_dry_run(options: PipelineOptions) -> None:
    """Refuses a ``--dry_run`` that would not mean what it says.

    Beam reads any value as true (``--dry_run=False`` still submits nothing),
    and only DataflowRunner honours it (a local runner would run the job).
    """
    value = options.view_as(TestOptions).dry_run
    if not value:
        return
    if value not in _DRY_RUN_TRUE:
        raise FlagError(f"--dry_run={value}: Beam reads every value as true; write --dry_run=True, "
                        "or leave the flag out to run the job")
    runner = options.view_as(StandardOptions).runner
    if not runner or str(runner).split(".")[-1] not in _DATAFLOW_RUNNERS:
        raise FlagError("--dry_run=True only applies to --runner DataflowRunner (it builds the job without "
                        "submitting it)")


def _job_option_classes(job_options: type[PipelineOptions]) -> list[type[PipelineOptions]]:
    """``job_options`` and its options bases that declare flags, bases first (a subclass redefines)."""
    return [
        cls for cls in reversed(job_options.__mro__)
        if issubclass(cls, PipelineOptions) and cls is not PipelineOptions and "_add_argparse_args" in vars(cls)
    ]


def _add_job_flags(parser: argparse.ArgumentParser, job_options: type[PipelineOptions]) -> None:
    tolerate_shared_flags(parser)
    for cls in _job_option_classes(job_options):
        cls._add_argparse_args(parser)


def _beam_option_classes() -> list[type[PipelineOptions]]:
    """Every options class Beam defines (Standard, GoogleCloud, Worker, Setup, Debug, Portable, ...)."""
    found, pending = [], list(PipelineOptions.__subclasses__())
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith(_BEAM_PACKAGE) and "_add_argparse_args" in vars(cls):
            found.append(cls)
    return found


def _looks_like_flag(arg: str) -> bool:
    if not arg.startswith("-") or arg == "-":
        return False
    try:
        float(arg)  # A negative number is a value, as argparse treats it.
    except ValueError:
        return True
    return False


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions for name in action.option_strings if name.startswith("--")}


def _describe_unknown(name: str, own: set[str], known: set[str]) -> str:
    """``unknown flag --image_sise (did you mean --image_size?)``, preferring the job's own flags."""
    def score(candidate: str) -> float:
        bonus = _OWN_FLAG_BONUS if candidate in own else 0.0
        return difflib.SequenceMatcher(None, name, candidate).ratio() + bonus

    close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=_SUGGESTION_CUTOFF)
    if not close:
        return f"unknown flag {name}"
    return f"unknown flag {name} (did you mean {max(close, key=score)}?)"


# Options class -> the direct PipelineOptions subclass that makes its flags known to Beam.
_REGISTERED: dict[type[PipelineOptions], type[PipelineOptions]] = {}


def _register_with_beam(job_options: type[PipelineOptions]) -> None:
    """Makes the job's flags known where Beam looks for flags when a pipeline runs.

    ``Pipeline.run`` (``get_all_options``) parses the command line with the
    *direct* subclasses of PipelineOptions only, and logs "Unparseable
    argument" (or, on portable runners, "Discarding unparseable args") for
    every flag of a class that derives from another options class, such as
    ``ExtractEmbeddingsOptions(InferenceOptions)``. A direct subclass that adds
    the job's flags, defined once per job class and kept alive here (Beam only
    holds subclasses weakly), makes them known.
    """
    direct = PipelineOptions.__subclasses__()
    if job_options in _REGISTERED or all(cls in direct for cls in _job_option_classes(job_options)):
        return

    def add_args(cls: type[PipelineOptions], parser: argparse.ArgumentParser) -> None:
        _add_job_flags(parser, job_options)

    registered = type(job_options.__name__, (PipelineOptions,), {"_add_argparse_args": classmethod(add_args)})
    # get_all_options keeps one class per str(cls): name it after the job's class.
    registered.__module__ = f"{__name__}.registered.{job_options.__module__}"
    registered.__qualname__ = job_options.__qualname__
    _REGISTERED[job_options] = registered


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



def require_flags(flags: PipelineOptions, *names: str) -> None:
    """Refuses, in the order given, the first of a job's required flags left unset or empty.

    Raises:
      ValueError: ``--NAME is required``.
    """
    for name in names:
        if not getattr(flags, name):
            raise ValueError(f"--{name} is required")


def report_usage_error(command: str, error: ValueError) -> int:
    """Prints ``vision-pipelines COMMAND: error: MESSAGE`` on stderr; returns the exit status.

    Jobs call it for what is wrong with their command line (unknown flags and
    invalid configuration: 2, argparse's usage-error status) or with the inputs
    it names (``UnusableInputError``: 3), so either ends in one line instead of
    a traceback, before anything runs. The message is redacted: it often
    quotes a flag's URI, which may be a signed URL.
    """
    sys.stderr.write(f"vision-pipelines {command}: error: {redact_secrets(str(error))}\n")
    return UNUSABLE_INPUT_EXIT if isinstance(error, UnusableInputError) else USAGE_ERROR_EXIT
