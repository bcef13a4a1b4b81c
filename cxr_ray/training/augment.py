"""Training-time augmentation: random geometry and intensity on the preprocessing output.

The train transform sits beside the recipe (as torchvision's references keep ``presets.py``
beside ``train.py``); the eval transform is the scoring contract in
``cxr_ray.imaging.preprocess``. Horizontal flips are off by default: the heart sits on the
patient's left, and a flipped chest is not a realistic input.
"""

from __future__ import annotations

from typing import Any


class TrainAugment:
    """Random geometric and intensity augmentation for training batches.

    Works on ``float32 [N, 1, H, W]`` tensors in 0..1 (the output of ``to_model_input``) and
    returns the same shape. Parameters are keyword-only and mirror ``AugmentSettings``.
    """

    def __init__(
        self,
        *,
        rotation_deg: float = 10.0,
        scale_min: float = 0.75,
        translate: float = 0.06,
        brightness: float = 0.3,
        contrast: float = 0.3,
        gamma: float = 0.35,
        blur_prob: float = 0.2,
        hflip: bool = False,
    ) -> None:
        from torchvision.transforms import v2

        self.geometric = v2.RandomAffine(
            degrees=rotation_deg,
            translate=(translate, translate),
            scale=(scale_min, 1.0 / scale_min**0.5),
        )
        self.jitter = v2.ColorJitter(brightness=brightness, contrast=contrast)
        self.gamma = gamma
        self.blur = v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=blur_prob)
        self.hflip = v2.RandomHorizontalFlip(p=0.5 if hflip else 0.0)

    def __call__(self, batch: Any, generator: Any = None) -> Any:
        import torch

        out = torch.empty_like(batch)
        for i in range(batch.shape[0]):
            x = self.hflip(self.geometric(batch[i]))
            x = self.jitter(x)
            if self.gamma > 0:
                g = float(torch.empty(()).uniform_(1 - self.gamma, 1 + self.gamma))
                x = x.clamp(0, 1).pow(g)
            out[i] = self.blur(x).clamp(0, 1)
        return out
