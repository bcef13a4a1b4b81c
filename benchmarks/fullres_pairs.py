"""The full-resolution originals against an artifact, paired with their own 224 px copies.

    .venv/bin/python benchmarks/fullres_pairs.py --model /work/art/mnv2

For every image of ``../shared/data/kermany-fullres`` that has a copy of the same name in
``kermany224`` (479), three runs through the scoring decode and the network (torch on the CPU):
the originals as scoring reads them (resized, then re-encoded in the card's storage form), the
originals without the storage-form re-encode, and the copies. Per run: the drift tests against
the artifact's reference (p-value and effect per check, the alert), sensitivity and
specificity at the card's flag threshold and 3-class accuracy; then the paired shift of each
originals run against the copies (RMS of the mean feature shift in reference std, mean logit
P(pneumonia) shift, argmax agreement) and the originals' radial power spectrum relative to the
copies' (geometric mean per band, cycles per image). docs/MONITORING.md, "Full-resolution
originals", holds the figures. Not a test: ~1 min on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from _common import drift_block

from cxr_ray.config import DriftSettings
from cxr_ray.imaging.preprocess import decode
from cxr_ray.imaging.stats import input_stats
from cxr_ray.labels import LABELS, NORMAL, parse_kermany_path
from cxr_ray.models.artifact import load_artifact
from cxr_ray.models.card import spec_for
from cxr_ray.models.outputs import network_outputs
from cxr_ray.models.reference import read_reference
from cxr_ray.scoring.drift import DriftAccumulator
from cxr_ray.scoring.drift_units import reference_units

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BANDS = ((1, 8), (8, 20), (20, 40), (40, 60), (60, 80), (80, 100), (100, 112))


def spectrum(a: np.ndarray) -> np.ndarray:
    """Radial power spectrum of one image, per integer frequency (cycles per image) < 112."""
    a = a.astype(np.float64) - a.mean()
    power = np.abs(np.fft.fftshift(np.fft.fft2(a))) ** 2
    y, x = np.indices(a.shape)
    r = np.hypot(y - a.shape[0] / 2, x - a.shape[1] / 2).astype(int).ravel()
    return np.bincount(r, power.ravel())[:112] / np.maximum(np.bincount(r)[:112], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/art/mnv2")
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()
    art = load_artifact(args.model)
    ref = read_reference(art.reference)
    spec = spec_for(art.card)
    plain = dataclasses.replace(spec, storage_jpeg_quality=None)
    data = Path(args.data)
    originals = sorted((data / "kermany-fullres" / "train").glob("*/*.jpeg"))
    pairs = [(f, data / "kermany224" / "train" / f.parent.name / f.name) for f in originals]
    pairs = [(f, c) for f, c in pairs if c.exists()]
    threshold = art.card.pneumonia_threshold
    print(f"{art.card.version}: {len(pairs)} originals with a 224 px copy; storage form "
          f"{spec.storage_jpeg_quality}; flag threshold {threshold:.3f}")
    runs = {
        "originals as scored": ([p[0] for p in pairs], spec),
        "originals, no storage form": ([p[0] for p in pairs], plain),
        "224 px copies": ([p[1] for p in pairs], spec),
    }
    seen: dict[str, dict[str, np.ndarray]] = {}
    for name, (files, run_spec) in runs.items():
        decoded = [decode(f.read_bytes(), run_spec) for f in files]
        px = np.stack([d.pixels for d in decoded])
        logits, feats = network_outputs(art, px)
        sizes = np.array([d.width for d in decoded]), np.array([d.height for d in decoded])
        acc = DriftAccumulator(ref, art.card, DriftSettings(), reference_units=reference_units(art, ref))
        parsed = [parse_kermany_path(str(f)) for f in files]
        patients = [k.patient_id or f.name for k, f in zip(parsed, files, strict=True)]
        acc.add(drift_block(art.card, logits, input_stats(px, *sizes), feats, patients))
        fig = acc.figures()
        probs = art.card.probabilities(logits.astype(np.float64))
        p = np.clip(1 - probs[:, LABELS.index(NORMAL)], 1e-7, 1 - 1e-7)
        label = np.array([LABELS.index(k.label) for k in parsed])
        pos = label != LABELS.index(NORMAL)
        tests = "  ".join(f"{t['check']} p {t['p_value']:.2g} effect {t['effect']:.3f}" for t in fig.tests())
        print(f"\n{name}: alert {fig.alerts() or 'none'}\n  {tests}")
        sens, specificity = np.mean(p[pos] >= threshold), np.mean(p[~pos] < threshold)
        acc3 = np.mean(probs.argmax(1) == label)
        print(f"  sensitivity {sens:.3f}  specificity {specificity:.3f}  3-class accuracy {acc3:.3f}")
        seen[name] = {"z": ref.project(feats) / ref.pca_std.astype(np.float64),
                      "logit": np.log(p) - np.log1p(-p), "pred": probs.argmax(1), "px": px}
    copy = seen["224 px copies"]
    copy_spectra = np.stack([spectrum(a) for a in copy["px"]])[:, 1:]
    print("\npaired with the copies (same images)")
    for name in ("originals as scored", "originals, no storage form"):
        run = seen[name]
        dz = (run["z"] - copy["z"]).mean(0)
        ratio = np.stack([spectrum(a) for a in run["px"]])[:, 1:] / np.maximum(copy_spectra, 1e-12)
        g = np.concatenate([[1.0], np.exp(np.mean(np.log(np.maximum(ratio, 1e-12)), axis=0))])
        bands = " ".join(f"{a}-{b} {np.exp(np.mean(np.log(g[a:b]))):.2f}" for a, b in BANDS)
        print(f"  {name}: features {np.sqrt(np.mean(dz ** 2)):.3f} std, logit P(pneumonia) "
              f"{np.mean(run['logit'] - copy['logit']):+.3f}, argmax agreement "
              f"{np.mean(run['pred'] == copy['pred']):.3f}\n    power vs the copies: {bands}")


if __name__ == "__main__":
    main()
