"""``cxr-ray site-check``: score a seeded sample of a new site's images and say what to do.

One onboarding path for a site: (1) ``cxr-ray site-check SOURCE --model A`` scores
``--sample`` images drawn (seeded) from SOURCE, prints the drift check against the artifact's
reference, the label-free performance estimate (``cxr_ray.scoring.estimate``) and, when the
images carry labels, the performance check against the card (``cxr_ray.scoring.performance``),
and ends with one recommendation: ``ok``, or ``calibrate: label >= K studies, worklist at
OUT/report.html``; (2) reviewers label the worklist and export the CSV; (3) ``cxr-ray
calibrate --model A --labelled OUT --labels labels.csv --out A2`` fits the site's threshold.

``K`` is what calibration's sensitivity guarantee needs: the positives for the one-sided 95%
exact bound to reach the card's target when ~1% of them are missed
(``cxr_ray.site.guarantee.positives_for``), divided by the estimated share of pneumonia
studies at the site (the mean P(pneumonia) of the sample), and at least as many normals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from cxr_ray.config import Settings
from cxr_ray.data.manifest import manifest_schema_for, read_options, source_units
from cxr_ray.io import storage
from cxr_ray.models.artifact import Artifact, load_artifact
from cxr_ray.scoring.result import ScoreResult
from cxr_ray.site.guarantee import positives_for
from cxr_ray.vocabulary import Status

#: The share of positives assumed missed when sizing the labelled sample.
PLANNED_MISS_RATE = 0.01
#: Estimated specificity this far below the card's (or a sensitivity below the target) asks
#: for calibration even without a drift alert.
SPECIFICITY_MARGIN = 0.05


@dataclass
class SiteCheck:
    result: ScoreResult
    listed: int  # images the source lists
    sampled: int
    recommendation: str  # "ok" | "calibrate"
    reasons: list[str]
    label_studies: int | None  # K: studies to label (calibrate)
    report: str | None

    def line(self) -> str:
        if self.recommendation == "ok":
            return f"recommendation: ok ({self.sampled} of {self.listed} images checked)"
        k = f"label >= {self.label_studies} studies" if self.label_studies else "label a site sample"
        return f"recommendation: calibrate: {k}, worklist at {self.report} ({'; '.join(self.reasons)})"


def sample_manifest(source: str, out: str, settings: Settings, n: int, seed: int = 0) -> tuple[str, int, int]:
    """A manifest (``OUT/site_sample.parquet``) of ``n`` images drawn (seeded, without
    replacement) from ``source``; returns (its uri, images listed, images sampled)."""
    units = source_units(source, read_options(settings.data, settings.dicomweb))
    refs = [r for u in units for r in u.refs if r.error is None]
    picked = np.sort(np.random.default_rng(seed).choice(len(refs), size=min(n, len(refs)), replace=False))
    chosen = [refs[i] for i in picked]
    none = pa.nulls(len(chosen))
    table = pa.table(
        {
            "uri": pa.array([r.uri for r in chosen], pa.string()),
            "image_id": none.cast(pa.string()),
            "label": pa.array([r.label for r in chosen], pa.string()),
            "patient_id": none.cast(pa.string()),
            "format": none.cast(pa.string()),
            "width": none.cast(pa.int32()),
            "height": none.cast(pa.int32()),
            "bytes": none.cast(pa.int64()),
            "status": pa.array([Status.OK.value] * len(chosen), pa.string()),
            "error": none.cast(pa.string()),
            "error_code": none.cast(pa.string()),
        },
        schema=manifest_schema_for(source),  # its rows may point into SOURCE only
    )
    uri = storage.join(out, "site_sample.parquet")
    storage.ensure_dir(out)
    storage.write_table(table, uri)
    return uri, len(refs), len(chosen)


def studies_to_label(card: Any, pneumonia_share: float) -> int | None:
    """K: studies to label so that calibration can guarantee the card's target sensitivity."""
    target = float(card.thresholds.get("target_sensitivity", 0.95))
    pos = positives_for(target, 0.95, miss_rate=PLANNED_MISS_RATE)
    if pos is None or not 0 < pneumonia_share < 1:
        return None
    share = min(max(pneumonia_share, 0.05), 0.95)
    return math.ceil(max(pos / share, pos / (1 - share)))


def recommend(result: ScoreResult, card: Any) -> tuple[str, list[str]]:
    """``ok`` or ``calibrate``, with the reasons."""
    reasons = []
    if result.drift.get("alert"):
        reasons.append("drift alert: " + ", ".join(result.drift.get("alerts", [])[:3]))
    e = result.performance_estimate
    if e and not e.get("reliable", True):
        reasons.append(f"estimate unreliable: {e.get('note')}")
    val = card.metrics.get("validation", {})
    spec_card = val.get("binary_specificity_at_threshold")
    spec = (e.get("specificity") or {}).get("estimate") if e else None
    if spec is not None and spec_card is not None and spec < spec_card - SPECIFICITY_MARGIN:
        reasons.append(f"estimated specificity {spec:.3f} vs card {spec_card:.3f}")
    sens = (e.get("sensitivity") or {}).get("estimate") if e else None
    target = card.thresholds.get("target_sensitivity")
    if sens is not None and target is not None and sens < target:
        reasons.append(f"estimated sensitivity {sens:.3f} below the target {target}")
    if result.performance_check.get("alert"):
        reasons.append("performance alert: " + ", ".join(result.performance_check["alerts"]))
    return ("calibrate" if reasons else "ok"), reasons


def site_check(
    source: str, artifact: Artifact | str, out: str, settings: Settings, *, sample: int = 300, seed: int = 0
) -> SiteCheck:
    """Score a seeded sample of ``source`` into ``out`` and recommend ``ok`` or ``calibrate``
    (then with a report whose worklist has the studies to label)."""
    from cxr_ray.reporting.report import write_report
    from cxr_ray.scoring.pipeline import score

    art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact, verify_shapes=False)
    manifest, listed, sampled = sample_manifest(source, out, settings, sample, seed)
    result = score(manifest, art, out, settings, overwrite=True)
    verdict, reasons = recommend(result, art.card)
    share = _pneumonia_share(out)
    k = studies_to_label(art.card, share) if verdict == "calibrate" else None
    # The worklist: every flagged study and a random sample of the unflagged ones, so a
    # threshold can be fitted (flagged studies alone are all predicted positive).
    review = max(40, (k or 0) - result.flagged_studies)
    report = write_report(out, review_sample=review, review_limit=max(300, review + result.flagged_studies))
    return SiteCheck(result, listed, sampled, verdict, reasons, k, report)


def _pneumonia_share(out: str) -> float:
    import pyarrow.compute as pc

    t = storage.read_table(storage.join(out, "predictions.parquet"), columns=["status", "prob_pneumonia"])
    ok = t.filter(pc.equal(t["status"], Status.OK.value))
    mean = pc.mean(ok["prob_pneumonia"]).as_py() if ok.num_rows else None
    return float(mean) if mean is not None else math.nan
