"""A DICOM's first frame decoded at (about) the resolution the model needs.

The full-resolution path (``cxr_ray.imaging.dicom``, ``target=None``) decodes every pixel,
applies the LUTs at full size and leaves the resize to preprocessing; a 2,000 px X-ray is
~80 times more pixels than a 224 px model reads. Here, by transfer syntax:

- JPEG baseline / extended with 8-bit samples (1.2.840.10008.1.2.4.50 / .51): the
  encapsulated frame goes through PIL's draft mode, libjpeg's scaled DCT decode straight to
  the smallest 1/1, 1/2, 1/4 or 1/8 scale still at least ``oversample`` x the input size
  (``DEFAULT_OVERSAMPLE`` = 4; the JPEG path uses 1). 12-bit extended frames (PIL reads
  8-bit JPEG only) are decoded in full and block-averaged (below).
- JPEG 2000 (.90 / .91): PIL's OpenJPEG decode with ``reduce`` = the largest wavelet
  resolution level still at least that size (and no more than the codestream's own levels);
  PIL's binding is the one of the two here that takes ``reduce`` (pylibjpeg-openjpeg 2.6's
  ``decode`` has no such argument). Decode time falls with the level about as the pixel
  count (4.5 / 0.9 / 0.29 / 0.09 s for reduce 0-3 on a 2400 x 2200 lossless frame under load).
- Anything else pydicom decodes (JPEG-LS, RLE, uncompressed, 12-bit JPEG): full decode, then
  the mean of ``k x k`` blocks (partial edge blocks averaged over the pixels they hold), ``k``
  the largest integer factor still at least that size. The block mean is taken *before* the
  modality LUT and the VOI window when they are affine over the image's range (a rescale
  slope/intercept, a linear window that clips nothing: the mean commutes with them exactly),
  and *after* them otherwise (LUT tables, sigmoid windows, a window that clips).

The 0..255 stretch needs the full image's minimum and maximum. Where the full array was
decoded they are exact; a DCT / wavelet-scaled image's extremes can be narrower (averaging
removes a single bright pixel), so its stretch is used only when its range already reaches
both ends of what the LUTs can output (a saturated background and a burned-in marker, a
window that clips: 447 of the 479 Kermany originals at 1/4 scale). Otherwise the frame is decoded in full
and block-averaged. ``benchmarks/dicom_agreement.py`` measures every syntax against the
full path.

``decode_reduced`` returns ``None`` where it has nothing to do (the image is already about
the target size) or where its decoder refuses the frame: the caller then runs the full path,
so corrupt data fails with the same error row as before.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_OVERSAMPLE",
    "block_factor",
    "block_mean",
    "dct_scale",
    "decode_reduced",
    "j2k_levels",
    "j2k_reduce",
]

#: The reduced image is at least this many times the model's input size on each side, so the
#: antialiased resize that follows still does most of the low-pass filtering: a block or DCT
#: average only knows each block's mean, and the closer its size to the resize's own filter
#: the more it moves the result. Measured against the full path (``benchmarks/RESULTS.md``):
#: at 1 (what the JPEG path does) |dP(pneumonia)| exceeds 0.02 on 4% of the Kermany originals
#: and argmax agreement is 0.990; at 2, 97.5% within 0.02 and 0.983; at 3, 0.992 and 1.0; at 4
#: all within 0.007.
DEFAULT_OVERSAMPLE = 4

_DCT_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}
_J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def _need(target: tuple[int, int], oversample: int) -> tuple[int, int]:
    return target[0] * oversample, target[1] * oversample


def dct_scale(width: int, height: int, need: tuple[int, int]) -> int:
    """The libjpeg scale denominator (8, 4, 2 or 1) PIL's draft picks for ``need``: the
    largest not above ``block_factor`` (output ``ceil(size / d)``)."""
    k = block_factor(width, height, need)
    return next(d for d in (8, 4, 2, 1) if d <= k)


def block_factor(width: int, height: int, need: tuple[int, int]) -> int:
    """The largest integer ``k`` whose whole blocks still number at least ``need`` on both
    sides (``size // k >= need``; PIL's draft chooses its DCT scale by the same rule), or 1."""
    return max(1, min(width // max(need[0], 1), height // max(need[1], 1)))


def j2k_reduce(width: int, height: int, need: tuple[int, int], levels: int) -> int:
    """The JPEG 2000 ``reduce`` level: the largest ``r <= levels`` whose resolution
    ``ceil(size / 2**r)`` is still at least ``need`` on both sides."""
    r = 0
    while (
        r < levels
        and math.ceil(width / 2 ** (r + 1)) >= need[0]
        and math.ceil(height / 2 ** (r + 1)) >= need[1]
    ):
        r += 1
    return r


def j2k_levels(frame: bytes) -> int | None:
    """Decomposition levels in a JPEG 2000 codestream's main-header COD marker (``None`` when
    it cannot be read, or a COC marker may give a component other levels)."""
    i = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
    if i < 0:
        return None
    i, levels = i + 2, None
    while i + 4 <= len(frame) and frame[i] == 0xFF:
        marker, length = frame[i + 1], int.from_bytes(frame[i + 2 : i + 4], "big")
        if marker == 0x53 or length < 2:  # COC: per-component levels, not worth parsing
            return None
        if marker == 0x52 and i + 10 <= len(frame):
            levels = frame[i + 9]
        if marker == 0x90:  # SOT: the end of the main header
            return levels
        i += 2 + length
    return None


def block_mean(arr: np.ndarray, k: int) -> np.ndarray:
    """``float32`` mean of ``k x k`` blocks of a 2-D array, the last row/column of blocks
    averaged over the pixels they hold (output ``ceil(h / k) x ceil(w / k)``)."""
    import cv2

    values = np.asarray(arr, dtype=np.float32)
    if k == 1:
        return values
    h, w = values.shape
    hk, wk, h2, w2 = h // k, w // k, h // k * k, w // k * k
    out = np.empty((math.ceil(h / k), math.ceil(w / k)), dtype=np.float32)
    if hk and wk:  # OpenCV's area resize by an integer factor is the exact block mean
        out[:hk, :wk] = cv2.resize(values[:h2, :w2], (wk, hk), interpolation=cv2.INTER_AREA)
    if w2 < w and hk:
        out[:hk, wk] = values[:h2, w2:].reshape(hk, k, w - w2).mean(axis=(1, 2))
    if h2 < h and wk:
        out[hk, :wk] = values[h2:, :w2].reshape(h - h2, wk, k).mean(axis=(0, 2))
    if h2 < h and w2 < w:
        out[hk, wk] = values[h2:, w2:].mean()
    return out


# ----------------------------------------------------------------------------- LUTs


def _is_affine(ds: Any, lo: float, hi: float) -> bool:
    """Whether modality LUT + VOI is affine on ``[lo, hi]`` (stored values), so the block
    mean commutes with it exactly."""
    if "ModalityLUTSequence" in ds or "VOILUTSequence" in ds:
        return False
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return True
    function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT"):
        return False  # SIGMOID
    center, width = (float(_first(ds[name].value)) for name in ("WindowCenter", "WindowWidth"))
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    a, b = sorted((lo * slope + intercept, hi * slope + intercept))
    if function == "LINEAR_EXACT":
        low, high = center - width / 2, center + width / 2
    else:
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    # Within one unit of the linear range: a full-range window (centre 2047.5, width 4096)
    # clips 4095 by half a unit, 1/8000 of the output range.
    return low - 1 <= a and b <= high + 1


def _first(value: Any) -> Any:
    from pydicom.multival import MultiValue

    return value[0] if isinstance(value, MultiValue | list | tuple) else value


def _luts(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Modality LUT then VOI LUT / window, as the full path applies them (raw values kept
    where pydicom refuses, as there)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        return np.asarray(apply_voi_lut(apply_modality_lut(arr, ds), ds), dtype=np.float32)
    except Exception as exc:
        logger.debug("LUT application failed (%s); using raw values", type(exc).__name__)
        return np.asarray(arr, dtype=np.float32)


def _to_u8(values: np.ndarray, lo: float, hi: float, photometric: str) -> np.ndarray:
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


#: Widest range of stored values mapped through a lookup table instead of pixel by pixel.
_TABLE_MAX = 1 << 16


def _finish(arr: np.ndarray, ds: Any, photometric: str, k: int, top: int | None = None) -> np.ndarray | None:
    """Mean of ``k x k`` blocks (before the LUTs where that is exact, after them otherwise),
    then the 0..255 stretch over the image's range and MONOCHROME1 inversion.

    ``top`` is ``None`` when ``arr`` is the full decode, so its range is the full image's.
    For a scaled decode it is the largest stored value: the result is ``None`` unless the
    range reaches both ends of what the LUTs give for ``0..top`` (the full image's extremes
    could otherwise lie further out, and its stretch differ).

    Without a block mean (``k`` 1) an integer image goes through a lookup table of its
    stored range (``_table_finish``: the same per-value arithmetic, once per value instead of
    once per pixel; bit-identical, ``tests/test_dicom_reduced.py``)."""
    if k == 1 and arr.dtype.kind in "iu":
        table = _table_finish(arr, ds, photometric, top)
        if table is not _NO_TABLE:
            return table
    return _finish_pixels(arr, ds, photometric, k, top)


_NO_TABLE: Any = object()


def _within(ds: Any, vlo: float, vhi: float, top: int | None) -> bool:
    if top is None:
        return True
    limits = _luts(np.array([[0, top]], dtype=np.int64), ds)
    return not (vlo > float(limits.min()) or vhi < float(limits.max()))


def _table_finish(arr: np.ndarray, ds: Any, photometric: str, top: int | None) -> Any:
    """``_finish_pixels(arr, ..., k=1)`` through a table of the stored values ``lo..hi``, or
    ``_NO_TABLE`` where a table does not give the same result (a range over ``_TABLE_MAX``,
    a LUT that is not monotone over it: the image's extremes are then not its range's ends)."""
    lo, hi = int(arr.min()), int(arr.max())
    if hi - lo >= _TABLE_MAX:
        return _NO_TABLE
    stored = np.arange(lo, hi + 1).reshape(1, -1)
    if _is_affine(ds, lo, hi):  # as _finish_pixels: ends from float64, values from float32
        ends = _luts(np.array([[lo, hi]], dtype=np.float64), ds)
        values = _luts(stored.astype(np.float32), ds)
        vlo, vhi = float(ends.min()), float(ends.max())
    else:
        out = _luts(stored.astype(arr.dtype), ds).ravel()
        step = np.diff(out)
        if not ((step >= 0).all() or (step <= 0).all()):
            return _NO_TABLE
        vlo, vhi = float(min(out[0], out[-1])), float(max(out[0], out[-1]))
        values = out.astype(np.float32)
    if not _within(ds, vlo, vhi, top):
        return None
    u8 = _to_u8(np.asarray(values).ravel(), vlo, vhi, photometric)
    if arr.dtype == np.uint8:
        full = np.zeros(256, np.uint8)
        full[lo : hi + 1] = u8
        if np.array_equal(full[lo : hi + 1], np.arange(lo, hi + 1)):
            return arr  # the identity (an 8-bit image already spanning 0..255, no LUT)
        import cv2

        return cv2.LUT(arr, full)
    return u8[arr] if lo == 0 else u8[arr.astype(np.intp) - lo]


def _finish_pixels(
    arr: np.ndarray, ds: Any, photometric: str, k: int, top: int | None = None
) -> np.ndarray | None:
    """``_finish`` pixel by pixel (block means, or images a table cannot take)."""
    lo, hi = float(arr.min()), float(arr.max())
    if arr.dtype.kind in "iu" and _is_affine(ds, lo, hi):
        ends = _luts(np.array([[lo, hi]], dtype=np.float64), ds)
        values = _luts(block_mean(arr, k), ds)
    else:
        ends = _luts(arr, ds)
        values = block_mean(ends, k)
    vlo, vhi = float(ends.min()), float(ends.max())
    if not _within(ds, vlo, vhi, top):
        return None
    return _to_u8(values, vlo, vhi, photometric)


# ----------------------------------------------------------------------------- decoders


def _pil_open(frame: bytes, fmt: str) -> Any:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(frame), formats=[fmt])


def _sof_precision(frame: bytes) -> int | None:
    i = 2
    while i + 10 <= len(frame) and frame[i] == 0xFF:
        marker, length = frame[i + 1], int.from_bytes(frame[i + 2 : i + 4], "big")
        if marker in _SOF:
            return frame[i + 4]
        if marker in (0xD9, 0xDA) or length < 2:
            return None
        i += 2 + length
    return None


def _dct(frame: bytes, need: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    im = _pil_open(frame, "JPEG")
    im.draft("L", need)
    im.load()
    if im.mode != "L":
        im = im.convert("L")
    return np.asarray(im), 255, 1


def _j2k(frame: bytes, width: int, height: int, need: tuple[int, int]) -> tuple[np.ndarray, int, int] | None:
    levels = j2k_levels(frame)
    precision = _j2k_precision(frame)
    if levels is None or precision is None:
        return None
    im = _pil_open(frame, "JPEG2000")
    if im.mode not in ("L", "I;16"):
        return None
    im.reduce = j2k_reduce(width, height, need, levels)
    im.load()
    # PIL scales a codestream's samples up to the mode's 8 or 16 bits (a left shift): undo it.
    shift = (8 if im.mode == "L" else 16) - precision
    arr = np.asarray(im)
    return (arr >> shift if shift > 0 else arr), 2**precision - 1, 1


def _j2k_precision(frame: bytes) -> int | None:
    """Bits of the first component in the SIZ marker (``None`` if signed or unreadable)."""
    at = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
    if at < 0 or len(frame) < at + 4 + 39:
        return None
    ssiz = frame[at + 4 + 38]
    return None if ssiz & 0x80 else (ssiz & 0x7F) + 1


def _photometric(ds: Any) -> str:
    return str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").upper()


def _syntax(ds: Any) -> str:
    return str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")


def _scaled_decode(ds: Any, frame: bytes, need: tuple[int, int]) -> tuple[np.ndarray, int, int] | None:
    """The frame decoded by DCT or wavelet scaling, its largest possible stored value and the
    block mean still to apply, or ``None`` where that does not apply."""
    syntax, photometric = _syntax(ds), _photometric(ds)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    mono = samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2")
    ybr = samples == 3 and photometric in ("YBR_FULL_422", "YBR_FULL")
    if syntax in _DCT_SYNTAXES and (mono or ybr) and _sof_precision(frame) == 8:
        return _dct(frame, need)
    if syntax in _J2K_SYNTAXES and mono and int(getattr(ds, "PixelRepresentation", 0) or 0) == 0:
        return _j2k(frame, int(ds.Columns), int(ds.Rows), need)
    return None


def decode_reduced(
    ds: Any, frames: int, target: tuple[int, int], *, oversample: int = DEFAULT_OVERSAMPLE
) -> np.ndarray | None:
    """``uint8`` gray first frame of ``ds`` at least ``oversample x target`` (width, height)
    on each side, or ``None`` (then the caller decodes in full). The pixel budget and the
    frame's own dimensions were checked by the caller (``dicom._check_budget``)."""
    width, height = int(ds.Columns), int(ds.Rows)
    need = _need(target, oversample)
    photometric = _photometric(ds)
    encapsulated = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if encapsulated is not None and getattr(encapsulated, "is_encapsulated", False):
        from pydicom.encaps import get_frame

        frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
        try:
            scaled = _scaled_decode(ds, frame, need)
        except Exception as exc:  # the full path reports it as an error row
            logger.debug("scaled decode refused the frame (%s)", type(exc).__name__)
            return None
        small = None if scaled is None else _finish(scaled[0], ds, photometric, scaled[2], top=scaled[1])
        if small is not None:
            return small  # else: full decode, block mean with the full image's range
    k = block_factor(width, height, need)
    if k == 1:
        return None
    return _block_path(ds, frames, photometric, k)


def _block_path(ds: Any, frames: int, photometric: str, k: int) -> np.ndarray | None:
    from pydicom.pixels import pixel_array

    try:
        arr = pixel_array(ds, index=0) if frames > 1 else pixel_array(ds)
    except Exception:
        return None  # the full path decodes again and reports the error row
    if arr.ndim == 3:  # colour: luminance at full size, as the full path
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        photometric = "MONOCHROME2"
    elif arr.ndim != 2:
        return None
    return _finish(arr, ds, photometric, k)
