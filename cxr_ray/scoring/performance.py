"""A labelled run's measured performance against the model card's: the performance alert.

Any scoring run whose images carry labels (Kermany file names or folders, a manifest's
``label`` column, a review CSV) measures pneumonia sensitivity and specificity **at the flag
threshold** and 3-class accuracy. ``check_performance`` compares each with the card's
validation figure, as counts: the card's from its validation confusion / split counts, the
run's from its labels. The test accounts for both sample sizes: a one-sided Fisher exact test
of "the run's proportion is lower than validation's" (scipy.stats.fisher_exact on the 2x2
table of successes and failures), Holm-corrected across the three at ``alpha`` (0.05), and an
alert needs a drop of at least ``min_drop`` (0.02) as well, so a huge run cannot alert on a
trivial difference. ``summary.json`` gets the ``performance_check`` block; the console and
the log get one ``PERFORMANCE ALERT`` line when a figure is below what validation promised.

Each figure comes with its 95% interval (Clopper-Pearson, exact binomial) for the run and the
card, so the line reads like the card::

    PERFORMANCE ALERT: specificity 0.825 [0.780, 0.864] (n=234) at the flag threshold 0.779 is
    below the model card's 0.990 [0.963, 0.999] (n=192), Holm p=2e-09
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from cxr_ray.labels import LABELS, NORMAL
from cxr_ray.models.card import ModelCard

__all__ = ["card_counts", "check_accumulated", "check_performance", "performance_line", "run_counts"]

logger = logging.getLogger(__name__)

ALPHA = 0.05
MIN_DROP = 0.02
CHECKED = ("sensitivity", "specificity", "accuracy")
_NORMAL = LABELS.index(NORMAL)


def clopper_pearson(k: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of ``k`` successes in ``n`` (an effective size may be fractional)."""
    from scipy.stats import beta

    if n == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def card_counts(card: ModelCard) -> dict[str, tuple[int, int]] | None:
    """``metric -> (successes, n)`` of the card's validation figures at its flag threshold, or
    ``None`` when the card has no validation metrics with their sample sizes."""
    val = card.metrics.get("validation") or {}
    confusion = card.metrics.get("validation_confusion")
    if not val or not confusion:
        return None
    conf = np.asarray(confusion, np.int64)
    n_normal = int(conf[_NORMAL].sum())
    n = int(conf.sum())
    n_pos = n - n_normal
    figures = {
        "sensitivity": (val.get("binary_sensitivity_at_threshold"), n_pos),
        "specificity": (val.get("binary_specificity_at_threshold"), n_normal),
        "accuracy": (val.get("accuracy"), n),
    }
    out = {}
    for m, (value, size) in figures.items():
        if value is None or not math.isfinite(float(value)) or size == 0:
            return None
        out[m] = (round(float(value) * size), size)
    return out


def _success(y: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per metric: (success per image, counted per image) as booleans."""
    y = np.asarray(y, np.int64)
    p = 1.0 - np.asarray(probs, np.float64)[:, _NORMAL]
    flag = p >= threshold
    pos = y != _NORMAL
    correct = np.asarray(probs).argmax(1) == y if len(y) else np.zeros(0, bool)
    everyone = np.ones(len(y), bool)
    return {"sensitivity": (flag, pos), "specificity": (~flag, ~pos), "accuracy": (correct, everyone)}


def design_effect(success: np.ndarray, counted: np.ndarray, units: np.ndarray) -> float:
    """Kish's design effect of a proportion over images that come in clusters (``units``, e.g.
    hashed patient keys): the cluster-robust variance of the share over the binomial one
    (Korn & Graubard 1998 divide the sample size by it for an exact interval), at least 1.
    1 when there are fewer than 2 clusters or the share is 0 or 1."""
    success, counted = np.asarray(success, bool)[counted], np.asarray(units)[counted]
    n, k = len(success), int(success.sum())
    if n == 0 or k in (0, n):
        return 1.0
    _, inverse = np.unique(counted, return_inverse=True)
    g = int(inverse.max()) + 1
    if g < 2:
        return 1.0
    p = k / n
    n_c = np.bincount(inverse, minlength=g).astype(np.float64)
    k_c = np.bincount(inverse, weights=success.astype(np.float64), minlength=g)
    var_cluster = g / (g - 1) * float(np.sum((k_c - n_c * p) ** 2)) / n**2
    return max(1.0, var_cluster / (p * (1 - p) / (n - 1)))  # both unbiased: 1 for one image each


def run_counts(y: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, tuple[int, int]]:
    """``metric -> (successes, n)`` of a labelled run at ``threshold`` (3-class accuracy at argmax)."""
    y = np.asarray(y, np.int64)
    p = 1.0 - np.asarray(probs, np.float64)[:, _NORMAL]
    flag = p >= threshold
    pos = y != _NORMAL
    return {
        "sensitivity": (int((flag & pos).sum()), int(pos.sum())),
        "specificity": (int((~flag & ~pos).sum()), int((~pos).sum())),
        "accuracy": (int((np.asarray(probs).argmax(1) == y).sum()), len(y)),
    }


def _holm(p: list[float]) -> list[float]:
    """Holm-adjusted p-values (NaN stays NaN and does not count)."""
    idx = [i for i in np.argsort(p) if math.isfinite(p[i])]
    m = len(idx)
    out = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def check_performance(
    card: ModelCard,
    y: np.ndarray,
    probs: np.ndarray,
    *,
    threshold: float | None = None,
    alpha: float = ALPHA,
    min_drop: float = MIN_DROP,
    units: np.ndarray | None = None,
) -> dict[str, Any]:
    """The ``performance_check`` block of a labelled run (``y`` class indices, ``probs``
    calibrated ``[n, 3]``): per metric the run's and the card's value, counts and 95%
    intervals, the one-sided p-value (Holm-adjusted) and whether it alerts.

    ``units`` (one key per image, e.g. ``drift_units.key_hashes`` of the patients): images of
    one patient are not independent, so the run's counts enter the test and its interval at
    their effective size, ``n / design_effect`` (Korn & Graubard 1998), and the block says
    ``n_effective`` and ``design_effect`` per metric."""
    t = card.pneumonia_threshold if threshold is None else threshold
    if len(y) == 0:
        return {"status": "no_labels"}
    ref = card_counts(card)
    run = run_counts(y, probs, t)
    deff = {m: 1.0 for m in CHECKED}
    if units is not None and len(units) == len(y):
        deff = {m: design_effect(ok, counted, units) for m, (ok, counted) in _success(y, probs, t).items()}
    run_eff = {m: _effective(*run[m], deff[m]) for m in CHECKED}
    if ref is None:
        return {"status": "no_card_figures", "threshold": t, "n_labelled": len(y), **_run_only(run)}
    raw = [_fisher_below(ref[m], run_eff[m]) for m in CHECKED]
    adjusted = _holm(raw)
    figures: dict[str, Any] = {}
    alerts = []
    for m, p_raw, p_adj in zip(CHECKED, raw, adjusted, strict=True):
        (k1, n1), (k2, n2) = ref[m], run[m]
        value = k2 / n2 if n2 else math.nan
        card_value = k1 / n1
        alert = bool(math.isfinite(p_adj) and p_adj < alpha and card_value - value >= min_drop)
        low, high = clopper_pearson(*run_eff[m])
        figures[m] = {
            "value": _r(value),
            "low": _r(low),
            "high": _r(high),
            "n": n2,
            "n_effective": _r(run_eff[m][1], 1),
            "design_effect": _r(deff[m], 3),
            "card": _r(card_value),
            "card_low": _r(clopper_pearson(k1, n1)[0]),
            "card_high": _r(clopper_pearson(k1, n1)[1]),
            "card_n": n1,
            "p_value": _sig(p_raw),
            "p_holm": _sig(p_adj),
            "alert": alert,
        }
        if alert:
            alerts.append(m)
    return {
        "status": "checked",
        "alert": bool(alerts),
        "alerts": alerts,
        "threshold": round(t, 6),
        "n_labelled": len(y),
        "alpha": alpha,
        "min_drop": min_drop,
        "test": "one-sided Fisher exact (run below validation), Holm over sensitivity, specificity, accuracy"
        + ("; the run's counts at their effective size over patients" if units is not None else ""),
        "card_source": "lineage (site-calibrated card: figures of the parent's validation)"
        if card.lineage
        else "validation",
        **figures,
    }


def _fisher_below(card: tuple[int, int], run: tuple[float, float]) -> float:
    """One-sided Fisher exact p-value of "the run's share is below the card's" (the run's
    effective counts rounded to whole ones for the table); NaN without run images."""
    from scipy.stats import fisher_exact

    (k1, n1), (k2, n2) = card, run
    if n2 == 0:
        return math.nan
    k, n = round(k2), max(1, round(n2))
    return float(fisher_exact([[k1, n1 - k1], [k, n - k]], alternative="greater").pvalue)


def _effective(k: int, n: int, deff: float) -> tuple[float, float]:
    """(successes, trials) at the effective sample size ``n / deff``, the share kept."""
    if n == 0 or deff <= 1.0:
        return float(k), float(n)
    n_eff = n / deff
    return k / n * n_eff, n_eff


def _run_only(run: dict[str, tuple[int, int]]) -> dict[str, Any]:
    out = {}
    for m, (k, n) in run.items():
        lo, hi = clopper_pearson(k, n)
        out[m] = {"value": _r(k / n if n else math.nan), "low": _r(lo), "high": _r(hi), "n": n}
    return out


def _sig(p: float) -> float | None:
    """A p-value to 3 significant digits (tiny ones stay visible: 2.1e-09, not 0)."""
    return None if not math.isfinite(p) else float(f"{p:.3g}")


def _r(x: float, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def performance_line(c: dict[str, Any]) -> str | None:
    """The console line of a ``performance_check`` block: the measured figures at the flag
    threshold, ``PERFORMANCE ALERT`` first when one is below the card's (``None``: no labels)."""
    if not c or c.get("status") not in ("checked", "no_card_figures"):
        return None

    def fmt(m: str) -> str:
        f = c[m]
        if f.get("value") is None:
            return f"{m} n/a"
        s = f"{m} {f['value']:.3f} [{f['low']:.3f}, {f['high']:.3f}] (n={f['n']})"
        if "card" in f:
            s += f" vs card {f['card']:.3f} [{f['card_low']:.3f}, {f['card_high']:.3f}] (n={f['card_n']})"
            if f["alert"]:
                s += f", Holm p={f['p_holm']:.2g}"
        return s

    at = f"at the flag threshold {c['threshold']:.3f}"
    if c.get("alert"):
        worse = [fmt(m) for m in c["alerts"]]
        return f"PERFORMANCE ALERT ({at}): " + "; ".join(worse) + ": below what the model card promised"
    body = "; ".join(fmt(m) for m in CHECKED)
    if c["status"] == "no_card_figures":
        return f"measured performance ({at}): {body} (the card has no validation figures to compare)"
    return f"measured performance ({at}, {c['n_labelled']} labelled): {body}: within the model card's"


def check_accumulated(
    card: ModelCard, ys: list[np.ndarray], ps: list[np.ndarray], units: list[np.ndarray] | None = None
) -> dict[str, Any]:
    """``check_performance`` of a scoring run's labelled rows (``ScoreAccumulator.y`` / ``.p``
    / ``.units``), with one log warning when it alerts; ``{}`` when the run has no labels."""
    if not ys:
        return {}
    keys = np.concatenate(units) if units else None
    c = check_performance(card, np.concatenate(ys), np.concatenate(ps), units=keys)
    if c.get("alert"):
        logger.warning("%s", performance_line(c))
    return c


def history_rows(
    estimate: dict[str, Any], check: dict[str, Any], *, n_images: int, reference_n: int = 0
) -> list[dict[str, Any]]:
    """Rows in the drift table's schema (``drift.parquet``, hence nightly ``ROOT/drift_history``)
    for the estimate (``check = performance_estimate``, ``role = info``) and a labelled run's
    check (``check = performance_check``: ``value`` measured, ``threshold`` the card's value,
    ``p_value`` / ``p_adjusted``, ``alert``), one per metric::

        SELECT run_id, value FROM drift_history
        WHERE "check" = 'performance_estimate' AND statistic = 'specificity'
    """
    rows: list[dict[str, Any]] = []
    for m in ("sensitivity", "specificity", "accuracy", "flag_rate"):
        v = (estimate or {}).get(m)
        if not v or v.get("estimate") is None:
            continue
        rel = "" if estimate.get("reliable", True) else f"; unreliable: {estimate.get('note')}"
        rows.append(
            {
                "check": "performance_estimate", "statistic": m, "value": v["estimate"], "threshold": None,
                "alert": False, "n_images": n_images, "reference_n": reference_n, "role": "info",
                "note": f"95% [{v['low']}, {v['high']}]{rel}", "method": estimate.get("method"),
            }
        )  # fmt: skip
    if (check or {}).get("status") == "checked":
        for m in CHECKED:
            f = check[m]
            rows.append(
                {
                    "check": "performance_check", "statistic": m, "value": f["value"], "threshold": f["card"],
                    "alert": bool(f["alert"]), "n_images": n_images, "n_used": f["n"],
                    "reference_n": f["card_n"], "role": "test",
                    "p_value": f["p_value"], "p_adjusted": f["p_holm"], "effect": _drop(f),
                    "note": f"at the flag threshold {check['threshold']}", "method": "fisher-holm",
                }
            )  # fmt: skip
    return rows


def _drop(f: dict[str, Any]) -> float | None:
    return None if f["value"] is None or f["card"] is None else round(f["card"] - f["value"], 4)


def append_history_rows(out: str, result: Any) -> None:
    """Add ``history_rows`` of a finished run (``ScoreResult``) to ``OUT/drift.parquet`` when the
    run wrote one (nightly roots copy it into ``ROOT/drift_history``)."""
    from cxr_ray.io import storage
    from cxr_ray.scoring.drift_io import DRIFT_TABLE_SCHEMA

    uri = storage.join(out, "drift.parquet")
    rows = history_rows(
        result.performance_estimate,
        result.performance_check,
        n_images=result.ok,
        reference_n=int(result.drift.get("reference_n") or 0),
    )
    if not rows or not storage.exists(uri):
        return
    import pyarrow as pa

    old = storage.read_table(uri)
    ids = {"run_id": result.run_id, "model_version": result.model_version}
    new = pa.Table.from_pylist([ids | r for r in rows], schema=DRIFT_TABLE_SCHEMA)
    storage.write_table(pa.concat_tables([old.cast(DRIFT_TABLE_SCHEMA), new]), uri, DRIFT_TABLE_SCHEMA)
