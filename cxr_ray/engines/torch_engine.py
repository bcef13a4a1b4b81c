"""torch engine: eager PyTorch, channels_last; on CUDA in half precision."""

from __future__ import annotations

import numpy as np

from cxr_ray.engines.base import EnginePayload


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

        from cxr_ray.models.factory import Probabilities, create_model

        card = payload.card
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        net = create_model(card.arch, num_classes=len(card.labels), pretrained=False)
        net.load_state_dict(load(payload.weights))
        model = Probabilities(net, card.temperature).eval()
        self.half = (self.device == "cuda") if half is None else half
        model = model.to(self.device).to(memory_format=torch.channels_last)
        self.model = model.half() if self.half else model
        self._torch = torch

    @classmethod
    def from_payload(cls, payload: EnginePayload) -> TorchEngine:
        return cls(payload, threads=payload.options.get("threads"))

    def run_tensor(self, x):
        """Score a torch tensor already on the engine's device (GPU decode path)."""
        torch = self._torch
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            if self.half:
                x = x.half()
            return self.model(x).float()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = self._torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return self.run_tensor(t).cpu().numpy()
