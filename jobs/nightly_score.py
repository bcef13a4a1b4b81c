"""Nightly incremental scoring: only images this model version has not scored yet.

    ray job submit --working-dir . -- python -m jobs.nightly_score \\
        --source s3://pacs-export/cxr/ --model s3://models/cxr/mnv2 --root s3://scores/nightly

Writes ROOT/runs/<run_id>/{predictions,metrics,confusion}.parquet, appends to
ROOT/metrics_history.parquet and, last (the commit point), to ROOT/ledger.parquet.
"""

from __future__ import annotations

import argparse
import sys

from cxr_ray.config import Settings
from cxr_ray.io import storage
from cxr_ray.models.artifact import read_card
from cxr_ray.scoring import ledger
from cxr_ray.scoring.pipeline import format_summary, new_run_id, score
from jobs._common import parser, run


def main(args: argparse.Namespace, settings: Settings) -> None:
    version = read_card(args.model).version
    ledger_uri = storage.join(args.root, "ledger.parquet")
    seen = ledger.seen_ids(ledger_uri, version)
    run_id = new_run_id()
    out = storage.join(args.root, "runs", run_id)
    result = score(
        args.source,
        args.model,
        out,
        settings,
        run_id=run_id,
        seen_ids=seen,
        history=storage.join(args.root, "metrics_history.parquet"),
    )
    preds = storage.read_table(storage.join(out, "predictions.parquet"))
    added = ledger.append(ledger_uri, ledger.ledger_rows(preds))
    print(format_summary(result))
    print(f"ledger: {len(seen)} images already scored by {version}; {added} added")


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="Archive to scan (folder, tar, zip, Parquet, s3://)")
    p.add_argument("--model", required=True, help="Model artifact directory")
    p.add_argument("--root", required=True, help="Folder for runs, ledger and history")
    sys.exit(run(main, p.parse_args()))
