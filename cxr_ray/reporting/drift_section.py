"""The report's drift section (figures from a run's ``drift.parquet`` and ``drift_plot.json``).

Self-contained HTML: a heading, the alert status, the table of checks and inline PNG plots
(P(pneumonia) and predicted-class mix, run vs reference; input statistics, run mean vs
reference mean +- std; the first two reference-PCA coordinates of the features). Everything
comes from the run folder; the artifact is not needed.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

import numpy as np

from cxr_ray.io import storage
from cxr_ray.reporting.figures import fig_png, img


def _plot_data(out_dir: str) -> dict[str, Any]:
    uri = storage.join(out_dir, "drift_plot.json")
    if not storage.exists(uri):
        return {}
    try:
        data = json.loads(storage.read_bytes(uri))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{float(v):.3f}"


def _pfmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{float(v):.2g}"


def _table(rows: list[dict[str, Any]]) -> str:
    # Alerts first, then the tested checks, then the rest in the order the check wrote them.
    rows = sorted(rows, key=lambda r: (not r["alert"], r.get("role") != "test"))
    head = (
        '<table class="drift" id="drift-checks"><tr><th class=l>check</th><th class=l>statistic</th>'
        "<th>value</th><th>p</th><th>p (Holm)</th><th>effect</th><th>min effect</th><th>n</th>"
        "<th>alert</th><th class=l>note</th></tr>"
    )
    body = "".join(
        f"<tr{' class=alert' if r['alert'] else ''}><td class=l>{html.escape(r['check'])}</td>"
        f"<td class=l>{html.escape(r['statistic'])}</td><td>{_fmt(r['value'])}</td>"
        f"<td>{_pfmt(r.get('p_value'))}</td><td>{_pfmt(r.get('p_adjusted'))}</td><td>{_fmt(r.get('effect'))}</td>"
        f"<td>{_fmt(r['threshold'])}</td><td>{r.get('n_used') or r['n_images']}</td>"
        f"<td>{'ALERT' if r['alert'] else ''}</td>"
        f"<td class=l>{html.escape(r['note'] or '')}</td></tr>"
        for r in rows
    )
    return head + body + "</table>"


def _share(counts: list[float]) -> np.ndarray:
    a = np.asarray(counts, np.float64)
    return a / a.sum() if a.sum() else a


def _plots(d: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    if d.get("p_bins"):
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
        edges = np.asarray(d["p_bins"])
        mids, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        a.bar(mids, _share(d["p_reference"]), width=width, alpha=0.5, label="reference (validation)")
        a.step(edges[:-1], _share(d["p_run"]), where="post", color="C3", label="this run")
        a.set(xlabel="P(pneumonia)", ylabel="share of images", title="P(pneumonia)")
        a.legend(fontsize=8)
        x = np.arange(len(d["labels"]))
        b.bar(x - 0.2, _share(d["pred_reference"]), 0.4, label="reference")
        b.bar(x + 0.2, _share(d["pred_run"]), 0.4, color="C3", label="this run")
        b.set_xticks(x, d["labels"])
        b.set(ylabel="share of images", title="predicted class")
        b.legend(fontsize=8)
        out.append(img(fig_png(fig), "P(pneumonia) and predicted classes, run vs reference"))
    if d.get("stats_run_mean"):
        mu = np.asarray(d["stats_reference_mean"], np.float64)
        sd = np.asarray(d["stats_reference_std"], np.float64)
        run = np.array([np.nan if v is None else v for v in d["stats_run_mean"]], np.float64)
        z = (run - mu) / sd
        fig, ax = plt.subplots(figsize=(9, 3.2))
        y = np.arange(len(d["stats"]))
        ax.axvspan(-1, 1, color="#ddd", label="reference mean ± 1 std")
        ax.barh(y, np.clip(z, -10, 10), color=["C3" if abs(v) >= 1 else "C0" for v in np.nan_to_num(z)])
        ax.set_yticks(y, d["stats"], fontsize=8)
        ax.set(
            xlabel="run mean - reference mean (reference std units; clipped at ±10)", title="input statistics"
        )
        ax.legend(fontsize=8, loc="lower right")
        out.append(img(fig_png(fig), "input statistics, run vs reference"))
    if d.get("pca_run") and d.get("pca_reference"):
        ref, run = np.asarray(d["pca_reference"]), np.asarray(d["pca_run"])
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.scatter(ref[:, 0], ref[:, 1], s=6, alpha=0.4, label="reference")
        if run.shape[1] > 1:
            ax.scatter(run[:, 0], run[:, 1], s=6, alpha=0.4, color="C3", label="this run")
        ax.set(xlabel="PC 1 (reference std)", ylabel="PC 2 (reference std)", title="features (reference PCA)")
        ax.legend(fontsize=8)
        out.append(img(fig_png(fig), "penultimate features on the reference's first two components"))
    return out


def drift_section(out_dir: str) -> str:
    """HTML of the drift section for the run in ``out_dir`` ("" when it has no drift figures)."""
    uri = storage.join(out_dir, "drift.parquet")
    if not storage.exists(uri):
        return ""
    rows = storage.read_table(uri).to_pylist()
    if not rows:
        return ""
    alerts = [f"{r['check']} {r['statistic']}" for r in rows if r["alert"]]
    n, ref_n = rows[0]["n_images"], rows[0]["reference_n"]
    if alerts:
        status = (
            f'<p class="drift-alert" id="drift-status"><b>DRIFT ALERT</b>: these {n} images differ from the '
            f"model's {ref_n} validation images in {html.escape(', '.join(alerts))} (two-sample tests, "
            "Holm-adjusted p-values at the run's alpha, and a minimum effect size). The model's "
            "accuracy and its flag threshold may not hold here; consider a site calibration "
            "(<code>cxr-ray calibrate</code>) on a labelled sample of these images.</p>"
        )
    else:
        status = (
            f'<p id="drift-status">No drift alert: {n} images compared with the model\'s {ref_n} '
            "validation images.</p>"
        )
    plots = _plots(_plot_data(out_dir))
    figs = f'<div class="figs">{"".join(plots)}</div>' if plots else ""
    heading = "<h2>Drift against the model's validation images</h2>"
    return f'<section id="drift">{heading}{status}{figs}{_table(rows)}</section>'
