"""A label-free estimate of a scoring run's performance, with 95% intervals.

``summary.json`` gets ``performance_estimate``: the run's expected pneumonia sensitivity and
specificity at the card's flag threshold, 3-class accuracy and the flag rate, each
``{estimate, low, high}``, how it was computed (``method``), and whether it can be trusted
(``reliable`` with a ``note``)::

    acc = EstimateAccumulator(art.card, reference, reference_labels(art, reference))
    for block in predictor_output_blocks:      # prob_* columns (and features, when present)
        acc.add(block)
    estimate = acc.finish()                    # the summary.json block

Methods (all three are computed; ``method`` says which one the figures are: ATC where the
artifact's reference has its validation labels, else CBPE; the others are in
``alternatives``). Chosen by measurement (docs/MONITORING.md, "Performance estimate";
``benchmarks/performance_estimate.py``): without feature shift all three are within ~0.05
of the measured specificity and ATC covers best; under the constructed sites none is (errors
0.24-0.9), and those runs are the ones ``reliable: false`` marks (domain AUC 0.97-0.99):

- ``cbpe``: confidence-based performance estimation (NannyML's CBPE, a few lines here): if
  the calibrated probabilities hold at the site, the expected confusion counts at the flag
  threshold are sums of P(pneumonia) over flagged / unflagged rows, and the expected 3-class
  accuracy is the mean top-class probability. Needs nothing but the run's probabilities.
- ``atc``: average thresholded confidence (Garg et al., ICLR 2022): a confidence threshold
  fitted on the validation images (the drift reference's logits and the split's labels) so
  that the share above it equals the validation accuracy; applied per predicted group
  (flagged: PPV, unflagged: NPV) for sensitivity and specificity.
- ``iw``: importance weighting of the labelled validation images by a domain classifier
  (logistic regression) that tells the run's penultimate features (reference-PCA
  coordinates, a reservoir) from the reference's.

Interval: the estimate's own sampling uncertainty (the Poisson-binomial variance of the
unknown labels given the probabilities, delta method for the ratios) plus a systematic
term for calibration that does not hold under shift, which grows with how well a domain
classifier tells the run from the reference (``domain_auc``; cross-validated, label-free):
``half = sqrt((1.96 * se)^2 + (SYSTEMATIC_BASE + SYSTEMATIC_SLOPE * shift)^2)`` with
``shift = 2 * (domain_auc - 0.5)`` clipped to 0..1. Then the images beyond the reference's
support (``outside_reference``: the share whose cross-fitted P(run | z) exceeds the reference's
99th percentile, less the 1% a same-distribution run has there; ``domain_shift``) are taken as
unknown: the metric is ``(1 - u) * inside + u * anything`` with ``u`` their share of the images
the metric counts (all for accuracy; at worst all of them positives for sensitivity, negatives
for specificity), so the interval becomes ``[(1 - u) * low, (1 - u) * high + u]``: a worst-case
bound where the model may be wrong in ways no label-free method sees (the constructed sites).
Under severe shift (``domain_auc`` >= ``SEVERE_DOMAIN_AUC``) the sensitivity and specificity
intervals are ``[0, 1]``: which images are positives is itself unknown there.
The estimate is flagged unreliable (``reliable: false``) below ``MIN_IMAGES`` scored images,
when ``domain_auc`` is at or above ``SEVERE_DOMAIN_AUC`` (the run's features barely overlap
the reference's) or when ``outside_reference`` is at or above ``UNRELIABLE_OUTSIDE``.

Memory is bounded: sums for CBPE, counts for ATC (its thresholds are fixed at start), and
a uniform reservoir of PCA coordinates for the domain classifier.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.labels import LABELS, NORMAL
from cxr_ray.models.card import ModelCard
from cxr_ray.scoring.estimators import (
    AtcThresholds,
    _atc_counts,
    _atc_figures,
    _Sums,
    atc,
    cbpe,
    domain_auc,
    domain_shift,
    importance_weighted,
    with_label_noise,
)
from cxr_ray.vocabulary import Status

if TYPE_CHECKING:
    from cxr_ray.models.artifact import Artifact
    from cxr_ray.models.reference import DriftReference

logger = logging.getLogger(__name__)

__all__ = [
    "EstimateAccumulator",
    "atc",
    "cbpe",
    "domain_auc",
    "estimate_arrays",
    "estimate_line",
    "importance_weighted",
    "reference_labels",
]

METHODS = ("cbpe", "atc", "iw")
#: The method whose figures ``performance_estimate`` reports (chosen by measurement).
DEFAULT_METHOD = "atc"
METRICS = ("sensitivity", "specificity", "accuracy", "flag_rate")
#: Fewer scored images than this: the estimate is given but marked unreliable.
MIN_IMAGES = 100
#: Domain-classifier AUC at or above which the run's features barely overlap the reference's.
SEVERE_DOMAIN_AUC = 0.95
#: A share of the run beyond the reference (``outside_reference``) at or above which the point
#: estimate is marked unreliable (its interval is already widened for them).
UNRELIABLE_OUTSIDE = 0.2
#: The systematic half-width at no measurable shift, and its growth with ``shift``.
SYSTEMATIC_BASE = 0.01
SYSTEMATIC_SLOPE = 0.15
_Z = 1.959963984540054
_NORMAL = LABELS.index(NORMAL)
_RESERVOIR = 2000


# -- intervals and the summary block ------------------------------------------------------


def systematic_half_width(auc: float) -> float:
    """The interval's allowance for calibration that does not hold at the site."""
    shift = 0.0 if not math.isfinite(auc) else min(max(2.0 * (auc - 0.5), 0.0), 1.0)
    return SYSTEMATIC_BASE + SYSTEMATIC_SLOPE * shift


def _interval(est: float, se: float, systematic: float, unknown: float = 0.0) -> dict[str, float | None]:
    """``{estimate, low, high}``: the estimate +- its half-width, then widened for a share
    ``unknown`` of the metric's images whose behaviour nothing label-free can tell (outside the
    reference): the metric is ``(1 - unknown) * inside + unknown * outside`` with ``outside``
    anywhere in 0..1 (a worst-case, partial-identification bound)."""
    if not math.isfinite(est):
        return {"estimate": None, "low": None, "high": None}
    half = math.sqrt((_Z * (se if math.isfinite(se) else 0.0)) ** 2 + systematic**2)
    low, high = max(0.0, est - half), min(1.0, est + half)
    u = min(max(unknown, 0.0), 1.0)
    return {
        "estimate": round(est, 4),
        "low": round((1.0 - u) * low, 4),
        "high": round((1.0 - u) * high + u, 4),
    }


def unknown_shares(outside: float, prevalence: float, auc: float = math.nan) -> dict[str, float]:
    """How much of each metric rests on images outside the reference: all of the run's
    images for accuracy; among the positives (negatives) for sensitivity (specificity) at
    worst every outside image is one of them, so ``outside / prevalence`` (``/ (1 -
    prevalence)``), capped at 1. Under severe shift (``auc`` >= ``SEVERE_DOMAIN_AUC``: the
    features barely overlap the reference's) which images are positives is itself unknown, so
    sensitivity and specificity rest wholly on the unknown (1). Measured: the share-based
    bound covered the 70%-normal constructed site's sensitivity in 0-10% of trials, a
    flag-aware one in 20% (docs/MONITORING.md)."""
    severe = math.isfinite(auc) and auc >= SEVERE_DOMAIN_AUC
    if not severe and (not math.isfinite(outside) or outside <= 0.0):
        return dict.fromkeys(METRICS, 0.0)
    out = max(outside, 0.0) if math.isfinite(outside) else 0.0
    prev = min(max(prevalence if math.isfinite(prevalence) else 0.5, 1e-6), 1.0 - 1e-6)
    return {
        "sensitivity": 1.0 if severe else min(1.0, out / prev),
        "specificity": 1.0 if severe else min(1.0, out / (1.0 - prev)),
        "accuracy": out,
        "flag_rate": 0.0,
    }


def summary_block(
    figures: dict[str, dict[str, tuple[float, float]]],
    method: str,
    *,
    n: int,
    auc: float,
    outside: float = 0.0,
    prevalence: float = math.nan,
) -> dict[str, Any]:
    """The ``performance_estimate`` block from each method's ``metric -> (estimate, se)``;
    ``outside``: the share of the run beyond the reference (``domain_shift``), ``prevalence``:
    the run's expected pneumonia share (the mean P(pneumonia))."""
    sys_half = systematic_half_width(auc)
    unknown = unknown_shares(outside, prevalence, auc)
    chosen = figures[method]
    out: dict[str, Any] = {"method": method, "n_images": n}
    for m in METRICS:
        # The flag rate is counted, not estimated: no systematic term.
        out[m] = _interval(*chosen[m], 0.0 if m == "flag_rate" else sys_half, unknown[m])
    notes = []
    if n < MIN_IMAGES:
        notes.append(f"fewer than {MIN_IMAGES} scored images")
    if math.isfinite(auc) and auc >= SEVERE_DOMAIN_AUC:
        notes.append(
            f"severe feature shift (domain classifier AUC {auc:.2f} >= {SEVERE_DOMAIN_AUC}): the "
            "model's probabilities may not hold here; label a sample (cxr-ray site-check / calibrate)"
        )
    elif outside >= UNRELIABLE_OUTSIDE:
        notes.append(
            f"{outside:.0%} of the images lie outside the reference's features: the interval allows any "
            "performance on them; label a sample (cxr-ray site-check / calibrate)"
        )
    out["reliable"] = not notes
    out["note"] = "; ".join(notes) if notes else None
    out["domain_auc"] = None if not math.isfinite(auc) else round(auc, 4)
    out["outside_reference"] = round(outside, 4) if math.isfinite(outside) else None
    out["alternatives"] = {
        k: {m: (None if not math.isfinite(v[m][0]) else round(v[m][0], 4)) for m in METRICS}
        for k, v in figures.items()
        if k != method
    }
    return out


def estimate_arrays(
    probs: np.ndarray,
    threshold: float,
    *,
    run_z: np.ndarray | None = None,
    ref_probs: np.ndarray | None = None,
    ref_y: np.ndarray | None = None,
    ref_z: np.ndarray | None = None,
    method: str = DEFAULT_METHOD,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``performance_estimate`` block of a run given as arrays (benchmarks, tests)."""
    probs = np.asarray(probs, np.float64)
    figures = {"cbpe": cbpe(probs, threshold)}
    if ref_probs is not None and ref_y is not None:
        fitted = AtcThresholds.fit(ref_probs, ref_y, threshold)
        figures["atc"] = with_label_noise(atc(probs, threshold, fitted), figures["cbpe"])
    auc, outside = math.nan, 0.0
    if ref_z is not None and run_z is not None and len(run_z) >= 2:
        auc, outside = domain_shift(ref_z, run_z, seed)
        if ref_probs is not None and ref_y is not None:
            figures["iw"] = importance_weighted(
                ref_probs, ref_y, ref_z, run_z, threshold, flag_rate=figures["cbpe"]["flag_rate"], seed=seed
            )
    if method not in figures:
        method = "cbpe"
    prevalence = float(np.mean(1.0 - probs[:, _NORMAL])) if len(probs) else math.nan
    return summary_block(figures, method, n=len(probs), auc=auc, outside=outside, prevalence=prevalence)


def estimate_line(e: dict[str, Any]) -> str | None:
    """The console summary line of a ``performance_estimate`` block (``None``: no estimate)."""
    if not e or e.get("sensitivity") is None:
        return None

    def fmt(m: str) -> str:
        v = e[m]
        if v.get("estimate") is None:
            return f"{m} n/a"
        return f"{m} {v['estimate']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"

    line = f"estimated performance (no labels, {e['method']}, at the flag threshold): " + ", ".join(
        fmt(m) for m in ("sensitivity", "specificity", "accuracy", "flag_rate")
    )
    if not e.get("reliable", True):
        line += f" -- UNRELIABLE: {e.get('note')}"
    return line


# -- block by block, inside a scoring run -----------------------------------------------------


def reference_labels(art: Artifact, ref: DriftReference) -> np.ndarray | None:
    """The class indices of the drift reference's images: the ``val`` rows of the artifact's
    ``split.parquet``, in order (the rows ``build_reference`` read), or ``None`` when they cannot
    be matched one to one (a subsample, unreadable images, no split file)."""
    from cxr_ray.models.reference import validation_column

    val = validation_column(art, ref, "label")
    if val is None or any(v not in LABELS for v in val):
        return None
    return np.array([LABELS.index(v) for v in val], np.int64)


class EstimateAccumulator:
    """The performance estimate of a run, block by block (bounded memory)."""

    def __init__(
        self,
        card: ModelCard,
        reference: DriftReference | None = None,
        labels: np.ndarray | None = None,
        *,
        method: str = DEFAULT_METHOD,
        reservoir_size: int = _RESERVOIR,
        seed: int = 0,
    ) -> None:
        self.card = card
        self.threshold = card.pneumonia_threshold
        self.ref = reference
        self.method = method
        self.sums = _Sums()
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.ref_probs = self.ref_z = self.atc_t = None
        self.atc_counts = np.zeros(5)
        if reference is not None:
            self.ref_probs = card.probabilities(reference.logits.astype(np.float64))
            self.ref_z = reference.pca_scores.astype(np.float64) / _std(reference)
            if labels is not None and len(labels) == reference.n:
                self.atc_t = AtcThresholds.fit(self.ref_probs, labels, self.threshold)
        self.labels = labels
        k = 0 if reference is None else reference.pca_components.shape[0]
        self.res = np.full((reservoir_size, k), np.nan)
        self.seen = 0

    def add(self, block: pa.Table) -> None:
        """Count the ``ok`` rows of a predictions block (``prob_*``; ``features`` if present)."""
        if block.num_rows == 0 or "status" not in block.column_names:
            return
        ok_mask = pc.fill_null(pc.equal(block["status"], Status.OK.value), False)
        ok = np.asarray(ok_mask.to_numpy(zero_copy_only=False))
        if not ok.any():
            return
        probs = np.stack(
            [block[f"prob_{k}"].to_numpy(zero_copy_only=False).astype(np.float64)[ok] for k in LABELS], axis=1
        )
        fine = np.isfinite(probs).all(axis=1)
        probs = probs[fine]
        self.sums.add(probs, self.threshold)
        if self.atc_t is not None:
            self.atc_counts += _atc_counts(probs, self.threshold, self.atc_t)
        if self.ref is not None and "features" in block.column_names:
            from cxr_ray.scoring.stages import tensor_column

            feats = np.asarray(tensor_column(block, "features"), np.float64).reshape(block.num_rows, -1)
            feats = feats[ok][fine]
            if feats.shape[1] == self.ref.feature_mean.shape[0]:
                good = np.isfinite(feats).all(axis=1)
                self._reservoir(self.ref.project(feats[good]) / _std(self.ref))

    def _reservoir(self, z: np.ndarray) -> None:
        size = self.res.shape[0]
        for row in z:  # Algorithm R; blocks are small next to the scoring itself
            if self.seen < size:
                self.res[self.seen] = row
            else:
                j = int(self.rng.integers(0, self.seen + 1))
                if j < size:
                    self.res[j] = row
            self.seen += 1

    def finish(self) -> dict[str, Any]:
        """The ``performance_estimate`` block (``{}`` when no row was scored)."""
        if self.sums.n == 0:
            return {}
        figures = {"cbpe": self.sums.figures()}
        if self.atc_t is not None:
            figures["atc"] = with_label_noise(_atc_figures(self.atc_counts), figures["cbpe"])
        auc, outside = math.nan, 0.0
        run_z = self.res[: min(self.seen, self.res.shape[0])]
        if self.ref_z is not None and len(run_z) >= 10:
            auc, outside = domain_shift(self.ref_z, run_z, self.seed)
            if self.labels is not None and self.ref_probs is not None:
                figures["iw"] = importance_weighted(
                    self.ref_probs,
                    self.labels,
                    self.ref_z,
                    run_z,
                    self.threshold,
                    flag_rate=figures["cbpe"]["flag_rate"],
                    seed=self.seed,
                )
        method = self.method if self.method in figures else "cbpe"
        prevalence = (self.sums.tp + self.sums.fn) / self.sums.n
        return summary_block(figures, method, n=self.sums.n, auc=auc, outside=outside, prevalence=prevalence)


def _std(ref: DriftReference) -> np.ndarray:
    return np.maximum(ref.pca_std.astype(np.float64), 1e-6)


def run_estimator(art: Artifact, reference: DriftReference | None = None) -> EstimateAccumulator:
    """The accumulator a scoring run of ``art`` feeds: CBPE always; ATC and the domain
    classifier when the artifact has a drift reference (with its validation labels).
    ``reference``: the artifact's reference already read (by the drift check), else read here."""
    ref = reference
    labels = None
    if art.reference is not None:
        from cxr_ray.errors import ModelError
        from cxr_ray.models.reference import read_reference

        try:
            ref = ref if ref is not None else read_reference(art.reference)
            labels = reference_labels(art, ref)
        except (ModelError, OSError) as exc:
            logger.warning("performance estimate without the drift reference: %s", exc)
            ref = None
    return EstimateAccumulator(art.card, ref, labels)
