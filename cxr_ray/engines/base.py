"""The engine Protocol, the registry and the selection rules.

Every engine maps the preprocessing contract's ``float32 [N, 1, H, W]`` (0..1) to
calibrated class probabilities ``float32 [N, 3]`` in ``LABELS`` order. Engines are built in
two steps so that heavy work happens once per run and once per node:

1. ``prepare_payload`` on the driver: reads the artifact and produces what every actor
   needs (weights bytes, or a single-file ONNX model exported once and cached). The payload
   travels to actors through the Ray object store, so it works on any node of a cluster.
2. ``build_engine`` inside each actor: loads the payload onto the actor's device.

``engine="auto"`` picks tensorrt > torch (CUDA) > onnxruntime > torch (CPU), by what is
available where the actor runs.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from cxr_ray.errors import EngineUnavailableError
from cxr_ray.models.card import ModelCard

logger = logging.getLogger(__name__)

ENGINE_ORDER = ("tensorrt", "torch", "onnxruntime")


@runtime_checkable
class Engine(Protocol):
    """Scores a batch: ``float32 [N, 1, H, W]`` in 0..1 -> probabilities ``float32 [N, 3]``."""

    name: str
    device: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class EnginePayload:
    """Everything an actor needs to build an engine, small enough for the object store."""

    engine: str
    card_json: str
    weights: bytes = b""  # safetensors of the CxrNet (torch engine)
    onnx: bytes = b""  # single-file ONNX of Probabilities(CxrNet) (onnxruntime, tensorrt)
    options: dict = field(default_factory=dict)

    @property
    def card(self) -> ModelCard:
        return ModelCard.from_json(self.card_json)


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def availability() -> dict[str, str | None]:
    """Engine name -> ``None`` if it can run here, else why not (a message for users)."""
    out: dict[str, str | None] = {}
    cuda = _cuda_available()
    if importlib.util.find_spec("tensorrt") is None:
        out["tensorrt"] = "the 'tensorrt' package is not installed (pip install 'cxr-ray[tensorrt]')"
    elif not cuda:
        out["tensorrt"] = "no CUDA GPU is visible (TensorRT needs one)"
    else:
        out["tensorrt"] = None
    out["torch"] = None
    if importlib.util.find_spec("onnxruntime") is None:
        out["onnxruntime"] = "the 'onnxruntime' package is not installed"
    else:
        out["onnxruntime"] = None
    return out


def select_engine(requested: str, *, gpu: bool | None = None) -> str:
    """Resolve ``auto`` and check a named engine can run here.

    ``auto``: tensorrt when it can run, torch when a GPU is visible, onnxruntime on CPU,
    torch on CPU as the last resort. A named engine that cannot run raises
    ``EngineUnavailableError`` naming the missing piece and the engines that can run.
    """
    avail = availability()
    gpu = _cuda_available() if gpu is None else gpu
    if requested == "auto":
        if avail["tensorrt"] is None:
            return "tensorrt"
        if gpu:
            return "torch"
        if avail["onnxruntime"] is None:
            return "onnxruntime"
        return "torch"
    if requested not in avail:
        raise EngineUnavailableError(
            f"unknown engine {requested!r}; available: auto, {', '.join(sorted(avail))}"
        )
    reason = avail[requested]
    if reason is not None:
        usable = [k for k, v in avail.items() if v is None]
        raise EngineUnavailableError(
            f"engine {requested!r} cannot run here: {reason}. Usable here: {', '.join(usable)}"
            + "; other engines: "
            + "; ".join(f"{k}: {v}" for k, v in avail.items() if v is not None and k != requested)
        )
    return requested


def prepare_payload(
    artifact: str, engine: str, *, cache_dir: str, options: dict | None = None
) -> EnginePayload:
    """Driver side: read the artifact once and build what actors need for ``engine``."""
    from cxr_ray.engines.onnx_export import cached_onnx
    from cxr_ray.models.artifact import load_artifact, weights_bytes

    art = load_artifact(artifact)
    # "auto" (resolved on GPU workers) carries both forms; each engine needs only one.
    weights = weights_bytes(art.build()) if engine in ("torch", "auto") else b""
    opts = {"cache_dir": cache_dir, **(options or {})}
    if engine == "onnxruntime" and opts.get("onnx_precision") == "int8":
        from cxr_ray.engines.onnx_quantize import cached_int8_onnx

        onnx, opts["int8_check"] = cached_int8_onnx(
            art,
            artifact,
            cache_dir,
            calibration_images=int(opts.get("onnx_calibration_images", 256)),
            threads=opts.get("threads"),
        )
    else:
        onnx = cached_onnx(art, cache_dir) if engine in ("onnxruntime", "tensorrt", "auto") else b""
    return EnginePayload(engine, art.card.to_json(), weights=weights, onnx=onnx, options=opts)


#: engine name -> (module, class). Only the chosen engine's module is imported: an actor that
#: runs onnxruntime never pays for importing torch (about 3 s of actor start-up here).
_BUILDERS = {
    "onnxruntime": ("cxr_ray.engines.onnx_engine", "OnnxEngine"),
    "torch": ("cxr_ray.engines.torch_engine", "TorchEngine"),
    "tensorrt": ("cxr_ray.engines.tensorrt_engine", "TensorRTEngine"),
}


def build_engine(payload: EnginePayload) -> Engine:
    """Actor side: the engine for ``payload`` on this process's device."""
    import importlib

    if payload.engine not in _BUILDERS:
        raise EngineUnavailableError(f"unknown engine {payload.engine!r}; known: {sorted(_BUILDERS)}")
    module, cls = _BUILDERS[payload.engine]
    engine: Engine = getattr(importlib.import_module(module), cls).from_payload(payload)
    return engine
