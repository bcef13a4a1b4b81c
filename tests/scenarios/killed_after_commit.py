"""A nightly driver SIGKILLed right after its predictions commit, before its side tables.

    python -m tests.scenarios.killed_after_commit SOURCE ARTIFACT ROOT

The predictions commit is real (``ledger.commit_new``); the process (and the Ray it started)
is killed the moment it returns, so ROOT/predictions holds the run's rows and ROOT/studies,
metrics_history and drift_history have none of them. Prints the run id first.
"""

from __future__ import annotations

import json
import os
import signal
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    import ray

    from cxr_ray.config import load_settings
    from cxr_ray.scoring import ledger
    from cxr_ray.scoring.nightly import NightlyOptions, run_nightly

    source, artifact, root = sys.argv[1:4]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    settings = load_settings(None, {"data": {"rows_per_block": 6}, "score": {"batch_size": 8}})
    real_commit = ledger.commit_new

    def commit_then_die(*args, **kwargs):  # type: ignore[no-untyped-def]
        commit = real_commit(*args, **kwargs)
        print(json.dumps({"run_id": kwargs["metadata"]["cxr_ray.run_id"], "added": commit.added}), flush=True)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    ledger.commit_new = commit_then_die
    run_nightly(source, artifact, root, settings, options=NightlyOptions(lease_ttl_s=3))


if __name__ == "__main__":
    main()
