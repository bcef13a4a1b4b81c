"""Inference engines behind one Protocol; choosing one is a dict lookup (``select_engine``).

Every engine runs an artifact's network to raw logits and penultimate features for a batch
of preprocessed images: onnxruntime (the CPU default, optionally INT8 via ``onnx_quantize``),
torch (CPU or CUDA), OpenVINO (CPU, bf16 where native) and TensorRT (GPU, FP16/INT8).
``prepare`` runs once on the driver (ONNX export, caches keyed by the weights) and returns
the payload that ``build`` turns into an engine inside each actor; ``availability`` and
``auto_candidates`` say what can run where, ``engine_options`` builds the typed options from
the score settings.

>>> payload, report = prepare(art, "onnxruntime", engine_options(settings.score), spec)  # driver
>>> engine = build(payload)  # in each actor  # doctest: +SKIP
"""

from cxr_ray.engines.base import (
    ENGINE_ORDER,
    ENGINES,
    Engine,
    EnginePayload,
    PrepareReport,
    auto_candidates,
    availability,
    build,
    prepare,
    select_engine,
)
from cxr_ray.engines.options import EngineOptions, engine_options

__all__ = [
    "ENGINES",
    "ENGINE_ORDER",
    "Engine",
    "EngineOptions",
    "EnginePayload",
    "PrepareReport",
    "auto_candidates",
    "availability",
    "build",
    "engine_options",
    "prepare",
    "select_engine",
]
