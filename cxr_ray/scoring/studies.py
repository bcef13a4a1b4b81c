"""Study-level results (``studies.parquet``): one row per study, from the predictions table.

A radiologist reads a study, not an image: a PA, a lateral and a repeat AP of one visit are
one decision. The rules, all deterministic and computed with Arrow group-bys (no Python loop
per row, so millions of predictions are fine):

**Which study an image belongs to** (``study_key``, with the rule that applied in
``study_key_kind``): its ``StudyInstanceUID``; without one (JPEG/PNG, or a DICOM lacking the
tag) its ``patient_id`` (from the PatientID tag or the file name), so a patient's images form
one "study"; without that, the image's own ``image_id`` (sha256 of the bytes), and for
unreadable files (no image id) its ``uri``.

**The study's result** comes from one *driving image*: among the study's scored (``ok``)
images, frontal views (``view_position`` PA or AP) first, then images whose view is not
recorded (JPEG/PNG), then any other view (scored only under the research override); within
that, the highest P(pneumonia); ties by the smallest ``image_id``, then ``uri``. Its
``pred_label``, probabilities and ``flagged`` are the study's, and ``driving_image_id`` /
``driving_uri`` point at it. A study with no scored image has null results.

**Counts and identifiers**: ``images`` (all rows), ``scored`` (``ok``), ``skipped``,
``errors``; ``label`` is the ground truth when every labelled image of the study agrees
(null when they disagree or none is labelled); ``study_instance_uid``, ``patient_id``,
``accession_number``, ``study_date``, ``model_version`` and ``run_id`` are the smallest non-
null value among the study's rows (they agree within a study in practice; the rule only makes
a disagreement deterministic).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.io.columns import described
from cxr_ray.labels import LABELS
from cxr_ray.metrics import Metrics, classification_metrics
from cxr_ray.vocabulary import Status

__all__ = [
    "DELIVERY_VALUES",
    "KEY_KINDS",
    "STUDIES_SCHEMA",
    "STUDY_INPUT_COLUMNS",
    "study_metrics",
    "study_table",
]

#: Values of ``study_key_kind``, in the order the rule tries them.
KEY_KINDS: tuple[str, ...] = ("study_instance_uid", "patient_id", "image_id", "uri")
_PROBS = tuple(f"prob_{label}" for label in LABELS)

_STUDIES_FIELDS = pa.schema(
    [
        pa.field("study_key", pa.string(), nullable=False),  # the value the images were grouped by
        pa.field("study_key_kind", pa.string(), nullable=False),  # one of KEY_KINDS
        pa.field("study_instance_uid", pa.string()),
        pa.field("patient_id", pa.string()),
        pa.field("accession_number", pa.string()),
        pa.field("study_date", pa.date32()),
        pa.field("images", pa.int64(), nullable=False),  # rows of the study in predictions
        pa.field("scored", pa.int64(), nullable=False),  # status ok
        pa.field("skipped", pa.int64(), nullable=False),  # status skipped (outside intended use)
        pa.field("errors", pa.int64(), nullable=False),  # status error
        pa.field("label", pa.string()),  # ground truth when all labelled images agree
        pa.field("pred_label", pa.string()),  # the driving image's
        *(pa.field(name, pa.float32()) for name in _PROBS),
        pa.field("prob_pneumonia", pa.float32()),
        pa.field("flagged", pa.bool_()),
        pa.field("driving_image_id", pa.string()),
        pa.field("driving_uri", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("run_id", pa.string()),
        # Written by delivery to a PACS (``cxr_ray.writeback.deliver``); null when not delivered.
        pa.field("delivery", pa.string()),
        pa.field("delivery_error", pa.string()),
    ]
)
#: Values of ``delivery``: the result objects reached the PACS; they did not (why:
#: ``delivery_error``); the study has no result to deliver (skipped, error, not DICOM).
DELIVERY_VALUES: tuple[str, ...] = ("delivered", "error", "not_applicable")
_DRIVING = "the driving image's"
#: ``studies.parquet``, ``flagged.parquet`` and ROOT/studies: one row per study.
STUDIES_SCHEMA = described(
    _STUDIES_FIELDS,
    {
        "study_key": "what the images were grouped by: the StudyInstanceUID, else the patient id, "
        "else the image id",
        "study_key_kind": f"which of those study_key is: {', '.join(KEY_KINDS)}",
        "study_instance_uid": "StudyInstanceUID (0020,000D)",
        "patient_id": "the DICOM PatientID tag, else parsed from the file name",
        "accession_number": "AccessionNumber (0008,0050)",
        "study_date": "StudyDate (0008,0020)",
        "images": "rows of the study in predictions.parquet",
        "scored": "of them, status ok",
        "skipped": "of them, status skipped (outside the intended use)",
        "errors": "of them, status error",
        "label": "ground truth, when every labelled image of the study agrees",
        "pred_label": f"{_DRIVING} predicted class",
        **{name: (f"{_DRIVING} {name}", "probability") for name in _PROBS},
        "prob_pneumonia": (f"{_DRIVING} prob_pneumonia", "probability"),
        "flagged": f"{_DRIVING} flagged: prob_pneumonia >= the flag threshold",
        "driving_image_id": "image_id of the in-scope frontal (PA/AP) image with the highest P(pneumonia)",
        "driving_uri": "uri of the driving image",
        "model_version": "the model that scored the study",
        "run_id": "the scoring run",
        "delivery": "with --results-to: delivered (SR, and a secondary capture when flagged, stored in "
        "the PACS), error, or not_applicable (no result: skipped, error or not a DICOM study); "
        "null when the run delivered nothing",
        "delivery_error": "why delivery failed or does not apply (fixed text, no identifiers)",
    },
    table="studies",
    version=2,
)

_IDENTIFIERS = (
    "study_instance_uid",
    "patient_id",
    "accession_number",
    "study_date",
    "model_version",
    "run_id",
)
_INPUT = [
    pa.field("study_instance_uid", pa.string()),
    pa.field("patient_id", pa.string()),
    pa.field("image_id", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("status", pa.string()),
    pa.field("label", pa.string()),
    pa.field("view_position", pa.string()),
    pa.field("accession_number", pa.string()),
    pa.field("study_date", pa.date32()),
    pa.field("model_version", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("pred_label", pa.string()),
    *(pa.field(name, pa.float32()) for name in _PROBS),
    pa.field("prob_pneumonia", pa.float32()),
    pa.field("flagged", pa.bool_()),
]
#: The predictions columns ``study_table`` reads (read only these from a big table).
STUDY_INPUT_COLUMNS: tuple[str, ...] = tuple(f.name for f in _INPUT)

_KEYS = ["_kind", "_key"]
_RESULT = ["pred_label", *_PROBS, "prob_pneumonia", "flagged"]


def _column(table: pa.Table, name: str, typ: pa.DataType) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(table.num_rows, typ)
    return table.column(name).combine_chunks().cast(typ)


def study_table(predictions: pa.Table, *, frontal_views: Collection[str] = ("PA", "AP")) -> pa.Table:
    """One ``STUDIES_SCHEMA`` row per study of ``predictions`` (rules in the module docstring).

    Columns the table lacks (e.g. the DICOM ones of an older run) count as null; an empty
    table gives an empty one.
    """
    col = {f.name: _column(predictions, f.name, f.type) for f in _INPUT}
    uid, pid, iid, uri = (col[k] for k in KEY_KINDS)
    kind = pc.case_when(
        pc.make_struct(pc.is_valid(uid), pc.is_valid(pid), pc.is_valid(iid)),
        *(pa.scalar(k) for k in KEY_KINDS),
    )
    status = col["status"]
    rows = pa.table(
        {
            "_kind": kind,
            "_key": pc.coalesce(uid, pid, iid, uri),
            "_ok": pc.equal(status, Status.OK).fill_null(False).cast(pa.int64()),
            "_skipped": pc.equal(status, Status.SKIPPED).fill_null(False).cast(pa.int64()),
            "_error": pc.equal(status, Status.ERROR).fill_null(False).cast(pa.int64()),
            "_idx": pa.array(np.arange(predictions.num_rows, dtype=np.int64)),
            **{k: col[k] for k in ("label", *_IDENTIFIERS)},
        }
    )
    agg = rows.group_by(_KEYS).aggregate(
        [
            ([], "count_all"),
            ("_ok", "sum"),
            ("_skipped", "sum"),
            ("_error", "sum"),
            ("label", "count_distinct"),
            ("label", "min"),
            *((k, "min") for k in _IDENTIFIERS),
        ]
    )
    driving = _driving(rows, col, frontal_views)
    joined = agg.join(driving, keys=_KEYS, join_type="left outer") if driving.num_rows else agg
    joined = joined.sort_by([("_kind", "ascending"), ("_key", "ascending")])

    def get(name: str, typ: pa.DataType) -> pa.Array:
        return _column(joined, name, typ)

    label_agrees = pc.equal(get("label_count_distinct", pa.int64()), 1)
    out: dict[str, pa.Array] = {
        "study_key": get("_key", pa.string()),
        "study_key_kind": get("_kind", pa.string()),
        **{k: get(f"{k}_min", col[k].type) for k in _IDENTIFIERS},
        "images": get("count_all", pa.int64()),
        "scored": get("_ok_sum", pa.int64()).fill_null(0),
        "skipped": get("_skipped_sum", pa.int64()).fill_null(0),
        "errors": get("_error_sum", pa.int64()).fill_null(0),
        "label": pc.if_else(label_agrees, get("label_min", pa.string()), pa.scalar(None, pa.string())),
        **{k: get(k, col[k].type) for k in _RESULT},
        "driving_image_id": get("driving_image_id", pa.string()),
        "driving_uri": get("driving_uri", pa.string()),
        "delivery": pa.nulls(joined.num_rows, pa.string()),
        "delivery_error": pa.nulls(joined.num_rows, pa.string()),
    }
    return pa.table({f.name: out[f.name].cast(f.type) for f in STUDIES_SCHEMA}, schema=STUDIES_SCHEMA)


def _driving(rows: pa.Table, col: dict[str, pa.Array], frontal_views: Collection[str]) -> pa.Table:
    """The driving image of every study with a scored image: keys + its result columns."""
    view = col["view_position"]
    frontal = pc.is_in(view, value_set=pa.array(sorted(frontal_views), pa.string())).fill_null(False)
    rank = pc.if_else(frontal, 0, pc.if_else(pc.is_null(view), 1, 2)).cast(pa.int8())
    cand = pa.table(
        {
            "_kind": rows["_kind"],
            "_key": rows["_key"],
            "_rank": rank,
            "_p": col["prob_pneumonia"],
            "_image_id": col["image_id"],
            "_uri": col["uri"],
            "_idx": rows["_idx"],
        }
    ).filter(pc.equal(rows["_ok"], 1))
    order = pc.sort_indices(
        cand,
        sort_keys=[
            ("_kind", "ascending", "at_end"),
            ("_key", "ascending", "at_end"),
            ("_rank", "ascending", "at_end"),
            ("_p", "descending", "at_end"),
            ("_image_id", "ascending", "at_end"),
            ("_uri", "ascending", "at_end"),
        ],
    )
    # Sorted by key, the first row of each run of equal keys is the study's driving image.
    n = cand.num_rows
    kinds, keys = (cand[k].combine_chunks().take(order) for k in _KEYS)
    first = np.ones(n, dtype=bool)
    if n > 1:
        same = pc.and_(
            pc.equal(kinds.slice(1), kinds.slice(0, n - 1)), pc.equal(keys.slice(1), keys.slice(0, n - 1))
        )
        first[1:] = ~same.to_numpy(zero_copy_only=False)
    idx = cand["_idx"].combine_chunks().take(order).filter(pa.array(first))
    return pa.table(
        {
            "_kind": kinds.filter(pa.array(first)),
            "_key": keys.filter(pa.array(first)),
            **{k: col[k].take(idx) for k in _RESULT},
            "driving_image_id": col["image_id"].take(idx),
            "driving_uri": col["uri"].take(idx),
        }
    )


def study_metrics(studies: pa.Table, *, threshold: float = 0.5) -> Metrics | None:
    """``classification_metrics`` over the studies that are labelled and scored; None if none.

    ``threshold`` is the model card's pneumonia threshold (the binary metrics' flag rule).
    """
    y = pc.index_in(studies["label"], value_set=pa.array(LABELS, pa.string()))
    valid = pc.and_(pc.is_valid(y), pc.is_valid(studies[_PROBS[0]]))
    if not pc.any(valid).as_py():
        return None
    sel = studies.filter(valid)
    y_true = y.filter(valid).to_numpy(zero_copy_only=False).astype(np.int64)
    probs = np.stack([sel[name].to_numpy(zero_copy_only=False) for name in _PROBS], axis=1)
    return classification_metrics(y_true, probs, threshold=threshold)
