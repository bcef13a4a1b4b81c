"""The one preprocessing implementation, shared by training, export calibration and scoring.

Contract (recorded in every model card and checked when a model is loaded):

1. Decode to 8-bit grayscale. JPEGs are decoded in draft mode straight to the smallest
   DCT scale that is still at least the input size (4-8x less work on full-size X-rays);
   DICOM frames likewise (DCT or JPEG 2000 resolution scaling, else a block mean:
   ``cxr_ray.imaging.dicom_reduced``). 16-bit PNGs and DICOMs are windowed to 8 bits (see
   ``cxr_ray.imaging.dicom``).
2. Resize the whole image to the model's input size ignoring aspect ratio ("squash", as
   the Kermany 224 px release does), bilinear with antialiasing. Nothing about the original
   size, aspect ratio or file size survives: the dataset's normals are larger files, and a
   model must not read the class off that.
   2b. When the model card records the form its training images were stored in
   (``storage_jpeg_quality``: they were JPEGs at the input size), an image this step resized
   is re-encoded as a JPEG at that quality, so a full-resolution original reaches the network
   with the compression its training copies had (``cxr_ray.imaging.storage_form``, measured
   there). Images already at the input size are left as they are.
3. Optional intensity normalisation (``cxr_ray.vocabulary.INTENSITY_MODES``), on the resized
   ``uint8`` image, deterministic: ``equalize`` (global histogram equalisation, PIL) removes
   much of the exposure/contrast difference between acquisition sites; ``clahe``
   (contrast-limited adaptive histogram equalisation, OpenCV's ``createCLAHE`` with clip
   limit 2.0 on an 8 x 8 tile grid, a common chest X-ray setting) equalises each region of
   the image, the clip limit bounding how much it amplifies noise.
4. The model receives ``float32 [N, 1, H, W]`` in 0..1. Channel replication and ImageNet
   mean/std normalisation happen inside the exported network (``cxr_ray.models``), so every
   engine is fed the same tensor.

Training augmentation lives with the training recipe (``cxr_ray.training.augment``) and works
on the output of step 4; it is never used at scoring time.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from cxr_ray.errors import DecodeError
from cxr_ray.imaging.storage_form import render
from cxr_ray.vocabulary import INTENSITY_MODES, ErrorCode

FORMATS = ("jpeg", "png", "dicom")
#: CLAHE parameters: part of the contract (a model trained with ``clahe`` saw exactly these).
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = (8, 8)

__all__ = [
    "CLAHE_CLIP_LIMIT",
    "CLAHE_TILES",
    "FORMATS",
    "INTENSITY_MODES",
    "Decoded",
    "PreprocessSpec",
    "check_pixels",
    "clahe",
    "decode",
    "sniff_format",
    "to_model_input",
]

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"DICM", 128, "dicom"),
    (b"GIF8", 0, "gif"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
    (b"RIFF", 0, "webp"),
    (b"%PDF", 0, "pdf"),
    (b"\x00\x00\x00\x01Bud1", 0, "macos-ds_store"),
    (b"PK\x03\x04", 0, "zip"),
)


@dataclass(frozen=True, slots=True)
class PreprocessSpec:
    """What the model expects; built from a model card (``cxr_ray.models.card.spec_for``)."""

    height: int = 224
    width: int = 224
    intensity: str = "none"
    max_pixels: int = 64_000_000
    #: The JPEG quality the model's training images were stored at, at the input size
    #: (``cxr_ray.imaging.storage_form``); an image resized to the input size is re-encoded at
    #: it (step 2b). ``None``: no storage form recorded, nothing re-encoded.
    storage_jpeg_quality: int | None = None

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"unknown intensity mode {self.intensity!r}; use {INTENSITY_MODES}")


@dataclass(frozen=True, slots=True)
class Decoded:
    pixels: np.ndarray  # uint8 [H, W] at the model's input size
    format: str
    width: int  # original size
    height: int


def sniff_format(data: bytes, name: str | None = None) -> str:
    """The format of ``data`` from its magic bytes (``unknown`` when none matches).

    Some DICOM files have no 128-byte preamble; those are recognised by their extension.
    """
    for magic, offset, fmt in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return fmt
    if name is not None and name.lower().endswith((".dcm", ".dicom")):
        return "dicom"
    head = data[:512]
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text"
    return "unknown"


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise DecodeError(
            f"image is {width}x{height} = {width * height} pixels, over the {max_pixels}-pixel "
            "limit (possible decompression bomb); raise data.max_pixels if it is genuine",
            code=ErrorCode.PIXEL_BUDGET,
        )


def _to_gray_u8(im: Image.Image) -> Image.Image:
    if im.mode == "L":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.rint(scaled * 255).astype(np.uint8), mode="L")
    return im.convert("L")


def _decode_pil(data: bytes, fmt: str, spec: PreprocessSpec) -> tuple[Image.Image, int, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt.upper()])
            width, height = im.size
            check_pixels(width, height, spec.max_pixels)
            if fmt == "jpeg":
                im.draft("L", (spec.width, spec.height))
            im.load()
            gray = _to_gray_u8(im)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(
            f"decompression bomb refused ({type(exc).__name__})", code=ErrorCode.PIXEL_BUDGET
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports truncated and corrupt data as OSError("image file is truncated ..."). Only
        # the exception's type is kept: a library's message is not fixed text.
        if "truncated" in str(exc) or isinstance(exc, EOFError):
            raise DecodeError(
                f"truncated {fmt.upper()} ({type(exc).__name__})", code=ErrorCode.TRUNCATED
            ) from None
        raise DecodeError(
            f"corrupt or truncated {fmt.upper()} ({type(exc).__name__})", code=ErrorCode.UNDECODABLE
        ) from None
    except Exception as exc:  # untrusted bytes: zlib.error, struct.error, ... are error rows too
        raise DecodeError(
            f"corrupt {fmt.upper()} ({type(exc).__name__})", code=ErrorCode.UNDECODABLE
        ) from None
    return gray, width, height


def decode(
    data: bytes, spec: PreprocessSpec, name: str | None = None, *, dicom_full: bool = False
) -> Decoded:
    """Decode and preprocess one image to ``uint8 [H, W]`` (steps 1-3 of the contract).

    DICOM frames are decoded at about the input size (``cxr_ray.imaging.dicom_reduced``);
    ``dicom_full=True`` decodes them at full resolution first, the reference the reduced
    decode is measured against (``benchmarks/dicom_agreement.py``).
    Raises ``DecodeError`` with a message fit for an error row.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)", code=ErrorCode.EMPTY_FILE)
    fmt = sniff_format(data, name)
    if fmt not in FORMATS:
        raise DecodeError(
            f"unsupported format ({fmt}); cxr-ray reads JPEG, PNG and DICOM",
            code=ErrorCode.UNSUPPORTED_FORMAT,
        )
    if fmt == "dicom":
        from cxr_ray.imaging.dicom import decode_dicom_at

        target = None if dicom_full else (spec.width, spec.height)
        arr, width, height = decode_dicom_at(data, max_pixels=spec.max_pixels, target=target)
        im = Image.fromarray(arr, mode="L")
    else:
        im, width, height = _decode_pil(data, fmt, spec)
    return Decoded(_finish(im, spec), fmt, width, height)


def clahe(pixels: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of ``uint8 [H, W]`` (step 3, ``clahe``)."""
    import cv2

    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W], got {pixels.dtype} {pixels.shape}")
    out: np.ndarray = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=CLAHE_TILES).apply(
        np.ascontiguousarray(pixels)
    )
    return out


def _finish(im: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    if im.size != (spec.width, spec.height):
        im = im.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        if spec.storage_jpeg_quality is not None:
            im = render(im, spec.storage_jpeg_quality)
    if spec.intensity == "equalize":
        im = ImageOps.equalize(im)
    elif spec.intensity == "clahe":
        return clahe(np.asarray(im, dtype=np.uint8))
    elif spec.intensity != "none":  # a mode added to the vocabulary but not implemented here
        raise ValueError(f"intensity mode {spec.intensity!r} has no implementation")
    return np.asarray(im, dtype=np.uint8)


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """``uint8 [N, H, W]`` -> ``float32 [N, 1, H, W]`` in 0..1 (step 4's input)."""
    if pixels.ndim != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 [N, H, W], got {pixels.dtype} {pixels.shape}")
    return (pixels.astype(np.float32) * np.float32(1.0 / 255.0))[:, None, :, :]
