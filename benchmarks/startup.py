"""Start-up to first rows of ``cxr-ray score`` with Ray already running and the engine cached.

    python benchmarks/startup.py [--model /work/art/mnv2] [--images 16] [--runs 3]

Starts a private Ray head (``ray start --head --block``, stopped by its pid at the end; or
joins ``RAY_ADDRESS`` when set), copies a few real JPEGs into an unlabelled folder, scores
it once to fill the engine cache, then:

1. times ``cxr-ray score`` ``--runs`` times, a fresh process each time: from its launch to
   the first block the CLI's progress display receives (a probe around ``Progress``, the
   only change), and the wall time; with ``--compare DIR`` the runs alternate with another
   checkout's CLI (the same probe), so both see the same load;
2. runs the CLI's steps in one fresh process with a clock around each phase: interpreter,
   imports, settings and the artifact, Ray connect, the engine plan (cached), listing and
   the dataset plan, the drift/estimate set-up, and the first batch (Ray Data's start, the
   actor pool with its engine load, decode, predict).

Timing is noisy on a shared machine: compare phases within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "kermany224"
CORE_WORKER_LINE = "has constructor arguments in the object store"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def ray_head(tmp: Path) -> Iterator[str]:
    """The address of a running Ray: ``RAY_ADDRESS``, else a private head for the block."""
    if os.environ.get("RAY_ADDRESS"):
        yield os.environ["RAY_ADDRESS"]
        return
    ray_bin = Path(sys.executable).with_name("ray")
    log = tmp / "ray-head.log"
    with log.open("w") as sink:  # a private head: token auth off, like a single-user node
        cmd = [str(ray_bin), "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=2"]
        cmd += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={tmp / 'ray'}"]
        head = subprocess.Popen(
            cmd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ | {"RAY_AUTH_MODE": "disabled"},
        )
    try:
        deadline = time.monotonic() + 180
        while not (match := re.search(r"ray start --address='([^']+)'", log.read_text())):
            if time.monotonic() > deadline or head.poll() is not None:
                raise SystemExit(f"Ray head did not start: {log.read_text()[-1000:]}")
            time.sleep(1)
        while "Ray runtime started" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        yield match.group(1)
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        head.wait(timeout=60)


def _source(tmp: Path, n: int) -> Path:
    src = tmp / "images"
    src.mkdir()
    files = sorted((DATA / "train").rglob("*.jpeg"))[:n]
    if len(files) < n:
        raise SystemExit(f"need {n} JPEGs under {DATA}/train")
    for i, f in enumerate(files):  # unlabelled names: no metrics, no report after the run
        shutil.copy(f, src / f"img_{i:03d}.jpeg")
    return src


#: ``python -m cxr_ray`` with one probe: the wall-clock time of the first block the CLI's
#: progress display receives (its ``on_block``), printed on stderr. Nothing else changes.
_LAUNCH = """
import sys, time
import cxr_ray.cli
import cxr_ray.cli.progress as progress

_call = progress.Progress.__call__

def _first(self, table):
    if not getattr(self, "_probe_seen", False):
        self._probe_seen = True
        sys.stderr.write(f"FIRST_ROWS_AT {time.time()}\\n")
        sys.stderr.flush()
    return _call(self, table)

progress.Progress.__call__ = _first
sys.argv = ["cxr-ray", *sys.argv[1:]]
cxr_ray.cli.main()
"""


def _cli(
    args: list[str], env: dict[str, str], repo: Path = REPO
) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """(wall seconds, seconds from the launch to the first rows, the process) of one run."""
    env = env | {"PYTHONPATH": str(repo)}
    launched = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCH, *args], env=env, capture_output=True, text=True, cwd=repo
    )
    wall = time.time() - launched
    if proc.returncode != 0:
        raise SystemExit(f"cxr-ray failed ({proc.returncode}): {proc.stderr[-2000:]}")
    at = re.search(r"FIRST_ROWS_AT ([0-9.]+)", proc.stderr)
    return wall, (float(at.group(1)) - launched) if at else float("nan"), proc


def phases(source: str, model: str, out: str) -> None:
    """The CLI's steps in this (fresh) process, one clock each; prints JSON on the last line."""
    marks: dict[str, float] = {}
    last = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        marks[name] = round(now - last, 3)
        last = now

    import cxr_ray.cli  # noqa: F401  (what `cxr-ray` imports before parsing arguments)

    mark("import cxr_ray.cli")
    from cxr_ray.cli.runtime import ray_session
    from cxr_ray.scoring import pipeline

    mark("import scoring.pipeline + runtime")
    from cxr_ray.config import load_settings
    from cxr_ray.models.artifact import load_artifact

    settings = load_settings()
    art = load_artifact(model, verify_shapes=False)
    mark("settings + artifact (card, weights hash)")
    with ray_session(settings.ray):
        mark("Ray connect (import ray.data, join the cluster)")
        warm = pipeline.import_in_background()  # as score() does
        plan = pipeline.plan_run(art, settings)
        mark("engine plan (cached export)")
        ds = pipeline.build_dataset(source, art, plan, settings, out_dir=out)
        mark("listing + dataset plan")
        first = next(iter(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
        mark(f"first batch ({first.num_rows} rows: Ray Data start, actors + engine load, decode, predict)")
        warm.join()
        mark("after first rows: rest of the background imports")
        from cxr_ray.scoring.drift_io import drift_accumulator
        from cxr_ray.scoring.estimate import run_estimator

        drift, _ = drift_accumulator(art, settings.drift)
        run_estimator(art, drift.ref if drift is not None else None)
        mark("after first rows: drift + estimate set-up")
    print(json.dumps(marks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/art/mnv2")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache-dir", type=Path, default=None, help="engine cache (default: a fresh one)")
    ap.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="another checkout (e.g. `git archive OLD | tar -x -C DIR`): its CLI runs alternate "
        "with this one's, so both see the same machine load",
    )
    ap.add_argument("--phases", nargs=3, metavar=("SOURCE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phases:
        phases(*args.phases)
        return
    with tempfile.TemporaryDirectory(prefix="cxr-startup-") as d:
        tmp = Path(d)
        src = _source(tmp, args.images)
        env = os.environ | {
            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "CXR_SCORE__CACHE_DIR": str(args.cache_dir or tmp / "cache"),
        }
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import cxr_ray.cli"], env=env, check=True)
        print(f"python -c 'import cxr_ray.cli': {time.perf_counter() - t:.2f} s")
        with ray_head(tmp) as address:
            env["RAY_ADDRESS"] = address
            score = ["score", str(src), "--model", args.model]
            wall, _, proc = _cli([*score, "--out", str(tmp / "warm")], env)  # fills the engine cache
            print(f"warm-up run (engine export into the cache): {wall:.2f} s")
            repos = {"this checkout": REPO} | ({"compared": args.compare.resolve()} if args.compare else {})
            walls: dict[str, list[float]] = {name: [] for name in repos}
            firsts: dict[str, list[float]] = {name: [] for name in repos}
            for i in range(args.runs):
                for name, repo in repos.items():
                    run_out = tmp / f"run{i}-{len(walls[name])}-{name.split()[0]}"
                    wall, first, proc = _cli([*score, "--out", str(run_out)], env, repo)
                    summary = json.loads((run_out / "summary.json").read_text())
                    walls[name].append(wall)
                    firsts[name].append(first)
                    seen = CORE_WORKER_LINE in proc.stderr + proc.stdout
                    print(
                        f"{name} run {i}: first rows {first:.2f} s after the launch (score()'s first block "
                        f"at {summary['first_row_seconds']:.2f} s), wall {wall:.2f} s, "
                        f"core_worker line printed: {seen}",
                        flush=True,
                    )
            p = subprocess.run(
                [sys.executable, __file__, "--phases", str(src), args.model, str(tmp / "phases")],
                env=env,
                capture_output=True,
                text=True,
            )
            if p.returncode != 0:
                raise SystemExit(p.stderr[-2000:])
            print("phases (one fresh process, seconds):")
            for name, s in json.loads(p.stdout.strip().splitlines()[-1]).items():
                print(f"  {s:6.2f}  {name}")
        for name in walls:
            print(
                f"cxr-ray score ({name}) with Ray running and the engine cached: wall median "
                f"{statistics.median(walls[name]):.2f} s, first rows median "
                f"{statistics.median(firsts[name]):.2f} s (target 4 s)"
            )


if __name__ == "__main__":
    main()
