"""Does the artifact's temperature improve calibration, and by more than the noise of ECE?

    python benchmarks/calibration.py ARTIFACT [--bootstrap 2000] [--seed 0]

Recomputes the network's raw logits on the artifact's own validation images (the
patient-grouped split in ARTIFACT/split.parquet) and prints, at T=1 and at the card's
temperature: NLL, Brier score and top-1 ECE with 15 and 10 equal-width bins. Then two checks
that a 745-image validation set needs before a change of ECE means anything:

- a bootstrap over validation images of ECE(T) - ECE(1) (its 95% interval);
- cross-fitting: T refitted by NLL on 4/5 of validation, ECE measured on the other 1/5
  (5 folds, 20 repetitions), i.e. what temperature scaling does to images it was not fitted on.
"""

from __future__ import annotations

import argparse

import numpy as np

from cxr_ray.calibration import fit_temperature, nll, softmax
from cxr_ray.metrics import expected_calibration_error
from cxr_ray.models.artifact import load_artifact
from cxr_ray.models.outputs import split_logits


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    onehot = np.eye(probs.shape[1])[y]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    art = load_artifact(args.artifact)
    card_t = art.card.temperature
    logits, y = split_logits(art, "val")
    refit = fit_temperature(logits, y)
    print(f"{len(y)} validation images; card temperature {card_t:.4f} (refitted here: {refit:.4f})")
    print(f"{'':>8} {'NLL':>7} {'Brier':>7} {'ECE15':>7} {'ECE10':>7}")
    for name, t in (("T=1", 1.0), (f"T={card_t:.3f}", card_t)):
        p = softmax(logits, t)
        print(
            f"{name:>8} {nll(p, y):>7.4f} {brier(p, y):>7.4f} "
            f"{expected_calibration_error(p, y):>7.4f} {expected_calibration_error(p, y, 10):>7.4f}"
        )
    rng = np.random.default_rng(args.seed)
    diff = []
    for _ in range(args.bootstrap):
        i = rng.integers(0, len(y), len(y))
        diff.append(
            expected_calibration_error(softmax(logits[i], card_t), y[i])
            - expected_calibration_error(softmax(logits[i]), y[i])
        )
    d = np.array(diff)
    lo, hi = np.percentile(d, [2.5, 97.5])
    print(f"bootstrap ECE15(T) - ECE15(1): mean {d.mean():+.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}]")
    before, after, ts = [], [], []
    for _ in range(20):
        folds = np.array_split(rng.permutation(len(y)), 5)
        pb, pa, yy = [], [], []
        for k, test in enumerate(folds):
            fit = np.concatenate([f for j, f in enumerate(folds) if j != k])
            t = fit_temperature(logits[fit], y[fit])
            ts.append(t)
            pb.append(softmax(logits[test]))
            pa.append(softmax(logits[test], t))
            yy.append(y[test])
        yc = np.concatenate(yy)
        before.append(expected_calibration_error(np.concatenate(pb), yc))
        after.append(expected_calibration_error(np.concatenate(pa), yc))
    print(
        f"cross-fitted (T from 4/5, ECE15 on the other 1/5; T {min(ts):.3f}..{max(ts):.3f}): "
        f"before {np.mean(before):.4f}, after {np.mean(after):.4f}"
    )


if __name__ == "__main__":
    main()
