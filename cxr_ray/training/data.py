"""Training inputs: manifest -> patient-grouped split -> decoded Ray Datasets.

Images are decoded and resized once by the shared preprocessing (``cxr_ray.imaging.preprocess``)
into ``{"pixels": uint8 [H, W], "label": int64}`` rows. With ``cache_decoded`` the decoded
rows stay in the Ray object store across epochs (the 5,216 Kermany images take ~260 MB at
224 px); otherwise every epoch streams from the source again (for datasets beyond memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray import labels as labels_mod
from cxr_ray.config import Settings
from cxr_ray.data import manifest as manifest_mod
from cxr_ray.data.splits import data_fingerprint, split_manifest
from cxr_ray.errors import DataError, DecodeError
from cxr_ray.imaging.preprocess import PreprocessSpec, decode
from cxr_ray.models.card import spec_for
from cxr_ray.vocabulary import Status

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    table: pa.Table  # manifest rows with a "split" column
    train: Any  # ray.data.Dataset
    val: Any
    class_counts: list[int]  # training images per class, LABELS order
    fingerprint: str

    def split_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for row in self.table.select(["split", "label"]).to_pylist():
            out.setdefault(row["split"], {}).setdefault(row["label"], 0)
            out[row["split"]][row["label"]] += 1
        return out


def decode_for_training(batch: pa.Table, *, spec: PreprocessSpec) -> dict[str, np.ndarray]:
    """Raw rows -> decoded pixels and class indices; undecodable rows get label -1."""
    pixels = np.zeros((batch.num_rows, spec.height, spec.width), np.uint8)
    labels = np.full(batch.num_rows, -1, np.int64)
    for i, row in enumerate(batch.to_pylist()):
        label = row["label"] or manifest_mod.identify(row["name"], row["uri"]).label
        if row["error"] is not None or row["data"] is None or label is None:
            continue
        try:
            pixels[i] = decode(row["data"], spec, row["name"]).pixels
        except DecodeError:
            continue
        labels[i] = labels_mod.label_index(label)
    return {"pixels": pixels, "label": labels}


def load_split_table(source: str, settings: Settings) -> pa.Table:
    """A split table from a split/manifest Parquet file or from any image source."""
    if source.endswith((".parquet", ".pq")):
        try:
            table = manifest_mod.read_manifest(source)
        except DataError:
            table = None  # a Parquet table of image bytes, not a manifest
        if table is not None:
            if "split" in table.column_names:
                return table
            return split_manifest(
                table, val_fraction=settings.data.val_fraction, seed=settings.data.split_seed
            )
    rows = []
    for block in manifest_mod.iter_manifest(source, settings.data):
        rows.append(block)
    if not rows:
        raise DataError(f"no images found in {source!r}")
    table = pa.concat_tables(rows)
    bad = int(pc.sum(pc.not_equal(table["status"], Status.OK)).as_py() or 0)
    if bad:
        logger.warning("%d of %d files in %s are unusable and are left out", bad, table.num_rows, source)
    return split_manifest(table, val_fraction=settings.data.val_fraction, seed=settings.data.split_seed)


def oversample(table: pa.Table, seed: int) -> pa.Table:
    """Repeat rows of the rarer classes until every class matches the largest one."""
    labels = np.array(table.column("label").to_pylist())
    rng = np.random.default_rng(seed)
    target = max(int(np.sum(labels == c)) for c in set(labels.tolist()))
    idx: list[int] = []
    for c in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == c)
        extra = rng.choice(rows, size=max(0, target - len(rows)), replace=True)
        idx.extend(rows.tolist() + extra.tolist())
    return table.take(sorted(idx))


def prepare(source: str, settings: Settings) -> TrainingData:
    """Split ``source`` by patient and build the decoded train/val Ray Datasets."""
    from ray.data.expressions import col  # Ray stays out of this module's import

    table = load_split_table(source, settings)
    spec = spec_for(settings.model, settings.data)
    parts = {}
    for name in ("train", "val"):
        part = table.filter(pc.equal(table["split"], name))
        if part.num_rows == 0:
            raise DataError(f"the {name} split is empty")
        if name == "train" and settings.train.imbalance == "oversample":
            part = oversample(part, settings.train.seed)
        ds = (
            manifest_mod.uri_dataset(part.select(["uri", "label"]), settings.data)
            .map_batches(
                decode_for_training,
                batch_format="pyarrow",
                batch_size=None,
                fn_kwargs={"spec": spec},
            )
            .filter(expr=col("label") >= 0)  # undecodable images were marked label -1
        )
        if settings.train.cache_decoded:
            ds = ds.materialize()
            lost = part.num_rows - ds.count()
            if lost:  # the manifest said ok, but the file changed or vanished since
                logger.warning("%d %s images could not be decoded now and are left out", lost, name)
        parts[name] = ds
    train_table = table.filter(pc.equal(table["split"], "train"))
    train_labels = train_table.column("label").to_pylist()
    counts = [train_labels.count(label) for label in labels_mod.LABELS]
    return TrainingData(table, parts["train"], parts["val"], counts, data_fingerprint(train_table))
