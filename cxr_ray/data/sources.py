"""Find the images in a source, as read units a Ray read task can take (see ``readers``).

A source is a directory tree (any depth, local or ``s3://``/``gs://``), a tar or zip
archive, a Parquet table with an image-bytes column, or a single image file. Archives found
inside a directory are opened too. Listing reads names and sizes only; bytes are read later,
inside Ray read tasks, a block at a time, so memory stays bounded however big the source is.
(A PACS, ``dicomweb://HOST:PORT/PATH``, is listed by ``dicomweb``; ``manifest.source_units``
picks the lister.)

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cxr_ray.errors import DataError, row_error
from cxr_ray.io import uris
from cxr_ray.vocabulary import ErrorCode

if TYPE_CHECKING:
    from cxr_ray.config import DicomwebSettings

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

    kind: str  # files | zip | tar | tar-stream | parquet | members | dicomweb | dimse
    container: str | None = None
    refs: list[ImageRef] = field(default_factory=list)
    row_group: int | None = None
    num_rows: int = 0
    #: Index (in the whole table) of a Parquet row group's first row.
    first_row: int = 0
    size_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ReadOptions:
    max_file_bytes: int = 512 * 1024 * 1024
    bytes_column: str = "image"
    name_column: str | None = "path"
    rows_per_block: int = 64
    #: Filters, auth and retries of ``dicomweb://`` sources (``None``: the defaults). Travels
    #: pickled to the read tasks, secrets included: never dump it to JSON for them.
    dicomweb: DicomwebSettings | None = None


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
        except DataError:
            if info.type != pafs.FileType.Directory:
                raise  # the source itself is unusable (e.g. a wrong column type): exit 2
            reason = row_error(ErrorCode.UNUSABLE_CONTAINER, f"unusable {kind} table (column types)")
            plain.append((ImageRef(shown, name, error=reason), 0))
        except Exception as exc:  # a broken archive is one error row, not a failed run
            # The exception's text can quote the path or a member name: its type only.
            reason = row_error(
                ErrorCode.UNREADABLE_CONTAINER, f"cannot open {kind} archive ({type(exc).__name__})"
            )
            plain.append((ImageRef(shown, name, error=reason), 0))
    units[:0] = chunk_refs(plain, options.rows_per_block)
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
    units = chunk_refs(plain, rows_per_block)
    for (kind, container), refs in by_container.items():
        for i in range(0, len(refs), rows_per_block):
            chunk = refs[i : i + rows_per_block]
            # Parquet rows and stream tars are read by member lookup like any archive.
            unit_kind = "members" if kind in ("parquet", "tar-stream") else kind
            units.append(ReadUnit(unit_kind, container, chunk, num_rows=len(chunk)))
    return units


def chunk_refs(plain: list[tuple[ImageRef, int]], rows: int) -> list[ReadUnit]:
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
    if isinstance(fs, pafs.LocalFileSystem):
        return _walk_local(root)
    files: list[tuple[str, str, int, str]] = []
    selector = pafs.FileSelector(root, recursive=True)
    for info in sorted(fs.get_file_info(selector), key=lambda i: i.path):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) :].lstrip("/")
        files.append((uris.display(info.path, fs, source), info.path, info.size or 0, rel))
    return files, []


def _inside(path: str, real_root: str) -> bool:
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def _walk_local(root: str) -> tuple[list[tuple[str, str, int, str]], list[ImageRef]]:
    """``_walk`` of a local folder with ``os.walk`` (pyarrow cannot name non-UTF-8 files).

    Directory symlinks are followed when they stay inside the root (each real folder once:
    a loop or a second link to a listed folder is an error row) and are an error row when
    they leave it; nothing is dropped silently.
    """
    files: list[tuple[str, str, int, str]] = []
    errors: list[ImageRef] = []
    real_root = os.path.realpath(root)
    visited = {real_root}

    def error(full: str, reason: str) -> None:
        errors.append(
            ImageRef(uris.printable(full), uris.printable(os.path.relpath(full, root)), error=reason)
        )

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for d in list(dirnames):
            full = os.path.join(dirpath, d)
            real = os.path.realpath(full)
            if os.path.islink(full) and not _inside(full, real_root):
                error(
                    full,
                    row_error(
                        ErrorCode.SYMLINK_OUTSIDE_ROOT,
                        "directory symlink points outside the source root; not followed",
                    ),
                )
            elif real in visited:
                error(
                    full,
                    row_error(
                        ErrorCode.DUPLICATE_FOLDER,
                        "folder already listed (a directory symlink); not listed twice",
                    ),
                )
            else:
                visited.add(real)
                continue
            dirnames.remove(d)
        for fname in sorted(filenames):
            full = os.path.join(dirpath, fname)
            problem = uris.utf8_problem(full)
            if problem is None and os.path.islink(full) and not _inside(full, real_root):
                problem = row_error(
                    ErrorCode.SYMLINK_OUTSIDE_ROOT,
                    "symlink points outside the source root; refusing to follow it",
                )
            if problem is None and os.path.islink(full) and not os.path.exists(full):
                problem = row_error(ErrorCode.LINK_DANGLING, "symlink whose target does not exist")
            if problem is None:
                try:
                    st = os.stat(full)
                except OSError as exc:
                    problem = row_error(ErrorCode.UNREADABLE_FILE, f"cannot stat file ({exc.strerror})")
                else:
                    if not stat.S_ISREG(st.st_mode):
                        problem = row_error(ErrorCode.NOT_REGULAR, "not a regular file")
            if problem is not None:
                error(full, problem)
            else:
                files.append((uris.printable(full), full, st.st_size, os.path.relpath(full, root)))
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
            pf = pq.ParquetFile(f)
            meta = pf.metadata
            check_parquet_columns(pf.schema_arrow, options)
        _warn_unstreamable(meta, options)
        firsts = [sum(meta.row_group(k).num_rows for k in range(i)) for i in range(meta.num_row_groups)]
        return [
            ReadUnit(
                "parquet",
                shown,
                row_group=i,
                num_rows=meta.row_group(i).num_rows,
                size_bytes=meta.row_group(i).total_byte_size,
                first_row=firsts[i],
            )
            for i in range(meta.num_row_groups)
        ]
    refs = _list_zip(fs, path, shown) if kind == "zip" else list_tar(fs, path, shown)
    return [
        ReadUnit(kind, shown, refs[i : i + rows], num_rows=len(refs[i : i + rows]))
        for i in range(0, len(refs), rows)
    ]


#: A dictionary page of the bytes column above this many bytes gets a warning at listing.
DICTIONARY_PAGE_WARN = 64 * 1024 * 1024


def dictionary_page_bytes(meta: pq.FileMetaData, column: str) -> int:
    """The largest dictionary page of ``column`` over the row groups (0 without one).

    Parquet reads a page whole, and a dictionary page before any value of its column chunk:
    pyarrow's default writer keeps adding large values (image bytes) to the dictionary for
    its first ``write_batch_size`` (1024) rows, so a table of 100 kB images carries a 100 MB
    dictionary page that every read task of that row group holds, whatever ``rows_per_block``.
    Files written with small pages and no dictionary for the bytes column (pyarrow:
    ``use_dictionary=[<name column>]``, ``write_batch_size=16``) stream in block-sized memory.
    """
    names = meta.schema.to_arrow_schema().names
    if column not in names:
        return 0
    j, largest = names.index(column), 0
    for i in range(meta.num_row_groups):
        chunk = meta.row_group(i).column(j)
        if chunk.has_dictionary_page and chunk.dictionary_page_offset is not None:
            largest = max(largest, chunk.data_page_offset - chunk.dictionary_page_offset)
    return largest


def _warn_unstreamable(meta: pq.FileMetaData, options: ReadOptions) -> None:
    size = dictionary_page_bytes(meta, options.bytes_column)
    if size > DICTIONARY_PAGE_WARN:
        # No path in the text: a table's name can be a patient's (logs carry no identifiers).
        logger.warning(
            "a Parquet source's bytes column has a %d MB dictionary page: each read task holds "
            "it whole, whatever data.rows_per_block; rewrite the table without a dictionary for "
            "that column and with small pages (pyarrow: use_dictionary=[name column], "
            "write_batch_size=16) for memory bounded by the block",
            size // 1_000_000,
        )


def member_ref(container: str, member: str, problem: str | None, span=None) -> ImageRef:
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
            refs.append(member_ref(shown, info.filename, problem))
    return refs


def tar_problem(member: tarfile.TarInfo) -> str | None:
    # Never the link target: it is a path, and paths hold names.
    if member.issym() or member.islnk():
        return row_error(ErrorCode.LINK_MEMBER, "link member; refusing to follow it")
    if not member.isfile():
        return row_error(ErrorCode.NOT_REGULAR, "not a regular file member")
    return None


def _binary(typ: pa.DataType) -> bool:
    return bool(
        pa.types.is_binary(typ)
        or pa.types.is_large_binary(typ)
        or pa.types.is_fixed_size_binary(typ)
        or getattr(pa.types, "is_binary_view", lambda _t: False)(typ)
    )


def _text(typ: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(typ)
        or pa.types.is_large_string(typ)
        or pa.types.is_null(typ)
        or getattr(pa.types, "is_string_view", lambda _t: False)(typ)
    )


def check_parquet_columns(schema: pa.Schema, options: ReadOptions) -> None:
    """``DataError`` (one line, exit 2) when the bytes or name column has an unusable type.

    A missing bytes column is left to the readers (an error row per table row, as before).
    """
    col, name = options.bytes_column, options.name_column
    if col in schema.names and not _binary(schema.field(col).type):
        raise DataError(
            f"Parquet column {col!r} is {schema.field(col).type}, not binary image bytes; "
            "set data.bytes_column to the column holding the file bytes"
        )
    if name and name in schema.names and not _text(schema.field(name).type):
        raise DataError(
            f"Parquet column {name!r} is {schema.field(name).type}, not file names (strings); "
            "set data.name_column to a string column, or to an empty value for none"
        )


def list_tar(fs: pafs.FileSystem, path: str, shown: str) -> list[ImageRef]:
    refs = []
    with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            if m.isdir():
                continue
            span = (m.offset_data, m.size) if m.isfile() else None
            refs.append(member_ref(shown, m.name, tar_problem(m), span))
    return refs
