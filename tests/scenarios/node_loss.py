"""Kill a worker node of a multi-node Ray cluster while a scoring run streams.

    python -m tests.scenarios.node_loss IMAGES_DIR ARTIFACT OUT_DIR

Prints one JSON line: rows, unique uris, ok rows, killed node, and whether the run finished.
"""

from __future__ import annotations

import json
import os
import sys
import threading

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster

    from cxr_ray.config import load_settings
    from cxr_ray.scoring.pipeline import score

    images, artifact, out = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    settings = load_settings(None, {
        "data": {"rows_per_block": 8},
        "score": {"batch_size": 8, "actors_min": 1, "actors_max": 2, "cpus_per_actor": 0.5,
                  "cache_dir": os.path.join(out, "cache")},
    })  # fmt: skip
    killed: list[str] = []
    blocks = 0

    def kill() -> None:
        node = workers[0]
        cluster.remove_node(node, allow_graceful=False)
        killed.append(node.node_id)

    def on_block(_block) -> None:
        nonlocal blocks
        blocks += 1
        if blocks == 2:  # mid-stream: some rows committed, most still to come
            threading.Thread(target=kill).start()

    result = score(images, artifact, os.path.join(out, "run"), settings, on_block=on_block)
    t = pq.read_table(os.path.join(out, "run", "predictions.parquet"))
    print(json.dumps({
        "rows": t.num_rows, "unique_uris": len(set(t["uri"].to_pylist())),
        "ok": t["status"].to_pylist().count("ok"), "killed": killed, "blocks": blocks,
        "images": result.images,
    }))  # fmt: skip
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
