"""Real faults: a node dies while scoring, drivers are SIGKILLed mid-run; nothing lost or doubled.

Scenarios that start their own Ray clusters run in subprocesses (tests/scenarios/): a process
can only hold one Ray connection, and killing a driver must not take the test session down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxr_ray.config import load_settings
from cxr_ray.data.synthetic import jpeg_bytes, kermany_name
from tests import scenarios

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}


def _images(root: Path, n: int, broken: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = ("normal", "bacterial", "viral")[i % 3]
        (root / kermany_name(label, i)).write_bytes(jpeg_bytes(160, 140, seed=i, label=label))
    for i in range(broken):
        (root / f"broken{i}.jpeg").write_bytes(b"\xff\xd8\xff" + bytes(20))
    return root


@pytest.mark.slow
def test_worker_node_killed_while_scoring_loses_and_doubles_nothing(tiny_artifact, tmp_path):
    images = _images(tmp_path / "images", 240, broken=3)
    r = scenarios.report(scenarios.run("node_loss", images, tiny_artifact, tmp_path / "o"), '{"rows"')
    assert r["killed"], "no node was killed"
    assert r["blocks"] > 2  # the node died mid-stream, with blocks still to come
    assert r["rows"] == r["unique_uris"] == 243  # one row per input, none twice
    assert r["ok"] == 240


@pytest.mark.slow  # a SIGKILLed driver subprocess and a lease expiry (~45 s)
def test_killed_nightly_driver_is_finished_by_the_next_run(ray_local, tiny_artifact, tmp_path):
    from cxr_ray.scoring import ledger
    from cxr_ray.scoring.nightly import NightlyOptions, run_nightly

    source, root = _images(tmp_path / "archive", 30, broken=1), tmp_path / "nightly"
    proc = scenarios.run("interrupted_nightly", source, tiny_artifact, root, 5, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "killing the driver mid-run" in proc.stdout
    killed_run = next((root / "runs").iterdir())
    # Readers never see a partial table: the killed run committed nothing.
    assert not (killed_run / "summary.json").exists()
    table = ledger.table(str(root), ledger.PREDICTIONS)
    assert _rows(table) == 0

    # The next run waits out the dead run's lease (5 s TTL), then scores everything once.
    settings = load_settings(None, {"score": {"cache_dir": str(tmp_path / "cache")}})
    opts = NightlyOptions(lease_ttl_s=5)
    first = run_nightly(str(source), str(tiny_artifact), str(root), settings, options=opts)
    assert first.skipped_reason is None and first.added_rows == 31  # 30 images + 1 broken file
    again = run_nightly(str(source), str(tiny_artifact), str(root), settings, options=opts)
    assert again.added_rows == 0 and again.already_scored == 31  # the broken file by its uri
    assert _rows(table) == 31


def _rows(table: str) -> int:
    from cxr_ray.io import tables

    t = tables.query("SELECT count(*) AS n FROM t", {"t": tables.open_table(table)})
    return int(t["n"][0].as_py())


def _registered(storage: Path) -> int:
    for snap in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            return len(json.loads(snap.read_text())["checkpoint_results"])
        except (ValueError, KeyError):
            return 0
    return 0


@pytest.mark.slow
def test_killed_training_driver_resumes_with_the_same_run_name(ray_local, tmp_path):
    from cxr_ray.data.synthetic import write_kermany_folder
    from cxr_ray.training.trainer import train

    data = write_kermany_folder(tmp_path / "data", per_class=24, size=(96, 80))
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "cxr_ray", "train", str(data), "--out", str(tmp_path / "m1"),
           "--no-pretrained", "--input-size", "160", "--epochs", "3", "--batch-size", "8",
           "--storage-path", str(runs), "--run-name", "r"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while _registered(runs) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert _registered(runs) >= 1 and proc.poll() is None, "no checkpoint before the kill"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its whole local Ray
    proc.wait()
    settings = load_settings(None, {
        "model": {"pretrained": False, "input_size": 160},
        "train": {"epochs": 3, "batch_size": 8, "storage_path": str(runs), "run_name": "r"},
    })  # fmt: skip
    card = train(settings, str(data), str(tmp_path / "m2"))
    history = card.training["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["attempt_start_epoch"] >= 1
