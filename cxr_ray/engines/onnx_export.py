"""Export an artifact's network (with softmax and temperature) to ONNX, cached by weights hash.

The graph input is ``pixels: float32 [batch, 1, H, W]`` (0..1), the output ``probs:
float32 [batch, 3]``; the batch axis is dynamic. The dynamo exporter writes weights to a
separate ``.onnx.data`` file; the cache keeps a single-file copy (the model is small) so it
can travel through the Ray object store and be loaded from bytes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

if TYPE_CHECKING:  # torch stays out of an onnxruntime actor's imports
    from cxr_ray.models.artifact import Artifact

logger = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME = "pixels"
OUTPUT_NAME = "probs"
MAX_BATCH = 4096


def export_onnx(art: Artifact, path: Path) -> Path:
    """Export ``Probabilities(net, T)`` of ``art`` to a single-file ONNX model at ``path``."""
    import onnx
    import torch

    from cxr_ray.models.factory import Probabilities

    model = Probabilities(art.build(), art.card.temperature).eval()
    h, w = art.card.input_size
    example = torch.rand(2, 1, h, w)
    tmp_dir = path.parent / f".export-{os.getpid()}"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    staged = tmp_dir / "model.onnx"
    torch.onnx.export(
        model,
        (example,),
        str(staged),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},),
        opset_version=OPSET,
        external_data=True,
        verbose=False,
    )
    proto = onnx.load(str(staged), load_external_data=True)
    onnx.checker.check_model(proto)
    tmp_file = path.with_suffix(".tmp")
    onnx.save(proto, str(tmp_file), save_as_external_data=False)
    tmp_file.replace(path)
    for f in tmp_dir.iterdir():
        f.unlink()
    tmp_dir.rmdir()
    return path


def onnx_cache_path(art: Artifact, cache_dir: str) -> Path:
    h, w = art.card.input_size
    return Path(cache_dir) / "onnx" / f"{art.card.version}-{h}x{w}-opset{OPSET}.onnx"


def cached_onnx(art: Artifact, cache_dir: str) -> tuple[bytes, bool]:
    """ONNX bytes for ``art`` and whether they came from the cache (exported once per model
    version and input size, guarded by a file lock so concurrent runs on a node export once)."""
    path = onnx_cache_path(art, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    hit = True
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            logger.info("exporting %s to ONNX at %s", art.card.version, path)
            export_onnx(art, path)
            hit = False
    return path.read_bytes(), hit
