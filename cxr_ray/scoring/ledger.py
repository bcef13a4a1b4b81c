"""The nightly ledger: which images each model version has already scored.

One row per (image_id, model_version), appended only after a run's predictions are
committed, so the ledger is the commit point: an interrupted run leaves no ledger rows and
the next run scores those images again; a finished run's images are never scored twice.
Broken files are recorded too (their bytes hash to an id), so an unchanged broken file is
reported once, not every night; a fixed file has new bytes, a new id, and is scored.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.io import storage
from cxr_ray.scoring.schema import LEDGER_SCHEMA


def seen_ids(ledger: str, model_version: str) -> list[str]:
    """Image ids already scored by ``model_version``."""
    if not storage.exists(ledger):
        return []
    t = storage.read_table(ledger, columns=["image_id", "model_version"])
    return t.filter(pc.equal(t["model_version"], model_version))["image_id"].to_pylist()


def ledger_rows(predictions: pa.Table) -> pa.Table:
    """Ledger rows for a committed predictions table (rows without an image id are skipped)."""
    t = predictions.filter(pc.is_valid(predictions["image_id"]))
    return t.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA)


def append(ledger: str, rows: pa.Table) -> int:
    """Add ``rows`` not already present (by image_id + model_version); returns how many."""
    if rows.num_rows == 0:
        return 0
    if storage.exists(ledger):
        old = storage.read_table(ledger)
        have = {
            (i, v) for i, v in zip(old["image_id"].to_pylist(), old["model_version"].to_pylist(), strict=True)
        }
    else:
        have = set()
    keep, seen = [], set(have)
    for k, (i, v) in enumerate(
        zip(rows["image_id"].to_pylist(), rows["model_version"].to_pylist(), strict=True)
    ):
        if (i, v) not in seen:
            seen.add((i, v))
            keep.append(k)
    new = rows.take(keep)
    if new.num_rows:
        storage.append_table(new, ledger)
    return new.num_rows
