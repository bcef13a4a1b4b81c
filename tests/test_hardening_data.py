"""Issue 24 (data side): credentials and URIs of manifests, identifier-free errors, DICOM pixel
budgets, Parquet column types and memory, directory symlinks. Real files, real HTTP servers on
loopback, real Ray; no mocks."""

from __future__ import annotations

import http.server
import io
import os
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxr_ray.config import DataSettings, DicomwebSettings
from cxr_ray.data import manifest
from cxr_ray.data.readers import read_unit
from cxr_ray.data.sources import ReadOptions, ReadUnit, list_source
from cxr_ray.errors import DataError, DecodeError
from cxr_ray.imaging.dicom import decode_dicom


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]]

    def do_GET(self) -> None:
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def recorder() -> Iterator[tuple[int, list]]:
    seen: list = []
    handler = type("H", (_Recorder,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()


def _rows(units: list[ReadUnit], options: ReadOptions) -> list[dict]:
    return [r for u in units for b in read_unit(u, options) for r in b.to_pylist()]


def test_a_manifest_row_naming_another_host_gets_no_credentials(recorder):
    port, seen = recorder
    secret = "s3cr3t-token-value"
    settings = DicomwebSettings(
        token=secret, allow_insecure_http=True, endpoints=("dicomweb://pacs.example:8042/dw",)
    )
    uri = f"dicomweb://127.0.0.1:{port}/dw/studies/1.2.3/series/1.2.4/instances/1.2.5"
    units = manifest.uri_units([(uri, None, None)], 64, dicomweb=settings)
    rows = _rows(units, ReadOptions(dicomweb=settings))
    assert len(rows) == 1 and rows[0]["data"] is None
    assert rows[0]["error"].startswith("endpoint_not_configured")
    assert seen == []  # never contacted, so no token went anywhere


def test_credentials_over_plain_http_need_the_opt_in(recorder):
    from cxr_ray.data.dicomweb import list_units

    port, seen = recorder
    source = f"dicomweb://127.0.0.1:{port}/dw"
    with pytest.raises(DataError, match="plain HTTP"):
        list_units(source, ReadOptions(dicomweb=DicomwebSettings(token="tok-123456")))
    assert seen == []


def test_configured_endpoint_gets_the_token_only_under_its_url(recorder):
    from cxr_ray.data.dicomweb_http import make_client

    port, seen = recorder
    client = make_client(
        f"http://127.0.0.1:{port}/dw", DicomwebSettings(token="tok-abc", allow_insecure_http=True)
    )
    client._session.get(f"http://127.0.0.1:{port}/dw/studies")
    client._session.get(f"http://127.0.0.1:{port}/elsewhere")
    assert seen == [("/dw/studies", "Bearer tok-abc"), ("/elsewhere", None)]


def test_manifest_rows_outside_the_roots_are_refused_unread(tmp_path, ray_local):
    inside = tmp_path / "m" / "img.jpeg"
    inside.parent.mkdir()
    Image.new("L", (32, 32), 128).save(inside)
    uris_ = ["file:///etc/passwd", "/etc/hostname", "/nonexistent/DOE_JANE.jpeg", str(inside)]
    table = pa.table(
        {
            "uri": uris_,
            "image_id": [None] * 4,
            "label": [None] * 4,
            "patient_id": [None] * 4,
            "status": ["ok"] * 4,
        }
    )
    pq.write_table(table, tmp_path / "m" / "manifest.parquet")
    ds = manifest.source_dataset(str(tmp_path / "m" / "manifest.parquet"), DataSettings())
    rows = {r["uri"]: r for r in ds.take_all()}
    refused = [rows[u] for u in uris_[:3]]
    assert all(r["data"] is None for r in refused)
    assert len({r["error"] for r in refused}) == 1  # exists or not: the same message
    assert refused[0]["error"].startswith("uri_not_allowed")
    assert rows[str(inside)]["data"] == inside.read_bytes()


def test_error_text_carries_no_path_member_or_link_target(tmp_path):
    import tarfile

    root = tmp_path / "DOE_JANE_MRN12345"
    root.mkdir()
    with tarfile.open(root / "DOE_JANE_batch.tar", "w") as tf:
        link = tarfile.TarInfo("DOE_JANE_link.jpeg")
        link.type, link.linkname = tarfile.SYMTYPE, "/home/DOE_JANE_MRN12345/x"
        tf.addfile(link)
        for name in ("../DOE_JANE_up.jpeg", "/abs/DOE_JANE.jpeg"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    (root / "DOE_JANE_broken.zip").write_bytes(b"PK\x03\x04 not a zip MRN12345")
    os.symlink("/etc/DOE_JANE_MRN12345", root / "DOE_JANE_out.jpeg")
    os.symlink("/etc", root / "DOE_JANE_dir")
    (root / os.fsdecode(b"MRN12345_\xff.jpeg")).write_bytes(b"x")
    options = ReadOptions()
    rows = _rows(list_source(str(root), options), options)
    errors = [r["error"] for r in rows if r["error"]]
    assert len(errors) >= 7, errors
    for text in errors:
        for ident in ("DOE", "JANE", "MRN12345", "/etc", "/home", "/abs"):
            assert ident not in text, (ident, text)


def test_directory_symlinks_inside_followed_outside_an_error_row(tmp_path):
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    Image.new("L", (8, 8)).save(root / "real" / "a.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("L", (8, 8)).save(outside / "b.png")
    os.symlink(root / "real", root / "alias")
    os.symlink(outside, root / "away")
    os.symlink(root, root / "real" / "loop")
    options = ReadOptions()
    rows = {r["uri"]: r for r in _rows(list_source(str(root), options), options)}
    assert rows[str(root / "alias" / "a.png")]["data"]  # followed
    assert rows[str(root / "away")]["error"].startswith("symlink_outside_root")
    # A loop (and the second way to a listed folder): error rows, not silence or recursion.
    loops = [r for u, r in rows.items() if u.endswith("/loop")]
    assert len(loops) == 1 and loops[0]["error"].startswith("duplicate_folder")
    assert all(not u.startswith(str(outside)) for u in rows)


def _rle_frame(rows: int, cols: int) -> bytes:
    header = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56)
    n = rows * cols
    return header + b"\x81\x00" * (n // 128) + (bytes([0, 0]) * (n % 128))[: 2 * (n % 128 > 0)]


def _dicom(frames: list[bytes], rows: int, cols: int, syntax: str) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_multi_frame_dicom_decodes_one_frame_only():
    data = _dicom([_rle_frame(512, 512)] * 64, 512, 512, "1.2.840.10008.1.2.5")
    tracemalloc.start()
    arr = decode_dicom(data, max_pixels=64_000_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert arr.shape == (512, 512)
    # 64 frames of 262,144 pixels decoded would be >= 16.7 MB; one frame and its float copy ~2 MB.
    assert peak < 8_000_000, peak


def test_frames_times_pixels_over_the_budget_is_refused_before_decoding():
    data = _dicom([_rle_frame(1024, 1024)] * 96, 1024, 1024, "1.2.840.10008.1.2.5")
    with pytest.raises(DecodeError, match="pixel_budget"):
        decode_dicom(data, max_pixels=64_000_000)


def test_encapsulated_jpeg_bigger_than_its_header_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (4000, 4000), 90).save(buf, "JPEG")
    data = _dicom([buf.getvalue()], 256, 256, "1.2.840.10008.1.2.4.50")
    tracemalloc.start()
    with pytest.raises(DecodeError, match="frame_mismatch"):
        decode_dicom(data, max_pixels=64_000_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8_000_000, peak


def _parquet(target: Path, **cols) -> Path:
    pq.write_table(pa.table(cols), target)
    return target


@pytest.mark.parametrize(
    "cols",
    [
        {"image": pa.array(range(500), pa.int64())},
        {"image": pa.array([[1, 2]] * 500, pa.list_(pa.int64()))},
        {"image": pa.array([b"x"] * 500, pa.binary()), "path": pa.array(range(500), pa.int64())},
    ],
    ids=["int64-image", "list-image", "int64-path"],
)
def test_parquet_column_types_are_checked_at_listing(tmp_path, cols):
    path = _parquet(tmp_path / "t.parquet", **cols)
    with pytest.raises(DataError, match="Parquet column"):
        list_source(str(path), ReadOptions())
    # Inside a folder the table is one error row, and the rest of the folder is listed.
    options = ReadOptions()
    rows = _rows(list_source(str(tmp_path), options), options)
    assert len(rows) == 1 and rows[0]["error"].startswith("unusable_container")
    # A reader given such a row group anyway: still one row per table row, never an exception.
    unit = ReadUnit("parquet", str(path), row_group=0, num_rows=500)
    assert len(_rows([unit], ReadOptions(name_column=None))) == 500


def test_dicomweb_messages_never_quote_library_text():
    from cxr_ray.data.dicomweb_http import describe

    uid = "1.2.826.0.1.3680043.8.498.123456789012345678901234567890123456789012345"
    text = describe(ValueError(f"Study Instance UID {uid!r} is not a valid DICOM UID"))
    assert uid not in text and "ValueError" in text


def _ca_and_cert(tmp_path: Path) -> tuple[Path, Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test hospital CA"))
        .issuer_name(name("test hospital CA"))
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(pem))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"


def test_configured_ca_bundle_wins_over_requests_ca_bundle(tmp_path, monkeypatch):
    import ssl

    import certifi

    from cxr_ray.data.dicomweb_http import make_client

    ca, cert, key = _ca_and_cert(tmp_path)
    seen: list = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Recorder,), {"seen": seen}))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())  # a bundle without our CA
        url = f"https://127.0.0.1:{server.server_address[1]}/dw"
        client = make_client(url, DicomwebSettings(ca_bundle=str(ca)))
        assert client._session.get(url + "/studies").status_code == 404  # verified, answered
        assert seen == [("/dw/studies", None)]
    finally:
        server.shutdown()


def test_a_non_conformant_study_uid_is_one_error_row_not_an_aborted_listing():
    """A QIDO-RS answer the run cannot avoid: a PACS listing a 66-character study UID (Orthanc
    refuses such files on upload, so a loopback DICOMweb server gives the answer)."""
    import json

    from cxr_ray.data.dicomweb import list_units

    bad = "1.2.826.0.1.3680043.8.498." + "1" * 40  # 66 characters: over the 64 of PS3.5
    good = "1.2.826.0.1.3680043.8.498.1"

    class Qido(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/dw/studies":
                body = [{"0020000D": {"vr": "UI", "Value": [u]}} for u in (bad, good)]
            elif path == f"/dw/studies/{good}/instances":
                body = [
                    {
                        "0020000E": {"vr": "UI", "Value": [good + ".1"]},
                        "00080018": {"vr": "UI", "Value": [good + ".1.1"]},
                        "00080060": {"vr": "CS", "Value": ["CR"]},
                    }
                ]
            else:
                body = []
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Qido)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source = f"dicomweb://127.0.0.1:{server.server_address[1]}/dw"
        units = list_units(source, ReadOptions(dicomweb=DicomwebSettings(retries=0)))
    finally:
        server.shutdown()
    refs = [r for u in units for r in u.refs]
    assert len(refs) == 2
    errors = [r for r in refs if r.error]
    assert len(errors) == 1 and errors[0].error.startswith("study_unlisted")
    assert bad not in errors[0].error and bad in errors[0].uri  # the UID only in the uri
    assert [r.uri for r in refs if not r.error] == [
        f"{source}/studies/{good}/series/{good}.1/instances/{good}.1.1"
    ]
