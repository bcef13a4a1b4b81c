"""Find images in a source and read their bytes, as units a Ray read task can take.

A source is a directory tree (any depth, local or ``s3://``/``gs://``), a tar or zip
archive, a Parquet table with an image-bytes column, or a single image file. Archives found
inside a directory are opened too. Listing reads names and sizes only; bytes are read later,
inside Ray read tasks, a block at a time, so memory stays bounded however big the source is.

Nothing is ever extracted to disk. Entries that cannot be images we can read (non-UTF-8
names, symlinks leaving the root, unsafe archive member paths, files over the size limit)
are kept as rows with an ``error``: rows out always equals entries in.
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cxr_ray.data import uris
from cxr_ray.errors import DataError

logger = logging.getLogger(__name__)

#: Rows produced by reading: one per image entry, bytes or an error.
RAW_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("name", pa.string()),
        pa.field("data", pa.large_binary()),
        pa.field("error", pa.string()),
        # A label known before reading (from a manifest); listing leaves it null.
        pa.field("label", pa.string()),
    ]
)


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One entry of a source: where it is, its name for label parsing, or why it is unusable."""

    uri: str
    name: str
    error: str | None = None
    #: (offset, size) of a tar member's data, so readers seek instead of re-listing.
    tar_span: tuple[int, int] | None = None
    label: str | None = None


@dataclass(slots=True)
class ReadUnit:
    """Work for one read task: entries of one container (or plain files)."""

    kind: str  # files | zip | tar | tar-stream | parquet
    container: str | None = None
    refs: list[ImageRef] = field(default_factory=list)
    row_group: int | None = None
    num_rows: int = 0
    size_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ReadOptions:
    max_file_bytes: int = 512 * 1024 * 1024
    bytes_column: str = "image"
    name_column: str | None = "path"
    rows_per_block: int = 64


# ----------------------------------------------------------------------------- listing


def list_source(source: str, options: ReadOptions | None = None) -> list[ReadUnit]:
    """List every entry of ``source`` into read units of at most ``rows_per_block`` rows."""
    options = options or ReadOptions()
    fs, path = uris.resolve(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"source {source!r} does not exist")
    if info.type == pafs.FileType.Directory:
        files, errors = _walk(fs, path, source)
    else:
        files, errors = [(uris.display(path, fs, source), path, info.size or 0, path)], []
    units: list[ReadUnit] = []
    plain: list[tuple[ImageRef, int]] = [(ref, 0) for ref in errors]
    for shown, fs_path, size, rel in files:
        kind = uris.container_kind(fs_path)
        name = rel if info.type == pafs.FileType.Directory else Path(rel).name
        if kind is None:
            plain.append((ImageRef(shown, name), size))
            continue
        try:
            units.extend(_list_container(fs, fs_path, shown, kind, options))
        except Exception as exc:  # a broken archive is one error row, not a failed run
            plain.append((ImageRef(shown, name, error=f"cannot open {kind} archive: {exc}"), 0))
    units[:0] = _chunk_plain(plain, options.rows_per_block)
    return units


def units_from_uris(
    items: Iterable[tuple[str, str | None, str | None]], rows_per_block: int
) -> list[ReadUnit]:
    """Read units for known ``(uri, name, label)`` (e.g. from a manifest), grouped by container."""
    by_container: dict[tuple[str, str], list[ImageRef]] = {}
    plain: list[tuple[ImageRef, int]] = []
    for uri, name, label in items:
        split = uris.split_uri(uri)
        ref = ImageRef(uri, name or (split.member or uri), label=label)
        if split.member is None:
            plain.append((ref, 0))
        else:
            kind = uris.container_kind(split.container) or "files"
            by_container.setdefault((kind, split.container), []).append(ref)
    units = _chunk_plain(plain, rows_per_block)
    for (kind, container), refs in by_container.items():
        for i in range(0, len(refs), rows_per_block):
            chunk = refs[i : i + rows_per_block]
            # Parquet rows and stream tars are read by member lookup like any archive.
            unit_kind = "members" if kind in ("parquet", "tar-stream") else kind
            units.append(ReadUnit(unit_kind, container, chunk, num_rows=len(chunk)))
    return units


def _chunk_plain(plain: list[tuple[ImageRef, int]], rows: int) -> list[ReadUnit]:
    out = []
    for i in range(0, len(plain), rows):
        chunk = plain[i : i + rows]
        out.append(
            ReadUnit(
                "files",
                refs=[r for r, _ in chunk],
                num_rows=len(chunk),
                size_bytes=sum(s for _, s in chunk),
            )
        )
    return out


def _walk(
    fs: pafs.FileSystem, root: str, source: str
) -> tuple[list[tuple[str, str, int, str]], list[ImageRef]]:
    """(shown uri, fs path, size, relative name) of every file under ``root``; error refs."""
    files: list[tuple[str, str, int, str]] = []
    errors: list[ImageRef] = []
    if isinstance(fs, pafs.LocalFileSystem):
        # os.walk, not pyarrow: pyarrow cannot represent non-UTF-8 local names.
        real_root = os.path.realpath(root)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for fname in sorted(filenames):
                full = os.path.join(dirpath, fname)
                rel = os.path.relpath(full, root)
                shown = uris.printable(full)
                problem = uris.utf8_problem(full)
                if problem is None and os.path.islink(full):
                    target = os.path.realpath(full)
                    if os.path.commonpath([real_root, target]) != real_root:
                        problem = "symlink points outside the source root; refusing to follow it"
                if problem is None:
                    try:
                        st = os.stat(full)
                    except OSError as exc:
                        problem = f"cannot stat file: {exc.strerror}"
                    else:
                        if not stat.S_ISREG(st.st_mode):
                            problem = "not a regular file"
                if problem is not None:
                    errors.append(ImageRef(shown, uris.printable(rel), error=problem))
                else:
                    files.append((shown, full, st.st_size, rel))
        return files, errors
    selector = pafs.FileSelector(root, recursive=True)
    for info in sorted(fs.get_file_info(selector), key=lambda i: i.path):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) :].lstrip("/")
        files.append((uris.display(info.path, fs, source), info.path, info.size or 0, rel))
    return files, errors


def _list_container(
    fs: pafs.FileSystem, path: str, shown: str, kind: str, options: ReadOptions
) -> list[ReadUnit]:
    rows = options.rows_per_block
    if kind == "tar-stream":
        # Compressed tars cannot be seeked: one task streams the whole archive.
        info = fs.get_file_info(path)
        return [ReadUnit("tar-stream", shown, num_rows=0, size_bytes=info.size or 0)]
    if kind == "parquet":
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        return [
            ReadUnit(
                "parquet",
                shown,
                row_group=i,
                num_rows=meta.row_group(i).num_rows,
                size_bytes=meta.row_group(i).total_byte_size,
            )
            for i in range(meta.num_row_groups)
        ]
    refs = _list_zip(fs, path, shown) if kind == "zip" else _list_tar(fs, path, shown)
    return [
        ReadUnit(kind, shown, refs[i : i + rows], num_rows=len(refs[i : i + rows]))
        for i in range(0, len(refs), rows)
    ]


def _member_ref(container: str, member: str, problem: str | None, span=None) -> ImageRef:
    problem = problem or uris.unsafe_member_reason(member) or uris.utf8_problem(member)
    shown = uris.member_uri(container, uris.printable(member))
    return ImageRef(shown, uris.printable(member), error=problem, tar_span=span)


def _list_zip(fs: pafs.FileSystem, path: str, shown: str) -> list[ImageRef]:
    refs = []
    with fs.open_input_file(path) as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            mode = info.external_attr >> 16
            problem = "symlink member; refusing to follow it" if stat.S_ISLNK(mode) else None
            refs.append(_member_ref(shown, info.filename, problem))
    return refs


def _tar_problem(member: tarfile.TarInfo) -> str | None:
    if member.issym() or member.islnk():
        return f"link member (-> {member.linkname!r}); refusing to follow it"
    if not member.isfile():
        return "not a regular file member"
    return None


def _list_tar(fs: pafs.FileSystem, path: str, shown: str) -> list[ImageRef]:
    refs = []
    with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            if m.isdir():
                continue
            span = (m.offset_data, m.size) if m.isfile() else None
            refs.append(_member_ref(shown, m.name, _tar_problem(m), span))
    return refs


# ----------------------------------------------------------------------------- reading


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
        # produced becomes an error row so no image is silently lost.
        reason = f"cannot read {unit.kind} {unit.container or ''}: {exc}".replace("  ", " ")
        for ref in unit.refs:
            if ref.uri not in done:
                rows.add(ref.uri, ref.name, None, reason, ref.label)
        if not unit.refs:
            rows.add(unit.container or "?", None, None, reason, None)
    if len(rows):
        yield rows.take()


def _too_big(size: int, options: ReadOptions) -> str | None:
    if size > options.max_file_bytes:
        return f"file is {size} bytes, over the {options.max_file_bytes}-byte limit"
    return None


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
            yield ref.uri, ref.name, None, f"cannot read file: {exc}"


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
                yield ref.uri, ref.name, None, f"member {member!r} not found in the zip archive"
            except Exception as exc:
                yield ref.uri, ref.name, None, f"cannot read zip member: {exc}"


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
                        for r in _list_tar(fs, path, unit.container)
                        if r.tar_span is not None
                    }
                span = spans.get(ref.uri)
            if span is None:
                yield ref.uri, ref.name, None, "member not found in the tar archive"
                continue
            problem = _too_big(span[1], options)
            if problem:
                yield ref.uri, ref.name, None, problem
                continue
            f.seek(span[0])
            data = f.read(span[1])
            if len(data) != span[1]:
                yield ref.uri, ref.name, None, "tar archive is truncated inside this member"
            else:
                yield ref.uri, ref.name, data, None


def _read_tar_stream(unit: ReadUnit, options: ReadOptions) -> Iterator[tuple]:
    assert unit.container is not None
    fs, path = uris.resolve(unit.container)
    with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        for m in tf:
            if m.isdir():
                continue
            ref = _member_ref(unit.container, m.name, _tar_problem(m))
            if ref.error:
                yield ref.uri, ref.name, None, ref.error
                continue
            problem = _too_big(m.size, options)
            if problem:
                yield ref.uri, ref.name, None, problem
                continue
            fobj = tf.extractfile(m)
            yield ref.uri, ref.name, fobj.read() if fobj else None, None if fobj else "unreadable"


def _read_parquet(unit: ReadUnit, options: ReadOptions) -> Iterator[tuple]:
    assert unit.container is not None and unit.row_group is not None
    fs, path = uris.resolve(unit.container)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        start = sum(pf.metadata.row_group(i).num_rows for i in range(unit.row_group))
        names = set(pf.schema_arrow.names)
        want = [c for c in (options.bytes_column, options.name_column) if c and c in names]
        table = pf.read_row_group(unit.row_group, columns=want)
    yield from _parquet_rows(unit.container, start, table, names, options)


def _parquet_rows(
    container: str, start: int, table: pa.Table, names: set[str], options: ReadOptions
) -> Iterator[tuple]:
    col = options.bytes_column
    missing = None
    if col not in names:
        missing = f"Parquet source has no {col!r} column (columns: {sorted(names)}); set data.bytes_column"
    data_col = table.column(col).to_pylist() if missing is None else [None] * table.num_rows
    name_col = (
        table.column(options.name_column).to_pylist()
        if options.name_column and options.name_column in table.column_names
        else [None] * table.num_rows
    )
    for i, (data, name) in enumerate(zip(data_col, name_col, strict=True)):
        uri = uris.member_uri(container, str(start + i))
        if missing:
            yield uri, name, None, missing
        elif data is None:
            yield uri, name, None, f"null in bytes column {col!r}"
        elif isinstance(data, str):
            yield uri, name, None, f"column {col!r} holds strings, not image bytes"
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
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            want = [c for c in (options.bytes_column, options.name_column) if c and c in names]
            start = 0
            for i in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(i).num_rows
                if any(start <= int(m) < start + n for m in wanted if m and m.isdigit()):
                    table = pf.read_row_group(i, columns=want)
                    for row in _parquet_rows(unit.container, start, table, names, options):
                        member = uris.split_uri(row[0]).member or row[0]
                        if member in wanted:
                            found.add(member)
                            yield row[0], wanted[member].name, row[2], row[3]
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
            yield ref.uri, ref.name, None, "entry not found in its container"


_READERS = {
    "files": _read_files,
    "zip": _read_zip,
    "tar": _read_tar,
    "tar-stream": _read_tar_stream,
    "parquet": _read_parquet,
    "members": _read_members,
}
