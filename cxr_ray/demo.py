"""The end-to-end demo behind ``make demo`` / ``cxr-ray demo``: local Ray, local files, CPU.

Uses the real Kermany images in ``data_dir`` when given, else writes a synthetic sample in
the Kermany layout (plus a few broken files, to show they become error rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cxr_ray.config import Settings
from cxr_ray.data.manifest import ManifestSummary, write_manifest

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    source: Path
    manifest: ManifestSummary


def sample_source(out: Path, per_class: int = 40) -> Path:
    """A synthetic labelled folder with two broken files among the images."""
    from cxr_ray.synthetic import write_kermany_folder

    root = write_kermany_folder(out / "sample", per_class=per_class)
    (root / "train" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"")
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root


def run_demo(out: Path, settings: Settings, data_dir: Path | None = None) -> DemoResult:
    out.mkdir(parents=True, exist_ok=True)
    source = data_dir if data_dir is not None else sample_source(out)
    summary = write_manifest(str(source), str(out / "manifest.parquet"), settings.data)
    return DemoResult(source, summary)
