"""Issue 24 (adversarial review), operations side: vacuum of orphaned files, the lease that
stops a run when renewals keep failing, and the S3 conditional-put check of nightly runs."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
from click.testing import CliRunner
from deltalake import DeltaTable, write_deltalake

from cxr_ray.cli import main
from cxr_ray.io import tables
from tests import scenarios


def _parquet_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.parquet") if "_delta_log" not in p.parts}


def test_vacuum_removes_the_files_of_a_killed_writer(tmp_path):
    """Defect 9: a writer SIGKILLed mid-write leaves data files no version references;
    ``cxr-ray tables vacuum --yes`` (full mode) deletes them once older than the retention,
    and the committed rows stay."""
    root = tmp_path / "root"
    uri = root / "predictions"
    write_deltalake(str(uri), pa.table({"k": ["a", "b"], "v": [1, 2]}))
    referenced = {Path(u).name for u in DeltaTable(str(uri)).file_uris()}
    proc = scenarios.run("killed_writer", uri)
    assert proc.returncode == -9, proc.stderr[-2000:]
    orphans = {f for f in _parquet_files(uri) if Path(f).name not in referenced}
    assert len(orphans) >= 5  # the killed writer's data files are there

    # Within the retention, nothing goes: a live writer's uncommitted files look the same.
    young = tables.vacuum(str(uri), retention_hours=1, dry_run=False)
    assert young == [] and orphans <= _parquet_files(uri)

    listed = CliRunner().invoke(main, ["tables", "vacuum", str(root), "--retention-hours", "0"])
    assert listed.exit_code == 0, listed.output
    assert f"would delete (pass --yes) {len(orphans)} files" in listed.output
    assert orphans <= _parquet_files(uri)  # a dry run deletes nothing

    done = CliRunner().invoke(main, ["tables", "vacuum", str(root), "--retention-hours", "0", "--yes"])
    assert done.exit_code == 0, done.output
    assert f"deleted {len(orphans)} files" in done.output
    left = _parquet_files(uri)
    assert not (orphans & left)  # every orphan is gone
    assert {Path(f).name for f in left} == referenced
    t = tables.read(tables.open_table(str(uri)))
    assert sorted(t["k"].to_pylist()) == ["a", "b"]  # committed data intact


def test_vacuum_removes_the_files_of_an_aborted_compare_and_swap(tmp_path):
    """A commit attempt that lost its compare-and-swap leaves its data files behind too."""
    uri = str(tmp_path / "t")
    write_deltalake(uri, pa.table({"k": ["a"], "v": [1]}))
    stale = tables.open_table(uri)
    tables.append(uri, pa.table({"k": ["b"], "v": [2]}))  # someone else commits first
    from deltalake.exceptions import CommitFailedError

    schema = pa.schema([("k", pa.string()), ("v", pa.int64())])
    rows = pa.RecordBatchReader.from_batches(
        schema, pa.table({"k": ["c"], "v": [3]}, schema=schema).to_batches()
    )
    try:
        tables.append_if_unchanged(stale, rows)
        raise AssertionError("the stale commit must fail")
    except CommitFailedError:
        pass
    files_before = _parquet_files(Path(uri))
    assert len(files_before) == 3  # two committed files and the aborted attempt's
    removed = tables.vacuum(uri, retention_hours=0, dry_run=False)
    assert len(removed) == 1 and len(_parquet_files(Path(uri))) == 2
    assert sorted(tables.read(tables.open_table(uri))["k"].to_pylist()) == ["a", "b"]
    assert os.path.isdir(os.path.join(uri, "_delta_log"))


# -- the lease: lost when renewals keep failing, and the run stops before committing --------


def _break_store(uri: Path) -> None:
    """The lease table's store stops accepting anything: the folder replaced by a file."""
    import shutil

    shutil.move(uri, uri.with_name(uri.name + ".gone"))
    uri.write_text("not a Delta table")


def test_lease_is_lost_when_renewals_keep_failing(tmp_path):
    import time

    import pytest

    from cxr_ray.io.lease import Lease, LeaseLostError

    uri = tmp_path / "leases"
    lease = Lease(str(uri), "nightly/m", ttl_s=1.5)
    assert lease.acquire()
    with lease.keep_alive():
        time.sleep(0.8)  # a renewal lands
        lease.ensure_held()
        _break_store(uri)
        deadline = time.monotonic() + 6
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        lost_after = time.monotonic() - (deadline - 6)
    assert lease.lost and not lease.held and "renewals kept failing" in (lease.lost_reason or "")
    assert lost_after < 2.0  # before the lease's expiry, when another run may take it
    with pytest.raises(LeaseLostError, match="nothing of this run was recorded"):
        lease.ensure_held()


def test_lease_taken_over_after_expiry_is_lost(tmp_path):
    import time

    import pytest

    from cxr_ray.io.lease import Lease, LeaseLostError

    uri = str(tmp_path / "leases")
    stalled, other = Lease(uri, "nightly/m", ttl_s=1.0), Lease(uri, "nightly/m", ttl_s=30)
    assert stalled.acquire()
    time.sleep(1.2)  # a stalled holder: no renewal before the expiry
    with pytest.raises(LeaseLostError, match="expired"):
        stalled.ensure_held()
    assert other.acquire()
    assert not stalled.renew() and stalled.lost
    assert other.current() is not None and other.current().holder == other.holder


def test_nightly_run_that_loses_its_lease_commits_nothing(ray_local, tiny_artifact, tmp_path):
    import time

    import pytest

    from cxr_ray.config import load_settings
    from cxr_ray.data.synthetic import jpeg_bytes, kermany_name
    from cxr_ray.io.lease import LeaseLostError
    from cxr_ray.scoring import ledger
    from cxr_ray.scoring.nightly import NightlyOptions, run_nightly

    src, root = tmp_path / "archive", tmp_path / "nightly"
    src.mkdir()
    for i in range(12):
        (src / kermany_name("normal", i)).write_bytes(jpeg_bytes(120, 100, seed=3000 + i, label="normal"))
    settings = load_settings(None, {"data": {"rows_per_block": 4}, "score": {"batch_size": 4}})
    broken: list[float] = []

    def outage(_block: pa.Table) -> None:
        if not broken:
            _break_store(root / ledger.LEASES)
            broken.append(time.monotonic())
            time.sleep(2.5)  # renewals fail past the lease's expiry

    opts = NightlyOptions(lease_ttl_s=1.5)
    with pytest.raises(LeaseLostError, match="stopping before any commit"):
        run_nightly(str(src), str(tiny_artifact), str(root), settings, on_block=outage, options=opts)
    assert broken
    preds = tables.read(tables.open_table(str(root / ledger.PREDICTIONS)))
    assert preds.num_rows == 0  # nothing committed
    assert not (root / ledger.STUDIES).exists() and not (root / ledger.METRICS_HISTORY).exists()


# -- S3: nightly refuses a store that ignores conditional puts ---------------------------

pytest_plugins = ["tests.s3_server"]  # the s3_server fixture (SeaweedFS)


def test_seaweedfs_honours_conditional_puts(s3_server):
    from cxr_ray.io.conditional_puts import check_conditional_puts

    check_conditional_puts(s3_server.uri("probe-root"), storage_options=s3_server.storage_options)


def test_nightly_refuses_an_s3_store_that_ignores_conditional_puts(tmp_path, tiny_artifact, monkeypatch):
    """A store that accepts ``If-None-Match: *`` and overwrites anyway: one line, exit 2,
    nothing written but the (deleted) probe."""
    from tests.naive_s3_server import running

    with running() as naive:
        for k, v in naive.storage_options.items():
            monkeypatch.setenv(k, v)
        src = tmp_path / "in"
        src.mkdir()
        result = CliRunner().invoke(
            main, ["nightly", str(src), "--model", str(tiny_artifact), "--root", naive.uri("root")]
        )
        assert result.exit_code == 2, result.output
        errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "does not honour conditional puts" in errors[0], result.output
        assert "Traceback" not in result.output
        assert naive.store.conditional_puts >= 2  # the check really asked
        assert naive.store.objects == {}  # no table was created, the probe deleted
