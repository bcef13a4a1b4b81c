"""OUT/results.fhir.ndjson of a real scoring run: one DiagnosticReport per assessed DICOM study."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest

from cxr_ray.config import load_settings
from cxr_ray.io import storage
from tests import dicom_factory
from tests.conftest import make_artifact
from tests.imaging import jpeg_bytes


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory) -> tuple[Path, Path]:
    from cxr_ray.scoring.pipeline import score

    tmp = tmp_path_factory.mktemp("fhir-run")
    src = tmp / "in"
    dicom_factory.write_files(dicom_factory.six_file_case(), src / "dicom")
    (src / "jpeg").mkdir(parents=True)
    (src / "jpeg" / "person1_bacteria_1.jpeg").write_bytes(jpeg_bytes(200, 180, seed=3))
    model = make_artifact(tmp / "model", threshold=0.0)
    out = tmp / "run"
    score(str(src), str(model), str(out), load_settings(None, {"score": {"cache_dir": str(tmp / "cache")}}))
    return out, model


def test_a_run_writes_one_validated_report_per_assessed_dicom_study(run):
    from cxr_ray.cli.scoring import _write_fhir
    from cxr_ray.models.artifact import load_artifact
    from cxr_ray.writeback.fhir import _MODELS, FHIR_NDJSON

    out, model = run
    _write_fhir(str(out), load_artifact(str(model)))
    lines = [json.loads(x) for x in (out / FHIR_NDJSON).read_text().splitlines()]
    for r in lines:  # every line is a valid resource of its type
        _MODELS[r["resourceType"]].model_validate(r)
    studies = storage.read_table(str(out / "studies.parquet"))
    assessed = studies.filter(
        pc.and_(pc.greater(studies["scored"], 0), pc.invert(pc.is_null(studies["study_instance_uid"])))
    )
    reports = [r for r in lines if r["resourceType"] == "DiagnosticReport"]
    assert assessed.num_rows >= 1
    assert len(reports) == assessed.num_rows
    assert sum(r["resourceType"] == "Device" for r in lines) == 1
    # The JPEG study (no DICOM study) and the skipped studies get nothing.
    skipped = studies.filter(pc.equal(studies["scored"], 0))["study_instance_uid"].to_pylist()
    text = (out / FHIR_NDJSON).read_text()
    for uid in skipped:
        if uid:
            assert uid not in text
    for uid in assessed["study_instance_uid"].to_pylist():
        assert uid in text


def test_a_run_of_plain_image_files_writes_no_fhir(ray_local, tmp_path):
    from cxr_ray.models.artifact import load_artifact
    from cxr_ray.scoring.pipeline import score
    from cxr_ray.writeback.context import ModelInfo
    from cxr_ray.writeback.fhir import FHIR_NDJSON, write_run_fhir

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"person{i}_virus_{i}.jpeg").write_bytes(jpeg_bytes(160, 140, seed=i))
    model = make_artifact(tmp_path / "model", threshold=0.0)
    out = tmp_path / "run"
    score(str(src), str(model), str(out), load_settings(None, {"score": {"cache_dir": str(tmp_path / "c")}}))
    card = load_artifact(str(model)).card
    assert write_run_fhir(str(out), ModelInfo.from_card(card), threshold=card.pneumonia_threshold) == 0
    assert not (out / FHIR_NDJSON).exists()
