"""Drift check of a scoring run against the artifact's drift reference (validation images).

::

    acc = DriftAccumulator(read_reference(art.reference), art.card, settings.drift)
    for block in predictor_output_blocks:      # before the internal columns are dropped
        acc.add(block)
    figures = acc.figures()                    # DriftFigures: rows for drift.parquet + alert

Memory is bounded whatever the run's size: P(pneumonia) goes into fixed histograms, the
predicted classes and DICOM categories into counts, inputs and features into running sums,
and a uniform reservoir (``drift.reservoir_size`` rows) keeps per-row input statistics and
PCA coordinates for the distribution distances. Only ``ok`` rows count.

Checks (``check`` / ``statistic`` in ``drift.parquet``; thresholds in ``DriftSettings``):

- ``p_pneumonia``: ``psi`` over the reference's deciles, ``ks`` (largest CDF gap, on a fine
  logit-spaced histogram);
- ``pred_label``: ``psi`` of the predicted-class mix;
- ``input:<stat>`` for each of ``INPUT_STATS``: ``mean_shift`` (|mean difference| in
  reference std units), ``ks``, ``wasserstein`` (reference std units);
- ``features``: ``pca_mean_shift`` (RMS over the reference PCA components of the mean shift,
  each in reference std units), ``energy`` (energy coefficient, 0..1, on the reservoir);
- ``modality`` / ``manufacturer``: ``tv_distance`` of the category mix, where the reference
  has DICOM tags.

Thresholds are effect sizes (``DriftSettings``), measured on real Kermany images with a trained
MobileNetV2 (224 px, 745 patient-grouped validation images). "Same" is the largest figure seen
(over every input statistic) in 20 random patient-grouped halves of the validation images
(~372 vs ~372), in 20 runs of 100 validation images against the other 645, and in 400 / 100
training images of other patients against all 745; "shifted" is the smallest figure seen when
the run is ``render_site`` copies of a half (or of 100 images)::

    figure                       same: halves  100 images  other patients   shifted (min)  threshold
    p_pneumonia psi                    0.154       0.405       0.204          0.912          0.5
    p_pneumonia ks                     0.177       0.195       0.126          0.212          0.25
    pred_label psi                     0.099       0.158       0.035          0.625          0.25
    input:* mean_shift (max)           0.294       0.501       0.263          0.618          1.0
    input:* ks (max)                   0.175       0.276       0.170          0.534          0.4
    input:* wasserstein (max)          0.298       0.517       0.290          0.743          1.0
    features pca_mean_shift            0.122       0.182       0.132          0.644          0.4
    features energy                    0.003       0.009       0.002          0.162          0.05

So none of the 60 "same" runs alerts and all 40 shifted runs do (each on five checks:
P(pneumonia) PSI, class PSI, input KS, feature shift and energy). The mean-shift and
Wasserstein thresholds catch gross changes (another resolution, an inverted image) rather
than this re-rendering, and the P(pneumonia) KS is kept above the 100-image noise. Below
``min_images`` (100) the figures are written but nothing alerts: at 100 images the noise is
already ~2/3 of the PSI threshold.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.config import DriftSettings
from cxr_ray.labels import LABELS
from cxr_ray.models.card import ModelCard
from cxr_ray.models.reference import HIST_BINS, DriftReference
from cxr_ray.scoring.stages import tensor_column

#: Fine histogram of logit(P(pneumonia)) for the KS statistic: exact counts, bounded memory.
_KS_EDGES = np.concatenate([[-np.inf], np.linspace(-16.0, 16.0, 1601), [np.inf]])
_CATEGORIES = ("modality", "manufacturer")
#: Distinct values kept per DICOM category (more are counted as ``(other)``).
_MAX_CATEGORY_VALUES = 200
_PLOT_POINTS = 400

DRIFT_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("check", pa.string(), nullable=False),
        pa.field("statistic", pa.string(), nullable=False),
        pa.field("value", pa.float64()),  # null: not computable (e.g. no DICOM tags in the reference)
        pa.field("threshold", pa.float64()),
        pa.field("alert", pa.bool_(), nullable=False),
        pa.field("n_images", pa.int64(), nullable=False),
        pa.field("reference_n", pa.int64(), nullable=False),
        pa.field("note", pa.string()),
    ]
)


def _matrix(block: pa.Table, name: str) -> np.ndarray | None:
    """The 2-D internal column ``name`` as ``float64 [n, d]``, ``None`` when the block has none
    (an engine or stage that does not produce it)."""
    if name not in block.column_names:
        return None
    return np.asarray(tensor_column(block, name), np.float64).reshape(block.num_rows, -1)


def _psi(run: np.ndarray, ref: np.ndarray) -> float:
    """Population stability index of two count vectors (half-count floor on empty bins)."""
    n, m = run.sum(), ref.sum()
    if n == 0 or m == 0:
        return math.nan
    p = np.maximum(run / n, 0.5 / n)
    q = np.maximum(ref / m, 0.5 / m)
    return float(np.sum((p - q) * np.log(p / q)))


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic of two samples."""
    if len(a) == 0 or len(b) == 0:
        return math.nan
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def _wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance of two 1-D samples (integral of |CDF_a - CDF_b|)."""
    if len(a) == 0 or len(b) == 0:
        return math.nan
    a, b = np.sort(a), np.sort(b)
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(a, grid[:-1], side="right") / len(a)
    fb = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(fa - fb) * np.diff(grid)))


def _mean_dist(x: np.ndarray, y: np.ndarray, chunk: int = 512) -> float:
    total = 0.0
    for i in range(0, len(x), chunk):
        d = x[i : i + chunk, None, :] - y[None, :, :]
        total += float(np.sqrt((d * d).sum(-1)).sum())
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


def _floor_std(std: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """A reference spread never zero: a constant reference (every image 224 px wide) still
    turns a different value into a large, finite shift."""
    return np.maximum(std, np.maximum(1e-3 * np.abs(mean), 1e-6))


@dataclass
class DriftFigures:
    """What the check found: one row per figure, the overall alert and the plot data."""

    rows: list[dict[str, Any]]
    alert: bool
    n_images: int
    reference_n: int
    plot: dict[str, Any] = field(default_factory=dict)

    def table(self, *, run_id: str, model_version: str) -> pa.Table:
        rows = [dict(r, run_id=run_id, model_version=model_version) for r in self.rows]
        return pa.Table.from_pylist(rows, schema=DRIFT_SCHEMA)

    def alerts(self) -> list[str]:
        return [f"{r['check']} {r['statistic']}" for r in self.rows if r["alert"]]

    def summary(self) -> dict[str, Any]:
        """The key figures for ``summary.json``."""

        def get(check: str, stat: str) -> float | None:
            for r in self.rows:
                if r["check"] == check and r["statistic"] == stat:
                    v = r["value"]
                    return None if v is None or not math.isfinite(v) else round(float(v), 4)
            return None

        inputs = [
            r["value"]
            for r in self.rows
            if r["check"].startswith("input:") and r["statistic"] == "mean_shift" and r["value"] is not None
        ]
        return {
            "status": "checked",
            "alert": self.alert,
            "alerts": self.alerts(),
            "n_images": self.n_images,
            "reference_n": self.reference_n,
            "p_pneumonia_psi": get("p_pneumonia", "psi"),
            "p_pneumonia_ks": get("p_pneumonia", "ks"),
            "pred_label_psi": get("pred_label", "psi"),
            "input_max_mean_shift": round(float(max(inputs)), 4) if inputs else None,
            "feature_pca_mean_shift": get("features", "pca_mean_shift"),
            "feature_energy": get("features", "energy"),
        }


class DriftAccumulator:
    """Block-by-block figures of a run (bounded memory), compared with ``reference`` at the end."""

    def __init__(self, reference: DriftReference, card: ModelCard, settings: DriftSettings, *, seed: int = 0):
        self.ref = reference
        self.card = card
        self.s = settings
        self.rng = np.random.default_rng(seed)
        ref_p = reference.p_pneumonia(card)
        self.ref_p = ref_p
        inner = np.quantile(ref_p, np.linspace(0.1, 0.9, 9))
        self.psi_edges = np.unique(inner)
        self.p_psi = np.zeros(len(self.psi_edges) + 1, np.int64)
        self.p_fine = np.zeros(len(_KS_EDGES) - 1, np.int64)
        self.p_hist = np.zeros(HIST_BINS, np.int64)
        self.pred = np.zeros(len(LABELS), np.int64)
        self.n = 0
        k_stats = reference.input_stats.shape[1]
        self.stat_sum = np.zeros(k_stats)
        self.stat_n = np.zeros(k_stats)
        k = reference.pca_components.shape[0]
        self.z_sum = np.zeros(k)
        self.z_n = 0
        # One reservoir of rows: [input stats (K) | standardized PCA coordinates (k)], NaN
        # where a row has no such values (features missing in an old engine's output).
        self.res = np.full((settings.reservoir_size, k_stats + k), np.nan)
        self.res_seen = 0
        self.categories: dict[str, Counter[str]] = {c: Counter() for c in _CATEGORIES}
        self.has_stats = self.has_features = False

    # -- streaming ------------------------------------------------------------------------

    def add(self, block: pa.Table) -> None:
        """Count the ``ok`` rows of a predictor output block (``input_stats`` / ``features``
        columns used when present)."""
        if block.num_rows == 0 or "status" not in block.column_names:
            return
        ok = np.asarray(pc.fill_null(pc.equal(block["status"], "ok"), False).to_numpy(zero_copy_only=False))
        if not ok.any():
            return
        idx = np.flatnonzero(ok)
        n = len(idx)
        self.n += n
        p = block["prob_pneumonia"].to_numpy(zero_copy_only=False).astype(np.float64)[idx]
        p = p[np.isfinite(p)]
        self.p_psi += np.bincount(np.searchsorted(self.psi_edges, p, side="right"), minlength=len(self.p_psi))
        self.p_fine += np.histogram(_logit(p), bins=_KS_EDGES)[0]
        self.p_hist += np.histogram(p, bins=HIST_BINS, range=(0.0, 1.0))[0]
        labels = block["pred_label"].to_numpy(zero_copy_only=False)[idx]
        self.pred += np.array([np.count_nonzero(labels == k) for k in LABELS], np.int64)
        k_stats = self.stat_sum.shape[0]
        vec = np.full((n, self.res.shape[1]), np.nan)
        stats = _matrix(block, "input_stats")
        if stats is not None and stats.shape[1] == k_stats:
            st = stats[idx]
            good = np.isfinite(st)
            self.stat_sum += np.where(good, st, 0).sum(0)
            self.stat_n += good.sum(0)
            vec[:, :k_stats] = st
            self.has_stats = self.has_stats or bool(good.any())
        feats = _matrix(block, "features")
        if feats is not None and feats.shape[1] == self.ref.feature_mean.shape[0]:
            f = feats[idx]
            fine = np.isfinite(f).all(axis=1)
            if fine.any():
                z = self.ref.project(f[fine]) / _floor_std(self.ref.pca_std.astype(np.float64), np.zeros(1))
                self.z_sum += z.sum(0)
                self.z_n += len(z)
                vec[np.flatnonzero(fine), k_stats:] = z
                self.has_features = True
        self._reservoir(vec)
        for c in _CATEGORIES:
            if c in block.column_names:
                vals = block[c].to_pylist()
                counter = self.categories[c]
                for i in idx:
                    v = vals[i]
                    key = v if isinstance(v, str) and v else "(none)"
                    if key not in counter and len(counter) >= _MAX_CATEGORY_VALUES:
                        key = "(other)"
                    counter[key] += 1

    def _reservoir(self, vec: np.ndarray) -> None:
        """Algorithm R, vectorised per block: every ok row is kept with equal probability."""
        size = self.res.shape[0]
        start = self.res_seen
        fill = max(0, min(size - start, len(vec)))
        if fill:
            self.res[start : start + fill] = vec[:fill]
        rest = np.arange(fill, len(vec))
        if len(rest):
            slots = self.rng.integers(0, start + rest + 1)
            for r, j in zip(rest, slots, strict=True):
                if j < size:
                    self.res[j] = vec[r]
        self.res_seen += len(vec)

    @property
    def reservoir(self) -> np.ndarray:
        """The kept rows (at most ``reservoir_size``)."""
        return self.res[: min(self.res_seen, self.res.shape[0])]

    def nbytes(self) -> int:
        """What the accumulator holds (constant after construction)."""
        arrays = [self.res, self.p_fine, self.p_psi, self.p_hist, self.z_sum, self.stat_sum, self.stat_n]
        return int(sum(a.nbytes for a in arrays))

    # -- comparison -----------------------------------------------------------------------

    def figures(self) -> DriftFigures:
        s, ref, card = self.s, self.ref, self.card
        enough = self.n >= s.min_images
        rows: list[dict[str, Any]] = []

        def add(check: str, stat: str, value: float | None, threshold: float | None, note: str | None = None):
            finite = value is not None and math.isfinite(value)
            alert = bool(enough and finite and threshold is not None and value >= threshold)  # type: ignore[operator]
            rows.append(
                {
                    "check": check,
                    "statistic": stat,
                    "value": float(value) if finite else None,  # type: ignore[arg-type]
                    "threshold": threshold,
                    "alert": alert,
                    "n_images": self.n,
                    "reference_n": ref.n,
                    "note": note
                    if note is not None
                    else (None if enough else f"fewer than {s.min_images} images"),
                }
            )

        ref_psi = np.bincount(
            np.searchsorted(self.psi_edges, self.ref_p, side="right"), minlength=len(self.p_psi)
        )
        add("p_pneumonia", "psi", _psi(self.p_psi, ref_psi), s.psi_alert)
        ref_fine = np.histogram(_logit(self.ref_p.astype(np.float64)), bins=_KS_EDGES)[0]
        ks = (
            float(
                np.max(
                    np.abs(np.cumsum(self.p_fine) / self.p_fine.sum() - np.cumsum(ref_fine) / ref_fine.sum())
                )
            )
            if self.p_fine.sum()
            else math.nan
        )
        add("p_pneumonia", "ks", ks, s.ks_alert)
        ref_pred = ref.pred_counts(card)
        add("pred_label", "psi", _psi(self.pred, ref_pred), s.class_psi_alert)

        k_stats = self.stat_sum.shape[0]
        res = self.reservoir
        ref_stats = ref.input_stats.astype(np.float64)
        mu_ref = np.nanmean(ref_stats, 0)
        sd_ref = _floor_std(np.nanstd(ref_stats, 0), mu_ref)
        for j, name in enumerate(ref.stat_names):
            if not self.has_stats:
                add(
                    f"input:{name}", "mean_shift", None, s.input_shift_alert, "no input statistics in the run"
                )
                continue
            mean = self.stat_sum[j] / self.stat_n[j] if self.stat_n[j] else math.nan
            col = res[:, j][np.isfinite(res[:, j])]
            rcol = ref_stats[:, j][np.isfinite(ref_stats[:, j])]
            add(f"input:{name}", "mean_shift", abs(mean - mu_ref[j]) / sd_ref[j], s.input_shift_alert)
            add(f"input:{name}", "ks", _ks(col, rcol), s.input_ks_alert)
            add(
                f"input:{name}", "wasserstein", _wasserstein(col, rcol) / sd_ref[j], s.input_wasserstein_alert
            )

        ref_z = ref.pca_scores.astype(np.float64) / _floor_std(ref.pca_std.astype(np.float64), np.zeros(1))
        if self.has_features and self.z_n:
            shift = self.z_sum / self.z_n - ref_z.mean(0)
            add("features", "pca_mean_shift", float(np.sqrt(np.mean(shift**2))), s.feature_shift_alert)
            z = res[:, k_stats:]
            z = z[np.isfinite(z).all(axis=1)]
            add("features", "energy", energy_coefficient(z, ref_z), s.feature_energy_alert)
        else:
            add("features", "pca_mean_shift", None, s.feature_shift_alert, "no features in the run")

        for c in _CATEGORIES:
            ref_mix = ref.meta.get(f"{c}_mix")
            run_mix = self.categories[c]
            if not run_mix or all(k == "(none)" for k in run_mix):
                if ref_mix:
                    add(c, "tv_distance", 1.0, s.category_tv_alert, "the run's images carry no DICOM tags")
                continue
            if not ref_mix:
                add(c, "tv_distance", None, s.category_tv_alert, "the reference has no DICOM tags")
                continue
            keys = set(ref_mix) | set(run_mix)
            rt, nt = sum(ref_mix.values()), sum(run_mix.values())
            tv = 0.5 * sum(abs(run_mix.get(k, 0) / nt - ref_mix.get(k, 0) / rt) for k in keys)
            add(c, "tv_distance", tv, s.category_tv_alert)

        alert = any(r["alert"] for r in rows)
        return DriftFigures(rows, alert, self.n, ref.n, self._plot(ref_z, mu_ref, sd_ref))

    def _plot(self, ref_z: np.ndarray, mu_ref: np.ndarray, sd_ref: np.ndarray) -> dict[str, Any]:
        """What the report's plots need, so the report does not need the artifact."""
        ref, res = self.ref, self.reservoir
        k_stats = self.stat_sum.shape[0]
        ref_hist = np.histogram(self.ref_p, bins=HIST_BINS, range=(0.0, 1.0))[0]
        plot: dict[str, Any] = {
            "p_bins": np.linspace(0.0, 1.0, HIST_BINS + 1).round(4).tolist(),
            "p_run": self.p_hist.tolist(),
            "p_reference": ref_hist.tolist(),
            "labels": list(LABELS),
            "pred_run": self.pred.tolist(),
            "pred_reference": ref.pred_counts(self.card).tolist(),
            "stats": list(ref.stat_names),
            "stats_reference_mean": mu_ref.round(4).tolist(),
            "stats_reference_std": sd_ref.round(4).tolist(),
        }
        if self.has_stats:
            run_mean = np.where(self.stat_n > 0, self.stat_sum / np.maximum(self.stat_n, 1), np.nan)
            plot["stats_run_mean"] = [None if not math.isfinite(v) else round(float(v), 4) for v in run_mean]
        if self.has_features:
            z = res[:, k_stats:]
            z = z[np.isfinite(z).all(axis=1)]
            pick = self.rng.permutation(len(ref_z))[:_PLOT_POINTS]
            plot["pca_reference"] = ref_z[pick, :2].round(3).tolist()
            plot["pca_run"] = z[:_PLOT_POINTS, :2].round(3).tolist()
        return plot


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)
