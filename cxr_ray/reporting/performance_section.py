"""The report's performance banner: the labelled run's check against the card (a red banner
when it alerts) and the label-free estimate, both from ``summary.json``."""

from __future__ import annotations

import html
from typing import Any

from cxr_ray.scoring.estimate import estimate_line
from cxr_ray.scoring.performance import performance_line


def performance_section(summary: dict[str, Any]) -> str:
    """HTML for ``summary['performance_check']`` and ``summary['performance_estimate']``
    (empty when the run has neither)."""
    parts = []
    check = performance_line(summary.get("performance_check") or {})
    if check:
        alert = bool((summary.get("performance_check") or {}).get("alert"))
        style = "background:#fde2e1;border:2px solid #b3261e" if alert else "background:#eef6ee"
        parts.append(f'<p id="performance-check" style="{style};padding:.5em">{html.escape(check)}</p>')
    estimate = estimate_line(summary.get("performance_estimate") or {})
    if estimate:
        parts.append(f'<p id="performance-estimate" class="note">{html.escape(estimate)}</p>')
    return "\n".join(parts)
