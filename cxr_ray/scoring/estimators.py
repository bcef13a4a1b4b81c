"""The three label-free estimators behind ``cxr_ray.scoring.estimate`` (pure functions over
arrays): CBPE, ATC and importance weighting by a domain classifier. Each returns
``metric -> (estimate, standard error)`` for sensitivity and specificity at the flag
threshold, 3-class accuracy and the flag rate."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cxr_ray.labels import LABELS, NORMAL

_NORMAL = LABELS.index(NORMAL)


# -- the three estimators (pure functions over arrays) ---------------------------------------


def _ratio(a: float, b: float, va: float, vb: float) -> tuple[float, float]:
    """``a / (a + b)`` and its delta-method variance for independent ``a``, ``b``."""
    s = a + b
    if s <= 0:
        return math.nan, math.nan
    return a / s, (b * b * va + a * a * vb) / s**4


@dataclass
class _Sums:
    """CBPE's sufficient statistics: expected confusion counts and their variances."""

    n: int = 0
    flagged: int = 0
    tp: float = 0.0
    fn: float = 0.0
    tn: float = 0.0
    fp: float = 0.0
    v_pos_flag: float = 0.0  # sum of p(1-p) over flagged rows
    v_pos_unflag: float = 0.0
    top: float = 0.0
    v_top: float = 0.0

    def add(self, probs: np.ndarray, threshold: float) -> None:
        p = 1.0 - probs[:, _NORMAL]
        f = p >= threshold
        v = p * (1.0 - p)
        m = probs.max(axis=1)
        self.n += len(p)
        self.flagged += int(f.sum())
        self.tp += float(p[f].sum())
        self.fp += float((1.0 - p[f]).sum())
        self.fn += float(p[~f].sum())
        self.tn += float((1.0 - p[~f]).sum())
        self.v_pos_flag += float(v[f].sum())
        self.v_pos_unflag += float(v[~f].sum())
        self.top += float(m.sum())
        self.v_top += float((m * (1.0 - m)).sum())

    def figures(self) -> dict[str, tuple[float, float]]:
        """``metric -> (estimate, standard error)``."""
        sens, v_sens = _ratio(self.tp, self.fn, self.v_pos_flag, self.v_pos_unflag)
        spec, v_spec = _ratio(self.tn, self.fp, self.v_pos_unflag, self.v_pos_flag)
        n = max(self.n, 1)
        return {
            "sensitivity": (sens, math.sqrt(v_sens) if math.isfinite(v_sens) else math.nan),
            "specificity": (spec, math.sqrt(v_spec) if math.isfinite(v_spec) else math.nan),
            "accuracy": (self.top / n if self.n else math.nan, math.sqrt(self.v_top) / n),
            "flag_rate": _flag_rate(self.flagged, self.n),
        }


def _flag_rate(flagged: int, n: int) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    r = flagged / n
    return r, math.sqrt(max(r * (1 - r), 0.25 / n) / n)


def cbpe(probs: np.ndarray, threshold: float) -> dict[str, tuple[float, float]]:
    """CBPE of calibrated 3-class ``probs`` ``[n, 3]``: ``metric -> (estimate, se)``."""
    s = _Sums()
    s.add(np.asarray(probs, np.float64), threshold)
    return s.figures()


def _atc_threshold(conf: np.ndarray, correct: np.ndarray) -> float:
    """The confidence above which the share of ``conf`` equals the share ``correct``."""
    if len(conf) == 0:
        return math.nan
    return float(np.quantile(conf, 1.0 - float(np.mean(correct))))


@dataclass(frozen=True)
class AtcThresholds:
    """ATC's three thresholds, fitted on the labelled validation images."""

    top: float  # 3-class accuracy: on the top-class probability
    flagged: float  # PPV: on P(pneumonia) of flagged images
    unflagged: float  # NPV: on P(normal) of unflagged images

    @classmethod
    def fit(cls, probs: np.ndarray, y: np.ndarray, threshold: float) -> AtcThresholds:
        p = 1.0 - probs[:, _NORMAL]
        f = p >= threshold
        pos = y != _NORMAL
        return cls(
            top=_atc_threshold(probs.max(1), probs.argmax(1) == y),
            flagged=_atc_threshold(p[f], pos[f]),
            unflagged=_atc_threshold(1.0 - p[~f], ~pos[~f]),
        )


def _atc_counts(probs: np.ndarray, threshold: float, t: AtcThresholds) -> np.ndarray:
    """``[n, flagged, top above, flagged above, unflagged above]`` for ``probs``."""
    p = 1.0 - probs[:, _NORMAL]
    f = p >= threshold
    return np.array(
        [
            len(p),
            f.sum(),
            (probs.max(1) > t.top).sum(),
            (p[f] > t.flagged).sum(),
            ((1.0 - p[~f]) > t.unflagged).sum(),
        ],
        np.float64,
    )


def _atc_figures(c: np.ndarray) -> dict[str, tuple[float, float]]:
    n, nf, top, ppv_n, npv_n = (float(v) for v in c)
    nu = n - nf
    tp, fp = ppv_n, nf - ppv_n
    tn, fn = npv_n, nu - npv_n
    # Binomial variances of the thresholded counts (the estimator's sampling noise).
    v_tp = tp * (nf - tp) / nf if nf else 0.0
    v_tn = tn * (nu - tn) / nu if nu else 0.0
    sens, v_sens = _ratio(tp, fn, v_tp, v_tn)
    spec, v_spec = _ratio(tn, fp, v_tn, v_tp)
    acc = top / n if n else math.nan
    return {
        "sensitivity": (sens, math.sqrt(v_sens) if math.isfinite(v_sens) else math.nan),
        "specificity": (spec, math.sqrt(v_spec) if math.isfinite(v_spec) else math.nan),
        "accuracy": (acc, math.sqrt(acc * (1 - acc) / n) if n else math.nan),
        "flag_rate": _flag_rate(int(nf), int(n)),
    }


def with_label_noise(
    figures: dict[str, tuple[float, float]], cbpe_figures: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """ATC's figures with the run's own label noise added to their standard errors.

    ATC's count variance is the estimator's; the measured value moves on top of that with the
    images' unknown labels (given the probabilities, a Poisson-binomial variance: CBPE's
    standard error). The difference between estimate and truth has both: ATC's specificity
    interval on random 300-image subsets of the validation images held the measured value in
    75% of 20 trials with the estimator's variance alone (docs/MONITORING.md)."""
    out = dict(figures)
    for m in ("sensitivity", "specificity", "accuracy"):
        est, se = figures[m]
        noise = cbpe_figures[m][1]
        if math.isfinite(se) and math.isfinite(noise):
            out[m] = (est, math.hypot(se, noise))
    return out


def atc(probs: np.ndarray, threshold: float, thresholds: AtcThresholds) -> dict[str, tuple[float, float]]:
    """ATC of the run's calibrated ``probs`` with ``thresholds`` fitted on validation."""
    return _atc_figures(_atc_counts(np.asarray(probs, np.float64), threshold, thresholds))


def _domain_scores(ref_z: np.ndarray, run_z: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitted P(run | z) for every reference row and every run row (5 folds)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    x = np.concatenate([ref_z, run_z])
    d = np.concatenate([np.zeros(len(ref_z)), np.ones(len(run_z))])
    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000)
    folds = min(5, len(ref_z), len(run_z))
    if folds < 2:
        return np.full(len(ref_z), 0.5), np.full(len(run_z), 0.5)
    from sklearn.model_selection import StratifiedKFold

    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    q = cross_val_predict(model, x, d, cv=cv, method="predict_proba")[:, 1]
    return q[: len(ref_z)], q[len(ref_z) :]


def domain_auc(ref_z: np.ndarray, run_z: np.ndarray, seed: int = 0) -> float:
    """How well a (cross-validated, linear) domain classifier tells the run's PCA coordinates
    from the reference's: 0.5 = indistinguishable, 1.0 = disjoint."""
    return domain_shift(ref_z, run_z, seed)[0]


#: A run row is outside the reference when its cross-fitted P(run | z) is above this quantile
#: of the reference rows' own: by construction about 1 - OUTSIDE_QUANTILE of a same-distribution
#: run is, so only the excess over that counts.
OUTSIDE_QUANTILE = 0.99


def domain_shift(ref_z: np.ndarray, run_z: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """``(auc, outside)`` of one cross-fitted domain classifier: its AUC (as ``domain_auc``) and
    the share of the run's rows that lie beyond the reference's support (their P(run | z)
    above the reference's ``OUTSIDE_QUANTILE`` quantile), less the share a same-distribution
    run has there. A class-prior change moves run rows towards the reference's own rows of
    that class, not beyond them, so it barely raises ``outside``; re-rendered images do."""
    if len(ref_z) < 2 or len(run_z) < 2:
        return math.nan, 0.0
    from sklearn.metrics import roc_auc_score

    q_ref, q_run = _domain_scores(ref_z, run_z, seed)
    auc = float(roc_auc_score(np.r_[np.zeros(len(q_ref)), np.ones(len(q_run))], np.r_[q_ref, q_run]))
    beyond = float(np.mean(q_run > np.quantile(q_ref, OUTSIDE_QUANTILE)))
    outside = max(0.0, beyond - (1.0 - OUTSIDE_QUANTILE)) / OUTSIDE_QUANTILE
    return max(auc, 0.5), min(outside, 1.0)


def importance_weighted(
    ref_probs: np.ndarray,
    ref_y: np.ndarray,
    ref_z: np.ndarray,
    run_z: np.ndarray,
    threshold: float,
    *,
    flag_rate: tuple[float, float] | None = None,
    max_weight: float = 20.0,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """The validation images' metrics weighted by ``P(run|z) / P(reference|z)``; standard
    errors from the weights' effective sample size."""
    q_ref, _ = _domain_scores(ref_z, run_z, seed)
    q_ref = np.clip(q_ref, 1e-6, 1 - 1e-6)
    w = np.minimum(q_ref / (1 - q_ref), max_weight)
    w = w / w.mean()
    p = 1.0 - ref_probs[:, _NORMAL]
    f = p >= threshold
    pos = ref_y != _NORMAL

    def weighted(hit: np.ndarray, among: np.ndarray) -> tuple[float, float]:
        ww = w[among]
        if ww.sum() <= 0:
            return math.nan, math.nan
        est = float((ww * hit[among]).sum() / ww.sum())
        ess = ww.sum() ** 2 / (ww**2).sum()
        return est, math.sqrt(max(est * (1 - est), 0.25 / ess) / ess)

    every = np.ones(len(w), bool)
    return {
        "sensitivity": weighted(f, pos),
        "specificity": weighted(~f, ~pos),
        "accuracy": weighted(ref_probs.argmax(1) == ref_y, every),
        "flag_rate": flag_rate if flag_rate is not None else weighted(f, every),
    }
