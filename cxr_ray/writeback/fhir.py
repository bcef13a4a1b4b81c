"""FHIR R5 resources of one scored study, for the EHR, as NDJSON in the run folder.

Built as plain dicts and validated by constructing the ``fhir.resources`` 8.3 models (FHIR
5.0.0, the version HL7's "DICOM SR to FHIR Resource Mapping" IG is written on); what is
returned is the model's own JSON. Following that IG's mapping of a TID 1500 report:

- ``Device`` (profile ``algorithm-identification``, TID 4019): the model: name, version,
  cxr-ray's version, the weights SHA-256 as a property, the caution as a note. One per model
  version (the id and ``urn:dicom:uid`` identifier are the SR's device observer UID).
- ``Observation`` ``imaging-measurement-group`` (TID 1501): code Pneumonia (SCT 233604007),
  value the predicted class (SNOMED CT as in the SR), ``hasMember`` the others;
- ``Observation`` ``imaging-qualitative-evaluation`` (category UMLS C0034375): "Flagged"
  (Yes / No, with the threshold and P(pneumonia) as components) and the intended-use check;
- ``Observation`` ``imaging-measurement``: P(normal), P(bacterial), P(viral), P(pneumonia),
  UCUM ``1``;
- ``ImagingSelection``: the driving image (study, series, SOP instance and class UIDs), the
  observations' ``derivedFrom``;
- ``DiagnosticReport``: status preliminary, code LOINC 18748-4 (Diagnostic imaging study),
  ``result`` the group, ``study`` the ImagingStudy, ``conclusionCode`` the class, the SR's SOP
  Instance UID as identifier, the caution in ``conclusion``.

Every observation is ``partOf`` the ImagingStudy (identifier type DCM 110180, system
``urn:dicom:uid``, value ``urn:oid:<StudyInstanceUID>``), ``basedOn`` the ServiceRequest
whose identifier is the accession number (type v2-0203 ACSN) when there is one, ``subject``
the Patient by its identifier (the PatientID), ``device`` the Device; the IG assumes the
Patient, ImagingStudy and ServiceRequest already exist at the EHR, so they are logical
references, not resources written here. Status is ``preliminary`` (unverified, as the SR).
Identifiers come from the ``SourceRef`` as in the SR (pseudonyms stay pseudonyms), and ids
are derived like the DICOM UIDs from (study, model version), so rewriting a run's NDJSON
gives the same ids.

A run's file: ``write_ndjson(run_resources(studies, predictions, model, threshold=t),
storage.join(run_dir, FHIR_NDJSON))`` (one Device, then each assessed DICOM study's
resources; skipped, error and non-DICOM studies write nothing).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pydicom
from fhir.resources.device import Device
from fhir.resources.diagnosticreport import DiagnosticReport
from fhir.resources.imagingselection import ImagingSelection
from fhir.resources.observation import Observation

from cxr_ray.writeback.context import (
    CAUTION,
    CLASS_CODES,
    MANUFACTURER,
    PNEUMONIA,
    ModelInfo,
    SourceRef,
    assessed,
)
from cxr_ray.writeback.sr import FLAGGED, INTENDED_USE, INTENDED_USE_CODES, check_study, source_ref
from cxr_ray.writeback.uids import ResultUIDs, derived_id, result_uids

__all__ = ["FHIR_NDJSON", "run_resources", "study_resources", "write_ndjson", "write_run_fhir"]

#: The file name in the run folder (``write_ndjson(run_resources(...), join(run_dir, FHIR_NDJSON))``).
FHIR_NDJSON = "results.fhir.ndjson"

_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "99CXRRAY": "urn:cxr-ray:codes",
}
_IG = "http://hl7.org/fhir/uv/dicom-sr/StructureDefinition/"
_MODELS: dict[str, Any] = {
    "Device": Device,
    "Observation": Observation,
    "ImagingSelection": ImagingSelection,
    "DiagnosticReport": DiagnosticReport,
}
_PROBABILITIES = (
    ("prob_normal", "P-NORMAL", "Probability of normal"),
    ("prob_bacterial", "P-BACTERIAL", "Probability of bacterial pneumonia"),
    ("prob_viral", "P-VIRAL", "Probability of viral pneumonia"),
    ("prob_pneumonia", "P-PNEUMONIA", "Probability of pneumonia"),
)


def _coding(code: Any) -> dict[str, str]:
    """A FHIR Coding of a highdicom / pydicom code."""
    system = _SYSTEMS[code.scheme_designator]
    return {"system": system, "code": code.value, "display": code.meaning}


def _concept(code: Any) -> dict[str, Any]:
    return {"coding": [_coding(code)], "text": code.meaning}


def _quantity(value: Any) -> dict[str, Any]:
    return {"value": round(float(value), 6), "unit": "1", "system": _SYSTEMS["UCUM"], "code": "1"}


def _context(ref: SourceRef, device_id: str, issued: str) -> dict[str, Any]:
    """The fields every observation shares: patient, study, order, device, time, status."""
    context: dict[str, Any] = {
        "status": "preliminary",
        "subject": _patient(ref),
        "partOf": [
            {
                "type": "ImagingStudy",
                "identifier": {
                    "type": {"coding": [{**_coding(_Code("110180", "DCM", "Study Instance UID"))}]},
                    "system": "urn:dicom:uid",
                    "value": f"urn:oid:{ref.study_instance_uid}",
                },
            }
        ],
        "device": {"reference": f"Device/{device_id}"},
        "issued": issued,
        "note": [{"text": CAUTION}],
    }
    if ref.accession_number:
        context["basedOn"] = [_service_request(ref.accession_number)]
    return context


class _Code:
    """A (value, scheme, meaning) triple shaped like pydicom's ``Code``."""

    def __init__(self, value: str, scheme_designator: str, meaning: str) -> None:
        self.value, self.scheme_designator, self.meaning = value, scheme_designator, meaning


def _patient(ref: SourceRef) -> dict[str, Any]:
    if not ref.patient_id:
        return {"type": "Patient", "display": "patient not identified in the source image"}
    mr = {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}
    return {"type": "Patient", "identifier": {"type": {"coding": [mr]}, "value": ref.patient_id}}


def _service_request(accession: str) -> dict[str, Any]:
    acsn = {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
        "code": "ACSN",
        "display": "Accession ID",
    }
    return {"type": "ServiceRequest", "identifier": {"type": {"coding": [acsn]}, "value": accession}}


def _device(model: ModelInfo, uids: ResultUIDs) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "id": derived_id("fhir-device", model.version),
        "meta": {"profile": [_IG + "algorithm-identification"]},
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uids.device_uid}"}],
        "displayName": model.name,
        "manufacturer": MANUFACTURER,
        "version": [
            {"value": model.version},
            {"type": {"text": "software"}, "value": model.software_version},
        ],
        "property": [{"type": {"text": "weights_sha256"}, "valueString": model.weights_sha256}],
        "note": [{"text": CAUTION}],
    }


def _selection(ref: SourceRef, key: tuple[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "ImagingSelection",
        "id": derived_id("fhir-selection", *key),
        "status": "available",
        "subject": _patient(ref),
        "code": {"text": "driving image of the study result"},
        "studyUid": ref.study_instance_uid,
        "seriesUid": ref.series_instance_uid,
        "instance": [
            {
                "uid": ref.sop_instance_uid,
                "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{ref.sop_class_uid}"},
            }
        ],
    }


def _observations(
    study: Mapping[str, Any],
    context: dict[str, Any],
    key: tuple[str, str],
    *,
    threshold: float,
    intended_use: str | None,
) -> list[dict[str, Any]]:
    """The group observation first, then its members."""

    def observation(name: str, profile: str, **fields: Any) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "id": derived_id("fhir-observation", name, *key),
            "meta": {"profile": [_IG + profile]},
            **context,
            **fields,
        }

    qualitative = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/umls", "code": "C0034375"}]}
    members = [
        observation(
            "flagged",
            "imaging-qualitative-evaluation",
            category=[qualitative],
            code=_concept(FLAGGED),
            valueCodeableConcept=_concept(
                _Code(*(("373066001", "SCT", "Yes") if study.get("flagged") else ("373067005", "SCT", "No")))
            ),
            component=[
                {"code": {"text": "Pneumonia flag threshold"}, "valueQuantity": _quantity(threshold)},
            ],
        )
    ]
    if intended_use in INTENDED_USE_CODES:
        members.append(
            observation(
                "intended-use",
                "imaging-qualitative-evaluation",
                category=[qualitative],
                code=_concept(INTENDED_USE),
                valueCodeableConcept=_concept(INTENDED_USE_CODES[intended_use]),
            )
        )
    for column, code, meaning in _PROBABILITIES:
        if study.get(column) is not None:
            members.append(
                observation(
                    column,
                    "imaging-measurement",
                    code=_concept(_Code(code, "99CXRRAY", meaning)),
                    valueQuantity=_quantity(study[column]),
                )
            )
    group = observation(
        "group",
        "imaging-measurement-group",
        category=[{"coding": [_coding(_Code("125007", "DCM", "Measurement Group"))]}],
        code=_concept(PNEUMONIA),
        valueCodeableConcept=_concept(CLASS_CODES[study["pred_label"]]),
        hasMember=[{"reference": f"Observation/{m['id']}"} for m in members],
    )
    return [group, *members]


def study_resources(
    study: Mapping[str, Any],
    source: SourceRef | pydicom.Dataset,
    model: ModelInfo,
    *,
    threshold: float,
    intended_use: str | None = None,
    issued: dt.datetime | None = None,
    uids: ResultUIDs | None = None,
) -> list[dict[str, Any]]:
    """Device, ImagingSelection, Observations and DiagnosticReport of one assessed study.

    Arguments as ``sr.build_sr``; ``issued`` (timezone-aware, default now) is the
    observation time. Each resource is validated by its ``fhir.resources`` model (a
    ``pydantic.ValidationError`` names the field); the dicts are the models' JSON.
    """
    ref = source_ref(source)
    check_study(study, ref, model)
    uids = uids or result_uids(ref.study_instance_uid, model.version)
    key = (model.version, ref.study_instance_uid)
    when = (issued or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds")
    device = _device(model, uids)
    selection = _selection(ref, key)
    context = _context(ref, device["id"], when)
    context["derivedFrom"] = [{"reference": f"ImagingSelection/{selection['id']}"}]
    observations = _observations(study, context, key, threshold=threshold, intended_use=intended_use)
    report = {
        "resourceType": "DiagnosticReport",
        "id": derived_id("fhir-report", *key),
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uids.sr_sop_uid}"}],
        "status": "preliminary",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
        ],
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}
            ]
        },
        "subject": context["subject"],
        "issued": when,
        "study": [context["partOf"][0]],
        "result": [{"reference": f"Observation/{observations[0]['id']}"}],
        "conclusion": f"{_conclusion(study, threshold)} {CAUTION}",
        "conclusionCode": [_concept(CLASS_CODES[study["pred_label"]])],
        **({"basedOn": context["basedOn"]} if "basedOn" in context else {}),
    }
    return [_validated(r) for r in (device, selection, *observations, report)]


def _conclusion(study: Mapping[str, Any], threshold: float) -> str:
    flag = "flagged" if study.get("flagged") else "not flagged"
    return (
        f"AI result: {CLASS_CODES[study['pred_label']].meaning}; P(pneumonia) "
        f"{float(study['prob_pneumonia']):.2f}, {flag} at threshold {threshold:g}."
    )


def run_resources(
    studies: pa.Table, predictions: pa.Table, model: ModelInfo, *, threshold: float
) -> list[dict[str, Any]]:
    """The resources of every assessed DICOM study of a run (``studies.parquet`` and the
    predictions it was built from); skipped, error and non-DICOM studies give none."""
    rows = [s for s in studies.to_pylist() if assessed(s) and s.get("study_instance_uid")]
    wanted = pa.array(sorted({s["driving_image_id"] for s in rows if s["driving_image_id"]}), pa.string())
    driving = predictions.filter(pc.is_in(predictions["image_id"], value_set=wanted)).to_pylist()
    # Keyed with the study: the same bytes (one image id) can sit in two studies.
    by_image = {(r["image_id"], r.get("study_instance_uid")): r for r in driving if r.get("sop_instance_uid")}
    out: list[dict[str, Any]] = []
    for study in rows:
        source = by_image.get((study["driving_image_id"], study["study_instance_uid"]))
        if source is not None:
            ref = SourceRef.from_row(source)
            out += study_resources(
                study, ref, model, threshold=threshold, intended_use=source.get("intended_use")
            )
    return out


def _validated(resource: dict[str, Any]) -> dict[str, Any]:
    model = _MODELS[resource["resourceType"]].model_validate(resource)
    out: dict[str, Any] = json.loads(model.model_dump_json())
    return out


def write_ndjson(resources: Iterable[Mapping[str, Any]], uri: str) -> int:
    """Write resources one per line (FHIR Bulk Data NDJSON); repeats of a
    (resourceType, id), such as one model's Device for every study, are written once.
    ``uri`` is a path or URI in the run folder (``cxr_ray.io.storage``, so S3 works too).
    Returns the number of lines."""
    seen: set[tuple[str, str]] = set()
    lines = []
    for resource in resources:
        key = (str(resource["resourceType"]), str(resource["id"]))
        if key in seen:
            continue
        seen.add(key)
        lines.append(json.dumps(resource, separators=(",", ":"), sort_keys=True))
    from cxr_ray.io import storage

    storage.write_bytes("".join(line + "\n" for line in lines).encode(), uri)
    return len(lines)


def write_run_fhir(out: str, model: ModelInfo, *, threshold: float) -> int:
    """``OUT/results.fhir.ndjson`` for the scoring run in ``out``: the resources of its
    assessed DICOM studies (``run_resources``), validated; no file when there are none (a run
    of plain image files has no ImagingStudy to refer to). Returns the number of lines."""
    from cxr_ray.io import storage

    studies = storage.read_table(storage.join(out, "studies.parquet"))
    if studies.num_rows == 0 or "study_instance_uid" not in studies.column_names:
        return 0
    if pc.count(studies["study_instance_uid"]).as_py() == 0:
        return 0
    predictions = storage.read_table(storage.join(out, "predictions.parquet"))
    resources = run_resources(studies, predictions, model, threshold=threshold)
    return write_ndjson(resources, storage.join(out, FHIR_NDJSON)) if resources else 0
