"""What every written-back object carries: the source image, the model, the codes.

``SourceRef`` is the driving image of a study as the SR, the secondary capture and the FHIR
resources see it: its UIDs and the patient / study identifiers copied into the new objects.
The predictions table keeps the UIDs, ``patient_id``, ``accession_number``, ``study_date``,
``patient_sex`` and ``modality`` (``SourceRef.from_row``); it does not keep
``PatientName``, ``PatientBirthDate``, ``StudyTime``, ``StudyID`` or ``ReferringPhysicianName``
(type 2 in the Patient and General Study modules). A PACS that reconciles demographics wants
them equal to its own, so delivery asks the target for the study (QIDO-RS or a STUDY-level
C-FIND) and fills them with ``with_study_attributes``; when the target does not know the study
(or answers about another patient) they are written empty, which keeps the objects valid.
Identifiers come from the ``SourceRef`` only, never from the study row, so an object made from
a pseudonymised source carries the pseudonyms and nothing else.

Codes (SNOMED CT, checked against the SNOMED CT browser's concept ids):
``17621005`` Normal (qualifier value), ``233604007`` Pneumonia (disorder), ``53084003``
Bacterial pneumonia (disorder), ``75570004`` Viral pneumonia (disorder), ``399208008``
Plain chest X-ray (procedure), ``373066001`` / ``373067005`` Yes / No. DICOM (DCM):
``121071`` Finding, ``121106`` Comment. IHE AI Results' purpose of the Contributing
Equipment is ``(Newcode1, 99IHE, "Processing Algorithm")``, the code the profile defines
until DICOM assigns one (MONAI Deploy writes the same). Concepts with no standard code (the
class probabilities, the flag, the intended-use outcome) use the private scheme
``99CXRRAY``, declared in each object's Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from cxr_ray.labels import LABELS
from cxr_ray.models.card import ModelCard

__all__ = [
    "CAUTION",
    "CLASS_CODES",
    "MANUFACTURER",
    "PRIVATE_SCHEME",
    "STUDY_ATTRIBUTES",
    "ModelInfo",
    "SourceRef",
    "assessed",
    "coding_schemes",
    "contributing_equipment",
    "private_code",
]

MANUFACTURER = "cxr-ray"
#: The warning every object carries (SR text, SC burned-in text and header, FHIR note).
CAUTION = "CAUTION: Not for diagnostic use. FOR RESEARCH - NOT FOR DIAGNOSIS."
PRIVATE_SCHEME = "99CXRRAY"
#: Patient / General Study attributes the predictions table does not keep; delivery asks the
#: target PACS for them (``SourceRef.with_study_attributes``). PatientID and StudyInstanceUID
#: are asked too, to check that the answer is about the scored study and patient.
STUDY_ATTRIBUTES = (
    "StudyInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "StudyTime",
    "StudyID",
    "ReferringPhysicianName",
)
_IHE_SCHEME = "99IHE"

PNEUMONIA = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
#: The predicted class as a SNOMED CT concept.
CLASS_CODES: dict[str, hd.sr.CodedConcept] = {
    "normal": hd.sr.CodedConcept("17621005", "SCT", "Normal"),
    "bacterial": hd.sr.CodedConcept("53084003", "SCT", "Bacterial pneumonia"),
    "viral": hd.sr.CodedConcept("75570004", "SCT", "Viral pneumonia"),
}
assert set(CLASS_CODES) == set(LABELS), "a class without a SNOMED CT code"
YES = hd.sr.CodedConcept(codes.SCT.Yes.value, "SCT", "Yes")
NO = hd.sr.CodedConcept(codes.SCT.No.value, "SCT", "No")
PROCESSING_ALGORITHM = hd.sr.CodedConcept("Newcode1", _IHE_SCHEME, "Processing Algorithm")


def private_code(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of the private ``99CXRRAY`` scheme (values at most 16 characters, SH)."""
    return hd.sr.CodedConcept(value, PRIVATE_SCHEME, meaning)


def coding_schemes() -> pydicom.Sequence:
    """Coding Scheme Identification Sequence items for the two private schemes used."""
    items = []
    for designator, name, party in (
        (PRIVATE_SCHEME, "cxr-ray result concepts", MANUFACTURER),
        (_IHE_SCHEME, "IHE Radiology placeholder codes", "IHE"),
    ):
        item = pydicom.Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeName = name
        item.CodingSchemeResponsibleOrganization = party
        items.append(item)
    return pydicom.Sequence(items)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The algorithm as the objects identify it (IHE AIR: manufacturer, model, version)."""

    #: The architecture (``mobilenet_v2``): the model name.
    name: str
    #: ``ModelCard.version``: the key of every ledger and of the result UIDs.
    version: str
    weights_sha256: str
    #: cxr-ray's own version.
    software_version: str
    intended_use: str = ""

    @classmethod
    def from_card(cls, card: ModelCard) -> ModelInfo:
        return cls(
            name=card.arch,
            version=card.version,
            weights_sha256=card.weights_sha256,
            software_version=card.package_version,
            intended_use=card.intended_use_statement,
        )


def contributing_equipment(model: ModelInfo) -> list[hd.ContributingEquipment]:
    """IHE AIR's Contributing Equipment item: purpose Processing Algorithm, the model."""
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name[:64],
        software_versions=[model.version[:64], model.software_version[:64]],
        device_serial_number=model.weights_sha256[:64],
        contribution_description="pneumonia classification (normal, bacterial, viral); " + CAUTION,
    )
    # highdicom accepts only DICOM CID 7005 purposes; IHE AIR's code is set afterwards.
    # No DeviceUID here: dciodvfy's IOD tables do not list it in this sequence (a "Standard
    # Extended" warning); the device UID is the SR's Device Observer UID.
    equipment.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    return [equipment]


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _date(value: Any) -> str | None:
    """A DICOM DA string from a ``date``, a ``DA`` value or ``YYYYMMDD`` text."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        value = value.date()
    if isinstance(value, dt.date):
        return value.strftime("%Y%m%d")
    return str(value).replace("-", "")[:8] or None


def _orientation(value: Any) -> tuple[str, str] | None:
    parts = (
        [str(v).strip() for v in value]
        if isinstance(value, list | tuple | pydicom.multival.MultiValue)
        else []
    )
    return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else None


@dataclass(frozen=True, slots=True)
class SourceRef:
    """The driving image of a study: its UIDs and the identifiers the new objects copy."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_id: str | None = None
    referring_physician_name: str | None = None
    modality: str | None = None
    #: PatientOrientation (0020,0020) of the source, e.g. ``("L", "F")``; None when unknown.
    patient_orientation: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        missing = [f.name for f in fields(self)[:4] if not getattr(self, f.name)]
        if missing:
            raise ValueError(f"the source image lacks {', '.join(missing)}")

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SourceRef:
        """From a predictions row (``PREDICTIONS_SCHEMA`` column names) of the driving image."""
        return cls(
            study_instance_uid=row.get("study_instance_uid") or "",
            series_instance_uid=row.get("series_instance_uid") or "",
            sop_instance_uid=row.get("sop_instance_uid") or "",
            sop_class_uid=row.get("sop_class_uid") or "",
            patient_id=_text(row.get("patient_id")),
            patient_sex=_text(row.get("patient_sex")),
            accession_number=_text(row.get("accession_number")),
            study_date=_date(row.get("study_date")),
            modality=_text(row.get("modality")),
        )

    @classmethod
    def from_dataset(cls, ds: pydicom.Dataset) -> SourceRef:
        """From the driving image's header (a file, WADO-RS metadata or a C-FIND answer)."""

        def get(keyword: str) -> str | None:
            return _text(ds.get(keyword))

        return cls(
            study_instance_uid=get("StudyInstanceUID") or "",
            series_instance_uid=get("SeriesInstanceUID") or "",
            sop_instance_uid=get("SOPInstanceUID") or "",
            sop_class_uid=get("SOPClassUID") or "",
            patient_id=get("PatientID"),
            patient_name=get("PatientName"),
            patient_birth_date=_date(get("PatientBirthDate")),
            patient_sex=get("PatientSex"),
            accession_number=get("AccessionNumber"),
            study_date=_date(get("StudyDate")),
            study_time=get("StudyTime"),
            study_id=get("StudyID"),
            referring_physician_name=get("ReferringPhysicianName"),
            modality=get("Modality"),
            patient_orientation=_orientation(ds.get("PatientOrientation")),
        )

    def with_study_attributes(self, answer: pydicom.Dataset | None) -> SourceRef:
        """Fill the attributes the predictions table does not keep (``STUDY_ATTRIBUTES``:
        PatientName, PatientBirthDate, StudyTime, StudyID, ReferringPhysicianName) from the
        PACS's study-level answer, so its demographics reconciliation sees its own values.

        Only from an answer about this study and this patient (same StudyInstanceUID, and the
        same PatientID as the scored image's header): an answer that disagrees is ignored and
        the objects keep these attributes empty, never another patient's values."""
        if answer is None:
            return self
        study = _text(answer.get("StudyInstanceUID"))
        patient = _text(answer.get("PatientID"))
        if study != self.study_instance_uid or patient != self.patient_id:
            return self
        return replace(
            self,
            patient_name=_text(answer.get("PatientName")),
            patient_birth_date=_date(_text(answer.get("PatientBirthDate"))),
            study_time=_text(answer.get("StudyTime")),
            study_id=_text(answer.get("StudyID")),
            referring_physician_name=_text(answer.get("ReferringPhysicianName")),
        )

    def to_dataset(self) -> pydicom.Dataset:
        """A header-only dataset: the evidence highdicom copies patient and study from."""
        ds = pydicom.Dataset()
        ds.StudyInstanceUID = self.study_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.SOPClassUID = self.sop_class_uid
        ds.PatientID = self.patient_id or ""
        ds.PatientName = self.patient_name or ""
        ds.PatientBirthDate = self.patient_birth_date or ""
        ds.PatientSex = self.patient_sex or ""
        ds.AccessionNumber = self.accession_number or ""
        ds.StudyDate = self.study_date or ""
        ds.StudyTime = self.study_time or ""
        ds.StudyID = self.study_id or ""
        ds.ReferringPhysicianName = self.referring_physician_name or ""
        if self.modality:
            ds.Modality = self.modality
        return ds


def assessed(study: Mapping[str, Any]) -> bool:
    """Whether a study row has a result to write (a scored driving image).

    Skipped and error studies (no scored image) get no SR, no SC and no FHIR finding: an AI
    object saying "not assessed" in every out-of-scope study would put a series the reader
    must open into each of them, with nothing clinical in it; the reason stays in
    ``studies.parquet`` and the run report, where the administrator looks.
    """
    return bool(study.get("scored")) and study.get("pred_label") in CLASS_CODES
