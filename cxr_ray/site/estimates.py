"""``fit_site``: a site sample's calibration fitted, its threshold guaranteed, its gain estimated.

Pure numpy/scipy on precomputed logits (the benchmarks call it directly): the method's fit on
the whole sample, the same fit cross-fitted (every image scored by a fit without its fold),
optionally the head refit (kept only if its cross-fitted NLL is lower), the sensitivity
guarantee on the out-of-fold scores (``cxr_ray.site.guarantee``), and bootstrap intervals of
parent vs calibrated on the sample (``cxr_ray.site.bootstrap``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr_ray.calibration import nll
from cxr_ray.models.card import ModelCard
from cxr_ray.site import guarantee
from cxr_ray.site.bootstrap import compare
from cxr_ray.site.crossfit import CrossFit, cross_fit, fold_count, site_calibration_fitter, site_folds
from cxr_ray.site.fit import Prior, SiteFit, fit_site_calibration
from cxr_ray.site.head import HEAD_LAMBDAS, HeadFit, choose_head_lambda, fit_head, head_fitter, head_probs


@dataclass
class SiteResult:
    """What ``fit_site`` fitted on the whole sample, and its cross-fitted estimates."""

    fit: SiteFit
    head: HeadFit | None
    #: ``fit.method``, or ``"head"`` when the refitted head won on cross-fitted NLL.
    kept: str
    cross_fitted: dict[str, Any]
    #: Cross-fitted NLL of every candidate tried (the method, and the head with ``--head``).
    candidates: dict[str, float]
    folds: int
    parent_probs: np.ndarray
    oof_probs: np.ndarray
    oof_thresholds: np.ndarray
    labels: np.ndarray
    parent_threshold: float
    #: The sensitivity promise; when not ``met`` the derived card keeps the parent's calibration.
    guarantee: guarantee.SensitivityGuarantee


def prior_of(card: ModelCard) -> Prior:
    return Prior(card.temperature, card.logit_scale, card.logit_bias)


@dataclass(frozen=True)
class _Options:
    method: str
    target: float
    confidence: float
    seed: int
    head_lambdas: tuple[float, ...]


def _head_refit(
    head: tuple[np.ndarray, np.ndarray, np.ndarray],
    y: np.ndarray,
    fold: np.ndarray,
    groups: np.ndarray | None,
    prior: Prior,
    o: _Options,
    beat: float,
) -> tuple[float, CrossFit, HeadFit | None]:
    """The head refit's cross-fitted NLL, and when it is below ``beat`` its out-of-fold
    probabilities and the refit on all of the sample."""
    feats, w0, c0 = head
    fitter = head_fitter(
        w0, c0, prior, o.target, seed=o.seed, lambdas=o.head_lambdas, confidence=o.confidence
    )
    hoof = cross_fit(feats, y, fold, fitter)
    value = nll(hoof.probs, y)
    if not value < beat:
        return value, hoof, None
    lam = choose_head_lambda(
        feats, y, w0, c0, prior=prior, groups=groups, seed=o.seed, lambdas=o.head_lambdas
    )
    fitted = fit_head(
        feats, y, w0, c0, lam=lam, prior=prior, target_sensitivity=o.target, confidence=o.confidence
    )
    return value, hoof, fitted


def fit_site(
    logits: np.ndarray,
    y: np.ndarray,
    card: ModelCard,
    *,
    groups: np.ndarray | None = None,
    method: str = "bias",
    target_sensitivity: float = 0.95,
    folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    head: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    confidence: float = 0.95,
    level: float = 0.95,
    head_lambdas: tuple[float, ...] = HEAD_LAMBDAS,
) -> SiteResult:
    """Refit ``card``'s calibration on a sample's raw logits, guarantee the threshold, and
    estimate the gain.

    ``head``: ``(features, W0, c0)`` to also try refitting the final linear layer; it is kept
    only if its cross-fitted NLL beats ``method``'s. The kept calibration's threshold is
    ``guarantee.choose``'s; when the positives cannot support the target, ``guarantee.met`` is
    false (and ``derived_card`` keeps the parent's calibration).
    """
    o = _Options(method, target_sensitivity, confidence, seed, head_lambdas)
    y = np.asarray(y, np.int64)
    prior = prior_of(card)
    k = fold_count(y, folds)
    fold = site_folds(y, groups, k=k, seed=seed)
    parent_probs = card.probabilities(logits)
    oof = cross_fit(logits, y, fold, site_calibration_fitter(method, prior, o.target, confidence))
    candidates = {method: nll(oof.probs, y)}
    fit = fit_site_calibration(
        logits, y, method=method, prior=prior, target_sensitivity=o.target, confidence=confidence
    )
    fitted_probs = fit.probs(logits)
    head_fit, kept = None, method
    if head is not None:
        candidates["head"], hoof, hfit = _head_refit(head, y, fold, groups, prior, o, candidates[method])
        if hfit is not None:
            oof, head_fit, kept = hoof, hfit, "head"
            fitted_probs = head_probs(hfit, head[0], prior)
    promise = guarantee.choose(
        y,
        oof.probs,
        fitted_probs,
        parent_probs,
        card.pneumonia_threshold,
        target=o.target,
        confidence=confidence,
    )
    if promise.threshold is not None:
        fit = dataclasses.replace(fit, threshold=promise.threshold)
        if head_fit is not None:
            head_fit = dataclasses.replace(head_fit, threshold=promise.threshold)
    models: dict[str, tuple[np.ndarray, float | np.ndarray]] = {
        "parent": (parent_probs, card.pneumonia_threshold),
        "calibrated": (oof.probs, oof.thresholds),
    }
    crossed = compare(y, models, groups=groups, n_boot=n_boot, seed=seed, level=level)
    return SiteResult(
        fit=fit,
        head=head_fit,
        kept=kept,
        cross_fitted=crossed,
        candidates=candidates,
        folds=k,
        parent_probs=parent_probs,
        oof_probs=oof.probs,
        oof_thresholds=oof.thresholds,
        labels=y,
        parent_threshold=card.pneumonia_threshold,
        guarantee=promise,
    )
