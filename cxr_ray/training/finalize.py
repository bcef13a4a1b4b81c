"""Turn the best checkpoint of a Ray Train run into a model artifact.

Writes the weights and card (``cxr_ray.models.artifact``), ``val_metrics.parquet`` (per-class
precision/recall/F1/support/AUROC, confusion matrix cells, calibration) and
``training_curve.png``. Temperature and the pneumonia threshold are fitted on validation, and
the drift reference (``cxr_ray.models.reference``) is built from the validation images.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from cxr_ray import metrics
from cxr_ray.calibration import fit_temperature, nll, softmax, threshold_for_sensitivity
from cxr_ray.config import Settings
from cxr_ray.io import storage
from cxr_ray.labels import LABELS
from cxr_ray.models.artifact import Artifact, card_for, save_artifact, weights_bytes
from cxr_ray.models.card import ModelCard
from cxr_ray.models.factory import create_model
from cxr_ray.models.reference import build_reference
from cxr_ray.reporting.figures import fig_bytes
from cxr_ray.training.checkpoint import load_state

if TYPE_CHECKING:
    from ray.train import Checkpoint, Result

logger = logging.getLogger(__name__)

TARGET_SENSITIVITY = 0.95


def val_metrics_table(
    before: metrics.Metrics, after: metrics.Metrics, temperature: float, nlls: tuple[float, float]
) -> pa.Table:
    table = metrics.metrics_table(after)
    extra = [
        {"metric": "ece_uncalibrated", "label": None, "value": before.ece, "n": before.n},
        {"metric": "nll_uncalibrated", "label": None, "value": nlls[0], "n": before.n},
        {"metric": "nll", "label": None, "value": nlls[1], "n": before.n},
        {"metric": "temperature", "label": None, "value": temperature, "n": before.n},
    ]
    for i, true in enumerate(LABELS):
        for j, pred in enumerate(LABELS):
            extra.append(
                {
                    "metric": f"confusion_pred_{pred}",
                    "label": true,
                    "value": float(after.confusion[i][j]),
                    "n": after.n,
                }
            )
    rows = [dict(r, run_id=None, model_version=None) for r in extra]
    return pa.concat_tables([table, pa.Table.from_pylist(rows, schema=metrics.METRICS_SCHEMA)])


def training_curve_png(history: list[dict[str, float]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    for key, name in (
        ("val_macro_f1", "val macro-F1"),
        ("val_accuracy", "val accuracy"),
        ("val_binary_sensitivity", "val pneumonia sensitivity"),
    ):
        b.plot(epochs, [h.get(key, math.nan) for h in history], "o-", label=name)
    b.set_xlabel("epoch")
    b.set_ylim(0.5, 1.0)
    b.grid(alpha=0.3)
    b.legend(loc="lower right")
    return fig_bytes(fig)


def write_artifact(
    checkpoint_dir: str,
    settings: Settings,
    out: str,
    training_info: dict[str, Any],
    history: list[dict[str, Any]],
    *,
    split: pa.Table | None = None,
) -> ModelCard:
    """Build the artifact at ``out`` from the best checkpoint the trainer wrote.

    ``history`` is the full per-epoch history (what the training function returned); the
    best checkpoint's own history ends at its epoch. ``split`` (the table that becomes
    ``split.parquet``) gives the validation images the drift reference is built from; without
    it, or when it cannot be built, the artifact has none (``cxr-ray drift-reference`` adds it).
    """
    state = load_state(checkpoint_dir)
    arch = settings.model.arch
    net = create_model(arch, pretrained=False)
    net.load_state_dict(state["model"])
    logits = state["val_logits"].numpy()
    y = state["val_labels"].numpy()
    raw = softmax(logits)
    before = metrics.classification_metrics(y, raw)
    temperature = fit_temperature(logits, y)
    probs = softmax(logits, temperature)
    nlls = (nll(raw, y), nll(probs, y))
    threshold = threshold_for_sensitivity(probs, y, TARGET_SENSITIVITY)
    after = metrics.classification_metrics(y, probs, threshold=threshold)
    card = card_for(
        net,
        arch,
        input_size=settings.model.input_size,
        intensity=settings.model.intensity,
        storage_jpeg_quality=storage_quality(split, settings.model.input_size),
        temperature=temperature,
        thresholds={"pneumonia": threshold, "target_sensitivity": TARGET_SENSITIVITY},
        training={
            **training_info,
            "best_epoch": int(state["epoch"]),
            "epochs_run": len(history),
            "recipe": settings.train.model_dump(mode="json"),
            "model_settings": settings.model.model_dump(mode="json"),
            "split": {"val_fraction": settings.data.val_fraction, "seed": settings.data.split_seed},
            "history": history,
            "python": platform.python_version(),
        },
        metrics={
            "validation": after.summary(),
            "validation_confusion": after.confusion,
            "ece_before_temperature": before.ece,
            "nll_before_temperature": nlls[0],
            "nll_after_temperature": nlls[1],
        },
    )
    data = weights_bytes(net)
    reference = None
    if split is not None:
        reference = drift_reference(
            Artifact(out, card.model_copy(update={"weights_sha256": _sha(data)}), data), split, settings
        )
    card = save_artifact(data, card, out, reference=reference)
    storage.write_table(
        val_metrics_table(before, after, temperature, nlls), storage.join(out, "val_metrics.parquet")
    )
    storage.write_bytes(training_curve_png(history), storage.join(out, "training_curve.png"))
    from cxr_ray.reporting import card_md

    storage.write_bytes(card_md.render(card, y, probs).encode(), storage.join(out, "model_card.md"))
    logger.info("artifact %s written to %s", card.version, out)
    return card


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: Training images read to detect their storage form (``storage_quality``).
STORAGE_SAMPLE = 64


def storage_quality(split: pa.Table | None, input_size: int) -> int | None:
    """The JPEG quality the training images are stored at (``storage_form.detect`` on an
    evenly spaced sample of ``STORAGE_SAMPLE`` training rows), or ``None``."""
    from cxr_ray.imaging.storage_form import detect

    if split is None or "split" not in split.column_names:
        return None
    rows = [r for r in split.to_pylist() if r.get("split") == "train" and r.get("status") == "ok"]
    step = max(1, len(rows) // STORAGE_SAMPLE)
    sample = rows[::step][:STORAGE_SAMPLE]

    def read(row: dict[str, Any]) -> tuple[str, int, int, bytes]:
        try:
            data = storage.read_bytes(str(row["uri"]))
        except Exception:  # an archive member or a table row: not a plain file
            data = b""
        return str(row.get("format")), int(row.get("width") or 0), int(row.get("height") or 0), data

    quality = detect((read(r) for r in sample), (input_size, input_size))
    if quality is not None:
        logger.info("training images are stored as %d px JPEGs at quality %d", input_size, quality)
    return quality


def drift_reference(art: Artifact, split: pa.Table, settings: Settings) -> bytes | None:
    """The drift reference from the validation rows of ``split`` (``None``, with a warning, when
    the images cannot be read: training is not lost for it)."""
    from cxr_ray.errors import ModelError

    try:
        return build_reference(
            art,
            split=split,
            data=settings.data,
            components=settings.drift.reference_components,
            max_images=settings.drift.reference_max_images,
        )
    except ModelError as exc:
        logger.warning("no drift reference in the artifact: %s (add one with `cxr-ray drift-reference`)", exc)
        return None


def training_info(settings: Settings, data: Any, run_name: str, seconds: float) -> dict[str, Any]:
    """What the model card records about how and on what the model was trained."""
    import ray
    import torch

    return {
        "data_fingerprint": data.fingerprint,
        "split_counts": data.split_counts(),
        "run_name": run_name,
        "storage_path": settings.train.storage_path,
        "workers": settings.train.workers,
        "use_gpu": settings.train.use_gpu,
        "wall_seconds": round(seconds, 1),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
    }


def best_checkpoint(result: Result) -> Checkpoint:
    """The best checkpoint (by validation macro-F1) that a Ray Train run kept."""
    if not result.best_checkpoints:
        raise RuntimeError("the training run reported no checkpoint")
    best = result.get_best_checkpoint(metric="val_macro_f1", mode="max")
    if best is None:
        raise RuntimeError("the training run reported no checkpoint with val_macro_f1")
    return best
