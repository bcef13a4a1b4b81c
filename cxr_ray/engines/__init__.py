"""Inference engines behind one Protocol; choosing one is a dict lookup (``select_engine``)."""

from cxr_ray.engines.base import (
    ENGINE_ORDER,
    Engine,
    EnginePayload,
    availability,
    build_engine,
    prepare_payload,
    select_engine,
)

__all__ = [
    "ENGINE_ORDER",
    "Engine",
    "EnginePayload",
    "availability",
    "build_engine",
    "prepare_payload",
    "select_engine",
]
