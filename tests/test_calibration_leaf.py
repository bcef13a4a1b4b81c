"""``cxr_ray.calibration`` (scipy.special) against the hand-written implementations it replaced,
and ``cxr_ray.site.bootstrap.point_metrics`` against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from sklearn.metrics import accuracy_score, f1_score, log_loss, recall_score

from cxr_ray import calibration as cal
from cxr_ray.site.bootstrap import point_metrics


def _old_softmax(logits, temperature=1.0):  # the former cxr_ray.calibration.softmax
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _old_log_softmax(z):  # the former site-calibration _log_softmax
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _old_fit_temperature(logits, y):  # the former fit_temperature, its own log-softmax inside
    def nll(log_t):
        z = logits / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    return math.exp(minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded").x)


@pytest.mark.parametrize("magnitude", [0.1, 3.0, 50.0, 800.0])
def test_scipy_softmax_and_log_softmax_give_the_old_values(magnitude):
    from scipy.special import log_softmax

    rng = np.random.default_rng(int(magnitude * 10))
    z = rng.normal(0, magnitude, (500, 3))
    for t in (0.3, 1.0, 2.7):
        np.testing.assert_allclose(cal.softmax(z, t), _old_softmax(z, t), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(log_softmax(z, axis=1), _old_log_softmax(z), rtol=1e-12, atol=1e-12)
    assert np.isfinite(cal.softmax(z)).all()


def test_fit_temperature_and_threshold_give_the_old_values():
    rng = np.random.default_rng(0)
    for scale in (1.0, 8.0, 60.0):
        z = rng.normal(0, scale, (400, 3))
        y = rng.integers(0, 3, 400)
        z[np.arange(400), y] += scale
        assert cal.fit_temperature(z, y) == pytest.approx(_old_fit_temperature(z, y), rel=1e-6)
    p = cal.softmax(z)
    normal_p = 1 - p[:, 0]
    t = cal.threshold_for_sensitivity(p, y, 0.95)
    assert (normal_p[y != 0] >= t).mean() >= 0.95
    assert t == cal.threshold_keeping(p, y, math.ceil(0.95 * int((y != 0).sum())))


def test_point_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    z = rng.normal(0, 1, (300, 3))
    z[np.arange(300), y] += 1.5
    p = cal.softmax(z)
    m = point_metrics(y, p, 0.6)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert m["nll"] == pytest.approx(log_loss(y, p, labels=[0, 1, 2]))
    truth, flag = (y != 0).astype(int), (1 - p[:, 0] >= 0.6).astype(int)
    assert m["sensitivity"] == pytest.approx(recall_score(truth, flag, pos_label=1))
    assert m["specificity"] == pytest.approx(recall_score(truth, flag, pos_label=0))
