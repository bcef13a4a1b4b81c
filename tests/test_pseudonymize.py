"""Keyed pseudonymisation of predictions and studies tables, and redaction for logs."""

from __future__ import annotations

import datetime as dt
import re

import pyarrow as pa
import pytest

from cxr_ray.errors import ConfigError
from cxr_ray.scoring.pseudonymize import (
    pseudonym_id,
    pseudonym_uid,
    pseudonymize_table,
    redact,
)
from cxr_ray.scoring.studies import study_table

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
UID = re.compile(r"^(0|[1-9]\d*)(\.(0|[1-9]\d*))+$")  # PS3.5 9.1: no leading zeros


def _predictions() -> pa.Table:
    return pa.table(
        {
            "image_id": ["sha-a", "sha-b", "sha-c", None],
            "uri": ["/pacs/DOE_JANE/a.dcm", "/pacs/DOE_JANE/b.dcm", "/x/person7_virus_1.jpeg", "/x/bad.dcm"],
            "patient_id": ["MRN-0042", "MRN-0042", "person7", None],
            "accession_number": ["ACC-77", "ACC-77", None, None],
            "study_instance_uid": ["1.2.840.113619.2.55.3", "1.2.840.113619.2.55.3", None, None],
            "series_instance_uid": ["1.2.840.113619.2.55.3.1", "1.2.840.113619.2.55.3.2", None, None],
            "sop_instance_uid": ["1.2.840.113619.2.55.3.1.1", "1.2.840.113619.2.55.3.2.1", None, None],
            "study_date": pa.array([dt.date(2026, 11, 30)] * 2 + [None, None], pa.date32()),
            "status": ["ok", "skipped", "ok", "error"],
            "view_position": ["PA", "LL", None, None],
            "prob_normal": pa.array([0.2, None, 0.7, None], pa.float32()),
            "prob_bacterial": pa.array([0.5, None, 0.1, None], pa.float32()),
            "prob_viral": pa.array([0.3, None, 0.2, None], pa.float32()),
            "prob_pneumonia": pa.array([0.8, None, 0.3, None], pa.float32()),
            "heatmap_uri": ["/out/heatmaps/DOE_JANE_a.png", None, None, None],
        }
    )


def test_table_keeps_its_schema_and_nulls():
    preds = _predictions()
    out = pseudonymize_table(preds, KEY)
    assert out.schema == preds.schema
    for name in preds.column_names:
        assert out[name].null_count == preds[name].null_count, name
    # Untouched columns are identical.
    for name in ("image_id", "study_date", "status", "view_position", "prob_pneumonia"):
        assert out[name].equals(preds[name])


def test_no_identifier_survives():
    preds = _predictions()
    out = pseudonymize_table(preds, KEY)
    text = repr(out.to_pylist())
    for secret in ("MRN-0042", "person7", "ACC-77", "1.2.840.113619", "DOE_JANE"):
        assert secret not in text, secret


def test_uids_are_valid_and_stable():
    out = pseudonymize_table(_predictions(), KEY)
    uids = [
        v
        for c in ("study_instance_uid", "series_instance_uid", "sop_instance_uid")
        for v in out[c].to_pylist()
    ]
    for uid in filter(None, uids):
        assert UID.match(uid) and len(uid) <= 64 and uid.startswith("2.25."), uid
    # One study UID -> one pseudonym; different UIDs -> different ones.
    assert out["study_instance_uid"][0] == out["study_instance_uid"][1]
    assert len({u for u in uids if u}) == 5
    # The version-8 UUID inside 2.25: version nibble 8, RFC variant.
    value = int(pseudonym_uid("1.2.3", KEY).removeprefix("2.25."))
    assert (value >> 76) & 0xF == 8 and (value >> 62) & 0b11 == 0b10


def test_same_key_same_output_other_key_other_output():
    a, b = pseudonymize_table(_predictions(), KEY), pseudonymize_table(_predictions(), KEY)
    assert a.equals(b)
    c = pseudonymize_table(_predictions(), OTHER_KEY)
    for name in ("patient_id", "accession_number", "study_instance_uid", "uri"):
        assert a[name][0].as_py() != c[name][0].as_py()
    assert re.fullmatch(r"[0-9a-f]{16}", a["patient_id"][0].as_py())
    # Namespaces: an accession number equal to a patient id still maps differently.
    assert pseudonym_id("X1", KEY, "patient_id") != pseudonym_id("X1", KEY, "accession_number")


def test_uris_optional():
    preds = _predictions()
    kept = pseudonymize_table(preds, KEY, include_uris=False)
    assert kept["uri"].equals(preds["uri"]) and kept["heatmap_uri"].equals(preds["heatmap_uri"])
    assert kept["patient_id"][0].as_py() != "MRN-0042"
    out = pseudonymize_table(preds, KEY)
    assert out["uri"][0].as_py().startswith("pseudonymized:")


def test_studies_still_join_to_predictions():
    preds = _predictions()
    studies = study_table(preds)
    p_out, s_out = pseudonymize_table(preds, KEY), pseudonymize_table(studies, KEY)
    assert s_out.schema == studies.schema
    text = repr(s_out.to_pylist())
    for secret in ("MRN-0042", "person7", "ACC-77", "1.2.840.113619", "DOE_JANE", "bad.dcm"):
        assert secret not in text, secret
    # Each study key is the pseudonym its kind gives in the predictions table.
    expected = {
        p_out["study_instance_uid"][0].as_py(): "study_instance_uid",
        p_out["patient_id"][2].as_py(): "patient_id",
        p_out["uri"][3].as_py(): "uri",
    }
    assert (
        dict(zip(s_out["study_key"].to_pylist(), s_out["study_key_kind"].to_pylist(), strict=True))
        == expected
    )
    assert set(s_out["driving_uri"].to_pylist()) - {None} <= set(p_out["uri"].to_pylist())
    # Re-deriving studies from the pseudonymised predictions gives the same table.
    assert study_table(p_out).sort_by("study_key").equals(s_out.sort_by("study_key"))


def test_key_is_required():
    for bad in (b"", b"short", "a-string-key-of-enough-length"):
        with pytest.raises(ConfigError, match="at least 16 bytes"):
            pseudonymize_table(_predictions(), bad)  # type: ignore[arg-type]


def test_tables_without_identifier_columns_and_empty_tables():
    t = pa.table({"image_id": ["a"], "prob_normal": [0.5]})
    assert pseudonymize_table(t, KEY).equals(t)
    empty = _predictions().slice(0, 0)
    assert pseudonymize_table(empty, KEY).equals(empty)


def test_redact():
    msg = "study 1.2.840.113619.2.55.3 of MRN-0042 (2.25.12345678901234567890) at 127.0.0.1 with ray 2.60.0."
    assert redact(msg, ["MRN-0042", None, "ab"]) == (
        "study <uid> of <redacted> (<uid>) at 127.0.0.1 with ray 2.60.0."
    )
    assert redact("patient ab", ["ab"]) == "patient ab"  # too short to replace safely


def _quasi_table():
    import datetime

    import pyarrow as pa

    return pa.table(
        {
            "image_id": ["a" * 64, "b" * 64, "c" * 64],
            "uri": ["/DOE_JANE/1.dcm", "/DOE_JANE/2.dcm", "/ROE_RICH/3.dcm"],
            "patient_id": ["MRN1", "MRN1", "MRN2"],
            "study_date": pa.array(
                [datetime.date(2026, 1, 10), datetime.date(2026, 1, 20), None], pa.date32()
            ),
            "patient_age_years": pa.array([0.5, 7.0, 45.0], pa.float32()),
            "patient_sex": ["F", "F", "M"],
            "manufacturer": ["ACME", "ACME", "ACME"],
            "error": [
                None,
                "cannot read '/DOE_JANE/2.dcm' at /DOE_JANE",
                "study 1.2.840.113619.2.55.3.4 failed",
            ],
        }
    )


def test_basic_level_keeps_quasi_identifiers_and_scrubs_error_text():
    from cxr_ray.scoring.pseudonymize import pseudonymize_table

    t = _quasi_table()
    out = pseudonymize_table(t, KEY)
    for name in ("image_id", "study_date", "patient_age_years", "patient_sex", "manufacturer"):
        assert out.column(name).to_pylist() == t.column(name).to_pylist(), name
    text = " ".join(e or "" for e in out.column("error").to_pylist())
    assert "DOE" not in text and "JANE" not in text and "1.2.840" not in text


def test_strict_level_shifts_dates_per_patient_bands_ages_keys_image_id():
    from cxr_ray.scoring.pseudonymize import pseudonymize_table

    t = _quasi_table()
    out = pseudonymize_table(t, KEY, level="strict")
    d0, d1, d2 = out.column("study_date").to_pylist()
    assert d2 is None and d0 != t.column("study_date")[0].as_py()
    assert (d1 - d0).days == 10  # one patient, one offset: intervals survive
    assert out.column("patient_age_years").to_pylist() == [0.0, 5.0, 18.0]
    ids = out.column("image_id").to_pylist()
    assert len(set(ids)) == 3 and not set(ids) & set(t.column("image_id").to_pylist())
    assert out.column("patient_sex").null_count == 3 and out.column("manufacturer").null_count == 3
    assert pseudonymize_table(t, KEY, level="strict").equals(out)  # deterministic for one key
    assert out.schema == t.schema
