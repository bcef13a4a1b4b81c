"""The reduced-resolution DICOM decode (``cxr_ray.imaging.dicom_reduced``) against the
full-resolution path, per transfer syntax; the model-level agreement on all 479 originals is
``benchmarks/dicom_agreement.py``'s (``benchmarks/RESULTS.md``)."""

from __future__ import annotations

import io
import shutil
import tracemalloc

import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr_ray.data import synthetic
from cxr_ray.errors import DecodeError
from cxr_ray.imaging import dicom_reduced
from cxr_ray.imaging.dicom import decode_dicom_at
from cxr_ray.imaging.preprocess import PreprocessSpec, decode
from cxr_ray.vocabulary import ErrorCode
from tests import dicom_factory
from tests.test_hardening_data import _dicom, _rle_frame

SPEC = PreprocessSpec()
VARIANTS = list(dicom_factory.SYNTAX_VARIANTS)
#: Preprocessed 224 px images (0..255), reduced vs full, on the three largest real originals
#: (2180-2572 px, so the default oversample 4 reduces them). Measured at oversample 4: mean
#: <= 0.37, max <= 21; at oversample 2 (one DCT / wavelet level or twice the block size too
#: far) mean 0.91-1.67 and max 33-74, which these bounds refuse.
REAL_MEAN, REAL_MAX = 0.5, 28
#: The same on the generated 2000 x 1800 image: mean <= 0.18, max <= 6 at oversample 4; mean
#: 0.21-0.43 at oversample 2.
GEN_MEAN, GEN_MAX = 0.2, 8


def _build(jpeg: bytes, variant: str) -> bytes:
    if variant.startswith("jpeg-extended") and shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk's dcmcjpeg is not installed (it writes the JPEG extended variants)")
    return dicom_factory.make_syntax(jpeg, dicom_factory.Tags(), variant)


def _diff(data: bytes) -> tuple[float, int]:
    full = decode(data, SPEC, dicom_full=True).pixels.astype(np.int16)
    reduced = decode(data, SPEC).pixels.astype(np.int16)
    d = np.abs(full - reduced)
    return float(d.mean()), int(d.max())


def _xray(h: int, w: int, seed: int, *, saturated: bool = True) -> bytes:
    """A synthetic chest X-ray JPEG; ``saturated``: with a black collimation border and a white
    burned-in marker, as real exports have (the range then reaches 0 and 255 at any scale)."""
    arr = synthetic.xray_array(h, w, seed)
    if saturated:
        arr[:, :48] = 0
        arr[h - 96 : h - 32, 96:320] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _largest_real(n: int) -> list[bytes]:
    paths = sorted(dicom_factory.KERMANY_FULLRES_TRAIN.glob("*/*.jpeg"), key=lambda p: -p.stat().st_size)
    if len(paths) < n:
        pytest.skip("needs the full-resolution Kermany originals in ../shared/data/kermany-fullres")
    return [p.read_bytes() for p in paths[:n]]


@pytest.fixture(scope="module")
def generated() -> bytes:
    """A 2000 x 1800 synthetic chest X-ray (wide enough for two levels of every reduction)."""
    return _xray(1800, 2000, 3)


def test_reduction_levels_are_the_smallest_still_at_least_the_need():
    need = (448, 448)  # 224 px at oversample 2 (the default, 4, is checked below)
    sizes = ((2000, 1800), (1790, 1790), (3600, 3600), (400, 900))
    assert [dicom_reduced.dct_scale(w, h, need) for w, h in sizes] == [4, 2, 8, 1]
    blocks = ((2000, 1800), (1343, 1000), (2239, 4000))
    assert [dicom_reduced.block_factor(w, h, need) for w, h in blocks] == [4, 2, 4]
    assert dicom_reduced.j2k_reduce(2000, 1800, need, levels=5) == 2
    assert dicom_reduced.j2k_reduce(2000, 1800, need, levels=1) == 1  # never past the codestream's levels
    assert dicom_reduced.j2k_reduce(3000, 3000, need, levels=5) == 2  # 750 px; 375 would be too small
    assert dicom_reduced.j2k_reduce(800, 3000, need, levels=5) == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_syntax_decodes_to_the_expected_reduced_size(generated, variant):
    data = _build(generated, variant)
    arr, width, height = decode_dicom_at(data, max_pixels=SPEC.max_pixels, target=(224, 224))
    # Oversample 4: DCT 1/2, wavelet level 1 or 2 x 2 blocks, 1000 x 900 >= 896; one level more
    # would be 500 x 450, one less the full 2000 x 1800.
    assert dicom_reduced.DEFAULT_OVERSAMPLE == 4
    assert arr.shape == (900, 1000) and arr.dtype == np.uint8
    assert (width, height) == (2000, 1800)
    assert decode(data, SPEC).width == 2000  # the stored size, not the reduced one


@pytest.mark.parametrize("variant", VARIANTS)
def test_generated_image_agrees_with_the_full_path(generated, variant):
    mean, worst = _diff(_build(generated, variant))
    assert mean <= GEN_MEAN and worst <= GEN_MAX, (mean, worst)


@pytest.mark.parametrize("variant", ["jpeg-baseline", "j2k-lossless", "j2k"])
def test_a_range_narrower_than_the_output_falls_back_to_the_exact_block_mean(variant):
    # Noise extremes average out at 1/4 scale: the scaled image's stretch would be ~10% off.
    data = _build(_xray(1800, 2000, 4, saturated=False), variant)
    mean, worst = _diff(data)
    assert mean <= 0.25 and worst <= 6, (mean, worst)


@pytest.mark.parametrize("variant", VARIANTS)
def test_real_xrays_agree_with_the_full_path(variant):
    for jpeg in _largest_real(3):
        mean, worst = _diff(_build(jpeg, variant))
        assert mean <= REAL_MEAN and worst <= REAL_MAX, (variant, mean, worst)


def _reference(data: bytes, k: int) -> np.ndarray:
    """The exact block-mean result: LUTs at full size, ``k x k`` means, full-size stretch."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    ds = pydicom.dcmread(io.BytesIO(data))
    values = np.asarray(apply_voi_lut(apply_modality_lut(pixel_array(ds), ds), ds), dtype=np.float64)
    h, w = values.shape
    starts_h, starts_w = np.arange(0, h, k), np.arange(0, w, k)
    rows = np.add.reduceat(values, starts_h, axis=0) / np.diff(np.r_[starts_h, h])[:, None]
    means = np.add.reduceat(rows, starts_w, axis=1) / np.diff(np.r_[starts_w, w])[None, :]
    scaled = (means - values.min()) / (values.max() - values.min())
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1 - scaled
    return np.rint(scaled * 255).astype(np.int16)


@pytest.mark.parametrize(
    "variant", ["explicit-12-mono1", "explicit-12-rescale-window", "explicit-12-voi-lut", "jpeg-ls", "rle"]
)
def test_block_mean_path_is_exact(variant):
    # 1001 x 901: partial edge blocks; k = 2 for 448 px.
    jpeg = _xray(901, 1001, 5, saturated=False)
    data = _build(jpeg, variant)
    arr, _, _ = decode_dicom_at(data, max_pixels=SPEC.max_pixels, target=(224, 224), oversample=2)
    assert arr.shape == (451, 501)
    assert np.abs(arr.astype(np.int16) - _reference(data, 2)).max() <= 1


def test_window_that_clips_and_lut_tables_are_applied_before_the_mean():
    def ds_for(variant: str) -> pydicom.Dataset:
        data = _build(synthetic.jpeg_bytes(h=300, w=300, seed=1), variant)
        return pydicom.dcmread(io.BytesIO(data))

    affine = dicom_reduced._is_affine
    assert affine(ds_for("explicit-12-mono1"), 0, 4095)  # full-range window: nothing clipped
    assert not affine(ds_for("explicit-12-rescale-window"), 0, 4095)  # clips both ends
    assert affine(ds_for("explicit-12-rescale-window"), 800, 3000)  # this image's range: linear
    assert not affine(ds_for("explicit-12-voi-lut"), 0, 4095)
    sigmoid = ds_for("explicit-12-mono1")
    sigmoid.VOILUTFunction = "SIGMOID"
    assert not affine(sigmoid, 0, 4095)


def _retag(data: bytes, **tags: object) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for name, value in tags.items():
        setattr(ds, name, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("variant", ["jpeg-baseline", "j2k", "jpeg-ls"])
def test_monochrome1_is_inverted_on_the_reduced_array(generated, variant):
    mono2 = _build(generated, variant)
    mono1 = _retag(mono2, PhotometricInterpretation="MONOCHROME1")
    mean, worst = _diff(mono1)
    assert mean <= 0.25 and worst <= 6, (mean, worst)
    inverted = 255 - decode(mono2, SPEC).pixels.astype(np.int16)
    assert np.abs(decode(mono1, SPEC).pixels.astype(np.int16) - inverted).max() <= 1


@pytest.mark.parametrize("variant", ["jpeg-baseline", "j2k"])
def test_a_clipping_window_on_a_scaled_decode_agrees(generated, variant):
    data = _build(generated, variant)
    top = 255 if variant == "jpeg-baseline" else 4095
    windowed = _retag(data, WindowCenter=top * 0.55, WindowWidth=top * 0.5)
    mean, worst = _diff(windowed)
    assert mean <= 0.4 and worst <= 16, (mean, worst)  # the window doubles the contrast


def test_colour_jpeg_uses_the_luma_of_the_scaled_decode(generated):
    rgb = Image.open(io.BytesIO(generated)).convert("RGB")
    arr = np.asarray(rgb).copy()
    arr[..., 0] = np.clip(arr[..., 0].astype(int) + 20, 0, 255)  # a tint, so the channels differ
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    data = dicom_factory.make_image(buf.getvalue(), dicom_factory.Tags())
    assert pydicom.dcmread(io.BytesIO(data)).PhotometricInterpretation == "YBR_FULL_422"
    mean, worst = _diff(data)
    assert mean <= 0.3 and worst <= 6, (mean, worst)


# ----------------------------------------------------------------------------- guarantees


def test_reduced_path_decodes_one_frame_only():
    data = _dicom([_rle_frame(1024, 1024)] * 32, 1024, 1024, "1.2.840.10008.1.2.5")
    tracemalloc.start()
    arr, _, _ = decode_dicom_at(data, max_pixels=64_000_000, target=(224, 224), oversample=2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert arr.shape == (512, 512)
    # 32 frames of 1 MP decoded would be >= 33 MB; one frame and its float32 copy ~5 MB.
    assert peak < 16_000_000, peak


def test_reduced_path_keeps_the_budget_and_frame_checks():
    over = _dicom([_rle_frame(1024, 1024)] * 96, 1024, 1024, "1.2.840.10008.1.2.5")
    with pytest.raises(DecodeError) as budget:
        decode_dicom_at(over, max_pixels=64_000_000, target=(224, 224))
    assert budget.value.code == ErrorCode.PIXEL_BUDGET
    buf = io.BytesIO()
    Image.new("L", (4000, 4000), 90).save(buf, "JPEG")
    lying = _dicom([buf.getvalue()], 256, 256, "1.2.840.10008.1.2.4.50")
    tracemalloc.start()
    with pytest.raises(DecodeError) as mismatch:
        decode(lying, SPEC)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert mismatch.value.code == ErrorCode.FRAME_MISMATCH
    assert peak < 8_000_000, peak  # refused before any decode of the 16 MP frame


def test_a_corrupt_frame_fails_as_on_the_full_path(generated):
    data = _build(generated, "jpeg-baseline")
    ds = pydicom.dcmread(io.BytesIO(data))
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    cut = frame[: len(frame) // 3]  # truncated scan: PIL refuses it, the full path decides
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([cut])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    try:
        full = decode(buf.getvalue(), SPEC, dicom_full=True).pixels
    except DecodeError as exc:
        with pytest.raises(DecodeError) as reduced:
            decode(buf.getvalue(), SPEC)
        assert (str(reduced.value), reduced.value.code) == (str(exc), exc.code)
    else:
        assert np.array_equal(decode(buf.getvalue(), SPEC).pixels, full)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_lookup_table_gives_the_pixel_by_pixel_result_bit_for_bit(generated, variant):
    """Without a block mean an integer image's LUTs and stretch go through a table of its
    stored range: exactly what the per-pixel arithmetic gives, for every syntax's data set
    (rescale, clipping window, VOI LUT table, MONOCHROME1) and for a scaled (uint8) decode."""
    from pydicom.pixels import pixel_array

    ds = pydicom.dcmread(io.BytesIO(_build(generated, variant)))
    arr = pixel_array(ds)
    if arr.ndim != 2:
        pytest.skip("colour: the luma is float, no table")
    photometric = dicom_reduced._photometric(ds)
    assert arr.dtype.kind in "iu"
    table = dicom_reduced._table_finish(arr, ds, photometric, None)
    assert table is not dicom_reduced._NO_TABLE, variant
    pixels = dicom_reduced._finish_pixels(arr, ds, photometric, 1)
    assert table.dtype == pixels.dtype == np.uint8 and np.array_equal(table, pixels), variant
    # As a scaled decode would hand it over (its largest possible stored value known).
    top = 2 ** int(ds.BitsStored) - 1
    scaled = dicom_reduced._finish(arr, ds, photometric, 1, top=top)
    expect = dicom_reduced._finish_pixels(arr, ds, photometric, 1, top=top)
    assert (scaled is None and expect is None) or np.array_equal(scaled, expect), variant
