"""Generated test images: X-ray-like JPEG/PNG/DICOM and every kind of broken input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_ray.data import synthetic


def xray_array(h: int = 320, w: int = 256, seed: int = 0, bits: int = 8) -> np.ndarray:
    return synthetic.xray_array(h, w, seed, bits=bits)


def jpeg_bytes(h: int = 320, w: int = 256, seed: int = 0, mode: str = "L", quality: int = 90) -> bytes:
    im = Image.fromarray(xray_array(h, w, seed), mode="L")
    if mode != "L":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(h: int = 320, w: int = 256, seed: int = 0, bits: int = 8) -> bytes:
    arr = xray_array(h, w, seed, bits=bits)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def dicom_bytes(
    h: int = 256,
    w: int = 256,
    seed: int = 0,
    *,
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    window: tuple[float, float] | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
    preamble: bool = True,
) -> bytes:
    """A minimal valid DICOM (CR/DX) with ``bits``-bit pixels."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    arr = xray_array(h, w, seed, bits=bits).astype(np.uint16)
    if photometric == "MONOCHROME1":
        arr = (2**bits - 1 - arr).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    return data if preamble else data[132:]


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header declares a huge image (decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        c = struct.pack(">I", len(payload)) + kind + payload
        return c + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_inputs() -> dict[str, bytes]:
    """File name -> bytes for every kind of bad input the ingestion must survive."""
    jpg = jpeg_bytes(seed=99)
    return {
        "empty.jpeg": b"",
        "truncated.jpeg": jpg[: len(jpg) // 2],
        "corrupt.jpeg": jpg[:200] + bytes(range(256)) * 8,
        ".DS_Store": b"\x00\x00\x00\x01Bud1" + b"\x00" * 64,
        "notes.txt": b"this is not an image\n",
        "picture.gif": b"GIF89a" + b"\x00" * 32,
        "bomb.png": png_bomb(),
        "broken.dcm": b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI" + b"\xff" * 40,
        "noimage.dcm": _dicom_without_pixels(),
        "wrong-extension.png": jpg,  # a valid JPEG named .png: decoded by content
    }


def _dicom_without_pixels() -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # a structured report
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "SR"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def kermany_folder(root: Path, per_class: int = 4, size: tuple[int, int] = (320, 256)) -> Path:
    """``root/train/{NORMAL,PNEUMONIA}/...`` with Kermany file names and distinct images."""
    return synthetic.write_kermany_folder(root, per_class=per_class, size=size)
