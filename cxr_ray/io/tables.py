"""Delta Lake tables (delta-rs): create, insert-if-new with retries, query, time travel, upkeep.

Every write is one atomic Delta commit: readers see all of it or none of it, and a writer
killed before its commit leaves only unreferenced Parquet files (removed by ``vacuum``).
Writers race optimistically: delta-rs detects a commit that conflicts with one made since
the writer read the table (``CommitFailedError``) and ``insert_new`` re-runs its merge on the
new version, so concurrent writers never insert a key twice and never lose a committed row.

Object storage: delta-rs commits ``_delta_log/N.json`` with a put-if-absent request
(``If-None-Match: *``), which AWS S3 and S3-compatible servers that honour conditional writes
(SeaweedFS, MinIO, R2) make atomic; no locking service is needed. Credentials and the
endpoint come from the usual ``AWS_*`` variables (read by delta-rs itself) or from the
``storage_options`` given here. A store without conditional writes is not safe for
concurrent writers; see https://delta-io.github.io/delta-rs/usage/writing/writing-to-s3-with-locking-provider/

Reads go through DataFusion (``deltalake.QueryBuilder``): it prunes by partition values,
the per-file statistics of the Delta log, Parquet row-group/page statistics and bloom
filters. (``DeltaTable.to_pyarrow_dataset`` is avoided: with pyarrow 26 its Python file
system aborts some interpreters at exit.)
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import pyarrow as pa
from deltalake import (
    BloomFilterProperties,
    ColumnProperties,
    CommitProperties,
    DeltaTable,
    QueryBuilder,
    WriterProperties,
)
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from cxr_ray.errors import DataError
from cxr_ray.io import columns, uris

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Commit attempts before giving up on a table that keeps changing under the writer.
COMMIT_ATTEMPTS = 12

StorageOptions = Mapping[str, str] | None


def table_uri(uri: str) -> str:
    """The URI delta-rs expects: local paths made absolute, ``s3://`` kept."""
    if uris.is_remote(uri):
        return uri
    return uris.resolve(uri)[1]


def _opts(storage_options: StorageOptions) -> dict[str, str] | None:
    return dict(storage_options) if storage_options else None


def is_table(uri: str, storage_options: StorageOptions = None) -> bool:
    return DeltaTable.is_deltatable(table_uri(uri), storage_options=_opts(storage_options))


def open_table(
    uri: str,
    *,
    version: int | None = None,
    as_of: datetime | str | None = None,
    storage_options: StorageOptions = None,
) -> DeltaTable:
    """The table at ``uri``: the latest version, version ``version``, or as it was at ``as_of``.

    ``as_of`` is a datetime or an ISO-8601 / RFC 3339 timestamp (``2025-06-01T02:00:00Z``): the
    last version committed at or before it.
    """
    if version is not None and as_of is not None:
        raise DataError("give a version or a timestamp to read, not both")
    try:
        dt = DeltaTable(table_uri(uri), version=version, storage_options=_opts(storage_options))
    except TableNotFoundError:
        raise DataError(f"{uri} is not a Delta table (no _delta_log there)") from None
    except DeltaError as exc:
        raise DataError(f"cannot read Delta table {uri} at version {version}: {exc}") from None
    if as_of is not None:
        try:
            dt.load_as_version(as_of)
        except (DeltaError, ValueError) as exc:
            raise DataError(f"table {uri} has no version at or before {as_of}: {exc}") from None
    return dt


def ensure_table(
    uri: str,
    schema: pa.Schema,
    *,
    partition_by: list[str] | None = None,
    description: str | None = None,
    configuration: Mapping[str, str | None] | None = None,
    storage_options: StorageOptions = None,
) -> DeltaTable:
    """Open the table at ``uri``, creating it (empty, with ``schema``) if it does not exist.

    Two processes creating it at once is safe: the loser of the race for version 0 opens
    the winner's table.
    """
    turi = table_uri(uri)
    opts = _opts(storage_options)
    for attempt in range(COMMIT_ATTEMPTS):
        if DeltaTable.is_deltatable(turi, storage_options=opts):
            return DeltaTable(turi, storage_options=opts)
        try:
            if not uris.is_remote(uri):
                uris.resolve(uri)[0].create_dir(turi, recursive=True)
            return DeltaTable.create(
                turi,
                schema,
                mode="error",
                partition_by=partition_by,
                description=description,
                # The schema's cxr_ray.table / cxr_ray.schema_version (Delta keeps no schema-level
                # Arrow metadata; field descriptions it keeps in its own schema).
                configuration=columns.table_properties(schema) | dict(configuration or {}),
                raise_if_key_not_exists=False,
                storage_options=opts,
            )
        except (CommitFailedError, DeltaError) as exc:
            if DeltaTable.is_deltatable(turi, storage_options=opts):
                continue  # another writer created it first
            if attempt == COMMIT_ATTEMPTS - 1:
                raise DataError(f"cannot create Delta table {uri}: {exc}") from None
            backoff(attempt)
    raise DataError(f"cannot create Delta table {uri}")  # pragma: no cover


def writer_properties(
    bloom_columns: Iterable[str] = (), row_group_rows: int | None = None
) -> WriterProperties:
    """Parquet settings: zstd, and bloom filters on the key columns for point lookups."""
    bloom = {
        c: ColumnProperties(
            bloom_filter_properties=BloomFilterProperties(set_bloom_filter_enabled=True, fpp=0.01)
        )
        for c in bloom_columns
    }
    return WriterProperties(
        compression="ZSTD", column_properties=bloom or None, max_row_group_size=row_group_rows
    )


def backoff(attempt: int) -> None:
    # Jittered so that writers that collided once do not collide again in lockstep.
    time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))


def with_commit_retries(fn: Callable[[], T], *, what: str, attempts: int = COMMIT_ATTEMPTS) -> T:
    """Run ``fn`` (which reads the latest table version and commits) until its commit lands."""
    for attempt in range(attempts):
        try:
            return fn()
        except CommitFailedError as exc:
            if attempt == attempts - 1:
                raise DataError(f"{what}: gave up after {attempts} conflicting commits ({exc})") from None
            logger.info("%s: concurrent commit, retrying (%d)", what, attempt + 1)
            backoff(attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def insert_new(
    uri: str,
    rows: pa.Table | pa.RecordBatchReader | Callable[[], pa.Table | pa.RecordBatchReader],
    *,
    keys: list[str],
    partition_keys: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    bloom_columns: Iterable[str] = (),
    storage_options: StorageOptions = None,
) -> int:
    """Insert the rows of ``rows`` whose ``keys`` the table does not hold yet; returns how many.

    One merge (``WHEN NOT MATCHED THEN INSERT``) per attempt, retried on a conflicting commit
    against the new version, so a key committed by a concurrent writer is skipped, not
    duplicated. ``partition_keys`` (column -> the single value all ``rows`` have) narrows the
    part of the table the merge reads, and so what counts as a conflict. ``rows`` may be a
    callable returning a fresh stream for each attempt (a stream is consumed by a try).
    New nullable columns in ``rows`` are added to the table schema (old rows read null).
    """
    preds = [f"t.{c} = s.{c}" for c in keys]
    for col, value in (partition_keys or {}).items():
        preds.insert(0, f"t.{col} = {sql_literal(value)}")
    predicate = " AND ".join(preds)
    if not callable(rows) and isinstance(rows, pa.RecordBatchReader):
        raise TypeError("pass a callable for a stream: a retry needs the rows again")
    props = CommitProperties(custom_metadata=dict(metadata or {}))
    wp = writer_properties(bloom_columns)

    def attempt() -> int:
        dt = DeltaTable(table_uri(uri), storage_options=_opts(storage_options))
        source = rows() if callable(rows) else rows
        out = (
            dt.merge(
                source,
                predicate=predicate,
                source_alias="s",
                target_alias="t",
                merge_schema=True,
                writer_properties=wp,
                commit_properties=props,
            )
            .when_not_matched_insert_all()
            .execute()
        )
        return int(out.get("num_target_rows_inserted", 0))

    return with_commit_retries(attempt, what=f"inserting into {uri}")


def append_if_unchanged(
    dt: DeltaTable,
    rows: pa.RecordBatchReader,
    *,
    metadata: Mapping[str, Any] | None = None,
    bloom_columns: Iterable[str] = (),
) -> int:
    """Append ``rows`` in one commit only if the table is still at ``dt``'s version.

    A compare-and-swap on the Delta log: the commit is written as version ``dt.version() + 1``
    with put-if-absent and no automatic rebase, so it fails (``CommitFailedError``) when
    anyone committed since ``dt`` was read; the caller re-checks and retries. Returns the
    committed version. New nullable columns in ``rows`` are added to the schema.
    """
    from deltalake import write_deltalake

    base = dt.version()
    write_deltalake(
        dt,
        rows,
        mode="append",
        schema_mode="merge",
        writer_properties=writer_properties(bloom_columns),
        commit_properties=CommitProperties(custom_metadata=dict(metadata or {}), max_commit_retries=0),
    )
    return base + 1


def append(
    uri: str,
    rows: pa.Table,
    *,
    metadata: Mapping[str, Any] | None = None,
    storage_options: StorageOptions = None,
) -> None:
    """Append ``rows`` in one commit (a blind append never conflicts; new columns are added)."""
    from deltalake import write_deltalake

    write_deltalake(
        table_uri(uri),
        rows,
        mode="append",
        schema_mode="merge",
        storage_options=_opts(storage_options),
        commit_properties=CommitProperties(custom_metadata=dict(metadata or {})),
    )


_SAFE_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def sql_literal(value: str) -> str:
    """A SQL string literal (quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def query(
    sql: str, tables: Mapping[str, DeltaTable], session_config: dict[str, str] | None = None
) -> pa.Table:
    """Run DataFusion SQL over the given tables (each registered under its name)."""
    qb = QueryBuilder(session_config)
    for name, dt in tables.items():
        if not _SAFE_IDENT.match(name):
            raise ValueError(f"bad table name {name!r}")
        qb.register(name, dt)
    # deltalake returns an arro3 stream; pyarrow reads it through the Arrow C stream interface.
    return pa.RecordBatchReader.from_stream(qb.execute(sql)).read_all()


def read(
    dt: DeltaTable,
    *,
    where: str | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """The rows of ``dt`` (at the version it was opened at) matching a SQL ``where``."""
    cols = ", ".join(f'"{c}"' for c in columns) if columns else "*"
    sql = f"SELECT {cols} FROM t" + (f" WHERE {where}" if where else "")
    t = query(sql, {"t": dt})
    # DataFusion hands back string_view/binary_view; give readers the table's own types.
    schema = arrow_schema(dt)
    return t.cast(pa.schema([schema.field(n) for n in t.column_names]))


def arrow_schema(dt: DeltaTable) -> pa.Schema:
    """The table's schema as a pyarrow schema."""
    return pa.schema(dt.schema().to_arrow())


def history(
    uri: str, *, limit: int | None = None, storage_options: StorageOptions = None
) -> list[dict[str, Any]]:
    """Commit history, newest first: version, timestamp, operation, and our commit metadata."""
    return open_table(uri, storage_options=storage_options).history(limit)


def optimize(
    uri: str,
    *,
    zorder_by: list[str] | None = None,
    bloom_columns: Iterable[str] = (),
    storage_options: StorageOptions = None,
) -> dict[str, Any]:
    """Compact small files (and cluster by ``zorder_by``): one commit, readers unaffected.

    Never run implicitly; the replaced files stay until ``vacuum`` removes them, so time
    travel to older versions keeps working until then.
    """
    dt = open_table(uri, storage_options=storage_options)
    wp = writer_properties(bloom_columns, row_group_rows=64 * 1024)

    def run() -> dict[str, Any]:
        dt.update_incremental()
        if zorder_by:
            return dt.optimize.z_order(zorder_by, writer_properties=wp)
        return dt.optimize.compact(writer_properties=wp)

    return with_commit_retries(run, what=f"optimizing {uri}")


def vacuum(
    uri: str,
    *,
    retention_hours: int = 7 * 24,
    dry_run: bool = True,
    storage_options: StorageOptions = None,
) -> list[str]:
    """Files no version newer than ``retention_hours`` needs (deleted unless ``dry_run``).

    delta-rs's *full* mode: besides the files removed by commits (compaction, overwrites),
    every data file the log does not reference at all, i.e. the files of writers killed
    before their commit and of compare-and-swap attempts that lost their race, once older
    than the retention (a writer still running has younger files, which stay). After a
    vacuum, time travel to versions older than the retention fails.
    """
    dt = open_table(uri, storage_options=storage_options)
    return dt.vacuum(
        retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False, full=True
    )
