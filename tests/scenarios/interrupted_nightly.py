"""A nightly scoring driver that SIGKILLs itself after its first scored block.

    python -m tests.scenarios.interrupted_nightly SOURCE ARTIFACT ROOT

Runs ``cxr_ray.scoring.nightly.run_nightly`` in-process; a hard kill is the worst case: no
cleanup runs, the lease is not handed back. Afterwards ROOT/predictions holds no row of this
run (it commits only at the end) and ROOT/leases still names it until ``--ttl`` seconds pass.
"""

from __future__ import annotations

import os
import signal
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    import ray

    from cxr_ray.config import load_settings
    from cxr_ray.scoring.nightly import NightlyOptions, run_nightly

    source, artifact, root = sys.argv[1:4]
    ttl = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    settings = load_settings(
        None,
        {"data": {"rows_per_block": 4}, "score": {"batch_size": 4, "cache_dir": os.path.join(root, "cache")}},
    )

    def die(_block) -> None:
        print("killing the driver mid-run", flush=True)
        os.killpg(os.getpgid(0), signal.SIGKILL)  # the driver and the Ray it started

    run_nightly(source, artifact, root, settings, on_block=die, options=NightlyOptions(lease_ttl_s=ttl))


if __name__ == "__main__":
    main()
