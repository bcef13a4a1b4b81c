"""Score an archive with Ray Data and write predictions, metrics and a summary.

::

    source --list--> read tasks (bytes) --decode_stage--> CPU tasks (pixels)
           --CxrPredictor--> actor pool (CPU fractions or GPUs) --> driver --> Parquet

Everything streams: blocks hold at most ``data.rows_per_block`` images and Ray Data's
backpressure bounds what is in flight, so memory does not grow with the archive. The driver
writes one row per input image (errors included) to ``predictions.parquet`` as blocks
arrive and commits it atomically at the end, then writes ``metrics.parquet``,
``confusion.parquet``, ``studies.parquet`` (one row per study), the drift check against the
artifact's reference (``drift.parquet``, ``drift_plot.json``; ``cxr_ray.scoring.drift_io``) and
``summary.json`` (the run's completion marker, written last).

This module is the Ray plan and the run; the rest of a run lives next door:
``result`` (``ScoreResult``, the accumulator, ``format_summary``), ``evaluation`` (metrics of
a predictions table), ``schema`` (the predictions schema and conforming a block to it) and
``drift_io`` (the drift check's outputs). Columns: docs/OUTPUTS.md.

Output folder::

    OUT/predictions.parquet  OUT/studies.parquet  OUT/metrics.parquet  OUT/confusion.parquet
    OUT/drift.parquet  OUT/drift_plot.json  OUT/summary.json
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.config import ScoreSettings, Settings
from cxr_ray.data.manifest import source_dataset
from cxr_ray.engines import EnginePayload, PrepareReport, engine_options, prepare, select_engine
from cxr_ray.errors import DataError
from cxr_ray.imaging.preprocess import PreprocessSpec
from cxr_ray.io import storage
from cxr_ray.models.artifact import Artifact, load_artifact
from cxr_ray.models.card import spec_for
from cxr_ray.models.intended_use import IntendedUse
from cxr_ray.scoring.stages import CxrPredictor, SeenFilter, decode_stage

if TYPE_CHECKING:
    from cxr_ray.scoring.drift import DriftAccumulator
    from cxr_ray.scoring.estimate import EstimateAccumulator
    from cxr_ray.scoring.result import ScoreAccumulator, ScoreResult

logger = logging.getLogger(__name__)

#: What a run needs only once rows arrive: the drift check (scipy.stats, about a second of
#: imports), the estimators, metrics, the result. ``score`` imports them on a thread while
#: Ray Data starts the predictor actors and decodes the first block, off the path to the
#: first rows; ``import cxr_ray.scoring.pipeline`` stays light for the CLI.
AFTER_FIRST_ROWS: tuple[str, ...] = (
    "cxr_ray.scoring.result",
    "cxr_ray.scoring.drift_io",
    "cxr_ray.scoring.estimate",
    "cxr_ray.scoring.evaluation",
    "cxr_ray.scoring.performance",
    "cxr_ray.scoring.pseudonymize",
    "cxr_ray.scoring.schema",
    "cxr_ray.scoring.studies",
)


def import_in_background(names: Sequence[str] = AFTER_FIRST_ROWS) -> threading.Thread:
    """A started daemon thread importing ``names`` (join it before using them; an import
    that fails there fails again, with its error, where the module is used)."""

    def run() -> None:
        for name in names:
            with contextlib.suppress(Exception):
                importlib.import_module(name)

    thread = threading.Thread(target=run, name="cxr-imports", daemon=True)
    thread.start()
    return thread


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


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
    # CPU actors: "auto" is resolved on the driver, by an agreement check (engines.choice).
    engine = "auto" if sc.engine == "auto" else select_engine(sc.engine)
    spec = spec_for(art.card, settings.data)
    payload, report = prepare(art, engine, engine_options(sc), spec, cpu=not gpu_actors)
    return ScorePlan(report.engine, payload, report, spec)


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
            "intended_use": intended_use_policy(art, sc),
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
    _limit_object_store(ds, sc.object_store_limit_mb)
    if not explain:
        return ds
    from cxr_ray.scoring.explain import Explainer

    weights = plan.payload.weights or prepare(art, "torch", plan.payload.options, plan.spec)[0].weights
    gpus = explainer_gpus(sc.gpus_per_actor, sc.actors_max, ray.cluster_resources().get("GPU", 0.0))
    explained = ds.map_batches(
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
    _limit_object_store(explained, sc.object_store_limit_mb)
    return explained


def intended_use_policy(art: Artifact, sc: ScoreSettings) -> IntendedUse:
    """The model card's intended-use block, with the operator's ``score.score_unparseable``
    opt-in applied (the card's own opt-in stays on when set)."""
    policy = art.card.intended_use_policy
    if sc.score_unparseable and not policy.score_unparseable:
        return policy.model_copy(update={"score_unparseable": True})
    return policy


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


def _limit_object_store(ds: Any, limit_mb: int) -> None:
    """Cap what this dataset's execution may hold in the object store (its own context: no
    other dataset of the process is touched); ``0`` keeps Ray Data's default."""
    if limit_mb <= 0:
        return
    options = ds.context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=limit_mb * 1024 * 1024)


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
    warm = import_in_background()
    art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact, verify_shapes=False)
    summary_uri = storage.join(out, "summary.json")
    if not overwrite and storage.exists(summary_uri):
        raise DataError(
            f"{out} already holds a committed scoring run ({summary_uri}); choose another --out, "
            "or pass --overwrite to replace it"
        )
    run_id = run_id or new_run_id()
    plan = plan_run(art, settings)
    ds = build_dataset(source, art, plan, settings, out_dir=out, seen=seen)
    # Ray Data starts executing here; what only the rows need is set up while it does.
    blocks = (b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows)
    first = next(blocks, None)
    first_row_seconds = time.perf_counter() - started if first is not None else 0.0
    warm.join()
    from cxr_ray.scoring.drift_io import drift_accumulator, write_drift
    from cxr_ray.scoring.estimate import run_estimator
    from cxr_ray.scoring.evaluation import write_metrics
    from cxr_ray.scoring.performance import append_history_rows, check_accumulated
    from cxr_ray.scoring.result import redacted_settings

    result = _new_result(out, run_id, art, plan)
    result.source, result.settings = _shown_source(source, settings), redacted_settings(settings)
    result.first_row_seconds = first_row_seconds
    drift, result.drift = drift_accumulator(art, settings.drift, reference=plan.report.drift_reference)
    estimator = run_estimator(art, drift.ref if drift is not None else None)  # the reference read once
    rows = itertools.chain([first], blocks) if first is not None else iter(())
    acc = _write_predictions(
        rows, result, settings.score, drift=drift, on_block=on_block, estimator=estimator
    )
    _write_studies(result, art)
    result.seconds = time.perf_counter() - started
    m = acc.metrics(result.flag_threshold)
    if m is not None:
        result.metrics = m.summary()
        write_metrics(out, m, run_id=result.run_id, model_version=result.model_version, history=history)
    if drift is not None:
        result.drift = write_drift(out, drift, run_id=result.run_id, model_version=result.model_version)
    result.performance_estimate = estimator.finish()
    result.performance_check = check_accumulated(art.card, acc.y, acc.p, acc.units)
    append_history_rows(out, result)  # nightly ROOT/drift_history gets them with the drift rows
    result.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    storage.write_bytes(result.to_json().encode(), summary_uri)
    return result


def _shown_source(source: str, settings: Settings) -> str:
    """The source as summary.json shows it: keyed like every ``uri`` in a pseudonymised run
    (a folder's name can be a patient's), without credentials and query string otherwise."""
    from cxr_ray.scoring.pseudonymize import pseudonym_uri
    from cxr_ray.scoring.result import safe_uri

    sc = settings.score
    if sc.pseudonymize and sc.pseudonym_key:
        return pseudonym_uri(source, sc.pseudonym_key.get_secret_value().encode())
    return safe_uri(source)


def _new_result(out: str, run_id: str, art: Artifact, plan: ScorePlan) -> ScoreResult:
    """The run's result before any row is written: what the driver resolved (engine,
    precision, cache)."""
    from cxr_ray.scoring.result import ScoreResult, library_versions

    report = plan.report
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    return ScoreResult(
        out,
        run_id,
        art.card.version,
        plan.engine,
        flag_threshold=art.card.pneumonia_threshold,
        engine_precision=report.precision,
        int8_check=report.int8_check,
        started_at=started_at,
        versions=library_versions(),
        engine_report={"engine": report.engine, "onnx_cache": report.onnx_cache}
        | ({"notes": list(report.notes)} if report.notes else {})
        | ({"choice": report.engine_check} if report.engine_check else {}),
    )


def _write_predictions(
    blocks: Iterable[pa.Table],
    result: ScoreResult,
    sc: ScoreSettings,
    *,
    drift: DriftAccumulator | None,
    on_block: Callable[[pa.Table], None] | None,
    estimator: EstimateAccumulator | None = None,
) -> ScoreAccumulator:
    """Stream the dataset's (non-empty) blocks into ``OUT/predictions.parquet`` (committed
    at the end), feeding the drift check, the result's counts and ``on_block`` on the way."""
    from cxr_ray.scoring.pseudonymize import pseudonymize_table
    from cxr_ray.scoring.result import ScoreAccumulator
    from cxr_ray.scoring.schema import PREDICTIONS_SCHEMA, with_run_columns

    key = sc.pseudonym_key.get_secret_value().encode() if sc.pseudonymize and sc.pseudonym_key else None
    acc = ScoreAccumulator(result)
    storage.ensure_dir(result.out)
    uri = storage.join(result.out, "predictions.parquet")
    with storage.atomic_parquet_writer(uri, PREDICTIONS_SCHEMA) as w:
        for block in blocks:
            if drift is not None:  # before the internal columns (features, input_stats) go
                drift.add(block)
            if estimator is not None:  # the label-free performance estimate (features too)
                estimator.add(block)
            table = with_run_columns(block, version=result.model_version, run_id=result.run_id)
            if key is not None:  # research export: identifiers never reach the table
                table = pseudonymize_table(table, key, level=sc.pseudonymize_level)
            w.write_table(table)
            acc.add(table)
            if on_block is not None:
                on_block(table)
    return acc


def _write_studies(result: ScoreResult, art: Artifact) -> None:
    """``OUT/studies.parquet`` and the result's study counts and study-level metrics."""
    from cxr_ray.scoring.evaluation import write_studies
    from cxr_ray.scoring.studies import study_metrics

    studies = write_studies(result.out, art.card)
    result.studies = studies.num_rows
    result.flagged_studies = int(pc.sum(pc.fill_null(studies["flagged"], False)).as_py() or 0)
    sm = study_metrics(studies, threshold=result.flag_threshold)
    if sm is not None:
        result.study_metrics = sm.summary()
