"""The derived artifact of a site calibration: the parent's card with the fit and its lineage.

The parent is never written to. The derived artifact holds the parent's weights (or with the
refitted head), its drift reference and ``split.parquet``, the new card, and the report
``site_calibration.json`` / ``site_calibration.png``. When the sample cannot guarantee the
target sensitivity the card keeps the parent's calibration and threshold (the lineage says
so, and how many more labelled positives would be needed).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cxr_ray.errors import ConfigError
from cxr_ray.io import storage
from cxr_ray.models.artifact import Artifact, save_artifact
from cxr_ray.models.card import CARD_FILE, ModelCard
from cxr_ray.reporting.site_report import figure_png
from cxr_ray.site.estimates import SiteResult
from cxr_ray.site.head import HeadFit
from cxr_ray.site.sample import Sample

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


def _fitted(card: ModelCard, result: SiteResult) -> dict[str, Any]:
    if result.kept == "head":
        assert result.head is not None
        return {
            "temperature": card.temperature,
            "logit_scale": list(card.logit_scale),
            "logit_bias": list(card.logit_bias),
            "threshold": result.head.threshold,
            "head_lambda": result.head.lam,
        }
    return result.fit.as_dict()


def derived_card(
    parent: Artifact, result: SiteResult, sample: Sample, parent_uri: str, **info: Any
) -> ModelCard:
    """The parent's card with the fitted calibration (when its sensitivity is guaranteed) and
    the lineage."""
    from cxr_ray.models.card import _package_version

    card = parent.card
    fitted = _fitted(card, result)
    applied = result.guarantee.met
    target = result.fit.target_sensitivity
    lineage = {
        "parent_version": card.version,
        "parent_weights_sha256": card.weights_sha256,
        "parent_uri": parent_uri,
        "parent_threshold": card.pneumonia_threshold,
        "sample_fingerprint": sample.fingerprint,
        "sample_size": len(sample.image_ids),
        "per_class": sample.per_class,
        "excluded": dict(sample.excluded),
        "grouped_by_patient": sample.groups is not None,
        "method": result.kept,
        "fitted": fitted,
        "applied": applied,
        "sensitivity_guarantee": result.guarantee.as_dict(),
        "cross_fitted": result.cross_fitted,
        "cross_fitted_nll": result.candidates,
        "folds": result.folds,
        "target_sensitivity": target,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cxr_ray_version": _package_version(),
        **info,
    }
    if not applied:
        return card.model_copy(update={"lineage": lineage})
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


def _weights_with_head(art: Artifact, fit: HeadFit) -> bytes:
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
    """Write the derived artifact: weights (the parent's bytes, or with the refitted head when
    it is applied), the drift reference and ``split.parquet`` copied (INT8 calibration reads
    its images), the card, ``site_calibration.json`` and ``site_calibration.png``."""
    use_head = result.head is not None and result.kept == "head" and result.guarantee.met
    weights = _weights_with_head(parent, result.head) if use_head and result.head else parent.weights
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
    png = figure_png(result.labels, result.parent_probs, result.oof_probs, result.cross_fitted)
    storage.write_bytes(png, storage.join(out, FIGURE_FILE))
    return card
