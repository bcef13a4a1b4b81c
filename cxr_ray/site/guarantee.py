"""The sensitivity guarantee of a site threshold: exact binomial (Clopper-Pearson) bounds.

A screening tool may trade specificity for sensitivity, never silently the reverse. A site
threshold is therefore only used when the one-sided lower confidence bound (default 95%) of
its sensitivity, counted on the sample's positives scored out of fold (by calibrations that
did not see them), reaches the target. Flagging is ``p >= t``; keeping ``n - m`` of ``n``
positives at the threshold just below the ``(m + 1)``-th lowest positive score is, for
exchangeable images, the distribution-free tolerance bound: its sensitivity on new images of
the site is below the target with probability at most ``1 - confidence``. Fewer positives
than ``positives_for(target)`` (59 at 0.95 / 95%) cannot support the target at all: even all
of them flagged leaves the bound below it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import beta

from cxr_ray.calibration import threshold_keeping
from cxr_ray.labels import LABELS, NORMAL

#: Never search beyond this many positives for "how many are needed".
MAX_POSITIVES = 100_000


def sensitivity_lower_bound(flagged: int | np.ndarray, positives: int | np.ndarray, confidence: float = 0.95):
    """One-sided Clopper-Pearson lower bound of sensitivity: ``flagged`` of ``positives``
    flagged, at ``confidence`` (the ``1 - confidence`` quantile of Beta(x, n - x + 1); 0 when
    nothing is flagged). Vectorised over numpy arrays."""
    x = np.asarray(flagged, np.float64)
    n = np.asarray(positives, np.float64)
    with np.errstate(invalid="ignore"):
        low = beta.ppf(1.0 - confidence, np.maximum(x, 1e-300), n - x + 1)
    low = np.where(x > 0, low, 0.0)
    return float(low) if low.ndim == 0 else low


def allowed_misses(positives: int, target: float, confidence: float = 0.95) -> int | None:
    """The most positives that may be missed with the bound still at ``target`` (``None``:
    not even with none missed)."""
    misses = np.arange(positives + 1)
    ok = sensitivity_lower_bound(positives - misses, np.full_like(misses, positives), confidence) >= target
    return int(np.flatnonzero(ok).max()) if ok.any() else None


def positives_for(target: float, confidence: float = 0.95, miss_rate: float = 0.0) -> int | None:
    """The fewest labelled positives whose bound reaches ``target`` when ``ceil(miss_rate * n)``
    of them are missed (0: all flagged); ``None`` when no number does (``miss_rate >= 1 - target``)."""
    if target >= 1.0 or miss_rate >= 1.0 - target:
        return None
    lo = 1
    while lo <= MAX_POSITIVES:  # in growing chunks: the answer is usually below 1,000
        n = np.arange(lo, min(10 * lo + 1000, MAX_POSITIVES) + 1)
        misses = np.ceil(miss_rate * n - 1e-9)
        ok = sensitivity_lower_bound(n - misses, n, confidence) >= target
        if ok.any():
            return int(n[np.argmax(ok)])
        lo = int(n[-1]) + 1
    return None


@dataclass(frozen=True)
class SensitivityGuarantee:
    """What a site sample can promise about the sensitivity of a threshold (``choose``)."""

    target: float
    confidence: float
    positives: int
    #: The threshold that keeps the promise on the kept calibration; ``None`` when not met.
    threshold: float | None
    #: Positives flagged by ``threshold`` (or, when not met, by the parent's threshold on
    #: the parent's calibration), scored out of fold.
    flagged: int
    #: Clopper-Pearson lower bound of sensitivity from ``flagged`` of ``positives``.
    lower_bound: float
    met: bool
    #: More labelled positives needed for the target: with every one flagged, and at the
    #: miss rate observed here (``None``: that rate can never support the target).
    more_positives_needed: int
    more_positives_needed_at_miss_rate: int | None
    observed_miss_rate: float

    def as_dict(self) -> dict[str, Any]:
        return {"method": "clopper-pearson, out-of-fold", **asdict(self)}


def _p_pneumonia(probs: np.ndarray) -> np.ndarray:
    return 1.0 - np.asarray(probs, np.float64)[:, LABELS.index(NORMAL)]


def choose(
    y_true: np.ndarray,
    oof_probs: np.ndarray,
    fitted_probs: np.ndarray,
    parent_probs: np.ndarray,
    parent_threshold: float,
    *,
    target: float,
    confidence: float = 0.95,
) -> SensitivityGuarantee:
    """The most specific site threshold whose sensitivity bound reaches ``target``.

    ``oof_probs``: the sample's cross-fitted probabilities; ``fitted_probs``: the same images
    under the calibration fitted on all of them (what the derived card will apply). The
    threshold keeps ``n - allowed_misses`` positives on both (the lower, more sensitive, of the
    two thresholds), so it is judged on scores that did not see the images and is never less
    sensitive on the sample than the guarantee allows. When the positives cannot support the
    target, the parent's threshold on ``parent_probs`` is what is counted and kept.
    """
    y = np.asarray(y_true, np.int64)
    truth = y != LABELS.index(NORMAL)
    n = int(truth.sum())
    m = allowed_misses(n, target, confidence)
    if m is not None:
        keep = n - m
        t = min(threshold_keeping(oof_probs, y, keep), threshold_keeping(fitted_probs, y, keep))
        flagged = int((_p_pneumonia(oof_probs)[truth] >= t).sum())
        miss_rate = (n - flagged) / n
        need_rate = positives_for(target, confidence, miss_rate)
        return SensitivityGuarantee(
            target=target,
            confidence=confidence,
            positives=n,
            threshold=float(t),
            flagged=flagged,
            lower_bound=sensitivity_lower_bound(flagged, n, confidence),
            met=True,
            more_positives_needed=0,
            more_positives_needed_at_miss_rate=None if need_rate is None else max(0, need_rate - n),
            observed_miss_rate=miss_rate,
        )
    flagged = int((_p_pneumonia(parent_probs)[truth] >= parent_threshold).sum())
    miss_rate = (n - flagged) / n if n else 0.0
    need_all = positives_for(target, confidence) or MAX_POSITIVES
    need_rate = positives_for(target, confidence, miss_rate)
    return SensitivityGuarantee(
        target=target,
        confidence=confidence,
        positives=n,
        threshold=None,
        flagged=flagged,
        lower_bound=sensitivity_lower_bound(flagged, n, confidence) if n else 0.0,
        met=False,
        more_positives_needed=need_all - n,
        more_positives_needed_at_miss_rate=None if need_rate is None else max(0, need_rate - n),
        observed_miss_rate=miss_rate,
    )


def in_sample_threshold(
    probs: np.ndarray, y_true: np.ndarray, target: float, confidence: float = 0.95
) -> float:
    """The guarantee's rule on one calibration's own probabilities (what each cross-fitting
    fold's fit uses): keep ``n - allowed_misses`` positives, or all of them when the positives
    cannot support the target."""
    n = int((np.asarray(y_true) != LABELS.index(NORMAL)).sum())
    m = allowed_misses(n, target, confidence)
    return threshold_keeping(probs, y_true, n - (m or 0))
