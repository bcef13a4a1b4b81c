"""Batched JPEG decoding on the GPU (nvJPEG through torchvision), same contract as the CPU path.

``decode_batch`` turns raw file bytes into the model input ``float32 [N, 1, H, W]`` (0..1)
directly on the predictor's device, so full-resolution X-rays never cross PCIe as pixels:

1. Each JPEG's header is read with PIL (no pixel decode) to enforce ``spec.max_pixels``
   before any decoding, exactly as ``cxr_ray.imaging.preprocess.decode`` does.
2. All JPEGs of the batch are decoded in ONE ``torchvision.io.decode_jpeg(list, device=...,
   mode=GRAY)`` call (nvJPEG batched decode on CUDA; libjpeg-turbo when ``device="cpu"``).
   GRAY asks nvJPEG for the luma plane, which is what PIL's ``draft("L")`` returns.
3. Draft emulation: PIL's draft mode decodes large JPEGs at 1/2, 1/4 or 1/8 scale in the DCT
   domain, which is (close to) an area average of s x s blocks. The GPU decodes at full size,
   so the same ``s`` is applied here as an ``avg_pool2d``; this brings the GPU path within
   about 0.2 grey levels (mean) of the CPU contract instead of 0.6 (see docs/GPU.md).
4. Squash-resize with ``interpolate(bilinear, antialias=True)`` (PIL's bilinear), rounding to
   uint8 like the CPU path, then ``equalize`` when the card asks for it, then x 1/255.

A spec whose intensity step has no GPU implementation here (``clahe``) sends every row to the
CPU decoder, so GPU and CPU actors feed the model the same pixels.

Anything the GPU path does not handle (PNG, DICOM, CMYK or truncated JPEGs, JPEGs nvJPEG
rejects) falls back to ``cxr_ray.imaging.preprocess.decode`` on the CPU for that row only. A row that
fails everywhere gets an error message; one bad image never fails the batch.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from cxr_ray.errors import DecodeError, row_text
from cxr_ray.imaging.preprocess import PreprocessSpec, check_pixels, decode, sniff_format

logger = logging.getLogger(__name__)

#: JPEG "end of image" marker; a file that does not end with it is truncated (or carries
#: trailing bytes), and goes to the CPU path, which reports truncation the same way training
#: preprocessing does (nvJPEG may silently return a partly grey image instead).
_EOI = b"\xff\xd9"
#: Scales PIL's JPEG draft mode can decode at, largest first.
_DRAFT_SCALES = (8, 4, 2, 1)
#: Header modes nvJPEG's GRAY output matches PIL for (luma of YCbCr, or the single channel).
_GPU_MODES = ("L", "RGB")
#: Intensity steps implemented on the GPU; any other goes through the CPU contract.
GPU_INTENSITY_MODES = ("none", "equalize")


@dataclass(frozen=True, slots=True)
class _Header:
    width: int
    height: int
    mode: str


def draft_scale(width: int, height: int, spec: PreprocessSpec) -> int:
    """The DCT scale (1, 2, 4 or 8) that PIL's ``draft`` picks for this image and spec."""
    ratio = min(width // spec.width, height // spec.height)
    return next((s for s in _DRAFT_SCALES if ratio >= s), 1)


def _jpeg_header(data: bytes) -> _Header:
    """Size and mode from the JPEG header; PIL parses markers only, no pixels are decoded."""
    with warnings.catch_warnings():
        # The pixel limit below is ours (spec.max_pixels); PIL's own bomb check would only
        # warn, or refuse with a different message, for the same files.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
            width, height = im.size
            return _Header(width, height, im.mode)


def _route(data: bytes, spec: PreprocessSpec) -> tuple[str, _Header | None]:
    """(``"gpu"`` for a JPEG nvJPEG can decode to the contract, else ``"cpu"``; its header).

    Raises ``DecodeError`` for a JPEG over the pixel limit (checked before decoding).
    """
    if spec.intensity not in GPU_INTENSITY_MODES or spec.storage_jpeg_quality is not None:
        # The storage-form re-encode (preprocess step 2b) is a CPU JPEG round trip.
        return "cpu", None
    if sniff_format(data) != "jpeg" or not data.rstrip(b"\x00").endswith(_EOI):
        return "cpu", None
    try:
        header = _jpeg_header(data)
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"decompression bomb refused: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        return "cpu", None  # the CPU decoder produces the canonical error message for this row
    check_pixels(header.width, header.height, spec.max_pixels)
    return ("gpu" if header.mode in _GPU_MODES else "cpu"), header


def _as_tensor(data: bytes) -> torch.Tensor:
    # A copy: torch.frombuffer on immutable bytes warns, and decode_jpeg wants a CPU tensor.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _gpu_decode(datas: list[bytes], rows: list[int], device: torch.device) -> dict[int, torch.Tensor]:
    """Decode ``rows`` in one batched call; on failure retry one by one. Returns successes."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not rows:
        return {}
    inputs = [_as_tensor(datas[i]) for i in rows]
    try:
        images = decode_jpeg(inputs, mode=ImageReadMode.GRAY, device=device)
        return dict(zip(rows, images, strict=True))
    except (RuntimeError, ValueError) as exc:  # torchvision/nvJPEG reject bad data
        logger.warning(
            "batched JPEG decode of %d images on %s failed (%s); retrying one by one",
            len(rows),
            device,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
    out: dict[int, torch.Tensor] = {}
    for i, tensor in zip(rows, inputs, strict=True):
        try:
            out[i] = decode_jpeg([tensor], mode=ImageReadMode.GRAY, device=device)[0]
        except (RuntimeError, ValueError) as exc:
            logger.debug("row %d: JPEG rejected on %s (%s); using the CPU decoder", i, device, exc)
    return out


def _resize(image: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """``uint8 [1, h, w]`` -> ``uint8 [1, H, W]``: draft emulation, then PIL-like bilinear."""
    h, w = image.shape[-2:]
    x = image[None].float()
    scale = draft_scale(w, h, spec)
    if scale > 1:
        # ceil_mode keeps the partial last block, as the DCT-scaled decode does; the result
        # is rounded because the draft decode produces uint8 too.
        x = F.avg_pool2d(x, scale, ceil_mode=True).round_()
    if tuple(x.shape[-2:]) != (spec.height, spec.width):
        x = F.interpolate(
            x, size=(spec.height, spec.width), mode="bilinear", antialias=True, align_corners=False
        )
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def decode_batch(
    datas: list[bytes], spec: PreprocessSpec, device: str = "cuda"
) -> tuple[torch.Tensor, list[str | None]]:
    """Decode and preprocess a batch to model input on ``device``.

    Returns ``float32 [N, 1, H, W]`` in 0..1 (rows that failed are zeros) and one entry per
    row: ``None`` when it decoded, else the error message for its error row.

    >>> x, errors = decode_batch([jpeg_bytes, b""], spec, device="cpu")  # doctest: +SKIP
    >>> errors
    [None, 'empty file (0 bytes)']
    """
    decoded = decode_pixels(datas, spec, device)
    return to_input(decoded.pixels), decoded.errors


def to_input(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, 1, H, W]`` -> ``float32`` model input, bit-identical to
    ``cxr_ray.imaging.preprocess.to_model_input``."""
    return pixels.float() * (1.0 / 255.0)


@dataclass(frozen=True)
class DecodedBatch:
    """What ``decode_pixels`` returns: the preprocessed pixels and, per row, its error message
    (``None`` when it decoded) and original (width, height) (0, 0 when it did not)."""

    pixels: torch.Tensor  # uint8 [N, 1, H, W] on the device; failed rows are zeros
    errors: list[str | None]
    sizes: list[tuple[int, int]]


def decode_pixels(datas: list[bytes], spec: PreprocessSpec, device: str = "cuda") -> DecodedBatch:
    """``decode_batch`` before the x 1/255: uint8 pixels, errors and original sizes (the
    predictor's input statistics need all three)."""
    dev = torch.device(device)
    n = len(datas)
    pixels = torch.zeros((n, 1, spec.height, spec.width), dtype=torch.uint8, device=dev)
    errors: list[str | None] = [None] * n
    sizes = [(0, 0)] * n
    gpu_rows: list[int] = []
    cpu_rows: list[int] = []
    for i, data in enumerate(datas):
        try:
            route, header = _route(data, spec)
        except DecodeError as exc:
            errors[i] = row_text(exc)
            continue
        if route == "gpu" and header is not None:
            gpu_rows.append(i)
            sizes[i] = (header.width, header.height)
        else:
            cpu_rows.append(i)

    decoded = _gpu_decode(datas, gpu_rows, dev)
    cpu_rows.extend(i for i in gpu_rows if i not in decoded)
    for i, image in decoded.items():
        pixels[i] = _resize(image, spec)
    if spec.intensity == "equalize" and decoded:
        from torchvision.transforms.v2.functional import equalize

        # Only the GPU-decoded rows: the CPU fallback already applied the whole contract.
        idx = torch.tensor(sorted(decoded), device=dev)
        pixels[idx] = equalize(pixels[idx])

    for i in sorted(cpu_rows):
        try:
            d = decode(datas[i], spec)
        except Exception as exc:  # one unreadable file must not fail the whole batch
            if not isinstance(exc, DecodeError):
                logger.warning("row %d: unexpected decode failure (%s)", i, type(exc).__name__)
            # The reason code and a fixed detail; never the library's message (it may name paths).
            errors[i], sizes[i] = row_text(exc), (0, 0)
            continue
        # torch.tensor copies: PIL's arrays are read-only and from_numpy would warn.
        pixels[i, 0] = torch.tensor(d.pixels, device=dev)
        sizes[i] = (d.width, d.height)
    return DecodedBatch(pixels, errors, sizes)
