"""Retrospective screening of a whole archive: score everything, rank the flagged studies.

    screen(source, artifact, out, settings, top=20) -> ScreenResult

Writes what ``score`` writes into OUT plus ``OUT/flagged.parquet``: the flagged rows (same
schema as ``predictions.parquet``), most suspicious (highest ``prob_pneumonia``) first.
Summaries name studies by ``image_id`` prefix only: file names and URIs can carry patient
identifiers (Kermany's ``person123_bacteria_4.jpeg``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.config import Settings
from cxr_ray.io import storage
from cxr_ray.labels import LABELS
from cxr_ray.models.artifact import Artifact
from cxr_ray.scoring.pipeline import ScoreResult, format_summary, score
from cxr_ray.scoring.schema import PREDICTIONS_SCHEMA

logger = logging.getLogger(__name__)

FLAGGED_FILE = "flagged.parquet"
#: Columns of the top-N list: no uri, no patient id.
_TOP_COLUMNS = ("image_id", "prob_pneumonia", "pred_label", *(f"prob_{k}" for k in LABELS))


@dataclass
class ScreenResult:
    scored: ScoreResult
    flagged_uri: str
    flagged: int = 0
    #: Rows per predicted class (``error`` for rows with no prediction).
    predicted: dict[str, int] = field(default_factory=dict)
    #: The ``top`` most suspicious flagged studies: image_id, probabilities, predicted label.
    top: list[dict[str, Any]] = field(default_factory=list)


class _Collector:
    """``on_block`` that keeps the flagged rows and counts predicted classes as blocks commit."""

    def __init__(self, then: Callable[[pa.Table], None] | None) -> None:
        self.then = then
        self.flagged: list[pa.Table] = []
        self.predicted: Counter[str] = Counter()

    def __call__(self, table: pa.Table) -> None:
        for label, n in zip(*_value_counts(table["pred_label"]), strict=True):
            self.predicted[label if label is not None else "error"] += n
        self.flagged.append(table.filter(pc.fill_null(table["flagged"], False)))
        if self.then is not None:
            self.then(table)


def _value_counts(col: pa.ChunkedArray) -> tuple[list[str | None], list[int]]:
    counts = pc.value_counts(col)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


def screen(
    source: str,
    artifact: Artifact | str,
    out: str,
    settings: Settings,
    *,
    top: int = 20,
    history: str | None = None,
    overwrite: bool = False,
    on_block: Callable[[pa.Table], None] | None = None,
) -> ScreenResult:
    """Score every image of ``source`` into ``out`` and write the ranked flagged table.

    ``history`` (default: ``metrics_history.parquet`` beside ``out``), ``overwrite`` and
    ``on_block`` are passed to ``score``.
    """
    collect = _Collector(on_block)
    history = history or storage.join(storage.parent(out), "metrics_history.parquet")
    scored = score(source, artifact, out, settings, history=history, overwrite=overwrite, on_block=collect)
    flagged = (
        pa.concat_tables(collect.flagged).cast(PREDICTIONS_SCHEMA)
        if collect.flagged
        else PREDICTIONS_SCHEMA.empty_table()
    )
    flagged = flagged.sort_by([("prob_pneumonia", "descending"), ("image_id", "ascending")])
    flagged_uri = storage.join(out, FLAGGED_FILE)
    storage.write_table(flagged, flagged_uri, PREDICTIONS_SCHEMA)
    logger.info("%d flagged studies written to %s", flagged.num_rows, flagged_uri)
    return ScreenResult(
        scored,
        flagged_uri,
        flagged=flagged.num_rows,
        predicted=dict(sorted(collect.predicted.items())),
        top=flagged.slice(0, max(top, 0)).select(list(_TOP_COLUMNS)).to_pylist(),
    )


def format_screen(r: ScreenResult) -> str:
    """The scoring summary, counts per predicted class and the top flagged studies."""
    lines = [
        format_summary(r.scored),
        "predicted: " + ", ".join(f"{k}={v}" for k, v in r.predicted.items()),
        f"flagged studies: {r.flagged} in {r.flagged_uri} (top {len(r.top)} below, by image id)",
    ]
    for row in r.top:
        probs = " ".join(f"{k}={row[f'prob_{k}']:.3f}" for k in LABELS)
        lines.append(
            f"  {row['image_id'][:12]}  P(pneumonia)={row['prob_pneumonia']:.3f}  "
            f"{row['pred_label']:<9}  {probs}"
        )
    return "\n".join(lines)
