"""What a scoring run reports: ``ScoreResult`` (``OUT/summary.json``), the block-by-block
accumulator that fills it, and the console summary (``format_summary``).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray import __version__, metrics
from cxr_ray.config import Settings
from cxr_ray.errors import error_code, safe_row_error
from cxr_ray.io import storage
from cxr_ray.scoring.drift_io import drift_line
from cxr_ray.scoring.estimate import estimate_line
from cxr_ray.scoring.evaluation import labelled_arrays, labelled_units
from cxr_ray.scoring.performance import performance_line
from cxr_ray.vocabulary import Status

#: Error rows kept in the summary as examples (image id and error text only).
ERROR_EXAMPLES = 20
#: Characters of ``driving_image_id`` (an image's sha256) that name a study in summaries.
REF_CHARS = 12


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
    #: The model card's pneumonia flag threshold: ``flagged`` is ``prob_pneumonia >=`` it, and
    #: the binary metrics ``*_at_threshold`` use it.
    flag_threshold: float = 0.5
    #: The engine's numeric precision where it has a setting (onnxruntime, tensorrt, openvino).
    engine_precision: str | None = None
    #: What was scored (credentials and query strings cut out of a URI).
    source: str = ""
    #: When the run started and finished (UTC, ISO 8601).
    started_at: str = ""
    finished_at: str = ""
    #: cxr-ray, Ray, Python and the engines' library versions of the driver.
    versions: dict[str, str] = field(default_factory=dict)
    #: The settings the run used (``model_dump``), secrets redacted (``redacted_settings``).
    settings: dict[str, Any] = field(default_factory=dict)
    #: INT8 onnxruntime only: agreement with the fp32 model on the artifact's validation images.
    int8_check: dict[str, Any] | None = None
    #: What preparing the engine took: ``onnx_cache`` is ``hit`` when the exported (or
    #: quantized) model came from the node's cache, ``built`` when this run made it.
    engine_report: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    #: The same metrics per study (labelled studies only), when labels exist.
    study_metrics: dict[str, float] = field(default_factory=dict)
    error_examples: list[dict[str, str | None]] = field(default_factory=list)
    #: Error and skipped rows per reason code (``error_code``, docs/OUTPUTS.md).
    error_codes: dict[str, int] = field(default_factory=dict)
    #: The drift check against the artifact's reference: ``status`` (``checked``,
    #: ``no_reference``, ``disabled``, ``error``), ``alert`` and the key figures
    #: (``DriftFigures.summary``); every figure is in ``drift.parquet``.
    drift: dict[str, Any] = field(default_factory=dict)
    #: The label-free estimate of this run's performance (``cxr_ray.scoring.estimate``).
    performance_estimate: dict[str, Any] = field(default_factory=dict)
    #: Labelled runs: measured performance against the model card's intervals.
    performance_check: dict[str, Any] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        """The older name of ``flag_threshold`` (not written to summary.json)."""
        return self.flag_threshold

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def to_json(self) -> str:
        d = asdict(self) | {"images_per_s": self.images_per_s}
        return json.dumps(d, indent=2, default=float) + "\n"


#: Settings names whose values are never written out (the value becomes ``REDACTED``).
_SECRET = re.compile(r"(^|_)(key|token|password|passwd|secret|credentials?)($|_)", re.IGNORECASE)
REDACTED = "<redacted>"
#: Libraries whose versions a run records (those installed on the driver).
VERSIONED = ("ray", "pyarrow", "onnxruntime", "torch", "openvino", "tensorrt", "deltalake")


def redacted_settings(settings: Settings) -> dict[str, Any]:
    """``settings`` as JSON-ready dicts with every secret value (a field named like a key,
    token, password or secret; every ``SecretStr``) replaced by ``REDACTED`` and
    credentials cut out of URIs."""

    def walk(value: Any, name: str = "") -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, name) for v in value]
        if value is not None and value != "" and _SECRET.search(name):
            return REDACTED
        return safe_uri(value) if isinstance(value, str) else value

    return walk(settings.model_dump(mode="json"))


def safe_uri(uri: str) -> str:
    """``uri`` without user:password@ and query string (where signatures and tokens go)."""
    parts = urlsplit(uri)
    if not parts.scheme or not parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def library_versions() -> dict[str, str]:
    """cxr-ray's, Python's and the installed ``VERSIONED`` libraries' versions."""
    out = {"cxr_ray": __version__, "python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


class ScoreAccumulator:
    """Counts, metric inputs and a few error examples, block by block."""

    def __init__(self, result: ScoreResult) -> None:
        self.r = result
        self.y: list[np.ndarray] = []
        self.p: list[np.ndarray] = []
        self.units: list[np.ndarray] = []  # hashed patient keys of the labelled rows

    def add(self, t: pa.Table) -> None:
        r = self.r
        r.images += t.num_rows
        ok = pc.equal(t["status"], Status.OK)
        n_ok = int(pc.sum(ok).as_py() or 0)
        n_skipped = int(pc.sum(pc.equal(t["status"], Status.SKIPPED)).as_py() or 0)
        r.ok += n_ok
        r.skipped += n_skipped
        r.errors += t.num_rows - n_ok - n_skipped
        r.flagged += int(pc.sum(pc.fill_null(t["flagged"], False)).as_py() or 0)
        for name in pc.unique(t["engine"]).to_pylist():
            if name not in r.engines:
                r.engines.append(name)
        codes = t["error_code"] if "error_code" in t.column_names else None
        if codes is not None:
            for item in pc.value_counts(pc.drop_null(codes)).to_pylist():
                code, n = item["values"], item["counts"]
                r.error_codes[code] = r.error_codes.get(code, 0) + n
        room = ERROR_EXAMPLES - len(r.error_examples)
        if room > 0:
            bad = t.filter(pc.equal(t["status"], Status.ERROR)).slice(0, room)
            # image_id, the code and the error only: a uri can carry a patient identifier. The
            # text is made safe again here (``safe_row_error``) whatever table it came from.
            r.error_examples += [
                {
                    "image_id": e["image_id"],
                    "error_code": error_code(e["error"]),
                    "error": safe_row_error(e["error"]),
                }
                for e in bad.select(["image_id", "error"]).to_pylist()
            ]
        y, p = labelled_arrays(t)
        if len(y):
            self.y.append(y)
            self.p.append(p)
            self.units.append(labelled_units(t))

    def metrics(self, threshold: float) -> metrics.Metrics | None:
        if not self.y:
            return None
        y, p = np.concatenate(self.y), np.concatenate(self.p)
        self.r.labelled = len(y)
        return metrics.classification_metrics(y, p, threshold=threshold)


def flagged_studies(studies: pa.Table) -> pa.Table:
    """The flagged rows of a ``studies.parquet`` table, most suspicious first (deterministic)."""
    flagged = studies.filter(pc.fill_null(studies["flagged"], False))
    return flagged.sort_by([("prob_pneumonia", "descending"), ("driving_image_id", "ascending")])


def format_summary(r: ScoreResult) -> str:
    """The console summary of a run: one line per topic, in this order."""
    lines = [
        _run_line(r),
        f"{r.studies} studies, {r.flagged_studies} flagged",
        _speed_line(r),
        _outputs_line(r),
    ]
    drift = drift_line(r.drift)
    if drift is not None:
        lines.append(drift)
    lines += [x for x in (performance_line(r.performance_check), estimate_line(r.performance_estimate)) if x]
    if r.int8_check:
        lines.append(_int8_line(r.int8_check))
    if r.error_codes:
        by_code = sorted(r.error_codes.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append("reasons: " + ", ".join(f"{code} {n}" for code, n in by_code))
    for e in r.error_examples[:5]:
        text = safe_row_error(e["error"])
        lines.append(f"  error: image {str(e['image_id'] or '(unreadable)')[:12]}: {text}")
    return "\n".join(lines)


def _run_line(r: ScoreResult) -> str:
    engines = ", ".join(r.engines) if r.engines and r.engines != [r.engine] else r.engine
    cache = r.engine_report.get("onnx_cache")
    precision = f" {r.engine_precision}" if r.engine_precision else ""
    return (
        f"run {r.run_id}: {r.images} images, {r.ok} ok, {r.errors} errors, {r.skipped} skipped, "
        f"{r.flagged} flagged ({engines}{precision}, model {r.model_version}"
        + (f", ONNX cache {cache}" if cache else "")
        + ")"
    )


def _speed_line(r: ScoreResult) -> str:
    return f"{r.images_per_s:.1f} img/s over {r.seconds:.1f} s (first rows after {r.first_row_seconds:.1f} s)"


def _outputs_line(r: ScoreResult) -> str:
    return (
        f"outputs: {storage.join(r.out, 'predictions.parquet')}, studies.parquet"
        + (", metrics.parquet, confusion.parquet" if r.metrics else "")
        + (", drift.parquet" if r.drift.get("status") == "checked" else "")
    )


def _int8_line(c: dict[str, Any]) -> str:
    return (
        f"INT8 model vs fp32 on {c['images']} validation images: argmax agreement "
        f"{c['argmax_agreement']:.3f}, mean |probability change| {c['mean_abs_prob_change']:.4f}"
    )
