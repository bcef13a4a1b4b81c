"""Outputs that describe themselves: column metadata in Parquet and Delta, docs/OUTPUTS.md
generated from the schemas, summary.json without secrets, integer support in metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxr_ray import metrics
from cxr_ray.config import load_settings
from cxr_ray.io import columns, storage, tables
from cxr_ray.scoring import schema_doc
from cxr_ray.scoring.result import REDACTED, redacted_settings, safe_uri

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,rows,schema", schema_doc.TABLES, ids=[t[0] for t in schema_doc.TABLES])
def test_every_output_column_is_described_and_versioned(name, rows, schema):
    assert columns.undescribed(schema) == []
    # A positive integer, bumped when a column is added (predictions and manifest: 2, error_code).
    assert int(schema.metadata[columns.SCHEMA_VERSION]) >= 1
    assert schema.metadata[columns.TABLE]


def test_outputs_doc_matches_the_schemas():
    page = (REPO / "docs" / "OUTPUTS.md").read_text()
    assert schema_doc.BEGIN in page, "docs/OUTPUTS.md lost its generated part"
    assert schema_doc.updated(page) == page, "run python -m cxr_ray.scoring.schema_doc docs/OUTPUTS.md"


def test_the_doc_check_fails_when_a_description_changes(tmp_path):
    page = (REPO / "docs" / "OUTPUTS.md").read_text()
    stale = tmp_path / "OUTPUTS.md"
    stale.write_text(page.replace("SHA-256 of the file bytes", "a hash", 1))
    assert schema_doc.main([str(stale), "--check"]) == 1
    assert schema_doc.main([str(stale)]) == 0 and stale.read_text() == page


def _metrics_table() -> pa.Table:
    y = np.array([0, 0, 1, 1, 1, 2])
    p = np.eye(3)[[0, 1, 1, 1, 2, 2]] * 0.8 + 0.2 / 3
    return metrics.metrics_table(metrics.classification_metrics(y, p), run_id="r", model_version="m")


def test_metrics_support_is_an_integer_per_class():
    t = _metrics_table()
    assert t.schema.field("support").type == pa.int64() and t.schema.field("n").type == pa.int64()
    rows = t.to_pylist()
    support = {r["label"]: r["support"] for r in rows if r["metric"] == "support"}
    assert support == {"normal": 2, "bacterial": 3, "viral": 1}
    assert all(r["support"] == support[r["label"]] for r in rows if r["label"] is not None)
    assert all(r["support"] is None for r in rows if r["label"] is None)
    assert {r["n"] for r in rows} == {6}


def test_parquet_keeps_descriptions_units_and_version(tmp_path):
    uri = str(tmp_path / "metrics.parquet")
    storage.write_table(_metrics_table(), uri)
    schema = pq.read_schema(uri)
    assert columns.description(schema.field("support")).startswith("per-class rows")
    assert schema.metadata[columns.TABLE] == b"metrics"
    storage.append_table(_metrics_table(), uri)  # the history file keeps them too
    assert columns.undescribed(pq.read_schema(uri)) == []


def test_delta_keeps_field_metadata_and_the_schema_version(tmp_path):
    from cxr_ray.scoring.studies import STUDIES_SCHEMA

    uri = str(tmp_path / "studies")
    tables.ensure_table(uri, STUDIES_SCHEMA)
    rows = pa.table(
        {
            f.name: pa.nulls(1, f.type)
            if f.nullable
            else pa.array([0 if pa.types.is_integer(f.type) else "x"], f.type)
            for f in STUDIES_SCHEMA
        }
    ).cast(STUDIES_SCHEMA)
    tables.insert_new(uri, rows, keys=["study_key"])
    dt = tables.open_table(uri)
    schema = tables.arrow_schema(dt)
    assert columns.undescribed(schema) == []
    assert columns.description(schema.field("driving_image_id")) == columns.description(
        STUDIES_SCHEMA.field("driving_image_id")
    )
    assert schema.field("prob_pneumonia").metadata[columns.UNIT] == b"probability"
    # Delta drops schema-level Arrow metadata: the version lives in the table configuration.
    declared = STUDIES_SCHEMA.metadata[columns.SCHEMA_VERSION].decode()
    assert declared == "2"  # v2: delivery, delivery_error
    assert dt.metadata().configuration["cxr_ray.schema_version"] == declared
    assert dt.metadata().configuration["cxr_ray.table"] == "studies"


def test_summary_settings_never_carry_a_secret():
    secret, password, token = "p" * 20, "hunter2-secret", "tok-abc-123"
    s = load_settings(
        None,
        {
            "score": {"pseudonymize": True, "pseudonym_key": secret},
            "dicomweb": {"username": "u", "password": password},
        },
    )
    text = str(redacted_settings(s))
    assert secret not in text and password not in text
    d = redacted_settings(s)
    assert d["score"]["pseudonym_key"] == REDACTED and d["dicomweb"]["password"] == REDACTED
    assert d["score"]["pseudonymize"] is True  # ordinary values are kept
    assert (
        safe_uri(f"https://u:{password}@pacs:8042/dicom-web?token={token}") == "https://pacs:8042/dicom-web"
    )
    assert safe_uri("/data/archive") == "/data/archive"
