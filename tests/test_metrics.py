"""Metrics: hand-computed cases and agreement with scikit-learn."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from cxr_ray.calibration import fit_temperature, threshold_for_sensitivity
from cxr_ray.metrics import (
    binary_metrics,
    classification_metrics,
    confusion_table,
    expected_calibration_error,
    metrics_table,
)


def onehot(pred, k=3, p=0.9):
    out = np.full((len(pred), k), (1 - p) / (k - 1))
    out[np.arange(len(pred)), pred] = p
    return out


def test_hand_computed_case():
    # truth:  n n n b b v ; pred: n n b b v v
    y = np.array([0, 0, 0, 1, 1, 2])
    m = classification_metrics(y, onehot([0, 0, 1, 1, 2, 2]))
    assert m.confusion == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.per_class["normal"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3.0, "auroc": 5 / 6}
    )
    assert m.per_class["bacterial"]["precision"] == pytest.approx(0.5)
    assert m.per_class["viral"]["f1"] == pytest.approx(2 / 3)
    assert m.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # Binary: pneumonia = b or v; predicted pneumonia for rows 2..5.
    assert m.binary["sensitivity"] == pytest.approx(1.0)
    assert m.binary["specificity"] == pytest.approx(2 / 3)


def test_agrees_with_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    logits = rng.normal(size=(500, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, p, threshold=0.4)
    pred = p.argmax(1)
    assert m.accuracy == pytest.approx(skm.accuracy_score(y, pred))
    assert m.macro_f1 == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m.weighted_f1 == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m.confusion == skm.confusion_matrix(y, pred).tolist()
    assert m.macro_auroc == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    for i, label in enumerate(("normal", "bacterial", "viral")):
        assert m.per_class[label]["recall"] == pytest.approx(skm.recall_score(y == i, pred == i))
    assert m.binary["auroc"] == pytest.approx(skm.roc_auc_score(y > 0, 1 - p[:, 0]))
    flag = (1 - p[:, 0]) >= 0.4
    assert m.binary["sensitivity_at_threshold"] == pytest.approx(skm.recall_score(y > 0, flag))


def test_missing_class_gives_nan_not_an_exception():
    m = classification_metrics(np.array([1, 1, 2]), onehot([1, 2, 2]))
    assert math.isnan(m.per_class["normal"]["auroc"])
    assert m.per_class["normal"]["recall"] == 0.0
    assert math.isnan(m.binary["specificity"])
    empty = classification_metrics(np.zeros(0, int), np.zeros((0, 3)))
    assert empty.n == 0 and math.isnan(empty.accuracy)
    with pytest.raises(ValueError):
        classification_metrics(np.array([0]), np.zeros((1, 2)))


def test_tables_have_explicit_schemas():
    m = classification_metrics(np.array([0, 1, 2, 2]), onehot([0, 1, 2, 1]))
    t = metrics_table(m, run_id="r", model_version="v")
    assert {"metric", "label", "value", "n"} <= set(t.column_names)
    rows = {(r["metric"], r["label"]): r["value"] for r in t.to_pylist()}
    assert rows[("recall", "viral")] == 0.5 and rows[("accuracy", None)] == 0.75
    c = confusion_table(m).to_pylist()
    assert len(c) == 9 and sum(r["count"] for r in c) == 4


def sm(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_ece_and_temperature_scaling():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 2000)
    logits = rng.normal(size=(2000, 3)) + 2.0 * np.eye(3)[y]
    # For unit-variance classes 2 apart, softmax(2 * logits) is the true posterior, so
    # 4 * logits is twice too sharp and the fitted temperature must be about 2.
    overconfident = logits * 4
    before = expected_calibration_error(sm(overconfident), y)
    t = fit_temperature(overconfident, y)
    after = expected_calibration_error(sm(overconfident / t), y)
    assert 1.8 < t < 2.2
    assert after < before / 2


def test_threshold_for_target_sensitivity():
    y = np.array([0] * 50 + [1] * 50 + [2] * 50)
    p_pneu = np.concatenate([np.linspace(0, 0.6, 50), np.linspace(0.3, 1, 100)])
    probs = np.stack([1 - p_pneu, p_pneu / 2, p_pneu / 2], 1)
    t = threshold_for_sensitivity(probs, y, 0.95)
    b = binary_metrics(y, probs, t)
    assert b["sensitivity_at_threshold"] >= 0.95
    # The most specific operating point: it flags exactly what the k-th largest positive
    # score would, and any threshold above that score drops sensitivity below the target.
    score = 1.0 - probs[:, 0]  # P(pneumonia) as the metrics compute it
    kth = np.sort(score[y != 0])[::-1][int(np.ceil(0.95 * 100)) - 1]
    assert t <= kth
    assert b == {**binary_metrics(y, probs, kth), "threshold": t}
    assert binary_metrics(y, probs, kth + 1e-9)["sensitivity_at_threshold"] < 0.95
    # With a margin: the same images are flagged when an engine's float32 arithmetic moves
    # every score down by a rounding error (a threshold equal to the k-th score would not be).
    nudged = probs.copy()
    nudged[:, 0] += 1e-7
    bn = binary_metrics(y, nudged, t)
    assert bn["sensitivity_at_threshold"] == b["sensitivity_at_threshold"]
    assert bn["specificity_at_threshold"] == b["specificity_at_threshold"]
