"""Build classification networks for chest X-rays; the only place that knows the backbones.

``create_model(arch, pretrained=...)`` returns a ``CxrNet``: the backbone with a 3-class head,
wrapped so that it takes the preprocessing contract's ``float32 [N, 1, H, W]`` in 0..1 and
does channel replication and mean/std normalisation itself (so ONNX/TensorRT exports carry
them and every engine gets the same input). Pretrained weights are only ever read from local
files (``cxr_ray.models.weights``); this module never touches the network.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cxr_ray.errors import ModelError
from cxr_ray.labels import LABELS
from cxr_ray.models import efficientnet_lite
from cxr_ray.models import weights as weights_mod
from cxr_ray.vocabulary import ARCHITECTURES

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CxrNet(nn.Module):
    """Backbone + normalisation: ``float32 [N, 1, H, W]`` in 0..1 -> logits ``[N, classes]``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1)
        return self.backbone((x - self.mean) / self.std)


class LogitsAndFeatures(nn.Module):
    """``x -> (logits [N, classes], features [N, F])``: raw logits and the penultimate-layer
    features (the input of the final linear layer). What scoring engines export and run;
    calibration (``ModelCard.probabilities``) is applied to the logits outside the graph, and
    the features feed drift summaries. Shares the wrapped network's parameters."""

    def __init__(self, net: CxrNet) -> None:
        super().__init__()
        self.net = net
        holder, attr = _final_linear(net.backbone)
        self._holder, self._attr = holder, attr

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        linear = self._holder.get_submodule(self._attr)
        feats: list[torch.Tensor] = []
        handle = linear.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0]))
        try:
            logits = self.net(x)
        finally:
            handle.remove()
        return logits, feats[0].flatten(1)


def _final_linear(backbone: nn.Module) -> tuple[nn.Module, str]:
    """(module holding the last ``nn.Linear``, its attribute name or index)."""
    last: tuple[nn.Module, str] | None = None
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            last = (backbone.get_submodule(parent_name) if parent_name else backbone, attr)
    if last is None:
        raise ValueError("the backbone has no linear classifier layer")
    return last


@dataclass(frozen=True)
class Backbone:
    build: Callable[[], nn.Module]
    head: Callable[[nn.Module], tuple[nn.Module, str]]  # (module holding the head, attribute)
    blocks: Callable[[nn.Module], list[nn.Module]]  # feature blocks, input to output
    target_layer: Callable[[nn.Module], str]  # Grad-CAM layer, relative to the backbone
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    load: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None


def _tv(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None)

    return build


def _sub(m: nn.Module, name: str) -> nn.Module:
    return m.get_submodule(name)


def _classifier_last(m: nn.Module) -> tuple[nn.Module, str]:
    seq = _sub(m, "classifier")
    return seq, str(len(list(seq.children())) - 1)


def _features(m: nn.Module) -> list[nn.Module]:
    return list(_sub(m, "features").children())


def _last_feature(m: nn.Module) -> str:
    return f"features.{len(_features(m)) - 1}"


def _resnet_blocks(m: nn.Module) -> list[nn.Module]:
    stem = nn.ModuleList([_sub(m, "conv1"), _sub(m, "bn1")])
    return [stem, *(_sub(m, f"layer{i}") for i in range(1, 5))]


_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _load_densenet(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    # The published DenseNet checkpoint predates the module names (norm.1 -> norm1).
    fixed = {}
    for key, value in state.items():
        m = _DENSENET_KEY.match(key)
        fixed[m.group(1) + m.group(2) if m else key] = value
    model.load_state_dict(fixed)


def _load_lite(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    efficientnet_lite.load_lite_weights(model, state, include_classifier=True)


def _build_lite() -> nn.Module:
    return efficientnet_lite.efficientnet_lite0(num_classes=1000)


BACKBONES: dict[str, Backbone] = {
    "mobilenet_v2": Backbone(_tv("mobilenet_v2"), _classifier_last, _features, _last_feature),
    "efficientnet_lite0": Backbone(
        _build_lite,
        _classifier_last,
        _features,
        _last_feature,
        # TF-Lite "inception" scaling, (pixel - 127) / 128, which these weights were trained with.
        mean=efficientnet_lite.INPUT_MEAN,
        std=efficientnet_lite.INPUT_STD,
        load=_load_lite,
    ),
    "resnet18": Backbone(_tv("resnet18"), lambda m: (m, "fc"), _resnet_blocks, lambda m: "layer4"),
    "resnet50": Backbone(_tv("resnet50"), lambda m: (m, "fc"), _resnet_blocks, lambda m: "layer4"),
    "densenet121": Backbone(
        _tv("densenet121"),
        lambda m: (m, "classifier"),
        _features,
        lambda m: "features.norm5",
        load=_load_densenet,
    ),
    "efficientnet_b0": Backbone(_tv("efficientnet_b0"), _classifier_last, _features, _last_feature),
    "convnext_tiny": Backbone(_tv("convnext_tiny"), _classifier_last, _features, _last_feature),
}
assert set(BACKBONES) == set(ARCHITECTURES), "vocabulary.ARCHITECTURES and BACKBONES disagree"


def backbone_spec(arch: str) -> Backbone:
    try:
        return BACKBONES[arch]
    except KeyError:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {', '.join(BACKBONES)}") from None


def load_state_file(path: Any) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` file, refusing anything but tensors (``weights_only``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for pickled code, RuntimeError for junk
        raise ModelError(
            f"refusing to load {path}: not a plain tensor state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state dict")
    return state


def create_model(
    arch: str,
    *,
    num_classes: int = len(LABELS),
    pretrained: bool = True,
    weights_dir: str | None = None,
) -> CxrNet:
    """A ``CxrNet`` for ``arch``; ImageNet-pretrained from a local file when ``pretrained``.

    >>> net = create_model("mobilenet_v2", pretrained=False)
    >>> net(torch.zeros(2, 1, 224, 224)).shape
    torch.Size([2, 3])
    """
    spec = backbone_spec(arch)
    backbone = spec.build()
    if pretrained:
        path = weights_mod.find_weights(arch, weights_dir)
        state = load_state_file(path)
        try:
            (spec.load or (lambda m, s: m.load_state_dict(s)))(backbone, state)
        except (RuntimeError, ModelError) as exc:
            raise ModelError(f"weights in {path} do not fit {arch}: {exc}") from None
        logger.info("loaded ImageNet weights for %s from %s", arch, path)
    holder, attr = spec.head(backbone)
    old = _sub(holder, attr)
    if not isinstance(old, nn.Linear):
        raise ModelError(f"{arch}: expected a Linear head at {attr!r}, found {type(old).__name__}")
    # Works for Sequential indices ("1") and attributes ("fc") alike.
    setattr(holder, attr, nn.Linear(old.in_features, num_classes))
    return CxrNet(backbone, spec.mean, spec.std)


def head_parameters(net: CxrNet, arch: str) -> list[nn.Parameter]:
    holder, attr = backbone_spec(arch).head(net.backbone)
    return list(_sub(holder, attr).parameters())


def feature_blocks(net: CxrNet, arch: str) -> list[nn.Module]:
    return backbone_spec(arch).blocks(net.backbone)


def target_layer_name(arch: str) -> str:
    """Grad-CAM target layer of ``arch`` as a dotted name inside ``CxrNet``."""
    spec = backbone_spec(arch)
    return "backbone." + spec.target_layer(spec.build())
