"""Nightly runs into Delta tables: exactly-once under overlap and kills, time travel, schema evolution."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cxr_ray.config import load_settings
from cxr_ray.data.synthetic import jpeg_bytes, kermany_name
from cxr_ray.io import tables
from cxr_ray.io.lease import Lease
from cxr_ray.scoring import ledger
from cxr_ray.scoring.schema import PREDICTIONS_SCHEMA

pytest_plugins = ["tests.s3_server"]  # the s3_server fixture (SeaweedFS)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}


def _add_images(root: Path, start: int, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        label = ("normal", "bacterial", "viral")[i % 3]
        (root / kermany_name(label, i)).write_bytes(jpeg_bytes(120, 100, seed=2000 + i, label=label))
    return root


def _settings():
    return load_settings(None, {"data": {"rows_per_block": 6}, "score": {"batch_size": 8}})


def _keys(root: Path) -> list[tuple[str, str]]:
    t = tables.read(
        tables.open_table(str(root / "predictions")), columns=["image_id", "uri", "model_version"]
    )
    return [
        (i if i is not None else "uri:" + u, v)
        for i, u, v in zip(
            t["image_id"].to_pylist(), t["uri"].to_pylist(), t["model_version"].to_pylist(), strict=True
        )
    ]


def test_nightly_scores_only_new_images_once(ray_local, tiny_artifact, tmp_path):
    from cxr_ray.scoring.nightly import format_nightly, run_nightly

    src, root = _add_images(tmp_path / "archive", 0, 12), tmp_path / "nightly"
    (src / "broken.jpeg").write_bytes(b"\xff\xd8\xff" + bytes(20))
    (src / "again.jpeg").write_bytes((src / kermany_name("normal", 0)).read_bytes())  # same bytes, same id
    first = run_nightly(str(src), str(tiny_artifact), str(root), _settings())
    assert (first.new_images, first.added_rows, first.duplicates) == (14, 13, 1)
    _add_images(src, 12, 5)
    second = run_nightly(str(src), str(tiny_artifact), str(root), _settings())
    assert (second.new_images, second.added_rows, second.already_scored) == (5, 5, 14)
    # Every image already recorded (today's 'array_take has no kernel' crash): adds nothing, cleanly.
    third = run_nightly(str(src), str(tiny_artifact), str(root), _settings())
    assert (third.new_images, third.added_rows, third.already_scored) == (0, 0, 19)
    keys = _keys(root)
    assert len(keys) == 18 and len(set(keys)) == 18
    summary = format_nightly(second)
    assert "person" not in summary and "IM-" not in summary  # no patient ids / file names
    assert "5 new images scored, 14 already scored, 5 rows added" in summary
    # The staged copy is gone once committed; the run folder keeps its summary.
    assert not (root / "runs" / second.run_id / "predictions.parquet").exists()
    assert (root / "runs" / second.run_id / "summary.json").exists()
    hist = tables.read(tables.open_table(str(root / "metrics_history")))
    assert set(hist["run_id"].to_pylist()) == {first.run_id, second.run_id}

    # Time travel: version 1 is the first night, with its 13 rows.
    out = tmp_path / "v1.parquet"
    r = CliRunner().invoke(_cli(), ["history", str(root), "--version", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).num_rows == 13 and "13 rows of predictions at version 1" in r.output
    r = CliRunner().invoke(_cli(), ["history", str(root)])
    assert r.exit_code == 0 and f"run {second.run_id}" in r.output and "+5 rows" in r.output
    r = CliRunner().invoke(_cli(), ["history", str(root), "--version", "99", "--out", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output


def _cli():
    from cxr_ray.cli import main
    from cxr_ray.cli import tables as _  # noqa: F401  (registers history/tables until the lead wires it)

    return main


def _rows(ids: list[str], version: str = "m1", run: str = "r", extra: dict | None = None) -> pa.Table:
    n = len(ids)
    cols = {f.name: pa.nulls(n, f.type) for f in PREDICTIONS_SCHEMA}
    cols |= {
        "image_id": pa.array(ids, pa.string()),
        "uri": pa.array([f"/x/{i}.jpeg" for i in ids]),
        "model_version": pa.array([version] * n),
        "engine": pa.array(["onnxruntime"] * n),
        "run_id": pa.array([run] * n),
        "scored_at": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
        "status": pa.array(["ok"] * n),
    }
    t = pa.table(cols).cast(PREDICTIONS_SCHEMA)
    for name, values in (extra or {}).items():
        t = t.append_column(pa.field(name, pa.string()), pa.array(values, pa.string()))
    return t


def _commit(root: str, t: pa.Table) -> ledger.Commit:
    ledger.ensure_predictions(root)
    return ledger.commit_new(
        ledger.table(root, ledger.PREDICTIONS), lambda: iter([t]), model_version=t["model_version"][0].as_py()
    )


def test_commit_adds_only_new_keys_and_tolerates_all_known(tmp_path):
    root = str(tmp_path)
    assert _commit(root, _rows(["a", "b", "b"])).added == 2  # repeated within a run: once
    c = _commit(root, _rows(["a", "b"]))
    assert (c.added, c.duplicates) == (0, 2)
    assert _commit(root, _rows(["a", "c"], version="m2")).added == 2  # keys are per model version
    assert sorted(_keys(tmp_path)) == [("a", "m1"), ("a", "m2"), ("b", "m1"), ("c", "m2")]


def test_a_column_added_later_keeps_old_rows_readable(tmp_path):
    root = str(tmp_path)
    _commit(root, _rows(["a", "b"]))
    _commit(root, _rows(["c"], extra={"site_code": ["north"]}))
    dt = tables.open_table(ledger.table(root, ledger.PREDICTIONS))
    t = tables.read(dt).sort_by("image_id")
    assert t["site_code"].to_pylist() == [None, None, "north"]
    assert t["image_id"].to_pylist() == ["a", "b", "c"]
    old = tables.read(tables.open_table(ledger.table(root, ledger.PREDICTIONS), version=1))
    assert "site_code" not in old.column_names and old.num_rows == 2
    # Later runs without the column still commit (null there).
    assert _commit(root, _rows(["d"])).added == 1


_COMMITTER = """
import sys, time, pyarrow as pa
sys.path.insert(0, {repo!r})
from tests.test_nightly import _rows, _commit
root, me, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ids = [f"shared{{i}}" for i in range(40)] + [f"own{{me}}-{{i}}" for i in range(10)]
time.sleep(max(0, start - time.time()))
c = _commit(root, _rows(ids, run=str(me)))
print(c.added, c.attempts)
"""


@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_commits_record_each_key_once(tmp_path, writers):
    """Writers racing on one table (no lease): nothing twice, nothing lost."""
    root = str(tmp_path / "root")
    ledger.ensure_predictions(root)
    script = tmp_path / "committer.py"
    script.write_text(_COMMITTER.format(repo=str(REPO)))
    start = time.time() + 3
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), root, str(k), str(start)], stdout=subprocess.PIPE, text=True
        )
        for k in range(writers)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    added = [int(o.split()[0]) for o in outs]
    keys = _keys(tmp_path / "root")
    assert len(keys) == len(set(keys)) == 40 + 10 * writers  # 0 duplicated, 0 lost
    assert sum(added) == len(keys)


def test_lease_excludes_a_second_holder_until_it_expires(tmp_path):
    uri = str(tmp_path / "leases")
    a = Lease(uri, "nightly/m1", ttl_s=2.0, run_id="a")
    b = Lease(uri, "nightly/m1", ttl_s=2.0, run_id="b")
    other = Lease(uri, "nightly/m2", ttl_s=2.0)
    assert a.try_acquire()
    assert not b.try_acquire() and b.current().run_id == "a"
    assert other.try_acquire()  # scopes are independent
    with a.keep_alive():
        time.sleep(3.0)  # renewed past its first expiry
        assert not b.try_acquire()
    # 'a' stops renewing (as if killed): b takes over after the TTL.
    assert b.acquire(wait_s=10, poll_s=0.2)
    assert b.current().run_id == "b"
    a.held = True
    assert not a.renew() and a.lost
    b.release()
    assert b.current() is None


def _nightly_procs(n, src, artifact, root, *extra, stagger=0.0):
    start = time.time() + 8  # after every process has started its Ray
    return [
        subprocess.Popen(
            [sys.executable, "-m", "tests.scenarios.nightly_process", str(src), str(artifact), str(root),
             "--start-at", str(start + k * stagger), *extra],
            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        for k in range(n)
    ]  # fmt: skip


def _results(procs) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stdout
        out.append(
            json.loads(next(ln for ln in stdout.splitlines() if ln.startswith('{"nightly"')))["nightly"]
        )
    return out


@pytest.mark.slow  # 2-4 nightly driver processes, each with its own Ray (~45 s and more)
@pytest.mark.parametrize(("processes", "lease"), [(2, True), (4, False)])
def test_overlapping_nightly_processes(tiny_artifact, tmp_path, processes, lease):
    """2 (with the lease) and 4 (lease off: a real race) nightly drivers on one root, then a third run."""
    src, root = _add_images(tmp_path / "archive", 0, 16), tmp_path / "nightly"
    extra = () if lease else ("--no-lease",)
    results = _results(_nightly_procs(processes, src, tiny_artifact, root, *extra))
    keys = _keys(root)
    assert len(keys) == len(set(keys)) == 16  # 0 duplicated, 0 lost
    assert sum(r["added_rows"] for r in results) == 16
    if lease:  # the second waited for the first, then found nothing new
        assert sorted(r["new_images"] for r in results) == [0, 16]
    (after,) = _results(_nightly_procs(1, src, tiny_artifact, root, *extra))
    assert after["added_rows"] == 0 and after["already_scored"] == 16


@pytest.mark.slow
def test_sigkilled_nightly_drivers_leave_the_tables_right(tiny_artifact, tmp_path):
    """20 drivers SIGKILLed at random moments: the tables stay exactly-once; the next run completes them."""
    src, root = _add_images(tmp_path / "archive", 0, 10), tmp_path / "nightly"
    rng = random.Random(14)
    committed = 0
    for trial in range(20):
        if trial % 5 == 4:  # now and then a new image arrives between runs
            _add_images(src, 100 + trial, 1)
        (p,) = _nightly_procs(1, src, tiny_artifact, root, "--ttl", "2")
        time.sleep(rng.uniform(2, 30))  # Ray start, waiting for start-at, scoring, committing
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
        if (root / "predictions" / "_delta_log").exists():
            keys = _keys(root)
            assert len(keys) == len(set(keys)), f"trial {trial}: a key twice"
            assert len(keys) >= committed, f"trial {trial}: committed rows lost"
            committed = len(keys)
    (done,) = _results(_nightly_procs(1, src, tiny_artifact, root, "--ttl", "2"))
    keys = _keys(root)
    assert len(keys) == len(set(keys)) == 14
    assert done["added_rows"] == 14 - committed
    (again,) = _results(_nightly_procs(1, src, tiny_artifact, root, "--ttl", "2"))
    assert again["added_rows"] == 0


def test_optimize_and_vacuum_are_explicit_and_keep_rows(tmp_path):
    root = str(tmp_path)
    for k in range(3):
        _commit(root, _rows([f"id{k}-{i}" for i in range(5)]))
    files_before = len(tables.open_table(ledger.table(root, ledger.PREDICTIONS)).file_uris())
    assert files_before == 3
    r = CliRunner().invoke(_cli(), ["tables", "optimize", root])
    assert r.exit_code == 0, r.output
    dt = tables.open_table(ledger.table(root, ledger.PREDICTIONS))
    assert len(dt.file_uris()) == 1 and tables.read(dt).num_rows == 15
    r = CliRunner().invoke(_cli(), ["tables", "vacuum", root, "--retention-hours", "0"])
    assert r.exit_code == 0 and "would delete (pass --yes) 3 files" in r.output, r.output
    r = CliRunner().invoke(_cli(), ["tables", "vacuum", root, "--retention-hours", "0", "--yes"])
    assert r.exit_code == 0 and "deleted 3 files" in r.output, r.output
    assert tables.read(tables.open_table(ledger.table(root, ledger.PREDICTIONS))).num_rows == 15


# -- s3:// roots on a real S3 server (SeaweedFS on loopback) ------------------------------


def test_s3_commits_are_compare_and_swap(s3_server, monkeypatch):
    """The S3 server honours put-if-absent: a commit on a stale version is refused, not lost."""
    from deltalake import CommitProperties, DeltaTable, write_deltalake
    from deltalake.exceptions import CommitFailedError

    so, uri = s3_server.storage_options, s3_server.uri("cas")
    write_deltalake(uri, pa.table({"a": [1]}), storage_options=so)
    stale, fresh = DeltaTable(uri, storage_options=so), DeltaTable(uri, storage_options=so)
    once = CommitProperties(max_commit_retries=0)
    write_deltalake(fresh, pa.table({"a": [2]}), mode="append", commit_properties=once)
    with pytest.raises(CommitFailedError):
        write_deltalake(stale, pa.table({"a": [3]}), mode="append", commit_properties=once)
    assert sorted(tables.read(tables.open_table(uri, storage_options=so))["a"].to_pylist()) == [1, 2]


@pytest.mark.parametrize("writers", [2, 4])
def test_s3_concurrent_commits_record_each_key_once(s3_server, tmp_path, monkeypatch, writers):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    root = s3_server.uri(f"race{writers}-{time.time_ns()}")
    ledger.ensure_predictions(root)
    script = tmp_path / "committer.py"
    script.write_text(_COMMITTER.format(repo=str(REPO)))
    start = time.time() + 3
    env = ENV | s3_server.env
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), root, str(k), str(start)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for k in range(writers)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    t = tables.read(tables.open_table(ledger.table(root, ledger.PREDICTIONS)), columns=["image_id"])
    ids = t["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 40 + 10 * writers


def test_nightly_run_on_an_s3_root(ray_local, tiny_artifact, tmp_path, s3_server, monkeypatch):
    """One scoring run into s3:// (tables, lease, run folder), then a second that adds nothing."""
    from cxr_ray.scoring.nightly import NightlyOptions, run_nightly

    for k, v in s3_server.env.items():  # the driver's pyarrow S3 filesystem (run folder)
        monkeypatch.setenv(k, v)
    src, root = _add_images(tmp_path / "archive", 0, 9), s3_server.uri(f"nightly-{time.time_ns()}")
    opts = NightlyOptions(storage_options=s3_server.storage_options)  # what the Ray workers use
    first = run_nightly(str(src), str(tiny_artifact), root, _settings(), options=opts)
    assert first.added_rows == 9
    again = run_nightly(str(src), str(tiny_artifact), root, _settings(), options=opts)
    assert (again.added_rows, again.already_scored) == (0, 9)
    t = tables.read(tables.open_table(ledger.table(root, ledger.PREDICTIONS)), columns=["image_id"])
    assert t.num_rows == len(set(t["image_id"].to_pylist())) == 9


# -- issue 24, defect 11: side tables derived from the committed predictions, exactly once --


def _side(root: Path, name: str) -> pa.Table:
    return tables.read(tables.open_table(str(root / name)))


def test_a_run_killed_after_its_commit_gets_its_side_tables_from_the_next(tiny_artifact, tmp_path, ray_local):
    from cxr_ray.scoring.nightly import run_nightly
    from tests import scenarios

    src, root = _add_images(tmp_path / "archive", 0, 12), tmp_path / "nightly"
    proc = scenarios.run("killed_after_commit", src, tiny_artifact, root, start_new_session=True)
    assert proc.returncode != 0
    killed = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("{")))
    assert killed["added"] == 12
    assert len(_keys(root)) == 12  # the commit landed
    assert not (root / ledger.STUDIES).exists() or killed["run_id"] not in set(
        _side(root, ledger.STUDIES)["run_id"].to_pylist()
    )
    time.sleep(3.5)  # the killed run's lease expires
    again = run_nightly(str(src), str(tiny_artifact), str(root), _settings())
    assert again.added_rows == 0 and again.already_scored == 12
    studies = _side(root, ledger.STUDIES)
    assert set(studies["run_id"].to_pylist()) == {killed["run_id"]}
    assert sum(studies["images"].to_pylist()) == 12  # every committed image in one study row
    keys = list(zip(studies["run_id"].to_pylist(), studies["study_key"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys))
    metrics = _side(root, ledger.METRICS_HISTORY)
    assert set(metrics["run_id"].to_pylist()) == {killed["run_id"]}
    assert set(metrics["n"].to_pylist()) == {12}
    # Derived once: a third run adds nothing anywhere.
    run_nightly(str(src), str(tiny_artifact), str(root), _settings())
    assert _side(root, ledger.STUDIES).num_rows == studies.num_rows
    assert _side(root, ledger.METRICS_HISTORY).num_rows == metrics.num_rows


def test_two_runs_committing_the_same_study_do_not_duplicate_it(tmp_path):
    """Run B scored images run A committed first (overlap): B's commit adds only its new
    image, and the studies table holds each study once, as the run that committed it."""
    from datetime import UTC, datetime

    from cxr_ray.scoring import side_tables

    root = tmp_path / "root"
    ledger.ensure_predictions(str(root))

    def rows(run_id: str, ids: list[int]) -> pa.Table:
        n = len(ids)
        return pa.table(
            {
                "image_id": [f"img{i}" for i in ids],
                "uri": [f"/a/{i}.dcm" for i in ids],
                "status": ["ok"] * n,
                "model_version": ["m1"] * n,
                "run_id": [run_id] * n,
                "study_instance_uid": [f"1.2.{i // 2}" for i in ids],  # two images per study
                "label": ["normal"] * n,
                "prob_normal": [0.9] * n,
                "prob_bacterial": [0.05] * n,
                "prob_viral": [0.05] * n,
                "prob_pneumonia": [0.1] * n,
                "pred_label": ["normal"] * n,
                "flagged": [False] * n,
                "engine": ["onnxruntime"] * n,
                "scored_at": pa.array([datetime.now(UTC)] * n, pa.timestamp("us", tz="UTC")),
            }
        )

    def commit(t: pa.Table) -> ledger.Commit:
        return ledger.commit_new(
            ledger.table(str(root), ledger.PREDICTIONS), lambda: iter([t]), model_version="m1"
        )

    assert commit(rows("A", [0, 1, 2, 3])).added == 4  # studies 1.2.0 and 1.2.1
    b = commit(rows("B", [0, 1, 2, 3, 4]))  # B scored A's four too, plus img4 (study 1.2.2)
    assert (b.added, b.duplicates) == (1, 4)
    done = side_tables.complete_side_tables(str(root), "m1")
    assert done == ["A", "B"]
    studies = _side(root, ledger.STUDIES)
    by_run = sorted(zip(studies["run_id"].to_pylist(), studies["study_key"].to_pylist(), strict=True))
    assert by_run == [("A", "1.2.0"), ("A", "1.2.1"), ("B", "1.2.2")]
    assert sorted(studies["images"].to_pylist()) == [1, 2, 2]
    # Idempotent: again (or a concurrent deriver) adds nothing.
    assert side_tables.complete_side_tables(str(root), "m1") == []
    for run_id in ("A", "B"):
        assert side_tables.derive_run(str(root), "m1", run_id)["studies"] == 0
    assert _side(root, ledger.STUDIES).num_rows == 3
    assert set(_side(root, ledger.METRICS_HISTORY)["n"].to_pylist()) == {4, 1}


# -- issue 24, defect 3: the PACS window comes from the last commit's listing time ----------


@pytest.mark.parametrize(
    ("listed_at", "tz", "lookback", "first_day"),
    [
        # 01:30 UTC is the previous evening in New York: that local day, not the UTC one.
        ("2026-12-02T01:30:00+00:00", "America/New_York", 0, "20261201"),
        ("2026-12-02T01:30:00+00:00", "America/New_York", 2, "20261129"),
        # A run that listed at 23:59 local and committed after midnight: the listing's day.
        ("2026-12-01T22:59:00+00:00", "Europe/Berlin", 0, "20261201"),
        ("2026-12-02T10:00:00+00:00", "UTC", 2, "20261130"),
        ("2026-12-01T12:00:00+00:00", "Pacific/Kiritimati", 0, "20261202"),
    ],
)
def test_window_start_is_the_local_listing_day_minus_the_lookback(listed_at, tz, lookback, first_day):
    from datetime import datetime

    from cxr_ray.scoring.nightly import window_start

    assert f"{window_start(datetime.fromisoformat(listed_at), tz, lookback):%Y%m%d}" == first_day


def test_timezone_setting_is_validated():
    from cxr_ray.errors import ConfigError

    assert (
        load_settings(None, {"dicomweb": {"timezone": "America/Chicago"}}).dicomweb.timezone
        == "America/Chicago"
    )
    assert load_settings(None).dicomweb.lookback_days == 2
    with pytest.raises(ConfigError, match=r"dicomweb\.timezone"):
        load_settings(None, {"dicomweb": {"timezone": "Mars/Olympus_Mons"}})


def test_a_late_study_dated_the_previous_day_is_scored_by_the_next_run(ray_local, tiny_artifact, tmp_path):
    """Real Orthanc: run 1 lists and commits; then a study dated the day before arrives
    (a late arrival, or a run that crossed midnight); run 2 lists from the last commit's
    listing day minus the look-back and scores it. Today's window (the UTC date of the last
    scored_at) never lists it."""
    import datetime as dt

    from cxr_ray.scoring.nightly import format_nightly, last_listed_at, run_nightly
    from tests import dicom_factory as factory
    from tests.orthanc_server import find_binary, find_plugin, running

    if find_binary() is None or find_plugin() is None:
        pytest.skip(
            "Orthanc with the DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
        )
    today = dt.datetime.now(dt.UTC).date()
    yesterday = (today - dt.timedelta(days=1)).strftime("%Y%m%d")
    root = tmp_path / "nightly"
    settings = load_settings(
        None,
        {"data": {"rows_per_block": 4}, "score": {"batch_size": 4, "cache_dir": str(tmp_path / "cache")}},
    )
    with running(tmp_path / "orthanc") as pacs:
        factory.upload(factory.archive(2, series_per_study=1, study_dates=(today.strftime("%Y%m%d"),)), pacs)
        first = run_nightly(pacs.source, str(tiny_artifact), str(root), settings)
        assert first.added_rows == 2
        listed = last_listed_at(str(root), first.model_version)
        assert listed is not None and abs((dt.datetime.now(dt.UTC) - listed).total_seconds()) < 600
        late = factory.archive(1, series_per_study=1, study_dates=(yesterday,))
        factory.upload(late, pacs)
        second = run_nightly(pacs.source, str(tiny_artifact), str(root), settings)
    expected = (listed.date() - dt.timedelta(days=2)).strftime("%Y%m%d") + "-"
    assert second.extra["study_date"] == expected
    assert "listing" in format_nightly(second) and "UTC date, 2 day(s) back" in format_nightly(second)
    assert (second.added_rows, second.already_scored) == (1, 2)
    t = tables.read(tables.open_table(str(root / "predictions")), columns=["sop_instance_uid"])
    assert late[0].tags.sop_instance_uid in t["sop_instance_uid"].to_pylist()
