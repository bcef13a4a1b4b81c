"""Point metrics of a site sample and their (patient-)bootstrap intervals, paired across models."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cxr_ray.calibration import nll, threshold_for_sensitivity
from cxr_ray.labels import LABELS, NORMAL
from cxr_ray.metrics import expected_calibration_error

#: What ``compare`` reports for each model, in order.
SITE_METRICS = ("accuracy", "macro_f1", "nll", "ece", "sensitivity", "specificity")


def point_metrics(
    y: np.ndarray, probs: np.ndarray, threshold: np.ndarray | float, target: float | None = None
) -> dict[str, float]:
    """``SITE_METRICS`` of one model on labelled images: 3-class accuracy and macro-F1 of the
    argmax, NLL, ECE, and sensitivity / specificity of ``P(pneumonia) >= threshold`` (a scalar
    or one per image). ``target`` adds ``specificity_at_target``."""
    k = len(LABELS)
    normal = LABELS.index(NORMAL)
    y = np.asarray(y, np.int64)
    pred = probs.argmax(axis=1)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)
    tp = np.diag(cm)
    denom = cm.sum(axis=0) + cm.sum(axis=1)
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    p_pneu = 1.0 - probs[:, normal]
    truth = y != normal
    flag = p_pneu >= threshold
    pos, neg = int(truth.sum()), int((~truth).sum())
    out = {
        "accuracy": float(np.mean(pred == y)),
        "macro_f1": float(f1.mean()),
        "nll": nll(probs, y),
        "ece": expected_calibration_error(probs, y),
        "sensitivity": float((flag & truth).sum() / pos) if pos else math.nan,
        "specificity": float((~flag & ~truth).sum() / neg) if neg else math.nan,
    }
    if target is not None:
        # The operating point chosen on these very images: a ranking measure (how specific
        # the model can be at the target sensitivity), not what a fixed threshold achieves.
        t = threshold_for_sensitivity(probs, y, target)
        out["specificity_at_target"] = float((p_pneu[~truth] < t).sum() / neg) if neg else math.nan
    return out


def compare(
    y_true: np.ndarray,
    models: dict[str, tuple[np.ndarray, float | np.ndarray]],
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    target_sensitivity: float | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
    """Point estimates and percentile bootstrap intervals of ``SITE_METRICS`` for each model
    (``name -> (probs [N, 3], threshold: scalar or one per image)``), and of the paired
    difference of every model with the first.

    Resamples images, or whole patients when ``groups`` is given (their images together), the
    same resamples for every model. ``target_sensitivity`` adds ``specificity_at_target``.
    Returns ``{metric: {model: {"value", "lo", "hi"}, "<model> - <first>": {...}}}``.
    """
    y = np.asarray(y_true, np.int64)
    names = list(models)
    probs = {m: np.asarray(p, np.float64) for m, (p, _) in models.items()}
    thr = {m: np.broadcast_to(np.asarray(t, np.float64), y.shape) for m, (_, t) in models.items()}

    def at(idx: np.ndarray) -> dict[str, dict[str, float]]:
        return {m: point_metrics(y[idx], probs[m][idx], thr[m][idx], target_sensitivity) for m in names}

    point = at(np.arange(len(y)))
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(len(y))]
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    draws: list[dict[str, dict[str, float]]] = []
    for _ in range(n_boot if len(y) else 0):
        pick = rng.integers(0, len(members), len(members))
        draws.append(at(np.concatenate([members[i] for i in pick])))
    lo_q, hi_q = 50 * (1 - level), 50 * (1 + level)
    first = names[0]
    out: dict[str, Any] = {}
    for metric in point[first]:
        entry: dict[str, Any] = {}
        series = {m: np.array([d[m][metric] for d in draws]) for m in names}
        for m in names:
            entry[m] = _interval(point[m][metric], series[m], lo_q, hi_q)
        for m in names[1:]:
            entry[f"{m} - {first}"] = _interval(
                point[m][metric] - point[first][metric], series[m] - series[first], lo_q, hi_q
            )
        out[metric] = entry
    return out


def _interval(value: float, draws: np.ndarray, lo_q: float, hi_q: float) -> dict[str, float]:
    finite = draws[np.isfinite(draws)]
    if not len(finite):
        return {"value": float(value), "lo": math.nan, "hi": math.nan}
    lo, hi = np.percentile(finite, [lo_q, hi_q])
    return {"value": float(value), "lo": float(lo), "hi": float(hi)}
