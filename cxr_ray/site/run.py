"""``cxr-ray calibrate`` end to end: load the sample, compute its logits, fit, write the artifact."""

from __future__ import annotations

import logging

from cxr_ray.config import Settings
from cxr_ray.errors import ConfigError
from cxr_ray.models.card import ModelCard
from cxr_ray.models.outputs import network_outputs
from cxr_ray.site.artifact import check_out, derived_card, head_weights, write_site_artifact
from cxr_ray.site.estimates import SiteResult, fit_site
from cxr_ray.site.sample import Sample, load_sample

logger = logging.getLogger(__name__)


def calibrate(
    model: str,
    labelled: str,
    out: str,
    settings: Settings,
    *,
    labels_csv: str | None = None,
    overwrite: bool = False,
) -> tuple[ModelCard, SiteResult, Sample]:
    """Load, fit, estimate, write the derived artifact at ``out``; every choice (method, folds,
    bootstrap, minimum sizes, confidence, target) is ``settings.calibrate``'s."""
    from cxr_ray.models.artifact import load_artifact

    c = settings.calibrate
    check_out(model, out, overwrite=overwrite)
    parent = load_artifact(model, verify_shapes=False)
    target = c.target_sensitivity or float(parent.card.thresholds.get("target_sensitivity", 0.95))
    if not 0 < target <= 1:
        raise ConfigError(f"--target-sensitivity must be in (0, 1], got {target}")
    sample = load_sample(labelled, parent.card, settings, labels_csv=labels_csv)
    logits, feats = network_outputs(parent, sample.pixels)
    result = fit_site(
        logits,
        sample.labels,
        parent.card,
        groups=sample.groups,
        method=c.method,
        target_sensitivity=target,
        folds=c.folds,
        seed=c.seed,
        n_boot=c.bootstrap,
        head=(feats, *head_weights(parent)) if c.head else None,
        confidence=c.confidence,
        level=c.level,
        head_lambdas=c.head_lambdas,
    )
    card = derived_card(
        parent, result, sample, model, seed=c.seed, n_boot=c.bootstrap, level=c.level, sample_kind=sample.kind
    )
    card = write_site_artifact(parent, result, card, out)
    if not result.guarantee.met:
        logger.warning("site sample too small to guarantee the target sensitivity; parent's calibration kept")
    logger.info("site-calibrated artifact %s written to %s", card.version, out)
    return card, result, sample
