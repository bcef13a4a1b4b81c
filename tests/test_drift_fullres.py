"""The 479 full-resolution originals (``../shared/data/kermany-fullres``) against the
default-recipe artifact (``/work/art/mnv2``) and its reference of 224 px validation copies.

Why they alert today, measured (docs/MONITORING.md, "Full-resolution originals"): the scoring
path's decode of an original (JPEG draft + bilinear) agrees with the Kermany 224 px copy of the
same image in its coarse content but not in its fine detail (the copies are 224 px JPEGs), and
the network is sensitive to that detail: on the same images its penultimate features move by
~0.23 reference std (RMS) and P(pneumonia) by -0.7 logits. Also, 412 of the 479 are the
artifact's own training images and the sample is class-balanced (their 224 px copies alert
too, with less than half the feature shift). The alert is a
true statement about the model's view, so ``test_default_artifact_does_not_alert`` is a strict
xfail until the training recipe sees what the scoring path sees. Skipped without the data or
the artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from cxr_ray.config import DriftSettings
from cxr_ray.imaging.preprocess import PreprocessSpec, decode
from cxr_ray.imaging.stats import input_stats
from cxr_ray.labels import LABELS, NORMAL, parse_kermany_path
from cxr_ray.models.artifact import load_artifact
from cxr_ray.models.card import spec_for
from cxr_ray.models.outputs import network_outputs
from cxr_ray.models.reference import read_reference
from cxr_ray.scoring.drift import DriftAccumulator
from cxr_ray.scoring.drift_units import reference_units

pytestmark = pytest.mark.data

REAL_ARTIFACT = Path("/work/art/mnv2")


def _pairs(kermany224: Path, kermany_fullres: Path) -> list[tuple[Path, Path]]:
    files = sorted((kermany_fullres / "train").glob("*/*.jpeg"))
    pairs = [(f, kermany224 / "train" / f.parent.name / f.name) for f in files]
    return [(f, c) for f, c in pairs if c.exists()]


def _blur(a: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(a.astype(np.float64), 1.5)


def test_the_scoring_decode_of_an_original_matches_its_224_copy_in_coarse_content(
    kermany224, kermany_fullres
):
    """Every 20th pair: same geometry and exposure (squash, no crop, no intensity change:
    < 1 grey level apart once fine detail is blurred away), different fine detail."""
    pairs = _pairs(kermany224, kermany_fullres)[::20]
    assert len(pairs) >= 20
    spec = PreprocessSpec()  # the default recipe's 224 x 224, no intensity mode
    coarse, fine, signed = [], [], []
    for original, copy in pairs:
        a = decode(original.read_bytes(), spec)
        b = decode(copy.read_bytes(), spec)
        assert a.pixels.shape == b.pixels.shape == (224, 224) and a.width > 224
        coarse.append(np.abs(_blur(a.pixels) - _blur(b.pixels)).mean())
        fine.append(np.abs(a.pixels.astype(np.float64) - b.pixels).mean())
        signed.append(a.pixels.mean() - b.pixels.mean())
    assert np.mean(coarse) < 1.0, np.mean(coarse)
    assert abs(np.mean(signed)) < 0.5, np.mean(signed)
    assert np.mean(fine) > 1.5 * np.mean(coarse)  # the difference is fine detail


def _block(
    card: Any, logits: np.ndarray, stats: np.ndarray, feats: np.ndarray, files: list[Path]
) -> pa.Table:
    probs = card.probabilities(np.asarray(logits, np.float64))
    return pa.table(
        {
            # As a scoring run has it: the patient from the Kermany file name (the tests' unit).
            "patient_id": [parse_kermany_path(str(f)).patient_id for f in files],
            "image_id": [f.name for f in files],
            "status": ["ok"] * len(logits),
            **{f"prob_{k}": probs[:, i].astype(np.float32) for i, k in enumerate(LABELS)},
            "prob_pneumonia": (1 - probs[:, LABELS.index(NORMAL)]).astype(np.float32),
            "pred_label": [LABELS[i] for i in probs.argmax(1)],
            "input_stats": pa.FixedShapeTensorArray.from_numpy_ndarray(stats.astype(np.float32)),
            "features": pa.FixedShapeTensorArray.from_numpy_ndarray(feats.astype(np.float32)),
        }
    )


@pytest.fixture(scope="module")
def default_run(kermany224, kermany_fullres) -> dict[str, Any]:
    """The default artifact's drift figures for the originals, and the paired shift of its
    outputs (originals vs their own 224 px copies), torch on the CPU."""
    if not (REAL_ARTIFACT / "model_card.json").exists():
        pytest.skip(f"no default-recipe artifact at {REAL_ARTIFACT}")
    art = load_artifact(str(REAL_ARTIFACT))
    ref = read_reference(art.reference)
    spec = spec_for(art.card)
    pairs = _pairs(kermany224, kermany_fullres)
    out: dict[str, Any] = {"n": len(pairs)}
    for name, files in (("original", [p[0] for p in pairs]), ("copy", [p[1] for p in pairs])):
        decoded = [decode(f.read_bytes(), spec) for f in files]
        px = np.stack([d.pixels for d in decoded])
        logits, feats = network_outputs(art, px)
        stats = input_stats(px, np.array([d.width for d in decoded]), np.array([d.height for d in decoded]))
        acc = DriftAccumulator(ref, art.card, DriftSettings(), reference_units=reference_units(art, ref))
        acc.add(_block(art.card, logits, stats, feats, files))
        p = 1 - art.card.probabilities(logits.astype(np.float64))[:, LABELS.index(NORMAL)]
        p = np.clip(p, 1e-7, 1 - 1e-7)
        out[name] = {
            "figures": acc.figures(),
            "z": ref.project(feats) / ref.pca_std.astype(np.float64),
            "logit": np.log(p) - np.log1p(-p),
        }
    return out


@pytest.mark.slow
def test_default_artifact_on_the_originals_alerts_only_on_what_the_model_sees(default_run):
    fig = default_run["original"]["figures"]
    assert fig.n_images == default_run["n"] > 450
    summary = fig.summary()
    # The size facts differ enormously: reported as likely causes, never an alert themselves.
    assert {"input:original_width ks", "input:original_height ks"} <= set(summary["acquisition_differs"])
    assert all(r["role"] == "test" for r in fig.rows if r["alert"])
    assert set(fig.alerts()) <= {
        "p_pneumonia cluster_wald",
        "pred_label cluster_wald",
        "inputs cluster_wald",
        "features cluster_wald",
    }
    # The diagnosis: on the SAME images the network's view moves (decode of the original vs
    # the 224 px copy): features by > 0.15 reference std (RMS of the mean paired shift, 0.23
    # measured), P(pneumonia) towards normal (-0.7 logits measured).
    dz = default_run["original"]["z"] - default_run["copy"]["z"]
    assert float(np.sqrt(np.mean(dz.mean(0) ** 2))) > 0.15
    assert float(np.mean(default_run["original"]["logit"] - default_run["copy"]["logit"])) < -0.3
    # The 224 px copies of the same images differ from the validation split as well (a
    # class-balanced sample, 26% normals in validation, and 412 of the 479 are the artifact's
    # training images), but their features far less: the decode is most of the feature shift.
    copy = {t["check"]: t for t in default_run["copy"]["figures"].tests()}
    original = {t["check"]: t for t in fig.tests()}
    assert copy["features"]["effect"] < 0.6 * original["features"]["effect"]
    assert copy["p_pneumonia"]["effect"] < 0.7 * original["p_pneumonia"]["effect"]


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="the default artifact's network sees the originals differently from the 224 px JPEG "
    "copies it was trained on (features +0.23 std, P(pneumonia) -0.7 logits on the same images); "
    "a test that catches the real later collection (KS 0.12, features 0.15) must alert here",
)
def test_default_artifact_does_not_alert(default_run):
    fig = default_run["original"]["figures"]
    assert not fig.alert, fig.alerts()
