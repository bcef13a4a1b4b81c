"""WADO-RS retrieval of a read unit's instances (a Ray read task's work for DICOMweb sources).

- **One keep-alive session per read task**, ``dicomweb.concurrency`` requests in flight on it
  (``dicomweb_http.ordered_map``: rows come out in the unit's order, at most one block of
  ``rows_per_block`` instances is held ahead of the consumer). With
  ``dicomweb.blocks_per_task`` over 1 a task's unit is several blocks, and the next block is
  retrieved while Ray decodes the last one in the same (fused read + decode) task. The
  credential, CA-bundle and plain-HTTP rules are ``dicomweb_http.make_session``'s.
- **Header and pixels in one round trip**: WADO-RS *Retrieve Instance* answers the whole
  DICOM Part 10 object (one multipart part). Metadata (``/metadata``) plus frames
  (``/frames/1``) would be two requests per image, and a file to rebuild for the decoder
  (``benchmarks/dicomweb_throughput.py`` measures both).
- **Transfer syntax negotiated, as stored first**: ``Accept: multipart/related;
  type="application/dicom"; transfer-syntax=*`` asks for the stored bytes, so the server does
  not transcode (Orthanc would send a JPEG-baseline image as Explicit VR Little Endian, four
  times the bytes, which the decoder then reads at full resolution). The stored
  compressed frame is what ``cxr_ray.imaging.dicom`` decodes fastest (reduced-size JPEG
  decode), and the bytes are the file as stored, so ``image_id`` is the SHA-256 of the PACS's
  file. A server that refuses ``*`` (HTTP 400/406/415) is asked again without a
  transfer-syntax, and the task keeps that choice: whatever the server sends by default is
  decoded as sent.
- **The body is parsed here**, without pydicom: the part's bytes are the Part 10 file. Only
  a server that sends a bare data set (no ``DICM`` preamble) costs a pydicom read and write.

Every instance is one row: ``(uri, name, bytes, None)`` or ``(uri, name, None, reason)``, the
reason identifier-free (no UID, no URL).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

from cxr_ray.config import DicomwebSettings
from cxr_ray.data.dicomweb import endpoint, parse_instance_uri
from cxr_ray.data.dicomweb_http import Caller, describe, make_session, ordered_map
from cxr_ray.data.sources import ImageRef, ReadOptions, ReadUnit
from cxr_ray.errors import DataError

__all__ = ["ACCEPT_AS_STORED", "ACCEPT_SERVER_DEFAULT", "Retriever", "read_instances"]

logger = logging.getLogger("cxr_ray.data.dicomweb")

#: The stored transfer syntax, untouched (no transcoding on the server, no quality loss).
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: What a server sends when it does not do ``*``: its default (Explicit VR Little Endian).
ACCEPT_SERVER_DEFAULT = 'multipart/related; type="application/dicom"'
_REFUSED_ACCEPT = {400, 406, 415}
#: Room for multipart headers and boundaries on top of the instance's own size limit.
_ENVELOPE = 64 * 1024

Row = tuple[str, str, bytes | None, str | None]


class _TooBigError(Exception):
    """The answer is over ``max_file_bytes`` (never read whole)."""


def _media_param(content_type: str, name: str) -> str | None:
    from email.message import Message

    m = Message()
    m["content-type"] = content_type
    value = m.get_param(name, header="content-type")
    return value if isinstance(value, str) else None


def first_part(body: bytes, content_type: str) -> bytes:
    """The content of the first part of a ``multipart/related`` body (the body itself when
    the server sent the object without the multipart envelope, as some do)."""
    if not content_type.lower().startswith("multipart/"):
        return body
    boundary = _media_param(content_type, "boundary")
    if not boundary:
        return body
    marker = b"--" + boundary.encode("ascii", "replace")
    start = body.find(marker)
    if start < 0:
        raise ValueError("multipart answer without its boundary")
    headers_end = body.find(b"\r\n\r\n", start)
    if headers_end < 0:
        raise ValueError("multipart part without headers")
    end = body.find(b"\r\n" + marker, headers_end + 4)
    if end < 0:
        raise ValueError("multipart part not terminated")
    return body[headers_end + 4 : end]


def _as_part10(data: bytes) -> bytes:
    """``data`` as a DICOM Part 10 file: as is when it is one, else read and written by pydicom."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return data
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Retriever:
    """One read task's WADO-RS retrieval: one keep-alive session, one retry policy, one
    negotiated ``Accept``; ``get(uri)`` is safe to call from several threads."""

    def __init__(self, url: str, settings: DicomwebSettings, max_bytes: int) -> None:
        self.url = url
        self.settings = settings
        self.max_bytes = max_bytes
        self.session = make_session(url, settings, pool=settings.concurrency)
        self.call = Caller(settings)
        self.accept = ACCEPT_AS_STORED
        self._lock = threading.Lock()

    def close(self) -> None:
        self.session.close()

    def _fetch(self, url: str, accept: str) -> tuple[bytes, str]:
        import requests
        import urllib3

        s = self.settings
        with self.session.get(
            url,
            headers={"Accept": accept},
            timeout=(s.connect_timeout_s, s.read_timeout_s),
            stream=True,
        ) as r:
            r.raise_for_status()
            length = r.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes + _ENVELOPE:
                raise _TooBigError
            try:
                # One read of the whole body: requests' own (10 KB chunks) costs a third more CPU.
                body = r.raw.read(self.max_bytes + _ENVELOPE + 1, decode_content=True)
            except urllib3.exceptions.ReadTimeoutError:
                raise requests.Timeout("read timed out") from None
            except urllib3.exceptions.HTTPError:  # cut short, connection reset
                raise requests.exceptions.ChunkedEncodingError("body cut short") from None
            if len(body) > self.max_bytes + _ENVELOPE:
                raise _TooBigError
            return body, r.headers.get("Content-Type", "")

    def _negotiated(self, url: str) -> tuple[bytes, str]:
        import requests

        accept = self.accept
        try:
            return self.call("instance retrieval", lambda: self._fetch(url, accept))
        except requests.HTTPError as exc:
            status = getattr(exc.response, "status_code", None)
            if accept != ACCEPT_AS_STORED or status not in _REFUSED_ACCEPT:
                raise
        # The server refused "as stored": ask for its default, and keep it for the task if
        # that works (a refusal for this instance alone is then an error row like any other).
        answer = self.call("instance retrieval", lambda: self._fetch(url, ACCEPT_SERVER_DEFAULT))
        with self._lock:
            if self.accept == ACCEPT_AS_STORED:
                self.accept = ACCEPT_SERVER_DEFAULT
                logger.info("the DICOMweb server refuses transfer-syntax=*: instances come as it sends them")
        return answer

    def get(self, uri: str) -> tuple[bytes | None, str | None]:
        """(Part 10 bytes, None) or (None, why not) for one instance URI; never raises."""
        parsed = parse_instance_uri(uri)
        if parsed is None:
            return None, "not a DICOMweb instance URI (.../studies/S/series/R/instances/I)"
        _, study, series, sop = parsed
        url = f"{self.url}/studies/{study}/series/{series}/instances/{sop}"
        try:
            body, content_type = self._negotiated(url)
        except _TooBigError:
            return None, f"too_big: the instance is over the {self.max_bytes}-byte limit"
        except Exception as exc:
            return None, f"unretrievable: cannot retrieve the instance: {describe(exc)}"
        try:
            data = _as_part10(first_part(body, content_type))
        except Exception as exc:
            return (
                None,
                f"unwritable_instance: the server sent an instance that is not DICOM ({type(exc).__name__})",
            )
        if len(data) > self.max_bytes:
            return None, f"too_big: the instance is {len(data)} bytes, over the {self.max_bytes}-byte limit"
        return data, None


def read_instances(unit: ReadUnit, options: ReadOptions) -> Iterator[Row]:
    """WADO-RS retrieval of every instance of ``unit``, in order: ``(uri, name, data, error)``."""
    settings = options.dicomweb or DicomwebSettings()
    assert unit.container is not None
    if all(ref.error for ref in unit.refs):  # e.g. a service not configured: never contacted
        for ref in unit.refs:
            yield ref.uri, ref.name, None, ref.error
        return
    try:
        retriever = Retriever(endpoint(unit.container).url, settings, options.max_file_bytes)
    except DataError as exc:  # credentials over plain HTTP without the opt-in
        for ref in unit.refs:
            yield ref.uri, ref.name, None, ref.error or f"dicomweb_refused: {exc}"
        return

    def one(ref: ImageRef) -> Row:
        data, error = (None, ref.error) if ref.error else retriever.get(ref.uri)
        return ref.uri, ref.name, data, error

    try:
        # A block's worth ahead: while read_unit's consumer decodes one block, the next one
        # is being retrieved (the memory of two blocks at most).
        yield from ordered_map(unit.refs, one, settings.concurrency, ahead=options.rows_per_block)
    finally:
        retriever.close()
    if retriever.call.retried:
        logger.info(
            "DICOMweb read task: %d instances, %d retried requests", len(unit.refs), retriever.call.retried
        )
