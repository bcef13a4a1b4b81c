"""Retrospective screening of a whole archive; flagged studies summarised.

    ray job submit --working-dir . -- python -m jobs.screen_archive \\
        s3://archive/2019/ --model s3://models/cxr/mnv2 --out s3://screens/2019

``cxr-ray screen`` as a job: the same arguments and options (``--help`` lists them), plus
``--config FILE`` and ``-v`` anywhere. Writes OUT/{predictions,metrics,confusion}.parquet,
OUT/flagged.parquet (flagged studies, most suspicious first) and OUT/report.html, and prints
counts per predicted class and the top flagged studies by image id.
"""

from __future__ import annotations

import sys

from cxr_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("screen", sys.argv[1:], prog="python -m jobs.screen_archive"))
