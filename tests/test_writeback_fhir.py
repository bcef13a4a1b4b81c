"""FHIR resources of a scored study (cxr_ray.writeback.fhir), validated by fhir.resources.

The study rows come from DICOM files made from the real Kermany images through the real
header parser and study table (``tests.test_writeback_objects`` helpers). Each resource read
back from the NDJSON is parsed again by its ``fhir.resources`` model (FHIR R5), and the
references between them resolve inside the file.
"""

from __future__ import annotations

import datetime as dt
import io
import json

import pydantic
import pydicom
import pytest
from fhir.resources.device import Device
from fhir.resources.diagnosticreport import DiagnosticReport
from fhir.resources.imagingselection import ImagingSelection
from fhir.resources.observation import Observation

from cxr_ray.scoring.pseudonymize import pseudonymize_table
from cxr_ray.scoring.studies import study_table
from cxr_ray.writeback import SourceRef, result_uids, study_resources, write_ndjson
from cxr_ray.writeback import fhir as wfhir
from tests.dicom_factory import Tags
from tests.test_writeback_objects import MODEL, THRESHOLD, _predictions, _source, _study

MODELS = {
    "Device": Device,
    "DiagnosticReport": DiagnosticReport,
    "ImagingSelection": ImagingSelection,
    "Observation": Observation,
}
ISSUED = dt.datetime(2026, 12, 2, 21, 0, tzinfo=dt.UTC)
IG = "http://hl7.org/fhir/uv/dicom-sr/StructureDefinition/"


@pytest.fixture(scope="module")
def case():
    data, tags = _source()
    study, driving = _study(_predictions([data], ["ok"], [(0.12, 0.18, 0.70)]))
    source = pydicom.dcmread(io.BytesIO(data))
    resources = study_resources(
        study, source, MODEL, threshold=THRESHOLD, intended_use=driving["intended_use"], issued=ISSUED
    )
    return {"data": data, "tags": tags, "study": study, "driving": driving, "resources": resources}


def _by_type(resources):
    out: dict[str, list[dict]] = {}
    for r in resources:
        out.setdefault(r["resourceType"], []).append(r)
    return out


def _observation(resources, profile):
    return [
        r for r in resources if r["resourceType"] == "Observation" and r["meta"]["profile"] == [IG + profile]
    ]


def test_resources_validate_and_follow_the_sr_mapping(case, tmp_path):
    resources, study, tags = case["resources"], case["study"], case["tags"]
    kinds = _by_type(resources)
    assert {k: len(v) for k, v in kinds.items()} == {
        "Device": 1,
        "ImagingSelection": 1,
        "Observation": 7,  # group, flagged, intended use, 4 probabilities
        "DiagnosticReport": 1,
    }
    path = tmp_path / "results.fhir.ndjson"
    assert write_ndjson(resources, str(path)) == len(resources)
    lines = path.read_text().splitlines()
    for line in lines:
        resource = json.loads(line)
        MODELS[resource["resourceType"]].model_validate(resource)  # raises if invalid
    (group,) = _observation(resources, "imaging-measurement-group")
    assert group["code"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "233604007",
        "display": "Pneumonia",
    }
    assert study["pred_label"] == "viral"
    assert group["valueCodeableConcept"]["coding"][0]["code"] == "75570004"  # Viral pneumonia
    assert group["status"] == "preliminary"
    members = {m["reference"] for m in group["hasMember"]}
    assert members == {f"Observation/{o['id']}" for o in kinds["Observation"] if o is not group}
    # Every observation: partOf the ImagingStudy, basedOn the accession, subject the patient.
    for obs in kinds["Observation"]:
        (study_ref,) = obs["partOf"]
        assert study_ref["type"] == "ImagingStudy"
        assert study_ref["identifier"]["system"] == "urn:dicom:uid"
        assert study_ref["identifier"]["value"] == f"urn:oid:{tags.study_instance_uid}"
        assert study_ref["identifier"]["type"]["coding"][0]["code"] == "110180"
        (order,) = obs["basedOn"]
        assert order["identifier"]["value"] == tags.accession_number
        assert order["identifier"]["type"]["coding"][0]["code"] == "ACSN"
        assert obs["subject"]["identifier"]["value"] == tags.patient_id
        assert obs["issued"].startswith("2026-12-02T21:00:00")
        assert "NOT FOR DIAGNOSIS" in obs["note"][0]["text"]
    (flag,) = [
        o
        for o in _observation(resources, "imaging-qualitative-evaluation")
        if o["code"]["coding"][0]["code"] == "FLAGGED"
    ]
    assert flag["valueCodeableConcept"]["coding"][0]["code"] == "373066001"  # Yes
    assert flag["component"][0]["valueQuantity"]["value"] == THRESHOLD
    assert flag["category"][0]["coding"][0]["code"] == "C0034375"
    probabilities = {
        o["code"]["coding"][0]["code"]: o["valueQuantity"]["value"]
        for o in _observation(resources, "imaging-measurement")
    }
    assert probabilities == pytest.approx(
        {
            "P-NORMAL": study["prob_normal"],
            "P-BACTERIAL": study["prob_bacterial"],
            "P-VIRAL": study["prob_viral"],
            "P-PNEUMONIA": study["prob_pneumonia"],
        },
        abs=1e-6,
    )


def test_references_resolve_and_point_at_the_source(case):
    resources, tags = case["resources"], case["tags"]
    ids = {f"{r['resourceType']}/{r['id']}" for r in resources}
    text = json.dumps(resources)
    internal = [ref for ref in _references(resources) if "/" in ref]
    assert internal and all(ref in ids for ref in internal), "a reference to a resource not written"
    (selection,) = _by_type(resources)["ImagingSelection"]
    assert (selection["studyUid"], selection["seriesUid"]) == (
        tags.study_instance_uid,
        tags.series_instance_uid,
    )
    assert selection["instance"][0]["uid"] == tags.sop_instance_uid
    assert selection["instance"][0]["sopClass"]["code"] == f"urn:oid:{case['driving']['sop_class_uid']}"
    for obs in _by_type(resources)["Observation"]:
        assert obs["derivedFrom"] == [{"reference": f"ImagingSelection/{selection['id']}"}]
        assert obs["device"]["reference"].startswith("Device/")
    (device,) = _by_type(resources)["Device"]
    assert device["displayName"] == MODEL.name and device["manufacturer"] == "cxr-ray"
    assert {v["value"] for v in device["version"]} == {MODEL.version, MODEL.software_version}
    assert device["property"][0]["valueString"] == MODEL.weights_sha256
    uids = result_uids(tags.study_instance_uid, MODEL.version)
    assert device["identifier"][0]["value"] == f"urn:oid:{uids.device_uid}"
    (report,) = _by_type(resources)["DiagnosticReport"]
    assert report["identifier"][0]["value"] == f"urn:oid:{uids.sr_sop_uid}"  # the SR it mirrors
    assert report["study"][0]["identifier"]["value"] == f"urn:oid:{tags.study_instance_uid}"
    assert report["conclusionCode"][0]["coding"][0]["code"] == "75570004"
    assert report["status"] == "preliminary" and "NOT FOR DIAGNOSIS" in report["conclusion"]
    assert (
        report["result"][0]["reference"]
        == f"Observation/{_observation(resources, 'imaging-measurement-group')[0]['id']}"
    )
    assert tags.patient_name not in text  # the name is not needed by the mapping and not written


def _references(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference":
                yield v
            else:
                yield from _references(v)
    elif isinstance(node, list):
        for v in node:
            yield from _references(v)


def test_ids_are_deterministic_and_ndjson_writes_one_device(case, tmp_path):
    again = study_resources(
        case["study"],
        pydicom.dcmread(io.BytesIO(case["data"])),
        MODEL,
        threshold=THRESHOLD,
        intended_use=case["driving"]["intended_use"],
        issued=ISSUED,
    )
    assert again == case["resources"]
    data2, _ = _source(Tags(modality="DX"))
    study2, _ = _study(_predictions([data2], ["ok"], [(0.7, 0.2, 0.1)]))
    second = study_resources(
        study2, pydicom.dcmread(io.BytesIO(data2)), MODEL, threshold=THRESHOLD, issued=ISSUED
    )
    first_ids = {r["id"] for r in case["resources"] if r["resourceType"] != "Device"}
    assert not first_ids & {r["id"] for r in second if r["resourceType"] != "Device"}
    path = tmp_path / "fhir.ndjson"
    n = write_ndjson([*case["resources"], *second], str(path))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == len(lines) == len(case["resources"]) + len(second) - 1
    assert sum(r["resourceType"] == "Device" for r in lines) == 1
    # No intended-use observation without the column; a not-flagged study says No.
    assert not [
        r
        for r in second
        if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == "INTENDED-USE"
    ]
    flag = next(
        r
        for r in second
        if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == "FLAGGED"
    )
    assert flag["valueCodeableConcept"]["coding"][0]["display"] == "No"


def test_pseudonymised_source_gives_pseudonyms(case):
    key = b"q" * 32
    predictions = pseudonymize_table(_predictions([case["data"]], ["ok"], [(0.12, 0.18, 0.70)]), key)
    study, driving = _study(predictions)
    resources = study_resources(study, SourceRef.from_row(driving), MODEL, threshold=THRESHOLD, issued=ISSUED)
    text = json.dumps(resources)
    tags = case["tags"]
    for real in tags.identifiers:
        assert real not in text
    assert (
        study["study_instance_uid"] in text
        and driving["patient_id"] in text
        and driving["accession_number"] in text
    )


def test_skipped_study_gets_no_resources():
    adult, _ = _source(Tags(modality="DX", patient_age="045Y"))
    study, _ = _study(_predictions([adult], ["skipped"], [(0.1, 0.8, 0.1)]))
    with pytest.raises(ValueError, match="no scored image"):
        study_resources(study, pydicom.dcmread(io.BytesIO(adult)), MODEL, threshold=THRESHOLD)


def test_an_invalid_resource_is_refused():
    """The models validate structure (required elements, known elements, types): a missing
    status or an R4-shaped element is an error. They do not check code value sets (a status
    of "maybe" passes), so the statuses written are fixed in the code, and tested above."""
    with pytest.raises(pydantic.ValidationError, match="status"):
        wfhir._validated({"resourceType": "Observation", "code": {"text": "x"}})
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
        wfhir._validated(
            {
                "resourceType": "DiagnosticReport",
                "status": "final",
                "code": {"text": "x"},
                "conclusionCode": [{"concept": {"text": "x"}}],
            }
        )


def test_a_runs_ndjson_has_the_assessed_studies_only(tmp_path):
    """``run_resources`` over a run's tables: two scored studies and a skipped one."""
    files = [_source()[0], _source()[0], _source(Tags(modality="DX", patient_age="045Y"))[0]]
    predictions = _predictions(
        files, ["ok", "ok", "skipped"], [(0.1, 0.8, 0.1), (0.9, 0.05, 0.05), (0.1, 0.1, 0.8)]
    )
    studies = study_table(predictions)
    resources = wfhir.run_resources(studies, predictions, MODEL, threshold=THRESHOLD)
    path = tmp_path / wfhir.FHIR_NDJSON
    n = write_ndjson(resources, str(path))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == len(lines)
    reports = [r for r in lines if r["resourceType"] == "DiagnosticReport"]
    assert len(reports) == 2 and sum(r["resourceType"] == "Device" for r in lines) == 1
    skipped_uid = pydicom.dcmread(io.BytesIO(files[2])).StudyInstanceUID
    assert skipped_uid not in path.read_text()
    codes = sorted(r["conclusionCode"][0]["coding"][0]["code"] for r in reports)
    assert codes == ["17621005", "53084003"]  # normal, bacterial
