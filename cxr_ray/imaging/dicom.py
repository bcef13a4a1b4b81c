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
from cxr_ray.vocabulary import ErrorCode

logger = logging.getLogger(__name__)

__all__ = [
    "DICOM_FIELDS",
    "DICOM_FIELD_DOCS",
    "DicomHeader",
    "decode_dicom",
    "decode_dicom_at",
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
    """Pixels of a DICOM file as ``uint8`` HxW at full resolution; ``DecodeError`` with a
    reason otherwise (the reference path: ``decode_dicom_at`` with ``target=None``)."""
    return decode_dicom_at(data, max_pixels=max_pixels, target=None)[0]


def decode_dicom_at(
    data: bytes, *, max_pixels: int, target: tuple[int, int] | None, oversample: int | None = None
) -> tuple[np.ndarray, int, int]:
    """``(uint8 pixels, width, height)`` of a DICOM's first frame; ``DecodeError`` with a
    reason otherwise. ``width`` x ``height`` is the stored size; the pixels are that size
    when ``target`` is ``None``, else at least ``oversample`` x ``target`` (width, height)
    per side where a reduced decode applies (``cxr_ray.imaging.dicom_reduced``).

    pydicom parses elements lazily, so a corrupt element can raise (``BytesLengthException``,
    ``struct.error``, ...) on any attribute access, not only in ``dcmread``: every failure
    inside becomes a ``DecodeError`` (an error row), never an exception that ends the run.
    """
    try:
        with quiet_pydicom():
            return _decode(data, max_pixels, target, oversample)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(
            f"unreadable DICOM ({type(exc).__name__})", code=ErrorCode.DICOM_UNREADABLE
        ) from None


def _decode(
    data: bytes, max_pixels: int, target: tuple[int, int] | None, oversample: int | None
) -> tuple[np.ndarray, int, int]:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if "PixelData" not in ds:
        raise DecodeError(
            "DICOM file has no pixel data (not an image object)", code=ErrorCode.DICOM_NO_PIXELS
        )
    frames = _check_budget(ds, max_pixels)
    if target is not None:
        from cxr_ray.imaging import dicom_reduced

        over = dicom_reduced.DEFAULT_OVERSAMPLE if oversample is None else oversample
        small = dicom_reduced.decode_reduced(ds, frames, target, oversample=over)
        if small is not None:
            return small, int(ds.Columns), int(ds.Rows)
    try:
        # Only the first frame is ever decoded (``index=0``): a multi-frame file costs one
        # frame's memory, however many it holds.
        arr = pixel_array(ds, index=0) if frames > 1 else pixel_array(ds)
    except Exception as exc:  # pydicom raises many types for missing codecs and bad data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = f" (transfer syntax {syntax.name})" if syntax is not None else ""
        raise DecodeError(
            f"cannot decode DICOM pixel data{hint} ({type(exc).__name__}). cxr-ray ships the "
            "pylibjpeg plugins (JPEG, JPEG-LS, JPEG 2000, RLE); other syntaxes need python-gdcm",
            code=ErrorCode.DICOM_UNSUPPORTED,
        ) from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour DICOM (secondary capture): luminance
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        photometric = "MONOCHROME2"
    elif arr.ndim != 2:
        raise DecodeError(
            f"DICOM pixel array has unexpected shape {arr.shape}", code=ErrorCode.DICOM_UNSUPPORTED
        )
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
    out = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    return out, out.shape[1], out.shape[0]


def _int(ds: object, name: str, default: int | None = None) -> int:
    value = getattr(ds, name, None)
    if value in (None, "") and default is not None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DecodeError(
            f"unreadable DICOM: no valid {name} (the value is not a number)",
            code=ErrorCode.DICOM_UNREADABLE,
        ) from None


def _check_budget(ds: object, max_pixels: int) -> int:
    """The number of frames, after checking the whole pixel budget before any decode.

    Frames x rows x columns x samples must fit ``max_pixels`` (``data.max_pixels``), and a
    compressed file's first frame must say, in its own codestream header (JPEG / JPEG-LS SOF,
    JPEG 2000 SIZ), the size the DICOM header says: a decoder allocates what the codestream
    declares, not what the header claims.
    """
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    frames, samples = _int(ds, "NumberOfFrames", 1), _int(ds, "SamplesPerPixel", 1)
    if min(rows, cols, frames, samples) < 1:
        raise DecodeError("DICOM header gives a zero or negative image size", code=ErrorCode.PIXEL_BUDGET)
    total = frames * rows * cols * samples
    if total > max_pixels:
        raise DecodeError(
            f"pixel_budget: {frames} frame(s) x {cols}x{rows} x {samples} sample(s) = {total} values, "
            f"over the {max_pixels}-pixel limit (data.max_pixels; possible decompression bomb)",
            code=ErrorCode.PIXEL_BUDGET,
        )
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and getattr(syntax, "is_encapsulated", False):
        from pydicom.encaps import get_frame

        frame = get_frame(ds.PixelData, 0, number_of_frames=frames)  # type: ignore[attr-defined]
        size = frame_size(frame)
        if size is not None and size[:2] != (cols, rows):
            raise DecodeError(
                f"frame_mismatch: the compressed frame is {size[0]}x{size[1]} but the DICOM header "
                f"says {cols}x{rows}; refused before decoding",
                code=ErrorCode.FRAME_MISMATCH,
            )
        if size is None and _looks_like_jpeg_family(frame):
            raise DecodeError(
                "the compressed frame's header is unreadable; refused", code=ErrorCode.FRAME_MISMATCH
            )
        if size is not None and size[2] * cols * rows > max_pixels:
            raise DecodeError(
                "the compressed frame declares more samples than data.max_pixels",
                code=ErrorCode.PIXEL_BUDGET,
            )
    return frames


def _looks_like_jpeg_family(frame: bytes) -> bool:
    return frame[:2] == b"\xff\xd8" or frame[:4] == b"\xff\x4f\xff\x51" or frame[4:8] == b"jP  "


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def frame_size(frame: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) a JPEG, JPEG-LS or JPEG 2000 codestream declares, or
    ``None`` when ``frame`` is none of them (RLE, whose size is the DICOM header's) or its
    header cannot be read."""
    if frame[:2] == b"\xff\xd8":
        return _jpeg_size(frame)
    at = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC + SIZ (bare codestream or inside JP2)
    if at >= 0 and len(frame) >= at + 4 + 38:
        siz = frame[at + 4 :]
        x, y, x0, y0 = (int.from_bytes(siz[k : k + 4], "big") for k in (4, 8, 12, 16))
        return x - x0, y - y0, int.from_bytes(siz[36:38], "big")
    return None


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    i = 2
    while i + 4 <= len(frame):
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(frame[i + 2 : i + 4], "big")
        if marker in _SOF:
            if i + 10 > len(frame):
                return None
            height = int.from_bytes(frame[i + 5 : i + 7], "big")
            width = int.from_bytes(frame[i + 7 : i + 9], "big")
            return width, height, frame[i + 9]
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / start of scan before a SOF
            return None
        i += 2 + length
    return None
