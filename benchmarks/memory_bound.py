"""Memory of a scoring run as the archive grows: driver and Ray worker peaks at N and 10 N.

    python benchmarks/memory_bound.py [--images 2000,20000] [--model ARTIFACT]

Scores ``--images`` full-resolution JPEGs (hard links of ../shared/data/kermany-fullres, cycled)
with ``cxr_ray.scoring.pipeline.score`` on a fresh local Ray and default settings, once per
size, while a sampler thread reads every 0.25 s:

  driver         this process's RSS (psutil) and its kernel high-water mark (VmHWM) at the end
  workers        RSS and USS of each Ray worker process (``ray::`` in its title: read tasks,
                 the predictor actors; USS leaves out the object store's shared pages)
  object store   bytes in use by Ray's plasma store (``ray._private.internal_api``)

A run whose memory is bounded by its block sizes has the same peaks at 10x the images; the last
lines print each peak's ratio between the largest and the smallest size, and each run's
object-store peak per tenth of its duration (a plateau, or growth until the end). Not a test: numbers
depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import replicate, timed_score

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kermany-fullres"
MB = 1024 * 1024


@dataclass
class Peaks:
    driver_rss: int = 0
    worker_rss: int = 0  # the largest single worker
    worker_uss: int = 0
    workers_rss_sum: int = 0  # all workers together, at the worst sample
    object_store: int = 0
    samples: int = 0
    workers_seen: set[int] = field(default_factory=set)
    # (seconds since the start, object-store bytes) every sample: whether the object-store
    # peak is a plateau or still growing at the end of the run.
    trace: list[tuple[float, int]] = field(default_factory=list)

    def by_tenth(self) -> str:
        """The largest object-store use (MB) in each tenth of the run's duration."""
        if not self.trace:
            return "no samples"
        end = self.trace[-1][0] or 1.0
        tenths = [0] * 10
        for t, store in self.trace:
            i = min(int(10 * t / end), 9)
            tenths[i] = max(tenths[i], store)
        return " ".join(f"{v / MB:.0f}" for v in tenths)


def _object_store_used() -> int:
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address())
        return int(reply.store_stats.object_store_bytes_used)
    except Exception:
        return 0


def _sample(peaks: Peaks, stop: threading.Event) -> None:
    import psutil

    me = psutil.Process()
    start = time.monotonic()
    while not stop.is_set():
        peaks.driver_rss = max(peaks.driver_rss, me.memory_info().rss)
        total = 0
        for proc in psutil.process_iter(["pid", "cmdline"]):
            title = " ".join(proc.info.get("cmdline") or [])
            if not title.startswith("ray::"):
                continue
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            peaks.workers_seen.add(proc.pid)
            peaks.worker_rss = max(peaks.worker_rss, info.rss)
            peaks.worker_uss = max(peaks.worker_uss, info.uss)
            total += info.rss
        peaks.workers_rss_sum = max(peaks.workers_rss_sum, total)
        store = _object_store_used()
        peaks.object_store = max(peaks.object_store, store)
        peaks.trace.append((time.monotonic() - start, store))
        peaks.samples += 1
        stop.wait(0.25)


def _vm_hwm() -> int:
    """This process's peak RSS in bytes (Linux reports ``ru_maxrss`` in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_once(n: int, artifact: str, data: Path, tmp: Path, cache: str) -> tuple[Peaks, float, int]:
    from cxr_ray.config import load_settings

    images = tmp / f"images-{n}"
    files = replicate(data, images, n)
    settings = load_settings(None, {"score": {"cache_dir": cache}})
    peaks, stop = Peaks(), threading.Event()
    sampler = threading.Thread(target=_sample, args=(peaks, stop), daemon=True)
    sampler.start()
    try:
        t = timed_score(str(images), artifact, str(tmp / f"out-{n}"), settings)
    finally:
        stop.set()
        sampler.join()
    assert t.result.images == len(files), (t.result.images, len(files))
    return peaks, t.end_to_end, t.result.images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="2000,20000", help="comma-separated sizes")
    ap.add_argument("--model", required=True, help="artifact")
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()
    sizes = [int(s) for s in args.images.split(",")]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        cache = str(Path(tmp) / "cache")
        # Warm the engine cache (export, agreement check) outside the measured runs.
        run_once(64, args.model, Path(args.data), Path(tmp), cache)
        results = {}
        for n in sizes:
            peaks, e2e, rows = run_once(n, args.model, Path(args.data), Path(tmp), cache)
            results[n] = peaks
            print(
                f"{rows} images: {e2e:.1f} img/s end to end; driver peak RSS {peaks.driver_rss / MB:.0f} MB; "
                f"largest worker peak RSS {peaks.worker_rss / MB:.0f} MB "
                f"(USS {peaks.worker_uss / MB:.0f} MB); "
                f"all workers at once {peaks.workers_rss_sum / MB:.0f} MB over {len(peaks.workers_seen)} "
                f"processes; object store peak {peaks.object_store / MB:.0f} MB ({peaks.samples} samples)"
            )
            print(f"  object store peak (MB) in each tenth of the {rows}-image run: {peaks.by_tenth()}")
        print(f"driver VmHWM over the whole benchmark: {_vm_hwm() / MB:.0f} MB")
        small, large = results[min(sizes)], results[max(sizes)]
        for name in ("driver_rss", "worker_rss", "worker_uss", "workers_rss_sum", "object_store"):
            a, b = getattr(small, name), getattr(large, name)
            ratio = b / a if a else float("nan")
            print(
                f"{name} peak {max(sizes)} / {min(sizes)} images: {ratio:.2f}x "
                f"({a / MB:.0f} -> {b / MB:.0f} MB)"
            )


if __name__ == "__main__":
    main()
