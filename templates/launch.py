"""The Flex Template launcher's Python file (``FLEX_TEMPLATE_PYTHON_PY_FILE``): runs one job.

One image serves every job: the Dockerfile's ``JOB`` build argument sets
``VISION_PIPELINES_JOB`` (a key of ``make_metadata.JOBS``), and Dataflow
passes the template's parameters, plus its own options (``--runner``,
``--project``, ``--region``, ``--temp_location``, ...), as ``--name=value``.
The job then runs exactly as ``vision-pipelines COMMAND``, its flag checks
included.

Nothing a job must do after its pipeline depends on this process: a Flex
Template launch submits the job and need not wait for it, so every batch job
publishes its output run as the pipeline's last step
(``transforms.publishing.PublishWhenWritten``), after its own checks
(create_dataset ``--strict``, build_index's recall target and accounting).
When this process does wait, it only verifies and reports.
"""

from __future__ import annotations

import os
import sys

from make_metadata import JOBS, template_argv  # Beside this file: the launcher runs it as a script.

JOB_ENV = "VISION_PIPELINES_JOB"


def main(argv: list[str]) -> int:
    from beam_jobs import cli

    job = JOBS[os.environ[JOB_ENV]]
    return cli.main([job.command, *template_argv(job, argv)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
