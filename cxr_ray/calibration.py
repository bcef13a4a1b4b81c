"""Probability calibration and operating points, fitted on the validation split (a leaf).

- Temperature scaling (Guo et al., 2017): one scalar T dividing the logits, fitted by
  minimising validation NLL. It changes confidence, never the argmax.
- The pneumonia flag threshold: the largest threshold on P(bacterial) + P(viral) that still
  reaches the target sensitivity on validation (default 0.95), i.e. the most specific
  operating point that meets the screening requirement.

Site calibration (refitting these on a new site's labelled sample) is ``cxr_ray.site``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import log_softmax
from scipy.special import softmax as _softmax

from cxr_ray.labels import LABELS, NORMAL


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` in float64, row-wise.

    float64 throughout: thresholds picked on these probabilities must reproduce exactly.
    """
    return _softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def calibrated_probs(
    logits: np.ndarray,
    temperature: float = 1.0,
    scale: tuple[float, ...] | np.ndarray | None = None,
    bias: tuple[float, ...] | np.ndarray | None = None,
) -> np.ndarray:
    """The model card's calibration applied to raw logits: ``softmax(scale * logits / T + bias)``.

    ``temperature`` is the validation-fitted one (every card has it); ``scale`` and ``bias``
    are per-class vectors fitted at a site (``cxr-ray calibrate``; vector scaling when
    ``scale`` is fitted, bias scaling when only ``bias`` is). Defaults leave plain
    temperature scaling. float64, row-wise: every engine's logits go through this one
    function, so a threshold means the same whatever computed the logits.
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    if scale is not None:
        z = z * np.asarray(scale, dtype=np.float64)
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)
    return softmax(z)


def nll(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (what temperature scaling minimises)."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(y_true)), np.asarray(y_true)]
    return float(-np.log(np.clip(p, 1e-12, 1.0)).mean()) if len(y_true) else math.nan


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature minimising NLL of ``softmax(logits / T)`` (bounded to 0.05..20)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, np.float64)
    y_true = np.asarray(y_true, np.int64)
    if len(y_true) == 0:
        return 1.0

    def nll_at(log_t: float) -> float:
        logp = log_softmax(logits / math.exp(log_t), axis=1)
        return float(-logp[np.arange(len(y_true)), y_true].mean())

    res = minimize_scalar(nll_at, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(res.x))


def threshold_keeping(probs: np.ndarray, y_true: np.ndarray, k: int) -> float:
    """The most specific threshold on P(pneumonia) that flags at least ``k`` of the positives.

    Flagging is ``p >= t``. Keeping ``k`` positives needs ``t <= s``, the k-th largest
    positive score; every ``t`` in (next lower score, s] flags exactly the same images. The
    midpoint of that interval is returned rather than ``s`` itself: scoring engines compute in
    float32, and an image sitting exactly on the threshold would otherwise flip with the last
    bit of rounding (seen: 0.9494 instead of 0.95 after scoring). ``k`` is clipped to
    1..positives; no positives gives 0.5.
    """
    normal = LABELS.index(NORMAL)
    p = 1.0 - np.asarray(probs, dtype=np.float64)[:, normal]  # as metrics.binary_metrics does
    pos = np.sort(p[np.asarray(y_true) != normal])
    if len(pos) == 0:
        return 0.5
    k = min(max(int(k), 1), len(pos))
    s = float(pos[len(pos) - k])
    below = p[p < s]
    return (s + float(below.max())) / 2 if len(below) else s / 2


def threshold_for_sensitivity(probs: np.ndarray, y_true: np.ndarray, target: float = 0.95) -> float:
    """The most specific threshold on P(pneumonia) whose sensitivity here is >= ``target``:
    ``threshold_keeping`` of ``ceil(target * positives)`` positives."""
    normal = LABELS.index(NORMAL)
    positives = int((np.asarray(y_true) != normal).sum())
    return threshold_keeping(probs, y_true, math.ceil(target * positives))
