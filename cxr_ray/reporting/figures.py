"""The report's figures and metric tables (matplotlib PNGs inlined as base64, HTML tables)."""

from __future__ import annotations

import base64
import html
import io
import itertools
from typing import Any

import numpy as np

from cxr_ray import metrics
from cxr_ray.labels import LABELS, NORMAL


def fig_bytes(fig: Any, dpi: float | None = None) -> bytes:
    """A matplotlib figure as PNG bytes (laid out tight, then closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi or "figure")
    plt.close(fig)
    return buf.getvalue()


def fig_png(fig: Any) -> str:
    return base64.b64encode(fig_bytes(fig, dpi=100)).decode()


def img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def plots(y: np.ndarray, p: np.ndarray) -> dict[str, str]:
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
    out["roc"] = fig_png(fig)

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
    out["reliability"] = fig_png(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for i, label in enumerate(LABELS):
        if (y == i).any():
            ax.hist(1 - p[y == i, normal], bins=20, range=(0, 1), alpha=0.5, label=f"true {label}")
    ax.set(xlabel="P(pneumonia)", ylabel="images", title="pneumonia score by true class")
    ax.legend(fontsize=8)
    out["histogram"] = fig_png(fig)

    m = metrics.classification_metrics(y, p)
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    cm = np.array(m.confusion)
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(LABELS)), LABELS)
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    out["confusion"] = fig_png(fig)
    return out


def metrics_html(m: metrics.Metrics, prefix: str = "") -> str:
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
        f'<table id="{prefix}per-class"><tr><th class=l>class</th><th>precision</th><th>recall</th>'
        f"<th>F1</th><th>AUROC</th><th>support</th></tr>{rows}</table>"
        f"<p>accuracy {m.accuracy:.4f} · macro-F1 {m.macro_f1:.4f} · weighted-F1 {m.weighted_f1:.4f} · "
        f"macro-AUROC {m.macro_auroc:.4f} · ECE {m.ece:.4f} · normal vs pneumonia: sensitivity "
        f"{b['sensitivity_at_threshold']:.4f}, specificity {b['specificity_at_threshold']:.4f} at the "
        f"flag threshold {b['threshold']:.3f}, AUROC {b['auroc']:.4f}</p>"
        f'<table id="{prefix}confusion"><tr><th class=l>true \\ predicted</th>'
        + "".join(f"<th>{x}</th>" for x in LABELS)
        + f"</tr>{cm}</table>"
    )


def levels_html(image: metrics.Metrics, study: metrics.Metrics) -> str:
    """Image-level and study-level headline metrics side by side."""
    rows = [
        ("labelled", f"{image.n}", f"{study.n}"),
        *(
            (name, f"{getattr(image, attr):.4f}", f"{getattr(study, attr):.4f}")
            for name, attr in (
                ("accuracy", "accuracy"),
                ("macro-F1", "macro_f1"),
                ("macro-AUROC", "macro_auroc"),
            )
        ),
        *(
            (name, f"{image.binary[key]:.4f}", f"{study.binary[key]:.4f}")
            for name, key in (
                ("sensitivity at the flag threshold", "sensitivity_at_threshold"),
                ("specificity at the flag threshold", "specificity_at_threshold"),
                ("normal vs pneumonia AUROC", "auroc"),
            )
        ),
    ]
    body = "".join(f"<tr><td class=l>{k}</td><td>{a}</td><td>{b}</td></tr>" for k, a, b in rows)
    return f'<table id="levels"><tr><th class=l></th><th>images</th><th>studies</th></tr>{body}</table>'
