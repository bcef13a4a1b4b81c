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

from cxr_ray.errors import error_code, safe_row_error
from cxr_ray.imaging.dicom import DICOM_FIELDS
from cxr_ray.io.columns import column, described
from cxr_ray.models.intended_use import INTENDED_USE_FIELDS
from cxr_ray.vocabulary import ERROR_CODES, ErrorCode, Status

#: Bump when a column is added (columns are never renamed or retyped).
PREDICTIONS_VERSION = 2

_OK_ONLY = "null unless status is ok"
PREDICTIONS_SCHEMA = described(
    pa.schema(
        [
            column(
                "image_id", pa.string(), "SHA-256 of the file bytes (null if the bytes could not be read)"
            ),
            column(
                "uri",
                pa.string(),
                "where the image came from: path, s3:// URI, archive.zip!/member, table.parquet!/row "
                "or dicomweb://host/path/studies/S/series/R/instances/I",
                nullable=False,
            ),
            column("patient_id", pa.string(), "the DICOM PatientID tag, else parsed from the file name"),
            column("label", pa.string(), "ground truth from the file name, folder or manifest, when known"),
            column("pred_label", pa.string(), f"predicted class: normal, bacterial or viral ({_OK_ONLY})"),
            column(
                "prob_normal",
                pa.float32(),
                (f"P(normal) after the card's temperature ({_OK_ONLY})", "probability"),
            ),
            column("prob_bacterial", pa.float32(), (f"P(bacterial pneumonia) ({_OK_ONLY})", "probability")),
            column("prob_viral", pa.float32(), (f"P(viral pneumonia) ({_OK_ONLY})", "probability")),
            column("prob_pneumonia", pa.float32(), ("prob_bacterial + prob_viral", "probability")),
            column(
                "flagged",
                pa.bool_(),
                "prob_pneumonia >= the flag threshold (summary.json flag_threshold, the model card's "
                f"pneumonia threshold; {_OK_ONLY})",
            ),
            column(
                "model_version", pa.string(), "the model: architecture + weights hash prefix", nullable=False
            ),
            column(
                "engine",
                pa.string(),
                "the engine that scored the row (onnxruntime, torch, ...)",
                nullable=False,
            ),
            column("run_id", pa.string(), "the scoring run that wrote the row", nullable=False),
            column(
                "scored_at", pa.timestamp("us", tz="UTC"), ("when the row was written", "UTC"), nullable=False
            ),
            column(
                "status",
                pa.string(),
                "ok; error (unreadable, undecodable); skipped (outside the model's intended use, "
                "never scored)",
                nullable=False,
            ),
            column(
                "error",
                pa.string(),
                "why the row is an error or skipped (null when ok): `<error_code>: <detail>`, the "
                "detail fixed text with numbers, formats or tag keywords only (never a path, file or "
                "member name, link target or UID: where the row came from is its uri)",
            ),
            column("heatmap_uri", pa.string(), "the Grad-CAM overlay PNG, when explained"),
            # DICOM header (null for JPEG/PNG; described in cxr_ray.imaging.dicom_header) and
            # the intended-use check of each image.
            *DICOM_FIELDS,
            *INTENDED_USE_FIELDS,
            # Version 2.
            column(
                "error_code",
                pa.string(),
                "the reason code of error and skipped rows (null when ok), one of: "
                + ", ".join(ERROR_CODES)
                + " (docs/OUTPUTS.md, Reason codes)",
            ),
        ]
    ),
    {
        "intended_use": "in_scope; out_of_scope (the row is skipped); unchecked (tags missing, or not "
        "DICOM: scored); overridden (outside, scored by the research override); unparseable (a "
        "checked tag malformed: skipped unless opted in)",
        "intended_use_note": "which tags were missing, what was outside under the override, or "
        "which tag was malformed",
    },
    table="predictions",
    version=PREDICTIONS_VERSION,
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
    # The last line of defence: every error text is "<code>: <safe detail>" (text from any
    # stage that is not is "internal: ..." with paths, names and UIDs cut out), its code a column.
    errors = [
        safe_row_error(e if isinstance(e, str) else None)
        if s == Status.OK or isinstance(e, str)
        else ErrorCode.INTERNAL.value  # an error or skipped row always says why
        for s, e in zip(cols["status"].to_pylist(), cols["error"].to_pylist(), strict=True)
    ]
    cols["error"] = pa.array(errors, pa.string())
    cols["error_code"] = pa.array([error_code(e) for e in errors], pa.string())
    # Error rows carry no prediction: null, not the NaN / False placeholders of the batch.
    ok = pc.fill_null(pc.equal(cols["status"], Status.OK), False)
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
