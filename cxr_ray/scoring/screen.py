"""Retrospective screening of a whole archive: score everything, rank the flagged studies.

    screen(source, artifact, out, settings, top=20) -> ScreenResult

Writes what ``score`` writes into OUT plus ``OUT/flagged.parquet``: the flagged *studies*, the
rows of ``studies.parquet`` (same ``STUDIES_SCHEMA``) whose ``flagged`` is true, most
suspicious (highest ``prob_pneumonia``, then smallest ``driving_image_id``) first. A study's
result is its driving image's (``cxr_ray.scoring.studies``): a PA and a lateral of one visit
are one entry, not two.

Summaries name a study by its driving image's ``image_id`` prefix (the sha256 of the file
bytes; ``driving_image_id`` in ``flagged.parquet``, ``image_id`` in ``predictions.parquet``),
never by its study key: that is a StudyInstanceUID or a patient id, and file names and URIs
can carry patient identifiers too (Kermany's ``person123_bacteria_4.jpeg``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.config import Settings
from cxr_ray.io import storage
from cxr_ray.labels import LABELS
from cxr_ray.models.artifact import Artifact
from cxr_ray.scoring.pipeline import score
from cxr_ray.scoring.result import REF_CHARS, ScoreResult, flagged_studies, format_summary
from cxr_ray.scoring.studies import STUDIES_SCHEMA

logger = logging.getLogger(__name__)

FLAGGED_FILE = "flagged.parquet"
#: How ``predicted`` counts studies with no scored image (all skipped or errors).
NOT_SCORED = "not scored"
#: Columns of the top-N list: no study key, uri, patient id, accession number or UID.
TOP_COLUMNS = (
    "driving_image_id",
    "prob_pneumonia",
    "pred_label",
    *(f"prob_{k}" for k in LABELS),
    "images",
    "scored",
    "skipped",
    "errors",
)


@dataclass
class ScreenResult:
    scored: ScoreResult
    flagged_uri: str
    #: Flagged studies (rows of ``flagged.parquet``).
    flagged: int = 0
    #: Studies per predicted class of their driving image (``NOT_SCORED``: no scored image).
    predicted: dict[str, int] = field(default_factory=dict)
    #: The ``top`` most suspicious flagged studies (``TOP_COLUMNS``), most suspicious first.
    top: list[dict[str, Any]] = field(default_factory=list)


def predicted_counts(studies: pa.Table) -> dict[str, int]:
    """Studies per predicted class (``NOT_SCORED`` for studies without a scored image)."""
    counts = pc.value_counts(studies["pred_label"])
    labels, ns = counts.field("values").to_pylist(), counts.field("counts").to_pylist()
    out = {label if label is not None else NOT_SCORED: n for label, n in zip(labels, ns, strict=True)}
    return dict(sorted(out.items()))


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
    after_score: Callable[[ScoreResult], None] | None = None,
) -> ScreenResult:
    """Score every image of ``source`` into ``out`` and write the ranked flagged studies.

    ``history`` (default: ``metrics_history.parquet`` beside ``out``), ``overwrite`` and
    ``on_block`` are passed to ``score``; ``after_score`` runs once ``out`` holds the run
    (results delivered to a PACS: ``cxr_ray.writeback.deliver.deliver_run``).
    """
    history = history or storage.join(storage.parent(out), "metrics_history.parquet")
    scored = score(source, artifact, out, settings, history=history, overwrite=overwrite, on_block=on_block)
    if after_score is not None:
        after_score(scored)
    studies = storage.read_table(storage.join(out, "studies.parquet")).cast(STUDIES_SCHEMA)
    flagged = flagged_studies(studies)
    flagged_uri = storage.join(out, FLAGGED_FILE)
    storage.write_table(flagged, flagged_uri, STUDIES_SCHEMA)
    logger.info("%d flagged studies (of %d) written to %s", flagged.num_rows, studies.num_rows, flagged_uri)
    return ScreenResult(
        scored,
        flagged_uri,
        flagged=flagged.num_rows,
        predicted=predicted_counts(studies),
        top=flagged.slice(0, max(top, 0)).select(list(TOP_COLUMNS)).to_pylist(),
    )


def format_screen(r: ScreenResult) -> str:
    """The scoring summary, studies per predicted class and the top flagged studies."""
    s = r.scored
    lines = [
        format_summary(s),
        f"images: {s.images} = {s.ok} ok + {s.skipped} skipped + {s.errors} errors",
        f"studies: {s.studies}, by predicted class (of the driving image): "
        + (", ".join(f"{k}={v}" for k, v in r.predicted.items()) or "none"),
        f"flagged studies: {r.flagged} in {r.flagged_uri} (top {len(r.top)} below, each named by "
        "its driving image's id)",
    ]
    for row in r.top:
        probs = " ".join(f"{k}={row[f'prob_{k}']:.3f}" for k in LABELS)
        lines.append(
            f"  {row['driving_image_id'][:REF_CHARS]}  P(pneumonia)={row['prob_pneumonia']:.3f}  "
            f"{row['pred_label']:<9}  {row['images']} images ({row['scored']} scored, "
            f"{row['skipped']} skipped, {row['errors']} errors)  {probs}"
        )
    return "\n".join(lines)
