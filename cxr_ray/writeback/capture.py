"""A Secondary Capture of a flagged study's Grad-CAM overlay, marked research-only.

The overlay is ``cxr_ray.scoring.explain.overlay_png``'s picture (the preprocessed image at
the model's input size with the Grad-CAM heat in jet colours, the PNG at ``heatmap_uri``),
enlarged so the burned-in text is legible in a viewer, with a banner above it saying
``FOR RESEARCH - NOT FOR DIAGNOSIS`` and the result, and one below naming the model. The
header says the same: BurnedInAnnotation YES, ImageComments and SeriesDescription with the
warning, ImageType DERIVED\\SECONDARY, the driving image in the Source Image Sequence, the
algorithm in the Contributing Equipment Sequence (IHE AIR). It joins the source study in a
series of its own (SeriesNumber 9902), with the UIDs of ``uids.result_uids``.

Why a secondary capture and not a presentation state: a GSPS can only draw graphics and
text over the source image, not a colour heat map; a colour-blended GSPS (the only kind
that blends a second image) needs the heat map as a stored image anyway, and few PACS
viewers apply blending presentation states. A secondary capture shows the same picture in
every viewer.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont

from cxr_ray.writeback.context import CAUTION, MANUFACTURER, ModelInfo, SourceRef, contributing_equipment
from cxr_ray.writeback.sr import check_study, source_ref
from cxr_ray.writeback.uids import ResultUIDs, result_uids

__all__ = ["BANNER", "SC_SERIES_NUMBER", "build_capture", "render_overlay", "wants_capture"]

SC_SERIES_NUMBER = 9902
BANNER = "FOR RESEARCH - NOT FOR DIAGNOSIS"
SERIES_DESCRIPTION = "cxr-ray Grad-CAM - research, not for diagnosis"
#: The overlay is enlarged to this width (pixels) so the text is readable.
_WIDTH = 512


def wants_capture(study: Mapping[str, Any]) -> bool:
    """Whether a study gets a secondary capture: assessed and flagged."""
    from cxr_ray.writeback.context import assessed

    return assessed(study) and bool(study.get("flagged"))


def _rgb(overlay: np.ndarray | bytes) -> Image.Image:
    if isinstance(overlay, bytes | bytearray):
        with Image.open(io.BytesIO(overlay)) as img:
            return img.convert("RGB")
    array = np.asarray(overlay)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError("the overlay must be an RGB uint8 array H x W x 3 (or PNG bytes)")
    return Image.fromarray(array, mode="RGB")


def render_overlay(overlay: np.ndarray | bytes, result: str, model: ModelInfo) -> np.ndarray:
    """The picture stored: the overlay enlarged, the warning and ``result`` burned in."""
    img = _rgb(overlay)
    height = round(img.height * _WIDTH / img.width)
    img = img.resize((_WIDTH, height), Image.Resampling.BICUBIC)
    font = ImageFont.load_default(size=22)
    small = ImageFont.load_default(size=16)
    top, bottom = 64, 28
    canvas = Image.new("RGB", (_WIDTH, height + top + bottom), (0, 0, 0))
    canvas.paste(img, (0, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((_WIDTH // 2, 6), BANNER, fill=(255, 255, 0), font=font, anchor="mt")
    draw.text((_WIDTH // 2, 36), result, fill=(255, 255, 255), font=small, anchor="mt")
    draw.text(
        (_WIDTH // 2, top + height + 6),
        f"{model.version} (Grad-CAM)",
        fill=(200, 200, 200),
        font=small,
        anchor="mt",
    )
    return np.asarray(canvas, dtype=np.uint8)


def _result_line(study: Mapping[str, Any], threshold: float) -> str:
    flag = "FLAGGED" if study.get("flagged") else "not flagged"
    p = float(study["prob_pneumonia"])
    return f"{study['pred_label']}: P(pneumonia) {p:.2f} (threshold {threshold:g}), {flag}"


def build_capture(
    study: Mapping[str, Any],
    source: SourceRef | pydicom.Dataset,
    model: ModelInfo,
    *,
    overlay: np.ndarray | bytes,
    threshold: float,
    uids: ResultUIDs | None = None,
) -> hd.sc.SCImage:
    """The secondary capture of a flagged study (``wants_capture``); ``ValueError`` otherwise.

    ``overlay`` is the Grad-CAM overlay of the driving image: the PNG bytes at its
    ``heatmap_uri`` or an RGB ``uint8`` array.
    """
    ref = source_ref(source)
    check_study(study, ref, model)
    if not wants_capture(study):
        raise ValueError("only flagged studies get a Grad-CAM secondary capture")
    uids = uids or result_uids(ref.study_instance_uid, model.version)
    pixels = render_overlay(overlay, _result_line(study, threshold), model)
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=ref.study_instance_uid,
        series_instance_uid=uids.sc_series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.sc_sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_id=ref.patient_id,
        patient_name=ref.patient_name,
        patient_birth_date=ref.patient_birth_date,
        patient_sex=ref.patient_sex,
        accession_number=ref.accession_number,
        study_id=ref.study_id,
        study_date=ref.study_date,
        study_time=ref.study_time,
        referring_physician_name=ref.referring_physician_name,
        # highdicom insists on an orientation; the source's is copied, else it is written
        # empty below (type 2: unknown) rather than guessed.
        patient_orientation=ref.patient_orientation or ("L", "F"),
        contributing_equipment=contributing_equipment(model),
    )
    if ref.patient_orientation is None:
        sc.PatientOrientation = None  # type: ignore[assignment]
    # With the body part named, dciodvfy (rightly) wants no Laterality: the chest is not paired.
    sc.BodyPartExamined = "CHEST"
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ImageComments = f"{CAUTION} Grad-CAM of {model.name} {model.version}."
    sc.SeriesDescription = SERIES_DESCRIPTION
    sc.DerivationDescription = "Grad-CAM heat map of the predicted class over the preprocessed image"
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    sc.SourceImageSequence = [item]
    return sc
