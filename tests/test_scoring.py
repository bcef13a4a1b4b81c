"""Batch scoring: predictor without Ray, engines agree, the Ray Data pipeline end to end."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cxr_ray.cli import main
from cxr_ray.config import ScoreSettings, load_settings
from cxr_ray.data.readers import read_unit
from cxr_ray.data.sources import ReadOptions, list_source
from cxr_ray.engines import auto_candidates, availability, build, engine_options, prepare, select_engine
from cxr_ray.errors import DataError, EngineUnavailableError
from cxr_ray.imaging.preprocess import decode, to_model_input
from cxr_ray.imaging.stats import INPUT_STATS, input_stats
from cxr_ray.labels import LABELS
from cxr_ray.models.artifact import load_artifact, read_card
from cxr_ray.models.card import spec_for
from cxr_ray.scoring.pipeline import score
from cxr_ray.scoring.schema import PREDICTIONS_SCHEMA
from cxr_ray.scoring.stages import INTERNAL, CxrPredictor, decode_stage, pixel_stats, tensor_column
from tests import imaging


def _raw_batch(folder: Path) -> pa.Table:
    opts = ReadOptions(rows_per_block=1000)
    return pa.concat_tables([b for u in list_source(str(folder), opts) for b in read_unit(u, opts)])


def _prepare(artifact: Path, engine: str, cache: Path, **score):
    art = load_artifact(str(artifact))
    options = engine_options(ScoreSettings(cache_dir=str(cache), **score))
    return prepare(art, engine, options, spec_for(art.card))


def _settings(tmp_path: Path, **score):
    return load_settings(None, {"score": {"cache_dir": str(tmp_path / "cache"), **score}})


def _broken_folder(root: Path) -> tuple[Path, int, int]:
    imaging.kermany_folder(root, per_class=4)
    bad = {k: v for k, v in imaging.bad_inputs().items() if k != "wrong-extension.png"}
    for name, data in bad.items():
        (root / name).write_bytes(data)
    return root, 12 + len(bad), len(bad)


def test_decode_stage_uses_the_one_preprocessing(tiny_artifact, xray_folder):
    spec = spec_for(read_card(str(tiny_artifact)))
    raw = _raw_batch(xray_folder)
    out = decode_stage(raw, spec=spec)
    for i, row in enumerate(raw.to_pylist()):
        assert np.array_equal(out["pixels"][i], decode(row["data"], spec).pixels)
    assert set(out["label"]) == {"normal", "bacterial", "viral"}
    assert all(len(x) == 64 for x in out["image_id"])


def test_predictor_on_a_plain_batch_without_ray(tiny_artifact, tmp_path):
    root, n, n_bad = _broken_folder(tmp_path / "in")
    spec = spec_for(read_card(str(tiny_artifact)))
    batch = decode_stage(_raw_batch(root), spec=spec)
    payload, _ = _prepare(tiny_artifact, "onnxruntime", tmp_path / "c")
    out = CxrPredictor(payload, spec=spec)(batch)
    assert len(out["uri"]) == n
    ok = out["status"] == "ok"
    assert ok.sum() == n - n_bad
    probs = np.stack([out["prob_normal"], out["prob_bacterial"], out["prob_viral"]], 1)
    assert np.allclose(probs[ok].sum(1), 1, atol=1e-5)
    assert np.isnan(probs[~ok]).all() and all(out["error"][~ok])
    assert np.allclose(out["prob_pneumonia"][ok], probs[ok][:, 1:].sum(1), atol=1e-6)
    assert list(out["flagged"][ok]) == list(out["prob_pneumonia"][ok] >= 0.5)
    # Drift inputs: finite where scored, NaN rows elsewhere (these error rows never decoded).
    features, stats = out["features"], out["input_stats"]
    assert features.dtype == stats.dtype == np.float32
    assert features.shape == (n, 1280) and stats.shape == (n, len(INPUT_STATS))
    assert np.isfinite(features[ok]).all() and np.isnan(features[~ok]).all()
    assert np.isfinite(stats[ok]).all() and np.isnan(stats[~ok]).all()
    # ... the statistics of exactly the pixels the model saw, at the original size.
    raw = {r["uri"]: r["data"] for r in _raw_batch(root).to_pylist()}
    sizes = [decode(raw[u], spec) for u in batch["uri"][ok]]
    expected = input_stats(batch["pixels"][ok], [d.width for d in sizes], [d.height for d in sizes])
    np.testing.assert_array_equal(stats[ok], expected)
    assert not (set(INTERNAL) - {"features", "input_stats"}) & set(out)


@pytest.mark.parametrize("intensity", ["none", "equalize"])
def test_onnxruntime_and_torch_agree(tmp_path, intensity, request):
    from tests.conftest import KERMANY_FULLRES, make_artifact

    art = make_artifact(tmp_path / "m", input_size=224, intensity=intensity)
    spec = spec_for(read_card(str(art)))
    if KERMANY_FULLRES.is_dir():
        files = sorted(KERMANY_FULLRES.rglob("*.jpeg"))[::20][:24]
        datas = [f.read_bytes() for f in files]
    else:
        datas = [imaging.jpeg_bytes(800, 700, seed=i) for i in range(16)]
    x = to_model_input(np.stack([decode(d, spec).pixels for d in datas]))
    engines = {name: build(_prepare(art, name, tmp_path / "c")[0]) for name in ("onnxruntime", "torch")}
    outs = {name: e(x.copy()) for name, e in engines.items()}
    card = load_artifact(str(art)).card
    probs = {name: card.probabilities(logits) for name, (logits, _) in outs.items()}
    assert probs["onnxruntime"].shape == (len(datas), 3)
    assert np.abs(probs["onnxruntime"] - probs["torch"]).max() <= 1e-4
    assert np.abs(outs["onnxruntime"][1] - outs["torch"][1]).max() <= 1e-3
    assert probs["torch"].std() > 1e-3  # a real, non-constant model


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_engines_output_the_networks_raw_logits_and_penultimate_features(tiny_artifact, tmp_path, engine):
    import torch

    from cxr_ray.models.factory import LogitsAndFeatures

    art = load_artifact(str(tiny_artifact))
    spec = spec_for(art.card)
    x = to_model_input(
        np.stack([decode(imaging.jpeg_bytes(300, 260, seed=s), spec).pixels for s in range(6)])
    )
    net = art.build()
    with torch.inference_mode():
        eager_logits, eager_features = (t.numpy() for t in LogitsAndFeatures(net)(torch.from_numpy(x)))
        # The features are the input of the classifier: it maps them to the logits.
        head = net.backbone.classifier[-1](torch.from_numpy(eager_features)).numpy()
    np.testing.assert_allclose(head, eager_logits, atol=1e-5)
    logits, features = build(_prepare(tiny_artifact, engine, tmp_path / "c")[0])(x.copy())
    assert logits.dtype == features.dtype == np.float32
    assert logits.shape == (6, 3) and features.shape == (6, 1280)
    assert np.abs(logits - eager_logits).max() < 1e-3
    assert np.abs(features - eager_features).max() < 1e-3
    assert eager_features.std(axis=0).max() > 1e-3  # depends on the image


def _site_card(card, bias=(0.0, 0.0, 5.0)):
    from cxr_ray.models.card import ModelCard

    fields = card.model_dump() | {"logit_bias": bias, "lineage": {"parent_version": card.version}}
    return ModelCard.model_validate(fields)


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_the_predictor_applies_the_cards_site_calibration(tiny_artifact, tmp_path, engine):
    import dataclasses

    art = load_artifact(str(tiny_artifact))
    spec = spec_for(art.card)
    payload, _ = _prepare(tiny_artifact, engine, tmp_path / "c")
    root, n, n_bad = _broken_folder(tmp_path / "in")
    batch = decode_stage(_raw_batch(root), spec=spec)
    site = _site_card(art.card)
    plain = CxrPredictor(payload, spec=spec)(batch)
    calibrated = CxrPredictor(dataclasses.replace(payload, card=site), spec=spec)(batch)
    ok = calibrated["status"] == "ok"
    assert list(calibrated["status"]) == list(plain["status"]) and ok.sum() == n - n_bad
    logits, _ = build(payload)(to_model_input(batch["pixels"][ok]))
    expected = site.probabilities(logits)
    got = np.stack([calibrated[f"prob_{k}"] for k in ("normal", "bacterial", "viral")], 1)[ok]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(calibrated["prob_pneumonia"][ok], 1 - expected[:, 0], atol=1e-6)
    assert list(calibrated["pred_label"][ok]) == [LABELS[i] for i in expected.argmax(1)]
    # The bias moves decisions: a site card is not the parent model under another name.
    assert (calibrated["pred_label"][ok] != plain["pred_label"][ok]).any()
    assert (calibrated["prob_viral"][ok] > plain["prob_viral"][ok]).all()
    np.testing.assert_array_equal(calibrated["features"], plain["features"])


def test_a_skipped_row_stays_skipped_with_no_drift_inputs(tiny_artifact, tmp_path):
    art = load_artifact(str(tiny_artifact))
    spec = spec_for(art.card)
    payload, _ = _prepare(tiny_artifact, "onnxruntime", tmp_path / "c")
    batch = decode_stage(_raw_batch(imaging.kermany_folder(tmp_path / "in", per_class=1)), spec=spec)
    batch["status"][1], batch["error"][1] = "skipped", "outside the intended use"
    out = CxrPredictor(payload, spec=spec)(batch)
    assert list(out["status"]) == ["ok", "skipped", "ok"]
    assert np.isnan(out["features"][1]).all() and np.isnan(out["input_stats"][1]).all()
    assert np.isfinite(out["features"][[0, 2]]).all() and np.isfinite(out["input_stats"][[0, 2]]).all()


def test_pixel_stats_equal_the_input_statistics_contract(kermany224):
    from cxr_ray.imaging.preprocess import PreprocessSpec

    rng = np.random.default_rng(0)
    files = sorted(kermany224.rglob("*.jpeg"))[::400]
    spec = PreprocessSpec(224, 224, intensity="equalize")
    real = np.stack([decode(f.read_bytes(), spec).pixels for f in files])
    cases = [
        real,
        rng.integers(0, 256, (5, 7, 9), dtype=np.uint8),
        np.full((2, 3, 3), 200, np.uint8),
        rng.integers(90, 110, (3, 1, 1), dtype=np.uint8),
    ]
    for pixels in cases:
        sizes = rng.integers(1, 3000, (len(pixels), 2))
        # The contract's definition: np.percentile (linear), mean, population std, size, aspect.
        flat = pixels.reshape(len(pixels), -1).astype(np.float64)
        expected = np.column_stack(
            [
                np.percentile(flat, [5, 25, 50, 75, 95], axis=1).T,
                flat.mean(axis=1),
                flat.std(axis=1),
                sizes[:, 0],
                sizes[:, 1],
                sizes[:, 0] / sizes[:, 1],
            ]
        ).astype(np.float32)
        assert INPUT_STATS[:7] == tuple(
            f"intensity_{k}" for k in ("p05", "p25", "p50", "p75", "p95", "mean", "std")
        )
        np.testing.assert_allclose(
            input_stats(pixels, sizes[:, 0], sizes[:, 1]), expected, rtol=1e-6, atol=1e-4
        )
        np.testing.assert_array_equal(
            pixel_stats(pixels, sizes), input_stats(pixels, sizes[:, 0], sizes[:, 1])
        )
    assert pixel_stats(real[:0], np.zeros((0, 2))).shape == (0, len(INPUT_STATS))


def test_engine_selection_follows_availability_and_explains_errors():
    import torch

    avail = availability()
    if avail["tensorrt"] is None:
        expected = "tensorrt"
    elif torch.cuda.is_available():
        expected = "torch"
    else:
        expected = "onnxruntime"
    assert select_engine("auto") == expected == auto_candidates()[0]
    assert auto_candidates(gpu=False)[-1] == "torch"  # the last resort everywhere
    if avail["tensorrt"] is not None:
        with pytest.raises(EngineUnavailableError, match=r"tensorrt.*Usable here: torch, onnxruntime"):
            select_engine("tensorrt")
    with pytest.raises(EngineUnavailableError, match="unknown engine"):
        select_engine("tpu")


def test_score_folder_with_broken_files_yields_one_row_per_file(ray_local, tiny_artifact, tmp_path):
    from sklearn.metrics import f1_score

    root, n, n_bad = _broken_folder(tmp_path / "in")
    r = score(
        str(root),
        str(tiny_artifact),
        str(tmp_path / "out"),
        _settings(tmp_path),
        history=str(tmp_path / "history.parquet"),
    )
    t = pq.read_table(tmp_path / "out" / "predictions.parquet")
    assert t.schema.equals(PREDICTIONS_SCHEMA)
    assert t.num_rows == n == r.images
    # The structured report among the bad inputs (Modality SR) is outside the model's intended
    # use: a skipped row with the reason, not an error.
    assert Counter(t["status"].to_pylist()) == {"ok": n - n_bad, "error": n_bad - 1, "skipped": 1}
    (sr,) = t.filter(pa.compute.equal(t["status"], "skipped")).to_pylist()
    assert sr["uri"].endswith("noimage.dcm") and sr["modality"] == "SR"
    assert sr["error"] == "out_of_scope: modality SR is outside the model's intended use (CR, DX)"
    assert sr["error_code"] == "out_of_scope"
    assert len(set(t["uri"].to_pylist())) == n
    assert r.engine == "onnxruntime" and set(t["engine"].to_pylist()) == {"onnxruntime"}
    labelled = t.filter(
        pa.compute.and_(pa.compute.equal(t["status"], "ok"), pa.compute.is_valid(t["label"]))
    ).to_pylist()
    assert len(labelled) == 12
    m = {
        (row["metric"], row["label"]): row["value"]
        for row in pq.read_table(tmp_path / "out" / "metrics.parquet").to_pylist()
    }
    y = [row["label"] for row in labelled]
    pred = [row["pred_label"] for row in labelled]
    assert m[("macro_f1", None)] == pytest.approx(f1_score(y, pred, average="macro"))
    conf = pq.read_table(tmp_path / "out" / "confusion.parquet")
    assert sum(conf["count"].to_pylist()) == 12
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["images"] == n and summary["errors"] == n_bad - 1 and summary["skipped"] == 1
    errors = t.filter(pa.compute.not_equal(t["status"], "ok"))
    for col in ("pred_label", "prob_normal", "prob_pneumonia", "flagged"):
        assert errors[col].null_count == n_bad, col
    # A second run appends to the history table.
    score(
        str(root),
        str(tiny_artifact),
        str(tmp_path / "out2"),
        _settings(tmp_path),
        history=str(tmp_path / "history.parquet"),
    )
    hist = pq.read_table(tmp_path / "history.parquet")
    assert len(set(hist["run_id"].to_pylist())) == 2


def test_a_run_of_only_broken_files_flags_nothing(ray_local, tiny_artifact, tmp_path):
    # Every block all errors: the missing flags must stay null (a column of only missing
    # values once arrived as NaN and was cast to True, flagging every broken file).
    root = tmp_path / "in"
    root.mkdir()
    for i in range(5):
        (root / f"broken{i}.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    r = score(str(root), str(tiny_artifact), str(tmp_path / "out"), _settings(tmp_path))
    t = pq.read_table(tmp_path / "out" / "predictions.parquet")
    assert (r.images, r.errors, r.flagged) == (5, 5, 0)
    assert t["flagged"].null_count == 5 and t["prob_pneumonia"].null_count == 5


def test_crashed_run_leaves_nothing_half_written(ray_local, tiny_artifact, tmp_path):
    root = imaging.kermany_folder(tmp_path / "in", per_class=6)
    out = tmp_path / "out"

    def boom(block):
        raise RuntimeError("driver died")

    with pytest.raises(RuntimeError, match="driver died"):
        score(
            str(root),
            str(tiny_artifact),
            str(out),
            _settings(tmp_path, batch_size=4),
            on_block=boom,
        )
    assert not (out / "predictions.parquet").exists()
    assert not (out / "summary.json").exists()
    assert [p.name for p in out.iterdir()] == []  # no temp files left either


def test_cli_score_prints_summary_and_metrics(ray_local, tiny_artifact, tmp_path):
    root, n, n_bad = _broken_folder(tmp_path / "in")
    result = CliRunner().invoke(
        main,
        ["score", str(root), "--model", str(tiny_artifact), "--out", str(tmp_path / "runs" / "a")],
        env={"CXR_SCORE__CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.exit_code == 0, result.output
    assert f"{n} images, {n - n_bad} ok, {n_bad - 1} errors, 1 skipped" in result.output
    assert "img/s" in result.output and "macro-F1" in result.output
    assert (tmp_path / "runs" / "metrics_history.parquet").exists()


def test_evaluate_and_report_use_the_runs_flag_threshold(ray_local, tmp_path):
    from cxr_ray.reporting.report import render
    from tests.conftest import make_artifact

    model = make_artifact(tmp_path / "model", threshold=0.731)
    root = imaging.kermany_folder(tmp_path / "in", per_class=3)
    env = {"CXR_SCORE__CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["score", str(root), "--model", str(model), "--out", str(out)], env=env)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["flag_threshold"] == pytest.approx(0.731)
    t = pq.read_table(out / "predictions.parquet")
    flagged = np.array(t["prob_pneumonia"].to_numpy()) >= 0.731
    assert t["flagged"].to_pylist() == flagged.tolist()
    res = CliRunner().invoke(main, ["evaluate", str(out / "predictions.parquet")])
    assert res.exit_code == 0, res.output
    assert "at threshold 0.731" in res.output
    res = CliRunner().invoke(main, ["evaluate", str(out / "predictions.parquet"), "--threshold", "0.2"])
    assert "at threshold 0.200" in res.output
    assert "flag threshold 0.731" in render(str(out))


def test_a_runs_outputs_describe_themselves(ray_local, tiny_artifact, tmp_path):
    """summary.json says what was scored, when, with which versions and settings (no secret),
    and every Parquet output carries its column descriptions and schema version."""
    from cxr_ray.io.columns import SCHEMA_VERSION, description, undescribed
    from cxr_ray.scoring import schema_doc

    root = imaging.kermany_folder(tmp_path / "in", per_class=2)
    key = "k" * 24  # a pseudonym key: must never reach summary.json
    env = {
        "CXR_SCORE__CACHE_DIR": str(tmp_path / "cache"),
        "CXR_SCORE__PSEUDONYMIZE": "true",
        "CXR_SCORE__PSEUDONYM_KEY": key,
    }
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main, ["score", str(root), "--model", str(tiny_artifact), "--out", str(out)], env=env
    )
    assert res.exit_code == 0, res.output
    text = (out / "summary.json").read_text()
    assert key not in text
    summary = json.loads(text)
    # A pseudonymised run keys the source like every uri (a folder can be named for a patient).
    assert summary["source"].startswith("pseudonymized:") and str(root) not in text
    assert summary["started_at"] <= summary["finished_at"] and summary["finished_at"].endswith("+00:00")
    assert {"cxr_ray", "ray", "pyarrow", "onnxruntime"} <= set(summary["versions"])
    assert summary["settings"]["score"]["pseudonym_key"] == "<redacted>"
    assert summary["settings"]["score"]["cache_dir"] == str(tmp_path / "cache")
    assert "flag_threshold" in summary and "engine_precision" in summary
    assert "threshold" not in summary and "precision" not in summary
    for name in ("predictions", "studies", "metrics", "confusion", "drift"):
        path = out / f"{name}.parquet"
        if name == "drift" and not path.exists():
            continue
        schema = pq.read_schema(path)
        assert undescribed(schema) == [], name
        declared = {f: t for f, _, t in schema_doc.TABLES}[f"{name}.parquet"]
        assert schema.metadata[SCHEMA_VERSION] == declared.metadata[SCHEMA_VERSION], name
    preds = pq.read_schema(out / "predictions.parquet")
    assert "PatientAge" in description(preds.field("patient_age_years"))
    assert preds.field("patient_age_years").metadata[b"unit"] == b"years"


def test_cli_score_unknown_engine_exits_2(tiny_artifact, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "score",
            str(tmp_path),
            "--model",
            str(tiny_artifact),
            "--out",
            str(tmp_path / "o"),
            "--engine",
            "tpu",
        ],
    )
    assert result.exit_code == 2
    assert "score.engine" in result.output


def test_onnxruntime_predictor_starts_without_importing_torch(tiny_artifact, tmp_path):
    # Actor start-up is on every run's critical path; importing torch costs seconds there.
    payload, _ = _prepare(tiny_artifact, "onnxruntime", tmp_path / "c")
    spec = spec_for(payload.card)
    (tmp_path / "payload.pkl").write_bytes(pickle.dumps((payload, spec)))
    code = (
        "import pickle, sys\n"
        f"payload, spec = pickle.loads(open({str(tmp_path / 'payload.pkl')!r}, 'rb').read())\n"
        "from cxr_ray.scoring.stages import CxrPredictor\n"
        "p = CxrPredictor(payload, spec=spec)\n"
        "import numpy as np\n"
        "assert p.engine.name == 'onnxruntime'\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_score_reads_the_artifact_once_and_never_from_the_actors(
    ray_local, tiny_artifact, tmp_path, monkeypatch
):
    """The driver reads the card and the weights once; actors get everything in the payload.

    Counted on the driver (every storage read under the artifact folder), then proven for
    the actors by scoring from a loaded Artifact whose folder no longer exists.
    """
    import shutil

    from cxr_ray.io import storage

    copy = tmp_path / "model"
    shutil.copytree(tiny_artifact, copy)
    root = imaging.kermany_folder(tmp_path / "in", per_class=2)
    reads: list[str] = []
    real = storage.read_bytes

    def counting(uri: str) -> bytes:
        if str(copy) in uri:
            reads.append(Path(uri).name)
        return real(uri)

    monkeypatch.setattr(storage, "read_bytes", counting)
    r = score(str(root), str(copy), str(tmp_path / "a"), _settings(tmp_path))
    assert r.ok == 6
    assert sorted(reads) == ["model.safetensors", "model_card.json"], reads
    monkeypatch.undo()

    art = load_artifact(str(copy))
    shutil.rmtree(copy)  # nothing below may go back to the artifact's files
    again = score(str(root), art, str(tmp_path / "b"), _settings(tmp_path))
    assert (again.images, again.ok, again.model_version) == (6, 6, r.model_version)
    first = pq.read_table(tmp_path / "a" / "predictions.parquet").sort_by("image_id")
    second = pq.read_table(tmp_path / "b" / "predictions.parquet").sort_by("image_id")
    assert first["prob_pneumonia"].to_pylist() == second["prob_pneumonia"].to_pylist()


def test_the_runs_spec_reaches_the_actor_side_decode(tiny_artifact, tmp_path):
    """``data.max_pixels`` must mean the same where the actor decodes JPEGs itself (the GPU
    path, or its CPU fallback): the predictor gets the run's spec, not a default one."""
    from cxr_ray.config import DataSettings
    from cxr_ray.scoring.pipeline import plan_run

    art = load_artifact(str(tiny_artifact))
    settings = load_settings(
        None, {"data": {"max_pixels": 300_000}, "score": {"cache_dir": str(tmp_path / "c")}}
    )
    plan = plan_run(art, settings)
    assert plan.spec == spec_for(art.card, DataSettings(max_pixels=300_000))
    root = tmp_path / "in"
    root.mkdir()
    (root / "small.jpeg").write_bytes(imaging.jpeg_bytes(400, 400, seed=1))  # 160k pixels
    (root / "big.jpeg").write_bytes(imaging.jpeg_bytes(800, 600, seed=2))  # 480k pixels
    batch = decode_stage(_raw_batch(root), spec=plan.spec, gpu_jpeg=True)
    assert not batch["decoded"].any() and all(j is not None for j in batch["jpeg"])
    out = CxrPredictor(plan.payload, spec=plan.spec, gpu_decode=True)(batch)
    by_name = {
        Path(u).name: (st, e) for u, st, e in zip(out["uri"], out["status"], out["error"], strict=True)
    }
    assert by_name["small.jpeg"] == ("ok", None)
    assert by_name["big.jpeg"][0] == "error" and "300000-pixel limit" in by_name["big.jpeg"][1]


def test_undecoded_jpegs_on_a_cpu_engine_are_decoded_not_scored_as_black(tiny_artifact, tmp_path):
    """JPEG bytes shipped for GPU decode to an actor whose engine is not on CUDA: decoded on
    the CPU there, and the probabilities equal the CPU-decode path's."""
    art = load_artifact(str(tiny_artifact))
    spec = spec_for(art.card)
    payload, _ = _prepare(tiny_artifact, "onnxruntime", tmp_path / "c")
    root = imaging.kermany_folder(tmp_path / "in", per_class=3)
    (root / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    raw = _raw_batch(root)
    predictor = CxrPredictor(payload, spec=spec, gpu_decode=True)
    assert predictor.gpu_decode is False  # onnxruntime on the CPU cannot decode on a GPU
    cpu = predictor(decode_stage(raw, spec=spec))
    handed = decode_stage(raw, spec=spec, gpu_jpeg=True)
    assert not handed["decoded"].any() and not handed["pixels"].any()  # all-black placeholders
    gpu = predictor(handed)
    assert list(gpu["status"]) == list(cpu["status"]) and list(gpu["status"]).count("ok") == 9
    for k in ("prob_normal", "prob_bacterial", "prob_viral"):
        ok = cpu["status"] == "ok"
        assert np.abs(gpu[k][ok] - cpu[k][ok]).max() <= 1e-6
    # Decoded on the actor: the same drift inputs, original sizes included.
    np.testing.assert_array_equal(gpu["input_stats"], cpu["input_stats"])
    np.testing.assert_array_equal(gpu["features"], cpu["features"])
    black = art.card.probabilities(
        predictor.engine(to_model_input(np.zeros((1, *spec_shape(spec)), np.uint8)))[0]
    )
    assert not np.allclose(
        np.stack([gpu["prob_normal"], gpu["prob_bacterial"], gpu["prob_viral"]], 1)[ok], black
    )


def spec_shape(spec) -> tuple[int, int]:
    return (spec.height, spec.width)


def test_a_row_is_never_ok_without_decoded_pixels(tiny_artifact, tmp_path):
    """The predictor's own guard: a row marked ok whose pixels were never decoded (and that it
    cannot decode: no bytes) comes out as an error row, never with a diagnosis."""
    art = load_artifact(str(tiny_artifact))
    spec = spec_for(art.card)
    payload, _ = _prepare(tiny_artifact, "onnxruntime", tmp_path / "c")
    root = imaging.kermany_folder(tmp_path / "in", per_class=1)
    batch = decode_stage(_raw_batch(root), spec=spec)
    batch["decoded"][0] = False  # as if a stage forgot to decode it
    out = CxrPredictor(payload, spec=spec)(batch)
    assert out["status"][0] == "error" and "not decoded" in out["error"][0]
    assert np.isnan(out["prob_normal"][0]) and not out["flagged"][0]
    assert list(out["status"][1:]) == ["ok", "ok"]


def test_a_second_run_into_a_committed_folder_is_refused_unless_overwrite(ray_local, tiny_artifact, tmp_path):
    root = imaging.kermany_folder(tmp_path / "in", per_class=1)
    out = tmp_path / "out"
    first = score(str(root), str(tiny_artifact), str(out), _settings(tmp_path))
    with pytest.raises(DataError, match=r"already holds a committed scoring run.*--overwrite"):
        score(str(root), str(tiny_artifact), str(out), _settings(tmp_path))
    assert json.loads((out / "summary.json").read_text())["run_id"] == first.run_id
    second = score(str(root), str(tiny_artifact), str(out), _settings(tmp_path), overwrite=True)
    assert json.loads((out / "summary.json").read_text())["run_id"] == second.run_id != first.run_id


def test_the_second_run_says_the_onnx_cache_was_hit(ray_local, tiny_artifact, tmp_path):
    root = imaging.kermany_folder(tmp_path / "in", per_class=1)
    a = score(str(root), str(tiny_artifact), str(tmp_path / "a"), _settings(tmp_path))
    b = score(str(root), str(tiny_artifact), str(tmp_path / "b"), _settings(tmp_path))
    assert a.engine_report["onnx_cache"] == "built" and b.engine_report["onnx_cache"] == "hit"
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["engine_report"]["onnx_cache"] == "hit"


@pytest.mark.parametrize(
    ("gpus_per_actor", "actors_max", "cluster_gpus", "expected"),
    [
        (0, 1, 0, 0.0),
        (1, 1, 1, 0.0),
        (1, 2, 2, 0.0),
        (1, 1, 2, 1.0),
        (0.5, 1, 1, 0.5),
        (0.5, 3, 1.5, 0.0),
        (0.5, 2, 2, 0.5),
    ],
)
def test_the_explain_pool_never_asks_for_gpus_the_predictors_hold(
    gpus_per_actor, actors_max, cluster_gpus, expected
):
    from cxr_ray.scoring.pipeline import explainer_gpus

    assert explainer_gpus(gpus_per_actor, actors_max, cluster_gpus) == expected


def test_a_pool_that_leaves_no_cpu_for_decoding_is_warned_about():
    from cxr_ray.scoring.pipeline import starvation

    two_actors = ScoreSettings(actors_min=2, actors_max=2, cpus_per_actor=0.5)
    assert starvation(two_actors, 2.0) is None  # 1 CPU left for the decode task
    explained = two_actors.model_copy(update={"explain": "flagged"})
    problem = starvation(explained, 2.0)  # 2 predictors + 1 Grad-CAM actor leave 0.5 < 1
    assert problem is not None and "reserve 1.5 of this cluster's 2 CPUs" in problem
    assert starvation(explained.model_copy(update={"cpus_per_decode_task": 0.5}), 2.0) is None
    growing = ScoreSettings(actors_min=1, actors_max=4, cpus_per_actor=0.5)
    assert "reserve 2 of" in (starvation(growing, 2.0) or "")  # the pool may grow to 4
    assert starvation(explained, 0.0) is None  # an autoscaling cluster with no node yet


def test_the_predictor_takes_batches_as_ray_hands_them(tiny_artifact, tmp_path):
    """Ray gives actors read-only arrays, and a column of only missing values as float NaN:
    the predictor must still decode handed-over JPEGs and record error messages."""
    art = load_artifact(str(tiny_artifact))
    spec = spec_for(art.card)
    payload, _ = _prepare(tiny_artifact, "onnxruntime", tmp_path / "c")
    root = imaging.kermany_folder(tmp_path / "in", per_class=1)
    (root / "truncated.jpeg").write_bytes(imaging.jpeg_bytes(200, 160, seed=6)[:300])
    batch = decode_stage(_raw_batch(root), spec=spec, gpu_jpeg=True)
    batch["error"] = np.full(len(batch["error"]), np.nan)  # all None, as Ray converts it
    for v in batch.values():
        v.setflags(write=False)
    out = CxrPredictor(payload, spec=spec, gpu_decode=True)(batch)
    assert sorted(out["status"]) == ["error", "ok", "ok", "ok"]
    (msg,) = [e for e in out["error"] if e is not None]
    assert "truncated" in msg


def test_weights_that_do_not_fit_the_card_are_refused_before_any_row(ray_local, tiny_artifact, tmp_path):
    """Scoring loads an artifact without building the network (no torch on the driver); the
    first build (here the ONNX export of a cold cache) refuses the mismatch with the message
    a full load gives, and no output is written."""
    import shutil

    from cxr_ray.errors import ModelError

    art = tmp_path / "model"
    shutil.copytree(tiny_artifact, art)
    card = json.loads((art / "model_card.json").read_text())
    (art / "model_card.json").write_text(json.dumps(card | {"arch": "resnet18"}))  # same weights hash
    root = imaging.kermany_folder(tmp_path / "in", per_class=1)
    with pytest.raises(ModelError, match="do not match the card's architecture 'resnet18'"):
        score(str(root), str(art), str(tmp_path / "out"), _settings(tmp_path))
    assert not (tmp_path / "out" / "predictions.parquet").exists()
    result = CliRunner().invoke(
        main,
        ["score", str(root), "--model", str(art), "--out", str(tmp_path / "cli")],
        env={"CXR_SCORE__CACHE_DIR": str(tmp_path / "cache2")},
    )
    assert result.exit_code == 2 and "do not match the card's architecture" in result.output


def test_drift_columns_cross_ray_data_as_tensor_columns(ray_local, tiny_artifact, tmp_path):
    """The predictor's 2-D internal columns go through Ray Data's map_batches and come back
    from a pyarrow block as numpy arrays (what the driver's drift summary reads)."""
    import ray.data

    art = load_artifact(str(tiny_artifact))
    spec = spec_for(art.card)
    payload, _ = _prepare(tiny_artifact, "onnxruntime", tmp_path / "c")
    root, n, n_bad = _broken_folder(tmp_path / "in")
    raw = _raw_batch(root)
    ds = ray.data.from_arrow(raw).map_batches(decode_stage, batch_format="pyarrow", fn_kwargs={"spec": spec})
    ds = ds.map_batches(
        CxrPredictor,
        batch_size=8,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        fn_constructor_kwargs={"payload": ray.put(payload), "spec": spec},
    )
    blocks = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    uris = [u for b in blocks for u in b["uri"].to_pylist()]
    status = np.array([s for b in blocks for s in b["status"].to_pylist()])
    features = np.concatenate([tensor_column(b, "features") for b in blocks])
    stats = np.concatenate([tensor_column(b, "input_stats") for b in blocks])
    assert len(uris) == n and features.shape == (n, 1280) and stats.shape == (n, len(INPUT_STATS))
    assert features.dtype == stats.dtype == np.float32
    ok = status == "ok"
    assert ok.sum() == n - n_bad
    assert np.isfinite(features[ok]).all() and np.isnan(features[~ok]).all()
    assert np.isfinite(stats[ok]).all() and np.isnan(stats[~ok]).all()
    # Row for row what the predictor computes without Ray.
    direct = CxrPredictor(payload, spec=spec)(decode_stage(raw, spec=spec))
    order = [list(direct["uri"]).index(u) for u in uris]
    np.testing.assert_allclose(features, direct["features"][order], atol=1e-6)
    np.testing.assert_array_equal(stats, direct["input_stats"][order])


def test_tensor_column_reads_plain_arrow_layouts():
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 3)
    table = pa.table({"f": pa.chunked_array([fixed[:1], fixed[1:]])})
    np.testing.assert_array_equal(tensor_column(table, "f"), values)
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(values)
    np.testing.assert_array_equal(tensor_column(pa.table({"f": tensor}), "f"), values)
    assert tensor_column(table.slice(0, 0), "f").shape == (0, 3)


def _probs_only_graph() -> bytes:
    """An ONNX model shaped like the ones cxr-ray cached before engines output logits."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["probs"])],
        "old",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 64, 64])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 4096])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def test_the_onnx_cache_follows_the_network_not_its_calibration(tiny_artifact, tmp_path):
    import dataclasses

    import onnx

    from cxr_ray.engines.onnx_engine import OnnxEngine
    from cxr_ray.engines.onnx_export import GRAPH_TAG, OUTPUT_NAMES, cached_onnx, onnx_cache_path

    art = load_artifact(str(tiny_artifact))
    site = dataclasses.replace(art, card=_site_card(art.card))
    cache = str(tmp_path / "cache")
    assert site.card.version != art.card.version and site.card.engine_key == art.card.engine_key
    path = onnx_cache_path(art, cache)
    assert onnx_cache_path(site, cache) == path and path.name.endswith(f"-{GRAPH_TAG}.onnx")
    # A probability-only model an older cxr-ray cached under its old name is never reused...
    h, w = art.card.input_size
    old = path.parent / f"{art.card.version}-{h}x{w}-opset18.onnx"
    old.parent.mkdir(parents=True)
    old.write_bytes(_probs_only_graph())
    data, hit = cached_onnx(site, cache)
    assert not hit and tuple(o.name for o in onnx.load_from_string(data).graph.output) == OUTPUT_NAMES
    # ... nor run if it reaches an engine; the site card shares the parent's export.
    with pytest.raises(EngineUnavailableError, match=r"outputs are \('probs',\)"):
        OnnxEngine(old.read_bytes())
    assert cached_onnx(art, cache) == (data, True)


def test_the_runs_object_store_cap_is_its_own_and_a_tiny_cap_still_scores_every_image(
    ray_local, tiny_artifact, tmp_path
):
    """``score.object_store_limit_mb`` caps what the run's dataset may hold in the object
    store (decode outruns the model on CPU nodes: without it decoded blocks queue up to Ray
    Data's budget, half the object store). The cap is set on the dataset's own context (the
    process-wide DataContext is untouched), and a cap far below one block backpressures the
    reads without hanging: rows out == images in."""
    import ray.data

    from cxr_ray.scoring.pipeline import build_dataset, plan_run

    root = imaging.kermany_folder(tmp_path / "in", per_class=6)
    art = load_artifact(str(tiny_artifact))
    for limit, want in ((64, 64 * 1024 * 1024), (0, float("inf"))):
        settings = _settings(tmp_path, object_store_limit_mb=limit)
        ds = build_dataset(str(root), art, plan_run(art, settings), settings, out_dir=str(tmp_path / "o"))
        assert ds.context.execution_options.resource_limits.object_store_memory == want
    process_wide = ray.data.DataContext.get_current().execution_options.resource_limits
    assert process_wide.object_store_memory == float("inf")
    tiny_cap = _settings(tmp_path, object_store_limit_mb=1)
    r = score(str(root), str(tiny_artifact), str(tmp_path / "out"), tiny_cap)
    assert r.images == 18 and r.errors == 0
    assert pq.read_table(tmp_path / "out" / "predictions.parquet").num_rows == 18
