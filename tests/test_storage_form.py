"""The storage form of the training images (``cxr_ray.imaging.storage_form``) and
preprocessing's re-encode of resized images (step 2b of ``cxr_ray.imaging.preprocess``)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from cxr_ray.imaging.preprocess import PreprocessSpec, decode
from cxr_ray.imaging.storage_form import detect, jpeg_quality, render
from cxr_ray.models.card import ModelCard, spec_for


def _jpeg(px: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _xray_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 60 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    return np.clip(base + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("quality", [10, 30, 50, 75, 90, 95, 100])
def test_jpeg_quality_reads_the_ijg_quality_back(quality):
    assert jpeg_quality(_jpeg(_xray_like(32, 32), quality)) == quality


def test_jpeg_quality_is_none_for_what_is_not_an_ijg_jpeg():
    png = io.BytesIO()
    Image.fromarray(_xray_like(16, 16)).save(png, "PNG")
    assert jpeg_quality(png.getvalue()) is None
    assert jpeg_quality(b"not an image") is None


def test_detect_needs_one_quality_at_the_input_size_for_most_images():
    at = [("jpeg", 32, 32, _jpeg(_xray_like(32, 32, i), 75)) for i in range(10)]
    assert detect(at, (32, 32)) == 75
    assert detect(at, (64, 64)) is None  # not at the input size: full-resolution training data
    larger = [("jpeg", 64, 64, _jpeg(_xray_like(64, 64, i), 75)) for i in range(3)]
    assert detect(at + larger, (32, 32)) is None  # 10 of 13 < 90%
    assert detect(at + larger[:1], (32, 32)) == 75  # 10 of 11
    mixed = at[:5] + [("jpeg", 32, 32, _jpeg(_xray_like(32, 32, i), 90)) for i in range(5)]
    assert detect(mixed, (32, 32)) is None
    assert detect([], (32, 32)) is None


def test_only_resized_images_are_re_encoded():
    plain = PreprocessSpec(height=32, width=32)
    stored = dataclasses.replace(plain, storage_jpeg_quality=75)
    # At the input size: in the stored form already, bit-identical with and without.
    small = _jpeg(_xray_like(32, 32), 75)
    assert np.array_equal(decode(small, plain).pixels, decode(small, stored).pixels)
    # Resized: re-encoded at the quality, i.e. the plain result rendered.
    big = _jpeg(_xray_like(200, 160), 95)
    a, b = decode(big, plain).pixels, decode(big, stored).pixels
    assert not np.array_equal(a, b)
    assert np.array_equal(b, np.asarray(render(Image.fromarray(a), 75)))
    assert jpeg_quality(_jpeg(a, 75)) == 75 and b.shape == (32, 32) and b.dtype == np.uint8


def test_the_card_field_reaches_the_spec_and_is_validated():
    fields = {
        "arch": "mobilenet_v2",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "target_layer": "features",
        "weights_sha256": "0" * 64,
    }
    assert spec_for(ModelCard(**fields)).storage_jpeg_quality is None  # older cards: unchanged
    assert spec_for(ModelCard(**fields, storage_jpeg_quality=75)).storage_jpeg_quality == 75
    with pytest.raises(ValueError):
        ModelCard(**fields, storage_jpeg_quality=0)


def test_training_records_the_storage_form_of_its_split(tmp_path):
    from cxr_ray.training.finalize import storage_quality

    rows = []
    for i in range(12):
        path = tmp_path / f"img{i}.jpeg"
        path.write_bytes(_jpeg(_xray_like(32, 32, i), 75))
        rows.append(
            {"uri": str(path), "format": "jpeg", "width": 32, "height": 32, "status": "ok", "split": "train"}
        )
    rows.append(
        {
            "uri": str(tmp_path / "gone.jpeg"),
            "format": "jpeg",
            "width": 32,
            "height": 32,
            "status": "ok",
            "split": "val",
        }
    )
    assert storage_quality(pa.Table.from_pylist(rows), 32) == 75
    assert storage_quality(pa.Table.from_pylist(rows), 64) is None
    assert storage_quality(None, 32) is None
