"""Collectives the training loop needs across DDP workers (no-ops in a single process)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _all_gather(obj: Any) -> list[Any]:
    if not torch.distributed.is_initialized():
        return [obj]
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts


def gather_arrays(*arrays: np.ndarray) -> list[np.ndarray]:
    """Concatenate per-worker arrays on every worker (exact: no padding, no duplicates)."""
    parts = _all_gather(arrays)
    return [np.concatenate([p[i] for p in parts]) for i in range(len(arrays))]


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every worker, in rank order, on every worker."""
    return _all_gather(obj)


def should_stop(history: list[dict[str, Any]], patience: int, key: str = "val_macro_f1") -> bool:
    """Early stopping: ``key`` has not improved for ``patience`` epochs."""
    if not history:
        return False
    scores = [h[key] for h in history]
    return len(scores) - 1 - int(np.argmax(scores)) >= patience
