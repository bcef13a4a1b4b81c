"""A self-contained HTML report of a scoring run (one file, images embedded as base64 PNGs).

Sections: run summary, per-class metrics table, confusion matrix, ROC curves (one-vs-rest
and normal-vs-pneumonia), reliability diagram, pneumonia-score histogram by true class,
error rows, and a gallery of the most suspicious flagged studies with their Grad-CAM
overlays. Sections that need labels or heatmaps are left out, with a note, when a run has
none.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray import metrics
from cxr_ray.io import storage
from cxr_ray.labels import LABELS, NORMAL
from cxr_ray.scoring.pipeline import labelled_arrays

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2430;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde3ea}
table{border-collapse:collapse;margin:.5rem 0}th{background:#f3f6f9}
td,th{border:1px solid #dde3ea;padding:.3rem .6rem;text-align:right}td.l,th.l{text-align:left}
.kpi{display:inline-block;margin:0 1.5rem .8rem 0}.kpi b{display:block;font-size:1.4rem}
.figs img{max-width:49%}.gallery{display:flex;flex-wrap:wrap;gap:.8rem}
.gallery figure{margin:0;width:240px;font-size:.8rem}.gallery img{width:240px}
.note{color:#6b7785}.err td{text-align:left;font-family:monospace;font-size:.8rem}
"""


def _fig_png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _plots(y: np.ndarray, p: np.ndarray) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out = {}
    fig, ax = plt.subplots(figsize=(5, 4))
    for i, label in enumerate(LABELS):
        if 0 < (y == i).sum() < len(y):
            fpr, tpr, _ = roc_curve(y == i, p[:, i])
            ax.plot(fpr, tpr, label=f"{label} vs rest")
    normal = LABELS.index(NORMAL)
    if 0 < (y != normal).sum() < len(y):
        fpr, tpr, _ = roc_curve(y != normal, 1 - p[:, normal])
        ax.plot(fpr, tpr, "k--", label="pneumonia vs normal")
    ax.plot([0, 1], [0, 1], color="#bbb", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    else:  # every labelled image is of one class: no curve has both positives and negatives
        ax.text(0.5, 0.5, "one class only:\nno ROC curve", ha="center", va="center", color="#6b7785")
    out["roc"] = _fig_png(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    conf, correct = p.max(1), p.argmax(1) == y
    edges = np.linspace(0, 1, 11)
    mids, accs, counts = [], [], []
    for lo, hi in itertools.pairwise(edges):
        sel = (conf >= lo) & (conf < hi if hi < 1 else conf <= hi)
        if sel.any():
            mids.append(conf[sel].mean())
            accs.append(correct[sel].mean())
            counts.append(int(sel.sum()))
    ax.plot([0, 1], [0, 1], color="#bbb", lw=0.8)
    ax.plot(mids, accs, "o-")
    ax.set(
        xlabel="confidence (top-1 probability)",
        ylabel="accuracy",
        title="reliability",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    out["reliability"] = _fig_png(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for i, label in enumerate(LABELS):
        if (y == i).any():
            ax.hist(1 - p[y == i, normal], bins=20, range=(0, 1), alpha=0.5, label=f"true {label}")
    ax.set(xlabel="P(pneumonia)", ylabel="images", title="pneumonia score by true class")
    ax.legend(fontsize=8)
    out["histogram"] = _fig_png(fig)

    m = metrics.classification_metrics(y, p)
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    cm = np.array(m.confusion)
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(LABELS)), LABELS)
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    out["confusion"] = _fig_png(fig)
    return out


def _metrics_html(m: metrics.Metrics) -> str:
    rows = "".join(
        f"<tr><td class=l>{k}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
        f"<td>{v['f1']:.3f}</td><td>{v['auroc']:.3f}</td><td>{int(v['support'])}</td></tr>"
        for k, v in m.per_class.items()
    )
    cm = "".join(
        f"<tr><th class=l>{t}</th>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
        for t, row in zip(LABELS, m.confusion, strict=True)
    )
    b = m.binary
    return (
        '<table id="per-class"><tr><th class=l>class</th><th>precision</th><th>recall</th><th>F1</th>'
        f"<th>AUROC</th><th>support</th></tr>{rows}</table>"
        f"<p>accuracy {m.accuracy:.4f} · macro-F1 {m.macro_f1:.4f} · weighted-F1 {m.weighted_f1:.4f} · "
        f"macro-AUROC {m.macro_auroc:.4f} · ECE {m.ece:.4f} · normal vs pneumonia: sensitivity "
        f"{b['sensitivity_at_threshold']:.4f}, specificity {b['specificity_at_threshold']:.4f} at the "
        f"flag threshold {b['threshold']:.3f}, AUROC {b['auroc']:.4f}</p>"
        '<table id="confusion"><tr><th class=l>true \\ predicted</th>'
        + "".join(f"<th>{x}</th>" for x in LABELS)
        + f"</tr>{cm}</table>"
    )


def _gallery(t: pa.Table, top: int) -> str:
    flagged = t.filter(pc.fill_null(t["flagged"], False)).sort_by([("prob_pneumonia", "descending")])
    items = []
    for row in flagged.slice(0, top).to_pylist():
        img = ""
        if row.get("heatmap_uri"):
            try:
                img = _img(base64.b64encode(storage.read_bytes(row["heatmap_uri"])).decode(), row["uri"])
            except (OSError, FileNotFoundError):
                img = '<p class="note">heatmap missing</p>'
        items.append(
            f"<figure>{img}<figcaption>{html.escape(row['uri'].rsplit('/', 1)[-1])}<br>"
            f"P(pneumonia) {row['prob_pneumonia']:.3f}, predicted {row['pred_label']}"
            f"{', true ' + row['label'] if row.get('label') else ''}</figcaption></figure>"
        )
    if not items:
        return '<p class="note">No flagged studies.</p>'
    return f'<div class="gallery" id="gallery">{"".join(items)}</div>'


def render(run_dir: str, *, top: int = 24, title: str | None = None) -> str:
    """The HTML report of the run in ``run_dir`` (its predictions and summary)."""
    t = storage.read_table(storage.join(run_dir, "predictions.parquet"))
    summary: dict[str, Any] = {}
    if storage.exists(storage.join(run_dir, "summary.json")):
        summary = json.loads(storage.read_bytes(storage.join(run_dir, "summary.json")))
    n = t.num_rows
    ok = int(pc.sum(pc.equal(t["status"], "ok")).as_py() or 0)
    flagged = int(pc.sum(pc.fill_null(t["flagged"], False)).as_py() or 0)
    versions = sorted({v for v in t["model_version"].to_pylist() if v})
    kpis = [("images", n), ("ok", ok), ("errors", n - ok), ("flagged", flagged)]
    if summary.get("images_per_s"):
        kpis.append(("img/s", f"{summary['images_per_s']:.1f}"))
    parts = [
        f"<h1>{html.escape(title or 'cxr-ray scoring report')}</h1>",
        f"<p>run {html.escape(str(summary.get('run_id', '')))} · model {', '.join(versions)} · engine "
        f"{', '.join(sorted(set(t['engine'].to_pylist())))}</p>",
        '<div id="summary">' + "".join(f'<span class="kpi"><b>{v}</b>{k}</span>' for k, v in kpis) + "</div>",
    ]
    y, p = labelled_arrays(t)
    if len(y):
        m = metrics.classification_metrics(y, p, threshold=float(summary.get("threshold", 0.5)))
        figs = _plots(y, p)
        parts += [
            f"<h2>Per-class metrics ({len(y)} labelled images)</h2>",
            _metrics_html(m),
            '<h2>Curves</h2><div class="figs">',
            *(_img(figs[k], k) for k in ("confusion", "roc", "reliability", "histogram")),
            "</div>",
        ]
    else:
        parts.append('<h2>Per-class metrics</h2><p class="note">No labelled images in this run.</p>')
    parts += [f"<h2>Most suspicious flagged studies (top {top})</h2>", _gallery(t, top)]
    errors = t.filter(pc.not_equal(t["status"], "ok")).select(["uri", "error"]).slice(0, 200).to_pylist()
    parts.append(f"<h2>Error rows ({n - ok})</h2>")
    if errors:
        parts.append(
            '<table class="err" id="errors"><tr><th class=l>uri</th><th class=l>error</th></tr>'
            + "".join(
                f"<tr><td>{html.escape(r['uri'])}</td><td>{html.escape(r['error'] or '')}</td></tr>"
                for r in errors
            )
            + "</table>"
        )
    else:
        parts.append('<p class="note">None.</p>')
    body = "\n".join(parts)
    head = f'<meta charset="utf-8"><title>{html.escape(title or "cxr-ray report")}</title>'
    return (
        f'<!doctype html><html lang="en"><head>{head}<style>{_CSS}</style></head><body>{body}</body></html>\n'
    )


def write_report(run_dir: str, out: str | None = None, **kwargs: Any) -> str:
    """Render and write ``report.html`` (atomically); returns where it went."""
    target = out or storage.join(run_dir, "report.html")
    storage.write_bytes(render(run_dir, **kwargs).encode("utf-8"), target)
    return target
