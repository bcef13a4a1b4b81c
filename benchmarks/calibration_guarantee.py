"""Does the calibrated site threshold keep its sensitivity promise on new images of the site?

    python benchmarks/calibration_guarantee.py --model ARTIFACT [--data SOURCE] [--trials 300]
        [--n 128] [--site] [--work DIR] [--json OUT]

Population: the artifact's validation images (raw logits of ``split.parquet``'s ``val`` rows;
with ``--data``, an artifact lacking ``split.parquet`` is copied to ``--work`` and given the
split ``cxr-ray train`` made from SOURCE with the default settings), and with ``--site`` the
same images re-rendered as the constructed site of ``benchmarks/site_calibration.py``. Each
trial draws ``--n`` images without replacement as the labelled site sample, runs
``cxr_ray.site.fit_site`` (what ``cxr-ray calibrate`` runs: bias scaling, cross-fitted
Clopper-Pearson guarantee) and measures sensitivity and specificity of the derived card's
threshold on the other images. Printed: the fraction of trials meeting the target on those
new images, and mean specificity, for the guarantee, for the former rule (in-sample fit,
target + one binomial standard error) and for the parent card unchanged.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cxr_ray import calibration as cal
from cxr_ray.models.artifact import load_artifact
from cxr_ray.models.outputs import split_logits
from cxr_ray.site import fit_site

TARGET = 0.95


def _with_split(model: str, data: str | None, work: Path) -> str:
    if (Path(model) / "split.parquet").exists() or data is None:
        return model
    import pyarrow.parquet as pq

    from cxr_ray.config import Settings
    from cxr_ray.training.data import load_split_table

    copy = work / "artifact"
    if not copy.exists():
        shutil.copytree(model, copy)
        pq.write_table(load_split_table(data, Settings()), copy / "split.parquet")
    return str(copy)


def _rates(p: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float]:
    pneu, pos = 1 - p[:, 0], y != 0
    return float((pneu[pos] >= t).mean()), float((pneu[~pos] < t).mean())


def simulate(logits: np.ndarray, y: np.ndarray, card: Any, trials: int, n: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    rows: dict[str, list[tuple[float, float]]] = {"guarantee": [], "former_margin": [], "parent": []}
    not_met = 0
    for i in range(trials):
        idx = rng.choice(len(y), n, replace=False)
        rest = np.setdiff1d(np.arange(len(y)), idx)
        r = fit_site(logits[idx], y[idx], card, n_boot=0, seed=i)
        if not r.guarantee.met:
            not_met += 1  # the parent is kept: its own threshold counts
        t = r.fit.threshold if r.guarantee.met else card.pneumonia_threshold
        probs = r.fit.probs(logits[rest]) if r.guarantee.met else card.probabilities(logits[rest])
        rows["guarantee"].append(_rates(probs, y[rest], t))
        npos = int((y[idx] != 0).sum())
        sample_p = r.fit.probs(logits[idx])
        old_t = cal.threshold_for_sensitivity(
            sample_p, y[idx], min(1.0, TARGET + (TARGET * (1 - TARGET) / npos) ** 0.5)
        )
        rows["former_margin"].append(_rates(r.fit.probs(logits[rest]), y[rest], old_t))
        rows["parent"].append(_rates(card.probabilities(logits[rest]), y[rest], card.pneumonia_threshold))
    out: dict[str, Any] = {
        "trials": trials,
        "n": n,
        "positives_per_sample": float(n * (y != 0).mean()),
        "not_met": not_met,
    }
    for name, v in rows.items():
        a = np.array(v)
        out[name] = {
            "fraction_meeting_target": float((a[:, 0] >= TARGET).mean()),
            "mean_sensitivity": float(a[:, 0].mean()),
            "mean_specificity": float(a[:, 1].mean()),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=None, help="Training source, to rebuild a missing split.parquet.")
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--site", action="store_true", help="Also the constructed site (render_site).")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="cal_guarantee_"))
    work.mkdir(parents=True, exist_ok=True)
    art = load_artifact(_with_split(args.model, args.data, work), verify_shapes=False)
    logits, y = split_logits(art, "val")
    results = {
        "model": art.card.version,
        "validation": simulate(logits, y, art.card, args.trials, args.n, args.seed),
    }
    print(f"validation ({len(y)} images):", json.dumps(results["validation"], indent=1))
    if args.site:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from site_calibration import SITE, shifted_site

        s = shifted_site(art, SITE, work)
        results["site"] = simulate(s["logits"], s["labels"], art.card, args.trials, args.n, args.seed)
        print(f"constructed site ({len(s['labels'])} images):", json.dumps(results["site"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
