"""Every Dataflow Flex Template (``templates/``) matches its job's own argument parser.

Nothing here reaches Dataflow (no cloud on these machines): the committed
``metadata.json`` files are regenerated and compared, then checked on their
own against each job's parser and configuration: every parameter is a flag
of the job, every flag the job refuses to run without is a required
parameter and no other is, regexes accept the job's defaults and choices,
and a launch assembled from the parameters, as Dataflow passes them
(``--name=value``) and ``launch.py`` hands them on, passes the job's flag
check. The Dockerfile is checked against the pinned Beam version and the
package's contents. No pipeline runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
from types import ModuleType

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs.cli import COMMANDS
from transforms.runner_policy import check_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATES = os.path.join(ROOT, "templates")
# Dataflow's own options, which the launcher passes along with the template's parameters.
DATAFLOW_ARGS = ["--runner=DataflowRunner", "--project=p", "--region=r", "--temp_location=gs://bucket/tmp",
                 "--staging_location=gs://bucket/staging", "--sdk_container_image=r-docker.pkg.dev/p/r/image:tag"]
NOT_PIPELINES = {"make-sample-data", "search", "serve-search", "sql", "demo"}


def _load(name: str) -> ModuleType:
    """A script of templates/ (not a package: setup.py does not ship it), imported as launch.py imports it."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(TEMPLATES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


make_metadata = _load("make_metadata")
launch = _load("launch")
JOBS = sorted(make_metadata.JOBS)


def committed(name: str) -> dict:
    with open(make_metadata.metadata_path(name)) as handle:
        return json.load(handle)


def sample_value(parameter: dict, action: argparse.Action) -> str:
    """A value for the parameter as a user would give it: a choice, the default, or one of the flag's form."""
    if make_metadata.is_switch(action):
        return "true"
    if action.choices:
        return str(action.choices[0])
    if action.default not in (None, [], ""):
        return str(action.default)
    if action.type in (int, float):
        return "2"
    return make_metadata.probe_value(parameter["name"])


def config_error(job, argv: list[str]) -> str | None:
    """The message of the ValueError the job's ``from_options`` raises for ``argv``, or None."""
    try:
        job.config_class().from_options(PipelineOptions(argv))
    except ValueError as error:
        return str(error)
    except Exception:  # A sample path names no file: the flag checks passed.
        return None
    return None


def test_every_pipeline_command_has_a_template():
    assert {job.command for job in make_metadata.JOBS.values()} == set(COMMANDS) - NOT_PIPELINES
    for name, job in make_metadata.JOBS.items():
        assert COMMANDS[job.command] == job.module
        assert os.path.isfile(make_metadata.metadata_path(name)), name
    assert sorted(entry for entry in os.listdir(TEMPLATES) if os.path.isdir(os.path.join(TEMPLATES, entry))
                  and entry != "__pycache__") == JOBS


@pytest.mark.parametrize("name", JOBS)
def test_committed_metadata_is_the_generated_one(name: str):
    with open(make_metadata.metadata_path(name)) as handle:
        assert handle.read() == make_metadata.render(make_metadata.JOBS[name]), (
            f"templates/{name}/metadata.json is stale: run python templates/make_metadata.py")


@pytest.mark.parametrize("name", JOBS)
def test_metadata_matches_the_jobs_parser(name: str):
    job, metadata = make_metadata.JOBS[name], committed(name)
    actions = {action.dest: action for action in make_metadata.job_flags(job)}
    parameters = {parameter["name"]: parameter for parameter in metadata["parameters"]}
    assert metadata["name"] and metadata["description"]
    assert metadata.get("streaming", False) is job.streaming
    if job.streaming:
        assert metadata["supportsAtLeastOnce"] is False and metadata["supportsExactlyOnce"] is True
    assert len(parameters) == len(metadata["parameters"]), "a parameter is listed twice"
    assert set(parameters) == set(actions), "parameters must be exactly the job's flags"
    for parameter_name, parameter in parameters.items():
        action = actions[parameter_name]
        assert parameter["label"] and parameter["helpText"].strip(), parameter_name
        patterns = [re.compile(pattern) for pattern in parameter.get("regexes", [])]
        accepted = [str(choice) for choice in action.choices or ()]
        if action.default not in (None, [], "") and not make_metadata.is_switch(action):
            accepted.append(str(action.default))
        if make_metadata.is_switch(action):
            accepted += ["true", "false"]
        for value in accepted:
            assert all(pattern.match(value) for pattern in patterns), f"{parameter_name}: regex refuses {value!r}"
        if action.choices:
            assert patterns and not any(pattern.match(f"not-{accepted[0]}") for pattern in patterns), parameter_name


@pytest.mark.parametrize("name", JOBS)
def test_required_parameters_are_what_the_job_refuses_to_run_without(name: str):
    """Checked on the job's configuration itself, not through the generator's probe."""
    job, metadata = make_metadata.JOBS[name], committed(name)
    actions = {action.dest: action for action in make_metadata.job_flags(job)}
    required = [parameter for parameter in metadata["parameters"] if not parameter["isOptional"]]
    argv = [f"--{p['name']}={sample_value(p, actions[p['name']])}" for p in required]
    while (message := config_error(job, argv)) and (group := re.match(r"exactly one of (.+) is required", message)):
        members = re.findall(r"--(\w+)", group.group(1))  # Each optional, the rule in its help.
        for member in members:
            parameter = next(p for p in metadata["parameters"] if p["name"] == member)
            assert parameter["isOptional"] and "Exactly one of" in parameter["helpText"], member
        argv.append(f"--{members[0]}={make_metadata.probe_value(members[0])}")
    assert message is None or "required" not in message, f"a required flag is an optional parameter: {message}"
    for index, parameter in enumerate(required):
        message = config_error(job, argv[:index] + argv[index + 1:])
        assert message and f"--{parameter['name']}" in message and "required" in message, (
            f"{parameter['name']} is a required parameter the job runs without: {message}")


@pytest.mark.parametrize("name", JOBS)
def test_a_launch_with_every_parameter_passes_the_jobs_flag_check(name: str):
    job, metadata = make_metadata.JOBS[name], committed(name)
    actions = {action.dest: action for action in make_metadata.job_flags(job)}
    passed = [f"--{p['name']}={sample_value(p, actions[p['name']])}" for p in metadata["parameters"]]
    argv = make_metadata.template_argv(job, passed + DATAFLOW_ARGS)
    check_flags(argv, job.options_class())
    assert not [arg for arg in argv if arg.endswith("=true")], "switches are passed bare"
    parsed = make_metadata.job_parser(job).parse_known_args(argv)[0]
    for parameter in metadata["parameters"]:
        action = actions[parameter["name"]]
        want = True if make_metadata.is_switch(action) else action.type(sample_value(parameter, action)) \
            if action.type else sample_value(parameter, action)
        got = getattr(parsed, action.dest)
        assert (got[-1] if isinstance(got, list) else got) == want, parameter["name"]


def test_switches_take_true_or_false():
    job = make_metadata.JOBS["create_dataset"]
    assert make_metadata.template_argv(job, ["--overwrite=false", "--strict=True", "--split=80,20"]) == [
        "--strict", "--split=80,20"]
    with pytest.raises(ValueError, match="--overwrite takes true or false"):
        make_metadata.template_argv(job, ["--overwrite=yes"])


def test_launcher_runs_the_job_named_by_the_image(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """An unknown flag ends in the job's usage error (exit 2) before anything runs: the job's own check ran."""
    monkeypatch.setenv(launch.JOB_ENV, "build_index")
    assert launch.main(["--warehouse=duckdb:/nonexistent/w.duckdb", "--output_dir=/nonexistent/i",
                        "--overwrite=false", "--num_shard=2"]) == 2
    assert "vision-pipelines build-index: error: unknown flag --num_shard (did you mean --num_shards?)" in (
        capsys.readouterr().err)


def test_dockerfile_uses_the_pinned_beam_sdk_and_installs_the_whole_package():
    with open(os.path.join(TEMPLATES, "Dockerfile")) as handle:
        dockerfile = handle.read()
    with open(os.path.join(ROOT, "constraints.txt")) as handle:
        beam = re.search(r"^apache-beam==(\S+)$", handle.read(), re.M).group(1)
    assert f"ARG BEAM_VERSION={beam}\n" in dockerfile
    assert "FROM apache/beam_python3.11_sdk:${BEAM_VERSION}" in dockerfile
    assert "RUN pip install --no-cache-dir -c constraints.txt .\n" in dockerfile
    copied = set(re.findall(r"^COPY (\w+) \1$", dockerfile, re.M))
    packages = importlib.metadata.distribution("vision-pipelines").read_text("top_level.txt").split()
    assert copied == set(packages)
    entry = re.search(r'^ENV FLEX_TEMPLATE_PYTHON_PY_FILE="\$\{WORKDIR\}/(\S+)"$', dockerfile, re.M).group(1)
    assert os.path.isfile(os.path.join(ROOT, entry)) and "COPY templates/launch.py" in dockerfile
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in dockerfile
