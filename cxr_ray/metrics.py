"""Classification metrics as pure functions over arrays (scikit-learn does the arithmetic).

Inputs are integer class indices in ``LABELS`` order and probability rows. Every metric is
defined for every class whatever the data: a class absent from ``y_true`` has recall 0 and
AUROC NaN rather than an exception, so nightly runs over small batches never crash.

Tables are long-format (one row per metric and class) with explicit schemas, so history
tables keep one schema however the metric set grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from cxr_ray.labels import LABELS, NORMAL


def _doc(name: str, typ: pa.DataType, description: str, *, nullable: bool = True) -> pa.Field:
    # A leaf module: the same metadata keys as cxr_ray.io.columns (b"description").
    return pa.field(name, typ, nullable=nullable, metadata={b"description": description.encode()})


def _table_meta(table: str) -> dict[bytes, bytes]:
    return {b"cxr_ray.table": table.encode(), b"cxr_ray.schema_version": b"1"}


#: ``metrics.parquet`` and the metrics history: long format, one row per (metric, class).
METRICS_SCHEMA = pa.schema(
    [
        _doc("run_id", pa.string(), "the scoring run"),
        _doc("model_version", pa.string(), "the model that scored it (architecture + weights hash prefix)"),
        _doc(
            "metric",
            pa.string(),
            "accuracy, macro_f1, weighted_f1, macro_auroc, ece; per class precision, recall, f1, "
            "support, auroc (one-vs-rest); binary_* for normal vs pneumonia",
            nullable=False,
        ),
        _doc("label", pa.string(), "the class of a per-class metric; null for metrics over all classes"),
        _doc("value", pa.float64(), "the metric's value (support: a count, also in the support column)"),
        _doc("n", pa.int64(), "labelled images the run's metrics are computed on"),
        _doc(
            "support",
            pa.int64(),
            "per-class rows: labelled images of that class (integer); null for metrics over all classes",
        ),
    ],
    metadata=_table_meta("metrics"),
)
#: ``confusion.parquet``: one row per (true class, predicted class).
CONFUSION_SCHEMA = pa.schema(
    [
        _doc("run_id", pa.string(), "the scoring run"),
        _doc("model_version", pa.string(), "the model that scored it"),
        _doc("true_label", pa.string(), "the image's true class", nullable=False),
        _doc("pred_label", pa.string(), "the class the model predicted (argmax)", nullable=False),
        _doc("count", pa.int64(), "labelled images with this true and predicted class", nullable=False),
    ],
    metadata=_table_meta("confusion"),
)


@dataclass
class Metrics:
    """Everything ``classification_metrics`` computes (JSON-friendly floats)."""

    n: int
    accuracy: float
    macro_f1: float
    weighted_f1: float
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    macro_auroc: float
    #: Normal vs pneumonia (bacterial + viral): sensitivity/specificity at argmax and at the
    #: flag threshold on P(pneumonia), and AUROC of P(pneumonia).
    binary: dict[str, float] = field(default_factory=dict)
    ece: float = math.nan

    def summary(self) -> dict[str, float]:
        """Flat ``name -> value`` dict (for Ray Train reports and model cards)."""
        out = {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1,
            "macro_auroc": self.macro_auroc,
            "ece": self.ece,
        }
        out.update({f"binary_{k}": v for k, v in self.binary.items()})
        for label, vals in self.per_class.items():
            out.update({f"{label}_{k}": v for k, v in vals.items()})
        return out


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if y.min(initial=1) == y.max(initial=0):  # one class only: undefined
        return math.nan
    return float(roc_auc_score(y, score))


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-1 confidence, equal-width bins (Guo et al., 2017)."""
    if len(y_true) == 0:
        return math.nan
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def binary_metrics(y_true: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Normal (class 0) vs pneumonia (the rest), from 3-class probabilities."""
    normal = LABELS.index(NORMAL)
    truth = y_true != normal
    p_pneu = 1.0 - probs[:, normal]
    out: dict[str, float] = {"auroc": _auroc(truth.astype(int), p_pneu)}
    for name, pred in (
        ("argmax", probs.argmax(axis=1) != normal),
        ("flag", p_pneu >= threshold),
    ):
        tp = int(np.sum(pred & truth))
        tn = int(np.sum(~pred & ~truth))
        pos, neg = int(truth.sum()), int((~truth).sum())
        suffix = "" if name == "argmax" else "_at_threshold"
        out[f"sensitivity{suffix}"] = tp / pos if pos else math.nan
        out[f"specificity{suffix}"] = tn / neg if neg else math.nan
        out[f"accuracy{suffix}"] = (tp + tn) / len(truth) if len(truth) else math.nan
    out["threshold"] = float(threshold)
    return out


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, *, threshold: float = 0.5) -> Metrics:
    """Per-class and overall metrics of 3-class probabilities against true class indices."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(LABELS)
    if probs.ndim != 2 or probs.shape != (len(y_true), k):
        raise ValueError(f"probs must be [N, {k}] for N={len(y_true)}, got {probs.shape}")
    if len(y_true) == 0:
        nan = math.nan
        return Metrics(0, nan, nan, nan, {}, [[0] * k for _ in range(k)], nan)
    y_pred = probs.argmax(axis=1)
    labels = list(range(k))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {}
    aurocs = []
    for i, name in enumerate(LABELS):
        auc = _auroc((y_true == i).astype(int), probs[:, i])
        aurocs.append(auc)
        per_class[name] = {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": float(s[i]),
            "auroc": auc,
        }
    valid = [a for a in aurocs if not math.isnan(a)]
    support = s.astype(np.float64)
    return Metrics(
        n=len(y_true),
        accuracy=float(np.mean(y_pred == y_true)),
        macro_f1=float(np.mean(f)),
        weighted_f1=float(np.sum(f * support) / support.sum()),
        per_class=per_class,
        confusion=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        macro_auroc=float(np.mean(valid)) if valid else math.nan,
        binary=binary_metrics(y_true, probs, threshold),
        ece=expected_calibration_error(probs, y_true),
    )


def metrics_table(m: Metrics, *, run_id: str | None = None, model_version: str | None = None) -> pa.Table:
    rows: list[dict[str, Any]] = []

    support = {label: int(vals["support"]) for label, vals in m.per_class.items()}

    def add(metric: str, value: float, label: str | None = None) -> None:
        rows.append(
            {
                "run_id": run_id,
                "model_version": model_version,
                "metric": metric,
                "label": label,
                "value": value,
                "n": m.n,
                "support": support.get(label) if label is not None else None,
            }
        )

    for name in ("accuracy", "macro_f1", "weighted_f1", "macro_auroc", "ece"):
        add(name, getattr(m, name))
    for key, value in m.binary.items():
        add(f"binary_{key}", value)
    for label, vals in m.per_class.items():
        for key, value in vals.items():
            add(key, value, label)
    return pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)


def confusion_table(m: Metrics, *, run_id: str | None = None, model_version: str | None = None) -> pa.Table:
    rows = [
        {
            "run_id": run_id,
            "model_version": model_version,
            "true_label": t,
            "pred_label": p,
            "count": int(m.confusion[i][j]),
        }
        for i, t in enumerate(LABELS)
        for j, p in enumerate(LABELS)
    ]
    return pa.Table.from_pylist(rows, schema=CONFUSION_SCHEMA)


def format_metrics(m: Metrics) -> str:
    """A small plain-text table of the per-class metrics and the headline numbers."""
    lines = [f"{'class':<10} {'precision':>9} {'recall':>7} {'f1':>6} {'auroc':>6} {'support':>8}"]
    for label, v in m.per_class.items():
        lines.append(
            f"{label:<10} {v['precision']:>9.3f} {v['recall']:>7.3f} {v['f1']:>6.3f} "
            f"{v['auroc']:>6.3f} {int(v['support']):>8d}"
        )
    b = m.binary
    lines.append(
        f"accuracy {m.accuracy:.4f}  macro-F1 {m.macro_f1:.4f}  weighted-F1 {m.weighted_f1:.4f}  "
        f"macro-AUROC {m.macro_auroc:.4f}  (n={m.n})"
    )
    if b:
        lines.append(
            f"normal vs pneumonia: sensitivity {b['sensitivity']:.4f}  specificity "
            f"{b['specificity']:.4f}  AUROC {b['auroc']:.4f}; at threshold {b['threshold']:.3f}: "
            f"sensitivity {b['sensitivity_at_threshold']:.4f}  specificity "
            f"{b['specificity_at_threshold']:.4f}"
        )
    return "\n".join(lines)


def format_metrics_summary(summary: dict[str, float], title: str = "validation") -> str:
    """The headline numbers of a ``Metrics.summary()`` dict, on one line."""
    if not summary:
        return "(no metrics)"
    keys = (
        ("accuracy", "accuracy"),
        ("macro_f1", "macro-F1"),
        ("macro_auroc", "macro-AUROC"),
        # At the flag threshold (what ``flagged`` uses), not at argmax.
        ("binary_sensitivity_at_threshold", "pneumonia sensitivity"),
        ("binary_specificity_at_threshold", "specificity"),
        ("ece", "ECE"),
    )
    line = "  ".join(f"{name} {summary[k]:.4f}" for k, name in keys if k in summary)
    if "binary_threshold" in summary:
        line += f" (sensitivity/specificity at the flag threshold {summary['binary_threshold']:.3f})"
    return f"{title}: {line}"
