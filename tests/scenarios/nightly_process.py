"""One nightly driver process (the library entry), for the overlapping-runs tests.

    python -m tests.scenarios.nightly_process SOURCE ARTIFACT ROOT [--no-lease]
        [--start-at EPOCH] [--ttl S] [--on-busy wait|exit] [--storage-options JSON]

Starts its own small local Ray (as a cron-started driver would), waits until ``--start-at``
so that several processes overlap, runs ``run_nightly`` and prints its result as one JSON
line (``{"nightly": ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("source")
    p.add_argument("artifact")
    p.add_argument("root")
    p.add_argument("--no-lease", action="store_true")
    p.add_argument("--start-at", type=float, default=0.0)
    p.add_argument("--ttl", type=float, default=300.0)
    p.add_argument("--on-busy", default="wait")
    p.add_argument("--storage-options", default=None, help="JSON dict for delta-rs (s3:// roots)")
    a = p.parse_args()

    import ray

    from cxr_ray.config import load_settings
    from cxr_ray.scoring.nightly import NightlyOptions, format_nightly, run_nightly

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    settings = load_settings(
        None,
        {
            "data": {"rows_per_block": 8},
            # Several drivers share the test's 2-CPU Ray: small reservations keep all of them moving.
            "score": {"batch_size": 8, "cpus_per_actor": 0.2, "cpus_per_decode_task": 0.2},
        },
    )
    opts = NightlyOptions(
        lease=not a.no_lease,
        lease_ttl_s=a.ttl,
        on_busy=a.on_busy,
        storage_options=json.loads(a.storage_options) if a.storage_options else None,
    )
    time.sleep(max(0.0, a.start_at - time.time()))
    r = run_nightly(a.source, a.artifact, a.root, settings, options=opts)
    print(format_nightly(r), flush=True)
    keys = (
        "run_id",
        "new_images",
        "already_scored",
        "added_rows",
        "duplicates",
        "waited_s",
        "skipped_reason",
    )
    print(json.dumps({"nightly": {k: getattr(r, k) for k in keys}}), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
