"""Per-image input statistics for drift checks, computed the same way at training and scoring.

``input_stats(pixels, widths, heights)`` -> ``float32 [N, len(INPUT_STATS)]``: intensity
percentiles, mean and spread of the preprocessed model input (``uint8 [N, H, W]``, after the
card's resize and intensity step), and the original image size and aspect ratio. The drift
reference (training, validation split) and every scoring run (decode stage) call this one
function, so a shift in acquisition (exposure, contrast, resolution, cropping) shows as a
shift in these columns.
"""

from __future__ import annotations

import numpy as np

#: Column order of ``input_stats``.
INPUT_STATS: tuple[str, ...] = (
    "intensity_p05",
    "intensity_p25",
    "intensity_p50",
    "intensity_p75",
    "intensity_p95",
    "intensity_mean",
    "intensity_std",
    "original_width",
    "original_height",
    "aspect_ratio",
)
#: What the model sees: statistics of the preprocessed input (the drift check tests these).
MODEL_INPUT_STATS: tuple[str, ...] = INPUT_STATS[:7]
#: Acquisition facts of the stored image, before preprocessing: reported by the drift check,
#: never an alert on their own (a full-resolution archive of the training images is not drift
#: when what the model sees is the same).
ACQUISITION_STATS: tuple[str, ...] = INPUT_STATS[7:]
_PERCENTILES = (5, 25, 50, 75, 95)


def input_stats(pixels: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """``float32 [N, len(INPUT_STATS)]`` for ``uint8 [N, H, W]`` model inputs of original sizes
    ``widths`` x ``heights`` (aspect = width / height; NaN where the height is unknown, 0).

    Defined as ``np.percentile`` (linear interpolation), the mean and the population standard
    deviation of each image's pixels; computed from one 256-bin histogram per image, which
    gives exactly those values about 40x faster than ``np.percentile`` on 224 px inputs (a
    cost every scored image pays in the predictor).
    """
    n = len(pixels)
    out = np.full((n, len(INPUT_STATS)), np.nan, np.float32)
    if n == 0:
        return out
    flat = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(n, -1)
    m = flat.shape[1]
    offsets = (np.arange(n, dtype=np.int64) * 256)[:, None]
    hist = np.bincount((flat + offsets).ravel(), minlength=n * 256).reshape(n, 256)
    cum = hist.cumsum(axis=1)
    for j, q in enumerate(_PERCENTILES):
        pos = q / 100 * (m - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, m - 1)
        # The k-th smallest value (0-based) is the number of levels whose count ends at <= k.
        v_lo = (cum <= lo).sum(axis=1)
        v_hi = (cum <= hi).sum(axis=1)
        out[:, j] = v_lo + (pos - lo) * (v_hi - v_lo)
    levels = np.arange(256, dtype=np.float64)
    mean = hist @ levels / m
    out[:, 5] = mean
    out[:, 6] = np.sqrt(np.maximum(hist @ levels**2 / m - mean**2, 0.0))
    w = np.asarray(widths, np.float32)
    h = np.asarray(heights, np.float32)
    out[:, 7], out[:, 8] = w, h
    with np.errstate(divide="ignore", invalid="ignore"):
        out[:, 9] = np.where(h > 0, w / h, np.nan)
    return out
