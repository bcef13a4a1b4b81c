"""HTTP for DICOMweb sources: the client, where credentials may go, TLS, retries, messages.

- **Credentials go only to the endpoint the client was made for.** They are a requests auth
  object that adds the ``Authorization`` header to a request only when its URL is under the
  endpoint's URL (so a redirect or a URL built from a server's answer never gets them), and
  ``make_client`` refuses them over plain HTTP unless ``dicomweb.allow_insecure_http`` is set
  (then it warns once per endpoint). Which endpoints a run may contact at all is decided when
  listing (``dicomweb.units_for_uris``: a manifest row naming any other service is an error
  row).
- **The configured CA bundle wins.** ``requests`` lets ``REQUESTS_CA_BUNDLE`` /
  ``CURL_CA_BUNDLE`` replace a session's ``verify``; with ``dicomweb.ca_bundle`` set, an
  adapter passes it to every HTTPS request itself.
- **Retries** (tenacity): a timeout, a connection error or an HTTP 5xx/408/429 is retried
  ``retries`` times with exponential backoff (``backoff_s`` doubling up to
  ``max_backoff_s``); once the server looks down, further requests of the same caller are
  tried once until one succeeds. Retry log lines say what failed and how, never a URL (URLs
  hold UIDs) or a credential.
- **Keep-alive and requests in flight**: ``make_session`` gives one ``requests.Session`` whose
  connection pool holds ``pool`` connections to the endpoint, shared by the threads of
  ``ordered_map`` (results in input order, at most a window of them held at once).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from cxr_ray.config import DicomwebSettings
from cxr_ray.errors import DataError

logger = logging.getLogger("cxr_ray.data.dicomweb")

_RETRIABLE_STATUS = {408, 429}
R = TypeVar("R")
_warned_insecure: set[str] = set()
_warn_lock = threading.Lock()

T = TypeVar("T")

INSECURE_REFUSED = (
    "credentials over plain HTTP refused: use dicomwebs:// (HTTPS), or set "
    "dicomweb.allow_insecure_http = true for a network where that is acceptable"
)


def _under(url: str, prefix: str) -> bool:
    return url == prefix or url.startswith(prefix.rstrip("/") + "/") or url.startswith(prefix + "?")


def _endpoint_auth(prefix: str, header: str) -> Any:
    import requests

    class EndpointAuth(requests.auth.AuthBase):
        """``Authorization: <header>`` on requests to URLs under ``prefix`` only."""

        def __call__(self, r: Any) -> Any:
            if _under(str(r.url or ""), prefix):
                r.headers["Authorization"] = header
            else:
                r.headers.pop("Authorization", None)
            return r

    return EndpointAuth()


@functools.cache
def _session_class() -> Any:
    import requests

    class EndpointSession(requests.Session):
        """A session whose auth object decides again on every redirect: ``requests`` itself
        keeps ``Authorization`` on a redirect to the same host, whatever the path."""

        def rebuild_auth(self, prepared_request: Any, response: Any) -> None:
            super().rebuild_auth(prepared_request, response)
            if self.auth is not None and not isinstance(self.auth, tuple):
                self.auth(prepared_request)

    return EndpointSession


def _basic(username: str, password: str) -> str:
    import base64

    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def _ca_adapter(ca_bundle: str, pool: int) -> Any:
    from requests.adapters import HTTPAdapter

    class CaBundleAdapter(HTTPAdapter):
        """Verifies every HTTPS request with ``ca_bundle``, whatever the environment says."""

        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs["verify"] = ca_bundle
            return super().send(request, *args, **kwargs)

    return CaBundleAdapter(pool_maxsize=pool)


def has_credentials(settings: DicomwebSettings) -> bool:
    return settings.token is not None or settings.username is not None


def make_session(url: str, settings: DicomwebSettings, pool: int = 1, session: Any = None) -> Any:
    """A keep-alive ``requests.Session`` for the service at ``url`` (``http[s]://...``):
    credentials only to URLs under ``url`` (redirects included), the configured CA bundle on
    every HTTPS request, ``pool`` connections kept open for threads sharing it.

    ``session``: one to harden instead of a new one (e.g. with response hooks). ``DataError``
    for credentials over plain HTTP without the opt-in.
    """
    from requests.adapters import HTTPAdapter

    session = session if session is not None else _session_class()()
    if has_credentials(settings):
        if url.lower().startswith("http://"):
            if not settings.allow_insecure_http:
                raise DataError(INSECURE_REFUSED)
            with _warn_lock:
                first = url not in _warned_insecure
                _warned_insecure.add(url)
            if first:
                logger.warning(
                    "DICOMweb credentials are sent over plain HTTP (dicomweb.allow_insecure_http); "
                    "anyone on the network path can read them"
                )
        if settings.token is not None:
            header = f"Bearer {settings.token.get_secret_value()}"
        else:
            password = settings.password.get_secret_value() if settings.password is not None else ""
            header = _basic(settings.username or "", password)
        session.auth = _endpoint_auth(url, header)
    if pool > 1:
        session.mount("http://", HTTPAdapter(pool_maxsize=pool))
        session.mount("https://", HTTPAdapter(pool_maxsize=pool))
    if settings.ca_bundle is not None:
        session.verify = settings.ca_bundle
        session.mount("https://", _ca_adapter(settings.ca_bundle, pool))
    return session


def make_client(url: str, settings: DicomwebSettings, session: Any = None, pool: int = 1) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for the service at ``url`` (``http[s]://...``) over
    ``make_session(url, settings, pool, session)``."""
    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(
        url,
        session=make_session(url, settings, pool, session),
        timeout=(settings.connect_timeout_s, settings.read_timeout_s),
    )
    # One retry policy, ours: the client's own retries only cover a few status codes, not
    # connection errors or 500s.
    client.set_http_retry_params(retry=False)
    quiet_libraries()
    return client


def quiet_libraries() -> None:
    """dicomweb-client logs every request's UIDs at INFO, and its ``retrying`` dependency a
    traceback per failed request at WARNING (even with retries off): identifiers stay out of
    logs and our retry lines say what happened. Levels set explicitly are left alone."""
    for name, level in (("dicomweb_client", logging.WARNING), ("retrying", logging.ERROR)):
        library_logger = logging.getLogger(name)
        if library_logger.level == logging.NOTSET:
            library_logger.setLevel(level)


def ordered_map(
    items: Sequence[T], work: Callable[[T], R], threads: int, ahead: int = 0
) -> Generator[R, None, None]:
    """``work(item)`` for each item on ``threads`` threads, yielded in input order.

    At most ``max(2 * threads, ahead)`` items are started ahead of the one the caller waits
    for, so memory stays bounded whatever the consumer's pace (``Executor.map`` would start
    them all). ``work`` must not raise. Closing the iterator early cancels what has not
    started.
    """
    if threads <= 1 or len(items) <= 1:
        yield from map(work, items)
        return
    window = max(2 * threads, ahead)
    pending: deque[Future[R]] = deque()
    pool = ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="dicomweb")
    try:
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def retriable(exc: BaseException) -> bool:
    """Timeouts, connection errors (incl. a body cut short) and HTTP 5xx/408/429."""
    import requests

    if isinstance(exc, requests.HTTPError):
        status = _status(exc)
        return status is not None and (status >= 500 or status in _RETRIABLE_STATUS)
    return isinstance(
        exc, requests.ConnectionError | requests.Timeout | requests.exceptions.ChunkedEncodingError
    )


def server_gone(exc: BaseException) -> bool:
    """A connection-level failure (no HTTP answer at all), after every retry."""
    import requests

    return isinstance(
        exc, requests.ConnectionError | requests.Timeout | requests.exceptions.ChunkedEncodingError
    )


def describe(exc: BaseException) -> str:
    """What went wrong, without URLs (they hold UIDs), credentials or library message text
    (dicomweb-client's ``ValueError`` quotes the UID it refused): fixed texts only."""
    import requests

    status = _status(exc)
    if status in (401, 403):
        return (
            f"the DICOMweb server refused the credentials (HTTP {status}): check dicomweb.username "
            "and dicomweb.password, or dicomweb.token"
        )
    if isinstance(exc, requests.HTTPError) and status is not None:
        reason = getattr(getattr(exc, "response", None), "reason", "") or ""
        reason = reason if re.fullmatch(r"[A-Za-z \-]{0,40}", reason) else ""
        return f"HTTP {status} {reason}".strip()
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS verification of the DICOMweb server failed (dicomweb.ca_bundle)"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connecting to the DICOMweb server timed out"
    if isinstance(exc, requests.Timeout):
        return "the DICOMweb server did not answer in time (dicomweb.read_timeout_s)"
    if isinstance(exc, requests.ConnectionError | requests.exceptions.ChunkedEncodingError):
        errno = re.search(r"\[Errno -?\d+\] [A-Za-z ]+", str(exc))
        return f"cannot reach the DICOMweb server ({errno.group(0).strip() if errno else type(exc).__name__})"
    if isinstance(exc, DataError):
        return str(exc)  # ours: fixed texts
    return f"{type(exc).__name__} (details withheld: they can quote identifiers)"


class Caller:
    """Runs requests with retries and backoff, remembering whether the server looks down."""

    def __init__(self, settings: DicomwebSettings) -> None:
        self.settings = settings
        self.server_down = False
        self.retried = 0
        self._lock = threading.Lock()  # shared by the threads of one read task

    def _log(self, what: str, state: Any) -> None:
        with self._lock:
            self.retried += 1
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        logger.warning(
            "DICOMweb %s failed (%s); retry %d of %d in %.1f s",
            what,
            describe(exc) if exc is not None else "?",
            state.attempt_number,
            self.settings.retries,
            delay,
        )

    def __call__(self, what: str, fn: Callable[[], T]) -> T:
        import tenacity

        s = self.settings
        attempts = 1 if self.server_down else s.retries + 1
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(attempts),
            wait=tenacity.wait_exponential(multiplier=s.backoff_s, min=0, max=s.max_backoff_s),
            retry=tenacity.retry_if_exception(retriable),
            before_sleep=lambda state: self._log(what, state),
            sleep=time.sleep,
            reraise=True,
        )
        try:
            result = retrying(fn)
        except Exception as exc:
            # Only no answer at all means the server is down: an instance that keeps
            # answering 500 must not cost the others their retries.
            if server_gone(exc):
                self.server_down = True
            raise
        self.server_down = False
        return result
