"""A scoring run's drift check: its accumulator, its outputs and its summary line.

The statistics are ``cxr_ray.scoring.drift``'s; this module is what a run does with them::

    acc, entry = drift_accumulator(artifact, settings.drift)  # None + why, when not checked
    acc.add(block)                                            # every block, on the driver
    entry = write_drift(out, acc, run_id=..., model_version=...)
    drift_line(entry)                                         # the one console line

Outputs: ``OUT/drift.parquet`` (one row per figure, ``DRIFT_SCHEMA``) and
``OUT/drift_plot.json`` (what the report's plots need).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from cxr_ray.config import DriftSettings
from cxr_ray.errors import ModelError
from cxr_ray.io import storage
from cxr_ray.io.columns import described
from cxr_ray.models.artifact import Artifact
from cxr_ray.models.reference import read_reference
from cxr_ray.scoring.drift import DRIFT_SCHEMA, DriftAccumulator
from cxr_ray.scoring.drift_units import reference_units

logger = logging.getLogger(__name__)

#: ``drift.parquet`` and ROOT/drift_history: ``DRIFT_SCHEMA`` with its columns described.
DRIFT_TABLE_SCHEMA = described(
    DRIFT_SCHEMA,
    {
        "run_id": "the scoring run",
        "model_version": "the model whose reference the run is compared with",
        "check": "what is compared: p_pneumonia, features, input:<statistic>, class mix, a DICOM category...",
        "statistic": "the figure's statistic (cluster_wald for the tested checks; ks, psi, mean_shift, ...)",
        "value": "the statistic's value; null when not computable (e.g. no DICOM tags in the reference)",
        "threshold": "tested checks: the minimum effect size for an alert",
        "alert": "whether this figure alerts (Holm-adjusted p below drift.alpha and effect >= threshold)",
        "n_images": ("images of this run in the check", "images"),
        "reference_n": ("images of the artifact's reference (its validation split)", "images"),
        "note": "why a figure could not be computed, or what it means",
        "role": "test (in the Holm family, may alert) or info (informational, never alerts)",
        "p_value": ("the test's p-value", "probability"),
        "p_adjusted": (
            "weighted-Holm-adjusted p-value across the run's tested checks (drift.score_weight)",
            "probability",
        ),
        "effect": "the effect size compared with threshold",
        "n_used": ("run rows the statistic used (e.g. the reservoir sample)", "images"),
        "method": "how the statistic and p-value were computed",
    },
    table="drift",
    version=1,
)


def drift_accumulator(
    art: Artifact, settings: DriftSettings, *, reference: bytes | None = None
) -> tuple[DriftAccumulator | None, dict[str, Any]]:
    """The run's drift accumulator (``None`` when there is nothing to compare with) and the
    ``drift`` entry of the summary until the check has run. ``reference``: the artifact's
    reference recomputed with the run's engine (``PrepareReport.drift_reference``, bf16
    engines), used instead of ``art.reference``."""
    if not settings.enabled:
        return None, {"status": "disabled", "alert": False}
    if art.reference is None:
        logger.info("drift: no reference in this artifact (add one with `cxr-ray drift-reference`)")
        return None, {"status": "no_reference", "alert": False}
    try:
        ref = read_reference(reference or art.reference)
        return DriftAccumulator(ref, art.card, settings, reference_units=reference_units(art, ref)), {}
    except ModelError as exc:  # the scoring run goes on; the check says why it did not run
        logger.warning("drift: the artifact's reference cannot be used: %s", exc)
        return None, {"status": "error", "alert": False, "note": str(exc)}


def write_drift(out: str, drift: DriftAccumulator, *, run_id: str, model_version: str) -> dict[str, Any]:
    """``OUT/drift.parquet`` (one row per figure), ``OUT/drift_plot.json`` (what the report's
    plots need) and the summary's ``drift`` entry; one warning line when the run alerts."""
    figures = drift.figures()
    storage.write_table(
        figures.table(run_id=run_id, model_version=model_version),
        storage.join(out, "drift.parquet"),
        DRIFT_TABLE_SCHEMA,
    )
    plot = {"run_id": run_id, "model_version": model_version, **figures.plot}
    storage.write_bytes(json.dumps(plot).encode(), storage.join(out, "drift_plot.json"))
    summary = figures.summary()
    if summary["alert"]:
        logger.warning(drift_line(summary))
    return summary


def drift_line(d: dict[str, Any]) -> str | None:
    """The one summary line about drift (``None`` when the check was turned off)."""
    status = d.get("status")
    if status == "no_reference":
        return "drift: no reference in this artifact"
    if status == "error":
        return f"drift: not checked ({d.get('note')})"
    if status != "checked":
        return None
    figures = f"P(pneumonia) PSI {_fig(d.get('p_pneumonia_psi'))}, KS {_fig(d.get('p_pneumonia_ks'))}"
    if d.get("feature_pca_mean_shift") is not None:
        figures += f", feature shift {_fig(d.get('feature_pca_mean_shift'))}"
    if d.get("input_max_mean_shift") is not None:
        figures += f", largest input shift {_fig(d.get('input_max_mean_shift'))}"
    against = (
        f"{d['n_images']} images{_units(d, 'run')} vs "
        f"{d['reference_n']} validation images{_units(d, 'reference')}"
    )
    tests = d.get("tests") or []
    if d.get("alert"):
        shown = "; ".join(
            f"{t['check']} {t['statistic']} p {_p(t['p_value'])} (Holm {_p(t['p_adjusted'])}), "
            f"effect {_fig(t['effect'])} >= {_fig(t['threshold'])}"
            for t in tests
            if t["alert"]
        ) or ", ".join(d.get("alerts") or [])
        causes = d.get("acquisition_differs") or []
        also = f"; acquisition also differs: {', '.join(causes[:3])}" if causes else ""
        return f"DRIFT ALERT: {against} differ in {shown} ({figures}{also}); see drift.parquet"
    adjusted = [t["p_adjusted"] for t in tests if t.get("p_adjusted") is not None]
    if adjusted:
        figures += f"; smallest Holm p {_p(min(adjusted))} vs alpha {d.get('alpha')}"
    return f"drift: no alert ({against}; {figures})"


def _units(d: dict[str, Any], side: str) -> str:
    """`` (N patients/studies)`` when the tests counted fewer units than images on ``side``."""
    units = (d.get("units") or {}).get(side)
    n = d["n_images"] if side == "run" else d["reference_n"]
    if units is None or units >= n:
        return ""
    sampled = "a sample of " if side == "run" and (d.get("units") or {}).get("run_sampled") else ""
    return f" ({sampled}{units} {'patients/studies' if side == 'run' else 'patients'})"


def _p(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.2g}"


def _fig(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"
