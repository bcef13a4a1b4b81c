"""OpenVINO engine: the exported ONNX model on OpenVINO's CPU runtime, in bf16 where the CPU has it.

Named (``score.engine = "openvino"``) or chosen by ``auto`` on CPU actors per artifact, only
after its agreement check with onnxruntime fp32 on the artifact's validation images passed
(``engines.choice``: bf16 first where native, then fp32). The payload is the same
cached fp32 ONNX model the onnxruntime engine uses; each actor reads it from memory and
compiles it for its own CPU (about 0.2-0.3 s for MobileNetV2 at 224 px, so nothing is cached).
``score.openvino_precision``: ``auto`` runs bf16 where the CPU computes it natively (AVX512-BF16
or AMX-BF16: OpenVINO's ``OPTIMIZATION_CAPABILITIES`` lists ``BF16``) and fp32 elsewhere;
``bf16`` on a CPU without it falls back to fp32 with one warning; ``fp32`` is exact to the
onnxruntime engine within float rounding. In bf16, weights and activations are rounded to
8 mantissa bits (probabilities move by about 1e-2; see benchmarks/RESULTS.md for the argmax
agreement on validation images). The actor runs one inference stream with
``INFERENCE_NUM_THREADS = options.threads`` and ``PERFORMANCE_HINT = LATENCY`` (measured
slightly faster than ``THROUGHPUT`` for batches of 64 on one core; with one request in flight
both run one stream).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr_ray.engines.base import EnginePayload, PrepareReport
from cxr_ray.engines.onnx_export import OUTPUT_NAMES, cached_onnx
from cxr_ray.engines.options import EngineOptions
from cxr_ray.errors import EngineUnavailableError
from cxr_ray.imaging.preprocess import PreprocessSpec

if TYPE_CHECKING:
    from cxr_ray.models.artifact import Artifact

logger = logging.getLogger(__name__)

#: ``score.openvino_precision`` values -> OpenVINO's ``INFERENCE_PRECISION_HINT``.
_HINTS = {"bf16": "bf16", "fp32": "f32"}
_CPUINFO = "/proc/cpuinfo"
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise EngineUnavailableError(
            f"the 'openvino' package is not installed (pip install 'cxr-ray[openvino]'): {exc}"
        ) from None
    return openvino


def native_bf16(core: Any | None = None) -> bool:
    """Whether this CPU computes bf16 natively: OpenVINO's CPU plugin lists ``BF16`` in its
    ``OPTIMIZATION_CAPABILITIES``; without OpenVINO, the ``amx_bf16`` / ``avx512_bf16`` flags of
    ``/proc/cpuinfo`` (Linux)."""
    try:
        if core is None:
            core = _openvino().Core()
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:
        pass
    try:
        with open(_CPUINFO, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in _CPU_BF16_FLAGS)
    except OSError:
        pass
    return False


def resolve_precision(requested: str, *, native: bool) -> tuple[str, str | None]:
    """``(precision, note)``: ``auto`` -> bf16 where ``native`` else fp32; ``bf16`` without
    native support -> fp32 and a note saying so (``None`` when nothing needs saying)."""
    if requested not in ("auto", *_HINTS):
        raise EngineUnavailableError(
            f"unknown openvino precision {requested!r}; use one of: auto, {', '.join(_HINTS)}"
        )
    if requested == "auto":
        return ("bf16" if native else "fp32"), None
    if requested == "bf16" and not native:
        return "fp32", "openvino: this CPU has no native bf16 (AVX512-BF16 or AMX-BF16); running fp32"
    return requested, None


class OpenVinoEngine:
    """The ONNX model compiled by OpenVINO for this CPU: ``float32 [N, 1, H, W]`` -> (raw logits
    ``[N, 3]``, features ``[N, F]``), float32, any batch size (the graph's batch axis is dynamic)."""

    name = "openvino"
    device = "cpu"

    def __init__(self, model: bytes, *, precision: str = "auto", threads: int | None = None) -> None:
        ov = _openvino()
        core = ov.Core()
        self.precision, note = resolve_precision(precision, native=native_bf16(core))
        if note:
            logger.warning(note)
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _HINTS[self.precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            net = core.read_model(model)
            self.compiled = core.compile_model(net, "CPU", config)
        except Exception as exc:
            raise EngineUnavailableError(f"OpenVINO could not compile the ONNX model: {exc}") from exc
        outputs = tuple(out.get_any_name() for out in self.compiled.outputs)
        if outputs != OUTPUT_NAMES:
            raise EngineUnavailableError(
                f"the ONNX model's outputs are {outputs}, expected {OUTPUT_NAMES} (an old export?)"
            )
        self._outputs = tuple(self.compiled.outputs)
        self._input = self.compiled.inputs[0]
        logger.info("openvino: compiled for the CPU in %s, %s thread(s)", self.precision, threads or "all")

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        result = self.compiled({self._input: x})
        logits, features = (np.asarray(result[out], dtype=np.float32) for out in self._outputs)
        return logits, features


def prepare(
    art: Artifact, options: EngineOptions, spec: PreprocessSpec
) -> tuple[EnginePayload, PrepareReport]:
    """The cached fp32 ONNX model (the onnxruntime engine's); the precision is resolved here
    for the report and again in each actor, on the CPU it runs on."""
    onnx, hit = cached_onnx(art, options.cache_dir)
    precision, note = resolve_precision(options.openvino_precision, native=native_bf16())
    if note:
        logger.warning("%s (where the driver runs)", note)
    report = PrepareReport("openvino", precision, "hit" if hit else "built", notes=(note,) if note else ())
    return EnginePayload("openvino", art.card, options, onnx=onnx), report


def build(payload: EnginePayload) -> OpenVinoEngine:
    if not payload.onnx:
        raise EngineUnavailableError("the openvino engine needs the payload's ONNX model")
    return OpenVinoEngine(
        payload.onnx, precision=payload.options.openvino_precision, threads=payload.options.threads
    )
