"""A tiny loopback S3-compatible server that IGNORES conditional puts (``If-None-Match``).

Some S3-compatible stores (older MinIO, Ceph RGW before 18.x, many appliances) accept
``PUT`` with ``If-None-Match: *`` and overwrite the object anyway; Delta commits on them are
not compare-and-swap. SeaweedFS (``tests/s3_server.py``) honours the header, so the refusal
of such a store is tested against this one: in-memory objects, path-style requests, enough of
the S3 API for delta-rs (``PUT``/``GET`` with ``Range``/``HEAD``/``DELETE`` objects,
ListObjectsV2, multipart uploads, batch delete), no signature checks.

    with running() as server:
        server.storage_options  # for delta-rs
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape


@dataclass
class _Object:
    data: bytes
    modified: datetime

    @property
    def etag(self) -> str:
        return '"' + hashlib.md5(self.data).hexdigest() + '"'  # S3's ETag is MD5


class _Store:
    def __init__(self) -> None:
        self.objects: dict[str, _Object] = {}
        self.uploads: dict[str, dict[int, bytes]] = {}
        self.lock = threading.Lock()
        #: ``If-None-Match`` headers received (and ignored).
        self.conditional_puts = 0


def _handler(store: _Store) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _split(self) -> tuple[str, dict[str, list[str]]]:
            parts = urlsplit(self.path)
            return unquote(parts.path.lstrip("/")), parse_qs(parts.query, keep_blank_values=True)

        def _reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _missing(self) -> None:
            self._reply(404, b"<Error><Code>NoSuchKey</Code></Error>", {"Content-Type": "application/xml"})

        def do_PUT(self) -> None:
            key, q = self._split()
            data = self._body()
            if "uploadId" in q:
                with store.lock:
                    store.uploads[q["uploadId"][0]][int(q["partNumber"][0])] = data
                self._reply(200, headers={"ETag": '"' + hashlib.md5(data).hexdigest() + '"'})
                return
            if self.headers.get("If-None-Match"):
                store.conditional_puts += 1  # ... and ignored: the point of this server
            source = self.headers.get("x-amz-copy-source")
            with store.lock:
                if source is not None:
                    src = store.objects.get(unquote(source).lstrip("/"))
                    if src is None:
                        return self._missing()
                    data = src.data
                store.objects[key] = obj = _Object(data, datetime.now(UTC))
            if source is not None:
                body = f"<CopyObjectResult><ETag>{escape(obj.etag)}</ETag></CopyObjectResult>".encode()
                return self._reply(200, body, {"Content-Type": "application/xml"})
            self._reply(200, headers={"ETag": obj.etag})

        def do_GET(self) -> None:
            key, q = self._split()
            if "/" not in key or q.get("list-type"):
                return self._list(key.split("/", 1)[0], q)
            obj = store.objects.get(key)
            if obj is None:
                return self._missing()
            data, code, extra = obj.data, 200, {}
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
            if m:
                start = int(m.group(1)) if m.group(1) else max(0, len(data) - int(m.group(2)))
                end = int(m.group(2)) if m.group(1) and m.group(2) else len(data) - 1
                end = min(end, len(data) - 1)
                extra = {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
                data, code = data[start : end + 1], 206
            self._reply(code, data, {**self._meta(obj), **extra})

        def do_HEAD(self) -> None:
            key, _ = self._split()
            obj = store.objects.get(key)
            if obj is None:
                return self._reply(404)
            self.send_response(200)
            for k, v in self._meta(obj).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(obj.data)))
            self.end_headers()

        def _meta(self, obj: _Object) -> dict[str, str]:
            return {
                "ETag": obj.etag,
                "Last-Modified": format_datetime(obj.modified, usegmt=True),
                "Content-Type": "application/octet-stream",
            }

        def do_DELETE(self) -> None:
            key, q = self._split()
            with store.lock:
                if "uploadId" in q:
                    store.uploads.pop(q["uploadId"][0], None)
                else:
                    store.objects.pop(key, None)
            self._reply(204)

        def do_POST(self) -> None:
            key, q = self._split()
            body = self._body()
            if "uploads" in q:
                upload = uuid.uuid4().hex
                store.uploads[upload] = {}
                xml = f"<InitiateMultipartUploadResult><UploadId>{upload}</UploadId>"
                xml += "</InitiateMultipartUploadResult>"
                return self._reply(200, xml.encode(), {"Content-Type": "application/xml"})
            if "uploadId" in q:
                with store.lock:
                    parts = store.uploads.pop(q["uploadId"][0])
                    data = b"".join(parts[n] for n in sorted(parts))
                    store.objects[key] = obj = _Object(data, datetime.now(UTC))
                xml = f"<CompleteMultipartUploadResult><ETag>{escape(obj.etag)}</ETag>"
                xml += "</CompleteMultipartUploadResult>"
                return self._reply(200, xml.encode(), {"Content-Type": "application/xml"})
            if "delete" in q:
                bucket = key.split("/", 1)[0]
                keys = re.findall(rb"<Key>(.*?)</Key>", body)
                with store.lock:
                    for k in keys:
                        store.objects.pop(f"{bucket}/{k.decode()}", None)
                return self._reply(200, b"<DeleteResult/>", {"Content-Type": "application/xml"})
            self._reply(400)

        def _list(self, bucket: str, q: dict[str, list[str]]) -> None:
            prefix = q.get("prefix", [""])[0]
            delimiter = q.get("delimiter", [""])[0]
            after = q.get("start-after", [""])[0]
            contents, prefixes = [], set()
            for full in sorted(store.objects):
                if not full.startswith(bucket + "/"):
                    continue
                name = full[len(bucket) + 1 :]
                if not name.startswith(prefix) or (after and name <= after):
                    continue
                rest = name[len(prefix) :]
                if delimiter and delimiter in rest:
                    prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
                    continue
                obj = store.objects[full]
                contents.append(
                    f"<Contents><Key>{escape(name)}</Key><LastModified>"
                    f"{obj.modified.strftime('%Y-%m-%dT%H:%M:%S.000Z')}</LastModified>"
                    f"<ETag>{escape(obj.etag)}</ETag><Size>{len(obj.data)}</Size>"
                    "<StorageClass>STANDARD</StorageClass></Contents>"
                )
            common = "".join(
                f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in sorted(prefixes)
            )
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult>'
                f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
                f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount><MaxKeys>1000</MaxKeys>"
                f"<IsTruncated>false</IsTruncated>{''.join(contents)}{common}</ListBucketResult>"
            )
            self._reply(200, xml.encode(), {"Content-Type": "application/xml"})

    return Handler


@dataclass
class NaiveS3:
    endpoint: str
    store: _Store
    bucket: str = "naive"

    @property
    def storage_options(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "naive",
            "AWS_SECRET_ACCESS_KEY": "naive-secret",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


@contextlib.contextmanager
def running() -> Iterator[NaiveS3]:
    store = _Store()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(store))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield NaiveS3(f"http://127.0.0.1:{server.server_address[1]}", store)
    finally:
        server.shutdown()
        server.server_close()
