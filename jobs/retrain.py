"""Retrain (fine-tune) the classifier with Ray Train and write a model artifact.

    ray job submit --working-dir . -- python -m jobs.retrain \\
        --data s3://datasets/kermany/train --out s3://models/cxr/mnv2-2026-11 --workers 4 --use-gpu

Rerunning with the same --run-name (and storage path) resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from cxr_ray.config import Settings
from cxr_ray.metrics import format_metrics_summary
from jobs._common import parser, run


def main(args: argparse.Namespace, settings: Settings) -> None:
    from cxr_ray.training.trainer import train

    card = train(settings, args.data, args.out)
    print(f"artifact {card.version} written to {args.out}")
    print(format_metrics_summary(card.metrics.get("validation", {})))


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="Labelled images, manifest or split table")
    p.add_argument("--out", required=True, help="Artifact directory")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument("--storage-path", default=None)
    p.add_argument("--run-name", default=None)
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    a = p.parse_args()
    train_flags = {
        k: getattr(a, k)
        for k in ("workers", "epochs", "use_gpu", "storage_path", "run_name", "max_steps_per_epoch")
    }
    sys.exit(run(main, a, {"train": train_flags}))
