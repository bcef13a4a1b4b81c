"""The nightly root: Delta Lake tables, and which images each model version has scored.

::

    ROOT/predictions/       Delta, partitioned by model_version: one row per
                            (image_id, model_version), PREDICTIONS_SCHEMA (+ columns added later)
    ROOT/metrics_history/   Delta: one row per run per metric (metrics.metrics_table)
    ROOT/studies/           Delta: one row per study per run that added images of it
                            (STUDIES_SCHEMA: the study as that run's committed images show it)
    ROOT/drift_history/     Delta: one row per drift figure per run
    ROOT/leases/            Delta: who is running on this root (``cxr_ray.io.lease``)
    ROOT/runs/<run_id>/     each run's summary.json, metrics.parquet, confusion.parquet

The predictions table is its own ledger: an image is "already scored" by a model version
when the table holds its ``(image_id, model_version)``. Unreadable files have no image id;
they are recorded once per ``(uri, model_version)`` (a fixed file has bytes, an id, and is
scored). Rows are only ever added by ``commit_new``: one atomic commit per run, made only if
the table did not change since the run checked which of its rows are new (else it checks
again and retries), so concurrent runs never record an image twice and never drop each
other's rows, and a run killed before its commit leaves nothing visible.

The side tables (studies, metrics_history, drift_history) are derived from the committed
rows, keyed and exactly once, by ``cxr_ray.scoring.side_tables``; nothing appends to them
blindly. Each nightly commit records ``cxr_ray.run_id``, ``cxr_ray.model_version`` and
``cxr_ray.listed_at`` (when the run began listing its source) in its commit metadata.

The "is it new?" check (``PredictionsSeen`` inside the decode tasks, and ``commit_new``) is a
DataFusion query ``model_version = V AND image_id IN (...)`` per block: partition pruning,
the Delta log's per-file min/max, Parquet page statistics and the bloom filters written on
``image_id`` skip almost everything, so its cost does not grow with the table (10M rows:
``benchmarks/nightly_ledger.py``). ``cxr-ray tables optimize ROOT`` (explicit, never
implicit) compacts the nightly files and clusters them by ``image_id``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from cxr_ray.errors import DataError
from cxr_ray.io import storage, tables
from cxr_ray.scoring.schema import PREDICTIONS_SCHEMA

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions"
METRICS_HISTORY = "metrics_history"
#: The per-study rows of each run (``cxr_ray.scoring.studies``).
STUDIES = "studies"
LEASES = "leases"
#: The drift figures of every nightly run (``nightly.append_drift``).
DRIFT_HISTORY = "drift_history"
#: ROOT/deliveries: every result delivery attempt (written by cxr_ray.writeback.deliver).
DELIVERIES = "deliveries"
RUNS = "runs"
PARTITION_BY = ["model_version"]
#: Ids per lookup query (an ``IN`` list); larger blocks are split.
QUERY_CHUNK = 1000
BLOOM_COLUMNS = ("image_id",)


def table(root: str, name: str) -> str:
    return storage.join(root, name)


def ensure_predictions(root: str, storage_options: tables.StorageOptions = None) -> DeltaTable:
    return tables.ensure_table(
        table(root, PREDICTIONS),
        PREDICTIONS_SCHEMA,
        partition_by=PARTITION_BY,
        description="cxr-ray predictions: one row per (image_id, model_version)",
        storage_options=storage_options,
    )


def _in_list(values: list[str]) -> str:
    return ",".join(tables.sql_literal(v) for v in values)


def _present(dt: DeltaTable, model_version: str, column: str, values: list[str], where: str = "") -> set[str]:
    """The ``values`` of ``column`` that ``dt`` (at its loaded version) holds for
    ``model_version`` (and ``where``), asked in ``IN`` lists of at most QUERY_CHUNK."""
    found: set[str] = set()
    uniq = sorted(set(values))
    for k in range(0, len(uniq), QUERY_CHUNK):
        chunk = uniq[k : k + QUERY_CHUNK]
        condition = (
            f"model_version = {tables.sql_literal(model_version)} {where} AND {column} IN ({_in_list(chunk)})"
        )
        found.update(tables.read(dt, columns=[column], where=condition)[column].to_pylist())
    return found


def present_ids(dt: DeltaTable, model_version: str, ids: list[str]) -> set[str]:
    """The ids of ``ids`` that ``dt`` (at its loaded version) holds for ``model_version``."""
    return _present(dt, model_version, "image_id", ids)


def present_unreadable(dt: DeltaTable, model_version: str, uris: list[str]) -> set[str]:
    """The uris of ``uris`` recorded for ``model_version`` as unreadable (no image id)."""
    return _present(dt, model_version, "uri", uris, "AND image_id IS NULL")


_CACHE: dict[tuple[str, tuple[tuple[str, str], ...]], DeltaTable] = {}


def _latest(uri: str, storage_options: tables.StorageOptions) -> DeltaTable | None:
    """The latest version of the table, cached per worker process (new commits read incrementally)."""
    key = (uri, tuple(sorted((storage_options or {}).items())))
    dt = _CACHE.get(key)
    if dt is None:
        if not tables.is_table(uri, storage_options):
            return None
        dt = _CACHE[key] = tables.open_table(uri, storage_options=storage_options)
    else:
        dt.update_incremental()
    return dt


@dataclass(frozen=True)
class PredictionsSeen:
    """The ``seen`` filter of a nightly run: asks ROOT/predictions, block by block.

    Picklable (a URI, a model version, storage options); each decode task queries the
    latest table version, so images committed by a concurrent run are skipped too. No
    process ever holds all the ids.
    """

    predictions_uri: str
    model_version: str
    storage_options: Mapping[str, str] | None = None

    def unseen(self, ids: list[str]) -> list[str]:
        if not ids:
            return []
        dt = _latest(self.predictions_uri, self.storage_options)
        if dt is None:
            return list(ids)
        have = present_ids(dt, self.model_version, ids)
        return [i for i in ids if i not in have]


@dataclass
class Commit:
    added: int = 0
    #: Rows left out: already in the table (a concurrent run, or an earlier run) or repeated.
    duplicates: int = 0
    version: int | None = None
    attempts: int = 0


def _new_rows_mask(dt: DeltaTable | None, batch: pa.Table, model_version: str, taken: set[str]) -> np.ndarray:
    """Rows of ``batch`` to insert: keys neither in ``dt`` nor earlier in this run (``taken``)."""
    ids = batch["image_id"].to_pylist()
    uris = batch["uri"].to_pylist()
    have_ids = present_ids(dt, model_version, [i for i in ids if i]) if dt is not None else set()
    null_uris = [u for i, u in zip(ids, uris, strict=True) if i is None]
    have_uris = present_unreadable(dt, model_version, null_uris) if dt is not None and null_uris else set()
    keep = np.zeros(batch.num_rows, dtype=bool)
    for k, (i, u) in enumerate(zip(ids, uris, strict=True)):
        key = i if i is not None else "uri:" + u
        if key in taken or (i is not None and i in have_ids) or (i is None and u in have_uris):
            continue
        taken.add(key)
        keep[k] = True
    return keep


def commit_new(
    predictions_uri: str,
    blocks: Callable[[], Iterator[pa.Table]],
    *,
    model_version: str,
    metadata: Mapping[str, Any] | None = None,
    storage_options: tables.StorageOptions = None,
) -> Commit:
    """Add the rows of ``blocks()`` whose key the table lacks, in one commit; retried on races.

    ``blocks`` returns a fresh iterator of predictions blocks (all of ``model_version``) on
    each call: the rows are streamed twice per attempt (check, then write), never held whole.
    The commit is made only on the exact table version that was checked (compare-and-swap
    on the Delta log); a commit by anyone else in between makes it check and try again.
    """
    result = Commit()

    def attempt() -> Commit:
        result.attempts += 1
        dt = tables.open_table(predictions_uri, storage_options=storage_options)
        taken: set[str] = set()
        masks: list[np.ndarray] = []
        total = 0
        for b in blocks():
            if b.num_rows and not pc.all(pc.equal(b["model_version"], model_version)).as_py():
                raise ValueError(f"commit_new got rows of another model version than {model_version!r}")
            masks.append(_new_rows_mask(dt, b, model_version, taken))
            total += b.num_rows
        added = int(sum(int(m.sum()) for m in masks))
        result.added, result.duplicates = added, total - added
        if added == 0:
            result.version = dt.version()
            return result

        def kept() -> Iterator[pa.RecordBatch]:
            for b, m in zip(blocks(), masks, strict=True):
                if m.any():
                    yield from b.filter(pa.array(m)).to_batches()

        schema = _first_schema(blocks) or PREDICTIONS_SCHEMA
        result.version = tables.append_if_unchanged(
            dt,
            pa.RecordBatchReader.from_batches(schema, kept()),
            metadata=metadata,
            bloom_columns=BLOOM_COLUMNS,
        )
        return result

    return tables.with_commit_retries(attempt, what=f"committing predictions to {predictions_uri}")


def _first_schema(blocks: Callable[[], Iterator[pa.Table]]) -> pa.Schema | None:
    for b in blocks():
        return b.schema
    return None


def staged_blocks(uri: str, rows_per_block: int = 65_536) -> Callable[[], Iterator[pa.Table]]:
    """Re-readable blocks of a staged predictions Parquet file (``score()``'s output)."""
    import pyarrow.parquet as pq

    from cxr_ray.io import uris

    def gen() -> Iterator[pa.Table]:
        fs, path = uris.resolve(uri)
        with pq.ParquetFile(fs.open_input_file(path)) as f:
            for batch in f.iter_batches(batch_size=rows_per_block):
                yield pa.Table.from_batches([batch])

    return gen


TABLE_NAMES = (PREDICTIONS, METRICS_HISTORY, STUDIES, DRIFT_HISTORY, DELIVERIES, LEASES)


@dataclass
class Export:
    uri: str
    version: int
    rows: int


def export(
    root: str,
    out: str,
    *,
    name: str = PREDICTIONS,
    version: int | None = None,
    as_of: str | None = None,
    model_version: str | None = None,
    storage_options: tables.StorageOptions = None,
) -> Export:
    """Write what ROOT/<name> held at ``version`` / ``as_of`` (default: now) to ``out``.

    ``out`` ending in ``.csv`` is written as CSV, anything else as Parquet (atomically).
    """
    if name not in TABLE_NAMES:
        raise DataError(f"unknown table {name!r}; choose one of {', '.join(TABLE_NAMES)}")
    dt = tables.open_table(table(root, name), version=version, as_of=as_of, storage_options=storage_options)
    where = None
    if model_version is not None:
        if "model_version" not in [f.name for f in dt.schema().fields]:
            raise DataError(f"table {name} has no model_version column")
        where = f"model_version = {tables.sql_literal(model_version)}"
    t = tables.read(dt, where=where)
    if out.endswith(".csv"):
        import pyarrow.csv as pacsv

        from cxr_ray.io import uris

        fs, path = uris.resolve(out)
        with fs.open_output_stream(path) as f:
            pacsv.write_csv(t, f)
    else:
        storage.write_table(t, out)
    return Export(out, dt.version(), t.num_rows)


def commits(
    root: str,
    *,
    name: str = PREDICTIONS,
    limit: int | None = 20,
    storage_options: tables.StorageOptions = None,
) -> list[dict[str, Any]]:
    """The newest commits of ROOT/<name>: version, timestamp, operation, run id, rows written."""
    rows = []
    for h in tables.history(table(root, name), limit=limit, storage_options=storage_options):
        metrics = h.get("operationMetrics") or {}
        rows.append(
            {
                "version": h.get("version"),
                "timestamp": h.get("timestamp"),
                "operation": h.get("operation"),
                "run_id": h.get("cxr_ray.run_id"),
                "rows_added": metrics.get("num_added_rows", metrics.get("num_target_rows_inserted")),
            }
        )
    return rows
