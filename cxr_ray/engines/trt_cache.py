"""The TensorRT engine cache: keys, sidecars, locked builds (no TensorRT import needed here).

Engines depend on the model, the TensorRT version, the GPU and the build settings; each node
keeps its own under ``<cache_dir>/tensorrt/``. A JSON sidecar records the key of every
engine, written after the engine, so a plan without a matching sidecar is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from cxr_ray.engines.options import EngineOptions
from cxr_ray.errors import EngineUnavailableError
from cxr_ray.models.card import ModelCard

logger = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32", "int8")
#: Bumped when the key's meaning changes, so old caches are rebuilt rather than trusted.
#: 2: engines output (logits, features); calibration (temperature) is no longer in the graph.
KEY_SCHEMA = 2
#: Builder scratch memory; MobileNet/EfficientNet-class models need far less.
WORKSPACE_BYTES = 2 << 30
#: Calibration batch (images per ``get_batch``): the calibration profile is fixed at it.
CALIBRATION_BATCH = 32
_LOCK_TIMEOUT_S = 1800.0  # a build takes minutes; a lock held longer is a stuck process

_builds = 0


def builds_in_process() -> int:
    """How many engines this process has built (tests use it to prove cache hits)."""
    return _builds


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine depends on. Equal keys: the cached engine is valid.

    Not the card's calibration (temperature, logit scale/bias, thresholds): the engine outputs
    raw logits, so site-calibrated versions of one network share an engine."""

    weights_sha256: str
    input_size: tuple[int, int]
    onnx_sha256: str
    tensorrt: str
    gpu_name: str
    compute_capability: str
    precision: str
    profile: tuple[int, int, int]
    calibration_sha256: str | None = None
    schema: int = KEY_SCHEMA

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["profile"] = list(self.profile)
        return d

    @property
    def digest(self) -> str:
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def stem(self, engine_key: str) -> str:
        """File name stem: ``engine_key`` (``ModelCard.engine_key``), shape, precision, profile."""
        h, w = self.input_size
        lo, opt, hi = self.profile
        return f"{engine_key}-{h}x{w}-{self.precision}-b{lo}-{opt}-{hi}-{self.digest[:16]}"

    def differences(self, recorded: dict[str, Any]) -> list[str]:
        """Human-readable ``field: cached -> current`` for every field that differs."""
        current = self.to_json()
        return [f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in current.items() if recorded.get(k) != v]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_key(
    card: ModelCard,
    onnx_bytes: bytes,
    options: EngineOptions,
    *,
    tensorrt: str,
    gpu_name: str,
    compute_capability: str,
    precision: str | None = None,
    calibration: np.ndarray | None = None,
) -> EngineKey:
    """The cache key for building ``onnx_bytes`` with ``options`` on the given TensorRT/GPU.

    ``precision`` overrides ``options.trt_precision`` with what will really be built (on
    TensorRT 11 without ModelOpt, FP16 is built as FP32); ``calibration`` is the INT8
    calibration set (uint8 ``[N, H, W]``), part of the key for INT8 engines only.
    """
    precision = precision or options.trt_precision
    if precision not in PRECISIONS:
        raise EngineUnavailableError(f"unknown TensorRT precision {precision!r}; use one of {PRECISIONS}")
    calib_sha = (
        sha256(np.ascontiguousarray(calibration).tobytes())
        if precision == "int8" and calibration is not None
        else None
    )
    h, w = card.input_size
    return EngineKey(
        weights_sha256=card.weights_sha256,
        input_size=(int(h), int(w)),
        onnx_sha256=sha256(onnx_bytes),
        tensorrt=tensorrt,
        gpu_name=gpu_name,
        compute_capability=compute_capability,
        precision=precision,
        profile=options.profile,
        calibration_sha256=calib_sha,
    )


def cache_problem(plan: Path, sidecar: Path, key: EngineKey) -> str | None:
    """``None`` when ``plan`` is a complete engine built for ``key``, else why it is not."""
    if not plan.is_file():
        return "no cached engine"
    if not sidecar.is_file():
        return f"{sidecar.name} is missing (an interrupted build?)"
    try:
        recorded = json.loads(sidecar.read_text())
        key_fields = recorded["key"]
        plan_sha = recorded["plan_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{sidecar.name} is unreadable ({exc})"
    diffs = key.differences(key_fields)
    if diffs:
        return "the cached engine was built for a different setup: " + "; ".join(diffs)
    if sha256(plan.read_bytes()) != plan_sha:
        return f"{plan.name} does not match the checksum in {sidecar.name} (corrupt or replaced)"
    return None


def _log_stale_siblings(directory: Path, key: EngineKey) -> None:
    """Say why engines of the same model cached here cannot be reused (new TensorRT, GPU)."""
    mine = key.to_json()
    model_fields = ("weights_sha256", "input_size", "precision", "profile")
    for sidecar in sorted(directory.glob("*.json")):
        try:
            other = json.loads(sidecar.read_text())["key"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if all(other.get(f) == mine[f] for f in model_fields):
            logger.info(
                "not reusing %s: %s",
                sidecar.with_suffix(".plan").name,
                "; ".join(key.differences(other)),
            )


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_engine(
    directory: Path,
    key: EngineKey,
    engine_key: str,
    build: Any,
    *,
    reject_sha256: str | None = None,
) -> Path:
    """Path of the engine for ``key`` in ``directory``, calling ``build() -> bytes`` if needed.

    Serialized by a file lock, so concurrent actors on one node build once. An engine whose
    checksum is ``reject_sha256`` (it failed to deserialize) is rebuilt, unless another
    process has already replaced it.
    """
    global _builds
    directory.mkdir(parents=True, exist_ok=True)
    stem = key.stem(engine_key)
    plan, sidecar = directory / f"{stem}.plan", directory / f"{stem}.json"
    with FileLock(str(directory / f"{stem}.lock"), timeout=_LOCK_TIMEOUT_S):
        reason = cache_problem(plan, sidecar, key)
        if reason is None and reject_sha256 is not None and sha256(plan.read_bytes()) == reject_sha256:
            reason = "the cached engine failed to deserialize"
        if reason is None:
            logger.info("TensorRT engine cache hit: %s", plan)
            return plan
        if reason == "no cached engine":
            _log_stale_siblings(directory, key)
        logger.info("building TensorRT engine %s (%s)", plan.name, reason)
        t0 = time.perf_counter()
        data = bytes(build())
        _builds += 1
        write_atomic(plan, data)
        # The sidecar goes last: a plan without a matching sidecar is never trusted.
        meta = {
            "key": key.to_json(),
            "plan_sha256": sha256(data),
            "plan_bytes": len(data),
            "built_at": time.time(),
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        write_atomic(sidecar, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        logger.info("built %s in %.1f s (%d bytes)", plan.name, meta["build_seconds"], len(data))
    return plan
