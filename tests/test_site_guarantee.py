"""The sensitivity guarantee of ``cxr-ray calibrate`` (``cxr_ray.site.guarantee``), on arrays."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from cxr_ray import calibration as cal
from cxr_ray.site import guarantee
from cxr_ray.site.estimates import fit_site


def test_lower_bound_is_the_exact_one_sided_clopper_pearson_bound():
    for n in (1, 7, 40, 95, 300):
        for x in sorted({0, 1, n // 2, n - 1, n}):
            ref = binomtest(x, n, alternative="greater").proportion_ci(0.95, method="exact").low
            assert guarantee.sensitivity_lower_bound(x, n) == pytest.approx(ref, abs=1e-9), (x, n)
    assert guarantee.sensitivity_lower_bound(40, 40) == pytest.approx(0.05 ** (1 / 40))


def test_positives_needed_and_allowed_misses():
    assert guarantee.positives_for(0.95) == 59  # 0.05 ** (1 / 59) >= 0.95 > 0.05 ** (1 / 58)
    assert guarantee.sensitivity_lower_bound(58, 58) < 0.95 <= guarantee.sensitivity_lower_bound(59, 59)
    assert guarantee.allowed_misses(58, 0.95) is None and guarantee.allowed_misses(59, 0.95) == 0
    m = guarantee.allowed_misses(200, 0.95)
    assert (
        guarantee.sensitivity_lower_bound(200 - m, 200)
        >= 0.95
        > guarantee.sensitivity_lower_bound(199 - m, 200)
    )
    n = guarantee.positives_for(0.95, miss_rate=0.02)
    assert n is not None and guarantee.sensitivity_lower_bound(n - np.ceil(0.02 * n), n) >= 0.95
    assert guarantee.positives_for(0.95, miss_rate=0.05) is None  # never at the target's own miss rate


def _population(n: int, seed: int):
    """A site's raw logits, shifted from the parent's calibration (pneumonia under-called)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, n, p=[0.26, 0.48, 0.26])
    z = rng.normal(0, 1.3, (n, 3))
    z[np.arange(n), y] += 2.2
    z[:, 0] += 0.8  # the site's images look more "normal" to the network
    return z, y


@pytest.fixture(scope="module")
def card(tiny_artifact):
    from cxr_ray.models.artifact import load_artifact

    c = load_artifact(str(tiny_artifact)).card
    return c.model_copy(
        update={"temperature": 1.0, "logit_scale": (1.0, 1.0, 1.0), "logit_bias": (0.0, 0.0, 0.0),
                "thresholds": {**c.thresholds, "pneumonia": 0.5}}
    )  # fmt: skip


def test_calibrated_threshold_keeps_the_target_on_new_images_in_95_percent_of_samples(card):
    """>= 200 site samples of 128 images (~95 positives) from one population: the threshold
    ``fit_site`` picks (bias scaling, cross-fitted guarantee) reaches 0.95 sensitivity on the
    population in >= 95% of them; the former margin rule did not."""
    pop_z, pop_y = _population(200_000, 0)
    pos = pop_y != 0
    rng = np.random.default_rng(1)
    met, old_met, specificity = 0, 0, []
    trials = 240
    for _ in range(trials):
        idx = rng.choice(len(pop_y), 128, replace=False)
        r = fit_site(pop_z[idx], pop_y[idx], card, n_boot=0, seed=int(rng.integers(1 << 30)))
        assert r.guarantee.met and r.guarantee.lower_bound >= 0.95
        p = 1 - r.fit.probs(pop_z)[:, 0]
        met += (p[pos] >= r.fit.threshold).mean() >= 0.95
        specificity.append((p[~pos] < r.fit.threshold).mean())
        sample_p = r.fit.probs(pop_z[idx])
        npos = int((pop_y[idx] != 0).sum())
        old = cal.threshold_for_sensitivity(sample_p, pop_y[idx], 0.95 + (0.95 * 0.05 / npos) ** 0.5)
        old_met += (p[pos] >= old).mean() >= 0.95
    assert met >= 0.95 * trials, (met, old_met)
    assert old_met < met
    assert np.mean(specificity) > 0.3  # still a screening threshold, not "flag everything"


def test_too_few_positives_keep_the_parents_threshold_and_say_how_many_more(card):
    from cxr_ray.reporting.site_report import guarantee_line

    z, y = _population(80, 3)
    y[:40] = 0  # 40 normal, 40 pneumonia images: even 40/40 bounds sensitivity at 0.928 < 0.95
    y[40:] = np.where(y[40:] == 0, 1, y[40:])
    r = fit_site(z, y, card, n_boot=0)
    g = r.guarantee
    assert not g.met and g.threshold is None and g.positives == 40
    assert g.more_positives_needed == 59 - 40
    flagged = int(((1 - card.probabilities(z)[:, 0])[y != 0] >= card.pneumonia_threshold).sum())
    assert g.flagged == flagged and g.lower_bound == pytest.approx(
        guarantee.sensitivity_lower_bound(flagged, 40)
    )
    line = guarantee_line(g.as_dict())
    assert "SENSITIVITY NOT GUARANTEED" in line and "at least 19 more" in line
    assert "parent's calibration and threshold are kept" in line
