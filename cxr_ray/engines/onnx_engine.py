"""onnxruntime engine: the CPU default (about 6x torch eager for MobileNetV2 on 2 cores)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cxr_ray.engines.base import EnginePayload, PrepareReport
from cxr_ray.engines.onnx_export import OUTPUT_NAMES, cached_onnx
from cxr_ray.engines.options import EngineOptions
from cxr_ray.errors import EngineUnavailableError
from cxr_ray.imaging.preprocess import PreprocessSpec

if TYPE_CHECKING:
    from cxr_ray.models.artifact import Artifact


class OnnxEngine:
    name = "onnxruntime"

    def __init__(self, model: bytes, *, threads: int | None = None, use_cuda: bool = False) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a hard dependency
            raise EngineUnavailableError(f"onnxruntime is not installed: {exc}") from None
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if use_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        self.device = "cuda" if providers[0].startswith("CUDA") else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        outputs = tuple(o.name for o in self.session.get_outputs())
        if outputs != OUTPUT_NAMES:
            raise EngineUnavailableError(
                f"the ONNX model's outputs are {outputs}, expected {OUTPUT_NAMES} (an old export?)"
            )
        self._outputs = list(OUTPUT_NAMES)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``float32 [N, 1, H, W]`` -> (raw logits ``[N, 3]``, features ``[N, F]``), float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        logits, features = self.session.run(self._outputs, {self.input_name: x})
        return logits, features


def prepare(
    art: Artifact, options: EngineOptions, spec: PreprocessSpec
) -> tuple[EnginePayload, PrepareReport]:
    """The fp32 ONNX model (exported once, cached), or with ``onnx_precision=int8`` the
    quantized one and its check against fp32 on the artifact's validation images."""
    if options.onnx_precision == "int8":
        from cxr_ray.engines.onnx_quantize import cached_int8_onnx

        onnx, hit, check = cached_int8_onnx(art, options, spec, runner=OnnxEngine)
        report = PrepareReport("onnxruntime", "int8", "hit" if hit else "built", int8_check=check)
    else:
        onnx, hit = cached_onnx(art, options.cache_dir)
        report = PrepareReport("onnxruntime", "fp32", "hit" if hit else "built")
    return EnginePayload("onnxruntime", art.card, options, onnx=onnx), report


def build(payload: EnginePayload) -> OnnxEngine:
    if not payload.onnx:
        raise EngineUnavailableError("the onnxruntime engine needs the payload's ONNX model")
    return OnnxEngine(payload.onnx, threads=payload.options.threads)
