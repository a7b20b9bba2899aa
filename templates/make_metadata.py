"""Writes every Dataflow job's Flex Template ``metadata.json`` from the job's own parser.

A template's parameters are the job's flags. Written by hand they would drift
from the parser (a renamed flag, a new choice, a flag that became required),
and Dataflow would then refuse a valid launch or pass one the job refuses.
So each ``templates/<job>/metadata.json`` is generated here from the job's
options class: names, help text, choices and value types as regexes; and
which flags are required, which the parser does not know (every default is
None: the job's ``<Job>Config.from_options`` refuses a missing one, so that
is asked). ``tests/beam_jobs/test_flex_templates.py`` regenerates the files
and fails when a committed one differs.

Dataflow passes every template parameter as ``--name=value``; a switch
(``store_true``) takes no value, so ``launch.py`` turns ``--name=true`` into
``--name`` and drops ``--name=false`` (``template_argv``).

Regenerate after a flag changes: ``python templates/make_metadata.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import sys
from typing import Any

TEMPLATES_DIR = os.path.dirname(os.path.abspath(__file__))
METADATA_FILE = "metadata.json"
# Given to each required flag while asking the job which flag it needs next: a local path that
# does not exist, so the job's file checks fail on it without touching the network; Pub/Sub and
# BigQuery names in the form the job checks first (stream_predict checks them before --model_dir).
PROBE_VALUE = "/nonexistent/flex-template-probe"
PROBE_VALUES_BY_SUFFIX = {
    "_topic": "projects/probe/topics/probe",
    "_subscription": "projects/probe/subscriptions/probe",
    "_table": "probe.dataset.table",
}
_REQUIRED = re.compile(r"^--(\w+) is required")
_ONE_OF = re.compile(r"^exactly one of (.+) is required")
_FLAG = re.compile(r"--(\w+)")
_SWITCH_VALUES = ("true", "false")
_INT_REGEX = r"^-?[0-9]+$"
_FLOAT_REGEX = r"^-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"


@dataclasses.dataclass(frozen=True)
class Job:
    """A Dataflow-runnable job: its CLI command, module, options and config classes."""

    command: str
    module: str
    options: str
    config: str
    streaming: bool = False

    @property
    def name(self) -> str:
        """The template's folder and file name: the job's module name."""
        return self.module.rsplit(".", 1)[-1]

    def options_class(self) -> Any:
        return getattr(importlib.import_module(self.module), self.options)

    def config_class(self) -> Any:
        return getattr(importlib.import_module(self.module), self.config)


# Every Beam pipeline among beam_jobs.cli.COMMANDS; search, serve-search, sql, demo and
# make-sample-data run no pipeline and get no template.
JOBS: dict[str, Job] = {job.name: job for job in (
    Job("create-dataset", "beam_jobs.create_dataset", "CreateDatasetOptions", "CreateDatasetConfig"),
    Job("train", "beam_jobs.train", "TrainOptions", "TrainConfig"),
    Job("batch-predict", "beam_jobs.batch_predict", "BatchPredictOptions", "BatchPredictConfig"),
    Job("extract-embeddings", "beam_jobs.extract_embeddings", "ExtractEmbeddingsOptions", "ExtractEmbeddingsConfig"),
    Job("build-index", "beam_jobs.build_index", "BuildIndexOptions", "BuildIndexConfig"),
    Job("near-duplicates", "beam_jobs.near_duplicates", "NearDuplicatesOptions", "NearDuplicatesConfig"),
    Job("stream-predict", "beam_jobs.stream_predict", "StreamPredictOptions", "StreamPredictConfig", streaming=True),
)}


def job_parser(job: Job) -> argparse.ArgumentParser:
    """The job's own flags (its options class and its bases'), as the job itself parses them."""
    from transforms.runner_policy import _add_job_flags

    parser = argparse.ArgumentParser(add_help=False)
    _add_job_flags(parser, job.options_class())
    return parser


def job_flags(job: Job) -> list[argparse.Action]:
    """The parser's actions for the job's flags, in the order the job declares them."""
    return [action for action in job_parser(job)._actions if action.option_strings]


def is_switch(action: argparse.Action) -> bool:
    return isinstance(action, argparse._StoreTrueAction)


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What the job refuses to run without: single flags, and groups of which exactly one is needed."""

    required: list[str]
    one_of: list[list[str]]


def requirements(job: Job) -> Requirements:
    """Asks the job's ``from_options`` which flags it needs, one refusal at a time.

    Every job checks its required flags (``runner_policy.require_flags``:
    ``--NAME is required``; stream_predict's input: ``exactly one of --A and
    --B is required``) before anything else, so supplying each refused flag
    in turn until a different error (the probe value names no real file)
    finds them all.
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    config, argv, found = job.config_class(), [], Requirements([], [])
    for _ in job_flags(job):
        try:
            config.from_options(PipelineOptions(argv))
        except ValueError as error:
            message = str(error)
            if match := _REQUIRED.match(message):
                found.required.append(match.group(1))
                argv += [f"--{match.group(1)}", probe_value(match.group(1))]
                continue
            if match := _ONE_OF.match(message):
                group = _FLAG.findall(match.group(1))
                found.one_of.append(group)
                argv += [f"--{group[0]}", probe_value(group[0])]
                continue
        except Exception:  # Any other refusal (the probe path names no file): every requirement is known.
            pass
        break
    return found


def probe_value(name: str) -> str:
    """A value of the form the flag takes, naming nothing that exists."""
    return next((value for suffix, value in PROBE_VALUES_BY_SUFFIX.items() if name.endswith(suffix)), PROBE_VALUE)


def label(name: str) -> str:
    """``output_dir`` -> ``Output dir``: what the Console shows beside the field."""
    return name.replace("_", " ").capitalize()


def help_text(action: argparse.Action, one_of: list[list[str]]) -> str:
    """The flag's help, with its default and, for a group member, the group's rule."""
    parts = [action.help.rstrip(".") + "." if action.help else f"The job's --{action.dest} flag."]
    if action.choices:
        parts.append(f"One of: {', '.join(str(choice) for choice in action.choices)}.")
    if is_switch(action):
        parts.append("true or false (default false).")
    elif action.default not in (None, [], ""):
        parts.append(f"Default: {action.default}.")
    for group in one_of:
        if action.dest in group:
            parts.append(f"Exactly one of {' and '.join(group)} is required.")
    if isinstance(action, argparse._AppendAction):
        parts.append("One value per launch (the command line can repeat the flag).")
    return " ".join(parts)


def regexes(action: argparse.Action) -> list[str]:
    """The values Dataflow lets through for the flag: its choices, a switch's true/false, or a number."""
    if action.choices:
        return [f"^({'|'.join(re.escape(str(choice)) for choice in action.choices)})$"]
    if is_switch(action):
        return [f"^({'|'.join(_SWITCH_VALUES)})$"]
    if action.type is int:
        return [_INT_REGEX]
    if action.type is float:
        return [_FLOAT_REGEX]
    return []


def metadata(job: Job) -> dict[str, Any]:
    """The job's ``metadata.json`` (https://cloud.google.com/dataflow/docs/guides/templates/configuring-flex-templates)."""
    module = importlib.import_module(job.module)
    needs = requirements(job)
    parameters = []
    for action in job_flags(job):
        parameter: dict[str, Any] = {
            "name": action.dest,
            "label": label(action.dest),
            "helpText": help_text(action, needs.one_of),
            "isOptional": action.dest not in needs.required,
        }
        if patterns := regexes(action):
            parameter["regexes"] = patterns
        parameters.append(parameter)
    streaming = {"streaming": True, "supportsAtLeastOnce": False, "supportsExactlyOnce": True} if job.streaming else {}
    return {
        "name": f"vision-pipelines {job.command}",
        "description": (module.__doc__ or job.command).strip().splitlines()[0],
        **streaming,
        "parameters": parameters,
    }


def template_argv(job: Job, argv: list[str]) -> list[str]:
    """The job's command line for Dataflow's ``--name=value`` parameters: ``--switch=true`` -> ``--switch``.

    Raises:
      ValueError: A switch was given a value other than true or false.
    """
    switches = {name for action in job_flags(job) if is_switch(action) for name in action.option_strings}
    result = []
    for arg in argv:
        name, has_value, value = arg.partition("=")
        if name not in switches or not has_value:
            result.append(arg)
        elif value.lower() not in _SWITCH_VALUES:
            raise ValueError(f"{name} takes true or false in a template. Received `{arg}`")
        elif value.lower() == "true":
            result.append(name)
    return result


def metadata_path(name: str) -> str:
    return os.path.join(TEMPLATES_DIR, name, METADATA_FILE)


def render(job: Job) -> str:
    return json.dumps(metadata(job), indent=2) + "\n"


def main() -> int:
    for name, job in JOBS.items():
        os.makedirs(os.path.dirname(metadata_path(name)), exist_ok=True)
        with open(metadata_path(name), "w") as handle:
            handle.write(render(job))
        print(metadata_path(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
