"""What a drift check found (``DriftFigures``) and how it is stored (``DRIFT_SCHEMA``).

One row per figure in ``OUT/drift.parquet`` and ROOT/drift_history; ``summary()`` is the
run summary's ``drift`` entry. The figures come from ``cxr_ray.scoring.drift``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from cxr_ray.imaging.stats import ACQUISITION_STATS, MODEL_INPUT_STATS
from cxr_ray.labels import LABELS
from cxr_ray.models.reference import CATEGORY_TAGS, HIST_BINS
from cxr_ray.scoring.drift_stats import floor_std

#: DICOM categories counted (acquisition facts; informational), as the reference stores them.
CATEGORIES = CATEGORY_TAGS
_PLOT_POINTS = 400
#: Checks that describe the stored files, not what the model sees (never an alert).
ACQUISITION_CHECKS = frozenset({f"input:{s}" for s in ACQUISITION_STATS} | set(CATEGORIES))

DRIFT_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("check", pa.string(), nullable=False),
        pa.field("statistic", pa.string(), nullable=False),
        pa.field("value", pa.float64()),  # null: not computable (e.g. no DICOM tags in the reference)
        pa.field("threshold", pa.float64()),  # tested checks: the minimum effect size to alert
        pa.field("alert", pa.bool_(), nullable=False),
        pa.field("n_images", pa.int64(), nullable=False),
        pa.field("reference_n", pa.int64(), nullable=False),
        pa.field("note", pa.string()),
        pa.field("role", pa.string()),  # "test" (in the Holm family, may alert) or "info"
        pa.field("p_value", pa.float64()),
        pa.field("p_adjusted", pa.float64()),  # weighted Holm, across the run's tested checks
        pa.field("effect", pa.float64()),  # the effect size compared with ``threshold``
        pa.field("n_used", pa.int64()),  # run rows the statistic used (e.g. the reservoir)
        pa.field("method", pa.string()),
    ]
)


def finite(v: float | None) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


@dataclass
class DriftFigures:
    """What the check found: one row per figure, the overall alert and the plot data."""

    rows: list[dict[str, Any]]
    alert: bool
    n_images: int
    reference_n: int
    alpha: float = 0.01
    plot: dict[str, Any] = field(default_factory=dict)
    #: The tests' independent units (``DriftAccumulator.units_summary``).
    units: dict[str, Any] = field(default_factory=dict)

    def table(self, *, run_id: str, model_version: str) -> pa.Table:
        rows = [dict(r, run_id=run_id, model_version=model_version) for r in self.rows]
        return pa.Table.from_pylist(rows, schema=DRIFT_SCHEMA)

    def alerts(self) -> list[str]:
        return [f"{r['check']} {r['statistic']}" for r in self.rows if r["alert"]]

    def tests(self) -> list[dict[str, Any]]:
        """The tested checks (statistic, p-values, effect, sizes, alert)."""
        keys = ("check", "statistic", "value", "p_value", "p_adjusted", "effect", "threshold")
        out = []
        for r in self.rows:
            if r["role"] == "test":
                t = {k: (_round(r[k]) if isinstance(r[k], float) else r[k]) for k in keys}
                out.append(t | {"n_used": r["n_used"], "alert": r["alert"], "method": r["method"]})
        return out

    def summary(self) -> dict[str, Any]:
        """The key figures for ``summary.json``."""

        def get(check: str, stat: str) -> float | None:
            for r in self.rows:
                if r["check"] == check and r["statistic"] == stat:
                    return _round(r["value"])
            return None

        inputs = [
            r["value"]
            for r in self.rows
            if r["check"] in {f"input:{s}" for s in MODEL_INPUT_STATS}
            and r["statistic"] == "mean_shift"
            and r["value"] is not None
        ]
        acquisition = [
            f"{r['check']} {r['statistic']}"
            for r in self.rows
            if r["check"] in ACQUISITION_CHECKS and r["p_value"] is not None and r["p_value"] <= self.alpha
        ]
        return {
            "status": "checked",
            "alert": self.alert,
            "alerts": self.alerts(),
            "alpha": self.alpha,
            "n_images": self.n_images,
            "reference_n": self.reference_n,
            "units": self.units,
            "tests": self.tests(),
            "acquisition_differs": acquisition,
            "p_pneumonia_psi": get("p_pneumonia", "psi"),
            "p_pneumonia_ks": get("p_pneumonia", "ks"),
            "pred_label_psi": get("pred_label", "psi"),
            "input_max_mean_shift": _round(max(inputs)) if inputs else None,
            "feature_pca_mean_shift": get("features", "pca_mean_shift"),
            "feature_energy": get("features", "energy"),
        }


def _round(v: float | None) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.4g}") if abs(v) < 1e-3 else round(float(v), 4)


def plot_data(acc: Any) -> dict[str, Any]:
    """What the report's plots need (``DriftAccumulator`` ``acc``), so the report does not need
    the artifact."""
    ref = acc.ref
    ref_stats = ref.input_stats.astype(np.float64)
    mu_ref = np.nanmean(ref_stats, 0)
    sd_ref = floor_std(np.nanstd(ref_stats, 0), mu_ref)
    ref_hist = np.histogram(acc.ref_p, bins=HIST_BINS, range=(0.0, 1.0))[0]
    plot: dict[str, Any] = {
        "p_bins": np.linspace(0.0, 1.0, HIST_BINS + 1).round(4).tolist(),
        "p_run": acc.p_hist.tolist(),
        "p_reference": ref_hist.tolist(),
        "labels": list(LABELS),
        "pred_run": acc.pred.tolist(),
        "pred_reference": ref.pred_counts(acc.card).tolist(),
        "stats": list(ref.stat_names),
        "stats_reference_mean": mu_ref.round(4).tolist(),
        "stats_reference_std": sd_ref.round(4).tolist(),
    }
    if acc.has_stats:
        run_mean = np.where(acc.stat_n > 0, acc.stat_sum / np.maximum(acc.stat_n, 1), np.nan)
        plot["stats_run_mean"] = [None if not math.isfinite(v) else round(float(v), 4) for v in run_mean]
    if acc.has_features:
        z = acc.reservoir()["pca"]
        z = z[np.isfinite(z).all(axis=1)]
        pick = acc.rng.permutation(len(acc.ref_z))[:_PLOT_POINTS]
        plot["pca_reference"] = acc.ref_z[pick, :2].round(3).tolist()
        plot["pca_run"] = z[:_PLOT_POINTS, :2].round(3).tolist()
    return plot
