"""Training checkpoints: everything a restarted run needs, loadable with ``weights_only=True``.

The state includes the per-epoch ``history`` so far: a restarted worker group (or a rerun with
the same run name) continues it for early stopping and the model card. Ray keeps only the
reports of the checkpoints it retains (``Result.metrics_dataframe``: ``keep_checkpoints`` rows),
so it cannot be rebuilt from Ray's books.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cxr_ray.errors import ModelError

STATE_FILE = "train_state.pt"


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists and dicts only) into ``directory``."""
    path = Path(directory) / STATE_FILE
    torch.save(state, path)
    return path


def load_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"checkpoint {directory} has no {STATE_FILE}") from None
    except Exception as exc:
        raise ModelError(f"refusing to load checkpoint {path}: {exc}") from None
