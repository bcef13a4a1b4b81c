"""The two-sample tests behind the drift check (``cxr_ray.scoring.drift``), on bounded summaries.

Each test returns a statistic, a p-value and the method used; scipy does the distributions:

- ``ks_values`` / ``ks_binned``: two-sample Kolmogorov-Smirnov, on exact values
  (``scipy.stats.ks_2samp``: exact for small samples, asymptotic for large ones) or on exact
  counts over fixed bins (the statistic is the largest CDF gap at the bin edges, which is
  never larger than the gap on the exact values, so the asymptotic p-value from
  ``scipy.stats.kstwobign`` is conservative);
- ``chi2_mix``: chi-squared test of a 2 x C contingency table (run vs reference counts per
  category, ``scipy.stats.chi2_contingency``), with the population stability index as effect;
- ``cluster_wald``: the tested checks' test: a two-sample Wald test of equal per-image means
  with cluster-robust covariances (images of one patient are not independent), F reference
  with Nel-van der Merwe degrees of freedom; the score test applies it to the CDF at fixed
  quantiles of the reference, the class-mix test to one-hot classes;
- ``holm``: Holm's step-down adjusted p-values (family-wise error rate across the checks),
  optionally weighted (Holm 1979: a share of alpha per check, the weights summing to 1);
- ``energy_coefficient`` (effect only), ``wasserstein`` (effect only).
"""

from __future__ import annotations

import math

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


def _cluster_moments(
    sums: np.ndarray, counts: np.ndarray, centre: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean per image, cluster-robust (sandwich) covariance of that mean and the clusters'
    residual sums (scaled so that ``resid' resid`` is that covariance), from per-cluster sums
    ``[G, d]`` and image counts ``[G]`` (empty clusters left out)."""
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    g, n = len(counts), float(counts.sum())
    if g < 2:
        return (
            np.full(sums.shape[1], np.nan),
            np.full((sums.shape[1],) * 2, np.nan),
            np.zeros((g, sums.shape[1])),
        )
    mean = sums.sum(0) / n
    resid = (sums - counts[:, None] * (mean if centre is None else centre)) * math.sqrt(g / (g - 1)) / n
    return mean, resid.T @ resid, resid


def _effective_clusters(resid: np.ndarray) -> float:
    """Degrees of freedom of a sandwich covariance ``resid' resid`` (rows whitened): the
    effective number of clusters ``(sum q)^2 / sum q^2`` of the clusters' shares
    ``q_c = |r_c|^2``, corrected by ``(r + 2) / r`` (for equal clusters ``q_c`` is chi-squared
    with r dims, so the ratio is ``G r / (r + 2)``), at most G - 1. One dominant cluster (a
    patient with 30 images) makes the covariance as uncertain as a few clusters would."""
    q = np.einsum("ij,ij->i", resid, resid)
    r = resid.shape[1]
    if len(q) < 2 or q.sum() <= 0:
        return 1.0
    return float(min(len(q) - 1.0, q.sum() ** 2 / np.sum(q**2) * (r + 2) / r))


def cluster_wald(
    run_sums: np.ndarray,
    run_counts: np.ndarray,
    ref_sums: np.ndarray,
    ref_counts: np.ndarray,
    *,
    pooled: bool = False,
) -> tuple[float, float, int]:
    """Two-sample test of equal means per image when images come in clusters (patients).

    Each side is given as per-cluster sums of the images' vectors ``[G, d]`` and image counts
    ``[G]``; the mean is per image, its covariance the cluster-robust sandwich (Liang-Zeger:
    the clusters, not the images, are the independent observations; with one image per
    cluster it is the usual covariance of a mean). The statistic is
    ``T2 = d' (V_run + V_ref)^+ d`` on the coordinates scaled by their spread (the rank is that
    of the scaled covariance), referred to the F distribution with the Nel-van der Merwe
    (1986) degrees of freedom for unequal covariances, counting clusters (Krishnamoorthy & Yu
    2004 recommend it for the multivariate Behrens-Fisher problem), where each side's
    covariance has the degrees of freedom of its effective number of clusters.

    ``pooled``: the residuals are taken around the pooled mean of both sides (the mean under
    the null), as a score test does: for shares (indicators), a run with few images in a
    category otherwise gets a variance near 0 there and the test alerts on noise. Returns
    (T2, p, rank)."""
    rs, rc = np.asarray(run_sums, np.float64), np.asarray(run_counts, np.float64)
    fs, fc = np.asarray(ref_sums, np.float64), np.asarray(ref_counts, np.float64)
    centre = (rs.sum(0) + fs.sum(0)) / max(rc.sum() + fc.sum(), 1.0) if pooled else None
    m1, v1, r1 = _cluster_moments(rs, rc, centre)
    m2, v2, r2 = _cluster_moments(fs, fc, centre)
    if len(r1) < 2 or len(r2) < 2:
        return math.nan, math.nan, 0
    total = v1 + v2
    scale = np.sqrt(np.maximum(np.diag(total), 0.0))
    keep = scale > 1e-12 * max(1.0, float(scale.max(initial=0.0)))
    if not keep.any():
        return 0.0, 1.0, 0
    s = np.outer(scale[keep], scale[keep])
    a1, a2 = v1[np.ix_(keep, keep)] / s, v2[np.ix_(keep, keep)] / s
    w, u = np.linalg.eigh(a1 + a2)
    top = w > 1e-8 * w.max()
    rank = int(top.sum())
    whiten = u[:, top] / np.sqrt(w[top])  # whiten' (a1 + a2) whiten = I
    d = whiten.T @ ((m1 - m2)[keep] / scale[keep])
    t2 = float(d @ d)
    b1, b2 = whiten.T @ a1 @ whiten, whiten.T @ a2 @ whiten
    # Each side's covariance has the degrees of freedom of its effective number of clusters.
    w1 = (r1[:, keep] / scale[keep]) @ whiten
    w2 = (r2[:, keep] / scale[keep]) @ whiten
    f1, f2 = _effective_clusters(w1), _effective_clusters(w2)
    denom = (np.trace(b1 @ b1) + np.trace(b1) ** 2) / f1 + (np.trace(b2 @ b2) + np.trace(b2) ** 2) / f2
    nu = min((rank + rank**2) / denom, f1 + f2)
    df2 = nu - rank + 1
    if df2 <= 0:
        return t2, math.nan, rank
    return t2, float(stats.f.sf(t2 * df2 / (nu * rank), rank, df2)), rank


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
