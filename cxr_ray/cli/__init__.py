"""The ``cxr-ray`` command line: thin commands that build settings and call one library function.

Every command accepts ``--config FILE`` (TOML) before its name; ``CXR_*`` environment
variables and flags override the file. Invalid settings print one line per field and exit 2.
The job entrypoints (``jobs/``) run the same commands through ``run_command(job_args(...))``.
"""

from cxr_ray.cli import calibrate, data, drift, model, scoring, site_check, tables  # noqa: F401  (registers the commands)
from cxr_ray.cli._app import EXIT_USAGE, handle_errors, job_args, job_main, main, run_command

__all__ = ["EXIT_USAGE", "handle_errors", "job_args", "job_main", "main", "run_command"]
