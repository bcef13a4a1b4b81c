"""The drift tests count patients (or studies), not images: false alarms under patient
clustering, order independence, the unit key, and no identifier kept (``scoring.drift_units``)."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa

from cxr_ray.config import DriftSettings
from cxr_ray.imaging.stats import INPUT_STATS
from cxr_ray.labels import LABELS, NORMAL
from cxr_ray.models.card import ModelCard
from cxr_ray.models.reference import read_reference, reference_from_arrays
from cxr_ray.scoring.drift import DriftAccumulator
from cxr_ray.scoring.drift_units import UnitSample, group_sums, row_units

F = 32


def _card() -> ModelCard:
    return ModelCard(
        arch="mobilenet_v2", mean=(0.5,) * 3, std=(0.2,) * 3, target_layer="x", weights_sha256="0" * 64
    )


def _patients(rng: np.random.Generator, n_images: int, start: int) -> np.ndarray:
    """Patient ids for ``n_images`` images with the validation split's structure: most patients
    have 1-2 images, some 5-9, a few many (745 images, 413 patients, one with 30)."""
    sizes: list[int] = []
    while sum(sizes) < n_images:
        r = rng.uniform()
        sizes.append(
            1
            if r < 0.55
            else 2
            if r < 0.8
            else 3
            if r < 0.9
            else int(rng.integers(5, 10))
            if r < 0.99
            else 30
        )
    ids = np.repeat(np.arange(start, start + len(sizes)), sizes)[:n_images]
    return ids


def _clustered(rng: np.random.Generator, patients: np.ndarray, rho: float = 0.15):
    """Logits, input statistics and features whose images share their patient's latent part
    (intra-patient correlation ``rho``): one distribution of patients, images not independent."""
    uniq, inv = np.unique(patients, return_inverse=True)
    d = 3 + len(INPUT_STATS) + F
    latent = rng.normal(size=(len(uniq), d))[inv]
    x = np.sqrt(rho) * latent + np.sqrt(1 - rho) * rng.normal(size=(len(patients), d))
    logits = 2.0 * x[:, :3]
    logits[:, 0] -= 1.0
    stats = 120 + 15 * x[:, 3 : 3 + len(INPUT_STATS)]
    return logits, stats, x[:, 3 + len(INPUT_STATS) :]


def _block(card: ModelCard, logits, stats, feats, patients=None) -> pa.Table:
    probs = card.probabilities(logits)
    cols = {
        "status": ["ok"] * len(logits),
        **{f"prob_{k}": probs[:, i].astype(np.float32) for i, k in enumerate(LABELS)},
        "prob_pneumonia": (1 - probs[:, LABELS.index(NORMAL)]).astype(np.float32),
        "pred_label": [LABELS[i] for i in probs.argmax(1)],
        "input_stats": pa.FixedShapeTensorArray.from_numpy_ndarray(stats.astype(np.float32)),
        "features": pa.FixedShapeTensorArray.from_numpy_ndarray(feats.astype(np.float32)),
        "image_id": [f"img{i:06d}" for i in range(len(logits))],
    }
    if patients is not None:
        cols["patient_id"] = [f"P{p}" for p in patients]
    return pa.table(cols)


def _figures(ref, card, block, ref_units, block_rows=64):
    acc = DriftAccumulator(ref, card, DriftSettings(), reference_units=ref_units)
    for i in range(0, block.num_rows, block_rows):
        acc.add(block.slice(i, block_rows))
    return acc, acc.figures()


def test_clustered_same_distribution_runs_alert_at_alpha_only_when_patients_are_units():
    """The patient-halves null on arrays: reference and run are images of different patients
    of one population, the run either every image of its patients or a random sample of
    their images (which holds many-image patients more often). Counting images as
    independent, the tests see more evidence than there is and alert far above alpha;
    cluster-robust over patients, at alpha in both designs."""
    card, rng = _card(), np.random.default_rng(11)
    alarms = {"images": 0, "patients": 0, "patients, image sample": 0}
    trials = 100
    for t in range(trials):
        ref_patients = _patients(rng, 745, 0)
        ref = read_reference(reference_from_arrays(card, *_clustered(rng, ref_patients), components=16))
        ref_units = [f"patient_id:P{p}" for p in ref_patients]
        pool_patients = _patients(rng, 400, 10_000)
        pool = _clustered(rng, pool_patients)
        whole = np.arange(300)  # every image of the first patients (cut at 300 images)
        _, naive = _figures(ref, card, _block(card, *(a[whole] for a in pool)), None)
        acc, grouped = _figures(
            ref, card, _block(card, *(a[whole] for a in pool), pool_patients[whole]), ref_units
        )
        pick = np.sort(rng.choice(400, 100, replace=False))
        _, sampled = _figures(
            ref, card, _block(card, *(a[pick] for a in pool), pool_patients[pick]), ref_units
        )
        alarms["images"] += naive.alert
        alarms["patients"] += grouped.alert
        alarms["patients, image sample"] += sampled.alert
        if t == 0:
            assert acc.units_summary()["run"] == len(np.unique(pool_patients[whole])) < 300
            assert acc.units_summary()["reference"] == len(np.unique(ref_patients)) < 745
            assert acc.ref_grouped and not acc.units.sampled
            score = next(r for r in grouped.rows if r["check"] == "p_pneumonia" and r["role"] == "test")
            assert score["n_used"] == 300 and "cluster-robust over" in score["method"]
    # Counting images the family-wise rate is many times alpha (0.01: ~1 in 100 trials);
    # cluster-robust it is at alpha (P(>= 4 alarms | 0.01) = 0.02).
    print(f"false alarms in {trials} trials: {alarms}")
    assert alarms["images"] >= 10, alarms
    assert alarms["patients"] <= 3 and alarms["patients, image sample"] <= 3, alarms


def test_figures_do_not_depend_on_the_order_or_blocking_of_the_rows():
    card, rng = _card(), np.random.default_rng(3)
    ref_patients = _patients(rng, 400, 0)
    ref = read_reference(reference_from_arrays(card, *_clustered(rng, ref_patients), components=8))
    patients = _patients(rng, 900, 5000)
    block = _block(card, *_clustered(rng, patients), patients)
    units = [f"patient_id:P{p}" for p in ref_patients]
    _, a = _figures(ref, card, block, units, block_rows=64)
    shuffled = block.take(rng.permutation(block.num_rows))
    _, b = _figures(ref, card, shuffled, units, block_rows=257)
    tests_a = {r["check"]: (r["value"], r["p_value"], r["n_used"]) for r in a.rows if r["role"] == "test"}
    tests_b = {r["check"]: (r["value"], r["p_value"], r["n_used"]) for r in b.rows if r["role"] == "test"}
    for check, va in tests_a.items():
        assert np.allclose(va, tests_b[check], rtol=1e-9, equal_nan=True), (check, va, tests_b[check])


def test_a_bounded_unit_sample_is_the_bottom_k_of_the_units_whatever_the_order():
    rng = np.random.default_rng(0)
    units = [f"patient_id:P{int(p)}" for p in rng.integers(0, 3000, size=12_000)]
    rows = rng.normal(size=(len(units), 2))
    counts = np.ones((len(units), 1))
    full = UnitSample(10_000, 2, 1)
    full.add(units, rows, counts)
    small = UnitSample(500, 2, 1)
    for chunk in np.array_split(rng.permutation(len(units)), 37):
        small.add([units[i] for i in chunk], rows[chunk], counts[chunk])
    assert small.n == 500 and small.sampled and not full.sampled and full.n == len(set(units))
    # The same 500 units, each with every one of its images, as the first 500 of the whole.
    assert np.array_equal(small.unit, full.unit[:500])
    assert np.allclose(small.sums, full.sums[:500]) and np.array_equal(small.counts, full.counts[:500])
    assert small.images == len(units) and full.counts.sum() == len(units)
    # group_sums is the same grouping, for the reference.
    sums, cnt = group_sums(units, rows, counts)
    assert np.allclose(sums, full.sums) and np.array_equal(cnt, full.counts)


def test_a_rows_unit_is_its_patient_else_its_study_else_itself():
    block = pa.table(
        {
            "patient_id": ["A", "", None, None],
            "study_instance_uid": ["1.2.3", "1.2.4", "", None],
            "image_id": ["h0", "h1", "h2", None],
            "uri": ["u0", "u1", "u2", "u3"],
        }
    )
    units = row_units(block, np.arange(4), offset=100)
    assert units == ["patient_id:A", "study_instance_uid:1.2.4", "image_id:h2", "uri:u3"]
    bare = pa.table({"status": ["ok", "ok"]})
    assert row_units(bare, np.arange(2), offset=7) == ["row:7", "row:8"]


def test_the_accumulator_keeps_no_patient_identifier():
    card, rng = _card(), np.random.default_rng(1)
    ref = read_reference(reference_from_arrays(card, *_clustered(rng, _patients(rng, 200, 0)), components=8))
    patients = _patients(rng, 150, 0)
    block = _block(card, *_clustered(rng, patients), patients)
    block = block.set_column(
        block.column_names.index("patient_id"),
        "patient_id",
        pa.array([f"DOE_JANE_MRN{p:05d}" for p in patients]),
    )
    acc = DriftAccumulator(ref, card, DriftSettings())
    acc.add(block)
    held = pickle.dumps(acc.__dict__)
    assert b"DOE_JANE" not in held and b"MRN" not in held
    assert b"DOE_JANE" not in pickle.dumps(acc.figures())
