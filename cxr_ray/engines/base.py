"""The engine Protocol, the registry and the selection rules.

Every engine maps the preprocessing contract's ``float32 [N, 1, H, W]`` (0..1) to raw logits
``float32 [N, 3]`` in ``LABELS`` order and penultimate features ``float32 [N, F]``; the
predictor applies the card's calibration (``ModelCard.probabilities``) outside the engine, so
one exported model serves every calibrated version of a network. Each engine module
(``ENGINES`` maps names to modules) owns two steps, so heavy work happens once per run and
once per node:

1. ``prepare(art, options, spec) -> (EnginePayload, PrepareReport)`` on the driver, from the
   artifact loaded once: what every actor needs (weights bytes, or a single-file ONNX model
   exported once and cached), and a report of what was done (cache hit, INT8 check).
   The payload travels to actors through the Ray object store, so it works on any node.
2. ``build(payload) -> Engine`` inside each actor: loads the payload onto the actor's device.

``engine="auto"`` is resolved on the driver for CPU actors (``engines.choice``: a faster CPU
engine only where its agreement check with fp32 passed). For GPU actors it is resolved
where each actor runs (the driver may have no GPU): the payload then carries every form, and
``build`` tries tensorrt > torch (CUDA) > onnxruntime > torch (CPU), falling back with one
warning that names why a faster engine could not be built.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from cxr_ray.engines.options import EngineOptions
from cxr_ray.errors import EngineUnavailableError
from cxr_ray.imaging.preprocess import PreprocessSpec
from cxr_ray.models.card import ModelCard
from cxr_ray.vocabulary import ENGINES as ENGINE_NAMES

if TYPE_CHECKING:
    from cxr_ray.models.artifact import Artifact

logger = logging.getLogger(__name__)

#: Engine name -> module owning ``prepare`` and ``build``. Only the chosen engine's module is
#: imported: an actor that runs onnxruntime never pays for importing torch (about 3 s of
#: actor start-up here) and TensorRT is imported only where it is used.
ENGINES: dict[str, str] = {
    "tensorrt": "cxr_ray.engines.tensorrt_engine",
    "torch": "cxr_ray.engines.torch_engine",
    "onnxruntime": "cxr_ray.engines.onnx_engine",
    "openvino": "cxr_ray.engines.openvino_engine",
}
#: What ``auto`` tries, fastest first, where the actor runs.
ENGINE_ORDER = ("tensorrt", "torch", "onnxruntime")
assert set(ENGINE_NAMES) == {"auto", *ENGINES}, "vocabulary.ENGINES and the registry disagree"


@runtime_checkable
class Engine(Protocol):
    """Runs the network on a batch: ``float32 [N, 1, H, W]`` in 0..1 -> ``(logits float32
    [N, 3], features float32 [N, F])``: raw (uncalibrated) logits and penultimate-layer
    features (``models.factory.LogitsAndFeatures``). The predictor turns logits into
    probabilities with the card's calibration (``ModelCard.probabilities``), in float64, the
    same for every engine; features feed the run's drift summary."""

    name: str
    device: str

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class EnginePayload:
    """Everything an actor needs to build an engine, small enough for the object store."""

    engine: str
    card: ModelCard
    options: EngineOptions
    weights: bytes = b""  # safetensors of the CxrNet (torch engine)
    #: Single-file ONNX of ``LogitsAndFeatures(CxrNet)``, outputs (logits, features) in that
    #: order (onnxruntime, tensorrt, openvino).
    onnx: bytes = b""
    #: uint8 [N, H, W] preprocessed training images (TensorRT INT8 calibration only).
    calibration: np.ndarray | None = None
    #: ``auto`` payloads only: the engines to try where the actor runs, in order.
    candidates: tuple[str, ...] = ()


@dataclass(frozen=True)
class PrepareReport:
    """What ``prepare`` did, for the run summary."""

    engine: str
    precision: str | None = None
    #: ``hit`` when the exported/quantized ONNX model came from the cache, ``built`` when it
    #: was made in this run, ``None`` when the engine needs none (torch).
    onnx_cache: str | None = None
    #: INT8 onnxruntime only: the quantized model against fp32 on the validation images.
    int8_check: dict[str, Any] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: ``auto`` on CPU actors: the agreement check that chose the engine (``engines.choice``).
    engine_check: dict[str, Any] | None = None
    #: The drift reference recomputed with the chosen engine, for the run to use instead of
    #: the artifact's (``None``: the artifact's applies; see ``engines.choice``).
    drift_reference: bytes | None = field(default=None, repr=False)


def _cuda_available() -> bool:
    # Without a loaded NVIDIA driver (nor its device nodes: WSL2 has /dev/dxg and no /proc
    # entry) there is no CUDA: say so without importing torch, whose CUDA libraries are
    # ~600 MB of a CPU-only scoring driver's memory.
    if nvidia_driver_version() is None and not _gpu_device_nodes():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


#: The CUDA 13 stack (torch 2.14 cu130 wheels, nvJPEG 13, tensorrt-cu13) needs this NVIDIA
#: driver or newer on Linux (CUDA 13.0 release notes, "CUDA Toolkit and Minimum Driver").
MIN_DRIVER_CUDA13 = "580.65.06"
_DRIVER_FILE = "/proc/driver/nvidia/version"


def _gpu_device_nodes() -> bool:
    import glob
    import os

    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/dxg")


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version (``/proc/driver/nvidia/version``), if any."""
    import re

    try:
        with open(_DRIVER_FILE, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r"Kernel Module(?: for [\w-]+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


def cuda_problem() -> str | None:
    """``None`` when CUDA works in this process, else why not, in words an operator can act on.

    For a process that was given GPUs (a predictor actor with ``num_gpus``): an old driver is
    the usual cause, and torch only says "not available".
    """
    if _cuda_available():
        return None
    try:
        import torch

        built = torch.version.cuda
    except Exception:  # pragma: no cover - torch is a dependency
        built = None
    driver = nvidia_driver_version()
    need = f"an NVIDIA driver >= {MIN_DRIVER_CUDA13}" if (built or "").startswith("13") else "a newer driver"
    if driver is None:
        return f"CUDA is not usable: no NVIDIA driver is loaded (torch built for CUDA {built} needs {need})"
    return (
        f"CUDA is not usable: torch is built for CUDA {built}, which needs {need}; "
        f"this node's driver is {driver} (see docs/GPU.md, 'Driver')"
    )


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
    if importlib.util.find_spec("openvino") is None:
        out["openvino"] = "the 'openvino' package is not installed (pip install 'cxr-ray[openvino]')"
    else:
        out["openvino"] = None
    return out


def auto_candidates(*, gpu: bool | None = None) -> tuple[str, ...]:
    """What ``auto`` tries here, in order: tensorrt, torch on a GPU, onnxruntime, torch on CPU."""
    avail = availability()
    gpu = _cuda_available() if gpu is None else gpu
    order: list[str] = []
    if avail["tensorrt"] is None:
        order.append("tensorrt")
    if gpu:
        order.append("torch")
    if avail["onnxruntime"] is None:
        order.append("onnxruntime")
    if "torch" not in order:
        order.append("torch")
    return tuple(order)


def select_engine(requested: str, *, gpu: bool | None = None) -> str:
    """Resolve ``auto`` and check a named engine can run here.

    ``auto``: the first of ``auto_candidates``. A named engine that cannot run raises
    ``EngineUnavailableError`` naming the missing piece and the engines that can run.
    """
    if requested == "auto":
        return auto_candidates(gpu=gpu)[0]
    avail = availability()
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


def engine_module(name: str) -> ModuleType:
    """The module owning engine ``name`` (imported on first use)."""
    if name not in ENGINES:
        raise EngineUnavailableError(f"unknown engine {name!r}; known: {', '.join(sorted(ENGINES))}")
    return importlib.import_module(ENGINES[name])


def prepare(
    art: Artifact, engine: str, options: EngineOptions, spec: PreprocessSpec, *, cpu: bool = False
) -> tuple[EnginePayload, PrepareReport]:
    """Driver side: what actors need to build ``engine`` for ``art``, and what it took.

    ``engine`` is a concrete engine or ``auto``. With ``cpu`` (CPU actors), ``auto`` is
    resolved here by ``engines.choice.choose_cpu_engine`` (a faster engine only where its
    agreement check with fp32 on the artifact's validation images passed, else onnxruntime
    fp32); ``onnx_precision = "int8"`` keeps its meaning there (onnxruntime INT8). Otherwise
    (GPU actors: resolved in each actor) an ``auto`` payload carries the torch weights and the
    fp32 ONNX model (what tensorrt, torch and onnxruntime need), not INT8 forms: those are
    opt-in with a named engine.
    """
    if engine == "auto" and cpu:
        return _prepare_cpu_auto(art, options, spec)
    if engine != "auto":
        payload, report = engine_module(engine).prepare(art, options, spec)
        return payload, report
    torch_payload, _ = engine_module("torch").prepare(art, options, spec)
    fp32 = replace(options, onnx_precision="fp32", trt_precision=_auto_trt_precision(options))
    onnx_payload, onnx_report = engine_module("onnxruntime").prepare(art, fp32, spec)
    payload = EnginePayload("auto", art.card, fp32, weights=torch_payload.weights, onnx=onnx_payload.onnx)
    return payload, PrepareReport("auto", onnx_cache=onnx_report.onnx_cache)


def _prepare_cpu_auto(
    art: Artifact, options: EngineOptions, spec: PreprocessSpec
) -> tuple[EnginePayload, PrepareReport]:
    if options.onnx_precision == "int8":  # an explicit opt-in: onnxruntime INT8, as before
        payload, report = engine_module("onnxruntime").prepare(art, options, spec)
        return payload, report
    from cxr_ray.engines.choice import choose_cpu_engine
    from cxr_ray.engines.onnx_export import cached_onnx

    onnx, hit = cached_onnx(art, options.cache_dir)

    def make(name: str, precision: str) -> Engine:
        opts = replace(options, openvino_precision=precision)
        engine: Engine = engine_module(name).build(EnginePayload(name, art.card, opts, onnx=onnx))
        return engine

    choice = choose_cpu_engine(art, options, spec, cpu_candidates(options), make)
    opts = replace(options, openvino_precision=choice.precision) if choice.engine == "openvino" else options
    payload = EnginePayload(choice.engine, art.card, opts, onnx=onnx)
    report = PrepareReport(
        choice.engine,
        choice.precision,
        "hit" if hit else "built",
        engine_check=choice.record,
        drift_reference=choice.drift_reference,
    )
    return payload, report


def cpu_candidates(options: EngineOptions) -> tuple[tuple[str, str], ...]:
    """The engines faster than onnxruntime fp32 that CPU ``auto`` may use here, fastest first
    (``engines.choice.CPU_CANDIDATES``), as ``score.openvino_precision`` allows: ``auto``:
    bf16 where the CPU has it natively, then fp32; ``bf16`` / ``fp32``: that one only."""
    from cxr_ray.engines.choice import CPU_CANDIDATES

    if availability()["openvino"] is not None:
        return ()
    ov = engine_module("openvino")
    native = bool(ov.native_bf16())
    if options.openvino_precision == "auto":
        return tuple(c for c in CPU_CANDIDATES if c[1] != "bf16" or native)
    return (("openvino", ov.resolve_precision(options.openvino_precision, native=native)[0]),)


def _auto_trt_precision(options: EngineOptions) -> str:
    # INT8 TensorRT needs calibration images shipped to every actor: opt-in with a named engine.
    return "fp16" if options.trt_precision == "int8" else options.trt_precision


def build(payload: EnginePayload) -> Engine:
    """Actor side: the engine for ``payload`` on this process's device.

    ``auto`` tries each candidate where the actor runs; an engine that cannot be built
    (not installed, no CUDA, or a parse/build/deserialize failure) is skipped with one
    warning line naming why. A named engine that cannot be built raises.
    """
    if payload.engine != "auto":
        engine: Engine = engine_module(payload.engine).build(payload)
        return engine
    candidates = payload.candidates or auto_candidates()
    failures: list[str] = []
    for name in candidates:
        try:
            engine = engine_module(name).build(replace(payload, engine=name))
        except Exception as exc:  # any build failure: fall back, say why once
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            failures.append(f"{name}: {reason}")
            continue
        if failures:
            logger.warning("engine auto: using %s; %s could not be built", name, "; ".join(failures))
        return engine
    raise EngineUnavailableError("engine auto: no engine could be built here: " + "; ".join(failures))
