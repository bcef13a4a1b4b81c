"""Export an artifact's network (raw logits and penultimate features) to ONNX, cached by weights.

The graph input is ``pixels: float32 [batch, 1, H, W]`` (0..1); the outputs, in this order,
``logits: float32 [batch, 3]`` (raw, uncalibrated) and ``features: float32 [batch, F]`` (the
input of the final linear layer, ``models.factory.LogitsAndFeatures``); the batch axis is
dynamic. Calibration (temperature, per-class scale and bias) is applied to the logits outside
the graph (``ModelCard.probabilities``), so the cache is keyed by ``card.engine_key`` (arch +
weights hash): site-calibrated versions of one network share one exported model. The dynamo
exporter writes weights to a separate ``.onnx.data`` file; the cache keeps a single-file copy
(the model is small) so it can travel through the Ray object store and be loaded from bytes.
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
LOGITS_NAME = "logits"
FEATURES_NAME = "features"
#: The graph's outputs, in order: engines that return outputs by position rely on it.
OUTPUT_NAMES = (LOGITS_NAME, FEATURES_NAME)
#: Graph-format tag in cache file names. ``lf1``: (logits, features) outputs; cached files
#: without it (``probs`` graphs with softmax and temperature inside) are never reused.
GRAPH_TAG = "lf1"
MAX_BATCH = 4096


def export_onnx(art: Artifact, path: Path) -> Path:
    """Export ``LogitsAndFeatures(net)`` of ``art`` to a single-file ONNX model at ``path``."""
    import onnx
    import torch

    from cxr_ray.models.factory import LogitsAndFeatures

    model = LogitsAndFeatures(art.build()).eval()
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
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},),
        opset_version=OPSET,
        external_data=True,
        verbose=False,
    )
    proto = onnx.load(str(staged), load_external_data=True)
    onnx.checker.check_model(proto)
    names = tuple(o.name for o in proto.graph.output)
    if names != OUTPUT_NAMES:  # never cache a graph engines would misread
        raise RuntimeError(f"exported ONNX outputs are {names}, expected {OUTPUT_NAMES}")
    tmp_file = path.with_suffix(".tmp")
    onnx.save(proto, str(tmp_file), save_as_external_data=False)
    tmp_file.replace(path)
    for f in tmp_dir.iterdir():
        f.unlink()
    tmp_dir.rmdir()
    return path


def onnx_stem(art: Artifact) -> str:
    """What an exported model depends on: network (``engine_key``), input size, opset, format."""
    h, w = art.card.input_size
    return f"{art.card.engine_key}-{h}x{w}-opset{OPSET}-{GRAPH_TAG}"


def onnx_cache_path(art: Artifact, cache_dir: str) -> Path:
    return Path(cache_dir) / "onnx" / f"{onnx_stem(art)}.onnx"


def cached_onnx(art: Artifact, cache_dir: str) -> tuple[bytes, bool]:
    """ONNX bytes for ``art`` and whether they came from the cache (exported once per network
    and input size, guarded by a file lock so concurrent runs on a node export once)."""
    path = onnx_cache_path(art, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    hit = True
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            logger.info("exporting %s to ONNX at %s", art.card.engine_key, path)
            export_onnx(art, path)
            hit = False
    return path.read_bytes(), hit
