"""What an artifact's network outputs, and on which images: its own recorded splits, read back.

``network_outputs`` runs the network (raw logits and penultimate features, eager torch on the
CPU) for the drift reference, site calibration and the split logits. The images an artifact
was trained and validated on (its ``split.parquet``, not ``cxr_ray.data.splits``, which makes
such splits) are read back preprocessed exactly as scoring does: INT8 calibration (TensorRT,
onnxruntime), the INT8 check against fp32 and the calibration benchmark need them.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from cxr_ray.errors import DecodeError, EngineUnavailableError
from cxr_ray.imaging.preprocess import PreprocessSpec, decode, to_model_input
from cxr_ray.io import storage
from cxr_ray.labels import LABELS
from cxr_ray.models.artifact import Artifact
from cxr_ray.models.card import spec_for

#: What to fall back to when INT8 cannot be calibrated, per precision setting.
_FULL_PRECISION = {"trt_precision": "fp16", "onnx_precision": "fp32"}


def split_images(
    art: Artifact,
    split: str,
    n: int | None = None,
    *,
    seed: int | None = None,
    spec: PreprocessSpec | None = None,
    setting: str = "trt_precision",
) -> tuple[np.ndarray, list[str | None]]:
    """``uint8 [k, H, W]`` images of one split of the artifact's ``split.parquet``, and labels.

    Preprocessed exactly as scoring will. ``n`` caps how many: a seeded random sample when
    ``seed`` is given (in file order), else the first ``n``. A missing ``split.parquet`` or an
    image that cannot be read here (an artifact copied to a site without its data) is an
    ``EngineUnavailableError`` that names the full-precision ``setting`` to fall back to.
    """
    fallback = f"use {setting} = {_FULL_PRECISION.get(setting, 'fp32')!r} instead"
    card = art.card
    split_uri = storage.join(art.uri, "split.parquet")
    if not storage.exists(split_uri):
        raise EngineUnavailableError(
            f"INT8 needs the artifact's training images: {split_uri} is missing (artifacts written "
            f"by `cxr-ray train` have it); {fallback}"
        )
    table = storage.read_table(split_uri)
    rows = table.filter(pc.equal(table["split"], split))
    if n is not None and n < rows.num_rows:
        if seed is None:
            rows = rows.slice(0, n)
        else:
            picked = np.random.default_rng(seed).choice(rows.num_rows, size=n, replace=False)
            rows = rows.take(np.sort(picked))
    spec = spec or spec_for(card)
    pixels = []
    for uri in rows["uri"].to_pylist():
        try:
            pixels.append(decode(storage.read_bytes(uri), spec).pixels)
        except (OSError, DecodeError) as exc:
            raise EngineUnavailableError(
                f"INT8 needs the artifact's {split} images, and {uri} cannot be read here ({exc}); {fallback}"
            ) from None
    labels = rows["label"].to_pylist() if "label" in rows.column_names else [None] * rows.num_rows
    h, w = card.input_size
    return (np.stack(pixels) if pixels else np.zeros((0, h, w), np.uint8)), labels


def int8_calibration_images(
    art: Artifact,
    n: int,
    *,
    seed: int = 0,
    spec: PreprocessSpec | None = None,
    setting: str = "trt_precision",
) -> np.ndarray:
    """``uint8 [n, H, W]`` training images through the shared preprocessing, to calibrate INT8
    quantisation ranges (not probability calibration: that is ``cxr_ray.calibration``).

    Drawn from the artifact's own training split (``split.parquet``), so calibration sees the
    distribution the model was fitted on, and preprocessed exactly as scoring will.
    """
    return split_images(art, "train", n, seed=seed, spec=spec, setting=setting)[0]


def split_logits(art: Artifact, split: str = "val") -> tuple[np.ndarray, np.ndarray]:
    """Raw (untempered) float64 logits of the artifact's network on one of its splits, and labels.

    The images are the ones recorded in ``ARTIFACT/split.parquet``, preprocessed as scoring does;
    what the card's temperature and ECE figures were fitted and measured on.
    """
    logits, _, labels = split_logits_and_features(art, split)
    return logits, labels


def network_outputs(
    art: Artifact, pixels: np.ndarray, *, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(raw logits ``[n, 3]``, penultimate features ``[n, F]``), both float64, of ``art``'s
    network on ``uint8 [n, H, W]`` preprocessed images: the outputs scoring engines compute
    (``LogitsAndFeatures``), in eager torch fp32 on the CPU. What a drift reference or a site
    calibration is fitted on."""
    import torch

    from cxr_ray.models.factory import LogitsAndFeatures

    model = LogitsAndFeatures(art.build()).eval()
    logits, features = [], []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            lo, fe = model(torch.from_numpy(to_model_input(pixels[i : i + batch_size])))
            logits.append(lo.double().numpy())
            features.append(fe.double().numpy())
    if not logits:
        return np.zeros((0, len(LABELS))), np.zeros((0, 0))
    return np.concatenate(logits), np.concatenate(features)


def split_logits_and_features(art: Artifact, split: str = "val") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw float64 logits ``[n, 3]``, float32 penultimate features ``[n, F]``, label indices
    ``[n]``) of the artifact's network (``network_outputs``) on one of its recorded splits."""
    pixels, labels = split_images(art, split)
    logits, features = network_outputs(art, pixels, batch_size=64)
    y = np.array([LABELS.index(v) for v in labels], dtype=np.int64)
    return logits, features.astype(np.float32), y
