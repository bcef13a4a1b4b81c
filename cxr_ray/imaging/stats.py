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
_PERCENTILES = (5, 25, 50, 75, 95)


def input_stats(pixels: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """``float32 [N, len(INPUT_STATS)]`` for ``uint8 [N, H, W]`` model inputs of original sizes
    ``widths`` x ``heights`` (aspect = width / height)."""
    n = len(pixels)
    out = np.full((n, len(INPUT_STATS)), np.nan, np.float32)
    if n == 0:
        return out
    flat = np.asarray(pixels).reshape(n, -1)
    out[:, : len(_PERCENTILES)] = np.percentile(flat, _PERCENTILES, axis=1).T
    out[:, 5] = flat.mean(axis=1)
    out[:, 6] = flat.std(axis=1)
    w = np.asarray(widths, np.float32)
    h = np.asarray(heights, np.float32)
    out[:, 7] = w
    out[:, 8] = h
    with np.errstate(divide="ignore", invalid="ignore"):
        out[:, 9] = np.where(h > 0, w / h, np.nan)
    return out
