"""The predictions table: one row per input image, explicit schema (documented in the README)."""

from __future__ import annotations

import pyarrow as pa

PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),  # sha256 of the file bytes; null if unreadable
        pa.field("uri", pa.string(), nullable=False),
        pa.field("patient_id", pa.string()),
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
        pa.field("status", pa.string(), nullable=False),  # ok | error
        pa.field("error", pa.string()),
        pa.field("heatmap_uri", pa.string()),  # Grad-CAM overlay PNG, when explained
    ]
)

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("status", pa.string(), nullable=False),
    ]
)
