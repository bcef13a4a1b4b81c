"""The form a model's training images were stored in, and rendering other images to it.

A network learns the fine detail of the files it is trained on. The Kermany 224 px release
(the default recipe's training data) stores every image as a 224 x 224 JPEG at quality 75;
an archive's full-resolution original of the same X-ray, decoded and resized by the scoring
path, has none of that compression, and the default network reads it differently
(measured on the 479 originals of ``../shared/data/kermany-fullres`` against their own
224 px copies: penultimate features 0.230 reference std apart (RMS of the mean paired shift),
P(pneumonia) -0.70 logits, sensitivity at the card threshold 0.962 instead of 0.987).

So training records the storage form when its training images share one (``detect``: at
least 90% of them JPEGs at the input size with one IJG quality, read from the luma
quantization table), the card carries it (``storage_jpeg_quality``), and preprocessing
re-encodes an image it *resized* to the input size at that quality before the network sees
it (``render``). Images already at the input size are left as they are: they are in the
stored form (the training and validation images themselves are untouched, so the drift
reference and every figure computed on them stay as they were). With the rendering, the
same 479 originals: features 0.087 std, P(pneumonia) -0.26 logits, sensitivity 0.981.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable

import numpy as np
from PIL import Image

__all__ = ["detect", "jpeg_quality", "render"]

#: The IJG standard luminance quantization table (ITU T.81 Annex K), natural order.
_LUMA = np.array(
    [
        16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
        14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
        18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
        49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
    ],
    dtype=np.int64,
)  # fmt: skip
_ZIGZAG = np.array(
    [
        0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
        12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
        35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
        58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
    ]
)  # fmt: skip
#: Share of the training images that must agree before a storage form is recorded.
MIN_SHARE = 0.9


def _ijg_table(quality: int) -> np.ndarray:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((_LUMA * scale + 50) // 100, 1, 255)


_TABLES = {q: _ijg_table(q) for q in range(1, 101)}


def jpeg_quality(data: bytes) -> int | None:
    """The IJG quality (1-100) whose scaled standard table is this baseline JPEG's luma
    table, or ``None`` (not a JPEG, or a table no IJG quality makes)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            tables = getattr(im, "quantization", None) or {}
    except Exception:
        return None
    luma = tables.get(0)
    if luma is None or len(luma) != 64:
        return None
    # Pillow has handed the table out in zigzag and in natural order across versions:
    # accept either (the tests check the round trip at qualities 10-100).
    stored = np.asarray(list(luma), dtype=np.int64)
    natural = np.empty(64, dtype=np.int64)
    natural[_ZIGZAG] = stored
    for quality, table in _TABLES.items():
        if np.array_equal(stored, table) or np.array_equal(natural, table):
            return quality
    return None


def detect(images: Iterable[tuple[str, int, int, bytes]], input_size: tuple[int, int]) -> int | None:
    """The JPEG quality the training images are stored at, when at least ``MIN_SHARE`` of
    ``images`` ((format, width, height, bytes) of a sample) are JPEGs at ``input_size``
    (height, width) with that one quality; otherwise ``None`` (no storage form to render)."""
    h, w = input_size
    seen = 0
    found: Counter[int | None] = Counter()
    for fmt, width, height, data in images:
        seen += 1
        found[jpeg_quality(data) if fmt == "jpeg" and (width, height) == (w, h) else None] += 1
    if not seen:
        return None
    quality, count = found.most_common(1)[0]
    return quality if quality is not None and count >= MIN_SHARE * seen else None


def render(im: Image.Image, quality: int) -> Image.Image:
    """``im`` (8-bit grayscale, at the input size) re-encoded as a baseline JPEG at
    ``quality`` and decoded again: the stored form of the training images."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(quality))
    out = Image.open(io.BytesIO(buf.getvalue()))
    out.load()
    return out.convert("L") if out.mode != "L" else out
