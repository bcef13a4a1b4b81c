"""The performance alert of labelled runs (cxr_ray.scoring.performance)."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_ray.scoring.performance import (
    _holm,
    card_counts,
    check_performance,
    clopper_pearson,
    performance_line,
    run_counts,
)

#: The issue's card: specificity 0.990 on 192 normals, sensitivity 0.951 on 553 pneumonias.
CONFUSION = [[190, 1, 1], [10, 290, 61], [9, 40, 143]]


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    from cxr_ray.models.artifact import read_card
    from tests.conftest import make_artifact

    base = read_card(str(make_artifact(tmp_path_factory.mktemp("perf") / "model", input_size=64)))
    validation = {
        "accuracy": 0.834,
        "binary_sensitivity_at_threshold": 0.951,
        "binary_specificity_at_threshold": 0.990,
    }
    return base.model_copy(
        update={
            "thresholds": {"pneumonia": 0.779},
            "metrics": {"validation": validation, "validation_confusion": CONFUSION},
        }
    )


def _run(n_normal: int, spec: float, n_pos: int, sens: float, threshold: float, seed: int = 0):
    """Labels and probabilities with exactly the given specificity / sensitivity at ``threshold``
    (top class right for about 83% of rows)."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n_normal, int), rng.integers(1, 3, n_pos)]
    p_pneu = np.empty(len(y))
    fp = round(n_normal * (1 - spec))
    p_pneu[:n_normal] = np.where(np.arange(n_normal) < fp, threshold + 0.1, threshold / 2)
    fn = round(n_pos * (1 - sens))
    p_pneu[n_normal:] = np.where(np.arange(n_pos) < fn, threshold / 2, min(threshold + 0.15, 0.999))
    probs = np.zeros((len(y), 3))
    probs[:, 0] = 1 - p_pneu
    right = rng.random(len(y)) < 0.83
    for i in range(len(y)):
        k = y[i] if y[i] != 0 else 1 + (i % 2)
        other = 3 - k
        probs[i, k if right[i] else other] = p_pneu[i] * 0.8
        probs[i, other if right[i] else k] = p_pneu[i] * 0.2
    return y, probs


def test_card_counts_from_the_validation_confusion(card):
    counts = card_counts(card)
    assert counts["specificity"] == (190, 192)
    assert counts["sensitivity"] == (round(0.951 * 553), 553)
    assert counts["accuracy"] == (round(0.834 * 745), 745)


def test_run_counts_at_the_flag_threshold():
    y, probs = _run(100, 0.8, 200, 0.95, 0.779)
    c = run_counts(y, probs, 0.779)
    assert c["specificity"] == (80, 100) and c["sensitivity"] == (190, 200)


def test_issue_run_alerts_on_specificity(card):
    # The issue's labelled run: specificity 0.825 at the flag threshold on 234 normals.
    y, probs = _run(234, 0.825, 390, 0.96, 0.779)
    c = check_performance(card, y, probs)
    assert c["status"] == "checked" and c["alert"] and c["alerts"] == ["specificity"]
    s = c["specificity"]
    assert s["value"] == pytest.approx(0.825, abs=0.002) and s["card"] == pytest.approx(0.9896, abs=1e-3)
    assert s["p_holm"] < 1e-6 and s["card_low"] > s["high"]
    line = performance_line(c)
    assert line.startswith("PERFORMANCE ALERT (at the flag threshold 0.779): specificity 0.825")
    assert "vs card 0.990" in line


def test_same_performance_does_not_alert(card):
    y, probs = _run(190, 0.99, 550, 0.95, 0.779)
    c = check_performance(card, y, probs)
    assert not c["alert"] and c["alerts"] == []
    assert performance_line(c).startswith("measured performance (at the flag threshold 0.779, 740 labelled)")


def test_small_runs_need_a_larger_drop(card):
    # 10 normals with one false positive (0.90) is no evidence against 0.99 on 192.
    y, probs = _run(10, 0.9, 20, 0.95, 0.779)
    assert not check_performance(card, y, probs)["specificity"]["alert"]
    # 200 normals at 0.90 is.
    y, probs = _run(200, 0.9, 20, 0.95, 0.779)
    assert check_performance(card, y, probs)["specificity"]["alert"]


def test_huge_runs_do_not_alert_on_trivial_drops(card):
    y, probs = _run(200_000, 0.985, 1000, 0.95, 0.779)
    c = check_performance(card, y, probs)
    assert c["specificity"]["p_value"] < 0.5 and not c["specificity"]["alert"]  # drop 0.005 < min_drop


def test_holm_and_exact_interval():
    assert _holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert _holm([0.5, float("nan")])[1] != _holm([0.5, float("nan")])[1]  # NaN stays NaN
    lo, hi = clopper_pearson(190, 192)
    assert lo == pytest.approx(0.9628, abs=1e-3) and hi == pytest.approx(0.9987, abs=1e-3)
    assert clopper_pearson(0, 10)[0] == 0.0 and clopper_pearson(10, 10)[1] == 1.0


def test_no_labels_and_no_card_figures(card):
    assert check_performance(card, np.zeros(0, int), np.zeros((0, 3)))["status"] == "no_labels"
    bare = card.model_copy(update={"metrics": {}})
    y, probs = _run(50, 0.9, 50, 0.9, 0.779)
    c = check_performance(bare, y, probs)
    assert c["status"] == "no_card_figures" and c["specificity"]["value"] == pytest.approx(0.9)
    assert "no validation figures" in performance_line(c)


def test_history_rows_join_the_drift_table(card, tmp_path):
    """The estimate and the check become drift.parquet rows (nightly: ROOT/drift_history)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxr_ray.io import storage
    from cxr_ray.scoring.drift_io import DRIFT_TABLE_SCHEMA
    from cxr_ray.scoring.estimate import estimate_arrays
    from cxr_ray.scoring.performance import append_history_rows
    from cxr_ray.scoring.result import ScoreResult

    y, probs = _run(234, 0.825, 390, 0.96, 0.779)
    r = ScoreResult(str(tmp_path), "run-1", card.version, "onnxruntime", ok=len(y))
    r.performance_check = check_performance(card, y, probs)
    r.performance_estimate = estimate_arrays(probs, 0.779)
    storage.write_table(DRIFT_TABLE_SCHEMA.empty_table(), str(tmp_path / "drift.parquet"), DRIFT_TABLE_SCHEMA)
    append_history_rows(str(tmp_path), r)
    t = pq.read_table(tmp_path / "drift.parquet")
    assert t.schema.equals(DRIFT_TABLE_SCHEMA, check_metadata=False)
    rows = {(x["check"], x["statistic"]): x for x in t.to_pylist()}
    spec = rows[("performance_check", "specificity")]
    assert spec["alert"] and spec["value"] == pytest.approx(0.825, abs=0.002) and spec["run_id"] == "run-1"
    assert spec["n_images"] == len(y) and spec["n_used"] == 234
    assert spec["threshold"] == pytest.approx(0.9896, abs=1e-3) and spec["p_adjusted"] < 1e-6
    assert not rows[("performance_check", "sensitivity")]["alert"]
    est = rows[("performance_estimate", "specificity")]
    assert est["role"] == "info" and est["method"] == "cbpe" and not est["alert"]
    assert len(t) == 7 and isinstance(t, pa.Table)


def test_design_effect_of_clustered_images():
    from cxr_ray.scoring.performance import design_effect

    rng = np.random.default_rng(0)
    ok = rng.random(400) < 0.8
    everyone = np.ones(400, bool)
    # One image per patient: the binomial variance exactly.
    assert design_effect(ok, everyone, np.arange(400)) == pytest.approx(1.0, abs=1e-9)
    # Patients of 8 images, each all right or all wrong: the evidence of 50 images, not 400.
    whole = np.repeat(rng.random(50) < 0.8, 8)
    assert design_effect(whole, everyone, np.repeat(np.arange(50), 8)) == pytest.approx(8.0, rel=0.05)
    # A share of 0 or 1, one patient: nothing to inflate.
    assert design_effect(everyone, everyone, np.repeat(np.arange(50), 8)) == 1.0
    assert design_effect(ok, everyone, np.zeros(400)) == 1.0


def test_a_few_patients_with_many_images_are_weaker_evidence_than_as_many_patients(card):
    """The run's false positives all come from 4 patients of 12 images each: counted per
    image it is 48 of 240 normals; counted at the effective size over patients the
    interval widens and the p-value grows, and the block says by how much."""
    y, probs = _run(240, 0.8, 300, 0.95, 0.779)
    units = np.r_[np.repeat(np.arange(4), 12), 100 + np.arange(192), 1000 + np.arange(300)]
    naive = check_performance(card, y, probs)
    grouped = check_performance(card, y, probs, units=units)
    spec, spec_naive = grouped["specificity"], naive["specificity"]
    assert spec["value"] == spec_naive["value"] == 0.8 and spec["n"] == 240
    assert spec["design_effect"] > 5 and spec["n_effective"] < 240 / 5
    assert spec["low"] < spec_naive["low"] and spec["p_value"] > spec_naive["p_value"]
    assert "effective size over patients" in grouped["test"]
    # Every image its own patient: the same figures as without units.
    alone = check_performance(card, y, probs, units=np.arange(len(y)))
    assert alone["specificity"] == spec_naive | {"n_effective": 240.0, "design_effect": 1.0}
