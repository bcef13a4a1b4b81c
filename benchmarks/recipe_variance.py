"""Variance of the default recipe: seeds x precisions, so a change of 1-2 points can be told from noise.

    .venv/bin/python benchmarks/recipe_variance.py --work /work/art/var \\
        [--seeds 0,1,2] [--precisions bf16,fp32] [--reuse bf16-s0=/work/art/mnv2] [--config RECIPE]

Trains the default recipe (``cxr-ray train ../shared/data/kermany224``, the built-in defaults:
the same patient-grouped validation split for every run, ``data.split_seed`` 0) once per
(precision, training seed) into ``WORK/<precision>-s<seed>`` (an artifact already there is
reused, so the script resumes), then prints per artifact and per precision (mean, sd, min,
max): validation accuracy and macro-F1, sensitivity and specificity at the card's flag
threshold (the card's own validation figures), and the same on the constructed site (the
validation images re-rendered by ``render_site`` with the mild site shift of
``benchmarks/site_calibration.py``; torch fp32 on the CPU). Each training takes the machine's
two cores for ~14-28 min: not a test. ``--config RECIPE.toml`` trains a variant of the recipe
instead (use its own ``--work``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from cxr_ray.data.site_shift import SiteShift, render_site
from cxr_ray.imaging.preprocess import decode
from cxr_ray.io import storage
from cxr_ray.labels import LABELS, NORMAL
from cxr_ray.models.artifact import load_artifact
from cxr_ray.models.card import spec_for
from cxr_ray.models.outputs import network_outputs
from cxr_ray.scoring.performance import run_counts

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany224"
SITE = SiteShift(gamma=0.8, contrast=0.85, downscale=0.6, noise_sigma=4.0, jpeg_quality=50, border=0.03)
FIGURES = ("val_accuracy", "val_macro_f1", "val_sensitivity", "val_specificity")
SITE_FIGURES = ("site_accuracy", "site_sensitivity", "site_specificity")


def train(out: Path, seed: int, precision: str, config: str | None = None) -> float:
    start = time.time()
    cmd = [sys.executable, "-m", "cxr_ray"] + (["--config", config] if config else [])
    cmd += ["train", str(DATA), "--out", str(out)]
    cmd += ["--seed", str(seed), "--precision", precision, "--run-name", out.name]
    cmd += ["--storage-path", str(out.parent / "runs")]
    log = out.parent / f"{out.name}.log"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"training {out.name} failed ({proc.returncode}); see {log}")
    return time.time() - start


def site_figures(uri: str, cache: dict[str, Any]) -> dict[str, float]:
    """Accuracy, sensitivity and specificity at the flag threshold on the constructed site."""
    art = load_artifact(uri)
    spec = spec_for(art.card)
    if "pixels" not in cache:
        split = storage.read_table(storage.join(uri, "split.parquet"))
        val = split.filter(pc.equal(split["split"], "val"))
        blobs = [storage.read_bytes(u) for u in val["uri"].to_pylist()]
        cache["y"] = np.array([LABELS.index(v) for v in val["label"].to_pylist()])
        cache["pixels"] = np.stack(
            [decode(render_site(b, seed=i, shift=SITE), spec).pixels for i, b in enumerate(blobs)]
        )
    logits, _ = network_outputs(art, cache["pixels"])
    probs = art.card.probabilities(logits.astype(np.float64))
    counts = run_counts(cache["y"], probs, art.card.pneumonia_threshold)
    return {f"site_{k}": v[0] / v[1] for k, v in counts.items()}


def card_figures(uri: str) -> dict[str, float]:
    card = load_artifact(uri).card
    val = card.metrics.get("validation") or {}
    return {
        "version": card.version,
        "val_accuracy": val.get("accuracy"),
        "val_macro_f1": val.get("macro_f1"),
        "val_sensitivity": val.get("binary_sensitivity_at_threshold"),
        "val_specificity": val.get("binary_specificity_at_threshold"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/work/art/var")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--reuse", action="append", default=[], help="NAME=ARTIFACT: an already trained run")
    ap.add_argument("--no-train", action="store_true", help="only evaluate the artifacts already there")
    ap.add_argument("--config", default=None, help="a recipe TOML to train instead of the defaults")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    reuse = dict(r.split("=", 1) for r in args.reuse)
    rows: list[dict[str, Any]] = []
    cache: dict[str, Any] = {}
    assert NORMAL in LABELS
    for precision in args.precisions.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"{precision}-s{seed}"
            out = Path(reuse.get(name, work / name))
            wall = None
            if not (out / "model_card.json").exists():
                if args.no_train:
                    continue
                wall = train(out, seed, precision, args.config)
            row = {"run": name, "precision": precision, "seed": seed, "train_s": wall}
            row |= card_figures(str(out)) | site_figures(str(out), cache)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\nper precision: mean, sd [min, max] over seeds")
    for precision in args.precisions.split(","):
        mine = [r for r in rows if r["precision"] == precision]
        if not mine:
            continue
        parts = []
        for k in FIGURES + SITE_FIGURES:
            v = [float(r[k]) for r in mine if r.get(k) is not None]
            if v:
                sd = statistics.stdev(v) if len(v) > 1 else float("nan")
                parts.append(f"{k} {statistics.mean(v):.3f} sd {sd:.3f} [{min(v):.3f}, {max(v):.3f}]")
        print(f"{precision} ({len(mine)} seeds): " + "; ".join(parts))


if __name__ == "__main__":
    main()
