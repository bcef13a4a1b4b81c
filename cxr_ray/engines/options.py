"""Typed engine options, built from ``ScoreSettings`` in one place.

Scoring and ``cxr-ray export`` both call ``engine_options``; engines receive the frozen
``EngineOptions`` (inside their payload), never a dict, so a setting has one name, one type and
one default (the ``ScoreSettings`` field's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cxr_ray.config import ScoreSettings
from cxr_ray.errors import ConfigError


@dataclass(frozen=True)
class EngineOptions:
    """What engines need from the settings (see ``ScoreSettings`` for each field's meaning)."""

    #: Intra-op threads of a CPU engine (``None``: the engine's default).
    threads: int | None
    #: Absolute, node-local folder for exported ONNX models, INT8 models and TensorRT plans.
    cache_dir: str
    onnx_precision: str
    onnx_calibration_images: int
    trt_precision: str
    trt_min_batch: int
    trt_opt_batch: int
    trt_max_batch: int
    trt_calibration_images: int
    openvino_precision: str = "auto"

    def __post_init__(self) -> None:
        if not 1 <= self.trt_min_batch <= self.trt_opt_batch <= self.trt_max_batch:
            raise ConfigError(
                "TensorRT profile needs 1 <= trt_min_batch <= trt_opt_batch <= trt_max_batch, got "
                f"{self.trt_min_batch}, {self.trt_opt_batch}, {self.trt_max_batch}"
            )

    @property
    def profile(self) -> tuple[int, int, int]:
        """The TensorRT optimisation profile over the batch axis: (min, opt, max)."""
        return (self.trt_min_batch, self.trt_opt_batch, self.trt_max_batch)


def resolve_cache_dir(path: str) -> str:
    """An absolute cache folder: ``~`` expanded, a relative path anchored where it is resolved.

    Resolved on the driver, so every actor of a run uses the same absolute path on its node
    (Ray starts workers in a per-package copy of the working dir, new after every code change:
    a relative cache there would be rebuilt for nearly every job).
    """
    return os.path.abspath(os.path.expanduser(path))


def engine_options(score: ScoreSettings) -> EngineOptions:
    """The engine options of a run; the one place they are built from settings."""
    gpu_actors = score.gpus_per_actor > 0
    threads = score.threads_per_actor or (None if gpu_actors else max(1, int(score.cpus_per_actor)))
    return EngineOptions(
        threads=threads,
        cache_dir=resolve_cache_dir(score.cache_dir),
        onnx_precision=score.onnx_precision,
        onnx_calibration_images=score.onnx_calibration_images,
        trt_precision=score.trt_precision,
        trt_min_batch=score.trt_min_batch,
        trt_opt_batch=score.trt_opt_batch,
        trt_max_batch=score.trt_max_batch,
        trt_calibration_images=score.trt_calibration_images,
        openvino_precision=score.openvino_precision,
    )
