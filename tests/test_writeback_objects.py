"""The DICOM objects written back to the PACS (cxr_ray.writeback): SR and secondary capture.

Sources are DICOM files made from the real Kermany images (``tests.dicom_factory``); their
rows go through the real header parser, intended-use check, predictions schema and study
table, so the builders see what a scoring run hands them. Every object is checked with the
field's own tools: dicom3tools' ``dciodvfy`` (no errors; the only warnings allowed are
listed in ``ALLOWED_WARNINGS`` with the reason) and dcmtk's ``dsrdump``, then read back with
highdicom / pydicom and compared with the study row.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pyarrow as pa
import pydicom
import pytest
from PIL import Image

from cxr_ray.imaging.dicom import decode_dicom
from cxr_ray.imaging.dicom_header import header_columns, read_header
from cxr_ray.models.intended_use import IntendedUse, use_columns
from cxr_ray.scoring.explain import overlay_png
from cxr_ray.scoring.pseudonymize import pseudonymize_table
from cxr_ray.scoring.schema import with_run_columns
from cxr_ray.scoring.studies import study_table
from cxr_ray.writeback import (
    ModelInfo,
    SourceRef,
    assessed,
    build_capture,
    build_sr,
    result_uids,
    wants_capture,
)
from cxr_ray.writeback.capture import BANNER
from tests.dicom_factory import Tags, gray_pixels, make_image, real_jpegs
from tests.orthanc_server import orthanc as orthanc  # the module-scoped fixture

MODEL = ModelInfo(
    name="mobilenet_v2",
    version="mobilenet_v2-0123456789ab",
    weights_sha256="0123456789ab" + "cd" * 26,
    software_version="0.1.0",
)
RUN_ID = "run-2026-12-02"
THRESHOLD = 0.5
#: dciodvfy warnings that are not defects of the objects:
ALLOWED_WARNINGS = (
    # dciodvfy knows only the standard coding schemes; 99CXRRAY is the private scheme of the
    # result concepts, declared in the Coding Scheme Identification Sequence as PS3.3 asks.
    re.compile(r"Unrecognized defined term <99CXRRAY> for value 1 of attribute <Coding Scheme Designator>"),
)

needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy not installed (apt-get install dicom3tools)"
)
needs_dsrdump = pytest.mark.skipif(
    shutil.which("dsrdump") is None, reason="dsrdump not installed (apt-get install dcmtk)"
)


def _source(tags: Tags | None = None) -> tuple[bytes, Tags]:
    tags = tags or Tags(modality="DX", patient_birth_date="20220101")
    return make_image(real_jpegs(1)[0], tags), tags


def _predictions(
    files: list[bytes], statuses: list[str], probs: list[tuple[float, float, float]]
) -> pa.Table:
    """Prediction rows for ``files`` as a scoring run writes them (schema, header columns)."""
    headers = [read_header(data) for data in files]
    checks = [IntendedUse().check(h) for h in headers]
    n = len(files)
    p = np.array(probs, dtype=np.float32)
    labels = np.array(["normal", "bacterial", "viral"])[p.argmax(1)]
    ok = np.array([s == "ok" for s in statuses])
    block = pa.table(
        {
            "image_id": [hashlib.sha256(d).hexdigest() for d in files],
            "uri": [f"/archive/{i}.dcm" for i in range(n)],
            "pred_label": pa.array([str(x) if o else None for x, o in zip(labels, ok, strict=True)]),
            "prob_normal": p[:, 0],
            "prob_bacterial": p[:, 1],
            "prob_viral": p[:, 2],
            "prob_pneumonia": p[:, 1] + p[:, 2],
            "flagged": (p[:, 1] + p[:, 2]) >= THRESHOLD,
            "engine": ["onnxruntime"] * n,
            "status": statuses,
            "error": [None if s == "ok" else "outside the intended use" for s in statuses],
            **header_columns(headers),
            **use_columns(checks),
        }
    )
    return with_run_columns(block, version=MODEL.version, run_id=RUN_ID)


def _study(predictions: pa.Table) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the study row, the predictions row of its driving image) of a one-study table."""
    (study,) = study_table(predictions).to_pylist()
    rows = predictions.to_pylist()
    driving = next((r for r in rows if r["image_id"] == study["driving_image_id"]), rows[0])
    return study, driving


def _dciodvfy(path: Path) -> list[str]:
    """dciodvfy's errors and unexplained warnings for a file ([] when it is clean)."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    return [
        line
        for line in lines
        if line.startswith("Error")
        or (line.startswith("Warning") and not any(a.search(line) for a in ALLOWED_WARNINGS))
    ]


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def scored() -> dict[str, Any]:
    data, tags = _source()
    predictions = _predictions([data], ["ok"], [(0.08, 0.71, 0.21)])
    study, driving = _study(predictions)
    return {"data": data, "tags": tags, "study": study, "driving": driving}


def _overlay(data: bytes) -> bytes:
    """A Grad-CAM-style overlay PNG of the source's pixels (a blob of heat), as explain writes it
    (explain overlays the preprocessed image at the model's input size)."""
    gray = decode_dicom(data, max_pixels=50_000_000)
    pixels = np.asarray(Image.fromarray(gray).resize((224, 224), Image.Resampling.BILINEAR), dtype=np.uint8)
    yy, xx = np.mgrid[: pixels.shape[0], : pixels.shape[1]]
    heat = np.exp(-((yy - 80) ** 2 + (xx - 120) ** 2) / (2 * 30.0**2)).astype(np.float32)
    return overlay_png(pixels, heat)


# ----------------------------------------------------------------------------- the SR


@needs_dciodvfy
@needs_dsrdump
def test_sr_passes_dciodvfy_and_dsrdump_renders_it(scored, tmp_path):
    source = pydicom.dcmread(io.BytesIO(scored["data"]))
    sr = build_sr(
        scored["study"],
        source,
        MODEL,
        run_id=RUN_ID,
        threshold=THRESHOLD,
        intended_use=scored["driving"]["intended_use"],
    )
    path = _save(sr, tmp_path / "sr.dcm")
    assert _dciodvfy(path) == []
    out = subprocess.run(
        ["dsrdump", "-Ec", "+Pl", "+Pu", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Comprehensive 3D SR Document" in text
    assert "Verification Flag   : UNVERIFIED" in text and "Completion Flag     : COMPLETE" in text
    assert '(53084003,SCT,"Bacterial pneumonia")' in text
    assert "CAUTION: Not for diagnostic use" in text
    assert '"Algorithm Version")="mobilenet_v2-0123456789ab"' in text


def _group(sr: pydicom.Dataset) -> pydicom.Dataset:
    """The TID 1501 measurement group of a read-back SR."""
    (container,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    (group,) = container.ContentSequence
    return group


def _items(group: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    return {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in group.ContentSequence}


def test_sr_content_reads_back_as_the_study_row(scored, tmp_path):
    study, driving = scored["study"], scored["driving"]
    source = SourceRef.from_dataset(pydicom.dcmread(io.BytesIO(scored["data"])))
    sr = build_sr(
        study, source, MODEL, run_id=RUN_ID, threshold=THRESHOLD, intended_use=driving["intended_use"]
    )
    back = pydicom.dcmread(_save(sr, tmp_path / "sr.dcm"))
    report = hd.sr.Comprehensive3DSR.from_dataset(back)
    assert (
        back.SOPClassUID
        == hd.sr.Comprehensive3DSR.from_dataset(back).SOPClassUID
        == "1.2.840.10008.5.1.4.1.1.88.34"
    )
    assert report.content.get_image_measurement_groups()  # highdicom parses it as TID 1500
    items = _items(_group(back))
    assert (
        items["Finding"].ConceptCodeSequence[0].CodeValue
        == "53084003"
        == {"bacterial": "53084003"}[study["pred_label"]]
    )
    for meaning, column in (
        ("Probability of normal", "prob_normal"),
        ("Probability of bacterial pneumonia", "prob_bacterial"),
        ("Probability of viral pneumonia", "prob_viral"),
        ("Probability of pneumonia", "prob_pneumonia"),
    ):
        value = float(items[meaning].MeasuredValueSequence[0].NumericValue)
        assert value == pytest.approx(study[column], abs=1e-6)
    assert float(items["Pneumonia flag threshold"].MeasuredValueSequence[0].NumericValue) == THRESHOLD
    flagged = items["Flagged: P(pneumonia) >= threshold"].ConceptCodeSequence[0].CodeMeaning
    assert flagged == ("Yes" if study["flagged"] else "No") == "Yes"
    assert items["Intended-use check"].ConceptCodeSequence[0].CodeValue == "IN-SCOPE"
    assert driving["intended_use"] == "in_scope"
    assert items["Algorithm Name"].TextValue == MODEL.name
    assert items["Algorithm Version"].TextValue == MODEL.version
    params = [
        i.TextValue
        for i in _group(back).ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == "111002"
    ]
    assert params == [f"weights_sha256={MODEL.weights_sha256}", "threshold=0.5", f"run_id={RUN_ID}"]
    assert "CAUTION" in items["Comment"].TextValue
    # The driving image is the measurement group's source image and the evidence.
    ref = items["Source of Measurement"].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        driving["sop_class_uid"],
        driving["sop_instance_uid"],
    )
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == study["study_instance_uid"]
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == driving["series_instance_uid"]
    # Patient and study copied from the source; a new series in the source study.
    tags = scored["tags"]
    assert (back.PatientID, str(back.PatientName), back.PatientBirthDate, back.PatientSex) == (
        tags.patient_id,
        tags.patient_name,
        tags.patient_birth_date,
        tags.patient_sex,
    )
    assert (back.AccessionNumber, back.StudyDate, back.StudyTime, back.StudyID) == (
        tags.accession_number,
        tags.study_date,
        tags.study_time,
        "1",
    )
    assert back.StudyInstanceUID == tags.study_instance_uid
    assert back.SeriesInstanceUID not in (tags.series_instance_uid,) and back.Modality == "SR"
    assert (back.VerificationFlag, back.CompletionFlag, back.PreliminaryFlag) == (
        "UNVERIFIED",
        "COMPLETE",
        "PRELIMINARY",
    )
    # IHE AIR: the algorithm as contributing equipment (highdicom adds itself as a second item).
    (equipment,) = [e for e in back.ContributingEquipmentSequence if e.Manufacturer == "cxr-ray"]
    purpose = equipment.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1",
        "99IHE",
        "Processing Algorithm",
    )
    assert (equipment.Manufacturer, equipment.ManufacturerModelName) == ("cxr-ray", MODEL.name)
    assert MODEL.version in equipment.SoftwareVersions


def test_sr_from_the_predictions_row_matches_the_file(scored):
    """``SourceRef.from_row`` (what predictions keep) gives the same references as the file."""
    from_row = SourceRef.from_row(scored["driving"])
    from_file = SourceRef.from_dataset(pydicom.dcmread(io.BytesIO(scored["data"])))
    for name in ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "sop_class_uid"):
        assert getattr(from_row, name) == getattr(from_file, name)
    assert (from_row.patient_id, from_row.accession_number, from_row.study_date) == (
        from_file.patient_id,
        from_file.accession_number,
        from_file.study_date,
    )
    # What predictions do not keep is absent, not invented.
    assert from_row.patient_name is None and from_row.study_time is None


def test_study_attributes_are_taken_only_from_an_answer_about_the_same_study_and_patient(scored):
    """What predictions do not keep comes from the PACS's study-level answer, never from an
    answer about another study or patient (a PACS that re-keyed the study, a wrong match)."""
    ref = SourceRef.from_row(scored["driving"])
    answer = pydicom.Dataset()
    answer.StudyInstanceUID, answer.PatientID = ref.study_instance_uid, ref.patient_id
    answer.PatientName, answer.PatientBirthDate = "DEMO^JANE", "20220315"
    answer.StudyTime, answer.StudyID, answer.ReferringPhysicianName = "101500", "S42", "REF^A"
    filled = ref.with_study_attributes(answer)
    assert (filled.patient_name, filled.patient_birth_date, filled.study_time) == (
        "DEMO^JANE",
        "20220315",
        "101500",
    )
    assert (filled.study_id, filled.referring_physician_name) == ("S42", "REF^A")
    # The identifiers of the row are kept as they are.
    assert (filled.patient_id, filled.study_instance_uid, filled.accession_number) == (
        ref.patient_id,
        ref.study_instance_uid,
        ref.accession_number,
    )
    sr = build_sr(scored["study"], filled, MODEL, run_id=RUN_ID, threshold=THRESHOLD)
    assert (str(sr.PatientName), sr.PatientBirthDate, sr.StudyID) == ("DEMO^JANE", "20220315", "S42")
    other_patient = pydicom.Dataset()
    other_patient.update(answer)
    other_patient.PatientID = "SOMEONE-ELSE"
    other_study = pydicom.Dataset()
    other_study.update(answer)
    other_study.StudyInstanceUID = "1.2.3.4"
    for wrong in (other_patient, other_study, None):
        assert ref.with_study_attributes(wrong) == ref


@needs_dciodvfy
def test_sr_from_a_predictions_row_only_is_valid(scored, tmp_path):
    sr = build_sr(
        scored["study"], SourceRef.from_row(scored["driving"]), MODEL, run_id=RUN_ID, threshold=THRESHOLD
    )
    path = _save(sr, tmp_path / "sr.dcm")
    # Type 2 PatientName / StudyTime / StudyID are written empty: valid, and dciodvfy only
    # says a DICOMDIR would want StudyTime and StudyID.
    problems = [p for p in _dciodvfy(path) if "needed to build DICOMDIR" not in p]
    assert problems == []


# ----------------------------------------------------------------------------- the SC


@needs_dciodvfy
def test_capture_passes_dciodvfy_and_is_marked_research(scored, tmp_path):
    source = pydicom.dcmread(io.BytesIO(scored["data"]))
    assert wants_capture(scored["study"])
    sc = build_capture(scored["study"], source, MODEL, overlay=_overlay(scored["data"]), threshold=THRESHOLD)
    path = _save(sc, tmp_path / "sc.dcm")
    assert _dciodvfy(path) == []
    back = pydicom.dcmread(path)
    uids = result_uids(source.StudyInstanceUID, MODEL.version)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID == uids.sc_series_uid != uids.sr_series_uid
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.BurnedInAnnotation == "YES"
    assert "NOT FOR DIAGNOSIS" in back.ImageComments and "not for diagnosis" in back.SeriesDescription
    assert list(back.ImageType) == ["DERIVED", "SECONDARY"]
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    purposes = {e.PurposeOfReferenceCodeSequence[0].CodeMeaning for e in back.ContributingEquipmentSequence}
    assert "Processing Algorithm" in purposes
    assert (back.PatientID, back.PatientName, back.AccessionNumber) == (
        source.PatientID,
        source.PatientName,
        source.AccessionNumber,
    )
    pixels = back.pixel_array
    assert back.PhotometricInterpretation == "RGB" and pixels.shape[2] == 3
    # The banner is burned in: yellow text in the black band above the picture.
    band = pixels[:30]
    yellow = (band[..., 0] > 200) & (band[..., 1] > 200) & (band[..., 2] < 80)
    assert yellow.sum() > 200, "no burned-in warning in the banner"
    # The picture below is the overlay (colour from the heat map), not a blank.
    picture = pixels[64:-28].astype(int)
    assert np.abs(picture[..., 0] - picture[..., 2]).mean() > 2


def test_banner_text_is_the_card_warning():
    assert BANNER == "FOR RESEARCH - NOT FOR DIAGNOSIS"


def test_capture_only_for_flagged_studies(tmp_path):
    data, _ = _source()
    study, _ = _study(_predictions([data], ["ok"], [(0.9, 0.06, 0.04)]))
    assert assessed(study) and not study["flagged"] and not wants_capture(study)
    with pytest.raises(ValueError, match="only flagged"):
        build_capture(
            study, pydicom.dcmread(io.BytesIO(data)), MODEL, overlay=_overlay(data), threshold=THRESHOLD
        )
    # The not-flagged study still gets its SR, finding Normal and Flagged No.
    sr = build_sr(study, pydicom.dcmread(io.BytesIO(data)), MODEL, run_id=RUN_ID, threshold=THRESHOLD)
    items = _items(_group(pydicom.dcmread(_save(sr, tmp_path / "sr.dcm"))))
    assert items["Finding"].ConceptCodeSequence[0].CodeValue == "17621005"
    assert items["Flagged: P(pneumonia) >= threshold"].ConceptCodeSequence[0].CodeMeaning == "No"


# ----------------------------------------------------------------------------- UIDs


def test_uids_are_deterministic_per_study_and_model_version(scored):
    study_uid = scored["tags"].study_instance_uid
    a = result_uids(study_uid, MODEL.version)
    assert a == result_uids(study_uid, MODEL.version)
    other_model = result_uids(study_uid, "resnet18-0123456789ab")
    other_study = result_uids(study_uid + ".1", MODEL.version)
    uids = [a.sr_series_uid, a.sr_sop_uid, a.sc_series_uid, a.sc_sop_uid]
    assert len(set(uids)) == 4
    for b in (other_model, other_study):
        assert not set(uids) & {b.sr_series_uid, b.sr_sop_uid, b.sc_series_uid, b.sc_sop_uid}
    for uid in uids:
        assert pydicom.uid.UID(uid).is_valid and uid.startswith("2.25.") and len(uid) <= 64
    assert a.device_uid == other_study.device_uid != other_model.device_uid


def test_a_rerun_rebuilds_the_same_objects(scored):
    """Another run of the same model writes the same SOP instances (the PACS keeps one);
    only the run id inside differs."""
    source = pydicom.dcmread(io.BytesIO(scored["data"]))
    first = build_sr(scored["study"], source, MODEL, run_id=RUN_ID, threshold=THRESHOLD)
    again = build_sr(scored["study"], source, MODEL, run_id="run-2026-12-03", threshold=THRESHOLD)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    newer = ModelInfo(
        name=MODEL.name,
        version="mobilenet_v2-fedcba987654",
        weights_sha256="fe" * 32,
        software_version="0.1.0",
    )
    study = {**scored["study"], "model_version": newer.version}
    third = build_sr(study, source, newer, run_id=RUN_ID, threshold=THRESHOLD)
    assert third.SOPInstanceUID != first.SOPInstanceUID and third.SeriesInstanceUID != first.SeriesInstanceUID


# ----------------------------------------------------------------------------- pseudonyms, skipped


def test_pseudonymised_rows_give_objects_with_the_pseudonyms_only(scored, tmp_path):
    key = b"k" * 32
    data = scored["data"]
    predictions = pseudonymize_table(_predictions([data], ["ok"], [(0.08, 0.71, 0.21)]), key)
    study, driving = _study(predictions)
    source = SourceRef.from_row(driving)
    sr = build_sr(study, source, MODEL, run_id=RUN_ID, threshold=THRESHOLD)
    sc = build_capture(study, source, MODEL, overlay=_overlay(data), threshold=THRESHOLD)
    tags = scored["tags"]
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == study["study_instance_uid"] != tags.study_instance_uid
        assert ds.PatientID == study["patient_id"] == driving["patient_id"] != tags.patient_id
        assert ds.AccessionNumber == driving["accession_number"] != tags.accession_number
        raw = _save(ds, tmp_path / "x.dcm").read_bytes()
        for real in tags.identifiers:
            assert real.encode() not in raw
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == driving["sop_instance_uid"]
    # A real source with a pseudonymised row (or the reverse) is refused, never mixed.
    with pytest.raises(ValueError, match="different studies"):
        build_sr(study, pydicom.dcmread(io.BytesIO(data)), MODEL, run_id=RUN_ID, threshold=THRESHOLD)


def test_skipped_and_error_studies_get_no_finding():
    adult, _ = _source(Tags(modality="DX", patient_age="045Y"))
    skipped, _ = _study(_predictions([adult], ["skipped"], [(0.1, 0.8, 0.1)]))
    assert skipped["scored"] == 0 and skipped["pred_label"] is None and not assessed(skipped)
    data, _ = _source()
    error, _ = _study(_predictions([data], ["error"], [(0.1, 0.8, 0.1)]))
    assert error["errors"] == 1 and not assessed(error)
    for study, raw in ((skipped, adult), (error, data)):
        source = pydicom.dcmread(io.BytesIO(raw))
        with pytest.raises(ValueError, match="no scored image"):
            build_sr(study, source, MODEL, run_id=RUN_ID, threshold=THRESHOLD)
        with pytest.raises(ValueError, match="no scored image"):
            build_capture(study, source, MODEL, overlay=_overlay(raw), threshold=THRESHOLD)
        assert not wants_capture(study)


def test_a_row_of_another_model_version_is_refused(scored):
    study = {**scored["study"], "model_version": "resnet18-0123456789ab"}
    with pytest.raises(ValueError, match="another model version"):
        build_sr(study, SourceRef.from_row(scored["driving"]), MODEL, run_id=RUN_ID, threshold=THRESHOLD)


def test_multi_image_study_references_the_driving_image(tmp_path):
    """A PA and a lateral of one study: the SR's source image is the frontal one."""
    jpegs = real_jpegs(2)
    base = Tags(modality="DX")
    lateral = Tags(
        modality="DX",
        view_position="LL",
        study_instance_uid=base.study_instance_uid,
        series_instance_uid=base.series_instance_uid,
    )
    files = [make_image(jpegs[1], lateral), make_image(jpegs[0], base)]
    # The lateral is outside the intended use (skipped) even though its P(pneumonia) is higher.
    study, driving = _study(_predictions(files, ["skipped", "ok"], [(0.01, 0.98, 0.01), (0.3, 0.5, 0.2)]))
    assert driving["sop_instance_uid"] == base.sop_instance_uid and study["images"] == 2
    evidence = [SourceRef.from_dataset(pydicom.dcmread(io.BytesIO(f))) for f in files]
    sr = build_sr(
        study, SourceRef.from_row(driving), MODEL, run_id=RUN_ID, threshold=THRESHOLD, evidence=evidence
    )
    back = pydicom.dcmread(_save(sr, tmp_path / "sr.dcm"))
    ref = _items(_group(back))["Source of Measurement"].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == base.sop_instance_uid
    listed = (
        back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    )
    assert sorted(i.ReferencedSOPInstanceUID for i in listed) == sorted(
        [base.sop_instance_uid, lateral.sop_instance_uid]
    )
    assert gray_pixels(jpegs[0]).ndim == 2  # the real image data was used


# ----------------------------------------------------------------------------- a real PACS


def test_stow_into_orthanc_lands_in_the_source_study_once(orthanc, scored):
    """STOW-RS the SR and SC into a real Orthanc holding the source: QIDO finds them in the
    source study (ModalitiesInStudy, series by modality), the SR's reference resolves to the
    stored source instance, and storing them again adds nothing."""
    from dicomweb_client.api import DICOMwebClient

    orthanc.clear()
    orthanc.upload(scored["data"])
    source = pydicom.dcmread(io.BytesIO(scored["data"]))
    study = scored["study"]
    sr = build_sr(study, source, MODEL, run_id=RUN_ID, threshold=THRESHOLD, intended_use="in_scope")
    sc = build_capture(study, source, MODEL, overlay=_overlay(scored["data"]), threshold=THRESHOLD)
    client = DICOMwebClient(url=orthanc.dicomweb_url)
    client.store_instances([sr, sc])
    assert orthanc.count_instances() == 3
    study_uid = source.StudyInstanceUID
    (found,) = client.search_for_studies(
        search_filters={"StudyInstanceUID": study_uid}, fields=["ModalitiesInStudy"]
    )
    modalities = set(pydicom.Dataset.from_json(found).ModalitiesInStudy)
    assert {"SR", "OT"} <= modalities and source.Modality in modalities
    (sr_series,) = client.search_for_series(study_uid, search_filters={"Modality": "SR"})
    assert pydicom.Dataset.from_json(sr_series).SeriesInstanceUID == sr.SeriesInstanceUID
    stored = pydicom.dcmread(io.BytesIO(orthanc.file_of(sr.SOPInstanceUID)))
    ref = _items(_group(stored))["Source of Measurement"].ReferencedSOPSequence[0]
    (hit,) = client.search_for_instances(
        study_uid, search_filters={"SOPInstanceUID": ref.ReferencedSOPInstanceUID}
    )
    assert pydicom.Dataset.from_json(hit).SOPClassUID == source.SOPClassUID
    # A rerun builds the same UIDs: the archive still holds one SR and one SC.
    again = build_sr(
        study, source, MODEL, run_id="run-2026-12-03", threshold=THRESHOLD, intended_use="in_scope"
    )
    client.store_instances([again, sc])
    assert orthanc.count_instances() == 3
