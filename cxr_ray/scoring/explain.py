"""Grad-CAM heatmaps: where in the image the model looked for its prediction.

Implemented with torch hooks rather than the ``grad-cam`` package: that package needs
``opencv-python`` (which needs libGL on headless servers) for work that is a forward hook,
a gradient hook and a weighted sum here; the hook version runs on every backbone cxr-ray
builds, with the target layer taken from the model card. TensorRT cannot give gradients, so
heatmaps always come from the torch model.

Heatmaps are for the predicted class (or a given one), ``float32 [N, H, W]`` in 0..1 at the
model's input size; overlays are RGB PNGs of the preprocessed image with a jet colour map.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from cxr_ray.models.card import ModelCard
from cxr_ray.models.factory import CxrNet
from cxr_ray.vocabulary import Status


def gradcam(
    net: CxrNet, x: torch.Tensor, target_layer: str, class_idx: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps ``[N, H, W]`` in 0..1, explained class per image) for inputs ``[N, 1, H, W]``."""
    layer = net.get_submodule(target_layer)
    saved: dict[str, torch.Tensor] = {}

    def forward_hook(_m: Any, _inp: Any, out: torch.Tensor) -> None:
        saved["act"] = out
        out.register_hook(lambda g: saved.__setitem__("grad", g))

    handle = layer.register_forward_hook(forward_hook)
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # gradients must flow even if weights are frozen
            logits = net(x)
            cls = logits.argmax(1) if class_idx is None else torch.as_tensor(class_idx, device=logits.device)
            net.zero_grad(set_to_none=True)
            logits.gather(1, cls.view(-1, 1)).sum().backward()
    finally:
        handle.remove()
        net.train(was_training)
        # The weights' .grad would otherwise stay allocated: a second copy of the model in
        # every explaining actor.
        net.zero_grad(set_to_none=True)
    act, grad = saved["act"].detach(), saved["grad"].detach()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam[:, 0]
    flat = cam.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1), flat.max(1).values.view(-1, 1, 1)
    # A relative floor: an absolute one (1e-8) crushed maps whose raw range is tiny (a model
    # without pretrained weights peaked at 0.014 instead of 1).
    cam = (cam - lo) / (hi - lo).clamp_min(1e-12)
    return cam.cpu().numpy().astype(np.float32), cls.cpu().numpy()


def overlay_png(pixels: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> bytes:
    """An RGB PNG of the grayscale ``pixels`` (uint8 HxW) with ``heat`` (0..1) in jet colours."""
    from matplotlib import colormaps

    gray = np.repeat(pixels[..., None].astype(np.float32) / 255.0, 3, axis=2)
    colour = colormaps["jet"](heat)[..., :3]
    mixed = (1 - alpha * heat[..., None]) * gray + alpha * heat[..., None] * colour
    buf = io.BytesIO()
    Image.fromarray(np.clip(mixed * 255, 0, 255).astype(np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def heat_fraction_inside(heat: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Share of each heatmap's mass inside ``box`` = (x0, y0, x1, y1) in 0..1 coordinates."""
    _, h, w = heat.shape
    x0, y0, x1, y1 = box
    inside = heat[:, int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)].sum(axis=(1, 2))
    return inside / np.maximum(heat.sum(axis=(1, 2)), 1e-8)


class Explainer:
    """Ray Data actor stage: Grad-CAM overlays for flagged (or all) rows, written as PNGs.

    Adds ``heatmap_uri`` to each row (null when not explained) and drops the pixels.
    ``weights`` are the artifact's safetensors bytes (or an object ref to them). Runs on
    CUDA when the pool gives it a working GPU (only when the cluster has GPUs to spare beyond
    the predictor pool), else the CPU.
    """

    def __init__(
        self,
        card: ModelCard,
        weights: Any,
        out_dir: str,
        *,
        only_flagged: bool = True,
        limit: int | None = None,
    ) -> None:
        import ray
        from safetensors.torch import load

        from cxr_ray.models.factory import create_model

        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        self.net = create_model(card.arch, num_classes=len(card.labels), pretrained=False)
        self.net.load_state_dict(load(weights))
        # Never assume a GPU actor has CUDA (an old driver, a logical GPU): use it if it works.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.net.to(self.device).eval()
        self.target = card.target_layer
        self.out_dir = out_dir
        self.only_flagged = only_flagged
        self.limit = limit
        self.done = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cxr_ray.imaging.preprocess import to_model_input
        from cxr_ray.io import storage
        from cxr_ray.labels import LABELS

        n = len(batch["uri"])
        uris = np.full(n, None, dtype=object)
        ok = batch["status"] == Status.OK.value
        want = (ok & batch["flagged"].astype(bool)) if self.only_flagged else ok
        idx = np.flatnonzero(want)
        if self.limit is not None:
            idx = idx[: max(0, self.limit - self.done)]
        if len(idx):
            x = torch.from_numpy(to_model_input(batch["pixels"][idx])).to(self.device)
            preds = np.array([LABELS.index(p) for p in batch["pred_label"][idx]])
            heat, _ = gradcam(self.net, x, self.target, preds)
            for k, i in enumerate(idx):
                name = f"{batch['image_id'][i] or i}.png"
                uri = storage.join(self.out_dir, name)
                storage.write_bytes(overlay_png(batch["pixels"][i], heat[k]), uri)
                uris[i] = uri
            self.done += len(idx)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["heatmap_uri"] = uris
        return out
