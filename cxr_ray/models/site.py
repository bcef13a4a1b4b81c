"""Site calibration (``cxr-ray calibrate``): a labelled sample from a new site -> a derived artifact.

The sample is a folder or archive with labels in the names or folders (Kermany layout), a
manifest (``uri``, ``label``, optionally ``patient_id``), or a scoring run (its
``predictions.parquet``) joined with the review worklist's labels CSV (``image_id,label,...``).
Its raw logits are computed here, on the CPU (50-200 images), and the card's calibration
(temperature, per-class logit scale/offsets, flag threshold; optionally the final linear
layer) is refitted (``cxr_ray.calibration``). What it gains is estimated by cross-fitting
(every sample image gets a probability from a fit that did not see it) with bootstrap
intervals. The derived artifact records its lineage; the parent is never written to.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cxr_ray import calibration as cal
from cxr_ray.config import Settings
from cxr_ray.errors import ConfigError
from cxr_ray.io import storage
from cxr_ray.labels import LABELS
from cxr_ray.models.artifact import Artifact, save_artifact
from cxr_ray.models.card import CARD_FILE, ModelCard
from cxr_ray.models.site_sample import Sample, load_sample
from cxr_ray.models.splits import network_outputs

logger = logging.getLogger(__name__)

REPORT_FILE = "site_calibration.json"
FIGURE_FILE = "site_calibration.png"


def check_out(model: str, out: str, *, overwrite: bool = False) -> None:
    """Refuse an ``out`` that is the parent, or already holds an artifact (unless ``overwrite``)."""
    from pathlib import Path

    from cxr_ray.io import uris

    def norm(u: str) -> str:
        return u.rstrip("/") if uris.is_remote(u) else str(Path(u.removeprefix("file://")).resolve())

    if norm(model) == norm(out):
        raise ConfigError("--out is the parent model: a derived artifact never overwrites its parent")
    if not overwrite and storage.exists(storage.join(out, CARD_FILE)):
        raise ConfigError(f"{out} already holds a model artifact; choose another --out or pass --overwrite")


@dataclass
class SiteResult:
    """What ``fit_site`` fitted on the whole sample, and its cross-fitted estimates."""

    fit: cal.SiteFit
    head: cal.HeadFit | None
    #: ``fit.method``, or ``"head"`` when the refitted head won on cross-fitted NLL.
    kept: str
    cross_fitted: dict[str, Any]
    #: Cross-fitted NLL of every candidate tried (the method, and the head with ``--head``).
    candidates: dict[str, float]
    folds: int
    parent_probs: np.ndarray
    oof_probs: np.ndarray
    oof_thresholds: np.ndarray
    labels: np.ndarray
    parent_threshold: float


def prior_of(card: ModelCard) -> cal.Prior:
    return cal.Prior(card.temperature, card.logit_scale, card.logit_bias)


def fit_site(
    logits: np.ndarray,
    y: np.ndarray,
    card: ModelCard,
    *,
    groups: np.ndarray | None = None,
    method: str = "bias",
    target_sensitivity: float = 0.95,
    folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    head: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> SiteResult:
    """Refit ``card``'s calibration on a sample's raw logits and estimate the gain.

    ``head``: ``(features, W0, c0)`` to also try refitting the final linear layer; it is kept
    only if its cross-fitted NLL beats ``method``'s. Pure numpy/scipy: the benchmark calls it
    on precomputed logits.
    """
    y = np.asarray(y, np.int64)
    prior = prior_of(card)
    k = max(2, min(folds, int(np.bincount(y, minlength=len(LABELS)).min())))
    fold = cal.site_folds(y, groups, k=k, seed=seed)
    parent_probs = card.probabilities(logits)
    oof = cal.cross_fit(logits, y, fold, cal.site_calibration_fitter(method, prior, target_sensitivity))
    candidates = {method: cal.nll(oof.probs, y)}
    fit = cal.fit_site_calibration(
        logits, y, method=method, prior=prior, target_sensitivity=target_sensitivity
    )
    head_fit = None
    kept = method
    if head is not None:
        feats, w0, c0 = head
        hoof = cal.cross_fit(feats, y, fold, cal.head_fitter(w0, c0, prior, target_sensitivity, seed=seed))
        candidates["head"] = cal.nll(hoof.probs, y)
        if candidates["head"] < candidates[method]:
            lam = cal.choose_head_lambda(feats, y, w0, c0, prior=prior, groups=groups, seed=seed)
            head_fit = cal.fit_head(
                feats, y, w0, c0, lam=lam, prior=prior, target_sensitivity=target_sensitivity
            )
            oof, kept = hoof, "head"
    models: dict[str, tuple[np.ndarray, float | np.ndarray]] = {
        "parent": (parent_probs, card.pneumonia_threshold),
        "calibrated": (oof.probs, oof.thresholds),
    }
    crossed = cal.compare(y, models, groups=groups, n_boot=n_boot, seed=seed)
    return SiteResult(
        fit,
        head_fit,
        kept,
        crossed,
        candidates,
        k,
        parent_probs,
        oof.probs,
        oof.thresholds,
        y,
        card.pneumonia_threshold,
    )


def derived_card(
    parent: Artifact, result: SiteResult, sample: Sample, parent_uri: str, **info: Any
) -> ModelCard:
    """The parent's card with the fitted calibration and the lineage."""
    from cxr_ray.models.card import _package_version

    card = parent.card
    if result.kept == "head":
        assert result.head is not None
        fitted: dict[str, Any] = {
            "temperature": card.temperature,
            "logit_scale": list(card.logit_scale),
            "logit_bias": list(card.logit_bias),
            "threshold": result.head.threshold,
            "head_lambda": result.head.lam,
        }
    else:
        fitted = result.fit.as_dict()
    target = result.fit.target_sensitivity
    lineage = {
        "parent_version": card.version,
        "parent_weights_sha256": card.weights_sha256,
        "parent_uri": parent_uri,
        "sample_fingerprint": sample.fingerprint,
        "sample_size": len(sample.image_ids),
        "per_class": sample.per_class,
        "excluded": dict(sample.excluded),
        "grouped_by_patient": sample.groups is not None,
        "method": result.kept,
        "fitted": fitted,
        "cross_fitted": result.cross_fitted,
        "cross_fitted_nll": result.candidates,
        "folds": result.folds,
        "target_sensitivity": target,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cxr_ray_version": _package_version(),
        **info,
    }
    return card.model_copy(
        update={
            "temperature": float(fitted["temperature"]),
            "logit_scale": tuple(fitted["logit_scale"]),
            "logit_bias": tuple(fitted["logit_bias"]),
            "thresholds": {
                **card.thresholds,
                "pneumonia": float(fitted["threshold"]),
                "target_sensitivity": target,
            },
            "lineage": lineage,
        }
    )


def head_weights(art: Artifact) -> tuple[np.ndarray, np.ndarray]:
    """The shipped final linear layer ``(W [3, F], c [3])`` in float64."""
    from cxr_ray.models.factory import head_parameters

    w, c = head_parameters(art.build(), art.card.arch)
    return w.detach().double().numpy(), c.detach().double().numpy()


def _weights_with_head(art: Artifact, fit: cal.HeadFit) -> bytes:
    import torch

    from cxr_ray.models.artifact import weights_bytes
    from cxr_ray.models.factory import head_parameters

    net = art.build()
    w, c = head_parameters(net, art.card.arch)
    with torch.no_grad():
        w.copy_(torch.from_numpy(fit.weight).to(w.dtype))
        c.copy_(torch.from_numpy(fit.bias).to(c.dtype))
    return weights_bytes(net)


def write_site_artifact(parent: Artifact, result: SiteResult, card: ModelCard, out: str) -> ModelCard:
    """Write the derived artifact: weights (the parent's bytes, or with the refitted head),
    the drift reference and ``split.parquet`` copied (INT8 calibration reads its images),
    the card, ``site_calibration.json`` and ``site_calibration.png``."""
    import json

    weights = parent.weights if result.head is None else _weights_with_head(parent, result.head)
    split = storage.join(parent.uri, "split.parquet")
    storage.ensure_dir(out)
    if storage.exists(split):
        storage.write_bytes(storage.read_bytes(split), storage.join(out, "split.parquet"))
    card = save_artifact(weights, card, out, reference=parent.reference)
    report = {"version": card.version, **(card.lineage or {})}
    storage.write_bytes(
        (json.dumps(report, indent=2, sort_keys=True, allow_nan=True) + "\n").encode(),
        storage.join(out, REPORT_FILE),
    )
    storage.write_bytes(figure_png(result), storage.join(out, FIGURE_FILE))
    return card


def figure_png(result: SiteResult) -> bytes:
    """Reliability of P(pneumonia) and sensitivity / specificity, parent vs calibrated (cross-fitted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = result.labels
    truth = (y != LABELS.index("normal")).astype(float)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    edges = np.linspace(0, 1, 11)
    for name, probs, style in (
        ("parent", result.parent_probs, "o--"),
        ("calibrated", result.oof_probs, "o-"),
    ):
        p = 1.0 - probs[:, 0]
        idx = np.clip(np.digitize(p, edges) - 1, 0, 9)
        xs = [p[idx == i].mean() for i in range(10) if (idx == i).any()]
        ys = [truth[idx == i].mean() for i in range(10) if (idx == i).any()]
        a.plot(xs, ys, style, label=name)
    a.plot([0, 1], [0, 1], color="grey", lw=0.8)
    a.set_xlabel("P(pneumonia)")
    a.set_ylabel("observed fraction with pneumonia")
    a.set_title("reliability (cross-fitted)")
    a.legend()
    metrics = ("accuracy", "sensitivity", "specificity", "macro_f1")
    x = np.arange(len(metrics))
    for off, name in ((-0.2, "parent"), (0.2, "calibrated")):
        vals = [result.cross_fitted[m][name] for m in metrics]
        v = np.array([d["value"] for d in vals])
        err = np.array([[d["value"] - d["lo"] for d in vals], [d["hi"] - d["value"] for d in vals]])
        b.bar(x + off, v, 0.4, yerr=np.nan_to_num(err), capsize=3, label=name)
    b.set_xticks(x, metrics)
    b.set_ylim(0, 1.05)
    b.set_title("site sample, 95% bootstrap intervals")
    b.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def format_report(result: SiteResult, sample: Sample, card: ModelCard) -> str:
    """The short text report ``cxr-ray calibrate`` prints (no names, no patient ids)."""
    counts = ", ".join(f"{k} {v}" for k, v in sample.per_class.items())
    excluded = ", ".join(f"{k} {v}" for k, v in sample.excluded.items() if v) or "none"
    fitted = (card.lineage or {}).get("fitted", {})
    lines = [
        f"site sample: {len(sample.image_ids)} images ({counts}); excluded: {excluded}; "
        f"{result.folds}-fold cross-fitting{' grouped by patient' if sample.groups is not None else ''}",
        f"kept: {result.kept} (cross-fitted NLL "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.candidates.items())
        + ")",
        f"fitted: temperature {fitted.get('temperature', 0):.3f}, logit_scale "
        f"{[round(v, 3) for v in fitted.get('logit_scale', [])]}, logit_bias "
        f"{[round(v, 3) for v in fitted.get('logit_bias', [])]}, threshold {fitted.get('threshold', 0):.3f} "
        f"(parent {result.parent_threshold:.3f}; target sensitivity {result.fit.target_sensitivity})",
        "cross-fitted on the sample, 95% bootstrap intervals "
        "(sensitivity/specificity at each one's threshold):",
        cal.format_comparison(result.cross_fitted),
    ]
    return "\n".join(lines)


def calibrate(
    model: str,
    labelled: str,
    out: str,
    settings: Settings,
    *,
    labels_csv: str | None = None,
    method: str = "bias",
    head: bool = False,
    target_sensitivity: float | None = None,
    folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    min_size: int = 40,
    min_per_class: int = 5,
    overwrite: bool = False,
) -> tuple[ModelCard, SiteResult, Sample]:
    """``cxr-ray calibrate``: load, fit, estimate, write the derived artifact at ``out``."""
    from cxr_ray.models.artifact import load_artifact

    if method not in cal.SITE_METHODS:
        raise ConfigError(f"unknown --method {method!r}; choose one of {', '.join(cal.SITE_METHODS)}")
    if folds < 2:
        raise ConfigError("--folds must be at least 2")
    check_out(model, out, overwrite=overwrite)
    parent = load_artifact(model, verify_shapes=False)
    target = target_sensitivity or float(parent.card.thresholds.get("target_sensitivity", 0.95))
    if not 0 < target <= 1:
        raise ConfigError(f"--target-sensitivity must be in (0, 1], got {target}")
    sample = load_sample(
        labelled, parent.card, settings, labels_csv=labels_csv, min_size=min_size, min_per_class=min_per_class
    )
    logits, feats = network_outputs(parent, sample.pixels)
    head_args = (feats, *head_weights(parent)) if head else None
    result = fit_site(
        logits,
        sample.labels,
        parent.card,
        groups=sample.groups,
        method=method,
        target_sensitivity=target,
        folds=folds,
        seed=seed,
        n_boot=n_boot,
        head=head_args,
    )
    card = derived_card(parent, result, sample, model, seed=seed, n_boot=n_boot, sample_kind=sample.kind)
    card = write_site_artifact(parent, result, card, out)
    logger.info("site-calibrated artifact %s written to %s", card.version, out)
    return card, result, sample
