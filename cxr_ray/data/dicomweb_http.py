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
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from cxr_ray.config import DicomwebSettings
from cxr_ray.errors import DataError

logger = logging.getLogger("cxr_ray.data.dicomweb")

_RETRIABLE_STATUS = {408, 429}
_warned_insecure: set[str] = set()
_warn_lock = threading.Lock()

T = TypeVar("T")

INSECURE_REFUSED = (
    "credentials over plain HTTP refused: use dicomwebs:// (HTTPS), or set "
    "dicomweb.allow_insecure_http = true for a network where that is acceptable"
)


def _endpoint_auth(prefix: str, header: str) -> Any:
    import requests

    class EndpointAuth(requests.auth.AuthBase):
        """``Authorization: <header>`` on requests to URLs under ``prefix`` only."""

        def __call__(self, r: Any) -> Any:
            url = str(r.url or "")
            if url == prefix or url.startswith(prefix.rstrip("/") + "/") or url.startswith(prefix + "?"):
                r.headers["Authorization"] = header
            else:
                r.headers.pop("Authorization", None)
            return r

    return EndpointAuth()


def _basic(username: str, password: str) -> str:
    import base64

    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def _ca_adapter(ca_bundle: str) -> Any:
    from requests.adapters import HTTPAdapter

    class CaBundleAdapter(HTTPAdapter):
        """Verifies every HTTPS request with ``ca_bundle``, whatever the environment says."""

        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs["verify"] = ca_bundle
            return super().send(request, *args, **kwargs)

    return CaBundleAdapter()


def has_credentials(settings: DicomwebSettings) -> bool:
    return settings.token is not None or settings.username is not None


def make_client(url: str, settings: DicomwebSettings, session: Any = None) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for the service at ``url`` (``http[s]://...``).

    ``session``: a ``requests.Session`` to use (e.g. with response hooks); a new one if
    ``None``. ``DataError`` for credentials over plain HTTP without the opt-in.
    """
    import requests
    from dicomweb_client import DICOMwebClient

    session = session if session is not None else requests.Session()
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
    if settings.ca_bundle is not None:
        session.verify = settings.ca_bundle
        session.mount("https://", _ca_adapter(settings.ca_bundle))
    client = DICOMwebClient(
        url, session=session, timeout=(settings.connect_timeout_s, settings.read_timeout_s)
    )
    # One retry policy, ours: the client's own retries only cover a few status codes, not
    # connection errors or 500s.
    client.set_http_retry_params(retry=False)
    # dicomweb-client logs every request's UIDs at INFO, and its `retrying` dependency a
    # traceback per failed request at WARNING (even with retries off): identifiers stay out
    # of logs and our retry lines say what happened. Levels set explicitly are left alone.
    for name, level in (("dicomweb_client", logging.WARNING), ("retrying", logging.ERROR)):
        library_logger = logging.getLogger(name)
        if library_logger.level == logging.NOTSET:
            library_logger.setLevel(level)
    return client


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

    def _log(self, what: str, state: Any) -> None:
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
            if retriable(exc):
                self.server_down = True
            raise
        self.server_down = False
        return result
