"""The two-sample tests behind the drift check (``cxr_ray.scoring.drift``), on bounded summaries.

Each test returns a statistic, a p-value and the method used; scipy does the distributions:

- ``ks_values`` / ``ks_binned``: two-sample Kolmogorov-Smirnov, on exact values
  (``scipy.stats.ks_2samp``: exact for small samples, asymptotic for large ones) or on exact
  counts over fixed bins (the statistic is the largest CDF gap at the bin edges, which is
  never larger than the gap on the exact values, so the asymptotic p-value from
  ``scipy.stats.kstwobign`` is conservative);
- ``ad_values``: two-sample Anderson-Darling (``scipy.stats.anderson_ksamp``, midrank), the
  score test: more weight in the tails than KS, hence more power for a shift of the scores
  (measured in docs/MONITORING.md); scipy's p-value is interpolated and floored at 0.001;
- ``chi2_mix``: chi-squared test of a 2 x C contingency table (run vs reference counts per
  category, ``scipy.stats.chi2_contingency``), with the population stability index as effect;
- ``hotelling``: two-sample Hotelling T^2 of a mean shift in p dimensions from the run's
  streaming sums (``Moments``: every row counts, memory O(p^2)) and the reference's rows,
  pooled covariance, F distribution (``scipy.stats.f``);
- ``holm``: Holm's step-down adjusted p-values (family-wise error rate across the checks),
  optionally weighted (Holm 1979: a share of alpha per check, the weights summing to 1);
- ``energy_coefficient`` (effect only), ``wasserstein`` (effect only).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats
from scipy.spatial.distance import cdist


def holm(p_values: list[float] | np.ndarray, weights: list[float] | np.ndarray | None = None) -> np.ndarray:
    """Holm's step-down adjusted p-values. Unweighted: sorted ascending, the i-th (0-based) of
    K is multiplied by K - i, made monotone with a running maximum and capped at 1. Weighted
    (Holm 1979; ``weights`` > 0, renormalised over the tests that ran): sorted by p / w, the
    i-th is multiplied by (sum of the weights from the i-th on) / its own weight; equal weights
    are the unweighted rule. Rejecting where the adjusted value is <= alpha controls the
    family-wise error rate at alpha whatever the dependence between the tests. NaN (a test
    that could not run) stays NaN and does not count."""
    p = np.asarray(p_values, np.float64)
    w = np.ones(p.shape) if weights is None else np.asarray(weights, np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if len(ok) == 0:
        return out
    if not (w[ok] > 0).all():
        raise ValueError("Holm weights must be positive")
    wk = w[ok] / w[ok].sum()
    order = np.argsort(p[ok] / wk, kind="stable")
    remaining = np.cumsum(wk[order][::-1])[::-1]  # weight of the hypotheses not yet rejected
    scaled = p[ok][order] * remaining / wk[order]
    out[ok[order]] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out


def ks_values(run: np.ndarray, ref: np.ndarray) -> tuple[float, float, str]:
    """KS statistic, p-value and method on exact values (``scipy.stats.ks_2samp``, ``auto``)."""
    run, ref = run[np.isfinite(run)], ref[np.isfinite(ref)]
    if len(run) == 0 or len(ref) == 0:
        return math.nan, math.nan, "ks_2samp"
    res = stats.ks_2samp(run, ref, method="auto")
    return float(res.statistic), float(res.pvalue), "ks_2samp (exact values)"


def ad_values(run: np.ndarray, ref: np.ndarray) -> tuple[float, float, str]:
    """Two-sample Anderson-Darling statistic (standardized), p-value and method on exact
    values (``scipy.stats.anderson_ksamp``, midrank: ties allowed). scipy interpolates the
    p-value from tabulated critical values and clips it to 0.001..0.25 (a floored 0.001 means
    "0.001 or smaller"; still a valid, conservative p-value)."""
    run, ref = run[np.isfinite(run)], ref[np.isfinite(ref)]
    if len(run) < 2 or len(ref) < 2 or np.ptp(np.concatenate([run, ref])) == 0:
        return math.nan, math.nan, "anderson_ksamp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "p-value floored/capped": said in method
        res = stats.anderson_ksamp([run, ref])
    p = float(res.pvalue)
    note = " (p floored at 0.001)" if p <= 0.001 else ""
    return float(res.statistic), p, f"anderson_ksamp (exact values){note}"


def ks_binned(run_counts: np.ndarray, ref_counts: np.ndarray) -> tuple[float, float, str]:
    """KS statistic and conservative asymptotic p-value from exact counts over shared bins."""
    n, m = int(run_counts.sum()), int(ref_counts.sum())
    if n == 0 or m == 0:
        return math.nan, math.nan, "ks binned"
    d = float(np.max(np.abs(np.cumsum(run_counts) / n - np.cumsum(ref_counts) / m)))
    p = float(stats.kstwobign.sf(d * math.sqrt(n * m / (n + m))))
    return d, min(p, 1.0), "ks on exact counts in fine bins, asymptotic p (conservative)"


def psi(run: np.ndarray, ref: np.ndarray) -> float:
    """Population stability index of two count vectors (half-count floor on empty bins)."""
    n, m = run.sum(), ref.sum()
    if n == 0 or m == 0:
        return math.nan
    p = np.maximum(run / n, 0.5 / n)
    q = np.maximum(ref / m, 0.5 / m)
    return float(np.sum((p - q) * np.log(p / q)))


def chi2_mix(run: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Chi-squared statistic and p-value of run vs reference counts per category (categories
    seen in neither dropped; one category left: nothing to test, p = 1)."""
    table = np.vstack([run, ref]).astype(np.float64)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2 or (table.sum(1) == 0).any():
        return 0.0, 1.0
    res = stats.chi2_contingency(table, correction=False)
    return float(res.statistic), float(res.pvalue)


class Moments:
    """Streaming count, sum and sum of outer products of p-dimensional rows (rows with a NaN
    are skipped), centred on ``centre`` for numerical stability."""

    def __init__(self, centre: np.ndarray):
        self.centre = np.asarray(centre, np.float64)
        p = len(self.centre)
        self.n = 0
        self.s1 = np.zeros(p)
        self.s2 = np.zeros((p, p))

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        x = x[np.isfinite(x).all(axis=1)] - self.centre
        self.n += len(x)
        self.s1 += x.sum(0)
        self.s2 += x.T @ x

    def mean(self) -> np.ndarray:
        return self.centre + self.s1 / max(self.n, 1)

    def cov(self) -> np.ndarray:
        if self.n < 2:
            return np.full(self.s2.shape, np.nan)
        d = self.s1 / self.n
        return (self.s2 - self.n * np.outer(d, d)) / (self.n - 1)


def hotelling(run: Moments, ref: np.ndarray) -> tuple[float, float, int]:
    """Two-sample Hotelling T^2 of the run (its ``Moments``) against the reference rows
    ``[m, p]``: T^2, its p-value from the F distribution, and the dimensions used (the rank
    of the pooled covariance, after scaling each coordinate by its pooled spread)."""
    ref = np.asarray(ref, np.float64)
    ref = ref[np.isfinite(ref).all(axis=1)]
    n, m = run.n, len(ref)
    if n < 2 or m < 2:
        return math.nan, math.nan, 0
    pooled = ((n - 1) * run.cov() + (m - 1) * np.cov(ref, rowvar=False).reshape(run.s2.shape)) / (n + m - 2)
    scale = np.sqrt(np.maximum(np.diag(pooled), 0.0))
    keep = scale > 1e-12
    if not keep.any():
        return 0.0, 1.0, 0
    d = (run.mean() - ref.mean(0))[keep] / scale[keep]
    corr = pooled[np.ix_(keep, keep)] / np.outer(scale[keep], scale[keep])
    rank = int(np.linalg.matrix_rank(corr, tol=1e-8))
    df2 = n + m - 1 - rank
    if rank == 0 or df2 < 1:
        return math.nan, math.nan, rank
    t2 = float(n * m / (n + m) * d @ np.linalg.pinv(corr, rcond=1e-8, hermitian=True) @ d)
    f = t2 * df2 / (rank * (n + m - 2))
    return t2, float(stats.f.sf(f, rank, df2)), rank


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance of two 1-D samples (``scipy.stats.wasserstein_distance``)."""
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        return math.nan
    return float(stats.wasserstein_distance(a, b))


def _mean_dist(x: np.ndarray, y: np.ndarray, chunk: int = 1024) -> float:
    """Mean Euclidean distance over all pairs (``scipy.spatial.distance.cdist``, in chunks)."""
    total = sum(float(cdist(x[i : i + chunk], y).sum()) for i in range(0, len(x), chunk))
    return total / (len(x) * len(y))


def energy_coefficient(x: np.ndarray, y: np.ndarray) -> float:
    """Székely-Rizzo energy coefficient ``(2E|X-Y| - E|X-X'| - E|Y-Y'|) / (2E|X-Y|)``, in 0..1
    (0 only when the distributions are equal)."""
    if len(x) < 2 or len(y) < 2:
        return math.nan
    xy = _mean_dist(x, y)
    if xy <= 0:
        return 0.0
    xx = _mean_dist(x, x) * len(x) / (len(x) - 1)  # the diagonal's zeros left out
    yy = _mean_dist(y, y) * len(y) / (len(y) - 1)
    return float(max(0.0, (2 * xy - xx - yy) / (2 * xy)))


def floor_std(std: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """A reference spread never zero: a constant reference (every image 224 px wide) still
    turns a different value into a large, finite shift."""
    return np.maximum(std, np.maximum(1e-3 * np.abs(mean), 1e-6))
