"""Retrain (fine-tune) the classifier with Ray Train and write a model artifact.

    ray job submit --working-dir . -- python -m jobs.retrain \\
        s3://datasets/kermany/train --out s3://models/cxr/mnv2-2026-11 --workers 4 --use-gpu

``cxr-ray train`` as a job: the same arguments and options (``--help`` lists them), plus
``--config FILE`` and ``-v`` anywhere. Rerunning with the same ``--run-name`` (and storage
path) resumes from the last checkpoint.
"""

from __future__ import annotations

import sys

from cxr_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train", sys.argv[1:], prog="python -m jobs.retrain"))
