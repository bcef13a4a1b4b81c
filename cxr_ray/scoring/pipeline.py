"""Score an archive with Ray Data and write predictions, metrics and a summary.

::

    source --list--> read tasks (bytes) --decode_stage--> CPU tasks (pixels)
           --CxrPredictor--> actor pool (CPU fractions or GPUs) --> driver --> Parquet

Everything streams: blocks hold at most ``data.rows_per_block`` images and Ray Data's
backpressure bounds what is in flight, so memory does not grow with the archive. The driver
writes one row per input image (errors included) to ``predictions.parquet`` as blocks
arrive and commits it atomically at the end, then writes ``metrics.parquet``,
``confusion.parquet``, ``studies.parquet`` (one row per study), the drift check against the
artifact's reference (``drift.parquet``, ``drift_plot.json``; ``cxr_ray.scoring.drift``) and
``summary.json`` (the run's completion marker, written last).

Output folder::

    OUT/predictions.parquet  OUT/studies.parquet  OUT/metrics.parquet  OUT/confusion.parquet
    OUT/drift.parquet  OUT/drift_plot.json  OUT/summary.json
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray import metrics
from cxr_ray.config import DriftSettings, ScoreSettings, Settings
from cxr_ray.data.manifest import source_dataset
from cxr_ray.engines import EnginePayload, PrepareReport, engine_options, prepare, select_engine
from cxr_ray.errors import DataError, ModelError
from cxr_ray.imaging.preprocess import PreprocessSpec
from cxr_ray.io import storage
from cxr_ray.labels import LABELS
from cxr_ray.models.artifact import Artifact, load_artifact
from cxr_ray.models.card import ModelCard, spec_for
from cxr_ray.models.reference import read_reference
from cxr_ray.scoring.drift import DriftAccumulator
from cxr_ray.scoring.pseudonymize import pseudonymize_table
from cxr_ray.scoring.schema import PREDICTIONS_SCHEMA
from cxr_ray.scoring.stages import CxrPredictor, SeenFilter, decode_stage
from cxr_ray.scoring.studies import STUDIES_SCHEMA, STUDY_INPUT_COLUMNS, study_metrics, study_table

logger = logging.getLogger(__name__)


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


@dataclass
class ScoreResult:
    out: str
    run_id: str
    model_version: str
    #: The engine the run asked for, resolved on the driver (``auto`` only for GPU actors,
    #: which resolve it where they run); ``engines`` says what the actors really ran.
    engine: str
    engines: list[str] = field(default_factory=list)
    images: int = 0
    ok: int = 0
    errors: int = 0
    #: Rows deliberately not scored (outside the model's intended use), with the reason.
    skipped: int = 0
    flagged: int = 0
    #: Studies (``studies.parquet``) and how many of them are flagged.
    studies: int = 0
    flagged_studies: int = 0
    labelled: int = 0
    seconds: float = 0.0
    first_row_seconds: float = 0.0
    #: The model card's pneumonia flag threshold (what ``flagged`` and the binary metrics use).
    threshold: float = 0.5
    #: The engine's numeric precision where it has a setting (onnxruntime, tensorrt, openvino).
    precision: str | None = None
    #: INT8 onnxruntime only: agreement with the fp32 model on the artifact's validation images.
    int8_check: dict[str, Any] | None = None
    #: What preparing the engine took: ``onnx_cache`` is ``hit`` when the exported (or
    #: quantized) model came from the node's cache, ``built`` when this run made it.
    engine_report: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    #: The same metrics per study (labelled studies only), when labels exist.
    study_metrics: dict[str, float] = field(default_factory=dict)
    error_examples: list[dict[str, str]] = field(default_factory=list)
    #: The drift check against the artifact's reference: ``status`` (``checked``,
    #: ``no_reference``, ``disabled``, ``error``), ``alert`` and the key figures
    #: (``DriftFigures.summary``); every figure is in ``drift.parquet``.
    drift: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def to_json(self) -> str:
        d = asdict(self) | {"images_per_s": self.images_per_s}
        return json.dumps(d, indent=2, default=float) + "\n"


class _Accumulator:
    """Counts, metric inputs and a few error examples, block by block."""

    def __init__(self, result: ScoreResult) -> None:
        self.r = result
        self.y: list[np.ndarray] = []
        self.p: list[np.ndarray] = []

    def add(self, t: pa.Table) -> None:
        r = self.r
        r.images += t.num_rows
        ok = pc.equal(t["status"], "ok")
        n_ok = int(pc.sum(ok).as_py() or 0)
        n_skipped = int(pc.sum(pc.equal(t["status"], "skipped")).as_py() or 0)
        r.ok += n_ok
        r.skipped += n_skipped
        r.errors += t.num_rows - n_ok - n_skipped
        r.flagged += int(pc.sum(pc.fill_null(t["flagged"], False)).as_py() or 0)
        for name in pc.unique(t["engine"]).to_pylist():
            if name not in r.engines:
                r.engines.append(name)
        room = 20 - len(r.error_examples)
        if room > 0:
            bad = t.filter(pc.equal(t["status"], "error"))
            # image_id and the error only: a uri can carry a patient identifier.
            r.error_examples += bad.select(["image_id", "error"]).slice(0, room).to_pylist()
        y, p = labelled_arrays(t)
        if len(y):
            self.y.append(y)
            self.p.append(p)

    def metrics(self, threshold: float) -> metrics.Metrics | None:
        if not self.y:
            return None
        y, p = np.concatenate(self.y), np.concatenate(self.p)
        self.r.labelled = len(y)
        return metrics.classification_metrics(y, p, threshold=threshold)


def labelled_arrays(t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(class indices, probabilities) of the ok rows of a predictions table with a known label."""
    ok = pc.and_(pc.equal(t["status"], "ok"), pc.is_in(t["label"], pa.array(LABELS)))
    t = t.filter(pc.fill_null(ok, False))
    y = np.array([LABELS.index(v) for v in t["label"].to_pylist()], dtype=np.int64)
    p = np.stack([t[f"prob_{k}"].to_numpy() for k in LABELS], axis=1).astype(np.float64)
    return y, p.reshape(len(y), len(LABELS))


def run_threshold(predictions_uri: str) -> float:
    """The flag threshold of the run that wrote ``predictions_uri`` (its summary.json), else 0.5."""
    summary = storage.join(storage.parent(predictions_uri), "summary.json")
    if storage.exists(summary):
        return float(json.loads(storage.read_bytes(summary)).get("threshold", 0.5))
    return 0.5


def evaluate_table(t: pa.Table, threshold: float = 0.5) -> metrics.Metrics | None:
    """Metrics of a predictions table (``None`` when no row has both a label and a score)."""
    y, p = labelled_arrays(t)
    return metrics.classification_metrics(y, p, threshold=threshold) if len(y) else None


@dataclass(frozen=True)
class ScorePlan:
    """What a run resolved on the driver before any data moves."""

    engine: str
    payload: EnginePayload
    report: PrepareReport
    spec: PreprocessSpec


def plan_run(art: Artifact, settings: Settings) -> ScorePlan:
    """Resolve the engine and prepare its payload for ``art`` (before the dataset is built)."""
    sc = settings.score
    gpu_actors = sc.gpus_per_actor > 0
    # With GPU actors, "auto" is resolved inside each actor: the driver may have no GPU.
    engine = "auto" if sc.engine == "auto" and gpu_actors else select_engine(sc.engine)
    spec = spec_for(art.card, settings.data)
    payload, report = prepare(art, engine, engine_options(sc), spec)
    return ScorePlan(engine, payload, report, spec)


def build_dataset(
    source: str,
    art: Artifact,
    plan: ScorePlan,
    settings: Settings,
    *,
    out_dir: str = ".",
    seen: SeenFilter | None = None,
) -> Any:
    """The lazy Ray Dataset of prediction rows (without run columns) for ``source``."""
    import ray
    import ray.data

    sc = settings.score
    gpu_actors = sc.gpus_per_actor > 0
    explain = sc.explain != "none"
    problem = starvation(sc, ray.cluster_resources().get("CPU", 0.0))
    if problem:
        logger.warning(problem)
    ds = source_dataset(source, settings.data, settings.dicomweb, read_cpus=sc.cpus_per_decode_task)
    ds = ds.map_batches(
        decode_stage,
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=sc.cpus_per_decode_task,
        # Heatmaps need the decoded pixels on the CPU side, so explaining turns GPU decode off.
        fn_kwargs={
            "spec": plan.spec,
            "seen": seen,
            "gpu_jpeg": gpu_actors and sc.gpu_decode and not explain,
            "intended_use": art.card.intended_use_policy,
            "enforce_intended_use": sc.enforce_intended_use,
        },
    )
    ds = ds.map_batches(
        CxrPredictor,
        batch_size=sc.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=sc.actors_min, max_size=sc.actors_max),
        num_cpus=sc.cpus_per_actor,
        num_gpus=sc.gpus_per_actor or None,
        fn_constructor_kwargs={
            "payload": ray.put(plan.payload),
            "spec": plan.spec,
            "gpu_decode": sc.gpu_decode,
            "keep_pixels": explain,
        },
    )
    if not explain:
        return ds
    from cxr_ray.scoring.explain import Explainer

    weights = plan.payload.weights or prepare(art, "torch", plan.payload.options, plan.spec)[0].weights
    gpus = explainer_gpus(sc.gpus_per_actor, sc.actors_max, ray.cluster_resources().get("GPU", 0.0))
    return ds.map_batches(
        Explainer,
        batch_size=sc.batch_size,
        batch_format="numpy",
        # One Grad-CAM actor: a pool allowed to grow would take the CPUs the decode tasks need
        # (Ray Data then waits for a decode slot forever) for work that is usually only the
        # flagged few.
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=sc.cpus_per_actor,
        num_gpus=gpus or None,
        fn_constructor_kwargs={
            "card": art.card,
            "weights": ray.put(weights),
            "out_dir": storage.join(out_dir, "heatmaps"),
            "only_flagged": sc.explain == "flagged",
            "limit": sc.explain_limit,
        },
    )


def starvation(sc: ScoreSettings, cluster_cpus: float) -> str | None:
    """Why the run would wait forever on this cluster's CPUs, or ``None``.

    Actor pools keep their CPUs; read/decode tasks need ``cpus_per_decode_task`` more. If
    the actors' reservation leaves less than that, Ray Data waits for a decode slot that
    never comes, silently. An autoscaling cluster may still add nodes, so this is a warning.
    """
    # What the pools can grow to: predictors up to actors_max, one Grad-CAM actor.
    pools = (sc.actors_max + (1 if sc.explain != "none" else 0)) * sc.cpus_per_actor
    if cluster_cpus and cluster_cpus - pools < sc.cpus_per_decode_task:
        return (
            f"the actor pools reserve {pools:g} of this cluster's {cluster_cpus:g} CPUs, leaving less than "
            f"score.cpus_per_decode_task = {sc.cpus_per_decode_task:g} for decode tasks: the run will wait "
            "for CPUs (forever, unless the cluster grows); lower score.cpus_per_actor, score.actors_min "
            "or score.cpus_per_decode_task"
        )
    return None


def explainer_gpus(gpus_per_actor: float, actors_max: int, cluster_gpus: float) -> float:
    """GPUs for the Grad-CAM actor: the predictors' share only if the cluster has room for a
    full predictor pool plus the explainer; else 0 (Grad-CAM on CPU).

    Asking for GPUs the predictor pool already holds would never schedule, and Ray Data
    would wait for it without a timeout (``gpus_per_actor=1`` with as many GPUs as actors).
    """
    if gpus_per_actor <= 0:
        return 0.0
    return gpus_per_actor if cluster_gpus >= gpus_per_actor * (actors_max + 1) else 0.0


def _with_run_columns(batch: pa.Table, *, version: str, run_id: str) -> pa.Table:
    n = batch.num_rows
    now = datetime.now(UTC)
    cols = {c: batch.column(c) for c in batch.column_names if c in PREDICTIONS_SCHEMA.names}
    cols["model_version"] = pa.array([version] * n, pa.string())
    for f in PREDICTIONS_SCHEMA:  # columns a stage did not produce (no DICOM in this block...)
        if f.name not in cols:
            cols[f.name] = pa.nulls(n, f.type)
    cols["run_id"] = pa.array([run_id] * n, pa.string())
    cols["scored_at"] = pa.array([now] * n, pa.timestamp("us", tz="UTC"))
    # Error rows carry no prediction: null, not the NaN / False placeholders of the batch.
    ok = pc.fill_null(pc.equal(cols["status"], "ok"), False)
    for name in _PREDICTION_COLUMNS:
        typ = PREDICTIONS_SCHEMA.field(name).type
        cols[name] = pc.if_else(ok, cols[name].cast(typ), pa.scalar(None, typ))
    table = pa.table({f.name: _conform(cols[f.name], f.type) for f in PREDICTIONS_SCHEMA})
    return table.cast(PREDICTIONS_SCHEMA)


def _conform(column: pa.ChunkedArray | pa.Array, typ: pa.DataType) -> pa.ChunkedArray | pa.Array:
    """A stage column as ``typ``: values that crossed Ray as float NaN (missing DICOM values,
    nullable integers, a block whose column is all null) become null. No output column has
    NaN as a value: non-finite model outputs are error rows."""
    if pa.types.is_floating(column.type):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    if column.null_count == len(column):
        return pa.nulls(len(column), typ)
    return column


_PREDICTION_COLUMNS = (
    "pred_label",
    "prob_normal",
    "prob_bacterial",
    "prob_viral",
    "prob_pneumonia",
    "flagged",
)


def score(
    source: str,
    artifact: Artifact | str,
    out: str,
    settings: Settings,
    *,
    run_id: str | None = None,
    seen: SeenFilter | None = None,
    history: str | None = None,
    on_block: Callable[[pa.Table], None] | None = None,
    overwrite: bool = False,
) -> ScoreResult:
    """Score every image of ``source`` with the model ``artifact`` into ``out``.

    ``artifact`` is a loaded ``Artifact`` (or its location, loaded here once); nothing below
    reads it again. With ``score.pseudonymize`` every block is pseudonymised before it is
    written (and before ``on_block`` sees it), so studies, flagged lists and nightly tables
    derived from it carry pseudonyms only. ``seen`` skips images this model version has
    already scored (nightly runs); ``history`` appends this run's metrics to a history table;
    ``on_block`` sees every committed block (ledgers, progress). An ``out`` that already holds a committed run
    (``summary.json``) is refused unless ``overwrite``.
    """
    started = time.perf_counter()
    art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact, verify_shapes=False)
    summary_uri = storage.join(out, "summary.json")
    if not overwrite and storage.exists(summary_uri):
        raise DataError(
            f"{out} already holds a committed scoring run ({summary_uri}); choose another --out, "
            "or pass --overwrite to replace it"
        )
    card = art.card
    sc = settings.score
    key = sc.pseudonym_key.get_secret_value().encode() if sc.pseudonymize and sc.pseudonym_key else None
    plan = plan_run(art, settings)
    run_id = run_id or new_run_id()
    result = ScoreResult(
        out,
        run_id,
        card.version,
        plan.engine,
        threshold=card.pneumonia_threshold,
        precision=plan.report.precision,
        int8_check=plan.report.int8_check,
        engine_report={"engine": plan.report.engine, "onnx_cache": plan.report.onnx_cache}
        | ({"notes": list(plan.report.notes)} if plan.report.notes else {}),
    )
    ds = build_dataset(source, art, plan, settings, out_dir=out, seen=seen)
    acc = _Accumulator(result)
    drift, result.drift = drift_accumulator(art, settings.drift)
    storage.ensure_dir(out)
    with storage.atomic_parquet_writer(storage.join(out, "predictions.parquet"), PREDICTIONS_SCHEMA) as w:
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if block.num_rows == 0:
                continue
            if not result.first_row_seconds:
                result.first_row_seconds = time.perf_counter() - started
            if drift is not None:  # before the internal columns (features, input_stats) go
                drift.add(block)
            table = _with_run_columns(block, version=card.version, run_id=run_id)
            if key is not None:  # research export: identifiers never reach the table
                table = pseudonymize_table(table, key)
            w.write_table(table)
            acc.add(table)
            if on_block is not None:
                on_block(table)
    studies = write_studies(out, card, run_id)
    result.studies = studies.num_rows
    result.flagged_studies = int(pc.sum(pc.fill_null(studies["flagged"], False)).as_py() or 0)
    sm = study_metrics(studies, threshold=card.pneumonia_threshold)
    if sm is not None:
        result.study_metrics = sm.summary()
    result.seconds = time.perf_counter() - started
    m = acc.metrics(card.pneumonia_threshold)
    if m is not None:
        result.metrics = m.summary()
        mt = metrics.metrics_table(m, run_id=run_id, model_version=card.version)
        storage.write_table(mt, storage.join(out, "metrics.parquet"))
        ct = metrics.confusion_table(m, run_id=run_id, model_version=card.version)
        storage.write_table(ct, storage.join(out, "confusion.parquet"))
        if history:
            storage.append_table(mt, history)
    if drift is not None:
        result.drift = write_drift(out, drift, run_id=run_id, model_version=card.version)
    storage.write_bytes(result.to_json().encode(), summary_uri)
    return result


def drift_accumulator(
    art: Artifact, settings: DriftSettings
) -> tuple[DriftAccumulator | None, dict[str, Any]]:
    """The run's drift accumulator (``None`` when there is nothing to compare with) and the
    ``drift`` entry of the summary until the check has run."""
    if not settings.enabled:
        return None, {"status": "disabled", "alert": False}
    if art.reference is None:
        logger.info("drift: no reference in this artifact (add one with `cxr-ray drift-reference`)")
        return None, {"status": "no_reference", "alert": False}
    try:
        return DriftAccumulator(read_reference(art.reference), art.card, settings), {}
    except ModelError as exc:  # the scoring run goes on; the check says why it did not run
        logger.warning("drift: the artifact's reference cannot be used: %s", exc)
        return None, {"status": "error", "alert": False, "note": str(exc)}


def write_drift(out: str, drift: DriftAccumulator, *, run_id: str, model_version: str) -> dict[str, Any]:
    """``OUT/drift.parquet`` (one row per figure), ``OUT/drift_plot.json`` (what the report's
    plots need) and the summary's ``drift`` entry; one warning line when the run alerts."""
    figures = drift.figures()
    storage.write_table(
        figures.table(run_id=run_id, model_version=model_version), storage.join(out, "drift.parquet")
    )
    plot = {"run_id": run_id, "model_version": model_version, **figures.plot}
    storage.write_bytes(json.dumps(plot).encode(), storage.join(out, "drift_plot.json"))
    summary = figures.summary()
    if summary["alert"]:
        logger.warning(drift_line(summary))
    return summary


def drift_line(d: dict[str, Any]) -> str | None:
    """The one summary line about drift (``None`` when the check was turned off)."""
    status = d.get("status")
    if status == "no_reference":
        return "drift: no reference in this artifact"
    if status == "error":
        return f"drift: not checked ({d.get('note')})"
    if status != "checked":
        return None
    figures = f"P(pneumonia) PSI {_fig(d.get('p_pneumonia_psi'))}, KS {_fig(d.get('p_pneumonia_ks'))}"
    if d.get("feature_pca_mean_shift") is not None:
        figures += f", feature shift {_fig(d.get('feature_pca_mean_shift'))}"
    if d.get("input_max_mean_shift") is not None:
        figures += f", largest input shift {_fig(d.get('input_max_mean_shift'))}"
    against = f"{d['n_images']} images vs {d['reference_n']} validation images"
    if d.get("alert"):
        alerts = d.get("alerts") or []
        shown = ", ".join(alerts[:4]) + (f" (+{len(alerts) - 4} more)" if len(alerts) > 4 else "")
        return f"DRIFT ALERT: {against} differ in {shown} ({figures}); see drift.parquet"
    return f"drift: no alert ({against}; {figures})"


def _fig(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"


def write_studies(out: str, card: ModelCard, run_id: str) -> pa.Table:
    """``OUT/studies.parquet`` from the committed ``OUT/predictions.parquet``: one row per study.

    The rule (``cxr_ray.scoring.studies``): a study is its StudyInstanceUID (else the patient
    id, else the image); its result is the in-scope frontal image with the highest
    P(pneumonia).
    """
    preds = storage.read_table(storage.join(out, "predictions.parquet"), columns=list(STUDY_INPUT_COLUMNS))
    studies = study_table(preds, frontal_views=card.intended_use_policy.views)
    storage.write_table(studies, storage.join(out, "studies.parquet"), STUDIES_SCHEMA)
    return studies


def format_summary(r: ScoreResult) -> str:
    engines = ", ".join(r.engines) if r.engines and r.engines != [r.engine] else r.engine
    cache = r.engine_report.get("onnx_cache")
    lines = [
        f"run {r.run_id}: {r.images} images, {r.ok} ok, {r.errors} errors, {r.skipped} skipped, "
        f"{r.flagged} flagged ({engines}{' ' + r.precision if r.precision else ''}, model {r.model_version}"
        + (f", ONNX cache {cache}" if cache else "")
        + ")",
        f"{r.studies} studies, {r.flagged_studies} flagged",
        f"{r.images_per_s:.1f} img/s over {r.seconds:.1f} s (first rows after {r.first_row_seconds:.1f} s)",
        f"outputs: {storage.join(r.out, 'predictions.parquet')}, studies.parquet"
        + (", metrics.parquet, confusion.parquet" if r.metrics else "")
        + (", drift.parquet" if r.drift.get("status") == "checked" else ""),
    ]
    drift = drift_line(r.drift)
    if drift is not None:
        lines.append(drift)
    if r.int8_check:
        c = r.int8_check
        lines.append(
            f"INT8 model vs fp32 on {c['images']} validation images: argmax agreement "
            f"{c['argmax_agreement']:.3f}, mean |probability change| {c['mean_abs_prob_change']:.4f}"
        )
    for e in r.error_examples[:5]:
        lines.append(f"  error: image {str(e['image_id'] or '(unreadable)')[:12]}: {e['error']}")
    return "\n".join(lines)
