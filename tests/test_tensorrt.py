"""TensorRT engine: availability errors and the engine cache everywhere; builds on a GPU.

The first part runs on every machine: it fakes the presence/absence of ``tensorrt`` and
drives the cache with a stand-in builder. The ``trt`` class needs the ``tensorrt`` package
and a CUDA GPU and is skipped, with the reason, otherwise.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_ray.config import ScoreSettings
from cxr_ray.engines import EngineOptions, EnginePayload, engine_options, prepare, select_engine
from cxr_ray.engines import tensorrt_engine as te
from cxr_ray.engines.tensorrt_engine import TensorRTEngine, cached_engine, make_key
from cxr_ray.errors import ConfigError, EngineUnavailableError
from cxr_ray.models.card import ModelCard, spec_for


def _trt_importable() -> str | None:
    """``None`` when TensorRT tests can run here, else why not."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising at import
        return f"the 'tensorrt' package does not import ({exc})"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (TensorRT needs one)"
    return None


TRT_SKIP = _trt_importable()
needs_trt = pytest.mark.skipif(TRT_SKIP is not None, reason=str(TRT_SKIP))


def _card(**fields) -> ModelCard:
    base = {
        "arch": "mobilenet_v2",
        "input_size": (64, 64),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "target_layer": "backbone.features.18",
        "weights_sha256": "ab" * 32,
    }
    return ModelCard(**{**base, **fields})


def _options(**score) -> EngineOptions:
    base = {"trt_precision": "fp16", "trt_min_batch": 1, "trt_opt_batch": 8, "trt_max_batch": 32}
    return engine_options(ScoreSettings(**{**base, **score}))


def _key(**overrides) -> te.EngineKey:
    env = {"tensorrt": "10.9.0", "gpu_name": "NVIDIA A10G", "compute_capability": "8.6"}
    card = overrides.pop("card", _card())
    onnx = overrides.pop("onnx", b"onnx-bytes")
    options = _options(**overrides.pop("options", {}))
    env.update(overrides)
    return make_key(card, onnx, options, **env)


class _Builder:
    """Stands in for the TensorRT build: counts calls, returns fake plan bytes."""

    def __init__(self, payload: bytes = b"PLAN") -> None:
        self.calls = 0
        self.payload = payload

    def __call__(self) -> bytes:
        self.calls += 1
        return self.payload + str(self.calls).encode()


# ------------------------------------------------------------------ runs everywhere


def test_without_tensorrt_the_error_names_the_package(monkeypatch):
    # A None entry makes `import tensorrt` fail and find_spec report it missing, whether or
    # not tensorrt is really installed here.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    payload = EnginePayload("tensorrt", _card(), _options(), onnx=b"not used")
    with pytest.raises(EngineUnavailableError, match="'tensorrt' package") as info:
        TensorRTEngine.from_payload(payload)
    assert "pip install 'cxr-ray[tensorrt]'" in str(info.value)
    with pytest.raises(EngineUnavailableError, match="'tensorrt' package is not installed"):
        select_engine("tensorrt")


def test_without_a_gpu_the_error_names_the_gpu(monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    payload = EnginePayload("tensorrt", _card(), _options(), onnx=b"not used")
    with pytest.raises(EngineUnavailableError, match="CUDA GPU"):
        TensorRTEngine.from_payload(payload)
    with pytest.raises(EngineUnavailableError, match="no CUDA GPU"):
        select_engine("tensorrt")


def test_module_imports_without_tensorrt():
    # tensorrt is an optional extra: importing the engine module must not need it.
    code = (
        "import sys; sys.modules['tensorrt'] = None; "
        "import cxr_ray.engines.tensorrt_engine as m; print(m.TensorRTEngine.name)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "tensorrt"


def test_key_covers_model_runtime_precision_and_profile():
    base = _key()
    variants = [
        _key(card=_card(weights_sha256="cd" * 32)),
        _key(card=_card(input_size=(96, 96))),
        _key(onnx=b"other onnx"),
        _key(tensorrt="10.10.0"),
        _key(gpu_name="NVIDIA L4"),
        _key(compute_capability="8.9"),
        _key(options={"trt_precision": "fp32"}),
        _key(options={"trt_max_batch": 64}),
        _key(options={"trt_opt_batch": 16}),
    ]
    digests = {k.digest for k in variants}
    assert base.digest not in digests and len(digests) == len(variants)
    # Engines output raw logits: a site-calibrated card of the same network shares its engine.
    site = _card(temperature=1.7, logit_bias=(0.0, 0.0, 2.0), lineage={"parent": "x"})
    assert _card().version != site.version and _card().engine_key == site.engine_key
    assert _key(card=site).digest == base.digest
    assert base.stem(site.engine_key) == base.stem(_card().engine_key)
    # Calibration data only matters for int8 engines.
    calib = np.zeros((4, 64, 64), np.uint8)
    assert _key(calibration=calib).digest == base.digest
    int8 = _key(options={"trt_precision": "int8"})
    assert _key(options={"trt_precision": "int8"}, calibration=calib).digest != int8.digest


def test_invalid_options_are_refused():
    import dataclasses

    with pytest.raises(EngineUnavailableError, match="unknown TensorRT precision 'int4'"):
        _key(precision="int4")
    with pytest.raises(ConfigError, match="trt_min_batch <= trt_opt_batch"):
        dataclasses.replace(_options(), trt_min_batch=8, trt_opt_batch=4)


def test_second_build_is_a_cache_hit(tmp_path):
    key, build = _key(), _Builder()
    before = te.builds_in_process()
    first = cached_engine(tmp_path, key, "mobilenet_v2-abab", build)
    meta = json.loads(first.with_suffix(".json").read_text())
    second = cached_engine(tmp_path, key, "mobilenet_v2-abab", build)
    assert first == second and build.calls == 1
    assert te.builds_in_process() == before + 1
    assert json.loads(second.with_suffix(".json").read_text())["built_at"] == meta["built_at"]
    assert meta["key"]["tensorrt"] == "10.9.0" and meta["key"]["gpu_name"] == "NVIDIA A10G"


def test_sidecar_key_mismatch_forces_rebuild_and_says_why(tmp_path, caplog):
    key, build = _key(), _Builder()
    plan = cached_engine(tmp_path, key, "v", build)
    sidecar = plan.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["key"]["tensorrt"] = "10.0.1"  # e.g. a cache copied from a node with another TRT
    sidecar.write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO, logger=te.__name__):
        cached_engine(tmp_path, key, "v", build)
    assert build.calls == 2
    assert "tensorrt: '10.0.1' -> '10.9.0'" in caplog.text


def test_new_tensorrt_or_gpu_builds_a_new_engine_and_logs_why(tmp_path, caplog):
    build = _Builder()
    old = cached_engine(tmp_path, _key(), "v", build)
    with caplog.at_level(logging.INFO, logger=te.__name__):
        new = cached_engine(tmp_path, _key(tensorrt="10.10.0", gpu_name="NVIDIA L4"), "v", build)
    assert new != old and old.is_file() and build.calls == 2
    assert f"not reusing {old.name}" in caplog.text
    assert "'NVIDIA A10G' -> 'NVIDIA L4'" in caplog.text


@pytest.mark.parametrize("damage", ["plan", "sidecar-missing", "sidecar-garbage"])
def test_damaged_cache_entries_are_rebuilt(tmp_path, damage):
    key, build = _key(), _Builder()
    plan = cached_engine(tmp_path, key, "v", build)
    if damage == "plan":
        plan.write_bytes(b"truncated")
    elif damage == "sidecar-missing":
        plan.with_suffix(".json").unlink()
    else:
        plan.with_suffix(".json").write_text("{not json")
    cached_engine(tmp_path, key, "v", build)
    assert build.calls == 2
    assert te.cache_problem(plan, plan.with_suffix(".json"), key) is None


def test_engine_that_failed_to_deserialize_is_rebuilt_once(tmp_path):
    key, build = _key(), _Builder()
    plan = cached_engine(tmp_path, key, "v", build)
    bad = te.sha256(plan.read_bytes())
    cached_engine(tmp_path, key, "v", build, reject_sha256=bad)
    assert build.calls == 2
    # Another actor that failed on the same old engine finds it already replaced.
    cached_engine(tmp_path, key, "v", build, reject_sha256=bad)
    assert build.calls == 2


def test_concurrent_actors_build_once(tmp_path):
    key = _key()
    calls: list[int] = []

    def slow_build() -> bytes:
        import time

        calls.append(1)
        time.sleep(0.3)
        return b"PLAN"

    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: cached_engine(tmp_path, key, "v", slow_build), range(4)))
    assert len(set(paths)) == 1 and len(calls) == 1


def _fake_trt(*, version: str, weak_typing: bool) -> types.SimpleNamespace:
    flags = types.SimpleNamespace(**({"FP16": 1, "INT8": 2} if weak_typing else {}))
    ns = types.SimpleNamespace(__version__=version, BuilderFlag=flags)
    if weak_typing:
        ns.IInt8EntropyCalibrator2 = object
    return ns


def test_precision_on_tensorrt_10_and_11(monkeypatch, caplog):
    trt10 = _fake_trt(version="10.9.0", weak_typing=True)
    trt11 = _fake_trt(version="11.4.0", weak_typing=False)
    assert te.effective_precision(trt10, "int8") == "int8"
    assert te.effective_precision(trt10, "fp16") == "fp16"
    with pytest.raises(EngineUnavailableError, match="removed implicit INT8 calibration"):
        te.effective_precision(trt11, "int8")
    monkeypatch.setattr(te, "_modelopt_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger=te.__name__):
        assert te.effective_precision(trt11, "fp16") == "fp32"
    assert "building in FP32" in caplog.text
    monkeypatch.setattr(te, "_modelopt_available", lambda: True)
    assert te.effective_precision(trt11, "fp16") == "fp16"


# ------------------------------------------------------------------ needs TensorRT + GPU


def _calibrated_tiny_net():
    """MobileNetV2 at 64 px with BatchNorm statistics from real-looking images.

    Untrained weights with default BatchNorm statistics give the same output for every input,
    which would make a parity test meaningless; recalibrating BatchNorm on a few generated
    X-rays makes the outputs depend on the image.
    """
    from cxr_ray.imaging.preprocess import PreprocessSpec, decode, to_model_input
    from cxr_ray.models.factory import create_model
    from tests import imaging

    torch.manual_seed(0)
    net = create_model("mobilenet_v2", num_classes=3, pretrained=False)
    spec = PreprocessSpec(64, 64)
    x = to_model_input(
        np.stack([decode(imaging.jpeg_bytes(300, 260, seed=s), spec).pixels for s in range(32)])
    )
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(x))
    return net.eval()


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory) -> Path:
    from cxr_ray.models.artifact import card_for, save_artifact

    out = tmp_path_factory.mktemp("tiny") / "artifact"
    net = _calibrated_tiny_net()
    save_artifact(net, card_for(net, "mobilenet_v2", input_size=64, intensity="none"), str(out))
    return out


#: Small profile so the split/pad logic is exercised with few images.
GPU_OPTIONS = {"trt_precision": "fp16", "trt_min_batch": 1, "trt_opt_batch": 16, "trt_max_batch": 32}


def _artifact_options(artifact: Path, cache: Path, **options):
    from cxr_ray.models.artifact import load_artifact

    art = load_artifact(str(artifact))
    return art, engine_options(ScoreSettings(**{**GPU_OPTIONS, "cache_dir": str(cache), **options}))


@pytest.mark.trt
@needs_trt
class TestTensorRTOnGpu:
    def _payload(self, artifact: Path, cache: Path, **options) -> EnginePayload:
        # The TensorRT cache (under cache_dir) is per test.
        art, opts = _artifact_options(artifact, cache, **options)
        return prepare(art, "tensorrt", opts, spec_for(art.card))[0]

    def test_builds_and_scores(self, tiny_artifact, tmp_path):
        engine = TensorRTEngine.from_payload(self._payload(tiny_artifact, tmp_path))
        assert (engine.name, engine.device) == ("tensorrt", "cuda")
        x = np.random.default_rng(0).random((5, 1, 64, 64), dtype=np.float32)
        logits, features = engine(x)
        assert logits.shape == (5, 3) and logits.dtype == features.dtype == np.float32
        assert features.shape == (5, 1280) and np.isfinite(logits).all()
        # run_tensor: CUDA in, CUDA out, same numbers.
        t_logits, t_features = engine.run_tensor(torch.from_numpy(x).cuda())
        assert t_logits.is_cuda and np.allclose(t_logits.cpu().numpy(), logits, atol=1e-6)
        assert t_features.is_cuda and np.allclose(t_features.cpu().numpy(), features, atol=1e-6)
        empty = engine.run_tensor(torch.zeros((0, 1, 64, 64), device="cuda"))
        assert [tuple(t.shape) for t in empty] == [(0, 3), (0, 1280)]

    def test_batches_over_the_profile_max_are_split(self, tiny_artifact, tmp_path):
        engine = TensorRTEngine.from_payload(self._payload(tiny_artifact, tmp_path))
        x = np.random.default_rng(1).random((75, 1, 64, 64), dtype=np.float32)
        whole, whole_features = engine(x)  # 32 + 32 + 11
        parts = [engine(x[i : i + 10]) for i in range(0, 75, 10)]
        assert whole.shape == (75, 3) and whole_features.shape == (75, 1280)
        np.testing.assert_allclose(whole, np.concatenate([p[0] for p in parts]), atol=2e-2)
        np.testing.assert_allclose(whole_features, np.concatenate([p[1] for p in parts]), atol=2e-2)

    def test_second_engine_is_a_cache_hit(self, tiny_artifact, tmp_path):
        payload = self._payload(tiny_artifact, tmp_path)
        before = te.builds_in_process()
        TensorRTEngine.from_payload(payload)
        sidecars = list((tmp_path / "tensorrt").glob("*.json"))
        assert len(sidecars) == 1 and te.builds_in_process() == before + 1
        built_at = json.loads(sidecars[0].read_text())["built_at"]
        TensorRTEngine.from_payload(payload)
        assert te.builds_in_process() == before + 1
        assert json.loads(sidecars[0].read_text())["built_at"] == built_at

    def test_key_mismatch_forces_rebuild(self, tiny_artifact, tmp_path):
        payload = self._payload(tiny_artifact, tmp_path)
        TensorRTEngine.from_payload(payload)
        (sidecar,) = (tmp_path / "tensorrt").glob("*.json")
        meta = json.loads(sidecar.read_text())
        meta["key"]["compute_capability"] = "7.5"  # as if built on a T4
        sidecar.write_text(json.dumps(meta))
        before = te.builds_in_process()
        engine = TensorRTEngine.from_payload(payload)
        assert te.builds_in_process() == before + 1
        assert engine(np.zeros((2, 1, 64, 64), np.float32))[0].shape == (2, 3)

    def test_unloadable_engine_is_rebuilt(self, tiny_artifact, tmp_path):
        payload = self._payload(tiny_artifact, tmp_path)
        TensorRTEngine.from_payload(payload)
        (sidecar,) = (tmp_path / "tensorrt").glob("*.json")
        plan = sidecar.with_suffix(".plan")
        garbage = b"\0" * 1024
        plan.write_bytes(garbage)
        meta = json.loads(sidecar.read_text())
        meta["plan_sha256"] = te.sha256(garbage)  # checksum matches: only TRT can tell
        sidecar.write_text(json.dumps(meta))
        before = te.builds_in_process()
        engine = TensorRTEngine.from_payload(payload)
        assert te.builds_in_process() == before + 1
        assert engine(np.zeros((1, 1, 64, 64), np.float32))[0].shape == (1, 3)

    @pytest.mark.data
    @pytest.mark.parametrize("precision", ["fp16", "fp32"])
    def test_parity_with_onnxruntime_on_real_images(
        self, tiny_artifact, tmp_path, kermany_fullres, precision
    ):
        from cxr_ray.engines.onnx_engine import OnnxEngine
        from cxr_ray.imaging.preprocess import decode, to_model_input

        payload = self._payload(tiny_artifact, tmp_path, trt_precision=precision)
        spec = spec_for(payload.card)
        files = sorted(kermany_fullres.rglob("*.jpeg"))
        x = to_model_input(np.stack([decode(f.read_bytes(), spec).pixels for f in files]))
        card = payload.card
        ref_logits, ref_features = OnnxEngine(payload.onnx)(x)
        logits, features = TensorRTEngine.from_payload(payload)(x)
        reference, probs = card.probabilities(ref_logits), card.probabilities(logits)
        assert np.abs(probs - reference).max() <= 1e-2
        cosine = (features * ref_features).sum(1) / (
            np.linalg.norm(features, axis=1) * np.linalg.norm(ref_features, axis=1)
        )
        assert cosine.min() > 0.999, cosine.min()
        agreement = float((probs.argmax(1) == reference.argmax(1)).mean())
        assert agreement >= 0.99, agreement

    def test_build_engine_file_is_the_cached_engine(self, tiny_artifact, tmp_path):
        payload = self._payload(tiny_artifact, tmp_path)
        path = te.build_engine_file(payload)
        assert path.is_file() and path.suffix == ".plan"
        assert path.parent == tmp_path / "tensorrt"
        before = te.builds_in_process()
        TensorRTEngine.from_payload(payload)
        assert te.builds_in_process() == before
