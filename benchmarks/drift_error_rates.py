"""False-alarm rate and power of the drift check (``cxr_ray.scoring.drift``), on a real artifact.

    .venv/bin/python benchmarks/drift_error_rates.py --model /work/art/mnv2 [--trials 200]

What is "the same distribution" (the null):

- ``bootstrap``: the artifact's drift reference rows (its 745 patient-grouped validation
  images: logits, input statistics, PCA coordinates of the features) are the population; each
  trial draws a reference of 745 AND a run of n from it, with replacement, plus a small
  Gaussian jitter (5% of each column's std; a smoothed bootstrap, so the values are
  continuous). Both are then i.i.d. from one distribution: the null holds exactly at every n,
  including n = 5,000 (which no real same-distribution pool here is large enough for).
- ``patient halves``: the validation patients split in two at random; the reference is built
  from one half, the run is n images of the other half (without replacement): real
  same-distribution images, n <= ~370.

(The training images' outputs are not the same distribution: the network was fitted on them.)

Power: the constructed sites (``render_site`` of the validation images as
``benchmarks/site_calibration.py`` builds them; the reference from one patient half, the run
from the other half's re-rendered images), and a pure score shift (the pneumonia logits
raised by a constant, chosen so the run's KS against the reference is ~0.12 at n = 600, the
real later collection's figure) with inputs and features unchanged. Also: the 479
full-resolution originals scored against the artifact's own reference (``--fullres``).

The network runs once per image set (cached in ``--work``); the trials are on arrays.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from _common import drift_block

from cxr_ray.config import DriftSettings
from cxr_ray.data.site_shift import SiteShift, render_site
from cxr_ray.imaging.preprocess import decode
from cxr_ray.imaging.stats import input_stats
from cxr_ray.io import storage
from cxr_ray.labels import parse_kermany_path
from cxr_ray.models.artifact import load_artifact
from cxr_ray.models.card import spec_for
from cxr_ray.models.outputs import network_outputs
from cxr_ray.models.reference import read_reference, reference_from_arrays
from cxr_ray.scoring.drift import DriftAccumulator
from cxr_ray.scoring.drift_units import reference_units

SITES = {
    "mild site (site_calibration SITE)": SiteShift(
        gamma=0.8, contrast=0.85, downscale=0.6, noise_sigma=4.0, jpeg_quality=50, border=0.03
    ),
    "SiteShift() defaults": SiteShift(),
}
TESTS = ("p_pneumonia", "pred_label", "inputs", "features")


def check(
    card: Any,
    ref: tuple,
    run: tuple,
    settings: DriftSettings,
    ref_patients: np.ndarray | None = None,
    run_patients: np.ndarray | None = None,
) -> dict[str, Any]:
    """One drift check of arrays ``run`` against a reference built from arrays ``ref``
    ((logits, stats, features) each); the features are 16-d PCA coordinates (a rotation of
    the reference's basis: every test is invariant to it). With ``*_patients`` the tests are
    cluster-robust over patients, as a scoring run's are (``scoring.drift_units``); without,
    every row is its own unit (the i.i.d. draws of the bootstrap are)."""
    reference = read_reference(reference_from_arrays(card, *ref, components=ref[2].shape[1]))
    units = None if ref_patients is None else [f"patient_id:{p}" for p in ref_patients]
    acc = DriftAccumulator(reference, card, settings, reference_units=units)
    block = drift_block(card, *run, None if run_patients is None else run_patients[: len(run[0])])
    for i in range(0, block.num_rows, 1000):
        acc.add(block.slice(i, 1000))
    fig = acc.figures()
    tests = {t["check"]: t for t in fig.tests()}
    return {"alert": fig.alert, **{c: tests[c]["alert"] for c in TESTS}, "ks": tests["p_pneumonia"]["effect"]}


def _smooth(rng: np.random.Generator, pool: tuple, n: int) -> tuple:
    idx = rng.integers(0, len(pool[0]), n)
    out = []
    for a in pool:
        sd = np.nanstd(a, 0) * 0.05
        out.append(a[idx] + rng.normal(size=(n, a.shape[1])) * sd)
    return tuple(out)


def _take(pool: tuple, idx: np.ndarray) -> tuple:
    return tuple(a[idx] for a in pool)


def _rate(rows: list[dict[str, Any]]) -> str:
    k, n = sum(r["alert"] for r in rows), len(rows)
    per = " ".join(f"{c}={sum(r[c] for r in rows)}" for c in TESTS)
    return f"{k}/{n} = {k / n:.3f}  ({per})"


def network_rows(art: Any, files: list[bytes], work: Path, tag: str, shift: SiteShift | None = None) -> tuple:
    """(logits, input stats, PCA coordinates in the artifact reference's basis) of images."""
    key = hashlib.sha256(f"{art.card.weights_sha256}{tag}{shift}".encode()).hexdigest()[:16]
    cache = work / f"drift_{key}.npz"
    ref = read_reference(art.reference)
    if cache.exists():
        z = np.load(cache)
        return z["logits"], z["stats"], z["pca"]
    spec = spec_for(art.card)
    pixels, sizes = [], []
    for i, blob in enumerate(files):
        d = decode(render_site(blob, seed=i, shift=shift) if shift else blob, spec)
        pixels.append(d.pixels)
        sizes.append((d.width, d.height))
    px = np.stack(pixels)
    logits, feats = network_outputs(art, px)
    wh = np.array(sizes)
    stats = input_stats(px, wh[:, 0], wh[:, 1])
    pca = ref.project(feats)
    np.savez(cache, logits=logits, stats=stats, pca=pca)
    return logits, stats, pca


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/art/mnv2")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--work", default="/tmp/drift-error-rates")
    ap.add_argument("--sites", action="store_true", help="power on the constructed sites (runs the network)")
    ap.add_argument("--fullres", default=None, help="folder of full-resolution originals to score")
    ap.add_argument("--deltas", default="0.8,1.0,1.2,1.4,1.6", help="score shifts to measure the power of")
    ap.add_argument("--no-halves", action="store_true", help="skip the patient-halves null")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    art = load_artifact(args.model)
    card, settings = art.card, DriftSettings()
    ref = read_reference(art.reference)
    pool = (
        ref.logits.astype(np.float64),
        ref.input_stats.astype(np.float64),
        ref.pca_scores.astype(np.float64),
    )
    rng = np.random.default_rng(0)
    print(
        f"artifact {card.version}: reference {ref.n} validation images; "
        f"alpha {settings.alpha}, {args.trials} trials"
    )
    t0 = time.time()
    print("\nfalse-alarm rate, smoothed bootstrap (reference 745 and run both drawn from the pool):")
    for n in (100, 300, 1000, 5000):
        rows = [
            check(card, _smooth(rng, pool, ref.n), _smooth(rng, pool, n), settings)
            for _ in range(args.trials)
        ]
        print(f"  n = {n:5d}: {_rate(rows)}   [{time.time() - t0:.0f} s]")

    deltas = [float(d) for d in args.deltas.split(",") if d]
    split_uri = storage.join(art.uri, "split.parquet")
    score_shift(card, ref.n, pool, rng, args.trials, settings, deltas)
    # A scoring run's reference is the 745 validation images with their patients (a run's tests
    # are cluster-robust over them, drift_units): the power against that reference.
    ref_units = reference_units(art, ref)
    if ref_units is not None and len(set(ref_units)) < ref.n:
        print(
            f"\nthe same against the real reference: its {ref.n} images, cluster-robust over its "
            f"{len(set(ref_units))} patients (as a scoring run's tests are):"
        )
        score_shift(card, ref.n, pool, rng, args.trials, settings, deltas, np.array(ref_units))
    if args.no_halves:
        pass
    elif storage.exists(split_uri):
        patient_halves(art, pool, rng, args, work, settings)
    else:
        print(f"\n(no {split_uri}: the patient-halves null and the constructed sites need it; skipped)")
    if args.fullres:
        fullres(art, Path(args.fullres), work, settings)


def patient_halves(
    art: Any, pool: tuple, rng: np.random.Generator, args: Any, work: Path, settings: Any
) -> None:
    card = art.card
    split = storage.read_table(storage.join(art.uri, "split.parquet"))
    val = split.filter(pc.equal(split["split"], "val"))
    patients = np.array(val["patient_id"].to_pylist(), dtype=str)
    groups = np.unique(patients)
    halves = []
    for _ in range(args.trials):
        a = set(rng.permutation(groups)[: len(groups) // 2])
        in_a = np.array([p in a for p in patients])
        halves.append((np.flatnonzero(in_a), np.flatnonzero(~in_a)))
    print("\nfalse-alarm rate, patient halves (reference: one half's images, run: n of the other half's):")
    for n in (100, 300):
        picks = [(a, rng.choice(b, min(n, len(b)), replace=False)) for a, b in halves]
        naive = [check(card, _take(pool, a), _take(pool, b), settings) for a, b in picks]
        units = [
            check(card, _take(pool, a), _take(pool, b), settings, patients[a], patients[b]) for a, b in picks
        ]
        print(f"  n = {n:5d}, every image a unit (before): {_rate(naive)}")
        print(f"  n = {n:5d}, cluster-robust over patients (now): {_rate(units)}")

    if args.sites:
        blobs = [storage.read_bytes(u) for u in val["uri"].to_pylist()]
        for name, shift in SITES.items():
            site = network_rows(art, blobs, work, "val", shift)
            for n in (100, 300):
                rows = []
                for a, b in halves:
                    pick = rng.choice(b, min(n, len(b)), replace=False)
                    rows.append(
                        check(card, _take(pool, a), _take(site, pick), settings, patients[a], patients[pick])
                    )
                print(f"power, {name}, n = {n}, cluster-robust over patients: {_rate(rows)}")


def fullres(art: Any, folder: Path, work: Path, settings: Any) -> None:
    card = art.card
    if True:
        files = sorted(folder.rglob("*.jpeg"))
        run = network_rows(art, [f.read_bytes() for f in files], work, f"fullres{len(files)}")
        reference = read_reference(art.reference)
        acc = DriftAccumulator(reference, card, settings, reference_units=reference_units(art, reference))
        feats = reference.feature_mean + run[2] @ reference.pca_components.astype(np.float64)
        patients = np.array([parse_kermany_path(str(f)).patient_id or f.name for f in files])
        acc.add(drift_block(card, run[0], run[1], feats, patients))  # patients from the names, as a run has
        fig = acc.figures()
        print(
            f"\nfull-resolution originals ({len(files)}) against the artifact's reference: alert {fig.alert}"
        )
        for t in fig.tests():
            print(
                f"  {t['check']:12s} {t['statistic']:13s} {t['value']!s:>9} p {t['p_value']!s:>10} "
                f"Holm {t['p_adjusted']!s:>10} effect {t['effect']!s:>7} (min {t['threshold']})"
            )
        print("  acquisition facts that differ (informational):", fig.summary()["acquisition_differs"])


def score_shift(
    card: Any,
    ref_n: int,
    pool: tuple,
    rng: np.random.Generator,
    trials: int,
    settings: Any,
    deltas: list[float],
    ref_patients: np.ndarray | None = None,
) -> None:
    """Power on a pure score shift. ``ref_patients``: the reference is the pool itself, with
    its patients (as a scoring run's reference is); otherwise a smoothed bootstrap of it."""

    def reference() -> tuple:
        return pool if ref_patients is not None else _smooth(rng, pool, ref_n)

    print("\npower, pure score shift (pneumonia logits + delta; inputs and features unchanged), n = 600:")
    run_patients = None if ref_patients is None else np.arange(624).astype(str)  # i.i.d. draws
    for delta in deltas:
        rows = []
        for _ in range(trials):
            run = _smooth(rng, pool, 600)
            run[0][:, 1:] += delta
            rows.append(check(card, reference(), run, settings, ref_patients, run_patients))
        ks = np.mean([r["ks"] for r in rows])
        print(f"  delta {delta}: mean KS {ks:.3f}; alerts {_rate(rows)}")
    print("power, the real collection's figures (KS ~0.12 and a feature mean shift of RMS 0.15), n = 624:")
    rows = []
    for _ in range(trials):
        run = _smooth(rng, pool, 624)
        run[0][:, 1:] += 1.4
        run[2][:, :] += 0.15 * pool[2].std(0)
        rows.append(check(card, reference(), run, settings, ref_patients, run_patients))
    print(f"  mean KS {np.mean([r['ks'] for r in rows]):.3f}; alerts {_rate(rows)}")


if __name__ == "__main__":
    main()
