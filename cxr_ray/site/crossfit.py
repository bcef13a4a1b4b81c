"""Cross-fitting: every sample image gets probabilities (and a threshold) from a fit that did
not see it, so what the sample says about a calibration is not what it was fitted to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr_ray.labels import LABELS
from cxr_ray.site.fit import Prior, fit_site_calibration

#: ``fit(train_x, train_y)`` -> a predictor ``held_x -> (probs, threshold)``.
Fitter = Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], tuple[np.ndarray, float]]]


def site_folds(
    y_true: np.ndarray, groups: np.ndarray | None = None, *, k: int = 5, seed: int = 0
) -> np.ndarray:
    """Fold index (0..k-1) of every sample: stratified by class, grouped by patient when
    ``groups`` is given (one patient's images never straddle folds)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(y_true, np.int64)
    fold = np.full(len(y), -1, np.int64)
    if groups is None:
        splitter: Any = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(y)), y)
    else:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(y)), y, np.asarray(groups))
    for i, (_, held) in enumerate(parts):
        fold[held] = i
    return fold


def fold_count(y_true: np.ndarray, folds: int) -> int:
    """``folds``, fewer when a class has fewer images (at least 2)."""
    counts = np.bincount(np.asarray(y_true, np.int64), minlength=len(LABELS))
    return max(2, min(folds, int(counts.min())))


@dataclass(frozen=True)
class CrossFit:
    """Out-of-fold calibrated probabilities of every sample image, and each one's threshold
    (fitted, like the probabilities, without the image's own fold)."""

    probs: np.ndarray
    thresholds: np.ndarray
    folds: np.ndarray


def cross_fit(logits: np.ndarray, y_true: np.ndarray, folds: np.ndarray, fit: Fitter) -> CrossFit:
    """K-fold cross-fitting: for each fold, ``fit(train_x, train_y)`` returns a predictor
    ``x -> (probs, threshold)`` that is applied to the held-out fold only.

    ``logits`` may be any per-sample feature array (logits, or penultimate features for a
    head refit): rows are what is split.
    """
    x = np.asarray(logits)
    y = np.asarray(y_true, np.int64)
    probs = np.full((len(y), len(LABELS)), np.nan)
    thresholds = np.full(len(y), np.nan)
    for f in np.unique(folds):
        held = folds == f
        predict = fit(x[~held], y[~held])
        p, t = predict(x[held])
        probs[held] = p
        thresholds[held] = t
    return CrossFit(probs, thresholds, np.asarray(folds))


def site_calibration_fitter(
    method: str, prior: Prior, target_sensitivity: float, confidence: float = 0.95
) -> Fitter:
    """``fit`` for ``cross_fit`` with ``fit_site_calibration``."""

    def fit(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, float]]:
        f = fit_site_calibration(
            x, y, method=method, prior=prior, target_sensitivity=target_sensitivity, confidence=confidence
        )
        return lambda held: (f.probs(held), f.threshold)

    return fit
