"""Ray Train fine-tuning of a chest X-ray classifier: train_loop_per_worker + TorchTrainer.

Recipes (the exact commands are in the README):

    cxr-ray train ../shared/data/kermany224 --out artifacts/mnv2          # CPU default
    cxr-ray train s3://bucket/xrays/ --out s3://bucket/models/r50 --arch resnet50 \\
        --workers 4 --use-gpu --batch-size 64 --lr 1e-3 --frozen-blocks 0
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import numpy as np
import ray.data
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cxr_ray import metrics
from cxr_ray.calibration import softmax
from cxr_ray.config import ModelSettings, Settings, TrainSettings
from cxr_ray.io import storage
from cxr_ray.models.card import ModelCard
from cxr_ray.models.factory import create_model
from cxr_ray.training import checkpoint as ckpt_mod
from cxr_ray.training import data as data_mod
from cxr_ray.training import finalize, loop, recipe
from cxr_ray.training.augment import TrainAugment
from cxr_ray.training.distributed import gather_arrays, gather_objects, should_stop

logger = logging.getLogger(__name__)
_DTYPES = {"pixels": torch.uint8, "label": torch.int64}


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One DDP worker's training run; returns the full per-epoch history (``Result.return_value``).

    The history also travels in every checkpoint: a restarted worker group (or a rerun with the
    same run name) resumes from the latest checkpoint and needs the epochs before it, for early
    stopping and for the model card. Ray's own books cannot give it: ``Result.metrics_dataframe``
    holds only the ``keep_checkpoints`` best checkpoints' reports, ordered by score.
    """
    cfg = TrainSettings.model_validate(config["train"])
    model_cfg = ModelSettings.model_validate(config["model"])
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per worker drowns logs
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    loop.seed_everything(cfg.seed + rank)
    device = ray.train.torch.get_device()

    net = create_model(model_cfg.arch, pretrained=model_cfg.pretrained, weights_dir=model_cfg.weights_dir)
    frozen = recipe.freeze_blocks(net, model_cfg.arch, cfg.frozen_blocks)
    steps = recipe.steps_per_epoch(config["n_train_rows"], cfg, world)
    optimizer, scheduler = recipe.optimization(net, model_cfg.arch, cfg, steps)
    weights = recipe.class_weights(config["class_counts"]) if cfg.imbalance == "class_weights" else None
    # bf16 autocast where the device computes it natively (CUDA, or a CPU with AVX512-BF16 /
    # AMX), fp16 + loss scaling on older GPUs, fp32 elsewhere (loop.resolve_precision).
    precision = loop.resolve_precision(device, cfg.precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    # Validation on a CPU stays fp32: the reported figures, the temperature and the threshold
    # are then those of the fp32 engines that score (bf16 only speeds up the training steps).
    val_precision = precision if device.type == "cuda" else "fp32"

    start_epoch, history = _resume(net, optimizer, scheduler, rank)
    model = ray.train.torch.prepare_model(net.to(memory_format=torch.channels_last))
    augment = TrainAugment(**cfg.augment.model_dump())
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch, cfg.epochs):
        if should_stop(history, cfg.early_stopping_patience):
            break
        stats = loop.run_epoch(
            model,
            _train_batches(train_shard, cfg, seed=cfg.seed * 1000 + epoch * world + rank),
            optimizer,
            scheduler,
            device=device,
            augment=augment,
            frozen=frozen,
            max_steps=steps,
            weights=weights,
            label_smoothing=cfg.label_smoothing,
            grad_clip=cfg.grad_clip,
            scaler=scaler,
            precision=precision,
        )
        val_batches = val_shard.iter_torch_batches(batch_size=128, dtypes=_DTYPES)
        y, logits = loop.validate(
            model, val_batches, device=device, precision=val_precision, rank=rank, world=world
        )
        m = metrics.classification_metrics(y, softmax(logits))
        report = {
            "epoch": epoch,
            "attempt_start_epoch": start_epoch,
            "train_loss": float(gather_arrays(np.array([stats.loss]))[0].mean()),
            "train_images_per_s": stats.images_per_s * world,
            "precision": precision,
            **{f"val_{k}": v for k, v in m.summary().items()},
        }
        history.append(report)
        state = {
            "model": net.state_dict(),  # the module DDP wraps: no "module." prefix
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "history": history,
            "val_logits": torch.from_numpy(logits), "val_labels": torch.from_numpy(y),
        }  # fmt: skip
        _checkpoint_and_report(report, state, rank=rank)
    return history


def _resume(
    net: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int
) -> tuple[int, list[dict[str, Any]]]:
    """Restore model, optimizer, scheduler and this rank's RNG from Ray Train's checkpoint, if
    any; returns ``(first epoch to run, history so far)``."""
    resumed = ray.train.get_checkpoint()
    if resumed is None:
        return 0, []
    with resumed.as_directory() as d:
        state = ckpt_mod.load_state(d)
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    loop.set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
    start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
    logger.info("rank %d resumed after epoch %d", rank, start_epoch - 1)
    return start_epoch, history


def _train_batches(shard: Any, cfg: TrainSettings, *, seed: int) -> Any:
    """One epoch of this worker's training shard: full batches, locally shuffled with ``seed``."""
    return shard.iter_torch_batches(
        batch_size=cfg.batch_size,
        drop_last=True,
        dtypes=_DTYPES,
        local_shuffle_buffer_size=4 * cfg.batch_size,
        local_shuffle_seed=seed,
    )


def _checkpoint_and_report(report: dict[str, Any], state: dict[str, Any], *, rank: int) -> None:
    """Report an epoch to Ray Train; rank 0 attaches the checkpoint of ``state`` plus every
    rank's RNG state (gathered on all ranks, for an exact resume)."""
    rngs = gather_objects(loop.rng_state())
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            ckpt_mod.save_state(tmp, {**state, "rng": rngs})
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(report, checkpoint=checkpoint)


def build_trainer(settings: Settings, data: data_mod.TrainingData, run_name: str) -> TorchTrainer:
    t = settings.train
    return TorchTrainer(
        train_loop_per_worker,  # type: ignore[arg-type]  # Ray's stub says -> None; v2 keeps the return
        train_loop_config={
            "train": t.model_dump(mode="json"),
            "model": settings.model.model_dump(mode="json"),
            "class_counts": data.class_counts,
            "n_train_rows": data.train.count(),  # differs from the class counts when oversampling
        },
        scaling_config=ScalingConfig(
            num_workers=t.workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=_storage(t.storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                checkpoint_score_attribute="val_macro_f1",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
        datasets={"train": data.train, "val": data.val},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def _storage(path: str) -> str:
    import os

    return path if "://" in path else os.path.abspath(path)


def train(settings: Settings, source: str, out: str) -> ModelCard:
    """Split, train with Ray Train, and write the model artifact (and its split) to ``out``."""
    started = time.time()
    data = data_mod.prepare(source, settings)
    run_name = settings.train.run_name or f"cxr-{settings.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = build_trainer(settings, data, run_name).fit()
    if result.error is not None:
        raise result.error
    best = finalize.best_checkpoint(result)
    # Rank 0's return value: every epoch, also those before a resume (the best checkpoint's own
    # history ends at its epoch), without downloading the latest checkpoint to read it.
    history = getattr(result, "return_value", None)  # Ray Train v2 (the default)
    if not history:
        raise RuntimeError(f"training run {run_name} returned no history (is RAY_TRAIN_V2_ENABLED=0?)")
    info = finalize.training_info(settings, data, run_name, time.time() - started) | {"source": source}
    with best.as_directory() as d:
        card = finalize.write_artifact(d, settings, out, info, history, split=data.table)
    storage.write_table(data.table, storage.join(out, "split.parquet"))  # which images trained/validated
    return card
