"""Inference engines behind one Protocol; choosing one is a dict lookup (``select_engine``).

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
