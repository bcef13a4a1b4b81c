"""Retrospective screening of a whole archive; flagged studies summarised.

    ray job submit --working-dir . -- python -m jobs.screen_archive \\
        --source s3://archive/2019/ --model s3://models/cxr/mnv2 --out s3://screens/2019

Writes OUT/{predictions,metrics,confusion}.parquet and OUT/flagged.parquet (flagged studies,
most suspicious first) and prints counts per predicted class and the top flagged studies.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import pyarrow.compute as pc

from cxr_ray.config import Settings
from cxr_ray.io import storage
from cxr_ray.metrics import format_metrics_summary
from cxr_ray.reporting.report import write_report
from cxr_ray.scoring.pipeline import format_summary, score
from jobs._common import parser, run


def main(args: argparse.Namespace, settings: Settings) -> None:
    result = score(
        args.source,
        args.model,
        args.out,
        settings,
        history=storage.join(storage.parent(args.out), "metrics_history.parquet"),
    )
    preds = storage.read_table(storage.join(args.out, "predictions.parquet"))
    flagged = preds.filter(pc.fill_null(preds["flagged"], False)).sort_by([("prob_pneumonia", "descending")])
    storage.write_table(flagged, storage.join(args.out, "flagged.parquet"))
    print(format_summary(result))
    counts = Counter(preds["pred_label"].to_pylist())
    print("predicted: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=str)))
    print(f"flagged studies: {flagged.num_rows} (top {min(args.top, flagged.num_rows)} below)")
    for row in flagged.slice(0, args.top).to_pylist():
        print(f"  {row['prob_pneumonia']:.3f}  {row['pred_label']:<9}  {row['uri']}")
    if result.metrics:
        print(format_metrics_summary(result.metrics, title="metrics"))
    print(f"report: {write_report(args.out)}")


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="Archive to screen")
    p.add_argument("--model", required=True, help="Model artifact directory")
    p.add_argument("--out", required=True, help="Output folder")
    p.add_argument("--top", type=int, default=20, help="Flagged studies to print")
    sys.exit(run(main, p.parse_args()))
