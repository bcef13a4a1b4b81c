"""GPU control flow proven on a CPU: logical GPUs, the gpu_decode hand-off, engine fallback.

No GPU has run this project's GPU paths yet, so what can be checked without one is checked
here: Ray schedules ``num_gpus`` actors on logical GPUs of a CPU-only machine (the actors
then have no CUDA, like a node with a too-old driver), which is exactly the case where JPEG
bytes shipped for GPU decode used to be scored as black images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cxr_ray.config import ScoreSettings
from cxr_ray.engines import EnginePayload, build, engine_options, prepare
from cxr_ray.errors import EngineUnavailableError
from cxr_ray.models.artifact import load_artifact
from cxr_ray.models.card import spec_for
from tests import imaging, scenarios
from tests.conftest import make_artifact

REPO = Path(__file__).resolve().parents[1]


def _payload(artifact: Path, cache: Path, engine: str = "auto") -> EnginePayload:
    art = load_artifact(str(artifact))
    return prepare(art, engine, engine_options(ScoreSettings(cache_dir=str(cache))), spec_for(art.card))[0]


@pytest.mark.slow  # four scoring runs on their own Ray with logical GPUs (~80 s)
def test_logical_gpus_score_like_the_cpu_path_and_explain_finishes(tmp_path):
    images = imaging.kermany_folder(tmp_path / "in", per_class=3, size=(160, 128))
    (images / "scan.png").write_bytes(imaging.png_bytes(120, 100, seed=5))
    (images / "truncated.jpeg").write_bytes(imaging.jpeg_bytes(200, 160, seed=6)[:300])
    artifact = make_artifact(tmp_path / "model", threshold=0.0)  # every ok row flagged: explained
    r = scenarios.report(scenarios.run("logical_gpus", images, artifact, tmp_path / "o"))
    assert r["cpu"] == {"images": 11, "ok": 10, "engines": ["onnxruntime"], "flagged": 10}
    for name in ("gpu_onnx", "gpu_auto", "explain"):
        assert r[name]["images"] == 11 and r[name]["ok"] == 10, (name, r[name])
        assert r[name]["same_rows"] and r[name]["same_status"], (name, r[name])
        assert r[name]["max_dp"] <= 1e-4, (name, r[name])
    # auto inside actors that have a (logical) GPU but no CUDA: onnxruntime, not torch on CPU.
    # "explain": one logical GPU, held by the one predictor (gpus_per_actor=1): it finishes.
    assert r["gpu_auto"]["engines"] == ["onnxruntime"]
    assert r["explain"]["heatmaps"] == 10 and r["explain"]["heatmap_files_exist"]
    assert r["ok_rows_scored_as_black"] == 0


def test_auto_falls_back_with_one_warning_when_an_engine_cannot_be_built(tiny_artifact, tmp_path, caplog):
    import dataclasses

    payload = dataclasses.replace(_payload(tiny_artifact, tmp_path), candidates=("tensorrt", "onnxruntime"))
    with caplog.at_level(logging.WARNING, logger="cxr_ray.engines.base"):
        engine = build(payload)
    assert engine.name == "onnxruntime"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "using onnxruntime" in warnings[0] and "tensorrt:" in warnings[0]
    x = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    logits, features = engine(x)
    assert logits.shape == (2, 3) and features.shape[0] == 2 and np.isfinite(logits).all()


def test_auto_with_nothing_buildable_and_an_explicit_engine_fail_clearly(tiny_artifact, tmp_path):
    import dataclasses

    payload = _payload(tiny_artifact, tmp_path)
    with pytest.raises(EngineUnavailableError, match=r"no engine could be built here: tensorrt: .*torch"):
        build(dataclasses.replace(payload, candidates=("tensorrt", "torch"), weights=b""))
    if importlib_find("tensorrt") is None:
        with pytest.raises(EngineUnavailableError, match=r"'tensorrt' package"):
            build(dataclasses.replace(payload, engine="tensorrt"))


def importlib_find(name: str):
    import importlib.util

    return importlib.util.find_spec(name)


def test_the_cuda_problem_names_the_driver_requirement(monkeypatch, tmp_path):
    from cxr_ray.engines import base

    monkeypatch.setattr(base, "_cuda_available", lambda: False)
    driver = tmp_path / "version"
    driver.write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n"
    )
    monkeypatch.setattr(base, "_DRIVER_FILE", str(driver))
    import torch

    problem = base.cuda_problem()
    assert problem is not None and "535.183.01" in problem and f"CUDA {torch.version.cuda}" in problem
    if (torch.version.cuda or "").startswith("13"):
        assert f">= {base.MIN_DRIVER_CUDA13}" in problem
    monkeypatch.setattr(base, "_DRIVER_FILE", str(tmp_path / "absent"))
    assert "no NVIDIA driver is loaded" in (base.cuda_problem() or "")
    monkeypatch.setattr(base, "_cuda_available", lambda: True)
    assert base.cuda_problem() is None


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_then_inference_matches_the_cpu_path(tiny_artifact, tmp_path, kermany_fullres):
    """On a real GPU: JPEGs decoded by nvJPEG (on torchvision's own stream) and scored by the
    engine (on another stream) give the CPU path's probabilities. The predictor synchronises
    the device between the two; without that barrier a batch could be read half-written as
    soon as anything overlaps decode with inference."""
    import pyarrow as pa

    from cxr_ray.scoring.stages import CxrPredictor, decode_stage

    art = load_artifact(str(tiny_artifact))
    spec = spec_for(art.card)
    payload = _payload(tiny_artifact, tmp_path, "torch")
    files = sorted(kermany_fullres.rglob("*.jpeg"))[:48]
    raw = pa.table(
        {
            "name": [f.name for f in files],
            "uri": [str(f) for f in files],
            "data": [f.read_bytes() for f in files],
            "error": pa.nulls(len(files), pa.string()),
        }
    )
    gpu = CxrPredictor(payload, spec=spec, gpu_decode=True)
    assert gpu.gpu_decode
    on_gpu = gpu(decode_stage(raw, spec=spec, gpu_jpeg=True))
    on_cpu = gpu(decode_stage(raw, spec=spec))
    assert list(on_gpu["status"]) == ["ok"] * len(files)
    assert np.abs(on_gpu["prob_pneumonia"] - on_cpu["prob_pneumonia"]).max() < 0.02
