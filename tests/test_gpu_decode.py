"""decode_batch (GPU decode path) against the CPU preprocessing contract.

The CPU tests run torchvision's CPU decoder (libjpeg-turbo) through exactly the code the GPU
path runs; the ``gpu`` tests repeat them with nvJPEG. Tolerances come from measurements
recorded in docs/GPU.md (mean absolute difference in 0..255 grey levels is the metric that
matters; single pixels differ more at sharp edges because PIL's draft mode downscales in the
DCT domain and the GPU path emulates that with an area average).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image

from cxr_ray.errors import DecodeError, row_text
from cxr_ray.imaging.gpu_decode import decode_batch, draft_scale
from cxr_ray.imaging.preprocess import PreprocessSpec, decode, to_model_input
from tests import imaging

# torchvision 0.29 deprecates its decoders in favour of TorchCodec (see docs/GPU.md).
pytestmark = pytest.mark.filterwarnings("ignore:.*TorchCodec.*:DeprecationWarning")

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible (GPU decode needs nvJPEG)")

#: Measured on generated JPEGs (docs/GPU.md): per-image mean <= 0.22 (none), <= 0.88
#: (equalize, which amplifies small differences), max <= 2 / 11 grey levels.
SYNTH_MEAN = {"none": 0.5, "equalize": 1.5}
SYNTH_MAX = {"none": 3, "equalize": 16}
#: Measured on the 479 real full-resolution Kermany images at 224 px: mean 0.18, worst image
#: 0.49 (none); mean 0.33, worst image 0.88 (equalize).
REAL_MEAN = {"none": 0.35, "equalize": 0.6}
REAL_WORST_IMAGE = {"none": 1.0, "equalize": 1.5}


def _reference(datas: list[bytes], spec: PreprocessSpec) -> np.ndarray:
    return to_model_input(np.stack([decode(d, spec).pixels for d in datas]))


def _grey_diff(x: torch.Tensor, ref: np.ndarray) -> np.ndarray:
    """Absolute difference per pixel in 0..255 grey levels."""
    return np.abs(x.cpu().numpy() - ref) * 255.0


@pytest.mark.parametrize("intensity", ["none", "equalize"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("hw", [(150, 120), (320, 256), (1200, 1000), (2000, 1600)])
def test_matches_cpu_contract_on_generated_jpegs(hw, mode, intensity):
    h, w = hw
    spec = PreprocessSpec(224, 224, intensity=intensity)
    datas = [imaging.jpeg_bytes(h, w, seed=s, mode=mode) for s in range(2)]
    x, errors = decode_batch(datas, spec, device="cpu")
    assert errors == [None, None]
    assert x.shape == (2, 1, 224, 224) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    d = _grey_diff(x, _reference(datas, spec))
    assert d.mean(axis=(1, 2, 3)).max() <= SYNTH_MEAN[intensity]
    assert d.max() <= SYNTH_MAX[intensity]


@pytest.mark.data
@pytest.mark.parametrize("intensity", ["none", "equalize"])
def test_matches_cpu_contract_on_real_fullres_images(kermany_fullres: Path, intensity):
    files = sorted(kermany_fullres.rglob("*.jpeg"))[::6]  # ~80 images, both classes
    spec = PreprocessSpec(224, 224, intensity=intensity)
    per_image = []
    for start in range(0, len(files), 32):
        datas = [f.read_bytes() for f in files[start : start + 32]]
        x, errors = decode_batch(datas, spec, device="cpu")
        assert errors == [None] * len(datas)
        per_image.extend(_grey_diff(x, _reference(datas, spec)).mean(axis=(1, 2, 3)))
    per_image_arr = np.array(per_image)
    assert per_image_arr.mean() <= REAL_MEAN[intensity]
    assert per_image_arr.max() <= REAL_WORST_IMAGE[intensity]


def test_bad_inputs_are_handled_per_row():
    spec = PreprocessSpec(64, 64)
    good = imaging.jpeg_bytes(300, 240, seed=1)
    png = imaging.png_bytes(200, 180, seed=2)
    dcm = imaging.dicom_bytes(seed=3)
    bad = imaging.bad_inputs()
    datas = [good, good[: len(good) // 2], b"", b"just some text\n", png, dcm, bad["corrupt.jpeg"]]
    x, errors = decode_batch(datas, spec, device="cpu")
    assert x.shape == (len(datas), 1, 64, 64)
    assert errors[0] is None and errors[4] is None and errors[5] is None
    assert "truncated" in (errors[1] or "")
    assert errors[2] == "empty_file: empty file (0 bytes)"
    assert "unsupported format (text)" in (errors[3] or "")
    assert errors[6] is not None
    # The CPU fallback gives exactly the CPU contract (bit-identical scaling to 0..1).
    np.testing.assert_array_equal(x[4:6].numpy(), _reference([png, dcm], spec))
    assert float(x[1:4].abs().sum()) == 0.0 and float(x[6].abs().sum()) == 0.0
    # Error messages are the CPU decoder's own, so error rows read the same on every path.
    # Both are DecodeErrors (the row's error, never a crash) saying what was wrong.
    for i, what in ((1, "truncated"), (6, "corrupt")):
        with pytest.raises(DecodeError, match=what) as info:
            decode(datas[i], spec)
        assert errors[i] == row_text(info.value)


def test_pixel_limit_is_enforced_before_decoding(monkeypatch):
    calls: list[int] = []
    real = torchvision.io.decode_jpeg

    def counting(inputs, **kwargs):
        calls.append(len(inputs))
        return real(inputs, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", counting)
    spec = PreprocessSpec(64, 64, max_pixels=50_000)
    small, big = imaging.jpeg_bytes(200, 200, seed=1), imaging.jpeg_bytes(400, 300, seed=2)
    _, errors = decode_batch([big, small], spec, device="cpu")
    assert errors[0] is not None and "50000-pixel limit" in errors[0]
    assert errors[1] is None
    assert calls == [1]  # only the small image reached the decoder


def test_batched_failure_retries_one_by_one_and_falls_back(monkeypatch):
    spec = PreprocessSpec(64, 64)
    datas = [imaging.jpeg_bytes(300, 240, seed=s) for s in range(3)]
    poisoned = len(datas[1])
    real = torchvision.io.decode_jpeg
    calls: list[int] = []

    def picky(inputs, **kwargs):
        calls.append(len(inputs))
        if any(t.numel() == poisoned for t in inputs):
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return real(inputs, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    x, errors = decode_batch(datas, spec, device="cpu")
    assert errors == [None, None, None]
    assert calls == [3, 1, 1, 1]  # one batched call, then each image alone
    # The rejected row came from the CPU decoder: exactly the contract.
    np.testing.assert_array_equal(x[1:2].numpy(), _reference(datas[1:2], spec))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_clahe_spec_goes_through_the_cpu_contract(device):
    """No GPU CLAHE: every row of a clahe spec is decoded by the CPU path, bit for bit."""
    spec = PreprocessSpec(224, 224, intensity="clahe", max_pixels=2_000_000)
    datas = [imaging.jpeg_bytes(h, w, seed=s) for s, (h, w) in enumerate([(320, 256), (1200, 1000)])]
    datas.append(imaging.jpeg_bytes(2000, 1600, seed=3))  # over max_pixels: an error row
    x, errors = decode_batch(datas, spec, device=device)
    assert errors[:2] == [None, None] and errors[2] is not None and "pixel" in errors[2]
    np.testing.assert_array_equal(x[:2].cpu().numpy(), _reference(datas[:2], spec))


def test_empty_batch():
    x, errors = decode_batch([], PreprocessSpec(32, 48), device="cpu")
    assert x.shape == (0, 1, 32, 48) and errors == []


@pytest.mark.parametrize("size", [(100, 90), (500, 400), (1000, 700), (2100, 1900), (4000, 3000)])
def test_draft_scale_matches_pil(size):
    w, h = size
    spec = PreprocessSpec(224, 224)
    data = imaging.jpeg_bytes(h, w, seed=0)
    with Image.open(io.BytesIO(data)) as im:
        im.draft("L", (spec.width, spec.height))
        s = draft_scale(w, h, spec)
        assert im.size == ((w + s - 1) // s, (h + s - 1) // s)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("intensity", ["none", "equalize"])
def test_gpu_matches_cpu_contract_on_generated_jpegs(intensity):
    spec = PreprocessSpec(224, 224, intensity=intensity)
    datas = [imaging.jpeg_bytes(h, w, seed=s) for s, (h, w) in enumerate([(320, 256), (2000, 1600)])]
    x, errors = decode_batch(datas, spec, device="cuda")
    assert x.is_cuda and errors == [None, None]
    d = _grey_diff(x, _reference(datas, spec))
    assert d.mean(axis=(1, 2, 3)).max() <= SYNTH_MEAN[intensity]


@pytest.mark.gpu
@pytest.mark.data
@needs_cuda
def test_gpu_matches_cpu_contract_on_real_fullres_images(kermany_fullres: Path):
    files = sorted(kermany_fullres.rglob("*.jpeg"))[::2]
    spec = PreprocessSpec(224, 224)
    per_image = []
    for start in range(0, len(files), 64):
        datas = [f.read_bytes() for f in files[start : start + 64]]
        x, errors = decode_batch(datas, spec, device="cuda")
        assert errors == [None] * len(datas)
        per_image.extend(_grey_diff(x, _reference(datas, spec)).mean(axis=(1, 2, 3)))
    arr = np.array(per_image)
    assert arr.mean() <= REAL_MEAN["none"] and arr.max() <= REAL_WORST_IMAGE["none"]


@pytest.mark.gpu
@needs_cuda
def test_gpu_bad_inputs_are_handled_per_row():
    spec = PreprocessSpec(64, 64)
    good = imaging.jpeg_bytes(300, 240, seed=1)
    datas = [good, good[: len(good) // 2], b"", imaging.png_bytes(seed=2), b"text\n"]
    x, errors = decode_batch(datas, spec, device="cuda")
    cpu_x, cpu_errors = decode_batch(datas, spec, device="cpu")
    assert errors == cpu_errors
    assert errors[0] is None and errors[3] is None
    assert all(e is not None for e in (errors[1], errors[2], errors[4]))
    assert torch.equal(x[3].cpu(), cpu_x[3])
