"""The units the drift tests count: one image per patient (or study), on both sides.

Images of one patient are not independent (follow-ups, several views of one chest, one
scanner's day): every two-sample test of ``cxr_ray.scoring.drift`` assumes independent rows,
and a few many-image patients on one side move the means by more than that allows. Measured
on the default artifact's 745 validation images (413 patients, one with 30 images): the
patient-halves null (reference from one half of the patients, run from the other's images)
false-alarmed in 0.085 of trials at n = 100 and 0.22 at n = 300 when every image counted
(``benchmarks/drift_error_rates.py``, docs/MONITORING.md). So the tests count **units**:

- a run row's unit is its ``patient_id`` (the DICOM PatientID, or the patient parsed from the
  file name), else its ``study_instance_uid``, else the image itself (``image_id``, else its
  ``uri``): a run of files with no patient key is what it was before, one unit per image;
- a reference row's unit is the ``patient_id`` of its ``split.parquet`` validation row (the
  rows ``build_reference`` read, in order), else the row itself (``reference_units``);
- each unit is represented by **one** image, the one whose key has the smallest keyed hash:
  a fixed pseudo-random choice, the same whatever order Ray delivers the blocks in.

``UnitSample`` keeps a run's units in bounded memory: the ``size`` units with the smallest
keyed 64-bit hash of their key (a uniform random sample of the run's units, a bottom-k
sketch), each with its chosen image's row vector. Keys are hashed on arrival and never kept:
no patient identifier is held, written or logged. Effect sizes (KS, PSI, mean shifts) stay on
every image; only the tests' p-values use the units.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from cxr_ray.models.artifact import Artifact
    from cxr_ray.models.reference import DriftReference

__all__ = ["UNIT_COLUMNS", "UnitSample", "one_per_unit", "reference_units", "row_units"]

#: Run columns that name a row's unit, in order of preference (the image itself last).
UNIT_COLUMNS: tuple[str, ...] = ("patient_id", "study_instance_uid", "image_id", "uri")
_SALT = b"cxr-ray drift units v1"


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    """A keyed 64-bit hash (BLAKE2b) of each key, ``uint64 [n]``."""
    digests = (hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8, key=_SALT) for k in keys)
    return np.frombuffer(b"".join(d.digest() for d in digests), dtype="<u8").copy()


def row_units(block: pa.Table, idx: np.ndarray, offset: int = 0) -> tuple[list[str], list[str]]:
    """(unit key, image key) of the rows ``idx`` of a predictor output block: the first
    non-empty ``UNIT_COLUMNS`` value (kind-prefixed, so a patient never collides with an image)
    and the image's own key (``row:N``, N = ``offset`` + its place, for a block without
    ``image_id`` or ``uri``: ``offset`` is the rows added before, so such keys never repeat)."""
    cols = {c: block[c].to_pylist() for c in UNIT_COLUMNS if c in block.column_names}
    units, images = [], []
    for j, i in enumerate(idx):
        own = (f"{c}:{cols[c][i]}" for c in ("image_id", "uri") if c in cols and cols[c][i])
        image = next(own, f"row:{offset + j}")
        unit = next((f"{c}:{cols[c][i]}" for c in UNIT_COLUMNS if c in cols and cols[c][i]), image)
        units.append(unit)
        images.append(image)
    return units, images


def one_per_unit(units: Sequence[str]) -> np.ndarray:
    """Indices (ascending) of one row per distinct unit of ``units``: the row whose
    ``unit:index`` key hashes smallest (a fixed pseudo-random pick)."""
    if len(units) == 0:
        return np.zeros(0, np.int64)
    u = key_hashes(list(units))
    img = key_hashes([f"{k}:{i}" for i, k in enumerate(units)])
    order = np.lexsort((img, u))  # by unit, then by the image's hash
    first = np.unique(u[order], return_index=True)[1]
    return np.sort(order[first])


def reference_units(art: Artifact, ref: DriftReference) -> list[str] | None:
    """The unit (patient) of each drift-reference row: the ``patient_id`` of the artifact's
    ``split.parquet`` validation rows, in order, when they match the reference one to one;
    ``None`` when they cannot be matched (a subsample, unreadable images, no split file, no
    patient column): the reference rows then count as independent."""
    from cxr_ray.io import storage

    uri = storage.join(art.uri, "split.parquet")
    if ref.meta.get("unreadable") or not storage.exists(uri):
        return None
    split = storage.read_table(uri)
    if "patient_id" not in split.column_names:
        return None
    if "split" in split.column_names:
        split = split.filter(pc.equal(split["split"], "val"))
    patients = split["patient_id"].to_pylist()
    if len(patients) != ref.n:
        return None
    return [f"patient_id:{p}" if p else f"row:{i}" for i, p in enumerate(patients)]


class UnitSample:
    """A bounded, order-independent uniform sample of a run's units, one row vector each.

    ``add(units, images, rows)``: every row with its unit key, its image key and its vector
    (``float64 [n, width]``). Kept: the ``size`` units with the smallest keyed hash, each
    represented by its image with the smallest keyed hash. ``rows()``: their vectors
    (``[u, width]``, in hash order). ``images`` counts every row added."""

    def __init__(self, size: int, width: int) -> None:
        self.size = size
        self.unit = np.zeros(0, np.uint64)
        self.image = np.zeros(0, np.uint64)
        self.vec = np.zeros((0, width))
        self.images = 0
        self.sampled = False  # some unit was left out (the run has more than ``size``)

    @property
    def n(self) -> int:
        """Units held (all the run's units while there are at most ``size``)."""
        return len(self.unit)

    @property
    def full(self) -> bool:
        return self.n >= self.size

    def add(self, units: Sequence[str], images: Sequence[str], rows: np.ndarray) -> None:
        if len(units) == 0:
            return
        self.images += len(units)
        u, img = key_hashes(units), key_hashes(images)
        if self.full:  # a unit beyond the kept ones cannot enter: skip it early
            keep = u <= self.unit[-1]
            self.sampled = self.sampled or not keep.all()
            u, img, rows = u[keep], img[keep], rows[keep]
            if len(u) == 0:
                return
        u = np.concatenate([self.unit, u])
        img = np.concatenate([self.image, img])
        vec = np.concatenate([self.vec, np.asarray(rows, np.float64)])
        order = np.lexsort((img, u))
        first = order[np.unique(u[order], return_index=True)[1]]  # ascending unit hash
        self.sampled = self.sampled or len(first) > self.size
        first = first[: self.size]
        self.unit, self.image, self.vec = u[first], img[first], vec[first]

    def rows(self) -> np.ndarray:
        return self.vec

    def nbytes(self) -> int:
        return int(self.unit.nbytes + self.image.nbytes + self.vec.nbytes)
