"""Hospital archives end to end: DICOM identity, intended-use gating and study-level results.

The issue's six files (real Kermany pixels in DICOM, with the tags a PACS export carries):
a PA and a lateral of one study, an AP MONOCHROME1 CR, an adult, a CT and a HAND. Only the PA
and the AP are what the pediatric frontal chest model may read.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cxr_ray.config import load_settings
from cxr_ray.scoring.pipeline import score
from cxr_ray.scoring.schema import PREDICTIONS_SCHEMA
from cxr_ray.scoring.studies import STUDIES_SCHEMA
from tests import dicom_factory
from tests.orthanc_server import orthanc as orthanc  # the module-scoped fixture


def _settings(tmp_path, **score):
    return load_settings(None, {"score": {"cache_dir": str(tmp_path / "cache"), **score}})


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    folder = tmp_path_factory.mktemp("six")
    instances = dicom_factory.six_file_case()
    dicom_factory.write_files(instances, folder)
    return folder, {i.key: i for i in instances}


def test_six_file_case_scores_the_frontal_pediatric_chests_and_skips_the_rest(
    ray_local, tiny_artifact, six, tmp_path
):
    folder, instances = six
    out = tmp_path / "out"
    r = score(str(folder), str(tiny_artifact), str(out), _settings(tmp_path))
    t = pq.read_table(out / "predictions.parquet")
    assert t.schema.equals(PREDICTIONS_SCHEMA)
    assert t.num_rows == 6 == r.images
    rows = {row["uri"].rsplit("/", 1)[-1].removesuffix(".dcm"): row for row in t.to_pylist()}
    assert set(rows) == set(instances)
    assert Counter(row["status"] for row in rows.values()) == {"ok": 2, "skipped": 4}
    assert (r.ok, r.skipped, r.errors) == (2, 4, 0)
    assert {k for k, row in rows.items() if row["status"] == "ok"} == {"pa", "ap_mono1"}
    reasons = {k: row["error"] for k, row in rows.items() if row["status"] == "skipped"}
    assert reasons["lateral"] == "out_of_scope: view LL is outside the model's intended use (PA, AP)"
    assert reasons["ct"].startswith("out_of_scope: modality CT is outside the model's intended use (CR, DX)")
    assert reasons["hand"].startswith(
        "out_of_scope: body part HAND is outside the model's intended use (CHEST)"
    )
    assert reasons["adult"] == (
        "out_of_scope: patient age 45 years is outside the model's intended use (0-17 years)"
    )
    for k, row in rows.items():
        # identifiers in every row, skipped ones included
        tags = instances[k].tags
        assert row["study_instance_uid"] == tags.study_instance_uid
        assert row["sop_instance_uid"] == tags.sop_instance_uid
        assert row["series_instance_uid"] == tags.series_instance_uid
        assert row["accession_number"] == tags.accession_number
        assert row["patient_id"] == tags.patient_id
        assert row["modality"] == tags.modality
        if row["status"] == "skipped":
            assert row["intended_use"] == "out_of_scope"
            assert all(row[c] is None for c in ("pred_label", "prob_normal", "prob_pneumonia", "flagged"))
        else:
            assert row["intended_use"] == "in_scope" and row["prob_pneumonia"] is not None
    assert rows["ap_mono1"]["photometric_interpretation"] == "MONOCHROME1"
    assert rows["ap_mono1"]["view_position"] == "AP"

    studies = pq.read_table(out / "studies.parquet")
    assert studies.schema.equals(STUDIES_SCHEMA)
    assert studies.num_rows == 5 == r.studies
    pa_study = studies.filter(
        pc.equal(studies["study_instance_uid"], instances["pa"].tags.study_instance_uid)
    )
    (study,) = pa_study.to_pylist()
    assert (study["images"], study["scored"], study["skipped"]) == (2, 1, 1)
    assert study["prob_pneumonia"] == pytest.approx(rows["pa"]["prob_pneumonia"])
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["skipped"], summary["studies"]) == (2, 4, 5)


def test_the_research_override_scores_everything_and_says_so(ray_local, tiny_artifact, six, tmp_path):
    folder, _ = six
    out = tmp_path / "out"
    r = score(str(folder), str(tiny_artifact), str(out), _settings(tmp_path, enforce_intended_use=False))
    t = pq.read_table(out / "predictions.parquet")
    assert (r.ok, r.skipped) == (6, 0)
    by_use = Counter(t["intended_use"].to_pylist())
    assert by_use == {"in_scope": 2, "overridden": 4}
    notes = [
        n for n, u in zip(t["intended_use_note"].to_pylist(), t["intended_use"].to_pylist(), strict=True)
    ]
    assert all(
        "research override" in (n or "")
        for n, u in zip(notes, t["intended_use"].to_pylist(), strict=True)
        if u == "overridden"
    )


def test_logs_and_summary_print_no_patient_identifiers(ray_local, tiny_artifact, six, tmp_path, caplog):
    from cxr_ray.scoring.result import format_summary

    folder, instances = six
    (folder.parent / "broken").mkdir(exist_ok=True)
    out = tmp_path / "out"
    with caplog.at_level("DEBUG", logger="cxr_ray"):
        r = score(str(folder), str(tiny_artifact), str(out), _settings(tmp_path))
    text = format_summary(r) + (out / "summary.json").read_text() + caplog.text
    for inst in instances.values():
        for ident in (inst.tags.patient_id, inst.tags.accession_number, inst.tags.patient_name):
            assert ident not in text, ident


def test_the_same_files_from_orthanc_give_the_same_rows(ray_local, tiny_artifact, six, orthanc, tmp_path):
    """The six files uploaded to a real Orthanc and scored over DICOMweb: the same rows."""
    folder, instances = six
    orthanc.clear()
    dicom_factory.upload(instances.values(), orthanc)
    score(str(folder), str(tiny_artifact), str(tmp_path / "local"), _settings(tmp_path))
    remote = score(orthanc.source, str(tiny_artifact), str(tmp_path / "pacs"), _settings(tmp_path))
    assert (remote.images, remote.ok, remote.skipped, remote.studies) == (6, 2, 4, 5)
    keep = [c for c in PREDICTIONS_SCHEMA.names if c not in ("uri", "run_id", "scored_at")]
    a = pq.read_table(tmp_path / "local" / "predictions.parquet").sort_by("sop_instance_uid").select(keep)
    b = pq.read_table(tmp_path / "pacs" / "predictions.parquet").sort_by("sop_instance_uid").select(keep)
    diffs = [
        (k, x[k], y[k])
        for x, y in zip(a.to_pylist(), b.to_pylist(), strict=True)
        for k in keep
        if x[k] != y[k]
    ]
    assert diffs == []
    uris = pq.read_table(tmp_path / "pacs" / "predictions.parquet")["uri"].to_pylist()
    assert all(u.startswith("dicomweb://127.0.0.1:") and "/instances/" in u for u in uris)


def test_pseudonymized_export_carries_no_identifier_and_keeps_studies_together(
    ray_local, tiny_artifact, six, tmp_path
):
    from cxr_ray.errors import ConfigError

    folder, instances = six
    with pytest.raises(ConfigError, match="pseudonymize needs a key"):
        _settings(tmp_path, pseudonymize=True)
    key = "a-research-key-of-32-bytes-000000"
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        r = score(
            str(folder),
            str(tiny_artifact),
            str(out),
            _settings(tmp_path, pseudonymize=True, pseudonym_key=key),
        )
        runs.append((r, pq.read_table(out / "predictions.parquet"), pq.read_table(out / "studies.parquet")))
    (r, preds, studies), (_, preds_b, _) = runs
    assert (r.images, r.ok, r.skipped, r.studies) == (6, 2, 4, 5)  # the same studies, grouped by pseudonym
    dumped = json.dumps(preds.to_pylist(), default=str) + json.dumps(studies.to_pylist(), default=str)
    for inst in instances.values():
        t = inst.tags
        for ident in (
            t.patient_id,
            t.accession_number,
            t.study_instance_uid,
            t.sop_instance_uid,
            inst.filename,
        ):
            assert ident not in dumped, ident
    assert all(u.startswith("2.25.") for u in preds["study_instance_uid"].to_pylist())
    assert preds["study_instance_uid"].to_pylist() == preds_b["study_instance_uid"].to_pylist()  # stable


def test_nightly_against_orthanc_scores_only_studies_since_the_last_committed_run(
    ray_local, tiny_artifact, orthanc, tmp_path
):
    from datetime import UTC, datetime, timedelta

    from cxr_ray.scoring.nightly import run_nightly

    orthanc.clear()
    jpegs = dicom_factory.real_jpegs(3)
    old_study = dicom_factory.new_uid()
    now = datetime.now(UTC)
    long_ago = (now - timedelta(days=10)).strftime("%Y%m%d")  # before the 2-day look-back
    old = [
        dicom_factory.make_image(j, dicom_factory.Tags(study_instance_uid=old_study, study_date=long_ago))
        for j in jpegs[:2]
    ]
    for data in old:
        orthanc.upload(data)
    root, settings = str(tmp_path / "nightly"), _settings(tmp_path)
    first = run_nightly(orthanc.source, str(tiny_artifact), root, settings)
    assert (first.new_images, first.added_rows) == (2, 2) and "study_date" not in first.extra

    today = now.strftime("%Y%m%d")
    orthanc.upload(dicom_factory.make_image(jpegs[2], dicom_factory.Tags(study_date=today)))
    second = run_nightly(orthanc.source, str(tiny_artifact), root, settings)
    # The window: the last committed run's listing day (UTC, dicomweb.timezone's default) minus
    # dicomweb.lookback_days (2).
    since = (datetime.now(UTC) - timedelta(days=2)).strftime("%Y%m%d")
    assert second.extra["study_date"] in (f"{since}-", f"{(now - timedelta(days=2)):%Y%m%d}-")
    assert (second.new_images, second.added_rows) == (1, 1)
    assert second.already_scored == 0  # the old study was not even listed, let alone retrieved
    third = run_nightly(orthanc.source, str(tiny_artifact), root, settings)
    assert (third.added_rows, third.already_scored) == (0, 1)
