"""Score an archive with Ray Data and write predictions, metrics and a summary.

::

    source --list--> read tasks (bytes) --decode_stage--> CPU tasks (pixels)
           --CxrPredictor--> actor pool (CPU fractions or GPUs) --> driver --> Parquet

Everything streams: blocks hold at most ``data.rows_per_block`` images and Ray Data's
backpressure bounds what is in flight, so memory does not grow with the archive. The driver
writes one row per input image (errors included) to ``predictions.parquet`` as blocks
arrive and commits it atomically at the end, then writes ``metrics.parquet``,
``confusion.parquet`` and ``summary.json`` (the run's completion marker).

Output folder::

    OUT/predictions.parquet  OUT/metrics.parquet  OUT/confusion.parquet  OUT/summary.json
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
from cxr_ray.config import Settings
from cxr_ray.data.manifest import source_dataset
from cxr_ray.engines import prepare_payload, select_engine
from cxr_ray.io import storage
from cxr_ray.labels import LABELS
from cxr_ray.models.artifact import read_card
from cxr_ray.models.card import spec_for
from cxr_ray.scoring.schema import PREDICTIONS_SCHEMA
from cxr_ray.scoring.stages import CxrPredictor, SeenIndex, decode_stage

logger = logging.getLogger(__name__)


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


@dataclass
class ScoreResult:
    out: str
    run_id: str
    model_version: str
    engine: str
    images: int = 0
    ok: int = 0
    errors: int = 0
    flagged: int = 0
    labelled: int = 0
    seconds: float = 0.0
    first_row_seconds: float = 0.0
    #: The model card's pneumonia flag threshold (what ``flagged`` and the binary metrics use).
    threshold: float = 0.5
    #: The engine's numeric precision where it has a setting (onnxruntime, tensorrt).
    precision: str | None = None
    #: INT8 onnxruntime only: agreement with the fp32 model on the artifact's validation images.
    int8_check: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error_examples: list[dict[str, str]] = field(default_factory=list)

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
        r.ok += n_ok
        r.errors += t.num_rows - n_ok
        r.flagged += int(pc.sum(pc.fill_null(t["flagged"], False)).as_py() or 0)
        room = 20 - len(r.error_examples)
        if room > 0:
            r.error_examples += t.filter(pc.invert(ok)).select(["uri", "error"]).slice(0, room).to_pylist()
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


def build_dataset(
    source: str,
    artifact: str,
    settings: Settings,
    *,
    engine: str,
    out_dir: str = ".",
    seen_ids: list[str] | None = None,
    engine_info: dict[str, Any] | None = None,
) -> Any:
    """The lazy Ray Dataset of prediction rows (without run columns) for ``source``.

    ``engine_info`` (when given) receives, for an INT8 onnxruntime model, its check against
    fp32 on the artifact's validation images (``int8_check``).
    """
    import ray
    import ray.data

    sc = settings.score
    card = read_card(artifact)
    gpu_actors = sc.gpus_per_actor > 0
    options: dict[str, Any] = {
        "threads": sc.threads_per_actor or (None if gpu_actors else max(1, int(sc.cpus_per_actor))),
        "cache_dir": sc.cache_dir,
        "trt_precision": sc.trt_precision,
        "onnx_precision": sc.onnx_precision,
        "onnx_calibration_images": sc.onnx_calibration_images,
        "trt_min_batch": sc.trt_min_batch,
        "trt_opt_batch": sc.trt_opt_batch,
        "trt_max_batch": sc.trt_max_batch,
    }
    if sc.trt_precision == "int8" and engine in ("tensorrt", "auto"):
        from cxr_ray.models.splits import calibration_images

        options["calibration"] = calibration_images(artifact, sc.trt_calibration_images)
    payload = prepare_payload(artifact, engine, cache_dir=sc.cache_dir, options=options)
    if engine_info is not None and "int8_check" in payload.options:
        engine_info["int8_check"] = payload.options["int8_check"]
    payload_ref = ray.put(payload)
    seen = None
    if seen_ids:
        seen = ray.remote(SeenIndex).options(num_cpus=0).remote(seen_ids)
    spec = spec_for(card, settings.data)
    explain = sc.explain != "none"
    ds = source_dataset(source, settings.data)
    ds = ds.map_batches(
        decode_stage,
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=sc.cpus_per_decode_task,
        # Heatmaps need the decoded pixels on the CPU side, so explaining turns GPU decode off.
        fn_kwargs={"spec": spec, "seen": seen, "gpu_jpeg": gpu_actors and sc.gpu_decode and not explain},
    )
    ds = ds.map_batches(
        CxrPredictor,
        batch_size=sc.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=sc.actors_min, max_size=sc.actors_max),
        num_cpus=sc.cpus_per_actor,
        num_gpus=sc.gpus_per_actor or None,
        fn_constructor_kwargs={"payload": payload_ref, "gpu_decode": sc.gpu_decode, "keep_pixels": explain},
    )
    if not explain:
        return ds
    from cxr_ray.scoring.explain import Explainer

    torch_payload = payload if payload.weights else prepare_payload(artifact, "torch", cache_dir=sc.cache_dir)
    return ds.map_batches(
        Explainer,
        batch_size=sc.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=sc.actors_max),
        num_cpus=sc.cpus_per_actor,
        num_gpus=sc.gpus_per_actor or None,
        fn_constructor_kwargs={
            "payload": ray.put(torch_payload),
            "out_dir": storage.join(out_dir, "heatmaps"),
            "only_flagged": sc.explain == "flagged",
            "limit": sc.explain_limit,
        },
    )


def _with_run_columns(batch: pa.Table, *, version: str, run_id: str) -> pa.Table:
    n = batch.num_rows
    now = datetime.now(UTC)
    cols = {c: batch.column(c) for c in batch.column_names if c in PREDICTIONS_SCHEMA.names}
    cols["model_version"] = pa.array([version] * n, pa.string())
    if "heatmap_uri" not in cols:
        cols["heatmap_uri"] = pa.nulls(n, pa.string())
    cols["run_id"] = pa.array([run_id] * n, pa.string())
    cols["scored_at"] = pa.array([now] * n, pa.timestamp("us", tz="UTC"))
    # Error rows carry no prediction: null, not the NaN / False placeholders of the batch.
    ok = pc.fill_null(pc.equal(cols["status"], "ok"), False)
    for name in _PREDICTION_COLUMNS:
        typ = PREDICTIONS_SCHEMA.field(name).type
        cols[name] = pc.if_else(ok, cols[name].cast(typ), pa.scalar(None, typ))
    table = pa.table(cols)
    return table.select(PREDICTIONS_SCHEMA.names).cast(PREDICTIONS_SCHEMA)


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
    artifact: str,
    out: str,
    settings: Settings,
    *,
    run_id: str | None = None,
    seen_ids: list[str] | None = None,
    history: str | None = None,
    on_block: Callable[[pa.Table], None] | None = None,
) -> ScoreResult:
    """Score every image of ``source`` with the model at ``artifact`` into ``out``.

    ``seen_ids`` skips images this model version has already scored (nightly runs);
    ``history`` appends this run's metrics to a history table; ``on_block`` sees every
    committed block (ledgers, progress).
    """
    started = time.perf_counter()
    card = read_card(artifact)
    gpu_actors = settings.score.gpus_per_actor > 0
    requested = settings.score.engine
    # With GPU actors, "auto" is resolved inside each actor: the driver may have no GPU.
    engine = "auto" if requested == "auto" and gpu_actors else select_engine(requested)
    run_id = run_id or new_run_id()
    result = ScoreResult(out, run_id, card.version, engine, threshold=card.pneumonia_threshold)
    engine_info: dict[str, Any] = {}
    ds = build_dataset(
        source, artifact, settings, engine=engine, out_dir=out, seen_ids=seen_ids, engine_info=engine_info
    )
    sc = settings.score
    result.precision = {"onnxruntime": sc.onnx_precision, "tensorrt": sc.trt_precision}.get(engine)
    result.int8_check = engine_info.get("int8_check")
    acc = _Accumulator(result)
    storage.ensure_dir(out)
    with storage.atomic_parquet_writer(storage.join(out, "predictions.parquet"), PREDICTIONS_SCHEMA) as w:
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if block.num_rows == 0:
                continue
            if not result.first_row_seconds:
                result.first_row_seconds = time.perf_counter() - started
            table = _with_run_columns(block, version=card.version, run_id=run_id)
            if result.engine == "auto":
                result.engine = table["engine"][0].as_py()
            w.write_table(table)
            acc.add(table)
            if on_block is not None:
                on_block(table)
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
    storage.write_bytes(result.to_json().encode(), storage.join(out, "summary.json"))
    return result


def format_summary(r: ScoreResult) -> str:
    lines = [
        f"run {r.run_id}: {r.images} images, {r.ok} ok, {r.errors} errors, {r.flagged} flagged "
        f"({r.engine}{' ' + r.precision if r.precision else ''}, model {r.model_version})",
        f"{r.images_per_s:.1f} img/s over {r.seconds:.1f} s (first rows after {r.first_row_seconds:.1f} s)",
        f"outputs: {storage.join(r.out, 'predictions.parquet')}"
        + (", metrics.parquet, confusion.parquet" if r.metrics else ""),
    ]
    if r.int8_check:
        c = r.int8_check
        lines.append(
            f"INT8 model vs fp32 on {c['images']} validation images: argmax agreement "
            f"{c['argmax_agreement']:.3f}, mean |probability change| {c['mean_abs_prob_change']:.4f}"
        )
    for e in r.error_examples[:5]:
        lines.append(f"  error: {e['uri']}: {e['error']}")
    return "\n".join(lines)
