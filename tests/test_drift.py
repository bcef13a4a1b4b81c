"""Drift: the reference stored in the artifact, and the check every scoring run makes (real images).

The artifact is a MobileNetV2 with its ImageNet backbone (when the weights are on this machine)
and a random head, at 64 px to keep the default tier fast; its ``split.parquet`` names 150 real
Kermany images of one set of patients as validation. "Other" images are of other patients;
"shifted" ones are those re-rendered as another site would (``render_site``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import scipy.stats
from click.testing import CliRunner

from cxr_ray.cli import main
from cxr_ray.config import DriftSettings, load_settings
from cxr_ray.data.site_shift import render_site
from cxr_ray.errors import ModelError
from cxr_ray.imaging.preprocess import decode
from cxr_ray.imaging.stats import INPUT_STATS, input_stats
from cxr_ray.io import storage
from cxr_ray.labels import LABELS, NORMAL, parse_kermany_path
from cxr_ray.models.artifact import load_artifact, save_artifact
from cxr_ray.models.card import spec_for
from cxr_ray.models.outputs import network_outputs
from cxr_ray.models.reference import build_reference, read_reference, reference_from_arrays
from cxr_ray.reporting.drift_section import drift_section
from cxr_ray.scoring.drift import DRIFT_SCHEMA, DriftAccumulator
from cxr_ray.scoring.pipeline import score
from cxr_ray.scoring.result import format_summary
from tests.conftest import make_artifact

N_VAL, N_OTHER = 150, 120


@pytest.fixture(scope="module")
def images(kermany224) -> dict[str, list[Path]]:
    """Real images of two disjoint sets of patients (``val``: 150, ``other``: 120)."""
    by_patient: dict[str, list[Path]] = defaultdict(list)
    for f in sorted((kermany224 / "train").glob("*/*.jpeg")):
        by_patient[parse_kermany_path(str(f)).patient_id or f.name].append(f)
    patients = sorted(by_patient)
    np.random.default_rng(0).shuffle(patients)
    out: dict[str, list[Path]] = {"val": [], "other": []}
    for p in patients:
        key = "val" if len(out["val"]) < N_VAL else "other"
        if key == "other" and len(out["other"]) >= N_OTHER:
            break
        out[key] += by_patient[p]
    out["val"], out["other"] = out["val"][:N_VAL], out["other"][:N_OTHER]
    return out


def _folder(root: Path, files: list[Path], *, shift: bool = False) -> Path:
    """The files in the Kermany layout (labels in names); ``shift``: re-rendered copies."""
    for i, f in enumerate(files):
        dest = root / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if shift:
            dest.write_bytes(render_site(f.read_bytes(), seed=i))
        else:
            shutil.copyfile(f, dest)
    return root


@pytest.fixture(scope="module")
def folders(images, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drift-images")
    return {
        "val": _folder(root / "val", images["val"]),
        "other": _folder(root / "other", images["other"]),
        "shifted": _folder(root / "shifted", images["other"], shift=True),
    }


def _split_table(files: list[Path]) -> pa.Table:
    return pa.table(
        {
            "uri": [str(f) for f in files],
            "label": [parse_kermany_path(str(f)).label for f in files],
            "patient_id": [parse_kermany_path(str(f)).patient_id for f in files],
            "split": ["val"] * len(files),
        }
    )


@pytest.fixture(scope="module")
def artifact(images, tmp_path_factory) -> Path:
    """A 64 px artifact whose split.parquet lists the ``val`` images, with its drift reference."""
    path = make_artifact(tmp_path_factory.mktemp("drift-artifact") / "model", input_size=64)
    storage.write_table(_split_table(images["val"]), str(path / "split.parquet"))
    art = load_artifact(str(path))
    save_artifact(art.weights, art.card, str(path), reference=build_reference(art))
    return path


def _predictor_block(art, folder: Path | list[Path]) -> pa.Table:
    """What the scoring predictor outputs for ``folder`` (or these files): ok rows with
    probabilities, predicted class, and the internal ``input_stats`` / ``features`` columns,
    built without Ray."""
    spec = spec_for(art.card)
    files = sorted(folder.glob("*/*.jpeg")) if isinstance(folder, Path) else folder
    decoded = [decode(f.read_bytes(), spec, f.name) for f in files]
    px = np.stack([d.pixels for d in decoded])
    stats = input_stats(px, np.array([d.width for d in decoded]), np.array([d.height for d in decoded]))
    logits, feats = network_outputs(art, px)
    probs = art.card.probabilities(logits)
    return pa.table(
        {
            "status": ["ok"] * len(files),
            **{f"prob_{k}": probs[:, i].astype(np.float32) for i, k in enumerate(LABELS)},
            "prob_pneumonia": (1 - probs[:, LABELS.index(NORMAL)]).astype(np.float32),
            "pred_label": [LABELS[i] for i in probs.argmax(1)],
            "input_stats": pa.FixedShapeTensorArray.from_numpy_ndarray(stats.astype(np.float32)),
            "features": pa.FixedShapeTensorArray.from_numpy_ndarray(feats.astype(np.float32)),
        }
    )


def _check(art, block: pa.Table, settings: DriftSettings | None = None):
    acc = DriftAccumulator(read_reference(art.reference), art.card, settings or DriftSettings())
    for i in range(0, block.num_rows, 40):  # block by block, as the driver sees them
        acc.add(block.slice(i, 40))
    return acc.figures()


def _figure(figures, check: str, statistic: str) -> float:
    return next(r["value"] for r in figures.rows if r["check"] == check and r["statistic"] == statistic)


# -- the reference --------------------------------------------------------------------------


def test_reference_round_trips_through_the_artifact_and_a_tampered_one_is_refused(artifact, tmp_path):
    art = load_artifact(str(artifact))
    assert art.card.drift_reference_file == "drift_reference.safetensors"
    ref = read_reference(art.reference)
    assert ref.n == N_VAL and ref.logits.shape == (N_VAL, 3)
    assert ref.input_stats.shape == (N_VAL, len(INPUT_STATS))
    assert ref.meta["modality_mix"] is None  # JPEG validation images carry no DICOM tags
    k, f = ref.pca_components.shape
    assert k == 16 and f == ref.feature_mean.shape[0] == 1280
    assert np.allclose(ref.pca_components @ ref.pca_components.T, np.eye(k), atol=1e-4)
    # The stored projections are the reference's own features in its basis.
    assert np.allclose(ref.pca_scores.std(0), ref.pca_std, rtol=1e-3)
    # Recomputed under the card's calibration, not frozen at build time.
    hotter = art.card.model_copy(update={"temperature": 5.0})
    assert not np.allclose(ref.p_pneumonia(hotter), ref.p_pneumonia(art.card))
    assert (art.uri, art.reference) == (
        str(artifact),
        (artifact / "drift_reference.safetensors").read_bytes(),
    )

    bad = tmp_path / "tampered"
    shutil.copytree(artifact, bad)
    blob = bytearray((bad / "drift_reference.safetensors").read_bytes())
    blob[-10] ^= 0xFF
    (bad / "drift_reference.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ModelError, match=r"drift reference .* does not match the model card"):
        load_artifact(str(bad))
    with pytest.raises(ModelError, match="not a safetensors file"):
        read_reference(b"junk")


# -- the check, on what the predictor outputs -----------------------------------------------


def test_check_on_real_images(artifact, folders):
    """Own validation images: every figure ~0; other patients: no alert; re-rendered: inputs
    and features alert."""
    art = load_artifact(str(artifact))
    own = _check(art, _predictor_block(art, folders["val"]))
    assert not own.alert and own.n_images == N_VAL
    assert _figure(own, "p_pneumonia", "ks") < 0.02
    assert _figure(own, "features", "pca_mean_shift") < 0.01
    assert _figure(own, "input:intensity_mean", "mean_shift") < 1e-4

    other = _check(art, _predictor_block(art, folders["other"]))
    assert not other.alert, other.alerts()
    assert other.n_images == N_OTHER

    shifted_block = _predictor_block(art, folders["shifted"])
    shifted = _check(art, shifted_block)
    assert shifted.alert
    alerts = shifted.alerts()
    assert any(a.startswith("inputs ") for a in alerts), alerts
    assert any(a.startswith("features") for a in alerts), alerts
    # Below min_images nothing alerts, the figures are still there.
    few = _check(art, shifted_block, DriftSettings(min_images=N_OTHER + 1))
    assert not few.alert and _figure(few, "features", "pca_mean_shift") == _figure(
        shifted, "features", "pca_mean_shift"
    )


def test_accumulator_memory_is_bounded():
    rng = np.random.default_rng(0)
    n_ref, f = 300, 32
    ref = read_reference(
        reference_from_arrays(
            _card(),
            rng.normal(size=(n_ref, 3)),
            rng.normal(100, 10, size=(n_ref, len(INPUT_STATS))),
            rng.normal(size=(n_ref, f)),
            components=8,
        )
    )
    settings = DriftSettings(reservoir_size=200, unit_sample_size=1000)
    acc = DriftAccumulator(ref, _card(), settings)
    before = None
    for b in range(60):  # 60 blocks of 500 rows
        if b == 10:
            before = acc.nbytes()  # the unit sample is full (1,000 of 4,990 units)
        stats = rng.normal(100, 10, size=(500, len(INPUT_STATS)))
        stats[:, 0] = b * 500 + np.arange(500)  # a row counter, to check the reservoir is uniform
        acc.add(
            pa.table(
                {
                    "status": ["ok"] * 499 + ["error"],
                    "prob_pneumonia": rng.uniform(size=500).astype(np.float32),
                    "pred_label": rng.choice(LABELS, size=500).tolist(),
                    "input_stats": pa.FixedShapeTensorArray.from_numpy_ndarray(stats.astype(np.float32)),
                    "features": pa.FixedShapeTensorArray.from_numpy_ndarray(
                        rng.normal(size=(500, f)).astype(np.float32)
                    ),
                }
            )
        )
    assert acc.n == 29_940
    assert acc.nbytes() == before  # nothing grew with the rows
    sample = acc.reservoir()
    assert sample["input_stats"].shape == (200, len(INPUT_STATS)) and sample["pca"].shape == (200, 8)
    assert sample["prob_pneumonia"].shape == (200,) and sample["probabilities"].shape == (200, 3)
    # The tests' unit sample (one unit per image here) is uniform over the run too.
    sums, counts, _, _ = acc.unit_groups("inputs")
    units = sums[:, 0] / counts  # intensity_p05, the row counter here: one image per unit
    assert len(units) == 1000 and acc.units.sampled and (counts == 1).all()
    assert scipy.stats.kstest(units, "uniform", args=(0, 30_000)).pvalue > 0.01
    kept = sample["input_stats"][:, 0]
    # Drawn uniformly from the whole run (29,940 ok rows), not its first rows: a uniform
    # sample of 200 has its median within ~2,100 of the middle (3 standard errors).
    assert 12_800 < np.median(kept) < 17_200
    assert scipy.stats.kstest(kept, "uniform", args=(0, 30_000)).pvalue > 0.01
    figures = acc.figures()
    assert {r["n_images"] for r in figures.rows} == {29_940}
    assert figures.table(run_id="r", model_version="m").schema == DRIFT_SCHEMA


def _card():
    from cxr_ray.models.card import ModelCard

    return ModelCard(
        arch="mobilenet_v2", mean=(0.5,) * 3, std=(0.2,) * 3, target_layer="x", weights_sha256="0" * 64
    )


# -- every scoring run ----------------------------------------------------------------------


def _settings(tmp_path: Path):
    return load_settings(None, {"score": {"cache_dir": str(tmp_path / "cache")}})


def test_scoring_shifted_images_alerts(ray_local, artifact, folders, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="cxr_ray.scoring.pipeline"):
        r = score(str(folders["shifted"]), str(artifact), str(out), _settings(tmp_path))
    assert r.images == r.ok == N_OTHER
    assert r.drift["status"] == "checked" and r.drift["alert"] is True
    drift = storage.read_table(str(out / "drift.parquet"))
    assert drift.schema == DRIFT_SCHEMA
    rows = drift.to_pylist()
    assert {x["run_id"] for x in rows} == {r.run_id} and {x["n_images"] for x in rows} == {N_OTHER}
    alerting = {x["check"] for x in rows if x["alert"]}
    assert "inputs" in alerting and "features" in alerting, alerting
    summary = json.loads((out / "summary.json").read_text())
    assert summary["drift"]["alert"] is True and summary["drift"]["alerts"]
    text = format_summary(r)
    assert sum("DRIFT ALERT" in line for line in text.splitlines()) == 1
    warnings = [rec for rec in caplog.records if "DRIFT ALERT" in rec.getMessage()]
    assert len(warnings) == 1
    section = drift_section(str(out))
    assert "DRIFT ALERT" in section and section.count("data:image/png;base64,") == 3
    assert "http" not in section  # self-contained


@pytest.mark.slow
def test_scoring_own_validation_images_does_not_alert(ray_local, artifact, folders, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="cxr_ray.scoring.pipeline"):
        r = score(str(folders["val"]), str(artifact), str(out), _settings(tmp_path))
    assert r.ok == N_VAL
    assert r.drift["status"] == "checked" and r.drift["alert"] is False, r.drift
    # The engine (onnxruntime) and the reference (torch) see the same inputs and features.
    assert r.drift["feature_pca_mean_shift"] < 0.01 and r.drift["input_max_mean_shift"] < 1e-3
    # The tests counted patients (from the file names; the reference's from split.parquet).
    patients = len({parse_kermany_path(str(f)).patient_id for f in folders["val"].glob("*/*.jpeg")})
    assert patients < N_VAL
    assert r.drift["units"] == {
        "run": patients,
        "run_sampled": False,
        "reference": patients,
        "reference_grouped": True,
    }
    assert (
        f"{N_VAL} images ({patients} patients/studies) vs {N_VAL} validation images ({patients} patients)"
        in (format_summary(r))
    )
    assert not any("DRIFT" in rec.getMessage() for rec in caplog.records)
    assert "drift: no alert" in format_summary(r)
    assert "No drift alert" in drift_section(str(out))


@pytest.mark.slow
def test_scoring_other_patients_does_not_alert(ray_local, artifact, folders, tmp_path):
    r = score(str(folders["other"]), str(artifact), str(tmp_path / "out"), _settings(tmp_path))
    assert r.ok == N_OTHER and r.drift["alert"] is False, r.drift


def test_an_artifact_without_reference_scores_and_says_so(ray_local, tiny_artifact, images, tmp_path):
    folder = _folder(tmp_path / "in", images["val"][:12])
    out = tmp_path / "out"
    r = score(str(folder), str(tiny_artifact), str(out), _settings(tmp_path))
    assert r.ok == 12
    assert r.drift == {"status": "no_reference", "alert": False}
    assert not (out / "drift.parquet").exists()
    assert "drift: no reference in this artifact" in format_summary(r).splitlines()
    assert drift_section(str(out)) == ""


def test_drift_reference_command_adds_a_reference_to_a_copy(images, tmp_path):
    old = make_artifact(tmp_path / "old", input_size=64)
    storage.write_table(_split_table(images["val"][:40]), str(old / "split.parquet"))
    assert load_artifact(str(old)).reference is None
    res = CliRunner().invoke(main, ["drift-reference", "--model", str(old), "--out", str(tmp_path / "new")])
    assert res.exit_code == 0, res.output
    assert "from 40 validation images" in res.output
    new = load_artifact(str(tmp_path / "new"))
    assert read_reference(new.reference).n == 40
    assert new.card.version == load_artifact(str(old)).card.version
    assert (tmp_path / "new" / "split.parquet").exists()
    assert load_artifact(str(old)).reference is None  # the original is untouched


def test_nightly_appends_the_drift_rows_to_the_history(ray_local, artifact, images, tmp_path):
    from cxr_ray.io import tables
    from cxr_ray.scoring.nightly import DRIFT_HISTORY, format_nightly, run_nightly

    folder = _folder(tmp_path / "in", images["val"][:12])
    r = run_nightly(str(folder), str(artifact), str(tmp_path / "root"), _settings(tmp_path))
    assert r.score is not None and r.score.ok == 12
    hist = tables.read(tables.open_table(str(tmp_path / "root" / DRIFT_HISTORY)))
    assert hist.num_rows > 0 and set(hist["run_id"].to_pylist()) == {r.run_id}
    # 12 images: the figures are recorded, below min_images nothing alerts.
    assert not any(hist["alert"].to_pylist()) and set(hist["n_images"].to_pylist()) == {12}
    # The tests are cluster-robust over patients (the Kermany names carry the patient).
    assert re.search(
        r"drift: no alert \(12 images( \(\d+ patients/studies\))? vs 150 validation images", format_nightly(r)
    ), format_nightly(r)


# -- the statistics: scipy against the implementations it replaced, Holm by hand ----------


def _old_ks(a, b):  # cxr_ray.scoring.drift._ks before scipy (kept here as the reference)
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def _old_wasserstein(a, b):  # cxr_ray.scoring.drift._wasserstein before scipy
    a, b = np.sort(a), np.sort(b)
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(a, grid[:-1], side="right") / len(a)
    fb = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(fa - fb) * np.diff(grid)))


def _old_mean_dist(x, y, chunk=512):  # cxr_ray.scoring.drift._mean_dist before scipy
    total = 0.0
    for i in range(0, len(x), chunk):
        d = x[i : i + chunk, None, :] - y[None, :, :]
        total += float(np.sqrt((d * d).sum(-1)).sum())
    return total / (len(x) * len(y))


def test_scipy_statistics_equal_the_implementations_they_replaced():
    from cxr_ray.scoring import drift_stats as ds

    rng = np.random.default_rng(3)
    for n, m in [(7, 11), (300, 745), (2000, 150)]:
        a = rng.normal(size=n)
        b = rng.normal(0.3, 1.2, size=m)
        b[:5] = a[:5]  # ties across the samples
        assert ds.ks_values(a, b)[0] == pytest.approx(_old_ks(a, b), abs=1e-12)
        assert ds.wasserstein(a, b) == pytest.approx(_old_wasserstein(a, b), rel=1e-9)
        x, y = rng.normal(size=(n, 16)), rng.normal(0.5, 1, size=(m, 16))
        assert ds._mean_dist(x, y) == pytest.approx(_old_mean_dist(x, y), rel=1e-9)
        old_energy = (
            2 * _old_mean_dist(x, y) - _old_mean_dist(x, x) * n / (n - 1) - _old_mean_dist(y, y) * m / (m - 1)
        ) / (2 * _old_mean_dist(x, y))
        assert ds.energy_coefficient(x, y) == pytest.approx(max(0.0, old_energy), rel=1e-9)
    # The binned KS: the gap at bin edges, never above the exact one, p-value then conservative.
    a, b = rng.normal(size=900), rng.normal(0.1, 1, size=745)
    edges = np.linspace(-6, 6, 1201)
    d_bin, p_bin, _ = ds.ks_binned(np.histogram(a, edges)[0], np.histogram(b, edges)[0])
    d, p, _ = ds.ks_values(a, b)
    assert d - 0.01 < d_bin <= d and p_bin >= p * 0.9


def test_holm_step_down_by_hand():
    from cxr_ray.scoring.drift_stats import holm

    # Sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> running max 0.06.
    adj = holm([0.01, 0.04, 0.03, 0.005, np.nan])
    assert np.allclose(adj[:4], [0.03, 0.06, 0.06, 0.02]) and np.isnan(adj[4])
    assert list(adj[:4] <= 0.05) == [True, False, False, True]  # Bonferroni (x4) keeps only 0.005
    assert np.allclose(holm([0.2, 0.9]), [0.4, 0.9]) and np.allclose(holm([0.5, 0.9]), [1.0, 1.0])


def test_weighted_holm_by_hand_and_its_family_wise_rate():
    from cxr_ray.scoring.drift_stats import holm

    # Weights 0.5 / 0.25 / 0.25 (renormalised over the tests that ran; the NaN drops out).
    # Sorted by p / w: 0.004 (x 1 / 0.5 = 0.008), 0.04 (x 0.5 / 0.25 = 0.08), 0.2 (x 1) -> 0.2.
    adj = holm([0.004, 0.04, np.nan, 0.2], [0.5, 0.25, 0.1, 0.25])
    assert np.allclose(adj[[0, 1, 3]], [0.008, 0.08, 0.2]) and np.isnan(adj[2])
    assert np.allclose(holm([0.01, 0.04, 0.03, 0.005], [1, 1, 1, 1]), holm([0.01, 0.04, 0.03, 0.005]))
    with pytest.raises(ValueError):
        holm([0.1, 0.2], [1.0, 0.0])
    # Under the global null (independent uniform p-values) any rejection at alpha is rare.
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(20_000, 4))
    w = [0.5, 1 / 6, 1 / 6, 1 / 6]
    rate = np.mean([(holm(row, w) <= 0.05).any() for row in p])
    assert 0.04 < rate <= 0.055, rate  # ~alpha, not more


def test_cluster_wald_matches_a_direct_computation():
    from cxr_ray.scoring.drift_stats import cluster_wald

    rng = np.random.default_rng(4)
    # One image per cluster: the unpooled two-sample statistic d' (S1/n + S2/m)^-1 d.
    x, y = rng.normal(size=(120, 5)), rng.normal(0.2, 1, size=(300, 5))
    t2, p, dims = cluster_wald(x, np.ones(120), y, np.ones(300))
    d = x.mean(0) - y.mean(0)
    v = np.cov(x, rowvar=False) / 120 + np.cov(y, rowvar=False) / 300
    assert dims == 5 and t2 == pytest.approx(d @ np.linalg.solve(v, d), rel=1e-9)
    assert 0 <= p < 0.02  # a real shift of 0.2 std in 5 dims (chi-squared, 5 df: p ~0.004)
    # Clusters: the sandwich over clusters, by a loop over images.
    sizes = rng.integers(1, 6, size=80)
    images = rng.normal(size=(int(sizes.sum()), 3)) + np.repeat(rng.normal(size=(80, 3)), sizes, axis=0)
    owner = np.repeat(np.arange(80), sizes)
    sums = np.stack([images[owner == c].sum(0) for c in range(80)])
    mean = images.mean(0)
    resid = [(images[owner == c] - mean).sum(0) for c in range(80)]
    meat = sum(np.outer(r, r) for r in resid)
    cov = meat / len(images) ** 2 * 80 / 79
    other = rng.normal(size=(200, 3))
    t2, p, dims = cluster_wald(sums, sizes, other, np.ones(200))
    d = mean - other.mean(0)
    expect = d @ np.linalg.solve(cov + np.cov(other, rowvar=False) / 200, d)
    assert dims == 3 and t2 == pytest.approx(expect, rel=1e-9) and 0 < p <= 1
    # Nothing to compare: not computable, never an error.
    assert np.isnan(cluster_wald(sums[:1], sizes[:1], other, np.ones(200))[1])


# -- error rates on arrays (seeded): no alert on the same distribution, the real score shift alerts


def _arrays(rng, n, *, shift=0.0, f=32):
    logits = rng.normal(size=(n, 3)) * 2.0
    logits[:, 0] -= 1.0  # ~1/4 normal, like the validation split
    logits[:, 1:] += shift  # a pure score shift: more pneumonia
    stats = rng.normal(120, 15, size=(n, len(INPUT_STATS)))
    stats[:, 7:9], stats[:, 9] = 224, 1.0
    return logits, stats, rng.normal(size=(n, f))


def _array_block(card, logits, stats, feats) -> pa.Table:
    probs = card.probabilities(logits)
    return pa.table(
        {
            "status": ["ok"] * len(logits),
            **{f"prob_{k}": probs[:, i].astype(np.float32) for i, k in enumerate(LABELS)},
            "prob_pneumonia": (1 - probs[:, LABELS.index(NORMAL)]).astype(np.float32),
            "pred_label": [LABELS[i] for i in probs.argmax(1)],
            "input_stats": pa.FixedShapeTensorArray.from_numpy_ndarray(stats.astype(np.float32)),
            "features": pa.FixedShapeTensorArray.from_numpy_ndarray(feats.astype(np.float32)),
        }
    )


def _array_figures(ref, card, run, settings=None):
    acc = DriftAccumulator(ref, card, settings or DriftSettings())
    block = _array_block(card, *run)
    for i in range(0, block.num_rows, 500):
        acc.add(block.slice(i, 500))
    return acc.figures()


def test_same_distribution_runs_do_not_alert_and_a_real_sized_score_shift_does():
    card, rng = _card(), np.random.default_rng(5)
    ref = read_reference(reference_from_arrays(card, *_arrays(rng, 745), components=16))
    alerts = [_array_figures(ref, card, _arrays(rng, n)).alert for n in [100, 300, 1000, 3000] * 10]
    assert sum(alerts) == 0, sum(alerts)  # 40 runs; at alpha 0.01 the expected count is <= 0.4
    # A pure score shift like the real later collection's: KS ~0.12 at 600 vs 745 images.
    shifted = _array_figures(ref, card, _arrays(rng, 600, shift=0.75))
    ad = next(t for t in shifted.tests() if t["check"] == "p_pneumonia")
    assert ad["statistic"] == "cluster_wald" and ad["method"].startswith("Wald test of the CDF at 5")
    assert 0.09 < ad["effect"] < 0.16 and ad["p_value"] <= 1e-3, ad  # effect: the KS statistic
    ks = next(r for r in shifted.rows if r["check"] == "p_pneumonia" and r["statistic"] == "ks")
    assert ks["role"] == "info" and abs(ks["value"] - ad["effect"]) < 1e-3 and ks["p_value"] < 1e-3
    assert shifted.alert and "p_pneumonia cluster_wald" in shifted.alerts()
    assert ad["effect"] < 0.25  # the old fixed threshold (ks_alert 0.25) missed it
    # The effect-size floor: a trivial shift in a huge run stays quiet although significant.
    big = _array_figures(ref, card, _arrays(rng, 20_000, shift=0.75), DriftSettings(score_ks_min=0.2))
    big_ad = next(t for t in big.tests() if t["check"] == "p_pneumonia")
    assert big_ad["p_adjusted"] <= 0.002 and "p_pneumonia cluster_wald" not in big.alerts()
    # The test used a bounded, uniform sample of the run's units (each image its own unit here).
    assert big_ad["n_used"] == 5000 and "a uniform sample of the run's units" in big_ad["method"]
    assert big.units == {"run": 5000, "run_sampled": True, "reference": 745, "reference_grouped": False}
    big_ks = next(r for r in big.rows if r["check"] == "p_pneumonia" and r["statistic"] == "ks")
    assert big_ks["p_value"] < 1e-6 and big_ks["method"].startswith("ks on exact counts")  # binned


# -- storage, not drift: full-resolution originals against a reference of 224 px copies ----


def test_full_resolution_originals_do_not_alert(kermany224, kermany_fullres, tmp_path):
    """Half of the full-resolution sample's patients as 224 px copies build the reference; the
    other half's full-resolution originals are the run. Same distribution, other storage:
    the size facts differ enormously and are reported; nothing the model sees alerts."""
    files = sorted((kermany_fullres / "train").glob("*/*.jpeg"))
    patient = {f: parse_kermany_path(str(f)).patient_id or f.name for f in files}
    groups = sorted(set(patient.values()))
    np.random.default_rng(0).shuffle(groups)
    half = set(groups[: len(groups) // 2])
    ref_files = [kermany224 / "train" / f.parent.name / f.name for f in files if patient[f] in half]
    ref_files = [f for f in ref_files if f.exists()]
    run_files = [f for f in files if patient[f] not in half]
    path = make_artifact(tmp_path / "model", input_size=64)
    storage.write_table(_split_table(ref_files), str(path / "split.parquet"))
    art = load_artifact(str(path))
    save_artifact(art.weights, art.card, str(path), reference=build_reference(art))
    art = load_artifact(str(path))
    figures = _check(art, _predictor_block(art, run_files))
    assert figures.n_images == len(run_files) > 200 and figures.reference_n > 200
    assert not figures.alert, [
        (t["check"], t["p_adjusted"], t["effect"]) for t in figures.tests() if t["alert"]
    ]
    summary = figures.summary()
    assert "input:original_width ks" in summary["acquisition_differs"]  # reported, not alerted
    width = next(r for r in figures.rows if r["check"] == "input:original_width" and r["statistic"] == "ks")
    assert width["p_value"] < 1e-20 and width["role"] == "info" and not width["alert"]
