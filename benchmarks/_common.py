"""What the benchmarks share: timing one scoring run, a throughput artifact, the scored block a
drift check reads (not tests)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
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


def replicate(src: Path, dst: Path, n: int) -> list[Path]:
    """``n`` hard links (copies across filesystems) of the JPEGs under ``src``, cycled, in the
    Kermany folder layout (``copyNN/NORMAL|PNEUMONIA/<name>``, so labels still parse)."""
    files = sorted(src.rglob("*.jpeg"))
    if not files:
        sys.exit(f"no images under {src}: the benchmark needs ../shared/data/kermany-fullres")
    out = []
    for i in range(n):
        f = files[i % len(files)]
        target = dst / f"copy{i // len(files):02d}" / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:  # EXDEV (data on another filesystem than the temp dir), no links
            shutil.copyfile(f, target)
        out.append(target)
    return out


def drift_block(card: Any, logits: Any, stats: Any, feats: Any, patients: Any = None) -> Any:
    """The columns of a scored block that ``DriftAccumulator`` reads, from the network's outputs
    (``patients``: the patient id per row, for the cluster-robust tests)."""
    import numpy as np
    import pyarrow as pa

    from cxr_ray.labels import LABELS, NORMAL

    probs = card.probabilities(np.asarray(logits, np.float64))
    extra = {} if patients is None else {"patient_id": [str(p) for p in patients]}
    return pa.table(
        {
            **extra,
            "status": ["ok"] * len(logits),
            **{f"prob_{k}": probs[:, i].astype(np.float32) for i, k in enumerate(LABELS)},
            "prob_pneumonia": (1 - probs[:, LABELS.index(NORMAL)]).astype(np.float32),
            "pred_label": [LABELS[i] for i in probs.argmax(1)],
            "input_stats": pa.FixedShapeTensorArray.from_numpy_ndarray(np.asarray(stats, np.float32)),
            "features": pa.FixedShapeTensorArray.from_numpy_ndarray(np.asarray(feats, np.float32)),
        }
    )
