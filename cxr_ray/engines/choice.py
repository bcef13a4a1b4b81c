"""``engine = "auto"`` for CPU actors: the fastest engine that agrees with fp32 on the artifact's images.

onnxruntime fp32 is the reference and the fallback. Faster CPU engines (``CPU_CANDIDATES``,
fastest first, measured in benchmarks/RESULTS.md: OpenVINO bf16 where the CPU computes bf16
natively, then OpenVINO fp32) are used for an artifact only after an **agreement check** on
its own validation images (the ``val`` rows of ``ARTIFACT/split.parquet``, a seeded sample of
at most ``CHECK_IMAGES``, preprocessed as scoring preprocesses them): the card's calibrated
probabilities of the candidate against onnxruntime fp32 on the same model input must have
argmax agreement >= ``MIN_ARGMAX_AGREEMENT`` and max |dp| <= ``MAX_ABS_DP``, and the same
check times both (model only, the actors' threads): the candidate must also be at least
``MIN_SPEEDUP`` times onnxruntime's speed. The first candidate that passes both is chosen;
none passing (or no readable validation images, or OpenVINO not installed) leaves
onnxruntime fp32, with one log line saying why.

The decision and every check's figures (agreement, max and mean |dp|, images, engine,
precision, library versions, CPU) are stored next to the exported ONNX model
(``cache_dir/onnx/<model>-auto-<key>.json``), keyed by everything the outcome depends on
(network, calibration, preprocessing, candidates, CPU, OpenVINO and onnxruntime versions):
later runs on the node read the decision and run no check. The run's engine report carries
it (``PrepareReport.engine_check``).

Drift: a chosen engine that is not fp32 (bf16) computes features and logits about 5% / 1e-2
away from fp32, while the artifact's drift reference was computed in fp32 (torch). So the
drift reference is **recomputed with the chosen engine** from the same validation images
(``models.reference.build_reference(..., outputs=...)``), cached next to the decision
(``...-auto-<key>.reference.safetensors``) and used by the run instead of the artifact's
(``PrepareReport.drift_reference``). fp32 engines use the artifact's reference as it is
(their features agree with torch fp32 to float rounding; the check records how closely).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock

from cxr_ray.engines.onnx_export import onnx_stem
from cxr_ray.engines.options import EngineOptions
from cxr_ray.errors import EngineUnavailableError
from cxr_ray.imaging.preprocess import PreprocessSpec, to_model_input

if TYPE_CHECKING:
    from cxr_ray.models.artifact import Artifact

logger = logging.getLogger(__name__)

#: Faster than onnxruntime fp32 on CPUs, fastest first: (engine, precision).
CPU_CANDIDATES = (("openvino", "bf16"), ("openvino", "fp32"))
REFERENCE = ("onnxruntime", "fp32")
MIN_ARGMAX_AGREEMENT = 0.995
MAX_ABS_DP = 0.05
#: A candidate that agrees is used only if it is also this much faster than onnxruntime fp32,
#: timed in the same check (model only, the actors' threads, the check's images). OpenVINO
#: fp32 was 1.51x onnxruntime on one day's CPU and 0.8-0.9x on another (benchmarks/RESULTS.md):
#: "faster" is measured per node, not assumed.
MIN_SPEEDUP = 1.1
#: Validation images the check scores (a seeded sample when the split has more). At the bar,
#: 1,024 images allow 5 disagreements; a candidate that truly disagrees on 1% of images
#: (twice the bar) passes with probability 0.07, and one at 0.2% fails with probability 0.02.
CHECK_IMAGES = 1024
CHECK_SEED = 0
BATCH = 64
#: Bump when what the cached decision means changes (older decisions are never reused).
CHOICE_FORMAT = "cxr-ray-engine-choice/2"

Outputs = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
#: Builds the engine ``(engine, precision)`` for this artifact's ONNX model (``engines.base``
#: passes its registry's ``build``: this module imports no engine module).
MakeEngine = Callable[[str, str], Outputs]


@dataclass(frozen=True)
class CpuChoice:
    """The resolved engine and what decided it."""

    engine: str
    precision: str
    #: The stored decision: ``checks`` (one per candidate tried), ``reason``, versions, CPU.
    record: dict[str, Any]
    #: ``hit`` when the decision came from the cache, ``built`` when checked in this run,
    #: ``None`` when no check could run (not cached).
    cache: str | None
    #: The drift reference computed with the chosen engine (``None``: the artifact's applies).
    drift_reference: bytes | None = None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("onnxruntime", "openvino"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def choice_path(art: Artifact, options: EngineOptions, spec: PreprocessSpec, candidates: Any) -> Path:
    """Where the decision for ``art`` under these conditions is cached."""
    key = {
        "format": CHOICE_FORMAT,
        "calibration": art.card.calibration_fingerprint,
        "spec": repr(spec),
        "candidates": [list(c) for c in candidates],
        "threads": options.threads,
        "cpu": _cpu_model(),
        "versions": _versions(),
        "bar": [MIN_ARGMAX_AGREEMENT, MAX_ABS_DP, CHECK_IMAGES, CHECK_SEED, MIN_SPEEDUP],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(options.cache_dir) / "onnx" / f"{onnx_stem(art)}-auto-{digest}.json"


def batched(run: Outputs) -> Outputs:
    """``run`` over model input ``float32 [N, 1, H, W]`` in batches of 64, outputs float64."""

    def outputs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs = [run(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]
        logits = np.concatenate([o[0] for o in outs]).astype(np.float64)
        return logits, np.concatenate([o[1] for o in outs]).astype(np.float64)

    return outputs


def timed(run: Outputs, x: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], float]:
    """``run(x)`` and its speed in images per second (after one warm-up batch)."""
    run(x[:BATCH])
    start = time.perf_counter()
    out = run(x)
    return out, len(x) / max(time.perf_counter() - start, 1e-9)


def agreement(
    art: Artifact, ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    """The candidate's outputs ``got`` against the reference's ``ref`` on the same images."""
    p_ref, p = art.card.probabilities(ref[0]), art.card.probabilities(got[0])
    dp = np.abs(p - p_ref)
    f_ref, f = ref[1], got[1]
    rel = np.linalg.norm(f - f_ref, axis=1) / np.maximum(np.linalg.norm(f_ref, axis=1), 1e-12)
    out = {
        "images": len(p),
        "argmax_agreement": float((p.argmax(1) == p_ref.argmax(1)).mean()),
        "max_abs_dp": float(dp.max()),
        "mean_abs_dp": float(dp.mean()),
        "feature_rel_l2_max": float(rel.max()),
    }
    out["passed"] = out["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT and out["max_abs_dp"] <= MAX_ABS_DP
    return out


def _figures(check: dict[str, Any]) -> str:
    return (
        f"argmax agreement {check['argmax_agreement']:.4f} (>= {MIN_ARGMAX_AGREEMENT} needed), "
        f"max |dp| {check['max_abs_dp']:.4f} (<= {MAX_ABS_DP})"
    )


def _why_not(c: dict[str, Any]) -> str:
    if not c["passed"]:
        return (
            f"{c['engine']} {c['precision']} disagrees with {REFERENCE[0]} fp32 on {c['images']} validation "
            f"images: {_figures(c)}"
        )
    return (
        f"{c['engine']} {c['precision']} agrees with {REFERENCE[0]} fp32 but is not faster here: "
        f"{c['images_per_s']:.0f} vs {c['reference_images_per_s']:.0f} img/s, {c['speedup']:.2f}x "
        f"(>= {MIN_SPEEDUP}x needed)"
    )


def _decide(
    art: Artifact, options: EngineOptions, spec: PreprocessSpec, candidates: Any, make: MakeEngine
) -> dict[str, Any]:
    """Run the check: the first candidate that passes, else the reference engine."""
    from cxr_ray.models.outputs import split_images

    try:
        pixels, _ = split_images(art, "val", CHECK_IMAGES, seed=CHECK_SEED, spec=spec)
    except EngineUnavailableError:
        raise EngineUnavailableError("the artifact's validation images cannot be read here") from None
    if len(pixels) < 2:
        raise EngineUnavailableError("the artifact's split.parquet lists fewer than 2 validation images")
    x = to_model_input(pixels)
    ref, ref_speed = timed(batched(make(*REFERENCE)), x)
    checks, chosen = [], REFERENCE
    for engine, precision in candidates:
        got, speed = timed(batched(make(engine, precision)), x)
        check = {"engine": engine, "precision": precision} | agreement(art, ref, got)
        check |= {
            "images_per_s": round(speed, 1),
            "reference_images_per_s": round(ref_speed, 1),
            "speedup": round(speed / ref_speed, 3),
        }
        check["faster"] = check["speedup"] >= MIN_SPEEDUP
        checks.append(check)
        logger.info(
            "engine auto: %s %s vs %s %s: %s, %.2fx its speed",
            engine,
            precision,
            *REFERENCE,
            _figures(check),
            check["speedup"],
        )
        if check["passed"] and check["faster"]:
            chosen = (engine, precision)
            break
    reason = "; ".join(_why_not(c) for c in checks if not (c["passed"] and c["faster"]))
    return {
        "format": CHOICE_FORMAT,
        "engine": chosen[0],
        "precision": chosen[1],
        "reference": {"engine": REFERENCE[0], "precision": REFERENCE[1]},
        "bar": {
            "min_argmax_agreement": MIN_ARGMAX_AGREEMENT,
            "max_abs_dp": MAX_ABS_DP,
            "min_speedup": MIN_SPEEDUP,
        },
        "checks": checks,
        "reason": reason or None,
        "model": art.card.engine_key,
        "calibration_fingerprint": art.card.calibration_fingerprint,
        "cpu": _cpu_model(),
        "threads": options.threads,
        "versions": _versions(),
    }


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def choose_cpu_engine(
    art: Artifact,
    options: EngineOptions,
    spec: PreprocessSpec,
    candidates: tuple[tuple[str, str], ...],
    make: MakeEngine,
) -> CpuChoice:
    """The CPU engine ``auto`` runs for ``art`` (see the module docstring); one log line says
    which and, when a faster engine was not chosen, why. ``candidates``: the faster engines
    usable here, fastest first (none: OpenVINO is not installed); ``make(engine, precision)``
    builds one on the artifact's ONNX model with ``options``' threads."""
    if not candidates:
        return _fallback("OpenVINO is not installed here (pip install 'cxr-ray[openvino]')")
    path = choice_path(art, options, spec, candidates)
    ref_path = path.with_suffix(".reference.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    hit = True
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            hit = False
            try:
                record = _decide(art, options, spec, candidates, make)
            except EngineUnavailableError as exc:
                return _fallback(f"no agreement check possible ({str(exc).splitlines()[0]})")
            if record["precision"] != "fp32" and art.reference is not None:
                _write(ref_path, _engine_reference(art, record, make))
            _write(path, (json.dumps(record, indent=2) + "\n").encode())
        record = json.loads(path.read_text())
        drift_ref = ref_path.read_bytes() if record["precision"] != "fp32" and ref_path.is_file() else None
    record["cache"] = "hit" if hit else "built"
    record["drift_reference"] = "engine" if drift_ref is not None else "artifact"
    line = f"engine auto: {record['engine']} {record['precision']}"
    if record["reason"]:
        logger.warning("%s (%s)", line, record["reason"])
    else:
        passed = record["checks"][-1] if record["checks"] else None
        logger.info("%s (agrees with fp32: %s)", line, _figures(passed) if passed else "reference")
    return CpuChoice(record["engine"], record["precision"], record, record["cache"], drift_ref)


def _fallback(why: str) -> CpuChoice:
    logger.warning("engine auto: %s %s (%s)", *REFERENCE, why)
    record: dict[str, Any] = {
        "engine": REFERENCE[0],
        "precision": REFERENCE[1],
        "checks": [],
        "reason": why,
        "cache": None,
    }
    return CpuChoice(REFERENCE[0], REFERENCE[1], record, None)


def _engine_reference(art: Artifact, record: dict[str, Any], make: MakeEngine) -> bytes:
    """The artifact's drift reference recomputed with the chosen engine (same images, same
    number of feature components, default preprocessing as at training)."""
    from cxr_ray.models.reference import build_reference, read_reference

    assert art.reference is not None
    original = read_reference(art.reference)
    run = batched(make(record["engine"], record["precision"]))
    return build_reference(
        art,
        components=int(original.meta.get("components", 16)),
        max_images=max(int(original.meta.get("n", 0)) + int(original.meta.get("unreadable", 0)), 2),
        outputs=lambda px: run(to_model_input(px)),
    )
