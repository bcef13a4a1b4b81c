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

from cxr_ray.errors import DataError, row_error
from cxr_ray.vocabulary import ErrorCode

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
            # Never the URI or the library's text (either can quote a path or a credential).
            scheme = uri.split("://", 1)[0]
            raise DataError(
                f"cannot open a {scheme}:// location ({type(exc).__name__}); check the URI and "
                "its credentials",
                code=ErrorCode.UNREADABLE_FILE,
            ) from None
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
    root on extraction is a sign of a malicious or broken archive, so it is reported. The
    reason never quotes the name (it can hold a patient's name); the row's ``uri`` has it.
    """
    if member.startswith(("/", "\\")) or (len(member) > 1 and member[1] == ":"):
        return row_error(ErrorCode.UNSAFE_MEMBER, "unsafe archive member: absolute path")
    norm = posixpath.normpath(member.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or "/../" in f"/{member.replace(chr(92), '/')}/":
        return row_error(ErrorCode.UNSAFE_MEMBER, "unsafe archive member: a .. part escapes the archive root")
    return None


#: Schemes a manifest row may use besides local paths and ``file://`` (pyarrow filesystems).
#: DICOMweb rows are checked against ``dicomweb.endpoints`` instead (``data.dicomweb``).
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")
URI_NOT_ALLOWED = row_error(
    ErrorCode.URI_NOT_ALLOWED,
    "the manifest names a location outside the allowed roots (data.allowed_roots); it was not read",
)
SCHEME_NOT_ALLOWED = row_error(
    ErrorCode.URI_NOT_ALLOWED,
    "the manifest names a scheme cxr-ray does not read from a manifest (it reads local paths and "
    "the schemes file, " + ", ".join(OBJECT_STORE_SCHEMES) + ")",
)


def _normal(uri: str) -> tuple[str, str] | None:
    """(scheme, lexically normalised path) of a container URI; ``None`` if not absolute."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        scheme = scheme.lower()
        if scheme == "file":
            scheme, rest = "", rest
        else:
            return scheme, posixpath.normpath("/" + rest)
    else:
        scheme, rest = "", uri
    if not rest.startswith("/"):
        return None
    return scheme, posixpath.normpath(rest)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_listed_uri(uri: str, roots: tuple[str, ...] | None) -> str | None:
    """Why a URI listed by a manifest must not be read, or ``None`` (it may be read).

    Decided from the URI text and, for local paths inside a root, the real path (a symlink
    leaving the root): the same message whether the file exists or not, and nothing is
    opened. ``roots`` ``None``: any absolute location of an allowed scheme.
    """
    container = split_uri(uri).container
    scheme = container.split("://", 1)[0].lower() if "://" in container else ""
    if scheme not in ("", "file", *OBJECT_STORE_SCHEMES):
        return SCHEME_NOT_ALLOWED
    norm = _normal(container)
    if norm is None:
        return URI_NOT_ALLOWED
    if roots is None:
        return None
    for root in roots:
        rnorm = _normal(root)
        if rnorm is None or rnorm[0] != norm[0] or not _under(norm[1], rnorm[1]):
            continue
        if norm[0] == "":
            import os

            real, real_root = os.path.realpath(norm[1]), os.path.realpath(rnorm[1])
            if not _under(real, real_root):
                continue
        return None
    return URI_NOT_ALLOWED


def utf8_problem(name: str) -> str | None:
    """A message if ``name`` came from bytes that are not UTF-8 (``surrogateescape``)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return row_error(
            ErrorCode.NOT_UTF8, "file name is not valid UTF-8; rename it (e.g. with convmv) to score it"
        )
    return None


def printable(name: str) -> str:
    """``name`` made safe for Arrow strings: undecodable bytes become ``\\xNN`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
