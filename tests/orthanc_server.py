"""A real Orthanc PACS for tests: Debian's ``orthanc`` with the ``orthanc-dicomweb`` plugin.

Started as a plain process with its own JSON config: HTTP on a free loopback port
(``RemoteAccessAllowed: false``), the DICOM port disabled unless ``dicom_port`` is given (then
on every interface, Orthanc has no option to narrow it, with ``dicom_modalities`` as the peers
allowed to query and retrieve), storage and index in a tmp folder,
the DICOMweb plugin loaded from where Debian installs it, and either no authentication or
HTTP basic auth for one user (``RegisteredUsers``). Tests that use it skip with a reason
where Orthanc or the plugin is absent (``apt-get install orthanc orthanc-dicomweb``; ``.ci/run``
does it).

Use the fixtures (``orthanc``: no auth; ``orthanc_auth``: basic auth), importing them into a
test module, or ``running(folder)`` as a context manager::

    from tests.orthanc_server import orthanc  # noqa: F401  (a pytest fixture)

    def test_x(orthanc):
        orthanc.upload(dicom_bytes)
        source = orthanc.source  # "dicomweb://127.0.0.1:PORT/dicom-web"
"""

from __future__ import annotations

import contextlib
import glob
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

#: Where Debian's packages put the server and the plugin (``dpkg -L orthanc-dicomweb``).
BINARY_CANDIDATES = ("Orthanc", "/usr/sbin/Orthanc", "/usr/bin/Orthanc")
PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/lib/*/orthanc/libOrthancDicomWeb.so*",
)
START_TIMEOUT_S = 30.0


def find_binary() -> str | None:
    for candidate in BINARY_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def find_plugin() -> str | None:
    for pattern in PLUGIN_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def unavailable_reason() -> str | None:
    """Why Orthanc cannot run here, or ``None``."""
    if find_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if find_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """One Orthanc process on loopback; ``stop()``/``start()``/``restart()`` keep port and data."""

    root: Path
    users: dict[str, str] | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    #: The DICOM (DIMSE) port, or ``None`` to keep it disabled. Orthanc binds it on every
    #: interface (no option narrows it), so tests pick a free port and use loopback.
    dicom_port: int | None = None
    #: Orthanc's ``DicomModalities``: name -> (AE title, host, port) of peers it may send to
    #: (C-MOVE destinations) and that may query and retrieve.
    dicom_modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    aet: str = "ORTHANC"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    @property
    def source(self) -> str:
        """The cxr-ray source string for this server (no credentials in it)."""
        return f"dicomweb://127.0.0.1:{self.port}/dicom-web"

    @property
    def dimse_source(self) -> str:
        """The cxr-ray DIMSE address of this server (``dicom://AET@127.0.0.1:PORT``)."""
        return f"dicom://{self.aet}@127.0.0.1:{self.dicom_port}"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """(user, password) of the one registered user, or ``None`` without authentication."""
        if not self.users:
            return None
        return next(iter(self.users.items()))

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    def config(self) -> dict[str, Any]:
        storage = str(self.root / "storage")
        return {
            "Name": "cxr-ray-test",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "StorageCompression": False,
            "Plugins": [find_plugin()],
            "HttpServerEnabled": True,
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": dict(self.users or {}),
            "DicomServerEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpCompressionEnabled": False,
            "HttpDescribeErrors": True,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 16,
            "KeepAlive": True,
            # Unknown SOP classes (and every class the tests use) are stored as received.
            "UnknownSopClassAccepted": True,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            **self._dicom_config(),
        }

    def _dicom_config(self) -> dict[str, Any]:
        if self.dicom_port is None:
            return {}
        return {
            "DicomServerEnabled": True,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": True,
            "DicomModalities": {k: list(v) for k, v in self.dicom_modalities.items()},
            # Find/get/move for the registered peers only; C-STORE from anyone (the default).
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomScuTimeout": 10,
        }

    def _session(self) -> requests.Session:
        s = requests.Session()
        s.auth = self.credentials
        return s

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        binary = find_binary()
        if binary is None:
            raise RuntimeError(unavailable_reason())
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with self._session() as s:
                    if s.get(f"{self.base_url}/system", timeout=1).ok:
                        plugins = s.get(f"{self.base_url}/plugins", timeout=2).json()
                        if "dicom-web" not in plugins:
                            self.stop()
                            raise RuntimeError(f"the DICOMweb plugin did not load: {self.log_tail()}")
                        return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer /system within {timeout:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ REST helpers

    def upload(self, data: bytes) -> dict[str, Any]:
        """POST one DICOM file to ``/instances``; Orthanc's answer (``ID``, ``Status``...)."""
        with self._session() as s:
            r = s.post(f"{self.base_url}/instances", data=data, timeout=60)
            r.raise_for_status()
            answer: dict[str, Any] = r.json()
        return answer

    def upload_many(self, blobs: list[bytes]) -> None:
        with self._session() as s:
            for data in blobs:
                s.post(f"{self.base_url}/instances", data=data, timeout=60).raise_for_status()

    def file_of(self, sop_instance_uid: str) -> bytes:
        """The stored file of an instance, by its SOP Instance UID (REST API, not DICOMweb)."""
        with self._session() as s:
            r = s.post(
                f"{self.base_url}/tools/lookup", data=sop_instance_uid, timeout=10
            )  # returns the Orthanc ids of every resource with that UID
            r.raise_for_status()
            (hit,) = [h for h in r.json() if h["Type"] == "Instance"]
            f = s.get(f"{self.base_url}/instances/{hit['ID']}/file", timeout=30)
            f.raise_for_status()
            return f.content

    def clear(self) -> None:
        """Delete every study (a fresh archive for the next test)."""
        with self._session() as s:
            for study in s.get(f"{self.base_url}/studies", timeout=30).json():
                s.delete(f"{self.base_url}/studies/{study}", timeout=30).raise_for_status()

    def count_instances(self) -> int:
        with self._session() as s:
            return int(s.get(f"{self.base_url}/statistics", timeout=10).json()["CountInstances"])


@contextlib.contextmanager
def running(root: Path, users: dict[str, str] | None = None, **dicom: Any) -> Iterator[Orthanc]:
    """A started Orthanc in ``root``; skips the calling test where it cannot run.

    ``dicom``: ``dicom_port`` and ``dicom_modalities`` (``Orthanc`` fields) for its DICOM port.
    """
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    server = Orthanc(root, users=users, **dicom)
    try:
        server.start()
    except RuntimeError as exc:
        pytest.skip(f"Orthanc could not start: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc without authentication, shared by a test module (``clear()`` between tests)."""
    with running(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


#: The basic-auth user of ``orthanc_auth`` (test-only credentials).
AUTH_USER, AUTH_PASSWORD = "radiographer", "not-the-real-password-42"


@pytest.fixture(scope="module")
def orthanc_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc with HTTP basic auth (``AUTH_USER`` / ``AUTH_PASSWORD``)."""
    with running(tmp_path_factory.mktemp("orthanc-auth"), users={AUTH_USER: AUTH_PASSWORD}) as server:
        yield server
