"""The label-free performance estimate (cxr_ray.scoring.estimate)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cxr_ray import metrics
from cxr_ray.scoring import estimate as est

THRESHOLD = 0.6


def _calibrated(n: int, seed: int, normal_share: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels drawn from them: calibrated by construction."""
    rng = np.random.default_rng(seed)
    k = rng.random(n) < normal_share
    alpha = np.where(k[:, None], [4.0, 0.6, 0.6], [0.5, 2.0, 1.2])
    probs = np.array([rng.dirichlet(a) for a in alpha])
    y = np.array([rng.choice(3, p=p) for p in probs])
    return probs, y


def _truth(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    b = metrics.binary_metrics(y, probs, THRESHOLD)
    return {
        "sensitivity": b["sensitivity_at_threshold"],
        "specificity": b["specificity_at_threshold"],
        "accuracy": float(np.mean(probs.argmax(1) == y)),
    }


def test_cbpe_is_unbiased_and_covers_under_calibration():
    hits = {m: 0 for m in ("sensitivity", "specificity", "accuracy")}
    errors = []
    trials = 200
    for seed in range(trials):
        probs, y = _calibrated(300, seed)
        e = est.estimate_arrays(probs, THRESHOLD)
        t = _truth(y, probs)
        for m in hits:
            hits[m] += e[m]["low"] <= t[m] <= e[m]["high"]
        errors.append(e["specificity"]["estimate"] - t["specificity"])
    assert abs(np.mean(errors)) < 0.01  # unbiased
    assert all(h / trials >= 0.9 for h in hits.values()), hits


def test_cbpe_sums_block_by_block_equal_the_arrays(tiny_card):
    probs, _ = _calibrated(500, 1)
    acc = est.EstimateAccumulator(tiny_card)
    for i in range(0, 500, 128):
        acc.add(_block(probs[i : i + 128]))
    acc.add(_block(probs[:3], status="error"))  # not scored: not counted
    got = acc.finish()
    want = est.estimate_arrays(probs, tiny_card.pneumonia_threshold)
    for m in est.METRICS:
        assert got[m] == want[m]
    assert got["n_images"] == 500 and got["method"] == "cbpe"
    flags = (1 - probs[:, 0]) >= tiny_card.pneumonia_threshold
    assert got["flag_rate"]["estimate"] == pytest.approx(flags.mean(), abs=1e-4)


def test_too_few_images_is_unreliable():
    probs, _ = _calibrated(40, 2)
    e = est.estimate_arrays(probs, THRESHOLD)
    assert not e["reliable"] and "fewer than 100" in e["note"]
    assert "UNRELIABLE" in est.estimate_line(e)


def test_domain_auc_and_severe_shift():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(600, 8))
    same = rng.normal(size=(400, 8))
    far = rng.normal(size=(400, 8)) + 3.0
    assert est.domain_auc(ref, same) < 0.6
    assert est.domain_auc(ref, far) > 0.99
    probs, _y = _calibrated(400, 3)
    e = est.estimate_arrays(probs, THRESHOLD, run_z=far, ref_probs=probs[:0], ref_z=ref)
    assert not e["reliable"] and "severe feature shift" in e["note"]
    # The systematic allowance grows with the shift: a wider interval than with no shift.
    calm = est.estimate_arrays(probs, THRESHOLD, run_z=same, ref_z=ref)
    width = {k: v["specificity"]["high"] - v["specificity"]["low"] for k, v in (("far", e), ("calm", calm))}
    assert width["far"] > width["calm"] + 0.1


def test_atc_and_iw_recover_the_validation_figures_without_shift():
    probs, y = _calibrated(800, 4)
    t = est.AtcThresholds.fit(probs, y, THRESHOLD)
    a = est.atc(probs, THRESHOLD, t)
    truth = _truth(y, probs)
    for m in ("sensitivity", "specificity", "accuracy"):
        assert a[m][0] == pytest.approx(truth[m], abs=0.01)
    z = np.random.default_rng(5).normal(size=(800, 4))
    w = est.importance_weighted(probs, y, z, z[::-1], THRESHOLD)
    for m in ("sensitivity", "specificity", "accuracy"):
        assert w[m][0] == pytest.approx(truth[m], abs=0.03)


@pytest.fixture(scope="module")
def tiny_card(tmp_path_factory):
    from cxr_ray.models.artifact import read_card
    from tests.conftest import make_artifact

    return read_card(str(make_artifact(tmp_path_factory.mktemp("est") / "model", input_size=64)))


def _block(probs: np.ndarray, status: str = "ok") -> pa.Table:
    return pa.table(
        {
            "status": [status] * len(probs),
            "prob_normal": probs[:, 0].astype(np.float32),
            "prob_bacterial": probs[:, 1].astype(np.float32),
            "prob_viral": probs[:, 2].astype(np.float32),
        }
    )


def test_images_outside_the_reference_widen_the_interval_to_what_is_unknown():
    """A site where half the run lies beyond the reference and the model is confidently wrong
    there (normals called pneumonia): no label-free method sees the errors, so the interval
    must allow any behaviour on those images; a same-distribution run keeps its width."""
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(600, 8))
    probs, y = _calibrated(400, 8, normal_share=0.5)
    same = rng.normal(size=(400, 8))
    calm = est.estimate_arrays(probs, THRESHOLD, run_z=same, ref_z=ref)
    assert calm["outside_reference"] < 0.03
    plain = est.summary_block({"cbpe": est.cbpe(probs, THRESHOLD)}, "cbpe", n=400, auc=calm["domain_auc"])
    for m in ("sensitivity", "specificity", "accuracy"):
        assert calm[m]["high"] - calm[m]["low"] == pytest.approx(plain[m]["high"] - plain[m]["low"], abs=0.03)

    far = same.copy()
    shifted = np.arange(400) < 200
    far[shifted] += 3.0
    wrong = probs.copy()
    wrong[shifted & (y == 0)] = [0.02, 0.9, 0.08]  # shifted normals: confidently pneumonia
    truth = _truth(np.asarray(y), wrong)
    e = est.estimate_arrays(wrong, THRESHOLD, run_z=far, ref_z=ref)
    assert 0.4 < e["outside_reference"] <= 0.55
    for m in ("sensitivity", "specificity", "accuracy"):
        assert e[m]["low"] <= truth[m] <= e[m]["high"], (m, e[m], truth[m])
    # Without the widening the estimate (calibration assumed) misses the specificity.
    narrow = est.summary_block({"cbpe": est.cbpe(wrong, THRESHOLD)}, "cbpe", n=400, auc=e["domain_auc"])
    assert not narrow["specificity"]["low"] <= truth["specificity"] <= narrow["specificity"]["high"]
    assert "outside_reference" in e and not e["reliable"]


def test_under_severe_shift_sensitivity_and_specificity_can_be_anything():
    """A mostly-normal run shifted as a whole (domain AUC ~0.98, two thirds beyond the
    reference): its normals unsure and unflagged, its positives flagged. Label-free methods
    count the unsure normals as missed positives and under-estimate sensitivity (the truth is
    1.0); the share-based bound spread the outside images over the expected positives and its
    high end fell short (0.97), as at the 70%-normal constructed site. Which images are
    positives is unknown here, so the interval must allow any sensitivity and specificity."""
    rng = np.random.default_rng(11)
    ref = rng.normal(size=(600, 8))
    probs, y = _calibrated(400, 12, normal_share=0.7)
    z = rng.normal(size=(400, 8)) + 1.0
    seen = probs.copy()
    seen[y == 0] = [0.45, 0.35, 0.2]  # unsure, unflagged (P(pneumonia) 0.55)
    seen[y != 0] = [0.02, 0.68, 0.3]  # flagged
    truth = _truth(np.asarray(y), seen)
    e = est.estimate_arrays(seen, THRESHOLD, run_z=z, ref_z=ref)
    assert e["domain_auc"] >= est.SEVERE_DOMAIN_AUC and not e["reliable"]
    assert 0.5 < e["outside_reference"] < 0.9
    assert truth["sensitivity"] > e["sensitivity"]["estimate"] + 0.3  # the estimate is wrong
    for m in ("sensitivity", "specificity"):
        assert (e[m]["low"], e[m]["high"]) == (0.0, 1.0), (m, e[m])
        assert e[m]["low"] <= truth[m] <= e[m]["high"]
    assert e["accuracy"]["low"] <= truth["accuracy"] <= e["accuracy"]["high"]
    assert e["accuracy"]["high"] - e["accuracy"]["low"] < 1.0


def test_atc_intervals_cover_the_measured_value_on_subsets_of_its_own_validation_set():
    """Random 300-image subsets of the images ATC's thresholds were fitted on: the measured
    value moves with the subset's labels, which ATC's count variance does not describe. With
    the label noise added the 95% intervals hold it in >= 97% of 200 trials here (0.99-1.00;
    0.94-0.96 before; on the real validation images specificity 0.75 -> 1.00 in 20 trials)."""
    probs, y = _calibrated(745, 21, normal_share=0.26)
    rng = np.random.default_rng(22)
    hits = {m: 0 for m in ("sensitivity", "specificity", "accuracy")}
    trials = 200
    for _ in range(trials):
        idx = rng.choice(745, 300, replace=False)
        e = est.estimate_arrays(probs[idx], THRESHOLD, ref_probs=probs, ref_y=y)
        assert e["method"] == "atc"
        truth = _truth(y[idx], probs[idx])
        for m in hits:
            hits[m] += e[m]["low"] <= truth[m] <= e[m]["high"]
    assert all(h / trials >= 0.97 for h in hits.values()), hits
