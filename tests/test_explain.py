"""Grad-CAM heatmaps and the HTML report (checked in headless Chromium when installed)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cxr_ray.cli import main
from cxr_ray.config import load_settings
from cxr_ray.models.factory import CxrNet
from cxr_ray.scoring.explain import gradcam, heat_fraction_inside, overlay_png
from cxr_ray.scoring.pipeline import score
from tests import imaging


def _blob_net() -> CxrNet:
    """A network whose evidence is brightness: a conv with positive weights, pooled, linear."""
    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )
    with torch.no_grad():
        backbone[0].weight.fill_(0.1)
        backbone[0].bias.fill_(0.0)
        backbone[4].weight.copy_(torch.tensor([[1.0] * 4, [0.5] * 4, [-1.0] * 4]))
    return CxrNet(backbone, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_gradcam_points_at_the_evidence():
    x = torch.zeros(2, 1, 32, 32)
    x[0, :, 4:12, 2:10] = 1.0  # a bright blob top-left
    x[1, :, 20:30, 20:30] = 1.0  # bottom-right
    heat, cls = gradcam(_blob_net(), x, "backbone.0", np.array([0, 0]))
    assert heat.shape == (2, 32, 32) and heat.dtype == np.float32
    # Each map is scaled to its own 0..1 range.
    np.testing.assert_allclose(heat.reshape(2, -1).min(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(heat.reshape(2, -1).max(1), 1.0, atol=1e-6)
    assert list(cls) == [0, 0]
    assert heat_fraction_inside(heat[:1], (0.0, 0.0, 0.4, 0.45))[0] > 0.8
    assert heat_fraction_inside(heat[1:], (0.55, 0.55, 1.0, 1.0))[0] > 0.8


def _real_net(tiny_artifact):
    from cxr_ray.models.artifact import load_artifact

    art = load_artifact(str(tiny_artifact))
    return art, art.build()


def test_gradcam_explains_the_predicted_class_and_leaves_the_model_as_it_was(tiny_artifact):
    art, net = _real_net(tiny_artifact)
    layer = net.get_submodule(art.card.target_layer)
    net.train()  # gradcam must evaluate in eval mode and restore the caller's mode
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    x_before = x.clone()

    heat, cls = gradcam(net, x, art.card.target_layer)
    mode_after = net.training

    assert heat.shape == (3, 64, 64) and heat.dtype == np.float32 and cls.shape == (3,)
    assert heat.min() >= 0.0 and heat.max() <= 1.0 and (heat.reshape(3, -1).std(1) > 0).all()
    net.eval()
    with torch.no_grad():
        assert list(cls) == net(x).argmax(1).tolist()  # the predicted class (eval mode)
    # No side effects: mode restored, hooks removed, weights (and BatchNorm statistics) and input intact.
    assert mode_after
    assert not layer._forward_hooks and not layer._backward_hooks
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert torch.equal(x, x_before) and x.grad is None
    # A given class is the one explained, and another class gives another map.
    other = (cls + 1) % 3
    heat_other, used = gradcam(net, x, art.card.target_layer, other)
    assert list(used) == list(other)
    assert not np.allclose(heat_other, heat, atol=1e-3)


def test_gradcam_leaves_no_gradients_on_the_weights(tiny_artifact):
    art, net = _real_net(tiny_artifact)
    gradcam(net, torch.rand(2, 1, 64, 64), art.card.target_layer)
    assert [name for name, p in net.named_parameters() if p.grad is not None] == []


def _png(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG" and im.mode == "RGB"
    return np.asarray(im)


def test_overlay_png_colours_only_where_the_heat_is():
    h, w = 48, 64  # not square: a transposed overlay would have the wrong size
    pixels = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    gray = np.repeat(pixels[..., None], 3, axis=2)
    heat = np.zeros((h, w), np.float32)
    heat[10:20, 30:50] = 1.0

    rgb = _png(overlay_png(pixels, heat))
    assert rgb.shape == (h, w, 3)
    outside = heat == 0
    assert np.abs(rgb[outside].astype(int) - gray[outside]).max() <= 1  # untouched grayscale
    inside = rgb[10:20, 30:50].astype(int)
    assert (inside.max(axis=2) - inside.min(axis=2)).min() > 20  # coloured, not gray
    # No heat anywhere: the image itself.
    assert np.abs(_png(overlay_png(pixels, np.zeros_like(heat))).astype(int) - gray).max() <= 1


def test_cli_explain_writes_overlays(tiny_artifact, tmp_path):
    img = tmp_path / "person1_virus_2.jpeg"
    img.write_bytes(imaging.jpeg_bytes(300, 260, seed=3))
    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0")
    result = CliRunner().invoke(
        main, ["explain", str(img), str(bad), "--model", str(tiny_artifact), "--out", str(tmp_path / "h")]
    )
    assert result.exit_code == 0, result.output
    assert "normal=" in result.output and "broken.jpeg: error" in result.output
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["person1_virus_2.png"]
    assert _png((tmp_path / "h" / "person1_virus_2.png").read_bytes()).shape == (64, 64, 3)


def _score(root: Path, artifact: Path, out: Path, explain: str):
    settings = load_settings(None, {"score": {"cache_dir": str(out.parent / "c"), "explain": explain}})
    return score(str(root), str(artifact), str(out), settings), settings


@pytest.fixture(scope="module")
def explained_run(ray_local, tiny_artifact, tmp_path_factory) -> Path:
    """One scoring run with every row explained, shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("explained")
    root = imaging.kermany_folder(tmp / "in", per_class=4)
    (root / "broken.jpeg").write_bytes(b"")
    out = tmp / "run"
    r, _ = _score(root, tiny_artifact, out, "all")
    assert r.images == 13
    return out


def _rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(out / "predictions.parquet").to_pylist()


def _heatmap_files(out: Path) -> set[str]:
    folder = out / "heatmaps"
    return {str(p) for p in folder.iterdir()} if folder.exists() else set()


def test_score_with_explain_writes_a_heatmap_per_explained_row(explained_run, tiny_artifact):
    from cxr_ray.imaging.preprocess import decode, to_model_input
    from cxr_ray.labels import LABELS
    from cxr_ray.models.card import spec_for

    rows = _rows(explained_run)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 12
    assert all(r["heatmap_uri"] is None for r in rows if r["status"] == "error")
    # Exactly one overlay per explained row, named by its image id, and nothing else.
    uris = [r["heatmap_uri"] for r in ok]
    assert _heatmap_files(explained_run) == set(uris) and len(set(uris)) == len(ok)
    assert all(Path(r["heatmap_uri"]).name == f"{r['image_id']}.png" for r in ok)
    # Each overlay is the Grad-CAM of its own image for its predicted class (no rows mixed up).
    art, net = _real_net(tiny_artifact)
    spec = spec_for(art.card, load_settings(None, {}).data)
    for r in ok[:3]:
        pixels = decode(Path(r["uri"].removeprefix("file://")).read_bytes(), spec).pixels
        heat, _ = gradcam(net, torch.from_numpy(to_model_input(pixels[None])), art.card.target_layer,
                          np.array([LABELS.index(r["pred_label"])]))  # fmt: skip
        written = _png(Path(r["heatmap_uri"]).read_bytes())
        assert written.shape == (64, 64, 3)
        assert np.abs(written.astype(int) - _png(overlay_png(pixels, heat[0]))).max() <= 2
        others = [o for o in ok if o["image_id"] != r["image_id"]]
        assert np.abs(written.astype(int) - _png(Path(others[0]["heatmap_uri"]).read_bytes())).max() > 2


def test_score_explain_flagged_writes_heatmaps_for_exactly_the_flagged_rows(explained_run, tiny_artifact):
    from cxr_ray.models.artifact import load_artifact, save_artifact

    # The same model with its threshold at the median pneumonia probability: about half flagged.
    ok = [r for r in _rows(explained_run) if r["status"] == "ok"]
    threshold = float(np.median([r["prob_pneumonia"] for r in ok]))
    art = load_artifact(str(tiny_artifact))
    card = art.card.model_copy(update={"thresholds": {**art.card.thresholds, "pneumonia": threshold}})
    model = explained_run.parent / "model-median"
    save_artifact(art.build(), card, str(model))

    out = explained_run.parent / "flagged"
    result, _ = _score(explained_run.parent / "in", model, out, "flagged")
    rows = _rows(out)
    assert len(rows) == 13
    flagged = [r for r in rows if r["flagged"]]
    assert 0 < len(flagged) < 12 and result.flagged == len(flagged)
    assert all(r["heatmap_uri"] is None for r in rows if not r["flagged"])
    assert _heatmap_files(out) == {r["heatmap_uri"] for r in flagged}


def test_report_is_self_contained_html(explained_run):
    from cxr_ray.reporting.report import write_report

    html = Path(write_report(str(explained_run))).read_text()
    for needle in ('id="summary"', 'id="per-class"', 'id="confusion"', 'id="gallery"', 'id="errors"'):
        assert needle in html
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= 4 + 1  # four figures and at least one heatmap
    for b64 in images:
        assert base64.b64decode(b64)[:4] == b"\x89PNG"
    assert "http://" not in html and "https://" not in html  # nothing fetched from anywhere


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium(explained_run, tmp_path):
    from cxr_ray.reporting.report import write_report

    page = Path(write_report(str(explained_run)))
    common = [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="per-class"' in dom.stdout and 'id="gallery"' in dom.stdout
    assert dom.stdout.count("<img") >= 5
    shot = tmp_path / "report.png"
    subprocess.run(
        [*common, "--window-size=1200,2000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    im = Image.open(shot)
    assert im.size == (1200, 2000)
    # The page really drew something: not a blank screenshot.
    assert np.asarray(im.convert("L")).std() > 10
