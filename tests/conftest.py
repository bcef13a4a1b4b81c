"""Shared fixtures: a real local Ray, the real Kermany data when present, generated images."""

from __future__ import annotations

import os
from pathlib import Path

# Must be set before Ray starts; tests never phone home.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pytest

from tests import imaging

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KERMANY224 = DATA_ROOT / "kermany224"
KERMANY_FULLRES = DATA_ROOT / "kermany-fullres"


def _need(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real Kermany data not found at {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def kermany224() -> Path:
    return _need(KERMANY224)


@pytest.fixture(scope="session")
def kermany_fullres() -> Path:
    return _need(KERMANY_FULLRES)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (2 CPUs, like the CI machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def xray_folder(tmp_path: Path) -> Path:
    """A small labelled folder in the Kermany layout (generated images, 3 classes)."""
    return imaging.kermany_folder(tmp_path / "xrays", per_class=4)


@pytest.fixture(scope="session")
def kermany_manifest(kermany224, ray_local, tmp_path_factory):
    """The manifest of the real 224 px train split (built once per session)."""
    from cxr_ray.config import DataSettings
    from cxr_ray.data.manifest import read_manifest, write_manifest

    out = tmp_path_factory.mktemp("manifest") / "kermany224.parquet"
    write_manifest(str(kermany224), str(out), DataSettings())
    return read_manifest(str(out))


def make_artifact(
    out: Path,
    *,
    input_size: int = 64,
    arch: str = "mobilenet_v2",
    seed: int = 0,
    intensity: str = "none",
    threshold: float = 0.5,
) -> Path:
    """A model artifact with a random 3-class head (ImageNet backbone when available offline)."""
    import torch

    from cxr_ray.errors import WeightsUnavailableError
    from cxr_ray.models.artifact import card_for, save_artifact
    from cxr_ray.models.factory import create_model

    torch.manual_seed(seed)
    try:
        net = create_model(arch, pretrained=True)
    except WeightsUnavailableError:
        net = create_model(arch, pretrained=False)
    thresholds = {"pneumonia": threshold}
    card = card_for(net, arch, input_size=input_size, intensity=intensity, thresholds=thresholds)
    save_artifact(net, card, str(out))
    return out


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("artifact") / "model", input_size=64)


@pytest.fixture(scope="session")
def artifact_224(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("artifact224") / "model", input_size=224)
