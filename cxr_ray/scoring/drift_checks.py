"""The rows of a drift check (``cxr_ray.scoring.drift``): one function per group of checks.

Each reads a ``DriftAccumulator`` (what the run streamed, its units and the reference) and
returns ``drift.parquet`` rows; ``DriftAccumulator.figures`` adds the Holm adjustment and
the alerts. The tests and their statistics are ``drift_stats``; the units ``drift_units``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cxr_ray.imaging.stats import ACQUISITION_STATS, MODEL_INPUT_STATS
from cxr_ray.scoring import drift_stats as ds
from cxr_ray.scoring.drift_figures import CATEGORIES, finite

#: A ``cxr_ray.scoring.drift.DriftAccumulator`` (not imported: drift imports this module).
DriftAccumulator = Any

__all__ = ["category_rows", "feature_rows", "input_rows", "row", "score_rows"]

#: Fine histogram of logit(P(pneumonia)) for the KS test of large runs: exact counts.
KS_EDGES = np.concatenate([[-np.inf], np.linspace(-16.0, 16.0, 1601), [np.inf]])


#: The statistic of every tested check: ``drift_stats.cluster_wald`` on the per-unit sums.
TEST_STATISTIC = "cluster_wald"


#: What each tested check's Wald test is on, and its effect size.
_TESTED = {
    "p_pneumonia": ("the CDF at {k} reference quantiles", "KS statistic"),
    "pred_label": ("the class shares", "PSI"),
    "inputs": ("the mean", "largest mean shift (std units)"),
    "features": ("the mean in the PCA space", "RMS mean shift (std units)"),
}


def _tested(acc: DriftAccumulator, check: str, effect: float | None, threshold: float) -> dict[str, Any]:
    """The ``role = test`` row of one check: ``drift_stats.cluster_wald`` on its per-unit sums
    (residuals around the pooled mean for the shares: their variance under the null)."""
    run_sums, run_counts, ref_sums, ref_counts = acc.unit_groups(check)
    shares = check in ("p_pneumonia", "pred_label")
    t2, p, dims = ds.cluster_wald(run_sums, run_counts, ref_sums, ref_counts, pooled=shares)
    what, effect_name = _TESTED[check]
    return row(
        acc,
        check,
        TEST_STATISTIC,
        t2,
        role="test",
        p_value=p,
        effect=effect,
        threshold=threshold,
        n_used=int(run_counts.sum()),
        method=(
            f"Wald test of {what.format(k=len(acc.score_points))} ({dims} dims), {acc._units_note()}; "
            f"effect: {effect_name}"
        ),
    )


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def row(acc: DriftAccumulator, check: str, stat: str, value: float | None, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "check": check,
        "statistic": stat,
        "value": finite(value),
        "threshold": None,
        "alert": False,
        "n_images": acc.n,
        "reference_n": acc.ref.n,
        "note": None,
        "role": "info",
        "p_value": None,
        "p_adjusted": None,
        "effect": None,
        "n_used": acc.n,
        "method": None,
    }
    row.update(kw)
    for k in ("p_value", "effect"):
        row[k] = finite(row[k])
    return row


def score_rows(acc: DriftAccumulator) -> list[dict[str, Any]]:
    s = acc.s
    ref_p = acc.ref_p.astype(np.float64)
    ref_psi = np.bincount(np.searchsorted(acc.psi_edges, acc.ref_p, side="right"), minlength=len(acc.p_psi))
    rows = [row(acc, "p_pneumonia", "psi", ds.psi(acc.p_psi, ref_psi), method="deciles of the reference")]
    kept = acc.res[: min(acc.res_seen, acc.res.shape[0]), 3]
    if acc.res_seen <= acc.res.shape[0]:  # every row is in the reservoir: exact values
        d, p, method = ds.ks_values(kept, ref_p)
    else:
        d, p, method = ds.ks_binned(acc.p_fine, np.histogram(logit(ref_p), bins=KS_EDGES)[0])
    rows.append(_tested(acc, "p_pneumonia", d, s.score_ks_min))
    rows.append(row(acc, "p_pneumonia", "ks", d, p_value=p, method=method))
    ref_pred = acc.ref.pred_counts(acc.card)
    class_psi = ds.psi(acc.pred, ref_pred)
    rows.append(row(acc, "pred_label", "psi", class_psi, method="predicted-class mix"))
    rows.append(_tested(acc, "pred_label", class_psi, s.class_psi_min))
    return rows


def input_rows(acc: DriftAccumulator) -> list[dict[str, Any]]:
    ref = acc.ref
    ref_stats = ref.input_stats.astype(np.float64)
    mu_ref = np.nanmean(ref_stats, 0)
    sd_ref = ds.floor_std(np.nanstd(ref_stats, 0), mu_ref)
    rows: list[dict[str, Any]] = []
    if not acc.has_stats:
        return [
            row(
                acc,
                "inputs",
                TEST_STATISTIC,
                None,
                role="test",
                threshold=acc.s.input_shift_min,
                note="no input statistics in the run",
            )
        ]
    res = acc.reservoir()["input_stats"]
    shifts = []
    for j, name in enumerate(ref.stat_names):
        mean = acc.stat_sum[j] / acc.stat_n[j] if acc.stat_n[j] else math.nan
        col, rcol = res[:, j], ref_stats[:, j]
        shift = abs(mean - mu_ref[j]) / sd_ref[j]
        note = "acquisition" if name in ACQUISITION_STATS else None
        if name in MODEL_INPUT_STATS:
            shifts.append(shift)
        d, p, method = ds.ks_values(col, rcol)
        n_used = int(np.isfinite(col).sum())
        rows.append(row(acc, f"input:{name}", "mean_shift", shift, note=note, method="reference std units"))
        rows.append(row(acc, f"input:{name}", "ks", d, p_value=p, n_used=n_used, note=note, method=method))
        w = ds.wasserstein(col, rcol) / sd_ref[j]
        rows.append(
            row(
                acc, f"input:{name}", "wasserstein", w, n_used=n_used, note=note, method="reference std units"
            )
        )
    rows.insert(0, _tested(acc, "inputs", max(shifts) if shifts else None, acc.s.input_shift_min))
    return rows


def feature_rows(acc: DriftAccumulator) -> list[dict[str, Any]]:
    s = acc.s
    if not (acc.has_features and acc.feats.n):
        return [
            row(
                acc,
                "features",
                TEST_STATISTIC,
                None,
                role="test",
                threshold=s.feature_shift_min,
                note="no features in the run",
            )
        ]
    shift = acc.feats.mean() - acc.ref_z.mean(0)
    rms = float(np.sqrt(np.mean(shift**2)))
    z = acc.reservoir()["pca"]
    z = z[np.isfinite(z).all(axis=1)]
    return [
        _tested(acc, "features", rms, s.feature_shift_min),
        row(acc, "features", "pca_mean_shift", rms, n_used=acc.feats.n, method="RMS, reference std units"),
        row(
            acc,
            "features",
            "energy",
            ds.energy_coefficient(z, acc.ref_z),
            n_used=len(z),
            method="energy coefficient on the reservoir",
        ),
    ]


def category_rows(acc: DriftAccumulator) -> list[dict[str, Any]]:
    rows = []
    for c in CATEGORIES:
        ref_mix = acc.ref.meta.get(f"{c}_mix")
        run_mix = acc.categories[c]
        has_run = bool(run_mix) and not all(k == "(none)" for k in run_mix)
        if not has_run and not ref_mix:
            continue
        if not has_run or not ref_mix:
            note = "the run's images carry no DICOM tags" if ref_mix else "the reference has no DICOM tags"
            rows.append(row(acc, c, "tv_distance", 1.0 if ref_mix else None, note=note))
            continue
        keys = sorted(set(ref_mix) | set(run_mix))
        run = np.array([run_mix.get(k, 0) for k in keys], np.float64)
        ref = np.array([ref_mix.get(k, 0) for k in keys], np.float64)
        tv = 0.5 * float(np.abs(run / run.sum() - ref / ref.sum()).sum())
        _, p = ds.chi2_mix(run, ref)
        rows.append(
            row(
                acc,
                c,
                "tv_distance",
                tv,
                p_value=p,
                note="acquisition",
                method="chi2_contingency p; value: total variation",
            )
        )
    return rows
