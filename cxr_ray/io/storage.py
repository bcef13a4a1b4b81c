"""Parquet output: explicit schemas, atomic commits, appendable history tables.

Readers never see a half-written file: tables are written to a hidden temporary name in the
destination folder and moved into place only after the writer closed cleanly (a rename on
local disks; a server-side copy on object stores, where a single object appears atomically).
Files are written with pyarrow defaults that pandas, polars, DuckDB, Spark and fastparquet
all read (Parquet 2.6, snappy, no extension types).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cxr_ray.io import uris


def _tmp_path(path: str) -> str:
    p = PurePosixPath(path)
    return str(p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:12]}"))


def ensure_dir(uri: str) -> None:
    fs, path = uris.resolve(uri)
    fs.create_dir(path, recursive=True)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    return "/".join([base.rstrip("/"), *parts])


def parent(uri: str) -> str:
    """The folder holding ``uri`` (keeps ``s3://`` schemes; ``.`` for a bare relative name)."""
    stripped = uri.rstrip("/")
    if "/" not in stripped:
        return "."
    head = stripped.rsplit("/", 1)[0]
    return head + "/" if head.endswith(":/") else head


def exists(uri: str) -> bool:
    fs, path = uris.resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@contextlib.contextmanager
def atomic_parquet_writer(uri: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A ``ParquetWriter`` whose file appears at ``uri`` only if the block exits cleanly."""
    fs, path = uris.resolve(uri)
    parent = str(PurePosixPath(path).parent)
    fs.create_dir(parent, recursive=True)
    tmp = _tmp_path(path)
    writer = pq.ParquetWriter(tmp, schema, filesystem=fs)
    try:
        yield writer
        writer.close()
    except BaseException:
        writer.close()
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        raise
    fs.move(tmp, path)


def write_table(table: pa.Table, uri: str, schema: pa.Schema | None = None) -> None:
    """Write ``table`` (cast to ``schema`` when given) atomically to ``uri``."""
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    with atomic_parquet_writer(uri, table.schema) as w:
        w.write_table(table)


def write_bytes(data: bytes, uri: str) -> None:
    """Write a small file atomically (JSON, PNG, Markdown)."""
    fs, path = uris.resolve(uri)
    fs.create_dir(str(PurePosixPath(path).parent), recursive=True)
    tmp = _tmp_path(path)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def read_bytes(uri: str) -> bytes:
    fs, path = uris.resolve(uri)
    with fs.open_input_stream(path) as f:
        return bytes(f.read())


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = uris.resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def append_table(table: pa.Table, uri: str) -> None:
    """Append rows to a history table, creating it on first use.

    The new rows are merged with the old ones and the whole file is replaced atomically, so
    a crash leaves either the old or the new history, never a corrupted one. History tables
    are small (a row per run per metric), so rewriting is cheap and keeps a single file that
    every reader understands.
    """
    if exists(uri):
        old = read_table(uri)
        table = pa.concat_tables([old, table.cast(old.schema)], promote_options="default")
    write_table(table, uri)
