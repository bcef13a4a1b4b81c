"""Probability calibration and operating points, fitted on the validation split.

- Temperature scaling (Guo et al., 2017): one scalar T dividing the logits, fitted by
  minimising validation NLL. It changes confidence, never the argmax.
- The pneumonia flag threshold: the largest threshold on P(bacterial) + P(viral) that still
  reaches the target sensitivity on validation (default 0.95), i.e. the most specific
  operating point that meets the screening requirement.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr_ray.labels import LABELS, NORMAL


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` in float64, row-wise.

    float64 throughout: thresholds picked on these probabilities must reproduce exactly.
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


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

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y_true)), y_true].mean())

    res = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(res.x))


def threshold_for_sensitivity(probs: np.ndarray, y_true: np.ndarray, target: float = 0.95) -> float:
    """The most specific threshold on P(pneumonia) whose validation sensitivity is >= ``target``.

    Flagging is ``p >= t``. Keeping ceil(target * n) positives needs ``t <= s``, the k-th
    largest positive score; every ``t`` in (next lower score, s] flags exactly the same
    validation images. The midpoint of that interval is returned rather than ``s`` itself:
    scoring engines compute in float32, and an image sitting exactly on the threshold would
    otherwise flip with the last bit of rounding (seen: 0.9494 instead of 0.95 after scoring).
    """
    normal = LABELS.index(NORMAL)
    p = 1.0 - np.asarray(probs, dtype=np.float64)[:, normal]  # as metrics.binary_metrics does
    pos = np.sort(p[np.asarray(y_true) != normal])
    if len(pos) == 0:
        return 0.5
    k = math.ceil(target * len(pos))
    s = float(pos[len(pos) - k])
    below = p[p < s]
    return (s + float(below.max())) / 2 if len(below) else s / 2


# ----------------------------------------------------------------------------- site calibration

#: Site-calibration methods (``cxr-ray calibrate --method``), in the card's parametrisation
#: ``softmax(logit_scale * logits / temperature + logit_bias)``:
#: ``temperature`` refits T only; ``bias`` refits T and the per-class offsets (the normal
#: class's offset stays the parent's: softmax is invariant to a common shift); ``vector``
#: refits the per-class scale and offsets with T kept (a common factor of the scale and 1/T
#: would be unidentifiable).
SITE_METHODS = ("bias", "vector", "temperature")

#: Standard deviations of the Gaussian prior centred on the parent's values (MAP fit): weak
#: enough that 128 images of a real shift move the values, strong enough that 50 images of a
#: few odd cases cannot drive an offset to +-5.
PRIOR_SD = {"log_temperature": 0.5, "scale": 0.5, "bias": 1.0}


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


@dataclass(frozen=True)
class Prior:
    """The parent's calibration: the centre of the prior and the starting point."""

    temperature: float = 1.0
    logit_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    logit_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def site_threshold(probs: np.ndarray, y_true: np.ndarray, target: float = 0.95) -> float:
    """The flag threshold a site sample supports for ``target`` sensitivity: the most specific
    one whose sensitivity on the sample is at least ``target`` plus one binomial standard
    error (``sqrt(target (1 - target) / positives)``, 0.022 for 95 positives at 0.95).

    A threshold fitted to exactly the target on 100 positives falls below it on new images of
    the site about half the time; the margin makes that about one time in six (measured on
    the constructed site in docs/TRAINING.md) for a few points of specificity.
    """
    normal = LABELS.index(NORMAL)
    positives = int((np.asarray(y_true) != normal).sum())
    if positives == 0:
        return threshold_for_sensitivity(probs, y_true, target)
    margin = math.sqrt(target * (1.0 - target) / positives)
    return threshold_for_sensitivity(probs, y_true, min(target + margin, 1.0))


def fit_site_calibration(
    logits: np.ndarray,
    y_true: np.ndarray,
    *,
    method: str = "bias",
    prior: Prior | None = None,
    target_sensitivity: float = 0.95,
    prior_sd: dict[str, float] | None = None,
) -> SiteFit:
    """MAP fit of the card's calibration on a site sample's raw logits, then the threshold.

    Minimises ``sum NLL + 0.5 * sum(((theta - theta_parent) / sd) ** 2)`` over the method's
    free parameters (``SITE_METHODS``), with L-BFGS and analytic gradients; the flag threshold
    is then ``site_threshold`` on the refitted probabilities. float64 throughout.
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
    normal = LABELS.index(NORMAL)
    free_b = [i for i in range(k) if i != normal]
    a0 = np.asarray(prior.logit_scale, np.float64)
    b0 = np.asarray(prior.logit_bias, np.float64)
    lt0 = math.log(prior.temperature)

    def unpack(theta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        lt, a, b = lt0, a0.copy(), b0.copy()
        if method == "temperature":
            lt = float(theta[0])
        elif method == "bias":
            lt = float(theta[0])
            b[free_b] = theta[1:]
        else:
            a = np.asarray(theta[:k], np.float64)
            b[free_b] = theta[k:]
        return lt, a, b

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        lt, a, b = unpack(theta)
        inv_t = math.exp(-lt)
        u = z * inv_t  # logits / T
        s = a * u + b
        logp = _log_softmax(s)
        loss = -float(logp[np.arange(n), y].sum())
        r = np.exp(logp) - onehot  # d loss / d s, [n, k]
        g_lt = -float((r * a * u).sum())
        g_a = (r * u).sum(axis=0)
        g_b = r.sum(axis=0)
        if method == "temperature":
            grad = np.array([g_lt])
        elif method == "bias":
            grad = np.concatenate([[g_lt], g_b[free_b]])
        else:
            grad = np.concatenate([g_a, g_b[free_b]])
        # The prior (Gaussian, centred on the parent).
        centre, sds = _prior_vector(method, lt0, a0, b0[free_b], sd, k)
        d = theta - centre
        loss += 0.5 * float(np.sum((d / sds) ** 2))
        grad = grad + d / sds**2
        return loss, grad

    centre, _ = _prior_vector(method, lt0, a0, b0[free_b], sd, k)
    if n:
        res = minimize(objective, centre.copy(), jac=True, method="L-BFGS-B")
        theta = res.x
    else:
        theta = centre
    lt, a, b = unpack(theta)
    t = float(min(max(math.exp(lt), 0.05), 20.0))
    fit = SiteFit(method, t, _triple(a), _triple(b), 0.5, target_sensitivity)
    threshold = site_threshold(fit.probs(z), y, target_sensitivity) if n else 0.5
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


@dataclass(frozen=True)
class CrossFit:
    """Out-of-fold calibrated probabilities of every sample image, and each one's threshold
    (fitted, like the probabilities, without the image's own fold)."""

    probs: np.ndarray
    thresholds: np.ndarray
    folds: np.ndarray


def cross_fit(
    logits: np.ndarray,
    y_true: np.ndarray,
    folds: np.ndarray,
    fit: Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], tuple[np.ndarray, float]]],
) -> CrossFit:
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
    method: str, prior: Prior, target_sensitivity: float
) -> Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], tuple[np.ndarray, float]]]:
    """``fit`` for ``cross_fit`` with ``fit_site_calibration``."""

    def fit(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, float]]:
        f = fit_site_calibration(x, y, method=method, prior=prior, target_sensitivity=target_sensitivity)
        return lambda held: (f.probs(held), f.threshold)

    return fit


# ----------------------------------------------------------------------------- head refit


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
        s = (feats @ w.T + c) * scale + shift
        logp = _log_softmax(s)
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
    threshold = site_threshold(probs, y, target_sensitivity) if n else 0.5
    return HeadFit(w, c, float(lam), float(threshold))


def head_probs(fit: HeadFit, features: np.ndarray, prior: Prior) -> np.ndarray:
    logits = np.asarray(features, np.float64) @ fit.weight.T + fit.bias
    return calibrated_probs(logits, prior.temperature, prior.logit_scale, prior.logit_bias)


#: Candidate strengths of the pull toward the shipped head (chosen by cross-fitted NLL).
HEAD_LAMBDAS = (1.0, 10.0, 100.0, 1000.0)


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
    k = max(2, min(k, int(np.bincount(y, minlength=len(LABELS)).min(initial=k))))
    folds = site_folds(y, groups, k=k, seed=seed)
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
    w0: np.ndarray, c0: np.ndarray, prior: Prior, target_sensitivity: float, *, seed: int = 0
) -> Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], tuple[np.ndarray, float]]]:
    """``fit`` for ``cross_fit`` with ``fit_head``; ``lam`` is chosen inside each training set
    (nested, stratified folds), so the held-out fold plays no part in choosing it."""

    def fit(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, float]]:
        lam = choose_head_lambda(x, y, w0, c0, prior=prior, seed=seed)
        h = fit_head(x, y, w0, c0, lam=lam, prior=prior, target_sensitivity=target_sensitivity)
        return lambda held: (head_probs(h, held, prior), h.threshold)

    return fit


# ----------------------------------------------------------------------------- estimates


#: What ``compare`` reports for each model, in order.
SITE_METRICS = ("accuracy", "macro_f1", "nll", "ece", "sensitivity", "specificity")


def _point_metrics(
    y: np.ndarray, probs: np.ndarray, threshold: np.ndarray, target: float | None
) -> dict[str, float]:
    from cxr_ray.metrics import expected_calibration_error

    k = len(LABELS)
    normal = LABELS.index(NORMAL)
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
        return {m: _point_metrics(y[idx], probs[m][idx], thr[m][idx], target_sensitivity) for m in names}

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


def format_comparison(result: dict[str, Any], names: tuple[str, str] = ("parent", "calibrated")) -> str:
    """Plain-text table of ``compare``'s result for two models (value [lo, hi])."""
    a, b = names
    diff = f"{b} - {a}"
    lines = [f"{'':24}{a:>24}{b:>24}{'difference':>26}"]
    for metric, entry in result.items():
        cells = [_cell(entry[a]), _cell(entry[b]), _cell(entry[diff], signed=True)]
        lines.append(f"{metric:24}{cells[0]:>24}{cells[1]:>24}{cells[2]:>26}")
    return "\n".join(lines)


def _cell(v: dict[str, float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v['value'])} [{f.format(v['lo'])}, {f.format(v['hi'])}]"
