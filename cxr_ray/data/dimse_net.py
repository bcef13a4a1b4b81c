"""DIMSE associations for cxr-ray: a peer's address, associations, retries, C-FIND.

Shared by the DIMSE source (``cxr_ray.data.dimse``: C-FIND, C-GET, C-MOVE) and C-STORE
delivery (``cxr_ray.writeback.cstore``). ``dicom://AET@HOST:PORT`` names the peer; our AE
title and timeouts are ``dicomweb.dimse`` (``DimseSettings``); retries and backoff are
``dicomweb.retries`` / ``backoff_s`` / ``max_backoff_s`` (tenacity), as for DICOMweb.
Failures are ``DimseError`` with a fixed, identifier-free ``reason``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from cxr_ray.config import DicomwebSettings, DimseSettings, check_ae_title
from cxr_ray.errors import DataError, row_error
from cxr_ray.vocabulary import ErrorCode

__all__ = [
    "FIND",
    "GET",
    "MOVE",
    "PENDING",
    "DimseError",
    "Peer",
    "Received",
    "associate",
    "find",
    "is_dimse",
    "peer",
    "retrying",
    "storage_scp",
]

logger = logging.getLogger("cxr_ray.data.dimse")

SCHEME = "dicom"
_SOURCE = re.compile(r"^dicom://(?P<aet>[^@/]+)@(?P<host>\[[^\]]+\]|[^:/\[\]]+):(?P<port>\d{1,5})$", re.I)
PENDING = (0xFF00, 0xFF01)
#: Study Root Query/Retrieve Information Model: FIND, GET and MOVE (PS3.4 C.6.2).
T = TypeVar("T")
FIND, GET, MOVE = "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.3", "1.2.840.10008.5.1.4.1.2.2.2"


def is_dimse(source: str) -> bool:
    return source.lower().startswith(f"{SCHEME}://")


@dataclass(frozen=True, slots=True)
class Peer:
    """A DICOM application entity: ``source`` as users write it."""

    aet: str
    host: str
    port: int

    @property
    def source(self) -> str:
        return f"{SCHEME}://{self.aet}@{self.host}:{self.port}"


def peer(source: str) -> Peer:
    """Parse ``dicom://AET@HOST:PORT``; ``DataError`` for anything else."""
    m = _SOURCE.match(source.rstrip("/"))
    if m is None:
        raise DataError(f"not a DIMSE address: {source!r} (use dicom://AET@HOST:PORT)")
    try:
        aet = check_ae_title(m["aet"])
    except ValueError as exc:
        raise DataError(str(exc)) from None
    port = int(m["port"])
    if not 0 < port < 65536:
        raise DataError(f"DIMSE address {source!r} has an invalid port")
    return Peer(aet, m["host"].strip("[]"), port)


def quiet_pynetdicom() -> None:
    # pynetdicom logs association details (UIDs, AE titles) at INFO.
    library_logger = logging.getLogger("pynetdicom")
    if library_logger.level == logging.NOTSET:
        library_logger.setLevel(logging.WARNING)


class DimseError(Exception):
    """An association that could not be made or broke; ``reason`` is fixed text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def associate(
    target: Peer,
    settings: DimseSettings,
    contexts: list[tuple[str, tuple[str, ...] | None]],
    *,
    scp_roles: tuple[str, ...] = (),
    handlers: list[Any] | None = None,
) -> Any:
    """An established pynetdicom association with ``target``, proposing ``contexts``
    ((abstract syntax, transfer syntaxes or ``None`` for the defaults) pairs); ``scp_roles``:
    SOP classes we take the SCP role for (C-GET). ``DimseError`` when refused or unreachable."""
    from pynetdicom import AE, build_role

    quiet_pynetdicom()
    ae = AE(ae_title=settings.calling_aet)
    ae.connection_timeout = settings.connect_timeout_s
    ae.acse_timeout = settings.dimse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.dimse_timeout_s
    for abstract, syntaxes in contexts:
        if syntaxes is None:
            ae.add_requested_context(abstract)
        else:
            ae.add_requested_context(abstract, list(syntaxes))
    roles: list[Any] = [build_role(uid, scp_role=True) for uid in scp_roles]
    assoc = ae.associate(target.host, target.port, ae_title=target.aet, ext_neg=roles, evt_handlers=handlers)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise DimseError("the DICOM peer rejected the association (check its AE title and ours)")
    if assoc.is_aborted:
        raise DimseError("the DICOM peer aborted the association")
    raise DimseError("cannot reach the DICOM peer (connection refused or timed out)")


def retrying(settings: DicomwebSettings, what: str, fn: Callable[[], T]) -> T:
    """``fn()`` retried on ``DimseError`` with exponential backoff (``dicomweb.retries``)."""
    import tenacity

    def log(state: Any) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        logger.warning(
            "DIMSE %s failed (%s); retry %d of %d in %.1f s",
            what,
            getattr(exc, "reason", type(exc).__name__),
            state.attempt_number,
            settings.retries,
            delay,
        )

    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(settings.retries + 1),
        wait=tenacity.wait_exponential(multiplier=settings.backoff_s, min=0, max=settings.max_backoff_s),
        retry=tenacity.retry_if_exception_type(DimseError),
        before_sleep=log,
        sleep=time.sleep,
        reraise=True,
    )(fn)


def find(assoc: Any, query: Any) -> list[Any]:
    """Every answer of a Study Root C-FIND; ``DimseError`` on a failure status or a drop."""

    answers = []
    for status, identifier in assoc.send_c_find(query, FIND):
        if not status:  # no answer: the association broke or timed out
            raise DimseError("the DICOM peer stopped answering a C-FIND")
        if status.Status in PENDING:
            if identifier is not None:
                answers.append(identifier)
        elif status.Status != 0x0000:
            raise DimseError(f"the DICOM peer failed a C-FIND (status 0x{status.Status:04X})")
    return answers


class Received:
    """What the storage handler received, by SOP Instance UID (thread-safe)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.data: dict[str, bytes | str] = {}
        self.lock = threading.Lock()

    def handle(self, event: Any) -> int:
        try:
            sop = str(event.request.AffectedSOPInstanceUID)
            data = event.encoded_dataset()
        except Exception:
            return 0xC210  # cannot understand
        value: bytes | str = bytes(data)
        if len(value) > self.max_bytes:
            value = row_error(
                ErrorCode.TOO_BIG, f"instance is {len(value)} bytes, over the {self.max_bytes}-byte limit"
            )
        with self.lock:
            self.data[sop] = value
        return 0x0000

    def pop(self, sop: str) -> bytes | str | None:
        with self.lock:
            return self.data.pop(sop, None)

    def clear(self) -> None:
        with self.lock:
            self.data.clear()


@contextlib.contextmanager
def storage_scp(target: Peer, dimse: DimseSettings, received: Received) -> Iterator[None]:
    """Our storage SCP on ``dimse.move_port`` for the C-MOVEs of one read task (accepting
    only ``target``'s AE title); waits (with backoff) while another task holds the port."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

    quiet_pynetdicom()
    ae = AE(ae_title=dimse.calling_aet)
    ae.require_calling_aet = [target.aet]
    for cx in StoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = None
    deadline = time.monotonic() + max(dimse.dimse_timeout_s, 30.0)
    delay = 0.2
    while server is None:
        try:
            server = ae.start_server(
                (dimse.move_bind, dimse.move_port),
                block=False,
                evt_handlers=[(evt.EVT_C_STORE, received.handle)],
            )
        except OSError:
            if time.monotonic() > deadline:
                busy = "the C-MOVE storage port (dicomweb.dimse.move_port) stayed in use"
                raise DimseError(busy) from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    try:
        yield None
    finally:
        server.shutdown()
