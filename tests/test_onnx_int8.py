"""Opt-in INT8 onnxruntime: quantized from the artifact's training images, checked, cached, scored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cxr_ray.config import ScoreSettings, load_settings
from cxr_ray.engines import build, engine_options, prepare
from cxr_ray.engines.onnx_quantize import int8_cache_path
from cxr_ray.errors import ConfigError, EngineUnavailableError
from cxr_ray.imaging.preprocess import decode, to_model_input
from cxr_ray.labels import parse_kermany_path
from cxr_ray.models.artifact import load_artifact
from cxr_ray.models.card import spec_for
from tests import imaging
from tests.conftest import make_artifact

INT8 = {"onnx_precision": "int8", "onnx_calibration_images": 8}


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory) -> Path:
    """A 64 px artifact whose ``split.parquet`` lists 16 training and 8 validation images."""
    root = tmp_path_factory.mktemp("int8")
    folder = imaging.kermany_folder(root / "images", per_class=8, size=(96, 80))
    uris = sorted(str(p) for p in folder.rglob("*.jpeg"))
    art = make_artifact(root / "model", input_size=64)
    split = ["val" if i % 3 == 0 else "train" for i in range(len(uris))]
    labels = [parse_kermany_path(u).label for u in uris]
    pq.write_table(pa.table({"uri": uris, "label": labels, "split": split}), art / "split.parquet")
    return art


def _prepare(artifact: Path, cache: Path | str, **score):
    art = load_artifact(str(artifact))
    return prepare(
        art, "onnxruntime", engine_options(ScoreSettings(cache_dir=str(cache), **score)), spec_for(art.card)
    )


def _op_types(model: bytes) -> set[str]:
    return {n.op_type for n in onnx.load_from_string(model).graph.node}


def test_int8_model_is_quantized_checked_and_cached(int8_artifact, tmp_path):
    cache = str(tmp_path / "cache")
    fp32, fp32_report = _prepare(int8_artifact, cache)
    payload, report = _prepare(int8_artifact, cache, **INT8)
    assert {"QuantizeLinear", "DequantizeLinear"} <= _op_types(payload.onnx)
    assert "QuantizeLinear" not in _op_types(fp32.onnx)
    assert (fp32_report.precision, report.precision) == ("fp32", "int8")
    assert (fp32_report.onnx_cache, report.onnx_cache) == ("built", "built")

    check = report.int8_check
    assert check is not None and check["images"] == 8 and check["calibration_images"] == 8
    keys = {"accuracy", "macro_f1", "sensitivity_at_threshold", "specificity_at_threshold"}
    assert set(check["fp32"]) == set(check["int8"]) == keys

    # What the check reports is what the engines do on those images.
    art = load_artifact(str(int8_artifact))
    spec = spec_for(art.card)
    val = [u for u, s in zip(*_split_columns(int8_artifact), strict=True) if s == "val"]
    x = to_model_input(np.stack([decode(Path(u).read_bytes(), spec).pixels for u in val]))
    (l32, f32), (l8, f8) = build(fp32)(x), build(payload)(x)
    assert l8.shape == (8, 3) and f8.shape == f32.shape == (8, 1280)
    # The check is on the card's calibrated probabilities, as scoring reports them.
    p32, p8 = art.card.probabilities(l32), art.card.probabilities(l8)
    assert np.abs(p32 - p8).mean() == pytest.approx(check["mean_abs_prob_change"], abs=1e-5)
    assert np.abs(p32 - p8).max() == pytest.approx(check["max_abs_prob_change"], abs=1e-5)
    assert (p32.argmax(1) == p8.argmax(1)).mean() == pytest.approx(check["argmax_agreement"])
    assert np.abs(p32 - p8).max() < 0.1  # quantization noise, not a different model
    # Features keep their direction (0.86 for this 64 px model calibrated on 8 images).
    cosine = (f32 * f8).sum(1) / (np.linalg.norm(f32, axis=1) * np.linalg.norm(f8, axis=1))
    assert cosine.min() == pytest.approx(check["min_feature_cosine"], abs=1e-5)
    assert 0.5 < check["min_feature_cosine"] <= 1.0 + 1e-6

    # Built once: a second run reuses the cached model and its check.
    path = int8_cache_path(art, cache, 8, 0)
    before = path.stat().st_mtime_ns
    again, again_report = _prepare(int8_artifact, cache, **INT8)
    assert again.onnx == payload.onnx and again_report.int8_check == check
    assert again_report.onnx_cache == "hit"
    assert path.stat().st_mtime_ns == before

    # A site-calibrated card of the same network: the quantized model is shared (never
    # re-quantized), the check is redone under the new calibration.
    import dataclasses

    from cxr_ray.models.card import ModelCard

    site_card = ModelCard.model_validate(
        art.card.model_dump() | {"logit_bias": (0.0, 0.0, 3.0), "lineage": {"parent": art.card.version}}
    )
    site = dataclasses.replace(art, card=site_card)
    assert int8_cache_path(site, cache, 8, 0) == path
    site_payload, site_report = prepare(
        site, "onnxruntime", engine_options(ScoreSettings(cache_dir=cache, **INT8)), spec
    )
    assert site_payload.onnx == payload.onnx and site_report.onnx_cache == "hit"
    assert path.stat().st_mtime_ns == before
    site_check = site_report.int8_check
    assert site_check is not None and site_check != check
    q32, q8 = site_card.probabilities(l32), site_card.probabilities(l8)
    assert np.abs(q32 - q8).mean() == pytest.approx(site_check["mean_abs_prob_change"], abs=1e-5)


def _split_columns(artifact: Path) -> tuple[list[str], list[str]]:
    t = pq.read_table(artifact / "split.parquet")
    return t["uri"].to_pylist(), t["split"].to_pylist()


def test_int8_without_training_images_is_a_clear_error(tiny_artifact, tmp_path):
    with pytest.raises(EngineUnavailableError, match=r"split\.parquet is missing.*onnx_precision = 'fp32'"):
        _prepare(tiny_artifact, tmp_path, **INT8)


def test_int8_with_training_images_missing_here_is_a_clear_error(tiny_artifact, tmp_path):
    # An artifact copied to a site that does not have the data it was trained on.
    art = tmp_path / "model"
    shutil.copytree(tiny_artifact, art)
    uris = [str(tmp_path / "gone" / f"person{i}_virus_{i}.jpeg") for i in range(4)]
    split = pa.table({"uri": uris, "label": ["viral"] * 4, "split": ["train"] * 4})
    pq.write_table(split, art / "split.parquet")
    with pytest.raises(EngineUnavailableError, match=r"person0_virus_0\.jpeg cannot be read here.*'fp32'"):
        _prepare(art, tmp_path / "cache", **INT8)


def test_int8_setting_is_validated():
    with pytest.raises(ConfigError, match=r"score\.onnx_precision: Input should be 'fp32' or 'int8'"):
        load_settings(None, {"score": {"onnx_precision": "int4"}})


def test_cli_scoring_with_int8_keeps_every_row_and_reports_the_check(ray_local, int8_artifact, tmp_path):
    from click.testing import CliRunner

    from cxr_ray.cli import main

    root = imaging.kermany_folder(tmp_path / "in", per_class=3)
    (root / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    n = len(list(root.rglob("*.jpeg")))
    out = tmp_path / "out"
    args = ["score", str(root), "--model", str(int8_artifact), "--out", str(out), "--onnx-precision", "int8"]
    env = {"CXR_SCORE__CACHE_DIR": str(tmp_path / "cache"), "CXR_SCORE__ONNX_CALIBRATION_IMAGES": "8"}
    res = CliRunner().invoke(main, args, env=env)
    assert res.exit_code == 0, res.output
    assert "(onnxruntime int8," in res.output and "INT8 model vs fp32 on 8 validation images" in res.output
    t = pq.read_table(out / "predictions.parquet")
    assert t.num_rows == n == 10
    assert t["status"].to_pylist().count("error") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine_precision"] == "int8" and summary["engine"] == "onnxruntime"
    assert summary["int8_check"]["images"] == 8 and summary["int8_check"]["calibration_images"] == 8


def test_split_logits_are_the_untempered_scores_of_the_recorded_split(int8_artifact):
    from cxr_ray.calibration import softmax
    from cxr_ray.labels import LABELS
    from cxr_ray.models.factory import LogitsAndFeatures
    from cxr_ray.models.outputs import split_images, split_logits, split_logits_and_features

    art = load_artifact(str(int8_artifact))
    logits, y = split_logits(art, "val")
    split = pq.read_table(int8_artifact / "split.parquet").to_pylist()
    assert logits.shape == (8, 3) and logits.dtype == np.float64
    assert [LABELS[i] for i in y] == [r["label"] for r in split if r["split"] == "val"]
    x = torch.from_numpy(to_model_input(split_images(art, "val")[0]))
    with torch.inference_mode():
        eager_logits, eager_features = LogitsAndFeatures(art.build())(x)
    probs = softmax(eager_logits.double().numpy(), art.card.temperature)
    tempered = softmax(logits, art.card.temperature)
    np.testing.assert_allclose(tempered, probs, atol=1e-5)
    same_logits, features, same_y = split_logits_and_features(art, "val")
    np.testing.assert_array_equal(same_logits, logits)
    np.testing.assert_array_equal(same_y, y)
    assert features.dtype == np.float32 and features.shape == (8, 1280)
    np.testing.assert_allclose(features, eager_features.numpy(), atol=1e-5)
