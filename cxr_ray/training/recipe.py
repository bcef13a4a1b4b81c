"""Optimiser, schedule, loss and freezing: the parts of the recipe a reviewer should read.

- AdamW with two learning rates: the new head at ``lr``, the pretrained backbone at
  ``lr * backbone_lr_mult`` (it needs nudging, not relearning); no weight decay on norms/biases.
- Linear warmup then cosine decay to zero, stepped per optimisation step.
- Cross-entropy with optional label smoothing; class imbalance by per-class weights that scale
  each sample's loss, normalised by the batch size (not by the weight sum), so that with DDP
  the average over workers equals the loss on the concatenated batch.
- The first ``frozen_blocks`` feature blocks are frozen, BatchNorm statistics included: on
  small CPU budgets that halves the step time and keeps generic low-level filters intact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from cxr_ray.config import TrainSettings
from cxr_ray.models.factory import CxrNet, feature_blocks, head_parameters


def freeze_blocks(net: CxrNet, arch: str, n: int) -> list[nn.Module]:
    """Freeze the first ``n`` feature blocks; returns them (keep them in eval mode)."""
    blocks = feature_blocks(net, arch)[:n]
    for block in blocks:
        for p in block.parameters():
            p.requires_grad_(False)
    return blocks


def param_groups(
    net: CxrNet, arch: str, *, lr: float, backbone_lr_mult: float, weight_decay: float
) -> list[dict]:
    head_ids = {id(p) for p in head_parameters(net, arch)}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in net.parameters():
        if not p.requires_grad:
            continue
        is_head = id(p) in head_ids
        decay = p.ndim > 1  # no decay on biases and norm scales
        groups.setdefault((is_head, decay), []).append(p)
    out = []
    for (is_head, decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": lr if is_head else lr * backbone_lr_mult,
                "weight_decay": weight_decay if decay else 0.0,
            }
        )
    return out


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier for ``LambdaLR``: linear warmup to 1, cosine to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Inverse-frequency weights with mean 1 over samples (``n / (k * count)``)."""
    c = torch.tensor([max(1, int(x)) for x in counts], dtype=torch.float32)
    return c.sum() / (len(c) * c)


def loss_fn(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    per_sample = nn.functional.cross_entropy(
        logits.float(), target, reduction="none", label_smoothing=label_smoothing
    )
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)[target]
    return per_sample.mean()


def steps_per_epoch(n_rows: int, cfg: TrainSettings, world: int) -> int:
    """Optimisation steps per epoch: full global batches, capped by ``max_steps_per_epoch``."""
    steps = max(1, n_rows // (cfg.batch_size * world))
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def optimization(
    net: CxrNet, arch: str, cfg: TrainSettings, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and its warmup + cosine schedule."""
    groups = param_groups(
        net, arch, lr=cfg.lr, backbone_lr_mult=cfg.backbone_lr_mult, weight_decay=cfg.weight_decay
    )
    optimizer = torch.optim.AdamW(groups)
    warmup = int(cfg.warmup_epochs * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(warmup, max(1, steps * cfg.epochs))
    )
    return optimizer, scheduler
