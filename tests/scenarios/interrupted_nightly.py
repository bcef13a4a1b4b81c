"""A nightly scoring driver that SIGKILLs itself after its first committed block.

    python -m tests.scenarios.interrupted_nightly SOURCE ARTIFACT ROOT

Runs jobs.nightly_score's work in-process; a hard kill is the worst case: no cleanup runs.
"""

from __future__ import annotations

import os
import signal
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    import ray

    from cxr_ray.config import load_settings
    from cxr_ray.io import storage
    from cxr_ray.models.artifact import read_card
    from cxr_ray.scoring import ledger
    from cxr_ray.scoring.pipeline import new_run_id, score

    source, artifact, root = sys.argv[1:4]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    settings = load_settings(
        None,
        {"data": {"rows_per_block": 4}, "score": {"batch_size": 4, "cache_dir": os.path.join(root, "cache")}},
    )
    seen = ledger.seen_ids(storage.join(root, "ledger.parquet"), read_card(artifact).version)
    run_id = new_run_id()

    def die(_block) -> None:
        print("killing the driver mid-run", flush=True)
        os.killpg(os.getpgid(0), signal.SIGKILL)  # the driver and the Ray it started

    score(
        source,
        artifact,
        storage.join(root, "runs", run_id),
        settings,
        run_id=run_id,
        seen_ids=seen,
        on_block=die,
    )


if __name__ == "__main__":
    main()
