"""What ``cxr-ray calibrate`` shows: the text report and the figure of a site calibration.

Both are rendered from plain values (the lineage the derived card records, the sample's
labels and probabilities), so the printed report says exactly what the card stores, and this
module needs nothing from ``cxr_ray.site``. No names, URIs or patient ids appear.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxr_ray.labels import LABELS, NORMAL
from cxr_ray.reporting.figures import fig_bytes


def figure_png(
    labels: np.ndarray, parent_probs: np.ndarray, calibrated_probs: np.ndarray, cross_fitted: dict[str, Any]
) -> bytes:
    """Reliability of P(pneumonia) and sensitivity / specificity, parent vs calibrated (cross-fitted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    normal = LABELS.index(NORMAL)
    truth = (np.asarray(labels) != normal).astype(float)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    edges = np.linspace(0, 1, 11)
    for name, probs, style in (("parent", parent_probs, "o--"), ("calibrated", calibrated_probs, "o-")):
        p = 1.0 - probs[:, normal]
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
        vals = [cross_fitted[m][name] for m in metrics]
        v = np.array([d["value"] for d in vals])
        err = np.array([[d["value"] - d["lo"] for d in vals], [d["hi"] - d["value"] for d in vals]])
        b.bar(x + off, v, 0.4, yerr=np.nan_to_num(err), capsize=3, label=name)
    b.set_xticks(x, metrics)
    b.set_ylim(0, 1.05)
    b.set_title("site sample, 95% bootstrap intervals")
    b.legend(loc="lower right")
    return fig_bytes(fig)


def format_comparison(result: dict[str, Any], names: tuple[str, str] = ("parent", "calibrated")) -> str:
    """Plain-text table of ``cxr_ray.site.bootstrap.compare``'s result for two models (value [lo, hi])."""
    a, b = names
    diff = f"{b} - {a}"
    lines = [f"{'':24}{a:>24}{b:>24}{'difference':>26}"]
    for metric, entry in result.items():
        cells = [_cell(entry[a]), _cell(entry[b]), _cell(entry[diff], signed=True)]
        lines.append(f"{metric:24}{cells[0]:>24}{cells[1]:>24}{cells[2]:>26}")
    return "\n".join(lines)


def _cell(v: dict[str, float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v['value'])} [{f.format(v['lo'])}, {f.format(v['hi'])}]"


def guarantee_line(g: dict[str, Any]) -> str:
    """One line on the sensitivity guarantee recorded in a lineage (``SensitivityGuarantee``)."""
    pct = f"{g['confidence']:.0%}"
    if g["met"]:
        return (
            f"sensitivity guarantee: {g['flagged']}/{g['positives']} positives flagged out of fold at "
            f"threshold {g['threshold']:.3f}; {pct} lower bound {g['lower_bound']:.3f} "
            f">= target {g['target']}"
        )
    more = g["more_positives_needed_at_miss_rate"]
    at_rate = (
        f"{more} more at the miss rate seen here ({g['observed_miss_rate']:.1%})"
        if more is not None
        else f"at the miss rate seen here ({g['observed_miss_rate']:.1%}) no number would"
    )
    return (
        f"SENSITIVITY NOT GUARANTEED: {g['positives']} labelled pneumonia images cannot show sensitivity "
        f">= {g['target']} at {pct} confidence (the parent's threshold flags {g['flagged']} of them, lower "
        f"bound {g['lower_bound']:.3f}), so the parent's calibration and threshold are kept. Label at least "
        f"{g['more_positives_needed']} more pneumonia images ({at_rate}) and calibrate again."
    )


def format_report(lineage: dict[str, Any]) -> str:
    """The short text report ``cxr-ray calibrate`` prints, from the derived card's lineage."""
    counts = ", ".join(f"{k} {v}" for k, v in lineage["per_class"].items())
    excluded = ", ".join(f"{k} {v}" for k, v in lineage["excluded"].items() if v) or "none"
    fitted = lineage.get("fitted", {})
    grouped = " grouped by patient" if lineage.get("grouped_by_patient") else ""
    applied = "" if lineage.get("applied", True) else " (NOT applied)"
    lines = [
        f"site sample: {lineage['sample_size']} images ({counts}); excluded: {excluded}; "
        f"{lineage['folds']}-fold cross-fitting{grouped}",
        f"kept: {lineage['method']} (cross-fitted NLL "
        + ", ".join(f"{k} {v:.3f}" for k, v in lineage["cross_fitted_nll"].items())
        + ")",
        f"fitted{applied}: temperature {fitted.get('temperature', 0):.3f}, logit_scale "
        f"{[round(v, 3) for v in fitted.get('logit_scale', [])]}, logit_bias "
        f"{[round(v, 3) for v in fitted.get('logit_bias', [])]}, threshold {fitted.get('threshold', 0):.3f} "
        f"(parent {lineage['parent_threshold']:.3f}; target sensitivity {lineage['target_sensitivity']})",
        guarantee_line(lineage["sensitivity_guarantee"]),
        f"cross-fitted on the sample, {lineage.get('level', 0.95):.0%} bootstrap intervals "
        "(sensitivity/specificity at each one's threshold):",
        format_comparison(lineage["cross_fitted"]),
    ]
    return "\n".join(lines)
