"""DIMSE sources: a PACS read with C-FIND (listing) and C-GET or C-MOVE (retrieval).

``dicom://AET@HOST:PORT`` is the DICOM service (application entity ``AET``) at
``HOST:PORT``; our own AE title is ``dicomweb.dimse.calling_aet`` (default ``CXRRAY``), which
the PACS must know. The filters, retries and backoff are the ``[dicomweb]`` section's, so a
nightly run's ``StudyDate`` window works the same for both protocols.

- **Listing** (on the driver, one association): a Study Root C-FIND at STUDY level
  (``StudyDate``, ``ModalitiesInStudy`` from ``dicomweb.modalities``, the extra
  ``dicomweb.query`` keys), then for each study a C-FIND at IMAGE level for its instances
  (``Modality`` checked again on each answer). C-FIND has no paging: the PACS answers every
  match (a PACS with a result cap truncates; narrow ``study_date``). Studies are packed
  whole into read units of at most ``data.rows_per_block`` instances (``dicomweb.pack``).
- **Retrieval** (inside Ray read tasks): ``dicomweb.dimse.retrieve = "get"`` (default)
  C-GETs on the association the task opens, one SERIES-level request per study of the unit
  (its series as a UID list; an instance that does not arrive is then asked for alone at
  IMAGE level), proposing, for each SOP class of the unit's studies (one C-FIND for
  ``SOPClassesInStudy``), one presentation context per transfer syntax, so the PACS sends
  each instance as stored (no transcoding; measured on Orthanc 1.10: with one context
  listing every syntax it chose Explicit VR Little Endian and sent a JPEG as 151 kB instead
  of 8.7 kB). Measured on Orthanc 1.10 over loopback, one read task, 48 instances in 24
  studies: C-GET 5.1 s (9 instances/s; 9.0 s with one C-GET per instance), C-MOVE 7.3 s,
  WADO-RS 0.2-1.0 s; Orthanc answers each DIMSE message after ~45 ms (C-ECHO round trip,
  also with dcmtk's echoscu), so DIMSE throughput comes from read tasks in parallel.
  ``"move"`` C-MOVEs to a storage SCP cxr-ray runs for the task on
  ``dimse.move_port`` (the PACS must have ``calling_aet`` registered at this host and port);
  the SCP accepts associations from the source's AE title only, and one read task per node
  holds the port at a time. The bytes are the dataset as received with a file meta header
  (pynetdicom's), so an instance's ``image_id`` is stable across DIMSE runs but differs from
  its DICOMweb ``image_id`` (another file meta header).
- **Failures**: a refused or dropped association is retried with exponential backoff
  (``dicomweb.retries``, ``backoff_s`` doubling to ``max_backoff_s``); an instance that still
  fails, or that the PACS answers with a failure status, is an error row. Listing the
  studies failing is a ``DataError`` before anything is scored; one study's image listing
  failing is one error row for that study. Rows out == instances listed.

URIs of rows are ``dicom://AET@HOST:PORT/studies/S/series/R/instances/I``. Log lines and
error messages carry no UIDs or patient identifiers (pynetdicom's own INFO lines, which
quote UIDs, are raised to WARNING unless a level was set).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from cxr_ray.config import DicomwebSettings, DimseSettings
from cxr_ray.data.dicomweb import log_listing, pack
from cxr_ray.data.dimse_net import (
    FIND,
    GET,
    MOVE,
    PENDING,
    DimseError,
    Peer,
    Received,
    associate,
    find,
    is_dimse,
    peer,
    retrying,
    storage_scp,
)
from cxr_ray.data.sources import ImageRef, ReadOptions, ReadUnit
from cxr_ray.errors import DataError, row_error
from cxr_ray.vocabulary import ErrorCode

__all__ = [
    "instance_uri",
    "is_dimse",
    "list_units",
    "parse_instance_uri",
    "peer",
    "read_instances",
]

logger = logging.getLogger(__name__)

_INSTANCE = re.compile(
    r"^(?P<base>dicom://[^/]+)/studies/(?P<study>[^/]+)/series/(?P<series>[^/]+)/instances/(?P<sop>[^/]+)$",
    re.I,
)
#: Transfer syntaxes proposed for each SOP class, one presentation context each: the PACS
#: then sends the instance in the syntax it stores, whichever of these it is.
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
)
#: At most this many SOP classes per association (128 presentation contexts in all).
_MAX_CLASSES = 128 // len(TRANSFER_SYNTAXES)


def instance_uri(base: str, study: str, series: str, sop: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{sop}"


def parse_instance_uri(uri: str) -> tuple[str, str, str, str] | None:
    """(base source, study, series, SOP instance UID) of an instance URI, or ``None``."""
    m = _INSTANCE.match(uri)
    return None if m is None else (m["base"], m["study"], m["series"], m["sop"])


# ----------------------------------------------------------------------------- listing


def _study_query(settings: DicomwebSettings) -> Any:
    from pydicom.dataset import Dataset

    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    q.StudyDate = settings.study_date or ""
    if settings.modalities:
        q.ModalitiesInStudy = "\\".join(settings.modalities)
    for key, value in settings.query.items():
        try:
            setattr(q, key, value)
        except Exception:
            raise DataError(f"dicomweb.query key {key!r} is not a DICOM keyword C-FIND can use") from None
    return q


def _image_query(study: str) -> Any:
    from pydicom.dataset import Dataset

    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study
    q.SeriesInstanceUID = ""
    q.SOPInstanceUID = ""
    q.SOPClassUID = ""
    q.Modality = ""
    return q


def _study_refs(base: str, study: str, answers: list[Any], wanted: set[str]) -> list[ImageRef]:
    refs, done = [], set()
    for ds in answers:
        series, sop = str(ds.get("SeriesInstanceUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
        modality = str(ds.get("Modality", "") or "").upper()
        if wanted and modality and modality not in wanted:
            continue
        if sop and sop in done:
            continue
        done.add(sop)
        if not series or not sop:
            reason = row_error(
                ErrorCode.STUDY_UNLISTED, "the C-FIND answer lacks SeriesInstanceUID or SOPInstanceUID"
            )
            refs.append(ImageRef(f"{base}/studies/{study}", "study.dcm", error=reason))
            continue
        refs.append(ImageRef(instance_uri(base, study, series, sop), f"{sop}.dcm"))
    return refs


def list_units(source: str, options: ReadOptions) -> list[ReadUnit]:
    """Every instance of the studies matching the filters, packed by study into read units."""

    settings = options.dicomweb or DicomwebSettings()
    target = peer(source)
    t0 = time.monotonic()
    query = _study_query(settings)
    contexts: list[tuple[str, tuple[str, ...] | None]] = [(FIND, None)]
    try:
        assoc = retrying(settings, "association", lambda: associate(target, settings.dimse, contexts))
    except DimseError as exc:
        raise DataError(f"cannot list the studies of {target.source}: {exc.reason}") from None
    wanted = set(settings.modalities)
    by_study: list[list[ImageRef]] = []
    failed = 0
    try:
        try:
            answers = find(assoc, query)
        except DimseError as exc:
            raise DataError(f"cannot list the studies of {target.source}: {exc.reason}") from None
        studies = list(dict.fromkeys(str(a.StudyInstanceUID) for a in answers if a.get("StudyInstanceUID")))
        for study in studies:
            if not assoc.is_established:
                raise DataError(f"the DICOM peer {target.source} dropped the association while listing")
            try:
                by_study.append(_study_refs(target.source, study, find(assoc, _image_query(study)), wanted))
            except DimseError as exc:
                failed += 1
                detail = f"cannot list the study's instances: {exc.reason}"
                reason = row_error(ErrorCode.STUDY_UNLISTED, detail)
                by_study.append([ImageRef(f"{target.source}/studies/{study}", "study.dcm", error=reason)])
    finally:
        if assoc.is_established:
            assoc.release()
    units = pack(target.source, by_study, options.rows_per_block)
    for unit in units:
        unit.kind = "dimse"
    log_listing(target.source, len(studies), units, t0, failed)
    return units


# ----------------------------------------------------------------------------- retrieval


def _sop_classes(assoc: Any, studies: list[str]) -> set[str]:
    """The SOP classes of ``studies``' instances: one STUDY-level C-FIND for
    ``SOPClassesInStudy``, else (a PACS that does not return it) IMAGE level per study."""
    from pydicom.dataset import Dataset

    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = studies if len(studies) > 1 else studies[0]
    q.SOPClassesInStudy = ""
    answers = find(assoc, q)
    if answers and all(a.get("SOPClassesInStudy") for a in answers):
        values = [a.SOPClassesInStudy for a in answers]
        return {str(v) for value in values for v in ([value] if isinstance(value, str) else value)}
    return {
        str(ds.SOPClassUID)
        for study in studies
        for ds in find(assoc, _image_query(study))
        if ds.get("SOPClassUID")
    }


def _retrieve_query(study: str, series: str, sop: str) -> Any:
    from pydicom.dataset import Dataset

    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study
    q.SeriesInstanceUID = series
    q.SOPInstanceUID = sop
    return q


def _series_query(study: str, series: list[str]) -> Any:
    """A SERIES-level retrieval of ``series`` of ``study`` (UID list matching, PS3.4 C.2.2.2.2)."""
    from pydicom.dataset import Dataset

    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study
    q.SeriesInstanceUID = series if len(series) > 1 else series[0]
    return q


def _status_of(responses: Iterator[tuple[Any, Any]]) -> int | None:
    """The final status of a C-GET / C-MOVE (``None``: the association broke)."""
    final = None
    for status, _ in responses:
        if not status:
            return None
        if status.Status not in PENDING:
            final = int(status.Status)
    return final


def read_instances(
    unit: ReadUnit, options: ReadOptions
) -> Iterator[tuple[str, str, bytes | None, str | None]]:
    """C-GET (or C-MOVE) of every instance of ``unit``: ``(uri, name, data, error)`` each."""
    settings = options.dicomweb or DicomwebSettings()
    assert unit.container is not None
    todo = [ref for ref in unit.refs if not ref.error]
    for ref in unit.refs:
        if ref.error:
            yield ref.uri, ref.name, None, ref.error
    if not todo:
        return
    try:
        target = peer(unit.container)
    except DataError:
        for ref in todo:
            yield ref.uri, ref.name, None, row_error(ErrorCode.UNRETRIEVABLE, "not a DIMSE address")
        return
    received = Received(options.max_file_bytes)
    with _session(target, settings, todo, received) as (one, batch):
        for group in _study_groups(todo):
            batch(group)  # one request for the group; what it did not bring is asked one by one
            for ref in group:
                p = parse_instance_uri(ref.uri)
                got = received.pop(p[3]) if p is not None else None
                if isinstance(got, bytes):
                    yield ref.uri, ref.name, got, None
                elif isinstance(got, str):
                    yield ref.uri, ref.name, None, got
                else:
                    yield ref.uri, ref.name, *one(ref)
            received.clear()  # instances of those series outside this unit (a split study)


def _study_groups(refs: list[ImageRef], size: int = 256) -> list[list[ImageRef]]:
    """Refs grouped by study, at most ``size`` each, in first-seen order."""
    groups: dict[str, list[ImageRef]] = {}
    for ref in refs:
        p = parse_instance_uri(ref.uri)
        groups.setdefault(p[1] if p is not None else ref.uri, []).append(ref)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


def _classes_of(target: Peer, dimse: DimseSettings, studies: list[str]) -> set[str]:
    finder = associate(target, dimse, [(FIND, None)])
    try:
        return _sop_classes(finder, studies)
    finally:
        if finder.is_established:
            finder.release()


def _get_association(target: Peer, dimse: DimseSettings, classes: set[str], received: Received) -> Any:
    """A C-GET association: a storage context per (SOP class, transfer syntax), SCP role."""
    from pynetdicom import evt

    chosen = sorted(classes)[:_MAX_CLASSES]
    contexts: list[tuple[str, tuple[str, ...] | None]] = [(GET, None)]
    contexts += [(c, (ts,)) for c in chosen for ts in TRANSFER_SYNTAXES]
    handlers = [(evt.EVT_C_STORE, received.handle)]
    return associate(target, dimse, contexts, scp_roles=tuple(chosen), handlers=handlers)


@contextlib.contextmanager
def _session(
    target: Peer, settings: DicomwebSettings, refs: list[ImageRef], received: Received
) -> Iterator[tuple[Callable[[ImageRef], tuple[bytes | None, str | None]], Callable[[list[ImageRef]], None]]]:
    """(one, batch): retrieve one ref (its bytes or why not), or request a series' refs at
    once (what arrives waits in ``received``), over an association re-made when it breaks."""
    dimse = settings.dimse
    move = dimse.retrieve == "move"
    parsed = {ref.uri: parse_instance_uri(ref.uri) for ref in refs}
    studies = sorted({p[1] for p in parsed.values() if p is not None})
    state: dict[str, Any] = {"assoc": None, "classes": None, "down": False}
    scp = storage_scp(target, dimse, received) if move else contextlib.nullcontext()

    def open_assoc() -> Any:
        if move:
            return associate(target, dimse, [(MOVE, None)])
        if state["classes"] is None:  # the SOP classes decide the storage contexts (C-GET)
            state["classes"] = _classes_of(target, dimse, studies)
        return _get_association(target, dimse, state["classes"], received)

    def request(query: Any) -> int | None:
        """One C-GET / C-MOVE; ``DimseError`` when no association can be made."""
        if state["assoc"] is None or not state["assoc"].is_established:
            state["assoc"] = _connect(settings, open_assoc, 0 if state["down"] else None)
        if move:
            return _status_of(state["assoc"].send_c_move(query, dimse.calling_aet, MOVE))
        return _status_of(state["assoc"].send_c_get(query, GET))

    def batch(group: list[ImageRef]) -> None:
        keys = [parsed[r.uri] for r in group]
        if state["down"] or len(group) < 2 or any(k is None for k in keys):
            return
        study = keys[0][1]  # type: ignore[index]
        series = sorted({k[2] for k in keys if k is not None})
        try:
            request(_series_query(study, series))
            state["down"] = False
        except DimseError:
            state["down"] = True  # after a full backoff: each instance is then tried once

    def one(ref: ImageRef) -> tuple[bytes | None, str | None]:
        p = parsed[ref.uri]
        if p is None:
            return None, row_error(ErrorCode.UNRETRIEVABLE, "not a DIMSE instance URI")
        _, study, series, sop = p
        for attempt in range(2):  # a broken association is made again once per instance
            try:
                status = request(_retrieve_query(study, series, sop))
            except DimseError as exc:
                state["down"] = True  # after a full backoff: the rest are tried once each
                return None, row_error(ErrorCode.UNRETRIEVABLE, f"cannot retrieve the instance: {exc.reason}")
            state["down"] = False
            if status is None and attempt == 0:
                continue
            got = received.pop(sop)
            if isinstance(got, bytes):
                return got, None
            if isinstance(got, str):
                return None, got
            why = "the association broke" if status is None else f"status 0x{status:04X}"
            verb = "C-MOVE" if move else "C-GET"
            detail = f"the DICOM peer did not send the instance ({verb} {why})"
            return None, row_error(ErrorCode.UNRETRIEVABLE, detail)
        raise AssertionError("unreachable")

    with scp:
        try:
            yield one, batch
        finally:
            if state["assoc"] is not None and state["assoc"].is_established:
                state["assoc"].release()


def _connect(settings: DicomwebSettings, open_assoc: Callable[[], Any], attempts: int | None) -> Any:
    if attempts == 0:
        return open_assoc()
    return retrying(settings, "association", open_assoc)
