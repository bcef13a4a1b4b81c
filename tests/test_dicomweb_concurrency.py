"""DICOMweb retrieval under concurrency, against a real Orthanc behind a small loopback proxy.

The proxy (``Proxy``) forwards every request to Orthanc and records what the client sent
(path, ``Accept``, ``Authorization``, which TCP connection) and how many requests were in
flight at once; it can hold each request a while (so overlap is measurable), fail one
instance, refuse ``transfer-syntax=*`` or redirect. Orthanc answers everything it forwards:
the server is never mocked.
"""

from __future__ import annotations

import http.server
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pydicom
import pytest
import requests

from cxr_ray.config import DicomwebSettings
from cxr_ray.data.dicomweb_http import ordered_map
from cxr_ray.data.dicomweb_wado import ACCEPT_AS_STORED
from cxr_ray.data.manifest import source_units
from cxr_ray.data.readers import read_unit
from cxr_ray.data.sources import ReadOptions
from tests import dicom_factory as factory
from tests.orthanc_server import AUTH_PASSWORD, AUTH_USER, Orthanc
from tests.orthanc_server import orthanc as orthanc  # the module-scoped fixtures
from tests.orthanc_server import orthanc_auth as orthanc_auth

JPEG_BASELINE, EXPLICIT_LE = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"


@dataclass
class Proxy:
    """A loopback HTTP/1.1 proxy to ``upstream`` (Orthanc's base URL)."""

    upstream: str
    auth: tuple[str, str] | None = None
    delay_s: float = 0.0
    fail: set[str] = field(default_factory=set)  # SOP UIDs answered 500, always
    redirect: dict[str, str] = field(default_factory=dict)  # SOP UID -> Location
    refuse_any_syntax: bool = False  # 406 for transfer-syntax=*
    seen: list[tuple[str, str | None, str | None, tuple[str, int]]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Any = None

    @property
    def source(self) -> str:
        return f"dicomweb://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.seen.append(
                (h.path, h.headers.get("Accept"), h.headers.get("Authorization"), h.client_address)
            )
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            answer = self._answer_for(h)
        finally:
            # Out of flight before the answer is written: once the client has the body it may
            # send its next request, and that must not count as overlapping this one.
            with self.lock:
                self.in_flight -= 1
        self._answer(h, *answer)

    def _answer_for(self, h: http.server.BaseHTTPRequestHandler) -> tuple[int, bytes, dict]:
        time.sleep(self.delay_s)
        sop = h.path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        accept = h.headers.get("Accept") or ""
        if sop in self.redirect:
            return 302, b"", {"Location": self.redirect[sop]}
        if sop in self.fail:
            return 500, b"broken", {"Content-Type": "text/plain"}
        if self.refuse_any_syntax and "transfer-syntax=*" in accept:
            return 406, b"not acceptable", {"Content-Type": "text/plain"}
        if not h.path.startswith("/dicom-web/"):
            return 404, b"", {}
        headers = {"Accept": accept} if accept else {}
        r = requests.get(self.upstream + h.path, headers=headers, auth=self.auth, timeout=30)
        return r.status_code, r.content, {"Content-Type": r.headers.get("Content-Type", "")}

    @staticmethod
    def _answer(h: http.server.BaseHTTPRequestHandler, status: int, body: bytes, headers: dict) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def connections(self) -> set[tuple[str, int]]:
        return {s[3] for s in self.seen}


@pytest.fixture()
def proxy_to(request) -> Iterator[Any]:
    started: list[http.server.ThreadingHTTPServer] = []

    def start(server: Orthanc, **kw: Any) -> Proxy:
        p = Proxy(server.base_url, auth=server.credentials, **kw)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def do_GET(self) -> None:
                p.handle(self)

            def log_message(self, *args: object) -> None:
                pass

        p.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        p.server.daemon_threads = True
        threading.Thread(target=p.server.serve_forever, daemon=True).start()
        started.append(p.server)
        return p

    yield start
    for s in started:
        s.shutdown()
        s.server_close()


@pytest.fixture()
def pacs(orthanc: Orthanc) -> Orthanc:
    orthanc.clear()
    return orthanc


def _options(**dw: Any) -> ReadOptions:
    dw = {"retries": 1, "backoff_s": 0.01, "max_backoff_s": 0.05, "connect_timeout_s": 2.0, **dw}
    return ReadOptions(rows_per_block=64, dicomweb=DicomwebSettings(**dw))


def _one_study(n: int) -> list[factory.Instance]:
    return factory.archive(1, series_per_study=1, instances_per_series=n)


def _rows(source: str, options: ReadOptions) -> tuple[list[str], list[dict]]:
    units = source_units(source, options)
    listed = [r.uri for u in units for r in u.refs]
    rows = [r for u in units for b in read_unit(u, options) for r in b.to_pylist()]
    return listed, rows


def _sop(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def _retrievals(proxy: Proxy) -> list[tuple[str, str | None, str | None, tuple[str, int]]]:
    return [s for s in proxy.seen if "/instances/" in s[0] and not s[0].split("?")[0].endswith("/instances")]


def test_requests_overlap_on_kept_alive_connections_and_rows_keep_their_order(pacs, proxy_to):
    instances = _one_study(12)
    factory.upload(instances, pacs)
    by_sop = {i.tags.sop_instance_uid: i.data for i in instances}
    timings = {}
    for concurrency in (1, 4):
        proxy = proxy_to(pacs, delay_s=0.15)
        t0 = time.perf_counter()
        listed, rows = _rows(proxy.source, _options(concurrency=concurrency))
        timings[concurrency] = time.perf_counter() - t0
        assert [r["uri"] for r in rows] == listed and len(rows) == 12  # in order, none lost
        assert all(r["error"] is None and r["data"] == by_sop[_sop(r["uri"])] for r in rows)
        gets = _retrievals(proxy)
        assert len(gets) == 12
        # Listing is over before retrieval starts: what overlapped were retrievals.
        assert proxy.max_in_flight == concurrency
        # One read task, one session: its connections are reused (keep-alive), one per thread.
        assert len({g[3] for g in gets}) <= concurrency
    assert timings[4] < timings[1] * 0.6


def test_the_window_of_results_held_ahead_is_bounded():
    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.002)
        return i

    consumed = 0
    for i, out in enumerate(ordered_map(list(range(200)), work, 4)):
        assert out == i
        consumed += 1
        time.sleep(0.005)  # a consumer slower than the threads
        with lock:
            assert len(started) <= consumed + 2 * 4
    assert consumed == 200


def test_one_failing_instance_is_one_error_row_and_the_rest_arrive(pacs, proxy_to):
    instances = _one_study(10)
    factory.upload(instances, pacs)
    broken = instances[3].tags.sop_instance_uid
    proxy = proxy_to(pacs, fail={broken})
    options = _options(concurrency=4)
    units = source_units(proxy.source, options)
    # Another instance deleted from the PACS after it was listed: Orthanc answers 404.
    gone = instances[7].tags.sop_instance_uid
    with requests.Session() as s:
        (hit,) = s.post(f"{pacs.base_url}/tools/lookup", data=gone, timeout=10).json()
        s.delete(f"{pacs.base_url}/instances/{hit['ID']}", timeout=10).raise_for_status()
    rows = [r for u in units for b in read_unit(u, options) for r in b.to_pylist()]
    assert [r["uri"] for r in rows] == [r.uri for u in units for r in u.refs]
    errors = {_sop(r["uri"]): r["error"] for r in rows if r["error"]}
    assert set(errors) == {broken, gone}
    assert errors[broken].startswith("unretrievable") and "HTTP 500" in errors[broken]
    assert "HTTP 404" in errors[gone]
    assert all(broken not in e and gone not in e for e in errors.values())  # no UID in the text
    by_sop = {i.tags.sop_instance_uid: i.data for i in instances}
    assert all(r["data"] == by_sop[_sop(r["uri"])] for r in rows if not r["error"])
    # The 500 was retried (retries=1), the 404 was not.
    assert sum(1 for g in _retrievals(proxy) if broken in g[0]) == 2
    assert sum(1 for g in _retrievals(proxy) if gone in g[0]) == 1


def _syntax(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)


def test_stored_transfer_syntax_is_asked_for_and_the_server_default_is_the_fallback(pacs, proxy_to):
    instances = _one_study(6)
    factory.upload(instances, pacs)
    by_sop = {i.tags.sop_instance_uid: i.data for i in instances}
    proxy = proxy_to(pacs)
    _, rows = _rows(proxy.source, _options(concurrency=2))
    assert {g[1] for g in _retrievals(proxy)} == {ACCEPT_AS_STORED}
    # As stored: the very file uploaded (JPEG baseline, not transcoded), so image_id matches.
    assert all(r["data"] == by_sop[_sop(r["uri"])] and _syntax(r["data"]) == JPEG_BASELINE for r in rows)

    refusing = proxy_to(pacs, refuse_any_syntax=True)
    _, rows = _rows(refusing.source, _options(concurrency=2))
    assert len(rows) == 6 and all(r["error"] is None for r in rows)
    # Orthanc's default when not asked for "*": transcoded to Explicit VR Little Endian.
    assert {_syntax(r["data"]) for r in rows} == {EXPLICIT_LE}
    for r in rows:
        ds = pydicom.dcmread(io.BytesIO(r["data"]))
        assert ds.SOPInstanceUID == _sop(r["uri"]) and ds.pixel_array.size > 0
    asked = [g[1] for g in _retrievals(refusing)]
    refused = [a for a in asked if a == ACCEPT_AS_STORED]
    # Refused at most once per thread in flight, then the task asks for the default only.
    assert 1 <= len(refused) <= 2 and len(asked) == 6 + len(refused)
    assert asked[-1] != ACCEPT_AS_STORED


def test_credentials_go_to_the_endpoint_only_even_on_redirects(orthanc_auth, proxy_to):
    orthanc_auth.clear()
    instances = _one_study(4)
    factory.upload(instances, orthanc_auth)
    other_host: list[tuple[str, str | None]] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            other_host.append((self.path, self.headers.get("Authorization")))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    elsewhere = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=elsewhere.serve_forever, daemon=True).start()
    try:
        sops = [i.tags.sop_instance_uid for i in instances]
        proxy = proxy_to(orthanc_auth)
        port = proxy.server.server_address[1]
        proxy.redirect = {
            sops[1]: f"http://localhost:{elsewhere.server_address[1]}/wado/{sops[1]}",  # another host
            sops[2]: f"http://127.0.0.1:{port}/not-dicom-web/{sops[2]}",  # same host, outside the path
        }
        options = _options(
            concurrency=4, username=AUTH_USER, password=AUTH_PASSWORD, allow_insecure_http=True
        )
        _, rows = _rows(proxy.source, options)
    finally:
        elsewhere.shutdown()
        elsewhere.server_close()
    errors = {_sop(r["uri"]) for r in rows if r["error"]}
    assert errors == {sops[1], sops[2]} and len(rows) == 4
    assert other_host and all(auth is None for _, auth in other_host)
    under = [s for s in proxy.seen if s[0].startswith("/dicom-web/")]
    outside = [s for s in proxy.seen if not s[0].startswith("/dicom-web/")]
    assert under and all(s[2] is not None and s[2].startswith("Basic ") for s in under)
    assert outside and all(s[2] is None for s in outside)


def test_the_next_block_is_retrieved_while_the_last_one_is_decoded(pacs, proxy_to):
    instances = _one_study(24)
    factory.upload(instances, pacs)
    proxy = proxy_to(pacs, delay_s=0.02)
    options = ReadOptions(
        rows_per_block=8, dicomweb=DicomwebSettings(concurrency=2, blocks_per_task=3, retries=0)
    )
    (unit,) = source_units(proxy.source, options)  # one read task: 3 blocks of 8
    blocks = read_unit(unit, options)
    first = next(blocks)
    assert first.num_rows == 8
    time.sleep(1.0)  # the consumer "decodes" its first block
    fetched = len(_retrievals(proxy))
    # The next block's instances came meanwhile (not just a couple of threads' worth), and
    # never more than a block ahead.
    assert 14 <= fetched <= 16
    rest = list(blocks)
    assert [b.num_rows for b in rest] == [8, 8]
    assert all(r["error"] is None for b in [first, *rest] for r in b.to_pylist())
