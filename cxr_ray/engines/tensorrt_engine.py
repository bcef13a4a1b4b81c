"""TensorRT engine (optional extra ``tensorrt``): ONNX -> serialized engine, cached per node.

``tensorrt`` is imported inside functions only, so this module imports (and the rest of
cxr-ray works) where TensorRT is not installed.

Build: the payload's single-file ONNX (``pixels float32 [batch, 1, H, W]`` -> ``probs
float32 [batch, 3]``) is parsed with ``trt.OnnxParser`` into ``builder.create_network()``
(explicit batch is the only mode since TensorRT 10), with one optimisation profile over the
batch axis (``trt_min_batch/opt/max``; H, W from the card) and FP16 by default.

Cache: engines are specific to the TensorRT version and the GPU, so each node keeps its own
under ``<cache_dir>/tensorrt/``, keyed by the model fingerprint (weights SHA-256, input size,
temperature, ONNX bytes), TensorRT version, GPU name and compute capability, precision and
profile. A JSON sidecar records the key; an engine whose sidecar does not match the current
key is never deserialized (it is rebuilt, and the log says why). A ``FileLock`` makes the
actors of one node build once.

Precision and TensorRT versions (see docs/GPU.md for the sources):

- TensorRT 10: ``BuilderFlag.FP16``; INT8 through an ``IInt8EntropyCalibrator2`` fed with the
  shared preprocessing output (deprecated since 10.1 but present).
- TensorRT 11 removed weak typing (``BuilderFlag.FP16/INT8``, ``int8_calibrator``). FP16 then
  needs the ONNX converted first (NVIDIA ModelOpt AutoCast, used when installed; otherwise
  the engine is built in FP32 and a warning says so); INT8 raises
  ``EngineUnavailableError``.
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

from cxr_ray.engines.base import EnginePayload
from cxr_ray.engines.onnx_export import INPUT_NAME
from cxr_ray.errors import EngineUnavailableError
from cxr_ray.models.card import ModelCard

logger = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32", "int8")
#: Bumped when the key's meaning changes, so old caches are rebuilt rather than trusted.
KEY_SCHEMA = 1
DEFAULTS: dict[str, Any] = {
    "trt_precision": "fp16",
    "trt_min_batch": 1,
    "trt_opt_batch": 64,
    "trt_max_batch": 256,
    "cache_dir": ".cache/cxr-ray",
}
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
    """Everything a serialized engine depends on. Equal keys: the cached engine is valid."""

    weights_sha256: str
    input_size: tuple[int, int]
    temperature: float
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

    def stem(self, version: str) -> str:
        h, w = self.input_size
        lo, opt, hi = self.profile
        return f"{version}-{h}x{w}-{self.precision}-b{lo}-{opt}-{hi}-{self.digest[:16]}"

    def differences(self, recorded: dict[str, Any]) -> list[str]:
        """Human-readable ``field: cached -> current`` for every field that differs."""
        current = self.to_json()
        return [f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in current.items() if recorded.get(k) != v]


def _options(options: dict[str, Any]) -> dict[str, Any]:
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    if opts["trt_precision"] not in PRECISIONS:
        raise EngineUnavailableError(
            f"unknown TensorRT precision {opts['trt_precision']!r}; use one of {PRECISIONS}"
        )
    lo, opt, hi = (int(opts[k]) for k in ("trt_min_batch", "trt_opt_batch", "trt_max_batch"))
    if not 1 <= lo <= opt <= hi:
        raise EngineUnavailableError(
            f"TensorRT profile needs 1 <= trt_min_batch <= trt_opt_batch <= trt_max_batch, "
            f"got {lo}, {opt}, {hi}"
        )
    opts["profile"] = (lo, opt, hi)
    return opts


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_key(
    card: ModelCard,
    onnx_bytes: bytes,
    options: dict[str, Any],
    *,
    tensorrt: str,
    gpu_name: str,
    compute_capability: str,
    precision: str | None = None,
) -> EngineKey:
    """The cache key for building ``onnx_bytes`` with ``options`` on the given TensorRT/GPU.

    ``precision`` overrides ``options["trt_precision"]`` with what will really be built (on
    TensorRT 11 without ModelOpt, FP16 is built as FP32).
    """
    opts = _options(options)
    calib = opts.get("calibration")
    precision = precision or opts["trt_precision"]
    calib_sha = (
        _sha256(np.ascontiguousarray(calib).tobytes()) if precision == "int8" and calib is not None else None
    )
    h, w = card.input_size
    return EngineKey(
        weights_sha256=card.weights_sha256,
        input_size=(int(h), int(w)),
        temperature=float(card.temperature),
        onnx_sha256=_sha256(onnx_bytes),
        tensorrt=tensorrt,
        gpu_name=gpu_name,
        compute_capability=compute_capability,
        precision=precision,
        profile=opts["profile"],
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
    if _sha256(plan.read_bytes()) != plan_sha:
        return f"{plan.name} does not match the checksum in {sidecar.name} (corrupt or replaced)"
    return None


def _log_stale_siblings(directory: Path, key: EngineKey) -> None:
    """Say why engines of the same model cached here cannot be reused (new TensorRT, GPU)."""
    mine = key.to_json()
    model_fields = ("weights_sha256", "input_size", "temperature", "precision", "profile")
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


def _write_atomic(path: Path, data: bytes) -> None:
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
    version: str,
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
    stem = key.stem(version)
    plan, sidecar = directory / f"{stem}.plan", directory / f"{stem}.json"
    with FileLock(str(directory / f"{stem}.lock"), timeout=_LOCK_TIMEOUT_S):
        reason = cache_problem(plan, sidecar, key)
        if reason is None and reject_sha256 == _sha256(plan.read_bytes()):
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
        _write_atomic(plan, data)
        # The sidecar goes last: a plan without a matching sidecar is never trusted.
        meta = {
            "key": key.to_json(),
            "plan_sha256": _sha256(data),
            "plan_bytes": len(data),
            "built_at": time.time(),
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        _write_atomic(sidecar, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        logger.info("built %s in %.1f s (%d bytes)", plan.name, meta["build_seconds"], len(data))
    return plan


# --------------------------------------------------------------------------- TensorRT glue


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineUnavailableError(
            "engine 'tensorrt' needs the 'tensorrt' package, which is not installed "
            f"({exc}): pip install 'cxr-ray[tensorrt]'"
        ) from None
    return trt


def _require_cuda() -> None:
    try:
        import torch

        ok = bool(torch.cuda.is_available())
    except Exception:
        ok = False
    if not ok:
        raise EngineUnavailableError(
            "engine 'tensorrt' needs a CUDA GPU and none is visible to this process "
            "(schedule the predictor actors with num_gpus > 0, or use engine 'onnxruntime')"
        )


def _gpu_identity() -> tuple[str, str]:
    import torch

    idx = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    return torch.cuda.get_device_name(idx), f"{major}.{minor}"


_trt_logger: Any = None


def _logger(trt: Any) -> Any:
    """One ``trt.ILogger`` per process, forwarding TensorRT messages to ``logging``."""
    global _trt_logger
    if _trt_logger is None:
        levels = {
            trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR,
            trt.ILogger.Severity.ERROR: logging.ERROR,
            trt.ILogger.Severity.WARNING: logging.WARNING,
            trt.ILogger.Severity.INFO: logging.DEBUG,
            trt.ILogger.Severity.VERBOSE: logging.DEBUG,
        }

        class _Forward(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                logger.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

        _trt_logger = _Forward()
    return _trt_logger


def _has_weak_typing(trt: Any) -> bool:
    # TensorRT 11 removed BuilderFlag.FP16/INT8 (strong typing only).
    return hasattr(trt.BuilderFlag, "FP16")


def _has_implicit_int8(trt: Any) -> bool:
    return hasattr(trt.BuilderFlag, "INT8") and hasattr(trt, "IInt8EntropyCalibrator2")


def _modelopt_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("modelopt.onnx.autocast") is not None
    except ModuleNotFoundError:
        return False


def effective_precision(trt: Any, requested: str) -> str:
    """What will really be built for ``requested`` on this TensorRT; raises if impossible."""
    if requested == "int8" and not _has_implicit_int8(trt):
        raise EngineUnavailableError(
            f"trt_precision=int8 is not available with TensorRT {trt.__version__}: TensorRT 11 "
            "removed implicit INT8 calibration (BuilderFlag.INT8, IBuilderConfig.int8_calibrator)"
            ". Use trt_precision=fp16, or TensorRT 10.x, or an explicitly quantized (Q/DQ) model."
        )
    if requested == "fp16" and not _has_weak_typing(trt) and not _modelopt_available():
        logger.warning(
            "TensorRT %s has no FP16 builder flag (strong typing only) and NVIDIA ModelOpt is not "
            "installed to convert the ONNX model to FP16: building in FP32 instead "
            "(pip install nvidia-modelopt[onnx] for FP16 engines)",
            trt.__version__,
        )
        return "fp32"
    return requested


def _to_fp16_onnx(onnx_bytes: bytes) -> bytes:
    """FP16 ONNX via ModelOpt AutoCast, the TensorRT 11 replacement for ``BuilderFlag.FP16``."""
    import modelopt.onnx.autocast as autocast

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        src.write_bytes(onnx_bytes)
        # keep_io_types: the engine still takes and returns float32, like every engine.
        proto = autocast.convert_to_mixed_precision(
            onnx_path=str(src), low_precision_type="fp16", keep_io_types=True
        )
    return bytes(proto.SerializeToString())


def _make_calibrator(trt: Any, images: np.ndarray, cache_file: Path) -> Any:
    """An entropy calibrator fed with preprocessed training images (``uint8 [N, H, W]``)."""
    import torch

    from cxr_ray.preprocess import to_model_input

    x = to_model_input(np.ascontiguousarray(images, dtype=np.uint8))
    batch = min(CALIBRATION_BATCH, len(x))
    if batch == 0:
        raise EngineUnavailableError("trt_precision=int8 got an empty calibration set")

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batch = batch
            self.index = 0
            # One device buffer, refilled per batch; TensorRT only gets its address.
            self.device = torch.empty((batch, *x.shape[1:]), dtype=torch.float32, device="cuda")

        def get_batch_size(self) -> int:
            return self.batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index + self.batch > len(x):
                return None  # the remainder (< one batch) is dropped
            self.device.copy_(torch.from_numpy(x[self.index : self.index + self.batch]))
            torch.cuda.synchronize()  # TensorRT reads the buffer on its own stream
            self.index += self.batch
            return [int(self.device.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            _write_atomic(cache_file, bytes(cache))

    return _Calibrator()


def _build_plan(
    trt: Any,
    onnx_bytes: bytes,
    card: ModelCard,
    opts: dict[str, Any],
    precision: str,
    calib_cache: Path,
) -> bytes:
    """Parse the ONNX model and build a serialized engine (``IHostMemory`` bytes)."""
    if precision == "fp16" and not _has_weak_typing(trt):
        onnx_bytes = _to_fp16_onnx(onnx_bytes)
    log = _logger(trt)
    builder = trt.Builder(log)
    network = builder.create_network(0)  # explicit batch is the only mode since TRT 10
    parser = trt.OnnxParser(network, log)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineUnavailableError(f"TensorRT could not parse the ONNX model: {errors}")
    h, w = card.input_size
    lo, opt, hi = opts["profile"]
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (lo, 1, h, w), (opt, 1, h, w), (hi, 1, h, w))
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8") and _has_weak_typing(trt):
        # INT8 also enables FP16 so layers without INT8 kernels do not fall back to FP32.
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        calibration = opts.get("calibration")
        if calibration is None:
            raise EngineUnavailableError(
                "trt_precision=int8 needs calibration images: pass a uint8 [N, H, W] array of "
                "preprocessed training images as options['calibration']"
            )
        calibrator = _make_calibrator(trt, calibration, calib_cache)
        # Calibration runs at one fixed shape: a profile of exactly the calibration batch.
        cal_profile = builder.create_optimization_profile()
        shape = (calibrator.batch, 1, h, w)
        cal_profile.set_shape(INPUT_NAME, shape, shape, shape)
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(cal_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineUnavailableError(
            "TensorRT failed to build an engine (see the TensorRT errors logged above)"
        )
    return bytes(plan)


def _prepare(onnx_bytes: bytes, card: ModelCard, options: dict[str, Any]) -> tuple[Any, ...]:
    trt = _import_tensorrt()
    _require_cuda()
    opts = _options(options)
    precision = effective_precision(trt, opts["trt_precision"])
    gpu_name, capability = _gpu_identity()
    key = make_key(
        card,
        onnx_bytes,
        opts,
        tensorrt=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=capability,
        precision=precision,
    )
    directory = Path(opts["cache_dir"]) / "tensorrt"
    return trt, opts, precision, key, directory


def _engine_path(
    onnx_bytes: bytes, card: ModelCard, options: dict[str, Any], reject_sha256: str | None = None
) -> Path:
    trt, opts, precision, key, directory = _prepare(onnx_bytes, card, options)
    calib_cache = directory / f"{key.stem(card.version)}.calib"
    return cached_engine(
        directory,
        key,
        card.version,
        lambda: _build_plan(trt, onnx_bytes, card, opts, precision, calib_cache),
        reject_sha256=reject_sha256,
    )


def build_engine_file(onnx_bytes: bytes, card: ModelCard, options: dict[str, Any]) -> Path:
    """Build (or find in the cache) the serialized engine for this model on this GPU.

    ``options`` uses the ``ScoreSettings`` names: ``trt_precision``, ``trt_min_batch``,
    ``trt_opt_batch``, ``trt_max_batch``, ``cache_dir``, and ``calibration`` (uint8
    ``[N, H, W]`` preprocessed images) for int8. Used by ``cxr-ray export --format tensorrt``.
    """
    return _engine_path(onnx_bytes, card, options)


_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "BF16": "bfloat16"}


class TensorRTEngine:
    """Scores ``float32 [N, 1, H, W]`` batches with a TensorRT engine on this process's GPU."""

    name = "tensorrt"
    device = "cuda"

    def __init__(self, engine: Any, trt: Any, *, profile: tuple[int, int, int], runtime: Any = None) -> None:
        import torch

        self._torch = torch
        self._runtime = runtime  # kept alive: an engine must not outlive its runtime
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineUnavailableError("TensorRT could not create an execution context")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineUnavailableError(f"expected one input and one output, got {names}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.min_batch, _, self.max_batch = profile
        self._in_dtype = self._dtype(self.input_name)
        self._out_dtype = self._dtype(self.output_name)
        self._device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(device=self._device)

    def _dtype(self, name: str) -> Any:
        dt = self.engine.get_tensor_dtype(name)
        return getattr(self._torch, _TORCH_DTYPES.get(dt.name, "float32"))

    @classmethod
    def from_payload(cls, payload: EnginePayload) -> TensorRTEngine:
        trt = _import_tensorrt()
        _require_cuda()
        card, options = payload.card, dict(payload.options)
        if not payload.onnx:
            raise EngineUnavailableError(
                "the tensorrt engine needs the payload's ONNX model (prepare_payload(..., engine='tensorrt'))"
            )
        runtime = trt.Runtime(_logger(trt))
        path = _engine_path(payload.onnx, card, options)
        engine = _deserialize(runtime, path)
        if engine is None:
            logger.warning("TensorRT could not deserialize %s: rebuilding it", path)
            path = _engine_path(payload.onnx, card, options, _sha256(path.read_bytes()))
            engine = _deserialize(runtime, path)
            if engine is None:
                raise EngineUnavailableError(
                    f"TensorRT could not deserialize the engine it just built ({path})"
                )
        return cls(engine, trt, profile=_options(options)["profile"], runtime=runtime)

    def run_tensor(self, x: Any) -> Any:
        """Score a CUDA tensor ``[N, 1, H, W]``; returns ``float32 [N, 3]`` on the same GPU.

        Batches over the profile's maximum are split; ones under its minimum are padded.
        """
        torch = self._torch
        if x.shape[0] == 0:
            return torch.empty((0, 3), dtype=torch.float32, device=self._device)
        producer = torch.cuda.current_stream(self._device)
        # The input may still be being written on the caller's stream (GPU decode).
        self.stream.wait_stream(producer)
        outs = []
        with torch.cuda.stream(self.stream):
            x = x.to(self._device, dtype=self._in_dtype, non_blocking=True)
            for chunk in x.split(self.max_batch):
                outs.append(self._run_chunk(chunk))
            out = torch.cat(outs).float()
        # Synchronous on purpose: callers (Ray actors) use the result right away, and tensors
        # allocated on this stream are then safe to use and free on any other stream.
        self.stream.synchronize()
        return out

    def _run_chunk(self, chunk: Any) -> Any:
        torch = self._torch
        n = chunk.shape[0]
        if n < self.min_batch:
            pad = chunk.new_zeros((self.min_batch - n, *chunk.shape[1:]))
            chunk = torch.cat([chunk, pad])
        chunk = chunk.contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(chunk.shape)):
            raise RuntimeError(f"TensorRT rejected input shape {tuple(chunk.shape)}")
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(out_shape, dtype=self._out_dtype, device=self._device)
        self.context.set_tensor_address(self.input_name, chunk.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return out[:n]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = self._torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return self.run_tensor(t.pin_memory()).cpu().numpy()


def _deserialize(runtime: Any, path: Path) -> Any:
    try:
        return runtime.deserialize_cuda_engine(path.read_bytes())
    except Exception as exc:  # TensorRT raises or returns None depending on the failure
        logger.warning("deserializing %s raised %s", path, exc)
        return None
