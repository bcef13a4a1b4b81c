"""What a run's labels say: metrics of a predictions table, per image and per study.

Pure table-to-metrics glue (no Ray), shared by the scoring run, ``cxr-ray evaluate``, the
model commands and the HTML report::

    y, p = labelled_arrays(predictions)           # the ok rows with a known label
    m = evaluate_table(predictions, threshold)    # cxr_ray.metrics.Metrics, or None
    write_metrics(out, m, run_id=..., model_version=...)   # metrics / confusion Parquet
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray import metrics
from cxr_ray.io import storage
from cxr_ray.labels import LABELS
from cxr_ray.models.card import ModelCard
from cxr_ray.scoring.studies import STUDIES_SCHEMA, STUDY_INPUT_COLUMNS, study_table
from cxr_ray.vocabulary import Status

#: What a run without a summary.json is evaluated at.
DEFAULT_THRESHOLD = 0.5


def _labelled(t: pa.Table) -> pa.ChunkedArray:
    """The ok rows of a predictions table with a known label (a boolean mask)."""
    ok = pc.and_(pc.equal(t["status"], Status.OK), pc.is_in(t["label"], pa.array(LABELS)))
    return pc.fill_null(ok, False)


def labelled_arrays(t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(class indices, probabilities) of the ok rows of a predictions table with a known label."""
    t = t.filter(_labelled(t))
    y = np.array([LABELS.index(v) for v in t["label"].to_pylist()], dtype=np.int64)
    p = np.stack([t[f"prob_{k}"].to_numpy() for k in LABELS], axis=1).astype(np.float64)
    return y, p.reshape(len(y), len(LABELS))


def labelled_units(t: pa.Table) -> np.ndarray:
    """The unit (patient, else study, else image: ``drift_units.row_units``) of each row
    ``labelled_arrays`` returns, as keyed 64-bit hashes (no identifier kept)."""
    from cxr_ray.scoring.drift_units import key_hashes, row_units

    idx = np.flatnonzero(np.asarray(_labelled(t).to_numpy(zero_copy_only=False)))
    return key_hashes(row_units(t, idx))


def summary_threshold(summary: dict[str, object]) -> float:
    """The flag threshold a run's ``summary.json`` records (``flag_threshold``; older runs
    wrote ``threshold``), else ``DEFAULT_THRESHOLD``."""
    value = summary.get("flag_threshold", summary.get("threshold", DEFAULT_THRESHOLD))
    return float(value)  # type: ignore[arg-type]


def run_threshold(predictions_uri: str) -> float:
    """The flag threshold of the run that wrote ``predictions_uri`` (its summary.json), else 0.5."""
    summary = storage.join(storage.parent(predictions_uri), "summary.json")
    if storage.exists(summary):
        return summary_threshold(json.loads(storage.read_bytes(summary)))
    return DEFAULT_THRESHOLD


def evaluate_table(t: pa.Table, threshold: float = DEFAULT_THRESHOLD) -> metrics.Metrics | None:
    """Metrics of a predictions table (``None`` when no row has both a label and a score)."""
    y, p = labelled_arrays(t)
    return metrics.classification_metrics(y, p, threshold=threshold) if len(y) else None


def write_metrics(
    out: str, m: metrics.Metrics, *, run_id: str, model_version: str, history: str | None = None
) -> None:
    """``OUT/metrics.parquet`` and ``OUT/confusion.parquet``; the metrics rows also appended to
    the ``history`` table when given."""
    mt = metrics.metrics_table(m, run_id=run_id, model_version=model_version)
    storage.write_table(mt, storage.join(out, "metrics.parquet"))
    ct = metrics.confusion_table(m, run_id=run_id, model_version=model_version)
    storage.write_table(ct, storage.join(out, "confusion.parquet"))
    if history:
        storage.append_table(mt, history)


def write_studies(out: str, card: ModelCard) -> pa.Table:
    """``OUT/studies.parquet`` from the committed ``OUT/predictions.parquet``: one row per study.

    The rule (``cxr_ray.scoring.studies``): a study is its StudyInstanceUID (else the patient
    id, else the image); its result is the in-scope frontal image with the highest
    P(pneumonia).
    """
    preds = storage.read_table(storage.join(out, "predictions.parquet"), columns=list(STUDY_INPUT_COLUMNS))
    studies = study_table(preds, frontal_views=card.intended_use_policy.views)
    storage.write_table(studies, storage.join(out, "studies.parquet"), STUDIES_SCHEMA)
    return studies
