"""Re-render real images as if a different site had acquired them (a shift proxy).

The official Kermany test split is held out, so site calibration and drift checks are tuned
and tested on a *constructed* site: real validation images re-rendered with the things that
differ between hospitals' acquisition and export chains. ``render_site`` applies, with
per-image jitter from ``seed``:

- exposure / display curve: a gamma (default 0.75: brighter mid-tones, lower contrast in
  the lungs) and a contrast compression towards the mean;
- resolution: a downscale (default to 55% of each side) and back, as an archive that stores
  smaller images, then a mild unsharp mask (vendor edge enhancement);
- detector noise (Gaussian, sigma in 8-bit levels) and a lower JPEG quality;
- collimation: a dark border of a few percent of each side.

Deterministic for one ``(image, seed)``; the label does not change. Used by
``benchmarks/site_calibration.py`` (the figures in docs/TRAINING.md) and the drift tests.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class SiteShift:
    gamma: float = 0.75
    contrast: float = 0.8  # 1.0 keeps contrast; < 1 compresses towards the mean
    downscale: float = 0.55
    unsharp_percent: int = 60
    noise_sigma: float = 6.0
    jpeg_quality: int = 40
    border: float = 0.04  # fraction of each side
    jitter: float = 0.15  # relative per-image variation of gamma, contrast and downscale


def render_site(data: bytes, seed: int = 0, shift: SiteShift | None = None) -> bytes:
    """JPEG bytes of the image ``data`` (any format PIL reads) re-rendered under ``shift``."""
    s = shift or SiteShift()
    rng = np.random.default_rng(seed)

    def jit(v: float) -> float:
        return float(v * (1.0 + rng.uniform(-s.jitter, s.jitter)))

    im = Image.open(io.BytesIO(data)).convert("L")
    w, h = im.size
    x = np.asarray(im, np.float32) / 255.0
    x = np.power(np.clip(x, 0, 1), jit(s.gamma))
    m = float(x.mean())
    x = m + (x - m) * min(jit(s.contrast), 1.0)
    small = Image.fromarray(np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8), mode="L")
    f = min(max(jit(s.downscale), 0.1), 1.0)
    small = small.resize((max(1, int(w * f)), max(1, int(h * f))), Image.Resampling.BILINEAR)
    im = small.resize((w, h), Image.Resampling.BILINEAR)
    if s.unsharp_percent:
        im = im.filter(ImageFilter.UnsharpMask(radius=2, percent=s.unsharp_percent, threshold=2))
    x = np.asarray(im, np.float32)
    if s.noise_sigma:
        x = x + rng.normal(0.0, s.noise_sigma, x.shape)
    bw, bh = round(w * s.border), round(h * s.border)
    if bw or bh:
        x[:bh, :] = x[h - bh :, :] = 4.0
        x[:, :bw] = x[:, w - bw :] = 4.0
    out = Image.fromarray(np.rint(np.clip(x, 0, 255)).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=s.jpeg_quality)
    return buf.getvalue()
