"""What the benchmarks share: timing one scoring run, a throughput artifact (not tests)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Timed:
    result: Any  # cxr_ray.scoring.pipeline.ScoreResult
    #: Images per second from the call to the last row (start-up included).
    end_to_end: float
    #: Rows per second between the first and the last committed block.
    steady: float
    #: Seconds from the call to the first committed block.
    first_rows_s: float


def timed_score(source: str, artifact: Any, out: str, settings: Any, *, fresh_ray: bool = True) -> Timed:
    """Score ``source`` with block timestamps; with ``fresh_ray`` on a new local Ray started
    before the clock, so every run pays Ray Data's first-execution set-up and none inherits a
    warm one from the run before."""
    import ray
    import ray.data

    from cxr_ray.scoring.pipeline import score

    if fresh_ray:
        ray.init(include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    marks: list[tuple[float, int]] = []

    def mark(block: Any) -> None:
        done = (marks[-1][1] if marks else 0) + block.num_rows
        marks.append((time.perf_counter(), done))

    start = time.perf_counter()
    try:
        result = score(source, artifact, out, settings, on_block=mark)
    finally:
        if fresh_ray:
            ray.shutdown()
    wall = time.perf_counter() - start
    steady = (marks[-1][1] - marks[0][1]) / max(1e-9, marks[-1][0] - marks[0][0]) if marks else 0.0
    return Timed(result, result.images / wall, steady, (marks[0][0] - start) if marks else wall)


def mobilenet_artifact(dst: Any, size: int = 224) -> str:
    """A MobileNetV2 artifact with a random head (ImageNet backbone when offline weights exist):
    throughput does not depend on the head's values."""
    import torch

    from cxr_ray.errors import WeightsUnavailableError
    from cxr_ray.models.artifact import card_for, save_artifact
    from cxr_ray.models.factory import create_model

    torch.manual_seed(0)
    try:
        net = create_model("mobilenet_v2", pretrained=True)
    except WeightsUnavailableError:
        net = create_model("mobilenet_v2", pretrained=False)
    artifact = str(dst)
    save_artifact(net, card_for(net, "mobilenet_v2", input_size=size, intensity="none"), artifact)
    return artifact
