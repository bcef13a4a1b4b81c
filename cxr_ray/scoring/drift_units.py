"""The units the drift tests count: patients (or studies), whose images are not independent.

Images of one patient are not independent (follow-ups, several views of one chest, one
scanner's day): a two-sample test that takes every image as an independent observation sees
more evidence than there is. Measured on the default artifact's 745 validation images (413
patients, one with 30 images): the patient-halves null (reference from one half of the
patients, run from the other half's images) false-alarmed in 0.085-0.16 of trials at n = 300
when every image counted (``benchmarks/drift_error_rates.py``, docs/MONITORING.md). Taking
one image per patient instead is not right either: a run that is a sample of images holds
many-image patients more often than the reference does (which holds every validation
patient once), and those patients differ (pneumonia has follow-ups): 0.095 at n = 100.

So the tests compare the **image-level** distributions, with **cluster-robust** variances
(``drift_stats.cluster_wald``: sandwich covariance over units, on both sides). The units:

- a run row's unit is its ``patient_id`` (the DICOM PatientID, or the patient parsed from the
  file name), else its ``study_instance_uid``, else the image itself (``image_id``, else its
  ``uri``): a run of files with no patient key has one unit per image;
- a reference row's unit is the ``patient_id`` of its ``split.parquet`` validation row (the
  rows ``build_reference`` read, in order), else the row itself (``reference_units``).

``UnitSample`` keeps a run's units in bounded memory: the ``size`` units with the smallest
keyed 64-bit hash of their key (a uniform random sample of the run's units, a bottom-k
sketch, the same whatever order Ray delivers the blocks in), each with the **sums** of its
images' test vectors and its image counts. Keys are hashed on arrival and never kept: no
patient identifier is held, written or logged. Effect sizes (KS, PSI, mean shifts) are on
every image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from cxr_ray.models.artifact import Artifact
    from cxr_ray.models.reference import DriftReference

__all__ = ["UNIT_COLUMNS", "UnitSample", "group_sums", "reference_units", "row_units"]

#: Run columns that name a row's unit, in order of preference (the image itself last).
UNIT_COLUMNS: tuple[str, ...] = ("patient_id", "study_instance_uid", "image_id", "uri")
_SALT = b"cxr-ray drift units v1"


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    """A keyed 64-bit hash (BLAKE2b) of each key, ``uint64 [n]``."""
    digests = (hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8, key=_SALT) for k in keys)
    return np.frombuffer(b"".join(d.digest() for d in digests), dtype="<u8").copy()


def row_units(block: pa.Table, idx: np.ndarray, offset: int = 0) -> list[str]:
    """The unit key of the rows ``idx`` of a predictor output block: the first non-empty
    ``UNIT_COLUMNS`` value, kind-prefixed (a patient never collides with an image), else
    ``row:N`` with N = ``offset`` + its place (``offset``: the rows added before, so such keys
    never repeat)."""
    cols = {c: block[c].to_pylist() for c in UNIT_COLUMNS if c in block.column_names}
    return [
        next((f"{c}:{cols[c][i]}" for c in UNIT_COLUMNS if c in cols and cols[c][i]), f"row:{offset + j}")
        for j, i in enumerate(idx)
    ]


def _sum_by(hashes: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """(distinct hashes ascending, the sum of ``rows`` and of ``counts`` per hash)."""
    uniq, inverse = np.unique(hashes, return_inverse=True)
    sums = np.zeros((len(uniq), rows.shape[1]))
    np.add.at(sums, inverse, rows)
    cnt = np.zeros((len(uniq), counts.shape[1]))
    np.add.at(cnt, inverse, counts)
    return uniq, sums, cnt


def group_sums(units: Sequence[str], rows: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct unit of ``units``: the sum of its ``rows`` and of its ``counts``
    (``[u, width]``, ``[u, groups]``; units in ascending hash order)."""
    _, sums, cnt = _sum_by(key_hashes(list(units)), rows, counts)
    return sums, cnt


def reference_units(art: Artifact, ref: DriftReference) -> list[str] | None:
    """The unit (patient) of each drift-reference row: the ``patient_id`` of the artifact's
    ``split.parquet`` validation rows, in order, when they match the reference one to one;
    ``None`` when they cannot be matched (a subsample, unreadable images, no split file, no
    patient column): the reference rows then count as independent."""
    from cxr_ray.models.reference import validation_column

    patients = validation_column(art, ref, "patient_id")
    if patients is None:
        return None
    return [f"patient_id:{p}" if p else f"row:{i}" for i, p in enumerate(patients)]


class UnitSample:
    """A bounded, order-independent uniform sample of a run's units, with per-unit sums.

    ``add(units, rows, counts)``: every image's unit key, its test vector (``float64 [n,
    width]``, zeros where a group of values is missing) and its per-group counts (``[n,
    groups]``, 1 where the group's values are there). Kept: the ``size`` units with the
    smallest keyed hash, each with the sums of all its images' vectors and counts (a unit in
    the final sample was never left out, so none of its images was). ``images`` counts every
    image added; ``sampled`` says whether a unit was left out."""

    def __init__(self, size: int, width: int, groups: int) -> None:
        self.size = size
        self.unit = np.zeros(0, np.uint64)
        self.sums = np.zeros((0, width))
        self.counts = np.zeros((0, groups))
        self.images = 0
        self.sampled = False

    @property
    def n(self) -> int:
        """Units held (all the run's units while there are at most ``size``)."""
        return len(self.unit)

    @property
    def full(self) -> bool:
        return self.n >= self.size

    def add(self, units: Sequence[str], rows: np.ndarray, counts: np.ndarray) -> None:
        if len(units) == 0:
            return
        self.images += len(units)
        u = key_hashes(units)
        rows, counts = np.asarray(rows, np.float64), np.asarray(counts, np.float64)
        if self.full:  # a unit beyond the kept ones cannot enter: skip it early
            keep = u <= self.unit[-1]
            self.sampled = self.sampled or not keep.all()
            u, rows, counts = u[keep], rows[keep], counts[keep]
            if len(u) == 0:
                return
        uniq, sums, cnt = _sum_by(
            np.concatenate([self.unit, u]),
            np.concatenate([self.sums, rows]),
            np.concatenate([self.counts, counts]),
        )
        self.sampled = self.sampled or len(uniq) > self.size
        self.unit, self.sums, self.counts = uniq[: self.size], sums[: self.size], cnt[: self.size]

    def nbytes(self) -> int:
        return int(self.unit.nbytes + self.sums.nbytes + self.counts.nbytes)
