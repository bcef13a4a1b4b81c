"""Audit and upkeep of a nightly root's Delta tables: history, tables optimize / vacuum.

Nothing here runs implicitly: compaction and retention are explicit commands, for cron.
"""

from __future__ import annotations

from datetime import UTC, datetime

import click

from cxr_ray.cli._app import handle_errors, main
from cxr_ray.io import tables as delta
from cxr_ray.scoring import ledger

_TABLE = click.option(
    "--table",
    "name",
    type=click.Choice(ledger.TABLE_NAMES),
    default=ledger.PREDICTIONS,
    show_default=True,
    help="Which table of ROOT.",
)


@main.command()
@click.argument("root")
@click.option(
    "--as-of",
    default=None,
    help="Read the table as it was at this time (ISO 8601, e.g. 2025-06-01T02:00:00Z).",
)
@click.option("--version", "version", type=int, default=None, help="Read this table version instead.")
@click.option("--model-version", default=None, help="Only this model version's rows.")
@click.option(
    "--out", default=None, help="Export the rows to this Parquet (or .csv) file; without it, list commits."
)
@_TABLE
@handle_errors
def history(
    root: str, as_of: str | None, version: int | None, model_version: str | None, out: str | None, name: str
) -> None:
    """What a nightly ROOT's tables said at a point in time.

    \b
    cxr-ray history ROOT                                  # the latest commits (version, time, run)
    cxr-ray history ROOT --as-of 2025-06-01T02:00:00Z --out preds.parquet
    cxr-ray history ROOT --version 12 --model-version mobilenet_v2-1a2b3c --out preds.parquet
    """
    if out is None:
        if as_of or version is not None or model_version:
            raise click.UsageError("--as-of, --version and --model-version need --out FILE")
        for c in ledger.commits(root, name=name):
            when = datetime.fromtimestamp(c["timestamp"] / 1000, UTC).isoformat(timespec="seconds")
            rows = "" if c["rows_added"] is None else f" +{c['rows_added']} rows"
            run = f" run {c['run_id']}" if c["run_id"] else ""
            click.echo(f"v{c['version']}  {when}  {c['operation']}{rows}{run}")
        return
    e = ledger.export(root, out, name=name, version=version, as_of=as_of, model_version=model_version)
    click.echo(f"{e.rows} rows of {name} at version {e.version} -> {e.uri}")


@main.group("tables")
def tables_group() -> None:
    """Compaction (optimize) and retention (vacuum) of a nightly root's Delta tables."""


@tables_group.command()
@click.argument("root")
@_TABLE
@handle_errors
def optimize(root: str, name: str) -> None:
    """Compact small files; predictions are clustered by image_id (faster new-image checks).

    One commit; readers and time travel are unaffected (old files stay until vacuum).
    """
    zorder = ["image_id"] if name == ledger.PREDICTIONS else None
    bloom = ledger.BLOOM_COLUMNS if name == ledger.PREDICTIONS else ()
    r = delta.optimize(ledger.table(root, name), zorder_by=zorder, bloom_columns=bloom)
    click.echo(f"{name}: {r.get('numFilesRemoved', 0)} files compacted into {r.get('numFilesAdded', 0)}")


@tables_group.command()
@click.argument("root")
@_TABLE
@click.option(
    "--retention-hours",
    type=int,
    default=7 * 24,
    show_default=True,
    help="Keep what versions this recent need.",
)
@click.option("--yes", is_flag=True, help="Delete the files (default: only list how many would go).")
@handle_errors
def vacuum(root: str, name: str, retention_hours: int, yes: bool) -> None:
    """Delete files no version newer than the retention needs (time travel further back ends).

    Also removes the data files of writers killed before their commit and of lost
    compare-and-swap attempts (files no version references), once older than the retention.
    """
    files = delta.vacuum(ledger.table(root, name), retention_hours=retention_hours, dry_run=not yes)
    verb = "deleted" if yes else "would delete (pass --yes)"
    click.echo(f"{name}: {verb} {len(files)} files older than {retention_hours} h")
