"""INT8 onnxruntime models: static QDQ quantization calibrated on the artifact's training images.

Opt-in (``score.onnx_precision = "int8"``). On CPUs with VNNI it multiplies the model's
throughput by 2.2-2.6 (MobileNetV2 at 224, 2 cores: 213 -> 480 and 210 -> 541 img/s in two
runs), at the cost of changing some borderline decisions (2.4% of validation classes for the
official artifact), so every quantized model is checked once against the fp32 model on the
artifact's validation images and the result is stored next to it and logged: argmax
agreement, mean and max change of the card's calibrated probabilities, how close the
penultimate features stay, and (where labels exist) accuracy and sensitivity/specificity at
the card's flag threshold for both.

Quantization runs once per (network, input size, calibration set) on the driver and is cached
under ``cache_dir/onnx`` behind a file lock, like the fp32 export: keyed by
``card.engine_key``, so site-calibrated versions of one network share the quantized model.
The check depends on the card's calibration too, so it is stored per calibration
fingerprint (a newly calibrated card re-runs the check, never the quantization). Weights are
int8 per channel, activations uint8 with min/max ranges from the calibration images.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock

from cxr_ray.engines.onnx_export import INPUT_NAME, cached_onnx, onnx_stem
from cxr_ray.engines.options import EngineOptions
from cxr_ray.imaging.preprocess import PreprocessSpec, to_model_input
from cxr_ray.labels import LABELS
from cxr_ray.models.outputs import int8_calibration_images, split_images

if TYPE_CHECKING:
    from cxr_ray.models.artifact import Artifact
    from cxr_ray.models.card import ModelCard

#: Builds an engine from ONNX bytes: ``runner(model, threads=...)(x) -> (logits, features)``.
Runner = Callable[..., Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]]

logger = logging.getLogger(__name__)

#: Validation images the fp32-vs-int8 check scores (at most).
CHECK_IMAGES = 1024


def int8_cache_path(art: Artifact, cache_dir: str, calibration_images: int, seed: int) -> Path:
    name = f"{onnx_stem(art)}-int8-cal{calibration_images}s{seed}.onnx"
    return Path(cache_dir) / "onnx" / name


def int8_check_path(art: Artifact, cache_dir: str, calibration_images: int, seed: int) -> Path:
    """The fp32-vs-int8 check of that model under this card's calibration."""
    model = int8_cache_path(art, cache_dir, calibration_images, seed)
    return model.with_suffix(f".check-{art.card.calibration_fingerprint[:12]}.json")


def quantize_int8(fp32: bytes, calibration: np.ndarray, out: Path) -> Path:
    """Quantize the fp32 ONNX model ``fp32`` (QDQ, per-channel int8 weights) into ``out``.

    ``calibration`` is ``float32 [N, 1, H, W]`` model input (the preprocessing contract).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [{INPUT_NAME: calibration[i : i + 32]} for i in range(0, len(calibration), 32)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".quant-") as tmp:
        src, pre, staged = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre))
        quantize_static(
            str(pre),
            str(staged),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=head_nodes(pre),
        )
        staged.replace(out)
    return out


def head_nodes(model: Path) -> list[str]:
    """The classifier and everything after it: kept in float.

    Quantizing it would put the logits on a coarse grid (with softmax inside the graph, a
    tiny model's probabilities summed to 0.996), which is no speed-up worth having: the
    classifier is one small matrix product.
    """
    import onnx

    nodes = list(onnx.load(str(model), load_external_data=False).graph.node)
    last = max((i for i, n in enumerate(nodes) if n.op_type in ("Gemm", "MatMul")), default=len(nodes))
    return [n.name for n in nodes[last:]]


def _run(runner: Runner, model: bytes, x: np.ndarray, threads: int | None) -> tuple[np.ndarray, np.ndarray]:
    engine = runner(model, threads=threads)
    outs = [engine(x[i : i + 64]) for i in range(0, len(x), 64)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def compare(
    fp32: bytes,
    int8: bytes,
    x: np.ndarray,
    y: np.ndarray | None,
    card: ModelCard,
    *,
    runner: Runner,
    threads: int | None = None,
) -> dict[str, Any]:
    """How the int8 model's outputs differ from the fp32 model's on model input ``x``: the
    card's calibrated probabilities (what scoring reports) and the penultimate features."""
    from cxr_ray import metrics

    (l32, f32), (l8, f8) = _run(runner, fp32, x, threads), _run(runner, int8, x, threads)
    p32, p8 = card.probabilities(l32), card.probabilities(l8)
    diff = np.abs(p32 - p8)
    norms = np.linalg.norm(f32, axis=1) * np.linalg.norm(f8, axis=1)
    cosine = (f32 * f8).sum(axis=1) / np.maximum(norms, 1e-12)
    threshold = card.pneumonia_threshold
    out: dict[str, Any] = {
        "images": len(x),
        "argmax_agreement": float((p32.argmax(1) == p8.argmax(1)).mean()),
        "mean_abs_prob_change": float(diff.mean()),
        "max_abs_prob_change": float(diff.max()),
        "min_feature_cosine": float(cosine.min()),
        "threshold": float(threshold),
    }
    if y is not None and len(y):
        for name, p in (("fp32", p32), ("int8", p8)):
            m = metrics.classification_metrics(y, p, threshold=threshold)
            out[name] = {
                "accuracy": m.accuracy,
                "macro_f1": m.macro_f1,
                "sensitivity_at_threshold": m.binary["sensitivity_at_threshold"],
                "specificity_at_threshold": m.binary["specificity_at_threshold"],
            }
    return out


def _validation_input(art: Artifact, n: int, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """Model input of up to ``n`` validation images (training images when there are none)."""
    pixels, labels = split_images(art, "val", n, spec=spec, setting="onnx_precision")
    if not len(pixels):
        pixels, labels = split_images(art, "train", n, spec=spec, setting="onnx_precision")
    known = labels and all(v in LABELS for v in labels)
    return to_model_input(pixels), (np.array([LABELS.index(v) for v in labels]) if known else None)


def _train_count(art: Artifact) -> int:
    """How many training images ``int8_calibration_images`` has to draw from."""
    import pyarrow.compute as pc

    from cxr_ray.io import storage

    split = storage.read_table(storage.join(art.uri, "split.parquet"), columns=["split"])
    return int(pc.sum(pc.equal(split["split"], "train")).as_py() or 0)


def cached_int8_onnx(
    art: Artifact,
    options: EngineOptions,
    spec: PreprocessSpec,
    *,
    runner: Runner,
    seed: int = 0,
) -> tuple[bytes, bool, dict[str, Any]]:
    """INT8 ONNX bytes for ``art``, whether they came from the cache, and the fp32-vs-int8
    validation check under the card's calibration; built once per node and cached.

    ``runner(model_bytes, threads=...)`` builds an engine to run a model with (the
    onnxruntime engine). A missing ``split.parquet`` (the artifact's training/validation
    images) is an ``EngineUnavailableError``: there is nothing to calibrate on.
    """
    n_cal = options.onnx_calibration_images
    path = int8_cache_path(art, options.cache_dir, n_cal, seed)
    report = int8_check_path(art, options.cache_dir, n_cal, seed)
    fp32, _ = cached_onnx(art, options.cache_dir)
    hit = True
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            hit = False
            logger.info("quantizing %s to INT8 (%d calibration images)", art.card.engine_key, n_cal)
            pixels = int8_calibration_images(art, n_cal, seed=seed, spec=spec, setting="onnx_precision")
            quantize_int8(fp32, to_model_input(pixels), path)
        if not report.is_file():
            x, y = _validation_input(art, CHECK_IMAGES, spec)
            check = compare(fp32, path.read_bytes(), x, y, art.card, runner=runner, threads=options.threads)
            check["calibration_images"] = min(n_cal, _train_count(art))
            tmp = report.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(check, indent=2) + "\n")
            tmp.replace(report)
    check = json.loads(report.read_text())
    logger.info(
        "INT8 model %s: argmax agreement with fp32 %.3f on %d validation images",
        path.name,
        check["argmax_agreement"],
        check["images"],
    )
    return path.read_bytes(), hit, check
