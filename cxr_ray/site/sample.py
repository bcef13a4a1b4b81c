"""The labelled sample of ``cxr-ray calibrate``: read, labelled, deduplicated and decoded.

A folder or archive with labels in the names or folders (Kermany layout), a manifest
(``uri``, ``label``, optionally ``patient_id``), or a scoring run (its ``predictions.parquet``)
joined with the review worklist's labels CSV (``cxr_ray.vocabulary.REVIEW_CSV_COLUMNS``;
``not_assessable`` rows are excluded and counted). Images are read with the same readers as
scoring (local, s3://, archives, DICOMweb instances) on the driver, without Ray: a site sample
is 50-200 images. Patient ids stay in memory (grouped folds and bootstrap); nothing here logs
a name, a URI or a patient.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from cxr_ray.config import Settings
from cxr_ray.data import manifest as manifest_mod
from cxr_ray.data.readers import read_unit
from cxr_ray.errors import DataError, DecodeError
from cxr_ray.imaging.preprocess import PreprocessSpec, decode
from cxr_ray.io import storage
from cxr_ray.labels import LABELS
from cxr_ray.models.card import ModelCard, spec_for
from cxr_ray.vocabulary import NOT_ASSESSABLE, REVIEW_CSV_COLUMNS, Status

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """The usable labelled images of a site sample (patient ids stay in memory only)."""

    image_ids: list[str]
    labels: np.ndarray  # int64 class indices
    pixels: np.ndarray  # uint8 [n, H, W]
    #: Patient of each image (for grouped folds and bootstrap), ``None`` when unknown.
    groups: np.ndarray | None
    kind: str
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def per_class(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(LABELS))
        return {name: int(c) for name, c in zip(LABELS, counts, strict=True)}

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the sorted ``image_id:label`` lines (no names, no patients)."""
        lines = sorted(f"{i}:{LABELS[y]}" for i, y in zip(self.image_ids, self.labels, strict=True))
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_labels_csv(uri: str) -> tuple[dict[str, str], int]:
    """``image_id -> label`` from a review worklist export, and how many not-assessable rows."""
    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"labels CSV {uri!r} does not exist") from None
    except UnicodeDecodeError:
        raise DataError(f"labels CSV {uri!r} is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = {"image_id", "label"} - set(reader.fieldnames or ())
    if missing:
        raise DataError(
            f"labels CSV {uri!r} lacks the columns {sorted(missing)} (expected a header "
            f"{','.join(REVIEW_CSV_COLUMNS)}, as the HTML report's review worklist exports)"
        )
    labels: dict[str, str] = {}
    skipped = 0
    for line, row in enumerate(reader, start=2):
        image_id, label = (row.get("image_id") or "").strip(), (row.get("label") or "").strip().lower()
        if not image_id and not label:
            continue
        if label == NOT_ASSESSABLE:
            skipped += 1
            continue
        if label not in LABELS:
            raise DataError(
                f"labels CSV {uri!r} line {line}: label {label!r} is not one of "
                f"{', '.join(LABELS)} or {NOT_ASSESSABLE}"
            )
        if labels.get(image_id, label) != label:
            raise DataError(f"labels CSV {uri!r} gives image {image_id[:12]}... two different labels")
        labels[image_id] = label
    return labels, skipped


@dataclass
class _Record:
    uri: str
    name: str | None
    label: str | None
    patient: str | None
    image_id: str | None = None


def _predictions_path(source: str) -> str | None:
    """The predictions table of a scoring run folder or file, else ``None``."""
    if not source.endswith((".parquet", ".pq")):
        candidate = storage.join(source, "predictions.parquet")
        return candidate if storage.exists(candidate) else None
    return source if _columns(source) >= {"uri", "image_id", "prob_normal", "model_version"} else None


def _columns(uri: str) -> set[str]:
    import pyarrow.parquet as pq

    from cxr_ray.io import uris

    try:
        fs, path = uris.resolve(uri)
        with fs.open_input_file(path) as f:
            return set(pq.ParquetFile(f).schema_arrow.names)
    except Exception:
        return set()


def _table_records(uri: str, kind: str) -> list[_Record]:
    table = storage.read_table(uri)
    if "status" in table.column_names and kind == "manifest":
        table = table.filter(pc.fill_null(pc.equal(table["status"], Status.OK.value), False))
    cols = table.column_names
    none = [None] * table.num_rows

    def col(name: str) -> list[Any]:
        return table.column(name).to_pylist() if name in cols else none

    return [
        _Record(u, n, lab, p, i)
        for u, n, lab, p, i in zip(
            col("uri"), col("name"), col("label"), col("patient_id"), col("image_id"), strict=True
        )
    ]


def _count_check(labels: list[int], min_size: int, min_per_class: int, when: str) -> None:
    counts = np.bincount(np.asarray(labels, np.int64), minlength=len(LABELS))
    shown = ", ".join(f"{name} {int(c)}" for name, c in zip(LABELS, counts, strict=True))
    if len(labels) < min_size:
        raise DataError(
            f"the site sample has {len(labels)} usable labelled images{when} ({shown}); calibrating "
            f"needs at least {min_size} (--min-size): label more images"
        )
    short = [name for name, c in zip(LABELS, counts, strict=True) if c < min_per_class]
    if short:
        raise DataError(
            f"the site sample has too few images of {', '.join(short)}{when} ({shown}); every "
            f"class needs at least {min_per_class} (--min-per-class)"
        )


def _source_kind(labelled: str, settings: Settings) -> tuple[str, list[_Record] | None]:
    """``predictions``, ``manifest`` (both with their records) or ``folder`` (listed later)."""
    predictions = _predictions_path(labelled)
    if predictions is not None:
        return "predictions", _table_records(predictions, "predictions")
    if (
        labelled.endswith((".parquet", ".pq"))
        and {"uri", "label"} <= _columns(labelled)
        and (settings.data.bytes_column not in _columns(labelled))
    ):
        return "manifest", _table_records(labelled, "manifest")
    return "folder", None  # a folder or an archive


def _labelled_records(
    records: list[_Record],
    csv_labels: dict[str, str] | None,
    kind: str,
    labelled: str,
    excluded: dict[str, int],
) -> list[_Record]:
    """A table's records with the CSV's labels joined, deduplicated, the unlabelled dropped."""
    if csv_labels is not None:
        by_id = {r.image_id: r for r in records if r.image_id}
        unknown = [i for i in csv_labels if i not in by_id]
        if unknown:
            raise DataError(
                f"{len(unknown)} image_id(s) of the labels CSV are not in {kind} {labelled!r} "
                f"(e.g. {unknown[0][:12]}...): export the labels from this run's report"
            )
        records = [by_id[i] for i in csv_labels]
        for r in records:
            r.label = csv_labels[r.image_id or ""]
    seen: set[str] = set()
    unique = []
    for r in records:
        key = r.image_id or r.uri
        if key in seen:
            excluded["duplicate"] = excluded.get("duplicate", 0) + 1
            continue
        seen.add(key)
        unique.append(r)
    unlabelled = sum(r.label not in LABELS for r in unique)
    if unlabelled:
        excluded["unlabelled"] = unlabelled
    return [r for r in unique if r.label in LABELS]


@dataclass
class _Decoded:
    ids: list[str] = field(default_factory=list)
    ys: list[int] = field(default_factory=list)
    patients: list[str | None] = field(default_factory=list)
    pixels: list[np.ndarray] = field(default_factory=list)


def _decode_rows(
    rows: Iterable[dict[str, Any]],
    spec: PreprocessSpec,
    by_uri: dict[str, _Record] | None,
    csv_labels: dict[str, str] | None,
    excluded: dict[str, int],
) -> _Decoded:
    """Label (from the records, the CSV or the names), deduplicate and decode the read rows."""
    out = _Decoded()
    seen: set[str] = set()

    def drop(reason: str) -> None:
        excluded[reason] = excluded.get(reason, 0) + 1

    for row in rows:
        data = row["data"]
        if data is None:
            drop("unreadable")
            continue
        image_id = hashlib.sha256(data).hexdigest()
        if by_uri is not None:
            rec = by_uri[row["uri"]]
            if rec.image_id and rec.image_id != image_id:
                drop("changed_since_scoring")
                continue
            label, patient = rec.label, rec.patient
        else:
            info = manifest_mod.identify(row["name"], row["uri"])
            label = csv_labels.get(image_id) if csv_labels is not None else info.label
            patient = info.patient_id
        if label not in LABELS:
            drop("unlabelled")
            continue
        if image_id in seen:
            drop("duplicate")
            continue
        try:
            out.pixels.append(decode(data, spec, row["name"]).pixels)
        except DecodeError:
            drop("undecodable")
            continue
        seen.add(image_id)
        out.ids.append(image_id)
        out.ys.append(LABELS.index(label or ""))
        out.patients.append(patient)
    return out


def load_sample(
    labelled: str,
    card: ModelCard,
    settings: Settings,
    *,
    labels_csv: str | None = None,
    min_size: int | None = None,
    min_per_class: int | None = None,
) -> Sample:
    """Read, label and decode the site sample; refuse one too small or lacking a class
    (``min_size`` / ``min_per_class``: default ``settings.calibrate``'s).

    Counts are checked before any image is read where the labels are known up front (names,
    manifests, a labels CSV joined with predictions), and again after dropping unreadable,
    undecodable and duplicate images.
    """
    min_size = settings.calibrate.min_size if min_size is None else min_size
    min_per_class = settings.calibrate.min_per_class if min_per_class is None else min_per_class
    options = manifest_mod.read_options(settings.data, settings.dicomweb)
    csv_labels, not_assessable = read_labels_csv(labels_csv) if labels_csv else (None, 0)
    excluded: dict[str, int] = {NOT_ASSESSABLE: not_assessable} if labels_csv else {}
    kind, records = _source_kind(labelled, settings)
    if kind != "folder" and not storage.exists(labelled):
        raise DataError(f"site sample {labelled!r} does not exist")
    by_uri: dict[str, _Record] | None = None
    if records is not None:
        records = _labelled_records(records, csv_labels, kind, labelled, excluded)
        _count_check([LABELS.index(r.label or "") for r in records], min_size, min_per_class, "")
        units = manifest_mod.uri_units(
            [(r.uri, r.name, r.label) for r in records],
            options.rows_per_block,
            roots=tuple(settings.data.allowed_roots) or None,  # data.allowed_roots, when set
            dicomweb=settings.dicomweb,
        )
        by_uri = {r.uri: r for r in records}
    else:
        try:
            units = manifest_mod.source_units(labelled, options)
        except FileNotFoundError:
            raise DataError(f"site sample {labelled!r} does not exist") from None
        if csv_labels is None:
            names = [
                manifest_mod.identify(ref.name, ref.uri).label
                for u in units
                for ref in u.refs
                if not ref.error
            ]
            _count_check(
                [LABELS.index(v) for v in names if v in LABELS], min_size, min_per_class, " (from the names)"
            )
    rows = (row for unit in units for block in read_unit(unit, options) for row in block.to_pylist())
    got = _decode_rows(rows, spec_for(card, settings.data), by_uri, csv_labels, excluded)
    if csv_labels is not None and records is None:
        unknown = [i for i in csv_labels if i not in set(got.ids)]
        if unknown:
            raise DataError(
                f"{len(unknown)} image_id(s) of the labels CSV are not images of {labelled!r} "
                f"(e.g. {unknown[0][:12]}...)"
            )
    return _finish(got, card, kind, excluded, min_size, min_per_class)


def _finish(
    got: _Decoded, card: ModelCard, kind: str, excluded: dict[str, int], min_size: int, min_per_class: int
) -> Sample:
    bad = excluded.get("unreadable", 0) + excluded.get("undecodable", 0)
    when = f" after dropping {bad} unreadable or undecodable image(s)" if bad else ""
    _count_check(got.ys, min_size, min_per_class, when)
    if bad:
        logger.warning("site sample: %d unreadable or undecodable image(s) left out", bad)
    groups = None
    if any(p is not None for p in got.patients):
        groups = np.array(
            [p if p is not None else f"image:{i}" for p, i in zip(got.patients, got.ids, strict=True)]
        )
    h, w = card.input_size
    return Sample(
        got.ids,
        np.asarray(got.ys, np.int64),
        np.stack(got.pixels) if got.pixels else np.zeros((0, h, w), np.uint8),
        groups,
        kind,
        excluded,
    )
