"""Synthetic chest-X-ray-like images for the demo and tests (never for real evaluation).

Each class has a visible, learnable pattern, so a tiny model trained for a minute on them
scores far above chance and the demo's metrics mean something:

- normal: two clear dark lung fields inside a bright body;
- bacterial: one dense, bright lobar consolidation in one lung;
- viral: diffuse, patchy bilateral haze.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_ray.labels import BACTERIAL, LABELS, NORMAL, VIRAL


def xray_array(h: int = 320, w: int = 256, seed: int = 0, bits: int = 8, label: str = NORMAL) -> np.ndarray:
    """A chest-like grayscale image with the pattern of ``label``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 0.75 - 0.25 * ((xx - w / 2) / (w / 2)) ** 2
    lungs = []
    for cx in (0.3 * w, 0.7 * w):
        cy = 0.5 * h + rng.normal(0, 0.02 * h)
        field = np.exp(-(((xx - cx) / (0.14 * w)) ** 2 + ((yy - cy) / (0.3 * h)) ** 2))
        lungs.append(field)
        img -= 0.35 * field
    if label == BACTERIAL:
        lung = lungs[int(rng.integers(2))]
        cy = float(rng.uniform(0.35, 0.65)) * h
        cx = float(np.sum(lung * xx) / np.sum(lung))
        blob = np.exp(-(((xx - cx) / (0.08 * w)) ** 2 + ((yy - cy) / (0.1 * h)) ** 2))
        img += 0.3 * blob
    elif label == VIRAL:
        haze = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1)).astype(np.float32)
        haze = np.kron(haze, np.ones((8, 8), np.float32))[:h, :w]
        img += 0.08 * (lungs[0] + lungs[1]) * (1.5 + haze)
    img = np.clip(img + rng.normal(0, 0.03, (h, w)), 0, 1)
    return np.rint(img * (2**bits - 1)).astype(np.uint16 if bits > 8 else np.uint8)


def jpeg_bytes(
    h: int = 320,
    w: int = 256,
    seed: int = 0,
    label: str = NORMAL,
    mode: str = "L",
    quality: int = 90,
) -> bytes:
    im = Image.fromarray(xray_array(h, w, seed, label=label), mode="L")
    if mode != "L":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def kermany_name(label: str, i: int) -> str:
    """A Kermany-style file name (label and patient id recoverable by ``cxr_ray.labels``)."""
    if label == NORMAL:
        return f"IM-{1000 + i:04d}-0001.jpeg" if i % 2 else f"NORMAL2-IM-{1000 + i:04d}-0001.jpeg"
    kind = "bacteria" if label == BACTERIAL else "virus"
    return f"person{5000 + i // 2}_{kind}_{i}.jpeg"


def write_kermany_folder(
    root: Path, per_class: int = 40, size: tuple[int, int] = (320, 256), seed: int = 0
) -> Path:
    """``root/train/{NORMAL,PNEUMONIA}/<Kermany names>`` of synthetic images."""
    rng = np.random.default_rng(seed)
    for label in LABELS:
        folder = root / "train" / ("NORMAL" if label == NORMAL else "PNEUMONIA")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h = int(size[0] * rng.uniform(0.8, 1.2))
            w = int(size[1] * rng.uniform(0.8, 1.2))
            data = jpeg_bytes(h, w, seed=int(rng.integers(2**31)), label=label)
            (folder / kermany_name(label, i)).write_bytes(data)
    return root
