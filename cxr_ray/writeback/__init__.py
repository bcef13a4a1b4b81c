"""Results back where radiologists look: DICOM SR, Grad-CAM secondary capture, FHIR.

Builders (this package's ``uids``, ``sr``, ``capture``, ``fhir`` modules) turn a
``studies.parquet`` row, its driving image (``SourceRef``) and the model (``ModelInfo``) into
objects; delivery to a PACS (STOW-RS, C-STORE) lives beside them. Layer: below the CLI, a
sibling of training and site; it imports scoring, models and below, never the other way.
"""

from cxr_ray.writeback.context import CAUTION, ModelInfo, SourceRef, assessed
from cxr_ray.writeback.sr import build_sr
from cxr_ray.writeback.uids import ResultUIDs, result_uids

__all__ = ["CAUTION", "ModelInfo", "ResultUIDs", "SourceRef", "assessed", "build_sr", "result_uids"]
