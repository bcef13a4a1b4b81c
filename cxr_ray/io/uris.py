"""Addresses of images: local paths, object-store URIs, and members of archives.

Every image has one ``uri`` string, used in manifests and predictions and enough to read it
again later:

- ``/data/xrays/NORMAL/IM-0115-0001.jpeg`` or ``s3://bucket/xrays/IM-0115-0001.jpeg``
- ``/data/batch.zip!/NORMAL/IM-0115-0001.jpeg`` (a member of a zip or tar archive)
- ``s3://bucket/images.parquet!/17`` (row 17 of a Parquet table of image bytes)

Local paths and remote URIs go through pyarrow filesystems, so s3:// and gs:// work
wherever pyarrow has credentials.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from cxr_ray.errors import DataError

MEMBER_SEP = "!/"
TAR_SUFFIXES = (".tar",)
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)
PARQUET_SUFFIXES = (".parquet", ".pq")


def container_kind(path: str) -> str | None:
    """``zip``, ``tar``, ``tar-stream`` (compressed tar), ``parquet`` or ``None`` (a plain file)."""
    low = path.lower()
    if low.endswith(ZIP_SUFFIXES):
        return "zip"
    if low.endswith(COMPRESSED_TAR_SUFFIXES):
        return "tar-stream"
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and path for a local path or a ``scheme://`` URI."""
    if is_remote(uri):
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with a useful text
            raise DataError(f"cannot open {uri!r}: {exc}") from exc
        return fs, path
    local = uri.removeprefix("file://")
    return pafs.LocalFileSystem(), str(Path(local).expanduser().absolute())


def display(path: str, fs: pafs.FileSystem, original: str) -> str:
    """The URI users see for ``path`` on ``fs`` (keeps the scheme of the original URI)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    scheme = original.split("://", 1)[0]
    return f"{scheme}://{path}"


@dataclass(frozen=True, slots=True)
class SplitUri:
    container: str
    member: str | None


def split_uri(uri: str) -> SplitUri:
    """Split ``archive!/member`` into its parts; plain files have ``member=None``."""
    if MEMBER_SEP in uri:
        container, member = uri.split(MEMBER_SEP, 1)
        if container_kind(container) is not None:
            return SplitUri(container, member)
    return SplitUri(uri, None)


def member_uri(container: str, member: str) -> str:
    return f"{container}{MEMBER_SEP}{member}"


def unsafe_member_reason(member: str) -> str | None:
    """Why an archive member name must not be trusted, or ``None``.

    cxr-ray never extracts archives, but a member that would land outside the archive's
    root on extraction is a sign of a malicious or broken archive, so it is reported.
    """
    if member.startswith(("/", "\\")) or (len(member) > 1 and member[1] == ":"):
        return f"unsafe archive member {member!r}: absolute path"
    norm = posixpath.normpath(member.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or "/../" in f"/{member.replace(chr(92), '/')}/":
        return f"unsafe archive member {member!r}: '..' escapes the archive root"
    return None


def utf8_problem(name: str) -> str | None:
    """A message if ``name`` came from bytes that are not UTF-8 (``surrogateescape``)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8; rename it (e.g. with convmv) to score it"
    return None


def printable(name: str) -> str:
    """``name`` made safe for Arrow strings: undecodable bytes become ``\\xNN`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
