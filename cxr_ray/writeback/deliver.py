"""Delivery of each study's result objects to a PACS (``--results-to``), once per study.

    check_results_to(results_to, source, settings)       # before the run: ConfigError
    counts = deliver_run(out, artifact, settings)        # score / screen: OUT/studies.parquet
    counts = deliver_nightly(root, artifact, settings, run_id)   # nightly: ROOT/deliveries

``--results-to dicomweb[s]://HOST:PORT/PATH`` stores by STOW-RS (``stow``),
``--results-to dicom://AET@HOST:PORT`` by C-STORE (``cstore``). Each assessed study (a scored
driving image, ``context.assessed``) gets its SR (``sr.build_sr``) and, when flagged and its
Grad-CAM overlay exists, the secondary capture (``capture.build_capture``), sent together;
the study's ``delivery`` is then ``delivered`` or ``error`` (``delivery_error``: fixed text, no
identifiers). Skipped and error studies, and studies that are not DICOM (no
StudyInstanceUID), are ``not_applicable``. ``summary.json`` gets ``delivery`` counts.

**Exactly once.** The objects' UIDs depend on (study, model version) only (``uids``), so a
re-send *replaces* the same instances in the PACS instead of adding new ones (a PACS keeps
one instance per SOP Instance UID). On top of that a nightly root records every attempt in
ROOT/deliveries (Delta; key model_version, target, study_key_kind, study_key, run_id; keyed
inserts, so a repeat adds nothing): each nightly run, under its lease, delivers every study of
ROOT/studies of its model version that has no ``delivered`` row for the target (failed ones
from earlier runs included), so a failure is re-delivered by the next run and a success
never again. A ``not_applicable`` outcome is final for that study row (a later run that adds
scored images of the study makes a new row, which is delivered).

Identifiers come from the driving image's predictions row (``SourceRef.from_row``); what
the table does not keep (PatientName, PatientBirthDate, StudyTime, StudyID,
ReferringPhysicianName) is asked of the target for that study and used only when the answer
names the same study and PatientID (``SourceRef.with_study_attributes``). So a
pseudonymised run could only write pseudonyms into the PACS: ``--results-to`` with
``--pseudonymize`` is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.config import Settings
from cxr_ray.data import dicomweb, dimse_net
from cxr_ray.errors import ConfigError, DataError
from cxr_ray.io import storage, tables
from cxr_ray.models.artifact import Artifact
from cxr_ray.scoring import ledger
from cxr_ray.scoring.studies import STUDIES_SCHEMA
from cxr_ray.writeback.capture import build_capture, wants_capture
from cxr_ray.writeback.context import ModelInfo, SourceRef, assessed
from cxr_ray.writeback.cstore import CStoreSender
from cxr_ray.writeback.sr import build_sr
from cxr_ray.writeback.stow import StowSender

__all__ = [
    "DELIVERIES",
    "DELIVERIES_SCHEMA",
    "DeliveryCounts",
    "check_results_to",
    "deliver_nightly",
    "deliver_run",
    "deliver_studies",
    "delivery_settings",
    "format_delivery",
    "nightly_hook",
    "target_label",
]

logger = logging.getLogger(__name__)

DELIVERED, ERROR, NOT_APPLICABLE = "delivered", "error", "not_applicable"
#: ROOT/deliveries: every delivery attempt of a nightly root.
DELIVERIES = ledger.DELIVERIES
DELIVERIES_SCHEMA = pa.schema(
    [
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("target", pa.string(), nullable=False),  # target_label(results_to)
        pa.field("study_key_kind", pa.string(), nullable=False),
        pa.field("study_key", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),  # the run that attempted it
        pa.field("study_run_id", pa.string()),  # the run whose study row was delivered
        pa.field("delivery", pa.string(), nullable=False),
        pa.field("delivery_error", pa.string()),
        pa.field("objects", pa.int64(), nullable=False),
        pa.field("attempted_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
_KEYS = ["model_version", "target", "study_key_kind", "study_key", "run_id"]
#: Predictions columns a study's driving image is read with.
_SOURCE_COLUMNS = [
    "image_id",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "sop_class_uid",
    "patient_id",
    "patient_sex",
    "accession_number",
    "study_date",
    "modality",
    "intended_use",
    "heatmap_uri",
]


def _is_stow(results_to: str) -> bool:
    return dicomweb.is_dicomweb(results_to)


def target_label(results_to: str) -> str:
    """The target as written in tables and summaries (no credentials: URLs never hold any)."""
    try:
        return (
            dicomweb.endpoint(results_to).source
            if _is_stow(results_to)
            else dimse_net.peer(results_to).source
        )
    except DataError as exc:
        raise ConfigError(f"--results-to: {exc}") from None


def check_results_to(results_to: str, source: str | None, settings: Settings) -> None:
    """Refuse, before anything is scored, a target that cannot be written to as configured.

    Credentials (``dicomweb.username``/``token``) go only to the run's ``dicomweb://`` source
    or a service in ``dicomweb.endpoints``; pseudonymised runs are never delivered.
    """
    if not (_is_stow(results_to) or dimse_net.is_dimse(results_to)):
        raise ConfigError(
            "--results-to must be dicomweb://HOST:PORT/PATH (STOW-RS) or dicom://AET@HOST:PORT (C-STORE)"
        )
    label = target_label(results_to)
    if settings.score.pseudonymize:
        raise ConfigError("--results-to with --pseudonymize would write pseudonyms into the PACS: refused")
    dw = settings.dicomweb
    if _is_stow(results_to) and (dw.token is not None or dw.username is not None):
        allowed = dicomweb.configured_endpoints(dw)
        if source and dicomweb.is_dicomweb(source):
            allowed |= {dicomweb.endpoint(source).source}
        if label not in allowed:
            raise ConfigError(
                "--results-to names a DICOMweb service that is neither the source nor in "
                "dicomweb.endpoints: credentials are sent only to configured services (add it there)"
            )


def delivery_settings(settings: Settings) -> Settings:
    """With a results target, Grad-CAM for the flagged studies at least (their secondary capture)."""
    sc = settings.score
    if sc.results_to is None or sc.explain != "none":
        return settings
    return settings.model_copy(update={"score": sc.model_copy(update={"explain": "flagged"})})


@dataclass
class DeliveryCounts:
    target: str
    delivered: int = 0
    error: int = 0
    not_applicable: int = 0
    #: Objects stored (SRs and secondary captures).
    objects: int = 0
    #: Of ``delivered``: studies of earlier runs whose delivery had failed.
    redelivered: int = 0


def _sender(results_to: str, settings: Settings) -> StowSender | CStoreSender:
    return (
        StowSender(results_to, settings.dicomweb)
        if _is_stow(results_to)
        else CStoreSender(results_to, settings.dicomweb)
    )


def _objects(
    study: Mapping[str, Any],
    source: Mapping[str, Any],
    model: ModelInfo,
    threshold: float,
    answer: Any = None,
) -> list[Any]:
    """The SR (and the secondary capture, when flagged with an overlay) of one study;
    ``answer``: the target's study-level attributes (``Sender.study_attributes``)."""
    ref = SourceRef.from_row(source).with_study_attributes(answer)
    run_id = str(study.get("run_id") or "")
    objects: list[Any] = [
        build_sr(
            study, ref, model, run_id=run_id, threshold=threshold, intended_use=source.get("intended_use")
        )
    ]
    heatmap = source.get("heatmap_uri")
    if wants_capture(study) and heatmap:
        overlay = storage.read_bytes(str(heatmap))
        objects.append(build_capture(study, ref, model, overlay=overlay, threshold=threshold))
    elif wants_capture(study):
        logger.warning("a flagged study has no Grad-CAM overlay: its SR is delivered without the capture")
    return objects


def _outcome(
    study: Mapping[str, Any],
    source: Mapping[str, Any] | None,
    model: ModelInfo,
    threshold: float,
    sender: StowSender | CStoreSender,
) -> tuple[str, str | None, int]:
    """(delivery, delivery_error, objects stored) of one study; never raises."""
    if not assessed(study):
        return NOT_APPLICABLE, "no result: the study has no scored image", 0
    if not study.get("study_instance_uid") or source is None or not source.get("sop_instance_uid"):
        return NOT_APPLICABLE, "not a DICOM study: no StudyInstanceUID or SOPInstanceUID", 0
    answer = sender.study_attributes(str(study["study_instance_uid"]))
    try:
        objects = _objects(study, source, model, threshold, answer)
    except Exception as exc:  # a header the builders refuse; their text can quote values
        return ERROR, f"cannot build the result objects ({type(exc).__name__})", 0
    try:
        problem = sender.send(objects)
    except DataError as exc:  # ours: fixed text (e.g. credentials over plain HTTP refused)
        problem = str(exc)
    return (ERROR, problem, 0) if problem else (DELIVERED, None, len(objects))


def deliver_studies(
    studies: Iterable[Mapping[str, Any]],
    sources: Mapping[str, Mapping[str, Any]],
    results_to: str,
    settings: Settings,
    model: ModelInfo,
    threshold: float,
) -> list[tuple[str, str | None, int]]:
    """The outcome of each study row (``sources``: driving image id -> predictions row)."""
    sender = _sender(results_to, settings)
    try:
        return [
            _outcome(s, sources.get(str(s.get("driving_image_id"))), model, threshold, sender)
            for s in studies
        ]
    finally:
        sender.close()


def _count(counts: DeliveryCounts, outcomes: Iterable[tuple[str, str | None, int]]) -> DeliveryCounts:
    for delivery, _, objects in outcomes:
        setattr(counts, delivery, getattr(counts, delivery) + 1)
        counts.objects += objects
    return counts


def _with_outcomes(
    studies: pa.Table, by_key: Mapping[tuple[str, str], tuple[str, str | None, int]]
) -> pa.Table:
    keys = zip(studies["study_key_kind"].to_pylist(), studies["study_key"].to_pylist(), strict=True)
    found = [by_key.get(k) for k in keys]
    delivery = pa.array([o[0] if o else None for o in found], pa.string())
    errors = pa.array([o[1] if o else None for o in found], pa.string())
    out = studies.set_column(studies.schema.get_field_index("delivery"), "delivery", delivery)
    return out.set_column(out.schema.get_field_index("delivery_error"), "delivery_error", errors)


def _add_to_summary(run_dir: str, counts: DeliveryCounts) -> None:
    uri = storage.join(run_dir, "summary.json")
    if not storage.exists(uri):
        return
    summary = json.loads(storage.read_bytes(uri))
    summary["delivery"] = asdict(counts)
    storage.write_bytes((json.dumps(summary, indent=2, default=float) + "\n").encode(), uri)


def _driving_rows(predictions: pa.Table) -> dict[str, dict[str, Any]]:
    have = [c for c in _SOURCE_COLUMNS if c in predictions.column_names]
    return {str(r["image_id"]): r for r in predictions.select(have).to_pylist() if r.get("image_id")}


def deliver_run(out: str, artifact: Artifact, settings: Settings) -> DeliveryCounts:
    """Deliver the studies of the scoring run in ``out``; ``delivery`` columns into its
    ``studies.parquet`` (and ``flagged.parquet``, if there), counts into ``summary.json``."""
    results_to = settings.score.results_to
    if results_to is None:
        raise ConfigError("no results target (score.results_to / --results-to)")
    counts = DeliveryCounts(target_label(results_to))
    studies = storage.read_table(storage.join(out, "studies.parquet")).cast(STUDIES_SCHEMA)
    ids = pc.drop_null(studies["driving_image_id"])
    preds = storage.read_table(storage.join(out, "predictions.parquet"))
    preds = preds.filter(pc.is_in(preds["image_id"], value_set=ids.combine_chunks()))
    rows = studies.to_pylist()
    model, threshold = ModelInfo.from_card(artifact.card), artifact.card.pneumonia_threshold
    outcomes = deliver_studies(rows, _driving_rows(preds), results_to, settings, model, threshold)
    by_key = {(r["study_key_kind"], r["study_key"]): o for r, o in zip(rows, outcomes, strict=True)}
    storage.write_table(_with_outcomes(studies, by_key), storage.join(out, "studies.parquet"), STUDIES_SCHEMA)
    flagged_uri = storage.join(out, "flagged.parquet")
    if storage.exists(flagged_uri):
        flagged = storage.read_table(flagged_uri).cast(STUDIES_SCHEMA)
        storage.write_table(_with_outcomes(flagged, by_key), flagged_uri, STUDIES_SCHEMA)
    _count(counts, outcomes)
    _add_to_summary(out, counts)
    logger.info("delivery to %s: %s", counts.target, format_delivery(counts))
    return counts


# ----------------------------------------------------------------------------- nightly


def _pending(root: str, model_version: str, target: str, so: tables.StorageOptions) -> pa.Table:
    """The newest ROOT/studies row of each study without a ``delivered`` row for ``target``
    (and whose row is not recorded ``not_applicable``)."""
    studies_uri = ledger.table(root, ledger.STUDIES)
    if not tables.is_table(studies_uri, so):
        return STUDIES_SCHEMA.empty_table()
    dt = tables.open_table(studies_uri, storage_options=so)
    deliveries = tables.ensure_table(
        ledger.table(root, DELIVERIES),
        DELIVERIES_SCHEMA,
        description="cxr-ray delivery attempts to a PACS per nightly run",
        storage_options=so,
    )
    mv, tg = tables.sql_literal(model_version), tables.sql_literal(target)
    sql = f"""
        WITH latest AS (
            SELECT *, row_number() OVER (PARTITION BY study_key_kind, study_key ORDER BY run_id DESC) AS _n
            FROM s WHERE model_version = {mv})
        SELECT * FROM latest l WHERE l._n = 1 AND NOT EXISTS (
            SELECT 1 FROM d WHERE d.model_version = {mv} AND d.target = {tg}
              AND d.study_key_kind = l.study_key_kind AND d.study_key = l.study_key
              AND (d.delivery = '{DELIVERED}'
                   OR (d.delivery = '{NOT_APPLICABLE}' AND d.study_run_id = l.run_id)))
        ORDER BY study_key_kind, study_key"""
    found = tables.query(sql, {"s": dt, "d": deliveries})
    cols = {
        f.name: found[f.name] if f.name in found.column_names else pa.nulls(found.num_rows, f.type)
        for f in STUDIES_SCHEMA
    }
    return pa.table({k: v.cast(STUDIES_SCHEMA.field(k).type) for k, v in cols.items()}, schema=STUDIES_SCHEMA)


def _nightly_sources(
    root: str, model_version: str, ids: list[str], so: tables.StorageOptions
) -> dict[str, dict[str, Any]]:
    dt = tables.open_table(ledger.table(root, ledger.PREDICTIONS), storage_options=so)
    have = [c for c in _SOURCE_COLUMNS if c in tables.arrow_schema(dt).names]
    out: dict[str, dict[str, Any]] = {}
    for k in range(0, len(ids), ledger.QUERY_CHUNK):
        chunk = ",".join(tables.sql_literal(i) for i in ids[k : k + ledger.QUERY_CHUNK])
        where = f"model_version = {tables.sql_literal(model_version)} AND image_id IN ({chunk})"
        out.update(_driving_rows(tables.read(dt, where=where, columns=have)))
    return out


def deliver_nightly(
    root: str,
    artifact: Artifact,
    settings: Settings,
    run_id: str,
    storage_options: tables.StorageOptions = None,
) -> DeliveryCounts:
    """Deliver every study of ``root`` not yet delivered to the target (module docstring);
    records each attempt in ROOT/deliveries and this run's outcomes in its studies.parquet."""
    results_to = settings.score.results_to
    if results_to is None:
        raise ConfigError("no results target (score.results_to / --results-to)")
    so, version = storage_options, artifact.card.version
    counts = DeliveryCounts(target_label(results_to))
    pending = _pending(root, version, counts.target, so)
    rows = pending.to_pylist()
    ids = sorted({str(r["driving_image_id"]) for r in rows if r.get("driving_image_id")})
    sources = _nightly_sources(root, version, ids, so) if ids else {}
    model, threshold = ModelInfo.from_card(artifact.card), artifact.card.pneumonia_threshold
    outcomes = deliver_studies(rows, sources, results_to, settings, model, threshold)
    now = datetime.now(UTC)
    record = pa.table(
        {
            "model_version": [version] * len(rows),
            "target": [counts.target] * len(rows),
            "study_key_kind": [r["study_key_kind"] for r in rows],
            "study_key": [r["study_key"] for r in rows],
            "run_id": [run_id] * len(rows),
            "study_run_id": [r["run_id"] for r in rows],
            "delivery": [o[0] for o in outcomes],
            "delivery_error": [o[1] for o in outcomes],
            "objects": [o[2] for o in outcomes],
            "attempted_at": [now] * len(rows),
        },
        schema=DELIVERIES_SCHEMA,
    )
    if rows:
        tables.insert_new(ledger.table(root, DELIVERIES), record, keys=_KEYS, storage_options=so)
    _count(counts, outcomes)
    counts.redelivered = sum(
        1 for r, o in zip(rows, outcomes, strict=True) if o[0] == DELIVERED and r["run_id"] != run_id
    )
    run_dir = storage.join(root, ledger.RUNS, run_id)
    if storage.exists(storage.join(run_dir, "studies.parquet")):
        own = storage.read_table(storage.join(run_dir, "studies.parquet")).cast(STUDIES_SCHEMA)
        by_key = {
            (r["study_key_kind"], r["study_key"]): o
            for r, o in zip(rows, outcomes, strict=True)
            if r["run_id"] == run_id
        }
        storage.write_table(
            _with_outcomes(own, by_key), storage.join(run_dir, "studies.parquet"), STUDIES_SCHEMA
        )
        _add_to_summary(run_dir, counts)
    logger.info("delivery to %s: %s", counts.target, format_delivery(counts))
    return counts


def nightly_hook(
    root: str, artifact: Artifact, settings: Settings, storage_options: tables.StorageOptions = None
) -> Callable[[Any], None]:
    """``run_nightly(after_commit=...)``: deliver under the run's lease; the counts go into
    the result's ``extra`` (``delivery``: the summary line; ``delivery_counts``)."""

    def hook(result: Any) -> None:
        counts = deliver_nightly(root, artifact, settings, result.run_id, storage_options)
        result.extra["delivery"] = format_delivery(counts)
        result.extra["delivery_counts"] = asdict(counts)

    return hook


def format_delivery(c: DeliveryCounts) -> str:
    """One line of counts (no identifiers)."""
    line = (
        f"results to {c.target}: {c.delivered} studies delivered ({c.objects} objects), "
        f"{c.error} failed, {c.not_applicable} without a result to deliver"
    )
    if c.redelivered:
        line += f"; {c.redelivered} of the delivered had failed in an earlier run"
    return line
