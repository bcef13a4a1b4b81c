"""The end-to-end demo behind ``make demo`` / ``cxr-ray demo``: local Ray, local files, CPU.

1. manifest of the labelled source (real Kermany images when given, else a synthetic sample
   in the Kermany layout with two broken files, which come out as error rows);
2. a short Ray Train fine-tune (2 workers, a few hundred steps at most) into an artifact;
3. scoring of the patient-grouped validation images the model never trained on, with the
   default CPU engine, and the per-class metrics.

The demo trains for minutes, not for accuracy: the full recipe is ``cxr-ray train``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc

from cxr_ray.config import Settings, load_settings
from cxr_ray.data.manifest import ManifestSummary, write_manifest
from cxr_ray.io import storage
from cxr_ray.models.artifact import load_artifact
from cxr_ray.models.card import ModelCard
from cxr_ray.scoring.pipeline import score
from cxr_ray.scoring.result import ScoreResult

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    source: Path
    manifest: ManifestSummary
    card: ModelCard
    scored: ScoreResult


def sample_source(out: Path, per_class: int = 60) -> Path:
    """A synthetic labelled folder with two broken files among the images."""
    from cxr_ray.data.synthetic import write_kermany_folder

    root = write_kermany_folder(out / "sample", per_class=per_class)
    (root / "train" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"")
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root


def demo_settings(base: Settings, out: Path, real: bool) -> Settings:
    """A short recipe: a couple of epochs, capped steps, frozen early blocks."""
    train = {
        "epochs": 2,
        "max_steps_per_epoch": 40 if real else 12,
        "frozen_blocks": 7,
        "storage_path": str(out / "runs"),
        "run_name": "demo",
        "early_stopping_patience": 2,
    }
    model = {} if real else {"input_size": 128}
    dumped = base.model_dump(mode="json")
    dumped["train"].update(train)
    dumped["model"].update(model)
    dumped["score"]["cache_dir"] = str(out / "cache")
    return load_settings(None, dumped)


def run_demo(out: Path, settings: Settings, data_dir: Path | None = None) -> DemoResult:
    """Manifest, train, then score the validation images (with the CLI's progress line)."""
    from cxr_ray.cli.progress import Progress
    from cxr_ray.training.trainer import train

    out.mkdir(parents=True, exist_ok=True)
    source = data_dir if data_dir is not None else sample_source(out)
    s = demo_settings(settings, out, real=data_dir is not None)
    manifest_path = str(out / "manifest.parquet")
    summary = write_manifest(str(source), manifest_path, s.data)
    model_dir = str(out / "model")
    if storage.exists(str(out / "runs" / "demo")):  # a fresh run each time, not a resume
        import shutil

        shutil.rmtree(out / "runs" / "demo")
    card = train(s, manifest_path, model_dir)
    split = storage.read_table(storage.join(model_dir, "split.parquet"))
    val = split.filter(pc.equal(split["split"], "val"))
    storage.write_table(val, str(out / "val_manifest.parquet"))
    art = load_artifact(model_dir)
    with Progress("scoring") as progress:
        # overwrite: the demo folder is rewritten on every run.
        scored = score(
            str(out / "val_manifest.parquet"), art, str(out / "scores"), s, on_block=progress, overwrite=True
        )
    return DemoResult(Path(source), summary, card, scored)
