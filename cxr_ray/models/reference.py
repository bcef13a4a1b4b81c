"""The drift reference: what the model's validation images looked like, stored in the artifact.

``build_reference(art)`` runs the artifact's network over its validation split (the ``val``
rows of ``ARTIFACT/split.parquet``, or a split table given at training) and serialises, as
safetensors tensors plus JSON metadata (no pickle), everything a scoring run needs to compare
itself with those images (``cxr_ray.scoring.drift``):

- ``logits`` float32 [N, 3], raw: score distributions are recomputed under whichever
  calibration the scoring card has (``card.probabilities(logits)``), so a site-calibrated
  derived artifact compares like with like;
- ``input_stats`` float32 [N, K]: ``cxr_ray.imaging.stats.input_stats`` of the preprocessed
  uint8 pixels and original sizes, exactly what the scoring predictor computes per row;
- penultimate-layer features (``LogitsAndFeatures``): per-dimension mean and std, and a PCA
  basis (``pca_components`` [k, F], ``pca_std`` [k]) with the reference's own projections
  ``pca_scores`` [N, k], so a run's features are compared in k dimensions, cheaply;
- metadata: the predicted-class mix and P(pneumonia) quantiles/histogram under the card's
  calibration at build time (for people; checks recompute them from the logits), and the
  DICOM modality / manufacturer / photometric interpretation / bits stored mix (``null``
  when the validation images are not DICOM). Everything describes the validation images as
  stored at training time: full-resolution training files give full-resolution size facts.

``read_reference(bytes) -> DriftReference``.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.config import DataSettings
from cxr_ray.errors import DecodeError, ModelError
from cxr_ray.imaging.preprocess import decode, sniff_format
from cxr_ray.imaging.stats import INPUT_STATS, input_stats
from cxr_ray.io import storage
from cxr_ray.labels import LABELS, NORMAL
from cxr_ray.models.card import ModelCard, spec_for
from cxr_ray.models.outputs import network_outputs

if TYPE_CHECKING:
    from cxr_ray.models.artifact import Artifact

logger = logging.getLogger(__name__)

REFERENCE_FORMAT = "cxr-ray-drift-reference/1"
_META_KEY = "cxr_ray.drift_reference"
_TENSORS = ("logits", "input_stats", "feature_mean", "feature_std", "pca_components", "pca_std", "pca_scores")
#: Bins of the P(pneumonia) histogram in the metadata (for people and reports).
HIST_BINS = 20
#: DICOM tags whose mix the reference stores (``<tag>_mix``): acquisition facts as stored at
#: training time, compared by the drift check for information (never an alert on their own).
CATEGORY_TAGS = ("modality", "manufacturer", "photometric_interpretation", "bits_stored")


@dataclass(frozen=True)
class DriftReference:
    """A parsed drift reference (``read_reference``)."""

    logits: np.ndarray  # float32 [N, 3]
    input_stats: np.ndarray  # float32 [N, K], columns ``meta["input_stats"]``
    feature_mean: np.ndarray  # float32 [F]
    feature_std: np.ndarray  # float32 [F]
    pca_components: np.ndarray  # float32 [k, F], orthonormal rows
    pca_std: np.ndarray  # float32 [k], std of the reference along each component
    pca_scores: np.ndarray  # float32 [N, k], the reference's own projections
    meta: dict[str, Any]

    @property
    def n(self) -> int:
        return int(self.logits.shape[0])

    @property
    def stat_names(self) -> tuple[str, ...]:
        return tuple(self.meta.get("input_stats", INPUT_STATS))

    def p_pneumonia(self, card: ModelCard) -> np.ndarray:
        """P(pneumonia) of the reference images under ``card``'s calibration (float32, as the
        predictions table stores it)."""
        probs = card.probabilities(self.logits.astype(np.float64))
        return (1.0 - probs[:, LABELS.index(NORMAL)]).astype(np.float32)

    def pred_counts(self, card: ModelCard) -> np.ndarray:
        """Reference images per predicted class (``LABELS`` order) under ``card``."""
        pred = card.probabilities(self.logits.astype(np.float64)).argmax(axis=1)
        return np.bincount(pred, minlength=len(LABELS)).astype(np.int64)

    def project(self, features: np.ndarray) -> np.ndarray:
        """Features ``[n, F]`` -> coordinates ``[n, k]`` in the reference PCA basis."""
        f = np.asarray(features, np.float64)
        if f.shape[1] != self.feature_mean.shape[0]:
            raise ModelError(
                f"features have {f.shape[1]} dimensions, the drift reference {self.feature_mean.shape[0]}: "
                "the reference was built for another network"
            )
        return (f - self.feature_mean) @ self.pca_components.T.astype(np.float64)


def _val_rows(art: Artifact, split: pa.Table | None) -> pa.Table:
    if split is None:
        uri = storage.join(art.uri, "split.parquet")
        if not storage.exists(uri):
            raise ModelError(
                f"a drift reference needs the artifact's validation images: {uri} is missing "
                "(artifacts written by `cxr-ray train` have it)"
            )
        split = storage.read_table(uri)
    if "split" in split.column_names:
        split = split.filter(pc.equal(split["split"], "val"))
    return split


def validation_column(art: Artifact, ref: DriftReference, column: str) -> list[Any] | None:
    """``column`` of the artifact's ``split.parquet`` validation rows, in order: the rows
    ``build_reference`` read, one per reference row. ``None`` when they cannot be matched one
    to one (a subsample, unreadable images, no split file, no such column)."""
    uri = storage.join(art.uri, "split.parquet")
    if ref.meta.get("unreadable") or not storage.exists(uri):
        return None
    split = storage.read_table(uri)
    if column not in split.column_names:
        return None
    values = _val_rows(art, split)[column].to_pylist()
    return values if len(values) == ref.n else None


def _category_mix(values: list[str | None]) -> dict[str, int] | None:
    """Counts per value, or ``None`` when no image carried the tag (JPEG/PNG data)."""
    if all(v is None for v in values):
        return None
    return dict(Counter(v if v is not None else "(none)" for v in values))


def build_reference(
    art: Artifact,
    *,
    split: pa.Table | None = None,
    data: DataSettings | None = None,
    components: int = 16,
    max_images: int | None = 2000,
    seed: int = 0,
    batch_size: int = 32,
    outputs: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
) -> bytes:
    """The drift reference of ``art`` (safetensors bytes) from its validation images.

    ``outputs`` maps ``uint8 [n, H, W]`` preprocessed images to (raw logits, features); by
    default ``network_outputs`` (torch fp32). A scoring engine's own outputs give a reference
    comparable with that engine's runs (``engines.choice``, for bf16 engines).

    ``split`` is a split table (``split``/``uri`` columns) or its ``val`` rows; by default
    ``ARTIFACT/split.parquet``. At most ``max_images`` (a seeded sample) are used. Images
    that cannot be read here are left out (counted in the metadata); none readable is a
    ``ModelError``.
    """
    rows = _val_rows(art, split)
    if rows.num_rows == 0:
        raise ModelError(f"no validation images to build a drift reference from ({art.uri})")
    if max_images is not None and rows.num_rows > max_images:
        picked = np.random.default_rng(seed).choice(rows.num_rows, size=max_images, replace=False)
        rows = rows.take(np.sort(picked))
    spec = spec_for(art.card, data)
    pixels, widths, heights = [], [], []
    tags: dict[str, list[str | None]] = {k: [] for k in CATEGORY_TAGS}
    unreadable = 0
    for uri in rows["uri"].to_pylist():
        try:
            blob = storage.read_bytes(uri)
            decoded = decode(blob, spec, uri)
        except (OSError, DecodeError):
            unreadable += 1
            continue
        header = None
        if sniff_format(blob, uri) == "dicom":
            from cxr_ray.imaging.dicom import read_header

            header = read_header(blob)
        for k in CATEGORY_TAGS:
            v = getattr(header, k, None) if header else None
            tags[k].append(None if v is None else str(v))
        pixels.append(decoded.pixels)
        widths.append(decoded.width)
        heights.append(decoded.height)
    if not pixels:
        raise ModelError(f"none of the {rows.num_rows} validation images of {art.uri} can be read here")
    if unreadable:
        logger.warning(
            "drift reference: %d of %d validation images could not be read", unreadable, rows.num_rows
        )
    px = np.stack(pixels)
    logits, feats = outputs(px) if outputs is not None else network_outputs(art, px, batch_size=batch_size)
    stats = input_stats(px, np.array(widths), np.array(heights))
    return reference_from_arrays(
        art.card,
        logits,
        stats,
        feats,
        categories=tags,
        components=components,
        unreadable=unreadable,
    )


def reference_from_arrays(
    card: ModelCard,
    logits: np.ndarray,
    stats: np.ndarray,
    features: np.ndarray,
    *,
    categories: dict[str, list[str | None]] | None = None,
    components: int = 16,
    unreadable: int = 0,
) -> bytes:
    """The reference bytes from per-image arrays of the validation images (``build_reference``
    after decoding and running the network); ``categories``: per-image DICOM tag values by
    ``CATEGORY_TAGS`` name (``None`` where an image has no tags)."""
    n = len(logits)
    if n < 2 or len(stats) != n or len(features) != n:
        raise ModelError(
            f"a drift reference needs at least 2 images with logits, statistics and features ({n})"
        )
    feats = np.asarray(features, np.float64)
    mean = feats.mean(axis=0)
    std = feats.std(axis=0)
    centred = feats - mean
    k = max(1, min(components, n - 1, feats.shape[1]))
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    basis = vt[:k]
    scores = centred @ basis.T
    pca_std = scores.std(axis=0)
    probs = card.probabilities(np.asarray(logits, np.float64))
    p_pneu = 1.0 - probs[:, LABELS.index(NORMAL)]
    hist, _ = np.histogram(p_pneu, bins=HIST_BINS, range=(0.0, 1.0))
    explained = (sing[:k] ** 2).sum() / max((sing**2).sum(), 1e-30)
    quantiles = np.quantile(p_pneu, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist()
    mix = np.bincount(probs.argmax(1), minlength=len(LABELS)) / n
    meta: dict[str, Any] = {
        "format": REFERENCE_FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "engine_key": card.engine_key,
        "calibration_fingerprint": card.calibration_fingerprint,
        "n": n,
        "unreadable": unreadable,
        "labels": list(LABELS),
        "input_stats": list(INPUT_STATS),
        "input_size": list(card.input_size),
        "intensity": card.intensity,
        "feature_dim": int(feats.shape[1]),
        "components": k,
        "explained_variance": float(explained),
        "pred_mix": dict(zip(LABELS, mix.tolist(), strict=True)),
        "p_pneumonia_quantiles": dict(zip(["p05", "p25", "p50", "p75", "p95"], quantiles, strict=True)),
        "p_pneumonia_hist": hist.tolist(),
    }
    for tag in CATEGORY_TAGS:
        meta[f"{tag}_mix"] = _category_mix((categories or {}).get(tag) or [None] * n)
    tensors = {
        "logits": np.asarray(logits, np.float32),
        "input_stats": np.asarray(stats, np.float32),
        "feature_mean": mean.astype(np.float32),
        "feature_std": std.astype(np.float32),
        "pca_components": basis.astype(np.float32),
        "pca_std": pca_std.astype(np.float32),
        "pca_scores": scores.astype(np.float32),
    }
    from safetensors.numpy import save

    blob: bytes = save(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={_META_KEY: json.dumps(meta)}
    )
    return blob


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (an 8-byte length, then the JSON header)."""
    if len(data) < 8:
        raise ModelError("the drift reference is not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ModelError("the drift reference is not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        raise ModelError("the drift reference is not a safetensors file (bad header)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def read_reference(data: bytes) -> DriftReference:
    """Parse the bytes ``build_reference`` wrote (``Artifact.reference``)."""
    from safetensors.numpy import load

    meta_text = _metadata(data).get(_META_KEY)
    try:
        meta = json.loads(meta_text) if meta_text else None
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError for junk
        raise ModelError(f"the drift reference cannot be read: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != REFERENCE_FORMAT:
        raise ModelError(f"the drift reference is not in the {REFERENCE_FORMAT} format")
    missing = [k for k in _TENSORS if k not in tensors]
    if missing:
        raise ModelError(f"the drift reference lacks {', '.join(missing)}")
    return DriftReference(**{k: tensors[k] for k in _TENSORS}, meta=meta)
