"""How close is the label-free performance estimate to the truth, and do its intervals cover it?

    python benchmarks/performance_estimate.py --model ARTIFACT [--trials 40] [--n 300]
        [--fullres ../shared/data/kermany-fullres] [--work DIR] [--json OUT.json]

Runs (each a real image set with known labels, scored by ARTIFACT's network, torch CPU):

- ``clean``: the artifact's own validation images (its ``split.parquet``);
- ``site``: those images re-rendered as the constructed site of benchmarks/site_calibration.py
  (``render_site`` under its ``SITE``), and under harsher / single-factor settings
  (``site-default``: the ``SiteShift()`` defaults; ``gamma``, ``noise-jpeg``, ``downscale``);
- ``fullres``: the full-resolution originals of ../shared/data/kermany-fullres, decoded and
  resized by the scoring preprocessing (most are training images of the model);
- class-prior shifts: ``clean`` and ``site`` resampled to 10% / 70% normal images.

For each run, ``--trials`` random subsets of ``--n`` images (without replacement; prior
shifts sample each class to its share) are estimated with every method of
``cxr_ray.scoring.estimate`` (as ``estimate_arrays`` does in a scoring run: probabilities,
PCA coordinates of the features, the reference and its labels) and measured with the
labels. Printed per run and method: mean |estimate - measured| of sensitivity, specificity
and accuracy at the card's flag threshold, and the share of trials whose 95% interval holds
the measured value (coverage), plus the domain-classifier AUC and how often the estimate
was marked unreliable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from cxr_ray import metrics
from cxr_ray.data.site_shift import SiteShift, render_site
from cxr_ray.imaging.preprocess import decode
from cxr_ray.io import storage
from cxr_ray.labels import LABELS, NORMAL, parse_kermany_path
from cxr_ray.models.artifact import load_artifact
from cxr_ray.models.card import spec_for
from cxr_ray.models.outputs import network_outputs
from cxr_ray.models.reference import read_reference
from cxr_ray.scoring import estimate as est

SHIFTS: dict[str, SiteShift | None] = {
    "clean": None,
    "site": SiteShift(gamma=0.8, contrast=0.85, downscale=0.6, noise_sigma=4.0, jpeg_quality=50, border=0.03),
    "site-default": SiteShift(),
    "gamma": SiteShift(gamma=0.7, contrast=1.0, downscale=1.0, unsharp_percent=0, noise_sigma=0.0,
                       jpeg_quality=90, border=0.0),
    "noise-jpeg": SiteShift(gamma=1.0, contrast=1.0, downscale=1.0, unsharp_percent=0, noise_sigma=8.0,
                            jpeg_quality=30, border=0.0),
    "downscale": SiteShift(gamma=1.0, contrast=1.0, downscale=0.4, unsharp_percent=80, noise_sigma=0.0,
                           jpeg_quality=90, border=0.0),
}  # fmt: skip
PRIORS = {"prior-10%normal": 0.1, "prior-70%normal": 0.7}
METRICS = ("sensitivity", "specificity", "accuracy")


def _outputs(art: Any, blobs: list[bytes], shift: SiteShift | None) -> tuple[np.ndarray, np.ndarray]:
    spec = spec_for(art.card)
    pixels = []
    for i, b in enumerate(blobs):
        data = b if shift is None else render_site(b, seed=i, shift=shift)
        pixels.append(decode(data, spec).pixels)
    return network_outputs(art, np.stack(pixels))


def image_set(art: Any, name: str, work: Path, fullres: str | None) -> dict[str, np.ndarray] | None:
    """Logits, features and labels of one run (cached in ``work``)."""
    key = hashlib.sha256(f"{art.card.weights_sha256}{name}{SHIFTS.get(name)}{fullres}".encode()).hexdigest()[
        :16
    ]
    cache = work / f"est_{name}_{key}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return {k: z[k] for k in z.files}
    if name == "fullres":
        if not fullres or not Path(fullres).is_dir():
            return None
        files = sorted(p for p in Path(fullres).rglob("*.jp*g"))
        labels = [parse_kermany_path(str(p)).label for p in files]
        blobs = [p.read_bytes() for p in files]
        y = np.array([LABELS.index(v) for v in labels])
        logits, feats = _outputs(art, blobs, None)
    else:
        table = storage.read_table(storage.join(art.uri, "split.parquet"))
        val = table.filter(pc.equal(table["split"], "val"))
        blobs = [storage.read_bytes(u) for u in val["uri"].to_pylist()]
        y = np.array([LABELS.index(v) for v in val["label"].to_pylist()])
        logits, feats = _outputs(art, blobs, SHIFTS[name])
    out = {"logits": logits, "features": feats, "labels": y}
    np.savez(cache, **out)  # type: ignore[arg-type]
    return out


def _subsets(y: np.ndarray, n: int, trials: int, normal_share: float | None, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = np.flatnonzero(y == LABELS.index(NORMAL))
    pneu = np.flatnonzero(y != LABELS.index(NORMAL))
    out = []
    for _ in range(trials):
        if normal_share is None:
            out.append(rng.choice(len(y), size=min(n, len(y)), replace=False))
        else:
            k = round(n * normal_share)
            k = min(k, len(normal))
            m = min(round(k * (1 - normal_share) / normal_share), len(pneu))
            out.append(
                np.concatenate([rng.choice(normal, k, replace=False), rng.choice(pneu, m, replace=False)])
            )
    return out


def evaluate(
    run: dict[str, np.ndarray], ref: dict[str, Any], card: Any, subsets: list[np.ndarray]
) -> dict[str, Any]:
    t = card.pneumonia_threshold
    probs = card.probabilities(run["logits"])
    z = ref["reference"].project(run["features"]) / est._std(ref["reference"])
    rows: dict[str, dict[str, list[float]]] = {}
    aucs, outside, unreliable = [], [], 0
    for idx in subsets:
        m = metrics.binary_metrics(run["labels"][idx], probs[idx], t)
        truth = {
            "sensitivity": m["sensitivity_at_threshold"],
            "specificity": m["specificity_at_threshold"],
            "accuracy": float(np.mean(probs[idx].argmax(1) == run["labels"][idx])),
        }
        for method in est.METHODS:
            e = est.estimate_arrays(
                probs[idx], t, run_z=z[idx], ref_probs=ref["probs"], ref_y=ref["labels"], ref_z=ref["z"],
                method=method,
            )  # fmt: skip
            if e["method"] != method:
                continue
            r = rows.setdefault(method, {})
            for k in METRICS:
                v = e[k]
                if v["estimate"] is None or not np.isfinite(truth[k]):
                    continue
                r.setdefault(f"{k}_err", []).append(abs(v["estimate"] - truth[k]))
                r.setdefault(f"{k}_signed", []).append(v["estimate"] - truth[k])
                r.setdefault(f"{k}_cov", []).append(float(v["low"] <= truth[k] <= v["high"]))
                r.setdefault(f"{k}_width", []).append(v["high"] - v["low"])
                r.setdefault(f"{k}_truth", []).append(truth[k])
                r.setdefault(f"{k}_est", []).append(v["estimate"])
            if method == est.DEFAULT_METHOD:
                aucs.append(e["domain_auc"] or float("nan"))
                outside.append(e.get("outside_reference") or 0.0)
                unreliable += not e["reliable"]
    summary = {method: {k: float(np.mean(v)) for k, v in r.items()} for method, r in rows.items()}
    return {
        "methods": summary,
        "domain_auc": float(np.nanmean(aucs)),
        "outside": float(np.mean(outside)),
        "unreliable": unreliable / len(subsets),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--fullres", default="../shared/data/kermany-fullres")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="Comma-separated run names.")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="perf_estimate_"))
    work.mkdir(parents=True, exist_ok=True)
    art = load_artifact(args.model)
    if art.reference is None:
        raise SystemExit("the artifact has no drift reference (cxr-ray drift-reference adds one)")
    reference = read_reference(art.reference)
    labels = est.reference_labels(art, reference)
    if labels is None:
        raise SystemExit("the reference's images cannot be matched to split.parquet's labels")
    ref = {
        "reference": reference,
        "labels": labels,
        "probs": art.card.probabilities(reference.logits.astype(np.float64)),
        "z": reference.pca_scores.astype(np.float64) / est._std(reference),
    }
    names = [*SHIFTS, "fullres"]
    if args.only:
        names = args.only.split(",")
    results: dict[str, Any] = {}
    header = (
        f"{'run':<22} {'method':<6} {'auc':>5} {'out':>5} {'unrel':>5} "
        + " ".join(f"{m[:4]}:err  cov width" for m in METRICS)
    )
    print(header)
    runs: list[tuple[str, dict[str, np.ndarray], float | None]] = []
    for name in names:
        data = image_set(art, name, work, args.fullres)
        if data is None:
            print(f"{name}: skipped (no images)")
            continue
        runs.append((name, data, None))
        if name in ("clean", "site"):
            runs += [(f"{name}/{p}", data, share) for p, share in PRIORS.items()]
    for i, (name, data, share) in enumerate(runs):
        n = args.n if share is None else min(args.n, 200)
        subsets = _subsets(data["labels"], n, args.trials, share, seed=i)
        res = evaluate(data, ref, art.card, subsets)
        results[name] = res
        for method, r in res["methods"].items():
            cells = " ".join(
                f"{r[f'{m}_err']:8.3f} {r[f'{m}_cov']:4.2f} {r[f'{m}_width']:5.2f}" for m in METRICS
            )
            auc, out, unrel = res["domain_auc"], res["outside"], res["unreliable"]
            print(f"{name:<22} {method:<6} {auc:5.2f} {out:5.2f} {unrel:5.2f} {cells}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
