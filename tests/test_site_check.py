"""cxr-ray site-check (cxr_ray.site.check) and the scoring run's performance estimate and alert,
end to end on real images re-rendered as another site (skipped without ../shared/data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_ray.config import load_settings
from cxr_ray.data.site_shift import SiteShift, render_site

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def site_folder(kermany224, tmp_path_factory) -> Path:
    """40 normal and 20 pneumonia images of the real training folder, re-rendered as a site."""
    out = tmp_path_factory.mktemp("site") / "site"
    normals = sorted((kermany224 / "train" / "NORMAL").glob("*.jpeg"))[:40]
    pneumonias = sorted((kermany224 / "train" / "PNEUMONIA").glob("*.jpeg"))[:20]
    for i, p in enumerate(normals + pneumonias):
        target = out / p.parent.name / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(render_site(p.read_bytes(), seed=i, shift=SiteShift()))
    return out


@pytest.fixture(scope="module")
def promising_model(tmp_path_factory) -> Path:
    """An artifact whose card promises specificity 0.990 on 192 validation normals (the issue's
    card); its network (an untrained head) cannot keep that promise on any site."""
    from cxr_ray.models.artifact import read_card
    from tests.conftest import make_artifact

    path = make_artifact(tmp_path_factory.mktemp("promise") / "model", input_size=64, threshold=0.5)
    card = read_card(str(path))
    validation = {"accuracy": 0.834, "binary_sensitivity_at_threshold": 0.951,
                  "binary_specificity_at_threshold": 0.990}  # fmt: skip
    card = card.model_copy(
        update={"metrics": {"validation": validation,
                            "validation_confusion": [[190, 1, 1], [10, 290, 61], [9, 40, 143]]}}
    )  # fmt: skip
    (path / "model_card.json").write_text(card.to_json())
    return path


def test_site_check_alerts_estimates_and_recommends(site_folder, promising_model, ray_local, tmp_path):
    from cxr_ray.scoring.result import format_summary
    from cxr_ray.site.check import site_check

    settings = load_settings(None, {"score": {"cache_dir": str(tmp_path / "cache")}})
    out = tmp_path / "check"
    check = site_check(str(site_folder), str(promising_model), str(out), settings, sample=50, seed=1)
    assert (check.listed, check.sampled, check.result.ok) == (60, 50, 50)
    summary = json.loads((out / "summary.json").read_text())
    perf = summary["performance_check"]
    spec = perf["specificity"]
    # The constructed site's measured specificity is outside the card's interval ...
    assert spec["high"] < spec["card_low"]
    # ... and the run says so: summary.json, the console summary (at the flag threshold).
    assert perf["alert"] and "specificity" in perf["alerts"]
    text = format_summary(check.result)
    assert "PERFORMANCE ALERT (at the flag threshold 0.500): " in text
    est = summary["performance_estimate"]
    assert est["method"] == "cbpe" and est["n_images"] == 50  # no drift reference: CBPE
    assert not est["reliable"] and "fewer than 100" in est["note"]
    for m in ("sensitivity", "specificity", "accuracy", "flag_rate"):
        assert est[m]["low"] <= est[m]["estimate"] <= est[m]["high"]
    assert "estimated performance (no labels, cbpe" in text
    assert check.recommendation == "calibrate" and check.label_studies and check.label_studies >= 93
    assert check.line().startswith(f"recommendation: calibrate: label >= {check.label_studies} studies")
    assert check.report is not None and "worklist at" in check.line()
    page = Path(check.report).read_text()
    assert 'id="performance-check"' in page and "PERFORMANCE ALERT" in page  # the banner
    assert 'id="performance-estimate"' in page


# -- the worklist's random sample, by strata of P(pneumonia) ---------------------------------


def _predictions(scores, flagged):
    import pyarrow as pa

    n = len(scores)
    return pa.table(
        {
            "status": ["ok"] * n,
            "image_id": [f"{i:064x}" for i in range(n)],
            "uri": [None] * n,
            "model_version": ["m"] * n,
            "pred_label": ["normal"] * n,
            "prob_normal": [1 - s for s in scores],
            "prob_bacterial": [s / 2 for s in scores],
            "prob_viral": [s / 2 for s in scores],
            "prob_pneumonia": list(scores),
            "flagged": list(flagged),
        }
    )


def test_worklist_sample_is_drawn_by_score_strata_in_proportion():
    import numpy as np

    from cxr_ray.reporting.review import stratified_sample, worklist

    rng = np.random.default_rng(3)
    # 1,000 unflagged studies, most of them confident normals, a tail just below the threshold
    # 0.9, and 50 flagged ones above it.
    unflagged = np.concatenate([rng.uniform(0, 0.05, 800), rng.uniform(0.3, 0.9, 200)])
    scores = np.concatenate([unflagged, rng.uniform(0.9, 1.0, 50)])
    quartile = np.searchsorted(np.sort(unflagged)[[250, 500, 750]], unflagged, side="right")
    for seed in range(30):
        picked = stratified_sample(unflagged, 40, seed=seed)
        assert len(set(picked)) == 40
        # Proportional allocation: each quarter of the score range exactly its share (a simple
        # random sample of 40 gets 10 +- 2.7 per quarter).
        assert np.bincount(quartile[picked], minlength=4).tolist() == [10, 10, 10, 10], seed
    assert stratified_sample(unflagged, 0).size == 0 and len(stratified_sample(unflagged[:3], 10)) == 3
    # Uneven strata sizes: systematic rounding, total exact, inclusion n / N for every item.
    hits = np.zeros(7)
    for seed in range(2000):
        hits[stratified_sample(np.arange(7.0), 3, seed=seed)] += 1
    assert np.allclose(hits / 2000, 3 / 7, atol=0.05), hits / 2000
    # The worklist: every flagged study, and 40 unflagged ones drawn by strata; the band just
    # below the threshold (the top quarter of the unflagged scores) has its 10.
    work = worklist(None, _predictions(scores, scores >= 0.9), sample=40, limit=300, seed=1)
    random_scores = np.array([i.prob_pneumonia for i in work.items if i.selection == "random"])
    assert sum(i.selection == "flagged" for i in work.items) == 50 and len(random_scores) == 40
    top = np.sort(unflagged)[750]
    assert int(np.sum(random_scores >= top - 1e-6)) == 10
