"""The predictions table: one row per input image, explicit schema (documented in the README).

New columns are only ever added (nullable) at the end of a group, never renamed or retyped,
so tables written by older versions stay readable next to new ones.
"""

from __future__ import annotations

import pyarrow as pa

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
