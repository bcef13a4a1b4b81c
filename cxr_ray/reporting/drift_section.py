"""The report's drift section (figures from a run's ``drift.parquet``)."""

from __future__ import annotations


def drift_section(out_dir: str) -> str:
    """HTML of the drift section for the run in ``out_dir`` ("" when it has no drift figures)."""
    return ""
