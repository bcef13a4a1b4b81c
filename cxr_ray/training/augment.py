"""Training-time augmentation: random geometry and intensity on the preprocessing output.

The train transform sits beside the recipe (as torchvision's references keep ``presets.py``
beside ``train.py``); the eval transform is the scoring contract in
``cxr_ray.imaging.preprocess``. Horizontal flips are off by default: the heart sits on the
patient's left, and a flipped chest is not a realistic input.

The texture step (``texture_prob``) is there for the images a model meets after training: an
archive's full-resolution originals, resized by the scoring path, do not have the fine texture
of training images that some other tool once resized and stored. Measured on the 479 Kermany
originals against their own 224 px copies (radial power spectrum, scoring path with the
storage-form re-encode): 0.92-0.94 of the copies' power at 20-60 cycles per image and
1.15-1.23 at 60-112. Each image gets random gains on two frequency bands (fine detail, above
a Gaussian of sigma 0.7 px; mid detail, between sigma 0.7 and 2 px), independent so that
either direction of either band is seen, then, at ``jpeg_prob``, a JPEG round trip at a random
quality. See docs/MONITORING.md ("Full-resolution originals").
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
        texture_prob: float = 0.0,
        texture_fine: float = 0.6,
        texture_mid: float = 0.3,
        jpeg_prob: float = 0.0,
        jpeg_quality_min: int = 50,
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
        self.texture_prob = texture_prob
        self.texture_fine = texture_fine
        self.texture_mid = texture_mid
        self.jpeg_prob = jpeg_prob
        self.jpeg_quality_min = jpeg_quality_min

    def __call__(self, batch: Any, generator: Any = None) -> Any:
        import torch

        out = torch.empty_like(batch)
        for i in range(batch.shape[0]):
            x = self.hflip(self.geometric(batch[i]))
            x = self.jitter(x)
            if self.gamma > 0:
                g = float(torch.empty(()).uniform_(1 - self.gamma, 1 + self.gamma))
                x = x.clamp(0, 1).pow(g)
            x = self.texture(x)
            out[i] = self.blur(x).clamp(0, 1)
        return out

    def texture(self, x: Any) -> Any:
        """Random fine/mid band gains, then maybe a JPEG round trip (``[1, H, W]`` in 0..1)."""
        import numpy as np
        import torch
        from PIL import Image
        from torchvision.transforms.v2.functional import gaussian_blur

        from cxr_ray.imaging.storage_form import render

        if self.texture_prob > 0 and float(torch.rand(())) < self.texture_prob:
            fine = float(torch.empty(()).uniform_(-0.5, 1.0)) * self.texture_fine
            mid = float(torch.empty(()).uniform_(-1.0, 1.0)) * self.texture_mid
            b1 = gaussian_blur(x, [5, 5], [0.7, 0.7])
            b2 = gaussian_blur(x, [9, 9], [2.0, 2.0])
            x = (x + fine * (x - b1) + mid * (b1 - b2)).clamp(0, 1)
        if self.jpeg_prob > 0 and float(torch.rand(())) < self.jpeg_prob:
            quality = int(torch.randint(self.jpeg_quality_min, 96, ()))
            u8 = (x[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            back = np.asarray(render(Image.fromarray(u8, mode="L"), quality), dtype=np.float32)
            x = torch.from_numpy(back / np.float32(255.0))[None].to(x.dtype)
        return x
