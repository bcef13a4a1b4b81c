"""One epoch of training, evaluation, and the state a resumed run needs.

Batches are dicts ``{"pixels": uint8 [B, H, W], "label": int64 [B]}`` as Ray Data's
``iter_torch_batches`` yields them from the decoded training dataset.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr_ray.training.recipe import loss_fn

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def to_input(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, H, W] -> float32 [B, 1, H, W] in 0..1 (the preprocessing contract's input)."""
    x = pixels.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): where bf16 autocast pays.

    Elsewhere oneDNN emulates bf16 and training gets slower, not faster.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(device: torch.device, precision: str) -> str:
    """The precision a run really trains in: ``fp32``, ``bf16`` or ``fp16``.

    ``auto``: on CUDA bf16 where supported, else fp16; on a CPU bf16 where it is native
    (``cpu_bf16_native``), else fp32. An explicit ``bf16`` is honoured on any device; ``fp16``
    on a CPU trains in fp32 (CPU fp16 autocast is slower than fp32 and loses range).
    """
    if precision == "fp32":
        return "fp32"
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision
    if precision == "auto":
        return "bf16" if cpu_bf16_native() else "fp32"
    return "bf16" if precision == "bf16" else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for a resolved ``precision`` (``resolve_precision``): bf16 autocast on
    CPU or CUDA, fp16 on CUDA; nothing for fp32. Weights, optimizer state and the loss stay
    fp32 (autocast only lowers the matmuls/convolutions)."""
    if precision == "auto":
        precision = resolve_precision(device, precision)
    if precision == "fp32" or (device.type != "cuda" and precision != "bf16"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    grad_clip: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    precision: str = "fp32",
) -> float:
    """Forward, backward, clip, step. Returns the loss."""
    with autocast(x.device, precision):
        logits = net(x)
    loss = loss_fn(logits, y, weights, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(loss.detach())


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def run_epoch(
    net: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    device: torch.device,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
    frozen: list[nn.Module],
    max_steps: int | None = None,
    **step_kwargs: Any,
) -> EpochStats:
    net.train()
    for block in frozen:  # frozen blocks keep their ImageNet BatchNorm statistics
        block.eval()
    total, n = 0.0, 0
    start = time.perf_counter()
    for steps, batch in enumerate(batches, start=1):
        x = to_input(batch["pixels"], device)
        if augment is not None:
            x = augment(x)
        y = batch["label"].to(device)
        total += train_step(net, x, y, optimizer, **step_kwargs) * len(y)
        n += len(y)
        scheduler.step()
        if max_steps is not None and steps >= max_steps:
            break
    return EpochStats(total / max(n, 1), n, time.perf_counter() - start)


@torch.inference_mode()
def predict(
    net: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    precision: str = "fp32",
    keep: Callable[[int], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row index, label, logits) for every row whose running index passes ``keep``."""
    net.eval()
    idx, labels, logits = [], [], []
    seen = 0
    for batch in batches:
        n = len(batch["label"])
        rows = np.arange(seen, seen + n)
        seen += n
        mask = np.array([keep(int(i)) for i in rows]) if keep is not None else np.ones(n, bool)
        if not mask.any():
            continue
        x = to_input(batch["pixels"][torch.from_numpy(mask)], device)
        with autocast(device, precision):
            out = net(x).float().cpu().numpy()
        idx.append(rows[mask])
        labels.append(batch["label"].numpy()[mask])
        logits.append(out)
    if not idx:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(idx), np.concatenate(labels), np.concatenate(logits)


def validate(
    net: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    precision: str,
    rank: int,
    world: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits) of the whole validation set, in dataset order, on every worker.

    Every worker reads the whole (small) validation set and scores every ``world``-th row;
    the parts are gathered exactly (no padding, no duplicate rows skewing the metrics).
    """
    from cxr_ray.training.distributed import gather_arrays

    idx, y, logits = predict(
        net, batches, device=device, precision=precision, keep=lambda i: i % world == rank
    )
    idx, y, logits = gather_arrays(idx, y, logits.reshape(len(idx), -1))
    order = np.argsort(idx)
    return y[order], logits[order]
