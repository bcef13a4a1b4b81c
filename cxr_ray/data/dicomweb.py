"""DICOMweb sources: a PACS read with QIDO-RS (listing) and WADO-RS (retrieval).

``dicomweb://HOST:PORT/PATH`` is the DICOMweb service at ``http://HOST:PORT/PATH`` (for
Orthanc, ``dicomweb://pacs:8042/dicom-web``); ``dicomwebs://`` is the same over HTTPS. The
filters, paging, timeouts, retries and credentials are ``DicomwebSettings`` (``[dicomweb]``
in TOML, ``CXR_DICOMWEB__*`` in the environment); credentials never go in the URL.

- **Listing** (on the driver): QIDO-RS searches the studies matching the filters
  (``StudyDate`` and the extra ``query`` keys) in pages of ``page_size`` (``limit`` and
  ``offset``: a year of studies is never one request), then each study's instances, in pages,
  of the wanted modalities (``Modality``; not ``ModalitiesInStudy``, which servers compute
  after paging: Orthanc 1.10 then loses whole pages). The same can happen with ``query`` keys
  a server does not index (Orthanc: those outside its main DICOM tags), so prefer indexed
  study attributes such as ``AccessionNumber``, ``PatientID`` or ``StudyDescription``.
  Studies are packed whole into read units of at most ``data.rows_per_block`` times
  ``dicomweb.blocks_per_task`` instances (a bigger study is split), so each Ray read task
  retrieves whole studies, a block at a time (the next block while the last is decoded).
- **Retrieval** (inside Ray read tasks, in parallel across the cluster; ``dicomweb_wado``):
  WADO-RS Retrieve Instance, header and pixels in one response, ``dicomweb.concurrency``
  requests in flight per task on one keep-alive session, in the transfer syntax the instance
  is stored in (``transfer-syntax=*``; the server's default where it refuses that), as the
  stored DICOM Part 10 bytes for the usual decode path, so an image has the same
  ``image_id`` (SHA-256) in the PACS as in an export of it.
- **Failures**: a timeout, a connection error or an HTTP 5xx/408/429 is retried with
  exponential backoff (``retries``, ``backoff_s`` doubling to ``max_backoff_s``). An instance
  that keeps failing becomes an error row (no bytes, a reason); once the server looks down,
  the rest of that read task tries each instance once (no backoff) until one succeeds, so an
  outage costs one backoff sequence per task, not per image. Listing the studies failing is a
  ``DataError`` before anything is scored (wrong URL, refused credentials, server down);
  listing one study's instances failing with an HTTP error (after the retries) is one error
  row for that study (URI ``.../studies/UID``), so the rest of the archive is scored and the
  study shows up for a rerun; the server going away while listing is a ``DataError``.
  Objects without pixels (structured reports) are rows like any other; decoding makes them
  error rows. Rows out == instances listed.

URIs of rows are ``dicomweb://host:port/path/studies/S/series/R/instances/I``: stable, enough
to read the instance again (a manifest of them can be re-read), and free of credentials. Log
lines and error messages carry no UIDs or patient identifiers.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cxr_ray.config import DicomwebSettings
from cxr_ray.data.dicomweb_http import (
    Caller,
    describe,
    make_client,
    ordered_map,
    retriable,
    server_gone,
)
from cxr_ray.data.sources import ImageRef, ReadOptions, ReadUnit
from cxr_ray.errors import DataError

__all__ = [
    "Caller",
    "describe",
    "endpoint",
    "is_dicomweb",
    "list_units",
    "make_client",
    "retriable",
    "units_for_uris",
]

logger = logging.getLogger(__name__)

SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
_INSTANCE = re.compile(
    r"^(?P<base>dicomwebs?://.+?)/studies/(?P<study>[^/]+)/series/(?P<series>[^/]+)/instances/(?P<sop>[^/]+)$"
)
# DICOM JSON tags of the QIDO-RS answers we read.
_STUDY_UID, _SERIES_UID, _SOP_UID, _MODALITY = "0020000D", "0020000E", "00080018", "00080060"
NOT_CONFIGURED = (
    "endpoint_not_configured: the manifest names a DICOMweb service that is not in "
    "dicomweb.endpoints; not contacted (credentials go only to configured services)"
)

T = TypeVar("T")


def is_dicomweb(source: str) -> bool:
    return source.split("://", 1)[0].lower() in SCHEMES if "://" in source else False


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A DICOMweb service: ``source`` as users write it, ``url`` as HTTP needs it."""

    source: str
    url: str


def endpoint(source: str) -> Endpoint:
    """Parse ``dicomweb[s]://HOST[:PORT][/PATH]``; ``DataError`` for anything else."""
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise DataError(f"not a DICOMweb source: {source!r} (use dicomweb://HOST:PORT/PATH)")
    if parts.username is not None or parts.password is not None:
        # Never echo the URL: it holds a password.
        raise DataError(
            "credentials in a DICOMweb URL are refused (they would end up in logs and outputs): "
            "set dicomweb.username/dicomweb.password or dicomweb.token instead"
        )
    if not parts.hostname:
        raise DataError(f"DICOMweb source {source!r} has no host (use dicomweb://HOST:PORT/PATH)")
    if parts.query or parts.fragment:
        raise DataError(
            f"DICOMweb source {source!r} has a query string: give filters as dicomweb.study_date, "
            "dicomweb.modalities and dicomweb.query"
        )
    try:
        port = parts.port
    except ValueError:
        raise DataError(f"DICOMweb source {source!r} has an invalid port") from None
    netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
    if ":" in parts.hostname:  # IPv6 literal
        netloc = f"[{parts.hostname}]" + ("" if port is None else f":{port}")
    path = parts.path.rstrip("/")
    return Endpoint(f"{scheme}://{netloc}{path}", f"{SCHEMES[scheme]}://{netloc}{path}")


def instance_uri(base: str, study: str, series: str, sop: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{sop}"


def parse_instance_uri(uri: str) -> tuple[str, str, str, str] | None:
    """(base source, study, series, SOP instance UID) of an instance URI, or ``None``."""
    m = _INSTANCE.match(uri)
    return None if m is None else (m["base"], m["study"], m["series"], m["sop"])


# HTTP (client, credentials, TLS, retries, messages): ``cxr_ray.data.dicomweb_http``.
_Caller = Caller


# ----------------------------------------------------------------------------- listing


def _value(item: dict[str, Any], tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


def _pages(
    call: _Caller, what: str, search: Callable[..., list[dict[str, Any]]], page_size: int, **kwargs: Any
) -> Iterator[dict[str, Any]]:
    """Every result of a QIDO-RS search, ``page_size`` at a time (``limit``/``offset``)."""
    offset = 0
    while True:
        fetch = functools.partial(search, limit=page_size, offset=offset, **kwargs)
        page = call(f"{what} (offset {offset})", fetch)
        yield from page
        # A short page is the last one; so page_size must not exceed the server's own cap
        # on results per request (the default, 100, is below every common PACS's).
        if not page or len(page) < page_size:
            return
        offset += len(page)


def list_studies(client: Any, settings: DicomwebSettings, call: _Caller | None = None) -> list[str]:
    """StudyInstanceUIDs matching the settings' filters, in the server's order, once each."""
    call = call or _Caller(settings)
    filters: dict[str, Any] = dict(settings.query)
    if settings.study_date is not None:
        filters["StudyDate"] = settings.study_date
    # No ModalitiesInStudy here: servers compute it after paging (Orthanc 1.10 applies limit
    # and offset first, so pages lose studies); the modality filter runs on the instances.
    seen: dict[str, None] = {}
    for item in _pages(
        call,
        "study search",
        client.search_for_studies,
        settings.page_size,
        fields=["StudyInstanceUID"],
        search_filters=filters,
    ):
        uid = _value(item, _STUDY_UID)
        if uid is not None:
            seen.setdefault(uid, None)
    return list(seen)


def list_study(
    client: Any, base: str, study: str, settings: DicomwebSettings, call: _Caller | None = None
) -> list[ImageRef]:
    """The instances of one study as refs, of the wanted modalities only (when set)."""
    call = call or _Caller(settings)
    wanted = set(settings.modalities)
    items: list[dict[str, Any]] = []
    # Modality is a series attribute every server indexes: filtering on it pages reliably.
    # One search per modality (a list of values in one key is not understood everywhere).
    for modality in settings.modalities or (None,):
        items.extend(
            _pages(
                call,
                "instance search",
                client.search_for_instances,
                settings.page_size,
                study_instance_uid=study,
                fields=["SeriesInstanceUID", "SOPInstanceUID", "Modality"],
                search_filters={} if modality is None else {"Modality": modality},
            )
        )
    refs = []
    done: set[str] = set()
    for item in items:
        series, sop, modality = _value(item, _SERIES_UID), _value(item, _SOP_UID), _value(item, _MODALITY)
        if wanted and modality is not None and modality.upper() not in wanted:
            continue  # a server that ignored the filter
        if sop is not None and sop in done:
            continue
        if sop is not None:
            done.add(sop)
        if series is None or sop is None:
            refs.append(
                ImageRef(
                    f"{base}/studies/{study}",
                    f"{study}.dcm",
                    error="the server's instance listing lacks SeriesInstanceUID or SOPInstanceUID",
                )
            )
            continue
        refs.append(ImageRef(instance_uri(base, study, series, sop), f"{sop}.dcm"))
    return refs


def _threaded(
    items: list[Any], work: Callable[[Any, Any], T], new_client: Callable[[], Any], threads: int
) -> Generator[T, None, None]:
    """``work(client, item)`` for each item, in order, on ``threads`` threads (a client each).

    ``work`` must not raise. Closing the iterator early cancels what has not started.
    """
    local = threading.local()

    def run(item: Any) -> T:
        if not hasattr(local, "client"):
            local.client = new_client()
        return work(local.client, item)

    return ordered_map(items, run, threads)


def list_units(source: str, options: ReadOptions) -> list[ReadUnit]:
    """Every instance of the studies matching the filters, packed by study into read units."""
    settings = options.dicomweb or DicomwebSettings()
    ep = endpoint(source)
    call = _Caller(settings)
    t0 = time.monotonic()
    try:
        studies = list_studies(make_client(ep.url, settings), settings, call)
    except Exception as exc:
        raise DataError(f"cannot list the studies of {ep.source}: {describe(exc)}") from None

    def one(client: Any, study: str) -> list[ImageRef] | Exception:
        try:
            return list_study(client, ep.source, study, settings, call)
        except Exception as exc:
            return exc

    by_study: list[list[ImageRef]] = []
    failed = 0
    results = _threaded(studies, one, lambda: make_client(ep.url, settings), settings.concurrency)
    for i, (study, refs) in enumerate(zip(studies, results, strict=False)):
        if isinstance(refs, Exception) and not server_gone(refs):
            # An HTTP error for this study, or a study the client refuses to ask for (a
            # non-conformant UID: dicomweb-client's ValueError): one error row, the rest is
            # scored. The UID stays in the row's uri; the message never has it.
            failed += 1
            reason = f"study_unlisted: cannot list the study's instances: {describe(refs)}"
            by_study.append([ImageRef(f"{ep.source}/studies/{study}", "study.dcm", error=reason)])
        elif isinstance(refs, Exception):
            # The server itself went away (after every retry): nothing is scored yet, so
            # stopping here beats thousands of error rows. Rerun when it is back.
            results.close()
            raise DataError(
                f"the DICOMweb server {ep.source} stopped answering while listing study "
                f"{i + 1} of {len(studies)}: {describe(refs)}"
            )
        else:
            by_study.append(refs)
    units = pack(ep.source, by_study, options.rows_per_block * settings.blocks_per_task)
    log_listing(ep.source, len(studies), units, t0, failed)
    return units


def log_listing(source: str, studies: int, units: list[ReadUnit], t0: float, failed: int) -> None:
    """The listing's one log line (a PACS source: DICOMweb or DIMSE); counts only, no UIDs."""
    logger.info(
        "listed %s: %d studies, %d instances, %d read units in %.1f s%s",
        source,
        studies,
        sum(u.num_rows for u in units),
        len(units),
        time.monotonic() - t0,
        f" ({failed} studies could not be listed: error rows)" if failed else "",
    )


def pack(base: str, studies: Iterable[list[ImageRef]], rows: int) -> list[ReadUnit]:
    """Read units of whole studies, at most ``rows`` instances each (big studies are split)."""
    units: list[ReadUnit] = []
    current: list[ImageRef] = []
    for refs in studies:
        if current and len(current) + len(refs) > rows:
            units.append(_unit(base, current))
            current = []
        for i in range(0, len(refs), rows):
            chunk = refs[i : i + rows]
            if len(chunk) == rows:
                units.append(_unit(base, chunk))
            else:
                current.extend(chunk)
    if current:
        units.append(_unit(base, current))
    return units


def _unit(base: str, refs: list[ImageRef]) -> ReadUnit:
    return ReadUnit("dicomweb", base, list(refs), num_rows=len(refs))


def configured_endpoints(settings: DicomwebSettings | None) -> frozenset[str]:
    """``dicomweb.endpoints`` as ``endpoint().source`` strings (the form row URIs start with)."""
    return frozenset(endpoint(e).source for e in (settings.endpoints if settings else ()))


def _base_allowed(base: str, allowed: frozenset[str]) -> bool:
    try:
        return endpoint(base).source in allowed
    except DataError:
        return False


def units_for_uris(
    items: Iterable[tuple[str, str | None, str | None]],
    rows: int,
    endpoints: frozenset[str] | None = None,
) -> list[ReadUnit]:
    """Read units for known ``(uri, name, label)`` of instances (a manifest re-read), grouped
    by server and study.

    ``endpoints``: the services these rows may be fetched from (``configured_endpoints``);
    a row naming another becomes an error row here, so nothing ever contacts it.
    """
    allowed = endpoints or frozenset()
    grouped: dict[str, dict[str, list[ImageRef]]] = {}
    for uri, name, label in items:
        ref = ImageRef(uri, name or uri.rsplit("/", 1)[-1] + ".dcm", label=label)
        parsed = parse_instance_uri(ref.uri)
        if not _base_allowed(parsed[0] if parsed else uri, allowed):
            ref = ImageRef(uri, ref.name, error=NOT_CONFIGURED, label=label)
        base, study = (parsed[0], parsed[1]) if parsed else (ref.uri, "")
        grouped.setdefault(base, {}).setdefault(study, []).append(ref)
    units = []
    for base, studies in grouped.items():
        units.extend(pack(base, studies.values(), rows))
    return units
