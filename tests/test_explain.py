"""Grad-CAM heatmaps and the HTML report (checked in headless Chromium when installed)."""

from __future__ import annotations

import base64
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
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert list(cls) == [0, 0]
    assert heat_fraction_inside(heat[:1], (0.0, 0.0, 0.4, 0.45))[0] > 0.8
    assert heat_fraction_inside(heat[1:], (0.55, 0.55, 1.0, 1.0))[0] > 0.8


def test_gradcam_on_a_real_backbone_and_overlay_png(tiny_artifact):
    from cxr_ray.models.artifact import load_artifact

    art = load_artifact(str(tiny_artifact))
    net = art.build()
    x = torch.rand(3, 1, 64, 64)
    heat, cls = gradcam(net, x, art.card.target_layer)
    assert heat.shape == (3, 64, 64) and cls.shape == (3,)
    assert not any(p.grad is not None and p.grad.abs().sum() > 0 for p in []), "no side effects"
    png = overlay_png((x[0, 0].numpy() * 255).astype(np.uint8), heat[0])
    im = Image.open(__import__("io").BytesIO(png))
    assert im.mode == "RGB" and im.size == (64, 64)


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
    assert (tmp_path / "h" / "person1_virus_2.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture()
def explained_run(ray_local, tiny_artifact, tmp_path) -> Path:
    root = imaging.kermany_folder(tmp_path / "in", per_class=4)
    (root / "broken.jpeg").write_bytes(b"")
    settings = load_settings(None, {"score": {"cache_dir": str(tmp_path / "c"), "explain": "all"}})
    out = tmp_path / "run"
    r = score(str(root), str(tiny_artifact), str(out), settings)
    assert r.images == 13
    return out


def test_score_with_explain_writes_a_heatmap_per_explained_row(explained_run):
    import pyarrow.parquet as pq

    t = pq.read_table(explained_run / "predictions.parquet").to_pylist()
    ok = [r for r in t if r["status"] == "ok"]
    assert len(ok) == 12 and all(r["heatmap_uri"] for r in ok)
    assert all(r["heatmap_uri"] is None for r in t if r["status"] == "error")
    assert all(Path(r["heatmap_uri"]).read_bytes()[:4] == b"\x89PNG" for r in ok)


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
