"""Nightly incremental scoring: only images this model version has not scored yet.

    ray job submit --working-dir . -- python -m jobs.nightly_score \\
        s3://pacs-export/cxr/ --model s3://models/cxr/mnv2 --root s3://scores/nightly

``cxr-ray nightly`` as a job: the same arguments and options (``--help`` lists them), plus
``--config FILE`` and ``-v`` anywhere. Everything it writes goes under ROOT; a rerun over
the same source scores nothing new.
"""

from __future__ import annotations

import sys

from cxr_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("nightly", sys.argv[1:], prog="python -m jobs.nightly_score"))
