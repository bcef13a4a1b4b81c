"""Reading the bytes of listed entries, a Ray read task's work (see ``sources`` for listing).

Each reader yields ``(uri, name, data, error)`` per entry; ``read_unit`` packs them into
Arrow blocks of at most ``rows_per_block`` rows. When a container breaks mid-way (a
truncated tar, a corrupt zip), every entry not yet produced becomes an error row.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cxr_ray.data.sources import RAW_SCHEMA, ReadOptions, ReadUnit, list_tar, member_ref, tar_problem
from cxr_ray.errors import row_error
from cxr_ray.io import uris
from cxr_ray.vocabulary import ErrorCode

#: Parquet read buffer: column chunks are read in pieces this size, not whole (memory).
_BUFFER = 1 << 20


def _open_parquet(f: Any) -> pq.ParquetFile:
    """A Parquet file read page by page as batches need them: no pre-buffering (which reads
    every wanted column chunk of a row group first), 1 MiB reads."""
    return pq.ParquetFile(f, pre_buffer=False, buffer_size=_BUFFER)


def _batches(pf: pq.ParquetFile, row_group: int, want: list[str], options: ReadOptions) -> Iterator:
    """``rows_per_block``-row batches of one row group's ``want`` columns, one thread (a
    thread per column would decode the next pages ahead). Peak memory is the block plus the
    file's largest page (a page is Parquet's smallest unit: see ``sources.parquet_layout``)."""
    return pf.iter_batches(
        batch_size=options.rows_per_block, row_groups=[row_group], columns=want, use_threads=False
    )


class _Rows:
    """Accumulates rows and emits Arrow blocks of a bounded number of rows."""

    def __init__(self, rows_per_block: int) -> None:
        self.rows_per_block = rows_per_block
        self.cols: dict[str, list[Any]] = {f.name: [] for f in RAW_SCHEMA}

    def add(
        self, uri: str, name: str | None, data: bytes | None, error: str | None, label: str | None
    ) -> None:
        self.cols["uri"].append(uri)
        self.cols["name"].append(name)
        self.cols["data"].append(data)
        self.cols["error"].append(error)
        self.cols["label"].append(label)

    def full(self) -> bool:
        return len(self.cols["uri"]) >= self.rows_per_block

    def take(self) -> pa.Table:
        table = pa.Table.from_pydict(self.cols, schema=RAW_SCHEMA)
        self.cols = {k: [] for k in self.cols}
        return table

    def __len__(self) -> int:
        return len(self.cols["uri"])


def read_unit(unit: ReadUnit, options: ReadOptions) -> Iterator[pa.Table]:
    """Read the bytes of every entry of ``unit``; yields blocks of ``RAW_SCHEMA`` rows."""
    rows = _Rows(options.rows_per_block)
    done: set[str] = set()
    known = {r.uri: r.label for r in unit.refs if r.label is not None}
    try:
        for uri, name, data, error in _READERS[unit.kind](unit, options):
            rows.add(uri, name, data, error, known.get(uri))
            done.add(uri)
            if rows.full():
                yield rows.take()
    except Exception as exc:
        # The container itself broke mid-way (truncated tar, bad zip): every entry not yet
        # produced becomes an error row so no image is silently lost. The exception's text
        # can quote the container's path or a member name: only its type is kept.
        reason = row_error(
            ErrorCode.UNREADABLE_CONTAINER, f"cannot read the {unit.kind} source ({type(exc).__name__})"
        )
        for ref in unit.refs:
            if ref.uri not in done:
                rows.add(ref.uri, ref.name, None, reason, ref.label)
        if unit.kind == "parquet" and unit.container is not None:
            # A row group's rows are known by index: one error row for each one not produced.
            for i in range(unit.first_row, unit.first_row + unit.num_rows):
                uri = uris.member_uri(unit.container, str(i))
                if uri not in done:
                    rows.add(uri, None, None, reason, None)
        elif not unit.refs:
            rows.add(unit.container or "?", None, None, reason, None)
    if len(rows):
        yield rows.take()


def _too_big(size: int, options: ReadOptions) -> str | None:
    if size > options.max_file_bytes:
        return row_error(
            ErrorCode.TOO_BIG, f"file is {size} bytes, over the {options.max_file_bytes}-byte limit"
        )
    return None


def _os_reason(exc: BaseException) -> str:
    """An I/O failure without the path pyarrow and the OS put in their messages."""
    if isinstance(exc, FileNotFoundError):
        return row_error(ErrorCode.NOT_FOUND, "file not found")
    if isinstance(exc, PermissionError):
        return row_error(ErrorCode.UNREADABLE_FILE, "permission denied")
    strerror = getattr(exc, "strerror", None)
    return row_error(ErrorCode.UNREADABLE_FILE, f"cannot read file ({strerror or type(exc).__name__})")


def _read_files(unit: ReadUnit, options: ReadOptions) -> Iterator[tuple]:
    for ref in unit.refs:
        if ref.error:
            yield ref.uri, ref.name, None, ref.error
            continue
        try:
            fs, path = uris.resolve(ref.uri)
            with fs.open_input_file(path) as f:
                problem = _too_big(f.size(), options)
                data = None if problem else f.read()
            yield ref.uri, ref.name, data, problem
        except Exception as exc:
            yield ref.uri, ref.name, None, _os_reason(exc)


def _read_zip(unit: ReadUnit, options: ReadOptions) -> Iterator[tuple]:
    assert unit.container is not None
    fs, path = uris.resolve(unit.container)
    with fs.open_input_file(path) as f, zipfile.ZipFile(f) as zf:
        for ref in unit.refs:
            if ref.error:
                yield ref.uri, ref.name, None, ref.error
                continue
            member = uris.split_uri(ref.uri).member or ""
            try:
                info = zf.getinfo(member)
                problem = _too_big(info.file_size, options)
                yield ref.uri, ref.name, None if problem else zf.read(info), problem
            except KeyError:
                yield (
                    ref.uri,
                    ref.name,
                    None,
                    row_error(ErrorCode.NOT_FOUND, "member not found in the zip archive"),
                )
            except Exception as exc:
                yield (
                    ref.uri,
                    ref.name,
                    None,
                    row_error(ErrorCode.UNREADABLE_MEMBER, f"cannot read zip member ({type(exc).__name__})"),
                )


def _read_tar(unit: ReadUnit, options: ReadOptions) -> Iterator[tuple]:
    assert unit.container is not None
    fs, path = uris.resolve(unit.container)
    spans: dict[str, tuple[int, int]] | None = None
    with fs.open_input_file(path) as f:
        for ref in unit.refs:
            if ref.error:
                yield ref.uri, ref.name, None, ref.error
                continue
            span = ref.tar_span
            if span is None:
                if spans is None:
                    spans = {
                        r.uri: r.tar_span
                        for r in list_tar(fs, path, unit.container)
                        if r.tar_span is not None
                    }
                span = spans.get(ref.uri)
            if span is None:
                yield (
                    ref.uri,
                    ref.name,
                    None,
                    row_error(ErrorCode.NOT_FOUND, "member not found in the tar archive"),
                )
                continue
            problem = _too_big(span[1], options)
            if problem:
                yield ref.uri, ref.name, None, problem
                continue
            f.seek(span[0])
            data = f.read(span[1])
            if len(data) != span[1]:
                yield (
                    ref.uri,
                    ref.name,
                    None,
                    row_error(ErrorCode.TRUNCATED, "tar archive is truncated inside this member"),
                )
            else:
                yield ref.uri, ref.name, data, None


def _read_tar_stream(unit: ReadUnit, options: ReadOptions) -> Iterator[tuple]:
    assert unit.container is not None
    fs, path = uris.resolve(unit.container)
    with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        for m in tf:
            if m.isdir():
                continue
            ref = member_ref(unit.container, m.name, tar_problem(m))
            if ref.error:
                yield ref.uri, ref.name, None, ref.error
                continue
            problem = _too_big(m.size, options)
            if problem:
                yield ref.uri, ref.name, None, problem
                continue
            fobj = tf.extractfile(m)
            yield (
                ref.uri,
                ref.name,
                fobj.read() if fobj else None,
                None if fobj else row_error(ErrorCode.UNREADABLE_MEMBER, "no data in the member"),
            )


def _read_parquet(unit: ReadUnit, options: ReadOptions) -> Iterator[tuple]:
    """One row group, streamed ``rows_per_block`` rows at a time (``iter_batches``): a big
    single-row-group file never sits in memory whole."""
    assert unit.container is not None and unit.row_group is not None
    fs, path = uris.resolve(unit.container)
    with fs.open_input_file(path) as f:
        pf = _open_parquet(f)
        start = sum(pf.metadata.row_group(i).num_rows for i in range(unit.row_group))
        names = set(pf.schema_arrow.names)
        want = [c for c in (options.bytes_column, options.name_column) if c and c in names]
        if options.bytes_column not in names:  # nothing to read: one error row per table row
            n = pf.metadata.row_group(unit.row_group).num_rows
            yield from _parquet_rows(unit.container, start, pa.table({"_": pa.nulls(n)}), names, options)
            return
        for batch in _batches(pf, unit.row_group, want, options):
            table = pa.Table.from_batches([batch])
            yield from _parquet_rows(unit.container, start, table, names, options)
            start += table.num_rows


def _parquet_rows(
    container: str, start: int, table: pa.Table, names: set[str], options: ReadOptions
) -> Iterator[tuple]:
    """One ``(uri, name, data, error)`` per table row, whatever the column types (never raises)."""
    col = options.bytes_column
    missing = None
    if col not in names:
        missing = row_error(
            ErrorCode.NO_COLUMN,
            f"Parquet source has no {col} column (it has {len(names)} columns); set data.bytes_column",
        )
    data_col = table.column(col).to_pylist() if missing is None else [None] * table.num_rows
    name_col = (
        table.column(options.name_column).to_pylist()
        if options.name_column and options.name_column in table.column_names
        else [None] * table.num_rows
    )
    for i, (data, name) in enumerate(zip(data_col, name_col, strict=True)):
        uri = uris.member_uri(container, str(start + i))
        name = name if isinstance(name, str) else None
        if missing:
            yield uri, name, None, missing
        elif data is None:
            yield uri, name, None, row_error(ErrorCode.NULL_BYTES, "null in bytes column")
        elif not isinstance(data, bytes | bytearray | memoryview):
            yield (
                uri,
                name,
                None,
                row_error(
                    ErrorCode.WRONG_TYPE, f"the bytes column holds {type(data).__name__}, not image bytes"
                ),
            )
        else:
            problem = _too_big(len(data), options)
            yield uri, name, None if problem else bytes(data), problem


def _read_members(unit: ReadUnit, options: ReadOptions) -> Iterator[tuple]:
    """Entries of a Parquet table or a compressed tar, looked up by URI (manifest re-reads)."""
    assert unit.container is not None
    kind = uris.container_kind(unit.container)
    wanted = {uris.split_uri(r.uri).member or r.uri: r for r in unit.refs}
    found: set[str] = set()
    if kind == "parquet":
        fs, path = uris.resolve(unit.container)
        with fs.open_input_file(path) as f:
            pf = _open_parquet(f)
            names = set(pf.schema_arrow.names)
            want = [c for c in (options.bytes_column, options.name_column) if c and c in names]
            start = 0
            for i in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(i).num_rows
                if any(start <= int(m) < start + n for m in wanted if m and m.isdigit()):
                    first = start
                    for batch in _batches(pf, i, want, options):
                        table = pa.Table.from_batches([batch])
                        for row in _parquet_rows(unit.container, first, table, names, options):
                            member = uris.split_uri(row[0]).member or row[0]
                            if member in wanted:
                                found.add(member)
                                yield row[0], wanted[member].name, row[2], row[3]
                        first += table.num_rows
                start += n
    else:
        stream = ReadUnit("tar-stream", unit.container)
        for row in _read_tar_stream(stream, options):
            member = uris.split_uri(row[0]).member or row[0]
            if member in wanted:
                found.add(member)
                yield row[0], wanted[member].name, row[2], row[3]
    for member, ref in wanted.items():
        if member not in found:
            yield ref.uri, ref.name, None, row_error(ErrorCode.NOT_FOUND, "entry not found in its container")


def _read_dicomweb(unit: ReadUnit, options: ReadOptions) -> Iterator[tuple]:
    from cxr_ray.data.dicomweb_wado import read_instances

    return read_instances(unit, options)


def _read_dimse(unit: ReadUnit, options: ReadOptions) -> Iterator[tuple]:
    from cxr_ray.data.dimse import read_instances

    return read_instances(unit, options)


_READERS = {
    "dicomweb": _read_dicomweb,
    "dimse": _read_dimse,
    "files": _read_files,
    "zip": _read_zip,
    "tar": _read_tar,
    "tar-stream": _read_tar_stream,
    "parquet": _read_parquet,
    "members": _read_members,
}
