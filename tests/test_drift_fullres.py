"""The 479 full-resolution originals (``../shared/data/kermany-fullres``) against the
default-recipe artifact (``/work/art/mnv2``) and its reference of 224 px validation copies.

Why they alert, measured (docs/MONITORING.md, "Full-resolution originals"): the scoring
path's decode of an original (JPEG draft + bilinear) agrees with the Kermany 224 px copy of the
same image in its coarse content but not in its fine detail (the copies are 224 px JPEGs at
quality 75), and the network is sensitive to that detail: decoded plainly, on the same images
its penultimate features move by 0.23 reference std (RMS) and P(pneumonia) by -0.70 logits.
The card now records the training images' storage form (``storage_jpeg_quality`` 75) and
scoring re-encodes resized images in it (``cxr_ray.imaging.storage_form``): 0.087 std and
-0.26 logits, sensitivity at the card threshold 0.962 -> 0.981 (copies 0.987), and only the
features check still alerts (p 9e-06, effect 0.13; the 224 px copies themselves do not alert:
p 0.016, effect 0.096). ``test_default_artifact_does_not_alert`` stays a strict xfail until the
remaining fine-detail difference is gone (``benchmarks/fullres_pairs.py`` prints these figures
for any artifact). Skipped without the data, the artifact, or a card
recording the storage form (``/work/art/mnv2``'s card: retrained or given
``"storage_jpeg_quality": 75``, what training now detects from its split).
"""

from __future__ import annotations

import dataclasses
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
    if spec.storage_jpeg_quality is None:
        pytest.skip("the artifact's card records no storage form (trained before it existed)")
    plain = dataclasses.replace(spec, storage_jpeg_quality=None)
    pairs = _pairs(kermany224, kermany_fullres)
    out: dict[str, Any] = {"n": len(pairs)}
    runs = (
        ("original", [p[0] for p in pairs], spec),  # as scoring reads them (step 2b)
        ("unrendered", [p[0] for p in pairs], plain),  # without the storage-form re-encode
        ("copy", [p[1] for p in pairs], spec),  # at the input size: never re-encoded
    )
    for name, files, run_spec in runs:
        decoded = [decode(f.read_bytes(), run_spec) for f in files]
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
            "p": p,
            "positive": np.array([parse_kermany_path(str(f)).label != NORMAL for f in files]),
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
    # the 224 px copy). Without the storage-form re-encode: features by 0.23 reference std
    # (RMS of the mean paired shift), P(pneumonia) -0.70 logits; with it (what scoring does):
    # 0.087 std, -0.26 logits (measured).
    def shift(name: str) -> tuple[float, float]:
        dz = default_run[name]["z"] - default_run["copy"]["z"]
        dlogit = default_run[name]["logit"] - default_run["copy"]["logit"]
        return float(np.sqrt(np.mean(dz.mean(0) ** 2))), float(np.mean(dlogit))

    (f_plain, l_plain), (f_stored, l_stored) = shift("unrendered"), shift("original")
    assert f_plain > 0.15 and l_plain < -0.3, (f_plain, l_plain)
    assert f_stored < 0.6 * f_plain and l_stored > 0.6 * l_plain, (f_stored, l_stored)
    # The 224 px copies of the same images (a class-balanced sample, 26% normals in
    # validation, and 412 of the 479 are the artifact's training images) do not alert, and
    # their features differ from the validation split far less than the plainly decoded
    # originals': the decode is most of the feature shift, and the storage form most of that.
    copy_figures = default_run["copy"]["figures"]
    assert not copy_figures.alert, copy_figures.alerts()
    copy = {t["check"]: t for t in copy_figures.tests()}
    plain = {t["check"]: t for t in default_run["unrendered"]["figures"].tests()}
    stored = {t["check"]: t for t in fig.tests()}
    assert copy["features"]["effect"] < 0.6 * plain["features"]["effect"]
    assert copy["p_pneumonia"]["effect"] < 0.7 * plain["p_pneumonia"]["effect"]
    assert stored["features"]["effect"] < 0.7 * plain["features"]["effect"]
    assert "p_pneumonia cluster_wald" in default_run["unrendered"]["figures"].alerts()
    # The re-encode shrinks the score shift; whether what is left alerts depends on the
    # training run: not on mobilenet_v2-b4e1f603315c (p 0.011), yes on a retrain of the same
    # recipe, mobilenet_v2-35b17a15c124 (the 479 cycled to 2,000: p 1.1e-4, KS 0.147).
    assert stored["p_pneumonia"]["effect"] < plain["p_pneumonia"]["effect"]


@pytest.mark.slow
def test_the_storage_form_restores_sensitivity_on_the_originals(default_run):
    """Sensitivity at the card threshold on the originals: 0.962 decoded plainly, 0.981
    re-encoded in the training images' storage form, 0.987 on the 224 px copies (measured)."""
    threshold = load_artifact(str(REAL_ARTIFACT)).card.pneumonia_threshold

    def sensitivity(name: str) -> float:
        run = default_run[name]
        return float((run["p"][run["positive"]] >= threshold).mean())

    plain, stored, copy = sensitivity("unrendered"), sensitivity("original"), sensitivity("copy")
    assert stored > plain and copy - stored < 0.6 * (copy - plain), (plain, stored, copy)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="the default artifact's network still sees the originals differently from the 224 px "
    "JPEG copies it was trained on (re-encoded in their storage form: features 0.087 std apart on "
    "the same images, the features check alerts with effect 0.13; neither a fitted post-resize filter "
    "nor a texture augmentation in training closed it: docs/MONITORING.md, item 5)",
)
def test_default_artifact_does_not_alert(default_run):
    fig = default_run["original"]["figures"]
    assert not fig.alert, fig.alerts()
