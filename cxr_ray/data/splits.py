"""Deterministic, patient-grouped, class-stratified train/validation splits.

Several images of one patient in both splits would let a model be graded on patients it has
seen, inflating validation accuracy; so every image of a patient (and every copy of an
image, by ``image_id``) lands in the same split. Images without a patient id form their own
groups. The split uses scikit-learn's ``StratifiedGroupKFold`` and takes one fold as the
validation set, so ``val_fraction`` is rounded to ``1/k`` (0.15 -> 1/7).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.errors import DataError
from cxr_ray.vocabulary import Status

SPLIT_FIELD = pa.field("split", pa.string(), nullable=False)


def _groups(table: pa.Table) -> np.ndarray:
    """Group key per row: the patient id, else the image id (copies of one image stay together)."""
    patients = table.column("patient_id").to_pylist()
    images = table.column("image_id").to_pylist()
    # Union patients that share an image (the same bytes filed under two patients).
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p, i in zip(patients, images, strict=True):
        a, b = find(f"img:{i}"), find(f"pat:{p}" if p else f"img:{i}")
        if a != b:
            parent[a] = b
    return np.array([find(f"pat:{p}" if p else f"img:{i}") for p, i in zip(patients, images, strict=True)])


def split_manifest(table: pa.Table, *, val_fraction: float = 0.15, seed: int = 0) -> pa.Table:
    """Labelled ok rows of a manifest with a ``split`` column (``train``/``val``).

    Deterministic for a given manifest content and seed, whatever the row order.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    ok = table.filter(pc.and_(pc.equal(table["status"], Status.OK), pc.is_valid(table["label"])))
    if ok.num_rows == 0:
        raise DataError("no labelled images with status 'ok' to split")
    ok = ok.sort_by([("image_id", "ascending"), ("uri", "ascending")])
    labels = np.array(ok.column("label").to_pylist())
    groups = _groups(ok)
    n_splits = max(2, round(1.0 / val_fraction))
    if len(set(groups)) < n_splits:
        raise DataError(f"only {len(set(groups))} patients: too few for a {n_splits}-fold split")
    # Any int seed (negative, huge) maps into the 32-bit range numpy accepts.
    digest = hashlib.sha256(f"{seed}".encode()).digest()
    rng_seed = int.from_bytes(digest[:4], "little")
    smallest = min(int(np.sum(np.asarray(labels) == c)) for c in set(labels))
    if smallest < n_splits:
        raise DataError(
            f"the rarest class has only {smallest} images: too few for a patient-grouped "
            f"{n_splits}-fold split (data.val_fraction = {val_fraction}); give at least {n_splits} "
            "labelled images of every class, or raise data.val_fraction"
        )
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=rng_seed)
    _, val_idx = next(iter(sgkf.split(np.zeros(len(labels)), labels, groups)))
    split = np.full(len(labels), "train", dtype=object)
    split[val_idx] = "val"
    return ok.append_column(SPLIT_FIELD, pa.array(split.tolist(), pa.string()))


def data_fingerprint(table: pa.Table) -> str:
    """SHA-256 over the sorted (image_id, label) pairs: identifies a training set's content."""
    pairs = sorted(zip(table.column("image_id").to_pylist(), table.column("label").to_pylist(), strict=True))
    h = hashlib.sha256()
    for image_id, label in pairs:
        h.update(f"{image_id}:{label}\n".encode())
    return h.hexdigest()
