"""DICOM pixels to 8-bit grayscale, the way a radiologist's viewer would show them.

Order: modality LUT (rescale slope/intercept) -> VOI LUT or window centre/width -> invert
MONOCHROME1 (where high values are dark) -> scale the windowed range to 0..255. The header
(study identity, intended-use tags) is read without the pixels by ``read_header``
(``cxr_ray.imaging.dicom_header``, re-exported here).

Error messages are identifier-free: they say what was wrong, never a tag value (a patient
name or id inside a corrupt element must not reach an error row, a summary or a log).
"""

from __future__ import annotations

import io
import logging
import re

import numpy as np

from cxr_ray.errors import DecodeError
from cxr_ray.imaging.dicom_header import (
    DICOM_FIELD_DOCS,
    DICOM_FIELDS,
    DicomHeader,
    header_columns,
    parse_age,
    quiet_pydicom,
    read_header,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DICOM_FIELDS",
    "DICOM_FIELD_DOCS",
    "DicomHeader",
    "decode_dicom",
    "header_columns",
    "parse_age",
    "read_header",
]

_QUOTED = re.compile(r"""'[^']*'|"[^"]*"|b'[^']*'""")
_UID_LIKE = re.compile(r"\b\d+(?:\.\d+){3,}\b")


def _safe_message(exc: BaseException) -> str:
    """``exc``'s message with quoted values and UIDs removed (they can be identifiers)."""
    text = _UID_LIKE.sub("<uid>", _QUOTED.sub("<value>", str(exc)))
    return text[:200]


def decode_dicom(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Pixels of a DICOM file as ``uint8`` HxW; ``DecodeError`` with a reason otherwise.

    pydicom parses elements lazily, so a corrupt element can raise (``BytesLengthException``,
    ``struct.error``, ...) on any attribute access, not only in ``dcmread``: every failure
    inside becomes a ``DecodeError`` (an error row), never an exception that ends the run.
    """
    try:
        with quiet_pydicom():
            return _decode(data, max_pixels)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"unreadable DICOM: {type(exc).__name__}: {_safe_message(exc)}") from None


def _decode(data: bytes, max_pixels: int) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if "PixelData" not in ds:
        raise DecodeError("DICOM file has no pixel data (not an image object)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise DecodeError("DICOM file lacks Rows/Columns") from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if rows * cols > max_pixels:
        raise DecodeError(
            f"image is {cols}x{rows} = {rows * cols} pixels, over the {max_pixels}-pixel limit "
            "(possible decompression bomb)"
        )
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for missing codecs and bad data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = f" (transfer syntax {syntax.name})" if syntax is not None else ""
        raise DecodeError(
            f"cannot decode DICOM pixel data{hint}: {_safe_message(exc)}. cxr-ray ships the "
            "pylibjpeg plugins (JPEG, JPEG-LS, JPEG 2000, RLE); other syntaxes need 'python-gdcm'"
        ) from None
    if frames > 1:
        arr = arr[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour DICOM (secondary capture): luminance
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        photometric = "MONOCHROME2"
    elif arr.ndim != 2:
        raise DecodeError(f"DICOM pixel array has unexpected shape {arr.shape}")
    try:
        arr = apply_modality_lut(arr, ds)
        arr = apply_voi_lut(arr, ds)
    except Exception as exc:
        logger.debug("LUT application failed (%s); using raw values", type(exc).__name__)
    arr = np.asarray(arr, dtype=np.float32)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
