"""The DICOM Structured Report of one scored study (TID 1500 in a Comprehensive 3D SR).

**Why TID 1500 in Comprehensive 3D SR.** IHE AI Results (AIR) encodes AI findings as a
TID 1500 Imaging Measurement Report, and viewers that show AI results (OHIF's SR viewport,
the commercial PACS AI panels) read TID 1500 from Comprehensive 3D SR, which highdicom
builds and validates; a Basic Text SR (what MONAI Deploy's text writer makes) would carry
the result as prose no program can read back. The report has one measurement group
(TID 1501) for the study:

- Finding (DCM 121071, TID 1501's finding type) = the predicted class as SNOMED CT
  (``context.CLASS_CODES``: Normal, Bacterial pneumonia, Viral pneumonia);
- "Flagged" (99CXRRAY) = Yes / No: P(pneumonia) >= the flag threshold;
- "Intended-use check" (99CXRRAY) = the driving image's ``intended_use`` outcome
  (in scope, unchecked, overridden, ...);
- NUM probabilities P(normal), P(bacterial), P(viral), P(pneumonia) and the flag threshold,
  unit UCUM ``1`` (no units);
- the algorithm identification (TID 4019): model name, model version, and as parameters the
  weights SHA-256, the threshold and the run id;
- Source image for measurement group: the driving image (its SOP Class and Instance UID);
- procedure reported Plain chest X-ray (SCT 399208008), and a Comment (DCM 121106) with ``context.CAUTION``.

The observer is the model as a device (UID ``uids.device_uid``); the header says
CompletionFlag COMPLETE, VerificationFlag UNVERIFIED (no person signed it) and
PreliminaryFlag PRELIMINARY (a research result, not a final report), and the Contributing
Equipment Sequence names the algorithm (IHE AIR). Patient and study identifiers are copied
from the source (highdicom copies them from the evidence), so the SR lands in the source
study; its series (SeriesNumber 9901) and UIDs are ``uids.result_uids``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import pydicom

from cxr_ray.writeback.context import (
    CAUTION,
    CHEST_XRAY,
    CLASS_CODES,
    MANUFACTURER,
    NO,
    YES,
    ModelInfo,
    SourceRef,
    assessed,
    coding_schemes,
    contributing_equipment,
    private_code,
)
from cxr_ray.writeback.uids import ResultUIDs, result_uids

__all__ = ["SR_SERIES_NUMBER", "build_sr", "check_study", "source_ref"]

SR_SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "cxr-ray AI result - research, not for diagnosis"
_UNIT = hd.sr.CodedConcept("1", "UCUM", "no units")
_PROBABILITIES = (
    ("prob_normal", "P-NORMAL", "Probability of normal"),
    ("prob_bacterial", "P-BACTERIAL", "Probability of bacterial pneumonia"),
    ("prob_viral", "P-VIRAL", "Probability of viral pneumonia"),
    ("prob_pneumonia", "P-PNEUMONIA", "Probability of pneumonia"),
)
FLAGGED = private_code("FLAGGED", "Flagged: P(pneumonia) >= threshold")
THRESHOLD = private_code("THRESHOLD", "Pneumonia flag threshold")
INTENDED_USE = private_code("INTENDED-USE", "Intended-use check")
#: ``intended_use`` column values as codes (``cxr_ray.models.intended_use``).
INTENDED_USE_CODES: dict[str, hd.sr.CodedConcept] = {
    "in_scope": private_code("IN-SCOPE", "In scope"),
    "unchecked": private_code("UNCHECKED", "Unchecked (tags missing or not DICOM)"),
    "overridden": private_code("OVERRIDDEN", "Outside intended use, scored by research override"),
    "unparseable": private_code("UNPARSEABLE", "A checked tag malformed, scored by opt-in"),
    "out_of_scope": private_code("OUT-OF-SCOPE", "Outside intended use"),
}


def source_ref(source: SourceRef | pydicom.Dataset) -> SourceRef:
    return source if isinstance(source, SourceRef) else SourceRef.from_dataset(source)


def check_study(study: Mapping[str, Any], source: SourceRef, model: ModelInfo) -> None:
    """Refuse to write a result that is not the study's, not the model's, or not there."""
    if not assessed(study):
        raise ValueError("the study has no scored image: no result is written for it")
    if study.get("study_instance_uid") not in (None, source.study_instance_uid):
        # One pseudonymised and one real identifier, or a row of another study.
        raise ValueError("the study row and the source image are of different studies")
    if study.get("model_version") not in (None, model.version):
        raise ValueError("the study row was scored by another model version")


def _measurement(name: hd.sr.CodedConcept, value: Any) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=round(float(value), 6), unit=_UNIT)


def _group(
    study: Mapping[str, Any],
    source: SourceRef,
    model: ModelInfo,
    uids: ResultUIDs,
    *,
    run_id: str,
    threshold: float,
    intended_use: str | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    evaluations = [hd.sr.QualitativeEvaluation(FLAGGED, YES if study.get("flagged") else NO)]
    if intended_use in INTENDED_USE_CODES:
        evaluations.append(hd.sr.QualitativeEvaluation(INTENDED_USE, INTENDED_USE_CODES[intended_use]))
    measurements = [
        _measurement(private_code(code, meaning), study[key])
        for key, code, meaning in _PROBABILITIES
        if study.get(key) is not None
    ]
    measurements.append(_measurement(THRESHOLD, threshold))
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"weights_sha256={model.weights_sha256}", f"threshold={threshold:g}", f"run_id={run_id}"],
        manufacturer=MANUFACTURER,
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.sr_sop_uid + ".1", identifier="study result"),
        finding_type=CLASS_CODES[study["pred_label"]],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=source.sop_class_uid,
                referenced_sop_instance_uid=source.sop_instance_uid,
            )
        ],
    )
    caution = hd.sr.TextContentItem(
        name=hd.sr.CodedConcept("121106", "DCM", "Comment"),
        value=CAUTION,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    group[0].ContentSequence.append(caution)
    return group


def build_sr(
    study: Mapping[str, Any],
    source: SourceRef | pydicom.Dataset,
    model: ModelInfo,
    *,
    run_id: str,
    threshold: float,
    intended_use: str | None = None,
    evidence: Sequence[SourceRef | pydicom.Dataset] = (),
    uids: ResultUIDs | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR of one assessed study (a ``studies.parquet`` row as a mapping).

    ``source`` is the driving image (``driving_image_id``'s DICOM header or predictions row
    as ``SourceRef``); ``intended_use`` its ``intended_use`` column; ``evidence`` further
    instances of the study to list as evidence. ``ValueError`` for a skipped or error study
    (``context.assessed``), or a row of another study or model version.
    """
    ref = source_ref(source)
    check_study(study, ref, model)
    uids = uids or result_uids(ref.study_instance_uid, model.version)
    group = _group(study, ref, model, uids, run_id=run_id, threshold=threshold, intended_use=intended_use)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uids.device_uid, name=model.name, manufacturer_name=MANUFACTURER, model_name=model.version[:64]
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
                observer_identifying_attributes=device,
            )
        ),
        procedure_reported=CHEST_XRAY,
        imaging_measurements=[group],
    )
    others = [source_ref(s) for s in evidence]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[
            ref.to_dataset(),
            *(o.to_dataset() for o in others if o.sop_instance_uid != ref.sop_instance_uid),
        ],
        content=report[0],
        series_instance_uid=uids.sr_series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=contributing_equipment(model),
    )
    sr.SeriesDescription = SERIES_DESCRIPTION
    sr.CodingSchemeIdentificationSequence = coding_schemes()  # type: ignore[assignment]
    return sr
