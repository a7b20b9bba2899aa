"""Imported by every Beam SDK worker at startup: redacts the worker's log records, tracebacks and prints.

``make_pipeline_options`` names this module in ``--beam_plugins``. An SDK
worker in a process of its own (Dataflow, a portable runner's Docker, process
or external worker pool) runs ``apache_beam.runners.worker.sdk_worker_main``,
which imports each plugin before it processes any bundle. From then on every
record logged in the worker (our DoFns', Beam's, TensorFlow's, the Google
Cloud clients') is redacted before Beam's log handler ships it to the runner,
and so is what the worker prints to ``sys.stdout``/``sys.stderr`` (Beam prints
a failed bundle's traceback there as well as logging it).

Not covered: the lines the worker logged before the import (among them one
that lists the pipeline options: keep credentials out of flags on remote
runners), and the failed bundle's traceback that Beam sends the runner in its
response, which the Dataflow service shows as the job's error (the launching
process redacts it when it prints it). A worker without this package logs that
the plugin failed to import and runs on.
"""

import sys

from schemas.redaction import RedactingStream, install_redaction

install_redaction()
sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
