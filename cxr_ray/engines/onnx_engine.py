"""onnxruntime engine: the CPU default (about 6x torch eager for MobileNetV2 on 2 cores)."""

from __future__ import annotations

import numpy as np

from cxr_ray.engines.base import EnginePayload
from cxr_ray.errors import EngineUnavailableError


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

    @classmethod
    def from_payload(cls, payload: EnginePayload) -> OnnxEngine:
        return cls(payload.onnx, threads=payload.options.get("threads"))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]
