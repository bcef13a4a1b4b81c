"""The OpenVINO CPU engine: fp32 matches onnxruntime, bf16 where the CPU has it, full scoring runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cxr_ray.config import ScoreSettings, load_settings
from cxr_ray.engines import engine_options, prepare
from cxr_ray.engines import openvino_engine as ove
from cxr_ray.imaging.preprocess import decode, to_model_input
from cxr_ray.models.artifact import load_artifact
from cxr_ray.models.card import spec_for
from tests import imaging

openvino = pytest.importorskip(
    "openvino", reason="the 'openvino' package is not installed (pip install 'cxr-ray[openvino]')"
)


def _prepare(artifact: Path, cache: Path, precision: str):
    art = load_artifact(str(artifact))
    opts = engine_options(ScoreSettings(cache_dir=str(cache), openvino_precision=precision))
    return prepare(art, "openvino", opts, spec_for(art.card))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One engine cache for the module: the ONNX model is exported once."""
    return tmp_path_factory.mktemp("ov-cache")


@pytest.fixture(scope="module")
def batch(tiny_artifact, tmp_path_factory) -> np.ndarray:
    """Preprocessed generated X-rays at the tiny artifact's input size (odd count: not 2^k)."""
    folder = imaging.kermany_folder(tmp_path_factory.mktemp("ov-images"), per_class=3, size=(96, 80))
    spec = spec_for(load_artifact(str(tiny_artifact)).card)
    files = sorted(folder.rglob("*.jpeg"))[:7]
    return to_model_input(np.stack([decode(f.read_bytes(), spec).pixels for f in files]))


def _onnxruntime(onnx: bytes, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def test_fp32_matches_onnxruntime_on_logits_and_features_at_any_batch_size(tiny_artifact, batch, cache):
    payload, report = _prepare(tiny_artifact, cache, "fp32")
    assert (report.engine, report.precision) == ("openvino", "fp32")
    engine = ove.build(payload)
    assert (engine.name, engine.device, engine.precision) == ("openvino", "cpu", "fp32")
    assert engine.compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    ref = _onnxruntime(payload.onnx, batch)  # [logits, features]
    assert len(ref) == 2 and ref[0].shape == (len(batch), 3)
    for n in (len(batch), 1, 3):  # dynamic batch: no reshape between sizes
        out = engine(batch[:n])
        assert isinstance(out, tuple) and len(out) == 2  # (logits, features), graph order
        for got, want in zip(out, ref, strict=True):
            assert got.dtype == np.float32 and got.shape == want[:n].shape
            np.testing.assert_allclose(got, want[:n], atol=1e-4, rtol=0)
    # The same ONNX model as the onnxruntime engine: a second prepare is a cache hit.
    assert _prepare(tiny_artifact, cache, "fp32")[1].onnx_cache == "hit"


def test_bf16_stays_close_to_fp32_with_the_same_argmax(tiny_artifact, batch, cache):
    if not ove.native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 / AMX-BF16)")
    payload, report = _prepare(tiny_artifact, cache, "bf16")
    engine = ove.build(payload)
    assert report.precision == engine.precision == "bf16" and not report.notes
    want, want_features = _onnxruntime(payload.onnx, batch)
    logits, features = engine(batch)
    # Really bf16: the compiled model says so, and rounding shows (fp32 is within ~1e-6).
    assert engine.compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.bf16
    assert np.abs(logits - want).max() > 1e-3
    # bf16 keeps 8 mantissa bits: relative error ~1e-2 after ~50 layers, not a different model.
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(logits - want).max() < 0.05 * scale
    assert (logits.argmax(1) == want.argmax(1)).all()
    assert features.shape == want_features.shape
    # Features (1280 post-ReLU activations, many near 0) err more than logits: compare each
    # image's vector as a whole. Measured 0.09-0.13 relative L2 error here (random 3-class head,
    # 64 px); a wrong graph or output order gives ~1.
    rel = np.linalg.norm(features - want_features, axis=1) / np.linalg.norm(want_features, axis=1)
    assert rel.max() < 0.25, rel


def test_auto_precision_is_bf16_exactly_where_the_cpu_has_it():
    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    native = "BF16" in capabilities
    assert ove.native_bf16() is native
    assert ove.resolve_precision("auto", native=native) == ("bf16" if native else "fp32", None)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert native, "the CPU flags say bf16 but OpenVINO does not"
        assert ove.resolve_precision("auto", native=ove.native_bf16())[0] == "bf16"


def test_explicit_bf16_without_native_support_falls_back_to_fp32_with_a_note():
    precision, note = ove.resolve_precision("bf16", native=False)
    assert precision == "fp32" and note is not None and "no native bf16" in note
    assert ove.resolve_precision("fp32", native=True) == ("fp32", None)
    assert ove.resolve_precision("bf16", native=True) == ("bf16", None)
    with pytest.raises(Exception, match="unknown openvino precision 'int4'"):
        ove.resolve_precision("int4", native=True)


def _score(root: Path, artifact: Path, out: Path, cache: Path, precision: str):
    from cxr_ray.scoring.pipeline import score

    cfg = {"engine": "openvino", "openvino_precision": precision, "cache_dir": str(cache)}
    result = score(str(root), str(artifact), str(out), load_settings(None, {"score": cfg}))
    t = pq.read_table(out / "predictions.parquet").sort_by("uri")
    summary = json.loads((out / "summary.json").read_text())
    return result, t, summary


@pytest.fixture()
def scoring_input(tmp_path) -> tuple[Path, int]:
    root = imaging.kermany_folder(tmp_path / "in", per_class=2)
    (root / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root, len(list(root.rglob("*.jpeg")))


def test_scoring_with_openvino_bf16_keeps_every_row_and_records_the_precision(
    ray_local, tiny_artifact, cache, scoring_input, tmp_path
):
    root, n = scoring_input
    result, t, summary = _score(root, tiny_artifact, tmp_path / "out", cache, "bf16")
    assert t.num_rows == result.images == n == 7
    assert set(t["engine"].to_pylist()) == {"openvino"}
    assert t["status"].to_pylist().count("error") == 1
    assert summary["engine"] == "openvino"
    assert summary["engine_precision"] == ("bf16" if ove.native_bf16() else "fp32")


@pytest.mark.slow
def test_scoring_fp32_and_bf16_agree_and_say_which_ran(
    ray_local, tiny_artifact, cache, scoring_input, tmp_path
):
    root, n = scoring_input
    probs = {}
    for precision in ("fp32", "bf16"):
        _, t, summary = _score(root, tiny_artifact, tmp_path / precision, cache, precision)
        assert t.num_rows == n and summary["engine"] == "openvino"
        expected = precision if precision == "fp32" or ove.native_bf16() else "fp32"
        assert summary["engine_precision"] == expected
        ok = np.array([s == "ok" for s in t["status"].to_pylist()])
        probs[precision] = np.array(t["prob_normal"].to_pylist(), dtype=float)[ok]
    assert len(probs["fp32"]) == n - 1
    assert np.abs(probs["fp32"] - probs["bf16"]).max() < 0.05
