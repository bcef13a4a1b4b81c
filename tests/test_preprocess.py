import io

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_ray.errors import DecodeError
from cxr_ray.imaging.preprocess import PreprocessSpec, decode, sniff_format, to_model_input
from cxr_ray.training.augment import TrainAugment
from tests import imaging

SPEC = PreprocessSpec(height=224, width=224)


def _reference(arr: np.ndarray, spec: PreprocessSpec = SPEC) -> np.ndarray:
    im = Image.fromarray(arr, mode="L").resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_draft_decode_matches_full_decode(mode):
    data = imaging.jpeg_bytes(1200, 1000, seed=3, mode=mode)
    d = decode(data, SPEC)
    assert d.pixels.shape == (224, 224) and d.pixels.dtype == np.uint8
    assert (d.format, d.width, d.height) == ("jpeg", 1000, 1200)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    # Draft mode decodes at 1/4 scale first; the result differs from a full decode by
    # resampling noise only.
    diff = np.abs(d.pixels.astype(np.float32) - _reference(full))
    assert diff.mean() < 2.0 and diff.max() < 40


def test_png_8_and_16_bit():
    d8 = decode(imaging.png_bytes(300, 260, seed=1), SPEC)
    d16 = decode(imaging.png_bytes(300, 260, seed=1, bits=16), SPEC)
    assert d8.format == d16.format == "png"
    assert d8.pixels.shape == d16.pixels.shape == (224, 224)
    # 16-bit is windowed min..max to 8 bits: same picture up to contrast scaling.
    assert np.corrcoef(d8.pixels.ravel(), d16.pixels.ravel())[0, 1] > 0.99


def test_squash_resize_hides_size_and_aspect():
    tall = decode(imaging.jpeg_bytes(2000, 800, seed=1), SPEC)
    wide = decode(imaging.jpeg_bytes(400, 900, seed=1), SPEC)
    assert tall.pixels.shape == wide.pixels.shape == (224, 224)


def test_dicom_monochrome1_is_inverted_to_match_monochrome2():
    m2 = decode(imaging.dicom_bytes(seed=5, photometric="MONOCHROME2"), SPEC)
    m1 = decode(imaging.dicom_bytes(seed=5, photometric="MONOCHROME1"), SPEC)
    assert m2.format == m1.format == "dicom"
    # MONOCHROME1 stores the inverted values; after decoding both look the same.
    assert np.abs(m1.pixels.astype(int) - m2.pixels.astype(int)).max() <= 1
    # Lungs (dark) darker than the mediastinum (bright), as on a viewer.
    assert m2.pixels[112, 60] < m2.pixels[112, 112]


def test_dicom_window_is_applied():
    full = decode(imaging.dicom_bytes(seed=2, bits=12), SPEC).pixels
    narrow = decode(imaging.dicom_bytes(seed=2, bits=12, window=(2048, 600)), SPEC).pixels
    # A narrow window stretches contrast: more pixels saturate at 0 or 255.
    sat = lambda a: np.mean((a == 0) | (a == 255))  # noqa: E731
    assert sat(narrow) > sat(full) + 0.05


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_compressed_dicom_decodes_like_uncompressed(syntax):
    import pydicom
    from pydicom import uid

    ds = pydicom.dcmread(io.BytesIO(imaging.dicom_bytes(seed=6)))
    ds.compress(getattr(uid, syntax))
    buf = io.BytesIO()
    ds.save_as(buf)
    plain = decode(imaging.dicom_bytes(seed=6), SPEC).pixels
    assert np.array_equal(decode(buf.getvalue(), SPEC).pixels, plain)


def test_dicom_without_preamble_found_by_extension():
    data = imaging.dicom_bytes(seed=1, preamble=False)
    assert sniff_format(data, "scan.dcm") == "dicom"
    assert decode(data, SPEC, "scan.dcm").pixels.shape == (224, 224)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("empty.jpeg", "empty file"),
        ("truncated.jpeg", "truncated"),
        ("corrupt.jpeg", "corrupt or truncated"),
        (".DS_Store", "unsupported format (macos-ds_store)"),
        ("notes.txt", "unsupported format (text)"),
        ("picture.gif", "unsupported format (gif)"),
        ("bomb.png", "decompression bomb"),
        ("broken.dcm", "DICOM"),
        ("noimage.dcm", "no pixel data"),
    ],
)
def test_bad_inputs_raise_decode_error_with_reason(name, message):
    data = imaging.bad_inputs()[name]
    with pytest.raises(DecodeError, match=None) as err:
        decode(data, SPEC, name)
    assert message in str(err.value)


def test_wrong_extension_is_decoded_by_content():
    d = decode(imaging.bad_inputs()["wrong-extension.png"], SPEC, "wrong-extension.png")
    assert d.format == "jpeg"


def test_pixel_limit_is_configurable():
    data = imaging.jpeg_bytes(1000, 1000)
    with pytest.raises(DecodeError, match="1000x1000"):
        decode(data, PreprocessSpec(max_pixels=999_999))
    assert decode(data, PreprocessSpec(max_pixels=1_000_000)).width == 1000


def test_equalize_spreads_histogram():
    data = imaging.jpeg_bytes(seed=4)
    plain = decode(data, SPEC).pixels
    eq = decode(data, PreprocessSpec(intensity="equalize")).pixels
    assert eq.std() > plain.std()
    with pytest.raises(ValueError):
        PreprocessSpec(intensity="sharpen")


def _local_contrast(pixels: np.ndarray, tile: int = 28) -> float:
    """Mean standard deviation over tiles: what adaptive equalisation raises."""
    h, w = pixels.shape
    blocks = pixels[: h - h % tile, : w - w % tile].reshape(h // tile, tile, w // tile, tile)
    return float(blocks.astype(np.float32).std(axis=(1, 3)).mean())


def test_clahe_is_deterministic_uint8_after_the_resize():
    import cv2

    data = imaging.jpeg_bytes(900, 700, seed=6)
    spec = PreprocessSpec(intensity="clahe")
    out = decode(data, spec).pixels
    assert out.shape == (224, 224) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, decode(data, spec).pixels)
    # Step 3 runs on the resized image (step 2), with the contract's parameters.
    resized = decode(data, SPEC).pixels
    expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(resized)
    np.testing.assert_array_equal(out, expected)
    assert _local_contrast(out) > 1.2 * _local_contrast(resized)
    assert not np.array_equal(out, decode(data, PreprocessSpec(intensity="equalize")).pixels)


@pytest.mark.parametrize(
    "data",
    [imaging.png_bytes(seed=2), imaging.png_bytes(seed=3, bits=16), imaging.dicom_bytes(seed=4)],
    ids=["png8", "png16", "dicom"],
)
def test_clahe_applies_to_every_format(data):
    out = decode(data, PreprocessSpec(64, 64, intensity="clahe"), "x.dcm").pixels
    plain = decode(data, PreprocessSpec(64, 64), "x.dcm").pixels
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert not np.array_equal(out, plain)


def test_model_input_contract():
    x = to_model_input(np.full((2, 224, 224), 255, np.uint8))
    assert x.shape == (2, 1, 224, 224) and x.dtype == np.float32
    assert float(x.max()) == 1.0
    with pytest.raises(ValueError):
        to_model_input(np.zeros((2, 1, 224, 224), np.float32))


def test_train_augment_keeps_shape_range_and_varies():
    torch.manual_seed(0)
    x = torch.from_numpy(
        to_model_input(np.stack([decode(imaging.jpeg_bytes(seed=i), SPEC).pixels for i in range(3)]))
    )
    aug = TrainAugment()
    a, b = aug(x), aug(x)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.equal(a, b)
    # No flips unless asked: anatomy is not mirror-symmetric.
    assert TrainAugment().hflip.p == 0.0
    assert TrainAugment(hflip=True).hflip.p == 0.5
