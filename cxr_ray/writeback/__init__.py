"""Results back where radiologists look: DICOM SR, Grad-CAM secondary capture, FHIR.

Builders (``uids``, ``sr``, ``capture``, ``fhir``) turn a ``studies.parquet`` row, its
driving image (``SourceRef``) and the model (``ModelInfo``) into objects; delivery to a PACS
(STOW-RS, C-STORE) lives beside them. Layer: below the CLI, a sibling of training and site;
it imports scoring, models and below, never the other way round.
"""

from cxr_ray.writeback.capture import build_capture, wants_capture
from cxr_ray.writeback.context import CAUTION, ModelInfo, SourceRef, assessed
from cxr_ray.writeback.fhir import FHIR_NDJSON, run_resources, study_resources, write_ndjson
from cxr_ray.writeback.sr import build_sr
from cxr_ray.writeback.uids import ResultUIDs, result_uids

__all__ = [
    "CAUTION",
    "FHIR_NDJSON",
    "ModelInfo",
    "ResultUIDs",
    "SourceRef",
    "assessed",
    "build_capture",
    "build_sr",
    "result_uids",
    "run_resources",
    "study_resources",
    "wants_capture",
    "write_ndjson",
]
