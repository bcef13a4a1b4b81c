"""A nightly root's side tables, derived from the committed predictions, exactly once per run.

::

    done = complete_side_tables(root, model_version, frontal_views=("PA", "AP"))

ROOT/studies, ROOT/metrics_history and ROOT/drift_history hold rows of the runs that
committed predictions, derived from what each run *committed* (its rows of ROOT/predictions,
``run_id``), not from what it scored, so images another run committed first are never
counted twice:

- ``studies``: ``study_table`` over the run's committed rows; key (model_version, run_id,
  study_key_kind, study_key).
- ``metrics_history``: the classification metrics of the run's committed, labelled rows at
  the run's flag threshold (its ``summary.json``); key (model_version, run_id).
- ``drift_history``: the run's ``ROOT/runs/<run_id>/drift.parquet`` (the drift figures need
  the model's features, which the predictions table does not keep); key (model_version,
  run_id).

``complete_side_tables`` finds every committed run of the model version that has no studies
rows (studies are written last, so a run with studies rows has all three) and derives its
rows. Every insert is a keyed merge (``tables.insert_new``): a repeat, or two runs deriving
the same run at once, adds nothing twice. A nightly run calls it after taking its lease (a
run killed between its predictions commit and its side tables is completed by the next run)
and after its own commit: the one code path that writes the side tables.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import pyarrow as pa

from cxr_ray import metrics
from cxr_ray.io import storage, tables
from cxr_ray.scoring import ledger
from cxr_ray.scoring.drift_io import DRIFT_TABLE_SCHEMA as DRIFT_SCHEMA
from cxr_ray.scoring.evaluation import evaluate_table, run_threshold
from cxr_ray.scoring.studies import STUDIES_SCHEMA, STUDY_INPUT_COLUMNS, study_table

logger = logging.getLogger(__name__)

__all__ = ["committed_runs", "complete_side_tables", "derive_run"]

STUDY_KEYS = ["model_version", "run_id", "study_key_kind", "study_key"]
RUN_KEYS = ["model_version", "run_id"]


def _runs(uri: str, model_version: str, storage_options: tables.StorageOptions) -> set[str]:
    """The run ids the table at ``uri`` holds rows of for ``model_version``."""
    if not tables.is_table(uri, storage_options):
        return set()
    dt = tables.open_table(uri, storage_options=storage_options)
    t = tables.query(
        "SELECT DISTINCT run_id FROM t WHERE run_id IS NOT NULL AND "
        f"model_version = {tables.sql_literal(model_version)}",
        {"t": dt},
    )
    return {str(r) for r in t["run_id"].to_pylist()}


def committed_runs(root: str, model_version: str, storage_options: tables.StorageOptions = None) -> set[str]:
    """The runs that committed predictions rows of ``model_version`` under ``root``."""
    return _runs(ledger.table(root, ledger.PREDICTIONS), model_version, storage_options)


def complete_side_tables(
    root: str,
    model_version: str,
    *,
    frontal_views: Collection[str] = ("PA", "AP"),
    storage_options: tables.StorageOptions = None,
) -> list[str]:
    """Derive the side-table rows of every committed run that lacks them; the runs done."""
    missing = sorted(
        committed_runs(root, model_version, storage_options)
        - _runs(ledger.table(root, ledger.STUDIES), model_version, storage_options)
    )
    for run_id in missing:
        derive_run(root, model_version, run_id, frontal_views=frontal_views, storage_options=storage_options)
    if missing:
        logger.info("side tables: derived the rows of %d committed run(s)", len(missing))
    return missing


def _committed_rows(
    root: str, model_version: str, run_id: str, storage_options: tables.StorageOptions
) -> pa.Table:
    dt = tables.open_table(ledger.table(root, ledger.PREDICTIONS), storage_options=storage_options)
    have = set(tables.arrow_schema(dt).names)
    where = f"model_version = {tables.sql_literal(model_version)} AND run_id = {tables.sql_literal(run_id)}"
    return tables.read(dt, where=where, columns=[c for c in STUDY_INPUT_COLUMNS if c in have])


def derive_run(
    root: str,
    model_version: str,
    run_id: str,
    *,
    frontal_views: Collection[str] = ("PA", "AP"),
    storage_options: tables.StorageOptions = None,
) -> dict[str, int]:
    """Insert one committed run's drift, metrics and studies rows (each once); rows inserted."""
    so = storage_options
    rows = _committed_rows(root, model_version, run_id, so)
    run_dir = storage.join(root, ledger.RUNS, run_id)
    added = {"drift_history": 0, "metrics_history": 0, "studies": 0}
    drift_uri = storage.join(run_dir, "drift.parquet")
    if storage.exists(drift_uri):
        added["drift_history"] = _insert(
            root, ledger.DRIFT_HISTORY, storage.read_table(drift_uri).cast(DRIFT_SCHEMA), RUN_KEYS, so
        )
    m = evaluate_table(rows, run_threshold(storage.join(run_dir, "predictions.parquet")))
    if m is not None:
        mt = metrics.metrics_table(m, run_id=run_id, model_version=model_version)
        added["metrics_history"] = _insert(root, ledger.METRICS_HISTORY, mt, RUN_KEYS, so)
    studies = study_table(rows, frontal_views=frontal_views)
    added["studies"] = _insert(root, ledger.STUDIES, studies, STUDY_KEYS, so)  # last: the marker
    return added


_DESCRIPTIONS = {
    ledger.STUDIES: "cxr-ray studies per nightly run (derived from the committed predictions)",
    ledger.METRICS_HISTORY: "cxr-ray metrics per nightly run (derived from the committed predictions)",
    ledger.DRIFT_HISTORY: "cxr-ray drift checks per nightly run",
}
_SCHEMAS = {ledger.STUDIES: STUDIES_SCHEMA, ledger.METRICS_HISTORY: metrics.METRICS_SCHEMA}


def _insert(
    root: str, name: str, rows: pa.Table, keys: list[str], storage_options: Mapping[str, str] | None
) -> int:
    if rows.num_rows == 0:
        return 0
    uri = ledger.table(root, name)
    schema = _SCHEMAS.get(name, rows.schema)
    tables.ensure_table(uri, schema, description=_DESCRIPTIONS[name], storage_options=storage_options)
    return tables.insert_new(uri, rows.cast(schema), keys=keys, storage_options=storage_options)
