"""The final linear layer refitted on a site sample's frozen penultimate features.

Strong L2 toward the shipped head; the strength is chosen by cross-fitted NLL inside each
training set, so a held-out fold never helps choose it. ``cxr-ray calibrate --head`` keeps
the refit only when its cross-fitted NLL beats the calibration-only method's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax

from cxr_ray.calibration import calibrated_probs, nll
from cxr_ray.site.crossfit import Fitter, cross_fit, fold_count, site_folds
from cxr_ray.site.fit import PRIOR_SD, Prior
from cxr_ray.site.guarantee import in_sample_threshold

#: Candidate strengths of the pull toward the shipped head (``calibrate.head_lambdas``).
HEAD_LAMBDAS = (1.0, 10.0, 100.0, 1000.0)


@dataclass(frozen=True)
class HeadFit:
    """A refitted final linear layer (``logits = features @ weight.T + bias``)."""

    weight: np.ndarray  # [k, F]
    bias: np.ndarray  # [k]
    lam: float
    threshold: float


def fit_head(
    features: np.ndarray,
    y_true: np.ndarray,
    w0: np.ndarray,
    c0: np.ndarray,
    *,
    lam: float,
    prior: Prior,
    target_sensitivity: float = 0.95,
    bias_sd: float = PRIOR_SD["bias"],
    confidence: float = 0.95,
) -> HeadFit:
    """The final linear layer refitted on frozen features: minimises
    ``sum NLL(card calibration of (F W^T + c)) + lam * ||W - W0||^2 + 0.5 * ||(c - c0) / sd||^2``
    (strong L2 toward the shipped head), then the flag threshold."""
    from scipy.optimize import minimize

    feats = np.asarray(features, np.float64)
    y = np.asarray(y_true, np.int64)
    w0 = np.asarray(w0, np.float64)
    c0 = np.asarray(c0, np.float64)
    k, d = w0.shape
    n = len(y)
    onehot = np.eye(k)[y]
    # The card's calibration stays the parent's on top of the new logits.
    scale = np.asarray(prior.logit_scale, np.float64) / prior.temperature
    shift = np.asarray(prior.logit_bias, np.float64)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: k * d].reshape(k, d)
        c = theta[k * d :]
        logp = log_softmax((feats @ w.T + c) * scale + shift, axis=1)
        r = (np.exp(logp) - onehot) * scale  # d loss / d logits
        dw, dc = w - w0, c - c0
        loss = -float(logp[np.arange(n), y].sum()) + lam * float(np.sum(dw**2))
        loss += 0.5 * float(np.sum((dc / bias_sd) ** 2))
        gw = r.T @ feats + 2 * lam * dw
        gc = r.sum(axis=0) + dc / bias_sd**2
        return loss, np.concatenate([gw.ravel(), gc])

    theta0 = np.concatenate([w0.ravel(), c0])
    theta = minimize(objective, theta0, jac=True, method="L-BFGS-B").x if n else theta0
    w, c = theta[: k * d].reshape(k, d), theta[k * d :]
    probs = calibrated_probs(feats @ w.T + c, prior.temperature, prior.logit_scale, prior.logit_bias)
    threshold = in_sample_threshold(probs, y, target_sensitivity, confidence) if n else 0.5
    return HeadFit(w, c, float(lam), float(threshold))


def head_probs(fit: HeadFit, features: np.ndarray, prior: Prior) -> np.ndarray:
    logits = np.asarray(features, np.float64) @ fit.weight.T + fit.bias
    return calibrated_probs(logits, prior.temperature, prior.logit_scale, prior.logit_bias)


def choose_head_lambda(
    features: np.ndarray,
    y_true: np.ndarray,
    w0: np.ndarray,
    c0: np.ndarray,
    *,
    prior: Prior,
    groups: np.ndarray | None = None,
    k: int = 3,
    seed: int = 0,
    lambdas: tuple[float, ...] = HEAD_LAMBDAS,
) -> float:
    """The ``lam`` of ``fit_head`` with the lowest cross-fitted NLL on this data."""
    y = np.asarray(y_true, np.int64)
    folds = site_folds(y, groups, k=fold_count(y, k), seed=seed)
    best, best_nll = lambdas[-1], math.inf
    for lam in lambdas:

        def fit(x: np.ndarray, yy: np.ndarray, lam: float = lam) -> Callable[[np.ndarray], tuple]:
            h = fit_head(x, yy, w0, c0, lam=lam, prior=prior)
            return lambda held: (head_probs(h, held, prior), h.threshold)

        value = nll(cross_fit(features, y, folds, fit).probs, y)
        if value < best_nll:
            best, best_nll = lam, value
    return best


def head_fitter(
    w0: np.ndarray,
    c0: np.ndarray,
    prior: Prior,
    target_sensitivity: float,
    *,
    seed: int = 0,
    lambdas: tuple[float, ...] = HEAD_LAMBDAS,
    confidence: float = 0.95,
) -> Fitter:
    """``fit`` for ``cross_fit`` with ``fit_head``; ``lam`` is chosen inside each training set
    (nested, stratified folds), so the held-out fold plays no part in choosing it."""

    def fit(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, float]]:
        lam = choose_head_lambda(x, y, w0, c0, prior=prior, seed=seed, lambdas=lambdas)
        h = fit_head(
            x, y, w0, c0, lam=lam, prior=prior, target_sensitivity=target_sensitivity, confidence=confidence
        )
        return lambda held: (head_probs(h, held, prior), h.threshold)

    return fit
