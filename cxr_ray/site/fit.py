"""The card's calibration refitted on a site sample's raw logits (MAP, a prior on the parent).

The card computes ``softmax(logit_scale * logits / temperature + logit_bias)``; the methods
(``cxr_ray.vocabulary.SITE_METHODS``) refit part of it, pulled toward the parent's values by
a Gaussian prior, and the flag threshold is then chosen by the sensitivity guarantee's rule
(``cxr_ray.site.guarantee``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import log_softmax

from cxr_ray.calibration import calibrated_probs
from cxr_ray.labels import LABELS, NORMAL
from cxr_ray.site.guarantee import in_sample_threshold
from cxr_ray.vocabulary import SITE_METHODS

#: Standard deviations of the Gaussian prior centred on the parent's values (MAP fit): weak
#: enough that 128 images of a real shift move the values, strong enough that 50 images of a
#: few odd cases cannot drive an offset to +-5.
PRIOR_SD = {"log_temperature": 0.5, "scale": 0.5, "bias": 1.0}


@dataclass(frozen=True)
class Prior:
    """The parent's calibration: the centre of the prior and the starting point."""

    temperature: float = 1.0
    logit_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    logit_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class SiteFit:
    """A fitted site calibration: the card fields it sets."""

    method: str
    temperature: float
    logit_scale: tuple[float, float, float]
    logit_bias: tuple[float, float, float]
    threshold: float
    target_sensitivity: float

    def probs(self, logits: np.ndarray) -> np.ndarray:
        return calibrated_probs(logits, self.temperature, self.logit_scale, self.logit_bias)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "temperature": self.temperature,
            "logit_scale": list(self.logit_scale),
            "logit_bias": list(self.logit_bias),
            "threshold": self.threshold,
            "target_sensitivity": self.target_sensitivity,
        }


def fit_site_calibration(
    logits: np.ndarray,
    y_true: np.ndarray,
    *,
    method: str = "bias",
    prior: Prior | None = None,
    target_sensitivity: float = 0.95,
    prior_sd: dict[str, float] | None = None,
    confidence: float = 0.95,
) -> SiteFit:
    """MAP fit of the card's calibration on a site sample's raw logits, then the threshold.

    Minimises ``sum NLL + 0.5 * sum(((theta - theta_parent) / sd) ** 2)`` over the method's
    free parameters (``SITE_METHODS``), with L-BFGS and analytic gradients; the flag threshold
    is then ``guarantee.in_sample_threshold`` on the refitted probabilities. float64 throughout.
    """
    from scipy.optimize import minimize

    if method not in SITE_METHODS:
        raise ValueError(f"unknown site-calibration method {method!r}; choose one of {SITE_METHODS}")
    prior = prior or Prior()
    sd = {**PRIOR_SD, **(prior_sd or {})}
    z = np.asarray(logits, np.float64)
    y = np.asarray(y_true, np.int64)
    n, k = z.shape
    onehot = np.eye(k)[y]
    free_b = [i for i in range(k) if i != LABELS.index(NORMAL)]
    a0 = np.asarray(prior.logit_scale, np.float64)
    b0 = np.asarray(prior.logit_bias, np.float64)
    lt0 = math.log(prior.temperature)
    centre, sds = _prior_vector(method, lt0, a0, b0[free_b], sd, k)

    def unpack(theta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        lt, a, b = lt0, a0.copy(), b0.copy()
        if method in ("temperature", "bias"):
            lt = float(theta[0])
            b[free_b] = theta[1:] if method == "bias" else b0[free_b]
        else:
            a = np.asarray(theta[:k], np.float64)
            b[free_b] = theta[k:]
        return lt, a, b

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        lt, a, b = unpack(theta)
        u = z * math.exp(-lt)  # logits / T
        logp = log_softmax(a * u + b, axis=1)
        r = np.exp(logp) - onehot  # d loss / d (a * u + b), [n, k]
        g_lt, g_a, g_b = -float((r * a * u).sum()), (r * u).sum(axis=0), r.sum(axis=0)
        if method == "temperature":
            grad = np.array([g_lt])
        elif method == "bias":
            grad = np.concatenate([[g_lt], g_b[free_b]])
        else:
            grad = np.concatenate([g_a, g_b[free_b]])
        d = theta - centre  # the prior (Gaussian, centred on the parent)
        loss = -float(logp[np.arange(n), y].sum()) + 0.5 * float(np.sum((d / sds) ** 2))
        return loss, grad + d / sds**2

    theta = minimize(objective, centre.copy(), jac=True, method="L-BFGS-B").x if n else centre
    lt, a, b = unpack(theta)
    t = float(min(max(math.exp(lt), 0.05), 20.0))
    fit = SiteFit(method, t, _triple(a), _triple(b), 0.5, target_sensitivity)
    threshold = in_sample_threshold(fit.probs(z), y, target_sensitivity, confidence) if n else 0.5
    return SiteFit(method, t, _triple(a), _triple(b), float(threshold), target_sensitivity)


def _prior_vector(
    method: str, lt0: float, a0: np.ndarray, b0_free: np.ndarray, sd: dict[str, float], k: int
) -> tuple[np.ndarray, np.ndarray]:
    nb = len(b0_free)
    if method == "temperature":
        return np.array([lt0]), np.array([sd["log_temperature"]])
    if method == "bias":
        return np.concatenate([[lt0], b0_free]), np.array([sd["log_temperature"]] + [sd["bias"]] * nb)
    return np.concatenate([a0, b0_free]), np.array([sd["scale"]] * k + [sd["bias"]] * nb)


def _triple(v: np.ndarray) -> tuple[float, float, float]:
    a, b, c = (float(x) for x in v)
    return (a, b, c)
