"""The predictions table: one row per input image, explicit schema (documented in docs/OUTPUTS.md).

New columns are only ever added (nullable) at the end of a group, never renamed or retyped,
so tables written by older versions stay readable next to new ones.

``with_run_columns`` conforms a block of the Ray pipeline to this schema: the run columns
(model version, run id, time) added, columns a stage did not produce filled with nulls, and
the prediction columns null on rows that were not scored.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.imaging.dicom import DICOM_FIELDS
from cxr_ray.models.intended_use import INTENDED_USE_FIELDS

PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),  # sha256 of the file bytes; null if unreadable
        pa.field("uri", pa.string(), nullable=False),
        pa.field("patient_id", pa.string()),  # the PatientID tag, else parsed from the file name
        pa.field("label", pa.string()),  # ground truth when the source says it
        pa.field("pred_label", pa.string()),
        pa.field("prob_normal", pa.float32()),
        pa.field("prob_bacterial", pa.float32()),
        pa.field("prob_viral", pa.float32()),
        pa.field("prob_pneumonia", pa.float32()),  # bacterial + viral
        pa.field("flagged", pa.bool_()),  # prob_pneumonia >= the model card's threshold
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("engine", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | error | skipped
        pa.field("error", pa.string()),  # why the row is an error or skipped
        pa.field("heatmap_uri", pa.string()),  # Grad-CAM overlay PNG, when explained
        # DICOM header (null for JPEG/PNG) and the intended-use check of each image.
        *DICOM_FIELDS,
        *INTENDED_USE_FIELDS,
    ]
)

#: The columns that only a scored (``ok``) row has; null on error and skipped rows.
PREDICTION_COLUMNS = (
    "pred_label",
    "prob_normal",
    "prob_bacterial",
    "prob_viral",
    "prob_pneumonia",
    "flagged",
)


def with_run_columns(batch: pa.Table, *, version: str, run_id: str) -> pa.Table:
    """A block of prediction rows as ``PREDICTIONS_SCHEMA``, with this run's columns."""
    n = batch.num_rows
    now = datetime.now(UTC)
    cols = {c: batch.column(c) for c in batch.column_names if c in PREDICTIONS_SCHEMA.names}
    cols["model_version"] = pa.array([version] * n, pa.string())
    for f in PREDICTIONS_SCHEMA:  # columns a stage did not produce (no DICOM in this block...)
        if f.name not in cols:
            cols[f.name] = pa.nulls(n, f.type)
    cols["run_id"] = pa.array([run_id] * n, pa.string())
    cols["scored_at"] = pa.array([now] * n, pa.timestamp("us", tz="UTC"))
    # Error rows carry no prediction: null, not the NaN / False placeholders of the batch.
    ok = pc.fill_null(pc.equal(cols["status"], "ok"), False)
    for name in PREDICTION_COLUMNS:
        typ = PREDICTIONS_SCHEMA.field(name).type
        cols[name] = pc.if_else(ok, cols[name].cast(typ), pa.scalar(None, typ))
    table = pa.table({f.name: conform(cols[f.name], f.type) for f in PREDICTIONS_SCHEMA})
    return table.cast(PREDICTIONS_SCHEMA)


def conform(column: pa.ChunkedArray | pa.Array, typ: pa.DataType) -> pa.ChunkedArray | pa.Array:
    """A stage column as ``typ``: values that crossed Ray as float NaN (missing DICOM values,
    nullable integers, a block whose column is all null) become null. No output column has
    NaN as a value: non-finite model outputs are error rows."""
    if pa.types.is_floating(column.type):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    if column.null_count == len(column):
        return pa.nulls(len(column), typ)
    return column
