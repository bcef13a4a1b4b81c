"""TensorRT engine (optional extra ``tensorrt``): ONNX -> serialized engine, cached per node.

``tensorrt`` is imported inside functions only, so this module imports (and the rest of
cxr-ray works) where TensorRT is not installed.

Build: the payload's single-file ONNX (``pixels float32 [batch, 1, H, W]`` -> ``logits
float32 [batch, 3]``, ``features float32 [batch, F]``) is parsed with ``trt.OnnxParser`` into
``builder.create_network()`` (explicit batch is the only mode since TensorRT 10), with one
optimisation profile over the batch axis (``trt_min_batch/opt/max``; H, W from the card) and
FP16 by default. Both outputs are bound by name.

Cache: engines are specific to the TensorRT version and the GPU, so each node keeps its own
under ``<cache_dir>/tensorrt/``, keyed by the model fingerprint (weights SHA-256, input size,
ONNX bytes; not the card's calibration, which is applied to the logits outside the engine),
TensorRT version, GPU name and compute capability, precision and profile. A JSON sidecar
records the key; an engine whose sidecar does not match the current key is never
deserialized (it is rebuilt, and the log says why). A ``FileLock`` makes the actors of one
node build once.

Precision and TensorRT versions (see docs/GPU.md for the sources):

- TensorRT 10: ``BuilderFlag.FP16``; INT8 through an ``IInt8EntropyCalibrator2`` fed with the
  shared preprocessing output (deprecated since 10.1 but present).
- TensorRT 11 removed weak typing (``BuilderFlag.FP16/INT8``, ``int8_calibrator``). FP16 then
  needs the ONNX converted first (NVIDIA ModelOpt AutoCast, used when installed; otherwise
  the engine is built in FP32 and a warning says so); INT8 raises
  ``EngineUnavailableError``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr_ray.engines.base import EnginePayload, PrepareReport
from cxr_ray.engines.onnx_export import FEATURES_NAME, INPUT_NAME, LOGITS_NAME, cached_onnx
from cxr_ray.engines.options import EngineOptions
from cxr_ray.engines.trt_cache import (  # noqa: F401  (re-exported for callers and tests)
    CALIBRATION_BATCH,
    KEY_SCHEMA,
    PRECISIONS,
    WORKSPACE_BYTES,
    EngineKey,
    builds_in_process,
    cache_problem,
    cached_engine,
    make_key,
    sha256,
    write_atomic,
)
from cxr_ray.errors import EngineUnavailableError
from cxr_ray.imaging.preprocess import PreprocessSpec
from cxr_ray.models.card import ModelCard

if TYPE_CHECKING:
    from cxr_ray.models.artifact import Artifact

logger = logging.getLogger(__name__)

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
    from cxr_ray.engines.base import cuda_problem

    problem = cuda_problem()
    if problem is not None:
        raise EngineUnavailableError(
            "engine 'tensorrt' needs a CUDA GPU and none is visible to this process "
            f"({problem}; schedule the predictor actors with num_gpus > 0, or use engine 'onnxruntime')"
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
    except (ImportError, ValueError):  # find_spec imports the parent packages
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

    from cxr_ray.imaging.preprocess import to_model_input

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
            write_atomic(cache_file, bytes(cache))

    return _Calibrator()


def _build_plan(
    trt: Any,
    onnx_bytes: bytes,
    card: ModelCard,
    options: EngineOptions,
    calibration: np.ndarray | None,
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
    lo, opt, hi = options.profile
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (lo, 1, h, w), (opt, 1, h, w), (hi, 1, h, w))
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8") and _has_weak_typing(trt):
        # INT8 also enables FP16 so layers without INT8 kernels do not fall back to FP32.
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        if calibration is None:
            raise EngineUnavailableError(
                "trt_precision=int8 needs calibration images: the payload carries none "
                "(prepare() reads them from the artifact's split.parquet)"
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


def _engine_path(payload: EnginePayload, reject_sha256: str | None = None) -> Path:
    trt = _import_tensorrt()
    _require_cuda()
    card, options = payload.card, payload.options
    precision = effective_precision(trt, options.trt_precision)
    gpu_name, capability = _gpu_identity()
    key = make_key(
        card,
        payload.onnx,
        options,
        tensorrt=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=capability,
        precision=precision,
        calibration=payload.calibration,
    )
    directory = Path(options.cache_dir) / "tensorrt"
    calib_cache = directory / f"{key.stem(card.engine_key)}.calib"
    return cached_engine(
        directory,
        key,
        card.engine_key,
        lambda: _build_plan(trt, payload.onnx, card, options, payload.calibration, precision, calib_cache),
        reject_sha256=reject_sha256,
    )


def build_engine_file(payload: EnginePayload) -> Path:
    """Build (or find in the cache) the serialized engine for this model on this GPU.

    Used by ``cxr-ray export --format tensorrt`` and by every actor (through ``build``).
    """
    if not payload.onnx:
        raise EngineUnavailableError("the tensorrt engine needs the payload's ONNX model")
    return _engine_path(payload)


def prepare(
    art: Artifact, options: EngineOptions, spec: PreprocessSpec
) -> tuple[EnginePayload, PrepareReport]:
    """The fp32 ONNX model (TensorRT parses it on each node) and, for INT8, calibration images
    from the artifact's training split, preprocessed as scoring does."""
    onnx, hit = cached_onnx(art, options.cache_dir)
    calibration = None
    if options.trt_precision == "int8":
        from cxr_ray.models.outputs import int8_calibration_images

        calibration = int8_calibration_images(art, options.trt_calibration_images, spec=spec)
    payload = EnginePayload("tensorrt", art.card, options, onnx=onnx, calibration=calibration)
    return payload, PrepareReport("tensorrt", options.trt_precision, "hit" if hit else "built")


def build(payload: EnginePayload) -> TensorRTEngine:
    return TensorRTEngine.from_payload(payload)


_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "BF16": "bfloat16"}


class TensorRTEngine:
    """Scores ``float32 [N, 1, H, W]`` batches with a TensorRT engine on this process's GPU:
    (raw logits ``[N, 3]``, penultimate features ``[N, F]``), both bound by tensor name."""

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
        if len(inputs) != 1 or sorted(outputs) != sorted((LOGITS_NAME, FEATURES_NAME)):
            raise EngineUnavailableError(
                f"expected one input and the outputs {LOGITS_NAME!r}, {FEATURES_NAME!r}, got {names} "
                "(an engine built from an old export?)"
            )
        self.input_name = inputs[0]
        self.output_names = (LOGITS_NAME, FEATURES_NAME)
        self.min_batch, _, self.max_batch = profile
        self._in_dtype = self._dtype(self.input_name)
        self._out_dtypes = tuple(self._dtype(n) for n in self.output_names)
        # Class and feature counts (the batch axis is -1 in a dynamic engine).
        self._widths = tuple(int(engine.get_tensor_shape(n)[1]) for n in self.output_names)
        self._device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(device=self._device)

    def _dtype(self, name: str) -> Any:
        dt = self.engine.get_tensor_dtype(name)
        return getattr(self._torch, _TORCH_DTYPES.get(dt.name, "float32"))

    @classmethod
    def from_payload(cls, payload: EnginePayload) -> TensorRTEngine:
        trt = _import_tensorrt()
        _require_cuda()
        runtime = trt.Runtime(_logger(trt))
        path = build_engine_file(payload)
        engine = _deserialize(runtime, path)
        if engine is None:
            logger.warning("TensorRT could not deserialize %s: rebuilding it", path)
            path = _engine_path(payload, sha256(path.read_bytes()))
            engine = _deserialize(runtime, path)
            if engine is None:
                raise EngineUnavailableError(
                    f"TensorRT could not deserialize the engine it just built ({path})"
                )
        return cls(engine, trt, profile=payload.options.profile, runtime=runtime)

    def run_tensor(self, x: Any) -> tuple[Any, Any]:
        """Score a CUDA tensor ``[N, 1, H, W]``; returns (logits ``float32 [N, 3]``, features
        ``float32 [N, F]``) on the same GPU.

        Batches over the profile's maximum are split; ones under its minimum are padded.
        """
        torch = self._torch
        if x.shape[0] == 0:
            return tuple(torch.empty((0, w), dtype=torch.float32, device=self._device) for w in self._widths)
        producer = torch.cuda.current_stream(self._device)
        # The input may still be being written on the caller's stream (GPU decode).
        self.stream.wait_stream(producer)
        logits, features = [], []
        with torch.cuda.stream(self.stream):
            x = x.to(self._device, dtype=self._in_dtype, non_blocking=True)
            for chunk in x.split(self.max_batch):
                lo, fe = self._run_chunk(chunk)
                logits.append(lo)
                features.append(fe)
            out = torch.cat(logits).float(), torch.cat(features).float()
        # Synchronous on purpose: callers (Ray actors) use the result right away, and tensors
        # allocated on this stream are then safe to use and free on any other stream.
        self.stream.synchronize()
        return out

    def _run_chunk(self, chunk: Any) -> tuple[Any, Any]:
        torch = self._torch
        n = chunk.shape[0]
        if n < self.min_batch:
            pad = chunk.new_zeros((self.min_batch - n, *chunk.shape[1:]))
            chunk = torch.cat([chunk, pad])
        chunk = chunk.contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(chunk.shape)):
            raise RuntimeError(f"TensorRT rejected input shape {tuple(chunk.shape)}")
        self.context.set_tensor_address(self.input_name, chunk.data_ptr())
        outs = []
        for name, dtype in zip(self.output_names, self._out_dtypes, strict=True):
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=dtype, device=self._device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return outs[0][:n], outs[1][:n]

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self._torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        logits, features = self.run_tensor(t.pin_memory())
        return logits.cpu().numpy(), features.cpu().numpy()


def _deserialize(runtime: Any, path: Path) -> Any:
    try:
        return runtime.deserialize_cuda_engine(path.read_bytes())
    except Exception as exc:  # TensorRT raises or returns None depending on the failure
        logger.warning("deserializing %s raised %s", path, exc)
        return None
