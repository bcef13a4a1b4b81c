"""Score on a local Ray that has logical GPUs but no CUDA (the GPU control flow, on a CPU).

    python -m tests.scenarios.logical_gpus IMAGES_DIR ARTIFACT OUT_DIR

Ray schedules ``num_gpus`` actors on logical GPUs of a CPU-only machine, so this exercises
GPU actor placement, the ``gpu_decode`` hand-off (JPEG bytes shipped undecoded to actors that
turn out to have no CUDA), ``engine=auto`` resolved inside the actors, and the Grad-CAM pool
with one GPU that the predictor pool already holds. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _table(out: str):
    import pyarrow.parquet as pq

    return pq.read_table(os.path.join(out, "predictions.parquet")).sort_by("uri")


def _col(t, name: str):
    return t[name].to_numpy(zero_copy_only=False)


def main() -> None:
    import numpy as np
    import ray

    from cxr_ray.config import load_settings
    from cxr_ray.models.artifact import load_artifact
    from cxr_ray.scoring.pipeline import score

    images, artifact, out = sys.argv[1:4]
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    art = load_artifact(artifact)
    # 2 CPUs: predictor actors (0.5 each) and an explainer (0.5) leave room for 0.5-CPU decoding.
    base = {
        "batch_size": 8,
        "cpus_per_actor": 0.5,
        "cpus_per_decode_task": 0.5,
        "cache_dir": os.path.join(out, "cache"),
    }
    runs = {
        "cpu": {**base, "engine": "onnxruntime"},
        "gpu_onnx": {**base, "engine": "onnxruntime", "gpus_per_actor": 1, "actors_min": 2, "actors_max": 2},
        "gpu_auto": {**base, "engine": "auto", "gpus_per_actor": 1, "actors_min": 2, "actors_max": 2},
    }
    explain = {
        **base,
        "engine": "auto",
        "gpus_per_actor": 1,
        "actors_min": 1,
        "actors_max": 1,
        "explain": "flagged",
    }
    report: dict[str, object] = {}
    tables = {}

    def run(name: str, sc: dict) -> None:
        settings = load_settings(None, {"data": {"rows_per_block": 8}, "score": sc})
        r = score(images, art, os.path.join(out, name), settings)
        tables[name] = _table(os.path.join(out, name))
        report[name] = {"images": r.images, "ok": r.ok, "engines": r.engines, "flagged": r.flagged}

    for name, sc in runs.items():
        run(name, sc)
    # --explain flagged with ONE logical GPU held by the one predictor actor: the Grad-CAM pool
    # used to ask for another GPU and Ray Data waited for it forever.
    ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    run("explain", explain)
    cpu = tables["cpu"]
    cols = ("prob_normal", "prob_bacterial", "prob_viral")
    for name in ("gpu_onnx", "gpu_auto", "explain"):
        t = tables[name]
        same_rows = t["uri"].to_pylist() == cpu["uri"].to_pylist()
        same_status = t["status"].to_pylist() == cpu["status"].to_pylist()
        ok = np.array([s == "ok" for s in cpu["status"].to_pylist()])
        dp = max(
            float(
                np.nanmax(
                    np.abs(
                        t[c].to_numpy(zero_copy_only=False)[ok] - cpu[c].to_numpy(zero_copy_only=False)[ok]
                    )
                )
            )
            for c in cols
        )
        report[name] |= {"same_rows": same_rows, "same_status": same_status, "max_dp": dp}
    ex = tables["explain"]
    report["explain"] |= {
        "heatmaps": sum(u is not None for u in ex["heatmap_uri"].to_pylist()),
        "heatmap_files_exist": all(os.path.exists(u) for u in ex["heatmap_uri"].to_pylist() if u),
    }
    # What a black (all-zero) image scores: no ok row may carry it.
    from cxr_ray.config import ScoreSettings
    from cxr_ray.engines import build, engine_options, prepare
    from cxr_ray.models.card import spec_for

    engine = build(
        prepare(
            art, "onnxruntime", engine_options(ScoreSettings(cache_dir=base["cache_dir"])), spec_for(art.card)
        )[0]
    )
    h, w = art.card.input_size
    black = engine(np.zeros((1, 1, h, w), np.float32))[0]
    probs = np.stack([_col(tables["gpu_auto"], c) for c in cols], axis=1)
    okg = np.array([s == "ok" for s in tables["gpu_auto"]["status"].to_pylist()])
    report["ok_rows_scored_as_black"] = int(np.isclose(probs[okg], black, atol=1e-6).all(axis=1).sum())
    print(json.dumps(report))
    ray.shutdown()


if __name__ == "__main__":
    main()
