"""Drift check of a scoring run against the artifact's drift reference (validation images).

::

    acc = DriftAccumulator(read_reference(art.reference), art.card, settings.drift)
    for block in predictor_output_blocks:      # before the internal columns are dropped
        acc.add(block)
    figures = acc.figures()                    # DriftFigures: rows for drift.parquet + alert

Memory is bounded whatever the run's size: P(pneumonia) goes into a fine histogram, the
predicted classes and DICOM categories into counts, features into streaming moments, the
tests' per-patient sums into a bounded sample of units (``drift_units.UnitSample``), and a
uniform reservoir (Algorithm R, ``drift.reservoir_size`` rows) keeps per-row probabilities,
input statistics and PCA coordinates (``DriftAccumulator.reservoir()``). Only ``ok`` rows
count.

Tested checks: hypothesis tests of "the run's images and the reference's come from one
distribution" (``role = test`` in ``drift.parquet``, statistic ``cluster_wald``). Images of
one patient are not independent, so every test is a two-sample Wald test of per-image means
with **cluster-robust** covariances over patients (else studies, else images) on both sides
(``drift_stats.cluster_wald``, ``drift_units``):

- ``p_pneumonia``: the run's CDF of P(pneumonia) at five quantiles of the reference's
  (``SCORE_QUANTILES``); effect: the KS statistic on every row (exact values, or exact counts
  in 1,602 fine logit bins beyond the reservoir), also its own ``ks`` row (info, p-value);
- ``pred_label``: the predicted-class shares; effect: PSI;
- ``inputs``: the mean of the model-input statistics (``MODEL_INPUT_STATS``: intensity
  percentiles, mean, spread); effect: the largest |mean shift| in reference std units;
- ``features``: the mean of the penultimate features in the reference's PCA space
  (standardized); effect: the RMS of those mean shifts.

A check alerts when its weighted-Holm-adjusted p-value (``drift.score_weight`` of alpha for the
score test, the rest shared equally) is <= ``drift.alpha`` and its effect is >= its
minimum (``DriftSettings``) and the run has at least ``min_images`` images. Informational rows
(``role = info``, never an alert): P(pneumonia) PSI, per-statistic mean shift / KS (with
p-values) / Wasserstein of every input statistic, feature energy coefficient, and the
acquisition facts (original width, height, aspect; DICOM modality, manufacturer, photometric
interpretation, bits stored) with chi-squared or KS p-values. Acquisition facts describe the
stored files, not what the model sees: they are listed next to an alert as likely causes,
never an alert on their own. Measured false-alarm rate and power: docs/MONITORING.md
(``benchmarks/drift_error_rates.py``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.config import DriftSettings
from cxr_ray.imaging.stats import MODEL_INPUT_STATS
from cxr_ray.labels import LABELS
from cxr_ray.models.card import ModelCard
from cxr_ray.models.reference import HIST_BINS, DriftReference
from cxr_ray.scoring import drift_checks as checks
from cxr_ray.scoring import drift_stats as ds
from cxr_ray.scoring.drift_figures import CATEGORIES, DRIFT_SCHEMA, DriftFigures, finite, plot_data
from cxr_ray.scoring.drift_units import UnitSample, group_sums, row_units
from cxr_ray.scoring.stages import tensor_column
from cxr_ray.vocabulary import Status

__all__ = ["CATEGORIES", "DRIFT_SCHEMA", "DriftAccumulator", "DriftFigures"]

#: Distinct values kept per DICOM category (more are counted as ``(other)``).
_MAX_CATEGORY_VALUES = 200
_PROBS = ("prob_normal", "prob_bacterial", "prob_viral")
#: The tested checks, in the order of their groups in a unit's test vector.
TEST_GROUPS = ("p_pneumonia", "pred_label", "inputs", "features")
#: The score test compares the run's CDF of P(pneumonia) with the reference's at these
#: quantiles of the reference. Five points: as powerful as Anderson-Darling on a pure score
#: shift, and no share so rare that a small run estimates its variance from a few images
#: (13 points down to 2% / 98% alerted in 0.06 of same-distribution runs of 100 at alpha 0.01).
SCORE_QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)


def _slices(widths: tuple[int, ...]) -> list[slice]:
    ends = np.cumsum((0, *widths))
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(ends)]


def _matrix(block: pa.Table, name: str) -> np.ndarray | None:
    """The 2-D internal column ``name`` as ``float64 [n, d]``, ``None`` when the block has none
    (an engine or stage that does not produce it)."""
    if name not in block.column_names:
        return None
    return np.asarray(tensor_column(block, name), np.float64).reshape(block.num_rows, -1)


class DriftAccumulator:
    """Block-by-block figures of a run (bounded memory), compared with ``reference`` at the end."""

    def __init__(
        self,
        reference: DriftReference,
        card: ModelCard,
        settings: DriftSettings,
        *,
        seed: int = 0,
        reference_units: Sequence[str] | None = None,
    ):
        self.ref = reference
        self.card = card
        self.s = settings
        self.rng = np.random.default_rng(seed)
        self.ref_p = reference.p_pneumonia(card)
        inner = np.quantile(self.ref_p, np.linspace(0.1, 0.9, 9))
        self.psi_edges = np.unique(inner)
        self.p_psi = np.zeros(len(self.psi_edges) + 1, np.int64)
        self.p_fine = np.zeros(len(checks.KS_EDGES) - 1, np.int64)
        self.p_hist = np.zeros(HIST_BINS, np.int64)
        self.pred = np.zeros(len(LABELS), np.int64)
        self.n = 0
        names = reference.stat_names
        self.k_stats = len(names)
        self.model_cols = [names.index(s) for s in MODEL_INPUT_STATS if s in names]
        ref_stats = reference.input_stats.astype(np.float64)
        self.stat_sum = np.zeros(self.k_stats)
        self.stat_n = np.zeros(self.k_stats)
        k = reference.pca_components.shape[0]
        self.z_scale = ds.floor_std(reference.pca_std.astype(np.float64), np.zeros(1))
        self.ref_z = reference.pca_scores.astype(np.float64) / self.z_scale
        self.feats = ds.Moments(self.ref_z.mean(0))
        # One reservoir of rows: [3 class probabilities | P(pneumonia) | input stats (K) |
        # standardized PCA coordinates (k)], NaN where a row has no such values.
        self._cols = 4 + self.k_stats
        self.res = np.full((settings.reservoir_size, self._cols + k), np.nan)
        self.res_seen = 0
        self.categories: dict[str, Counter[str]] = {c: Counter() for c in CATEGORIES}
        self.has_stats = self.has_features = False
        # The tests (``drift_stats.cluster_wald``) on per-unit sums (``drift_units``) of each
        # image's test vector: [1{P(pneumonia) <= reference quantile} | one-hot predicted class |
        # model-input statistics | standardized PCA coordinates], with per-group image counts.
        self.score_points = np.unique(np.quantile(self.ref_p.astype(np.float64), SCORE_QUANTILES))
        widths = (len(self.score_points), len(LABELS), len(self.model_cols), k)
        self.groups = dict(zip(TEST_GROUPS, _slices(widths), strict=True))
        self.units = UnitSample(settings.unit_sample_size, sum(widths), len(TEST_GROUPS))
        ref_pred = card.probabilities(reference.logits.astype(np.float64)).argmax(axis=1)
        ref_rows, ref_counts = self._test_vectors(
            self.ref_p.astype(np.float64), ref_pred, ref_stats[:, self.model_cols], self.ref_z
        )
        self.ref_grouped = reference_units is not None and len(reference_units) == reference.n
        keys = (
            list(reference_units)
            if reference_units is not None and self.ref_grouped
            else [f"row:{i}" for i in range(reference.n)]
        )
        self.ref_sums, self.ref_counts = group_sums(keys, ref_rows, ref_counts)

    def _test_vectors(
        self, p: np.ndarray, pred: np.ndarray, inputs: np.ndarray | None, z: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each image's test vector (zeros where a group's values are missing) and its per-group
        counts (1 where they are there)."""
        n = len(p)
        rows = np.zeros((n, self.units.sums.shape[1]))
        counts = np.zeros((n, len(TEST_GROUPS)))
        g = self.groups
        fine = np.isfinite(p)
        rows[fine, g["p_pneumonia"]] = (p[fine, None] <= self.score_points).astype(np.float64)
        counts[:, 0] = fine
        known = (pred >= 0) & (pred < len(LABELS))
        rows[np.flatnonzero(known), g["pred_label"].start + pred[known]] = 1.0
        counts[:, 1] = known
        for j, (name, values) in enumerate((("inputs", inputs), ("features", z)), start=2):
            if values is None:
                continue
            ok = np.isfinite(values).all(axis=1)
            rows[ok, g[name]] = values[ok]
            counts[:, j] = ok
        return rows, counts

    def unit_groups(self, group: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(run sums, run counts, reference sums, reference counts) per unit of one test group."""
        sl, j = self.groups[group], TEST_GROUPS.index(group)
        return self.units.sums[:, sl], self.units.counts[:, j], self.ref_sums[:, sl], self.ref_counts[:, j]

    # -- streaming ------------------------------------------------------------------------

    def add(self, block: pa.Table) -> None:
        """Count the ``ok`` rows of a predictor output block (``input_stats`` / ``features``
        columns used when present)."""
        if block.num_rows == 0 or "status" not in block.column_names:
            return
        ok_mask = pc.fill_null(pc.equal(block["status"], str(Status.OK)), False)
        idx = np.flatnonzero(np.asarray(ok_mask.to_numpy(zero_copy_only=False)))
        if len(idx) == 0:
            return
        n = len(idx)
        self.n += n
        vec = np.full((n, self.res.shape[1]), np.nan)
        for j, name in enumerate(_PROBS):
            if name in block.column_names:
                vec[:, j] = block[name].to_numpy(zero_copy_only=False).astype(np.float64)[idx]
        p_all = block["prob_pneumonia"].to_numpy(zero_copy_only=False).astype(np.float64)[idx]
        vec[:, 3] = p_all
        p = p_all[np.isfinite(p_all)]
        self.p_psi += np.bincount(np.searchsorted(self.psi_edges, p, side="right"), minlength=len(self.p_psi))
        self.p_fine += np.histogram(checks.logit(p), bins=checks.KS_EDGES)[0]
        self.p_hist += np.histogram(p, bins=HIST_BINS, range=(0.0, 1.0))[0]
        labels = block["pred_label"].to_numpy(zero_copy_only=False)[idx]
        self.pred += np.array([np.count_nonzero(labels == k) for k in LABELS], np.int64)
        stats = _matrix(block, "input_stats")
        if stats is not None and stats.shape[1] == self.k_stats:
            st = stats[idx]
            good = np.isfinite(st)
            self.stat_sum += np.where(good, st, 0).sum(0)
            self.stat_n += good.sum(0)
            vec[:, 4 : self._cols] = st
            self.has_stats = self.has_stats or bool(good.any())
        feats = _matrix(block, "features")
        if feats is not None and feats.shape[1] == self.ref.feature_mean.shape[0]:
            f = feats[idx]
            fine = np.isfinite(f).all(axis=1)
            if fine.any():
                z = self.ref.project(f[fine]) / self.z_scale
                self.feats.add(z)
                vec[np.flatnonzero(fine), self._cols :] = z
                self.has_features = True
        self._reservoir(vec)
        pred_idx = np.array([LABELS.index(v) if v in LABELS else -1 for v in labels], np.int64)
        rows, counts = self._test_vectors(
            vec[:, 3],
            pred_idx,
            vec[:, 4 : self._cols][:, self.model_cols],  # NaN rows (no values) count 0
            vec[:, self._cols :],
        )
        self.units.add(row_units(block, idx, self.units.images), rows, counts)
        self._count_categories(block, idx)

    def _count_categories(self, block: pa.Table, idx: np.ndarray) -> None:
        for c in CATEGORIES:
            if c not in block.column_names:
                continue
            vals = block[c].to_pylist()
            counter = self.categories[c]
            for i in idx:
                v = vals[i]
                key = str(v) if v is not None and v != "" else "(none)"
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
            for r, j in zip(rest[slots < size], slots[slots < size], strict=True):
                self.res[j] = vec[r]  # in row order: a later row replaces an earlier one
        self.res_seen += len(vec)

    def reservoir(self) -> dict[str, np.ndarray]:
        """A uniform random sample of the run's ok rows (at most ``reservoir_size``; all of
        them while the run is smaller): ``probabilities`` [r, 3] (``LABELS`` order, NaN where
        the block had none), ``prob_pneumonia`` [r], ``input_stats`` [r, K] (the reference's
        ``stat_names``) and ``pca`` [r, k] (features in the reference's PCA basis, each
        coordinate in units of the reference's std; NaN rows: no features)."""
        rows = self.res[: min(self.res_seen, self.res.shape[0])]
        return {
            "probabilities": rows[:, :3],
            "prob_pneumonia": rows[:, 3],
            "input_stats": rows[:, 4 : self._cols],
            "pca": rows[:, self._cols :],
        }

    def nbytes(self) -> int:
        """What the accumulator holds: constant once the unit sample is full (at most
        ``drift.unit_sample_size`` units), whatever the run's size."""
        arrays = [self.res, self.p_fine, self.p_psi, self.p_hist, self.stat_sum, self.stat_n]
        arrays += [self.feats.s2, self.feats.s1, self.ref_sums, self.ref_counts]
        return int(sum(a.nbytes for a in arrays)) + self.units.nbytes()

    def units_summary(self) -> dict[str, Any]:
        """How many independent units the tests counted, on each side."""
        return {
            "run": self.units.n,
            "run_sampled": self.units.sampled,
            "reference": len(self.ref_sums),
            "reference_grouped": self.ref_grouped,
        }

    def _units_note(self) -> str:
        ref = "patients" if self.ref_grouped else "images (patients unknown)"
        sampled = ", a uniform sample of the run's units" if self.units.sampled else ""
        return (
            f"cluster-robust over {self.units.n} patients/studies ({self.units.images} images{sampled}) "
            f"vs {len(self.ref_sums)} reference {ref} ({self.ref.n} images)"
        )

    # -- comparison -----------------------------------------------------------------------

    def figures(self) -> DriftFigures:
        """Every check's row, Holm across the tested ones, the alerts and the plot data."""
        rows = checks.score_rows(self) + checks.input_rows(self) + checks.feature_rows(self)
        rows += checks.category_rows(self)
        tested = [i for i, r in enumerate(rows) if r["role"] == "test"]
        adjusted = ds.holm(
            [np.nan if rows[i]["p_value"] is None else rows[i]["p_value"] for i in tested],
            self._holm_weights([rows[i]["check"] for i in tested]),
        )
        enough = self.n >= self.s.min_images
        for i, adj in zip(tested, adjusted, strict=True):
            r = rows[i]
            r["p_adjusted"] = finite(adj)
            r["alert"] = bool(
                enough
                and r["p_adjusted"] is not None
                and r["p_adjusted"] <= self.s.alpha
                and r["effect"] is not None
                and r["effect"] >= r["threshold"]
            )
            if not enough and r["note"] is None:
                r["note"] = f"fewer than {self.s.min_images} images: no alert"
        alert = any(r["alert"] for r in rows)
        return DriftFigures(
            rows, alert, self.n, self.ref.n, self.s.alpha, plot_data(self), units=self.units_summary()
        )

    def _holm_weights(self, checks: list[str]) -> list[float]:
        """The score test gets ``score_weight`` of alpha, every other tested check an equal share
        of the rest (``drift_stats.holm`` renormalises over the tests that ran)."""
        others = max(1, sum(c != "p_pneumonia" for c in checks))
        w = self.s.score_weight
        return [w if c == "p_pneumonia" else (1.0 - w) / others for c in checks]
