"""The nightly seen-set check at scale: 1,000 new images against a 10,000,000-row predictions table.

    python benchmarks/nightly_ledger.py [--rows 10000000] [--images 1000] [--work DIR]

1. Builds ROOT_BIG/predictions: ``--rows`` synthetic rows of the benchmark model version
   (PREDICTIONS_SCHEMA, random sha256-like ids, written in 1/256 slices of 39k rows, each
   sorted by image_id: the layout ``cxr-ray tables optimize`` leaves), in large Arrow batches.
2. Generates ``--images`` new JPEGs and a 64 px model artifact, warms the ONNX cache.
3. Runs one nightly driver process on an empty root and one on ROOT_BIG (same images, same
   settings, a fresh local Ray each), and prints wall seconds, the difference, the ratio and
   each driver's peak RSS (VmHWM of the driver process; Ray workers are separate processes).

Targets (issue 14): the big table adds <= 15 s; the driver stays under 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HEX = np.frombuffer(b"0123456789abcdef", np.uint8)

DRIVER = """
import json, os, sys, time
os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
import ray
from cxr_ray.config import load_settings
from cxr_ray.scoring.nightly import format_nightly, run_nightly
src, art, root, cache = sys.argv[1:5]
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
s = load_settings(None, {"score": {"cache_dir": cache}})
t0 = time.perf_counter()
r = run_nightly(src, art, root, s)
dt = time.perf_counter() - t0
print(format_nightly(r), file=sys.stderr)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (table-building) parent.
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": dt, "rss_mb": rss, "added": r.added_rows, "new": r.new_images,
                  "already": r.already_scored, "score_s": r.score.seconds if r.score else None}))
ray.shutdown()
"""


def _ids(rng: np.random.Generator, n: int, first_byte: int) -> pa.Array:
    b = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    b[:, 0] = first_byte
    h = np.empty((n, 64), np.uint8)
    h[:, 0::2], h[:, 1::2] = HEX[b >> 4], HEX[b & 15]
    v = np.sort(h.view("S64").ravel())
    offsets = np.arange(0, 64 * (n + 1), 64, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(v.tobytes()))


def synthetic_batches(n: int, version: str, slices: int = 256, seed: int = 0):
    from cxr_ray.scoring.schema import PREDICTIONS_SCHEMA

    rng = np.random.default_rng(seed)
    when = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1e6)
    for k in range(slices):
        m = n // slices + (1 if k < n % slices else 0)
        ids = _ids(rng, m, k)
        p = rng.random((m, 3), dtype=np.float32)
        p /= p.sum(1, keepdims=True)
        cols = {f.name: pa.nulls(m, f.type) for f in PREDICTIONS_SCHEMA}  # DICOM columns...: null
        cols.update(
            {
                "image_id": ids,
                "uri": pc.binary_join_element_wise("s3://pacs/archive/", ids, ".dcm", ""),
                "patient_id": pa.nulls(m, pa.string()),
                "label": pa.nulls(m, pa.string()),
                "pred_label": pa.array(np.array(["normal", "bacterial", "viral"])[p.argmax(1)]),
                "prob_normal": p[:, 0],
                "prob_bacterial": p[:, 1],
                "prob_viral": p[:, 2],
                "prob_pneumonia": p[:, 1] + p[:, 2],
                "flagged": (p[:, 1] + p[:, 2]) >= 0.5,
                "model_version": pa.array([version] * m),
                "engine": pa.array(["onnxruntime"] * m),
                "run_id": pa.array([f"synthetic-{k % 365:03d}"] * m),
                "scored_at": pa.array(
                    np.full(m, when + k * 86_400_000_000, "int64"), pa.timestamp("us", tz="UTC")
                ),
                "status": pa.array(["ok"] * m),
                "error": pa.nulls(m, pa.string()),
                "heatmap_uri": pa.nulls(m, pa.string()),
            }
        )
        t = pa.table(cols).select(PREDICTIONS_SCHEMA.names).cast(PREDICTIONS_SCHEMA)
        yield from t.to_batches()


def build_table(root: Path, rows: int, version: str) -> float:
    from deltalake import write_deltalake

    from cxr_ray.io import tables
    from cxr_ray.scoring import ledger
    from cxr_ray.scoring.schema import PREDICTIONS_SCHEMA

    t0 = time.perf_counter()
    ledger.ensure_predictions(str(root))
    reader = pa.RecordBatchReader.from_batches(PREDICTIONS_SCHEMA, synthetic_batches(rows, version))
    write_deltalake(
        ledger.table(str(root), ledger.PREDICTIONS),
        reader,
        mode="append",
        writer_properties=tables.writer_properties(ledger.BLOOM_COLUMNS, row_group_rows=64 * 1024),
    )
    return time.perf_counter() - t0


def run_driver(src: Path, art: Path, root: Path, cache: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, str(src), str(art), str(root), str(cache)],
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        sys.exit(f"driver failed:\n{out.stderr[-4000:]}")
    print("   ", out.stderr.strip().splitlines()[-3] if out.stderr.strip() else "", flush=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--work", default=None, help="Working folder (default: a temp dir, removed)")
    a = ap.parse_args()
    from cxr_ray.data.synthetic import jpeg_bytes, kermany_name
    from tests.conftest import make_artifact

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        art = make_artifact(work / "model", input_size=64)
        from cxr_ray.models.artifact import read_card

        version = read_card(str(art)).version
        src = work / "new"
        src.mkdir(parents=True, exist_ok=True)
        for i in range(a.images):
            label = ("normal", "bacterial", "viral")[i % 3]
            (src / kermany_name(label, i)).write_bytes(jpeg_bytes(96, 80, seed=7_000_000 + i, label=label))
        warm = work / "warm"
        warm.mkdir(exist_ok=True)
        for f in sorted(src.iterdir())[:8]:
            (warm / f.name).write_bytes(f.read_bytes())
        cache = work / "cache"
        print(f"building a {a.rows:,}-row predictions table ...", flush=True)
        big = work / "big"
        build_s = build_table(big, a.rows, version)
        du = sum(f.stat().st_size for f in (big / "predictions").rglob("*.parquet"))
        print(f"  built in {build_s:.1f} s ({du / 2**20:.0f} MiB of Parquet)", flush=True)
        print("warming the ONNX cache ...", flush=True)
        run_driver(warm, art, work / "warm-root", cache)
        print(f"nightly over {a.images} new images, empty root ...", flush=True)
        empty = run_driver(src, art, work / "empty", cache)
        print(f"nightly over {a.images} new images, {a.rows:,}-row root ...", flush=True)
        full = run_driver(src, art, big, cache)
        assert empty["added"] == full["added"] == a.images, (empty, full)
        extra = full["seconds"] - empty["seconds"]
        print(
            json.dumps(
                {
                    "rows": a.rows,
                    "images": a.images,
                    "empty_s": round(empty["seconds"], 1),
                    "big_s": round(full["seconds"], 1),
                    "extra_s": round(extra, 1),
                    "ratio": round(full["seconds"] / empty["seconds"], 2),
                    "driver_rss_mb_empty": round(empty["rss_mb"]),
                    "driver_rss_mb_big": round(full["rss_mb"]),
                    "build_s": round(build_s, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
