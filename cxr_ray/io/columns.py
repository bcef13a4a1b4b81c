"""Output tables that describe themselves: column descriptions and units as Arrow field
metadata, a table name and schema version as schema metadata.

Parquet keeps both (pyarrow stores the Arrow schema in the file); Delta Lake keeps the field
metadata in the table's schema and ``cxr_ray.io.tables.ensure_table`` copies the schema-level
keys into the table's configuration. Read them back with any Arrow reader::

    schema = pq.read_schema("predictions.parquet")
    schema.field("patient_age_years").metadata  # {b"description": b"PatientAge ...", b"unit": b"years"}
    schema.metadata[b"cxr_ray.schema_version"]   # b"1"
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa

DESCRIPTION = b"description"
UNIT = b"unit"
#: Schema-level keys: which cxr-ray table this is, and the version of its schema.
TABLE = b"cxr_ray.table"
SCHEMA_VERSION = b"cxr_ray.schema_version"

#: A column's documentation: its description, or (description, unit).
Doc = str | tuple[str, str]


def column(name: str, typ: pa.DataType, doc: Doc, *, nullable: bool = True) -> pa.Field:
    """A field carrying its description (and unit)."""
    return pa.field(name, typ, nullable=nullable, metadata=_metadata(doc))


def described(schema: pa.Schema, docs: Mapping[str, Doc], *, table: str, version: int) -> pa.Schema:
    """``schema`` with ``docs`` as its fields' metadata (fields already described keep theirs
    unless ``docs`` names them) and the table name and schema version as schema metadata.

    A doc naming no column is a programming error (a renamed column): ``KeyError``.
    """
    unknown = set(docs) - set(schema.names)
    if unknown:
        raise KeyError(f"descriptions of columns the {table} schema does not have: {sorted(unknown)}")
    fields = [f.with_metadata(_metadata(docs[f.name])) if f.name in docs else f for f in schema]
    meta = {TABLE: table.encode(), SCHEMA_VERSION: str(version).encode()}
    return pa.schema(fields, metadata=meta)


def description(f: pa.Field) -> str | None:
    raw = (f.metadata or {}).get(DESCRIPTION)
    return raw.decode() if raw else None


def unit(f: pa.Field) -> str | None:
    raw = (f.metadata or {}).get(UNIT)
    return raw.decode() if raw else None


def undescribed(schema: pa.Schema) -> list[str]:
    """Columns of ``schema`` without a description."""
    return [f.name for f in schema if not description(f)]


def table_properties(schema: pa.Schema) -> dict[str, str]:
    """The schema-level cxr-ray keys as strings (a Delta table's configuration)."""
    meta = schema.metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k in (TABLE, SCHEMA_VERSION)}


def _metadata(doc: Doc) -> dict[bytes, bytes]:
    text, u = (doc, None) if isinstance(doc, str) else doc
    return {DESCRIPTION: text.encode()} | ({UNIT: u.encode()} if u else {})
