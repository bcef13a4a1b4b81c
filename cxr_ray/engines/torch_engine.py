"""torch engine: eager PyTorch, channels_last; on CUDA in half precision.

Runs ``LogitsAndFeatures(net)``: raw logits and penultimate features, returned in float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cxr_ray.engines.base import EnginePayload, PrepareReport
from cxr_ray.engines.options import EngineOptions
from cxr_ray.errors import EngineUnavailableError
from cxr_ray.imaging.preprocess import PreprocessSpec

if TYPE_CHECKING:
    from cxr_ray.models.artifact import Artifact


class TorchEngine:
    name = "torch"

    def __init__(
        self,
        payload: EnginePayload,
        *,
        device: str | None = None,
        half: bool | None = None,
        threads: int | None = None,
    ) -> None:
        import torch
        from safetensors.torch import load

        from cxr_ray.models.factory import LogitsAndFeatures, create_model

        card = payload.card
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        net = create_model(card.arch, num_classes=len(card.labels), pretrained=False)
        net.load_state_dict(load(payload.weights))
        model = LogitsAndFeatures(net).eval()
        self.half = (self.device == "cuda") if half is None else half
        model = model.to(self.device).to(memory_format=torch.channels_last)
        self.model = model.half() if self.half else model
        self._torch = torch

    def run_tensor(self, x: Any) -> tuple[Any, Any]:
        """Score a torch tensor (already on the engine's device on the GPU-decode path):
        (logits ``[N, 3]``, features ``[N, F]``), float32 tensors on the engine's device."""
        torch = self._torch
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            if self.half:
                x = x.half()
            logits, features = self.model(x)
            return logits.float(), features.float()

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self._torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        logits, features = self.run_tensor(t)
        return logits.cpu().numpy(), features.cpu().numpy()


def prepare(
    art: Artifact, options: EngineOptions, spec: PreprocessSpec
) -> tuple[EnginePayload, PrepareReport]:
    """The artifact's weights as safetensors bytes (the network is rebuilt in each actor)."""
    from cxr_ray.models.artifact import weights_bytes

    payload = EnginePayload("torch", art.card, options, weights=weights_bytes(art.build()))
    return payload, PrepareReport("torch", None)


def build(payload: EnginePayload) -> TorchEngine:
    if not payload.weights:
        raise EngineUnavailableError("the torch engine needs the payload's weights")
    return TorchEngine(payload, threads=payload.options.threads)
