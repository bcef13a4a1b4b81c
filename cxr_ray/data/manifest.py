"""Manifests: one row per file of a source, with identity, label, geometry and status.

``image_id`` is the SHA-256 of the file's bytes, so the same image has the same id in a
folder, a tar, a zip or a Parquet table, and renamed copies are recognised. A row has
``status="ok"`` only if the image was fully decoded; otherwise ``status="error"`` and
``error`` says why.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray import labels as labels_mod
from cxr_ray.config import DataSettings, DicomwebSettings
from cxr_ray.data import dicomweb as dicomweb_mod
from cxr_ray.data.sources import ImageRef, ReadOptions, ReadUnit, chunk_refs, list_source, units_from_uris
from cxr_ray.errors import DataError, DecodeError, error_code, row_text, safe_row_error
from cxr_ray.imaging.preprocess import PreprocessSpec, decode
from cxr_ray.io import uris
from cxr_ray.io.columns import described
from cxr_ray.vocabulary import Status

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("image_id", pa.string()),
        pa.field("label", pa.string()),
        pa.field("patient_id", pa.string()),
        pa.field("format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("bytes", pa.int64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("error_code", pa.string()),  # version 2
    ]
)
#: ``cxr-ray manifest`` output: one row per listed image, each column described.
MANIFEST_SCHEMA = described(
    MANIFEST_SCHEMA,
    {
        "uri": "where the image is: path, s3:// URI, archive member, table row or dicomweb:// instance",
        "image_id": "SHA-256 of the file bytes (null if unreadable)",
        "label": "ground truth parsed from the file name or folder, when known",
        "patient_id": "patient id parsed from the file name, when known",
        "format": "the image format the decoder found in the bytes (not the file extension)",
        "width": ("decoded image width", "pixels"),
        "height": ("decoded image height", "pixels"),
        "bytes": ("file size", "bytes"),
        "status": "ok, or error (unreadable, undecodable)",
        "error": "what was wrong (null when ok): `<error_code>: <detail>`, never a path, name or UID",
        "error_code": "the reason code of an error row (docs/OUTPUTS.md, Reason codes; null when ok)",
    },
    table="manifest",
    version=2,
)

#: Schema metadata key: the source roots a manifest's URIs were listed under (JSON list).
ROOTS_KEY = b"cxr_ray.roots"

#: Decoding for validation only: a small draft size keeps the manifest fast.
_CHECK_SIZE = 64


def read_options(settings: DataSettings, dicomweb: DicomwebSettings | None = None) -> ReadOptions:
    return ReadOptions(
        bytes_column=settings.bytes_column,
        name_column=settings.name_column,
        rows_per_block=settings.rows_per_block,
        dicomweb=dicomweb,
    )


def identify(name: str | None, uri: str) -> labels_mod.LabelInfo:
    """Label and patient from the entry's name (or its URI when it has none)."""
    return labels_mod.parse_kermany_path(name or uri)


def inspect_block(batch: pa.Table, *, max_pixels: int) -> pa.Table:
    """Raw rows (``sources.RAW_SCHEMA``) -> manifest rows."""
    spec = PreprocessSpec(height=_CHECK_SIZE, width=_CHECK_SIZE, max_pixels=max_pixels)
    cols: dict[str, list[Any]] = {f.name: [] for f in MANIFEST_SCHEMA}
    for row in batch.to_pylist():
        data: bytes | None = row["data"]
        info = identify(row["name"], row["uri"])
        fmt = width = height = image_id = None
        error = safe_row_error(row["error"])
        if data is not None:
            image_id = hashlib.sha256(data).hexdigest()
            try:
                d = decode(data, spec, row["name"])
                fmt, width, height = d.format, d.width, d.height
            except DecodeError as exc:
                error = row_text(exc)
        values = {
            "uri": row["uri"],
            "image_id": image_id,
            "label": info.label,
            "patient_id": info.patient_id,
            "format": fmt,
            "width": width,
            "height": height,
            "bytes": None if data is None else len(data),
            "status": Status.ERROR.value if error else Status.OK.value,
            "error": error,
            "error_code": error_code(error),
        }
        for k, v in values.items():
            cols[k].append(v)
    return pa.Table.from_pydict(cols, schema=MANIFEST_SCHEMA)


def image_dataset(units: list[ReadUnit], options: ReadOptions, *, read_cpus: float = 1.0) -> Any:
    """A Ray Dataset of raw image rows for ``units`` (Ray must be initialised).

    ``read_cpus``: CPUs per read task. Give it the decode stage's share so Ray fuses read and
    decode into one task: unfused, a read task still asks for its default full CPU, which a
    node whose actors hold all but a fraction can never grant (the run then waits forever).
    """
    import ray.data

    from cxr_ray.data.datasource import ImageDatasource

    # One block stream per unit, as listed: Ray's default (at least 200 blocks) would split
    # the reads further, and a split read cannot be fused with the decode stage after it.
    return ray.data.read_datasource(
        ImageDatasource(units, options),
        override_num_blocks=max(1, len(units)),
        num_cpus=read_cpus,
    )


def is_manifest(source: str) -> bool:
    """Whether ``source`` is a cxr-ray manifest or split table (a list of URIs, no bytes)."""
    if not source.endswith((".parquet", ".pq")):
        return False
    import pyarrow.parquet as pq

    from cxr_ray.io import uris

    try:
        fs, path = uris.resolve(source)
        with fs.open_input_file(path) as f:
            names = set(pq.ParquetFile(f).schema_arrow.names)
    except Exception:
        return False
    return {"uri", "image_id", "status"} <= names


def source_dataset(
    source: str,
    settings: DataSettings,
    dicomweb: DicomwebSettings | None = None,
    *,
    read_cpus: float = 1.0,
) -> Any:
    """Raw image rows of every entry of ``source`` (or of the URIs a manifest lists).

    ``dicomweb``: filters, credentials and retries for ``dicomweb://`` sources (and manifests
    listing DICOMweb instances); ``None`` uses the defaults (no filter, no authentication).
    """
    if is_manifest(source):
        table = read_manifest(source)
        columns = [c for c in ("uri", "label") if c in table.column_names]
        return uri_dataset(table.select(columns), settings, dicomweb, read_cpus=read_cpus)
    options = read_options(settings, dicomweb)
    units = source_units(source, options)
    logger.info("listed %s: %d read units", source, len(units))
    return image_dataset(units, options, read_cpus=read_cpus)


def source_units(source: str, options: ReadOptions) -> list[ReadUnit]:
    """Read units of ``source``: a PACS (``dicomweb://``) or what ``sources`` lists."""
    if dicomweb_mod.is_dicomweb(source):
        return dicomweb_mod.list_units(source, options)
    if source.lower().startswith("dicom://"):  # a DIMSE PACS (C-FIND, C-GET / C-MOVE)
        from cxr_ray.data import dimse

        return dimse.list_units(source, options)
    return list_source(source, options)


def uri_units(
    items: Iterable[tuple[str, str | None, str | None]],
    rows_per_block: int,
    *,
    roots: tuple[str, ...] | None = None,
    dicomweb: DicomwebSettings | None = None,
) -> list[ReadUnit]:
    """Read units for known ``(uri, name, label)``: DICOMweb instances and everything else.

    Every URI is checked before any unit exists (``uris.check_listed_uri``): a scheme cxr-ray
    does not read, a relative path, or (with ``roots``) a location outside them becomes an
    error row that no reader opens; DICOMweb rows must name a service in
    ``dicomweb.endpoints``.
    """
    items = list(items)
    pacs = [it for it in items if dicomweb_mod.is_dicomweb(it[0])]
    rest, refused = [], []
    for it in items:
        if dicomweb_mod.is_dicomweb(it[0]):
            continue
        problem = uris.check_listed_uri(it[0], roots)
        if problem is None:
            rest.append(it)
        else:
            refused.append((ImageRef(it[0], it[1] or "refused", error=problem, label=it[2]), 0))
    endpoints = dicomweb_mod.configured_endpoints(dicomweb)
    return (
        chunk_refs(refused, rows_per_block)
        + units_from_uris(rest, rows_per_block)
        + dicomweb_mod.units_for_uris(pacs, rows_per_block, endpoints)
    )


def allowed_roots(table: pa.Table, settings: DataSettings) -> tuple[str, ...] | None:
    """Where a manifest-like table's URIs may point: ``data.allowed_roots`` when set, else the
    roots ``read_manifest`` recorded (the manifest's folder and its listed sources), else
    ``None`` (a table cxr-ray built itself from a listing: no root restriction)."""
    if settings.allowed_roots:
        return tuple(settings.allowed_roots)
    raw = (table.schema.metadata or {}).get(ROOTS_KEY)
    return tuple(json.loads(raw)) if raw else None


def uri_dataset(
    table: pa.Table,
    settings: DataSettings,
    dicomweb: DicomwebSettings | None = None,
    *,
    read_cpus: float = 1.0,
) -> Any:
    """Raw image rows for the ``uri`` column of a manifest-like table (labels carried along)."""
    options = read_options(settings, dicomweb)
    none = [None] * table.num_rows
    names = table.column("name").to_pylist() if "name" in table.column_names else none
    labels = table.column("label").to_pylist() if "label" in table.column_names else none
    items = zip(table.column("uri").to_pylist(), names, labels, strict=True)
    units = uri_units(items, options.rows_per_block, roots=allowed_roots(table, settings), dicomweb=dicomweb)
    return image_dataset(units, options, read_cpus=read_cpus)


def iter_manifest(
    source: str, settings: DataSettings, dicomweb: DicomwebSettings | None = None
) -> Iterator[pa.Table]:
    """Stream manifest blocks for ``source`` in listing order."""
    ds = source_dataset(source, settings, dicomweb)
    # Deterministic manifests (same source, same file) are worth the small cost.
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(
        inspect_block,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"max_pixels": settings.max_pixels},
    )
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


@dataclass
class ManifestSummary:
    path: str
    rows: int = 0
    status: collections.Counter[str] = field(default_factory=collections.Counter)
    labels: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, block: pa.Table) -> None:
        self.rows += block.num_rows
        self.status.update(block.column("status").to_pylist())
        ok = block.filter(pc.equal(block.column("status"), Status.OK))
        self.labels.update(str(v) for v in ok.column("label").to_pylist())


def manifest_schema_for(source: str) -> pa.Schema:
    """``MANIFEST_SCHEMA`` recording ``source`` as the root its rows may point into (the
    default of ``allowed_roots``); a DICOMweb source records none (its endpoint is checked)."""
    if dicomweb_mod.is_dicomweb(source):
        return MANIFEST_SCHEMA
    fs, path = uris.resolve(source)
    root = json.dumps([uris.display(path, fs, source)]).encode()
    meta = dict(MANIFEST_SCHEMA.metadata or {}) | {ROOTS_KEY: root}
    return MANIFEST_SCHEMA.with_metadata(meta)


def write_manifest(
    source: str, out: str, settings: DataSettings, dicomweb: DicomwebSettings | None = None
) -> ManifestSummary:
    """Write the manifest of ``source`` to ``out`` (atomically) and count what is in it."""
    from cxr_ray.io.storage import atomic_parquet_writer

    summary = ManifestSummary(out)
    with atomic_parquet_writer(out, manifest_schema_for(source)) as writer:
        for block in iter_manifest(source, settings, dicomweb):
            writer.write_table(block)
            summary.add(block)
    return summary


def read_manifest(uri: str) -> pa.Table:
    """Read a manifest and check it has the columns cxr-ray needs."""
    from cxr_ray.io.storage import read_table

    try:
        table = read_table(uri)
    except FileNotFoundError:
        raise DataError(f"manifest {uri!r} does not exist; create it with `cxr-ray manifest`") from None
    missing = {"uri", "image_id", "label", "patient_id", "status"} - set(table.column_names)
    if missing:
        raise DataError(f"{uri!r} is not a cxr-ray manifest: missing columns {sorted(missing)}")
    # The roots its rows may point to travel with the table (``allowed_roots``): the sources
    # ``write_manifest`` listed and the manifest's own folder.
    meta = dict(table.schema.metadata or {})
    recorded = json.loads(meta.get(ROOTS_KEY, b"[]"))
    fs, path = uris.resolve(uri)
    own = uris.display(posixpath.dirname(path), fs, uri)
    meta[ROOTS_KEY] = json.dumps([*recorded, own]).encode()
    return table.replace_schema_metadata(meta)
