"""The report's review worklist in a real headless Chromium (Playwright, the system browser).

One real scoring run (Ray, real Kermany 224 px images when present, else generated ones; one
image per patient so each image is a study) with a random model
whose flag threshold is the median P(pneumonia) of these images, so about half the studies
are flagged and the worklist holds both selections. The page is opened from ``file://``,
marked from the keyboard and its buttons, reloaded, exported; the CSV goes to
``cxr-ray calibrate``, which refuses three labels (too small) and accepts the whole worklist.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cxr_ray.cli import main
from cxr_ray.config import load_settings
from cxr_ray.labels import LABELS
from cxr_ray.reporting.review import CSV_HEADER
from tests.conftest import KERMANY224

PER_CLASS = 20
KEYS = {"normal": "n", "bacterial": "b", "viral": "v"}


def _chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _site_images(root: Path) -> str:
    """``PER_CLASS`` images per class, one per patient: real ones when present."""
    from cxr_ray.data.manifest import identify

    if (KERMANY224 / "train").is_dir():
        source, kind = KERMANY224 / "train", "real"
    else:
        from cxr_ray.data.synthetic import write_kermany_folder

        source, kind = (
            write_kermany_folder(root / "generated", per_class=3 * PER_CLASS) / "train",
            "generated",
        )
    taken: dict[str, int] = dict.fromkeys(LABELS, 0)
    patients: set[str] = set()
    for path in sorted(source.glob("*/*.jpeg")):
        info = identify(path.name, str(path))
        if info.label not in taken or taken[info.label] >= PER_CLASS or info.patient_id in patients:
            continue
        patients.add(info.patient_id or path.name)
        taken[info.label] += 1
        (root / "in" / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / "in" / path.parent.name / path.name)
    assert min(taken.values()) >= 5, taken
    return kind


def _model_flagging_half(out: Path, folder: Path) -> Path:
    """A random model (as ``make_artifact`` builds it) whose flag threshold is its median
    P(pneumonia) on the images of ``folder`` (computed here with torch, no Ray)."""
    import torch

    from cxr_ray.config import DataSettings
    from cxr_ray.errors import WeightsUnavailableError
    from cxr_ray.imaging.preprocess import decode, to_model_input
    from cxr_ray.models.artifact import card_for, save_artifact
    from cxr_ray.models.card import spec_for
    from cxr_ray.models.factory import create_model

    torch.manual_seed(0)
    try:
        net = create_model("mobilenet_v2", pretrained=True)
    except WeightsUnavailableError:
        net = create_model("mobilenet_v2", pretrained=False)
    card = card_for(net, "mobilenet_v2", input_size=64, intensity="none")
    spec = spec_for(card, DataSettings())
    pixels = np.stack([decode(p.read_bytes(), spec, p.name).pixels for p in sorted(folder.rglob("*.jpeg"))])
    with torch.inference_mode():
        logits = net.eval()(torch.from_numpy(to_model_input(pixels))).double().numpy()
    probs = card.probabilities(logits)
    median = float(np.median(probs[:, LABELS.index("bacterial")] + probs[:, LABELS.index("viral")]))
    card = card_for(net, "mobilenet_v2", input_size=64, intensity="none", thresholds={"pneumonia": median})
    save_artifact(net, card, str(out))
    return out


@pytest.fixture(scope="module")
def site_run(ray_local, tmp_path_factory) -> dict[str, Any]:
    from cxr_ray.reporting.report import write_report
    from cxr_ray.scoring.pipeline import score

    tmp = tmp_path_factory.mktemp("review")
    kind = _site_images(tmp)
    model = _model_flagging_half(tmp / "model", tmp / "in")
    # torch: no ONNX export to wait for (the engines have their own tests); no --explain
    # (overlays in the worklist: tests/test_report.py).
    settings = load_settings(None, {"score": {"engine": "torch"}})
    out = tmp / "run"
    r = score(str(tmp / "in"), str(model), str(out), settings)
    assert r.images == r.ok == r.studies == 3 * PER_CLASS
    assert 0 < r.flagged_studies < r.studies
    report = Path(write_report(str(out)))
    studies = pq.read_table(out / "studies.parquet")
    preds = pq.read_table(out / "predictions.parquet")
    return {
        "kind": kind,
        "model": model,
        "run": out,
        "report": report,
        "run_id": r.run_id,
        "studies": {row["driving_image_id"]: row for row in studies.to_pylist()},
        "labels": dict(zip(preds["image_id"].to_pylist(), preds["label"].to_pylist(), strict=True)),
        "flagged": r.flagged_studies,
    }


@pytest.fixture(scope="module")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    path = _chromium()
    if path is None:
        pytest.skip("no system Chromium (/usr/bin/chromium or `chromium` on PATH); .ci/run installs it")
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=path, headless=True)
        except Exception as exc:  # a browser that cannot start here is a skip, not a failure
            pytest.skip(f"Chromium at {path} does not launch: {str(exc).splitlines()[0]}")
        yield browser
        browser.close()


def test_review_script_and_styles_are_package_files_inlined_and_parse():
    """review.js / review.css are package data (importlib.resources), inlined whole into the
    page (it must work from file://), and the script is valid JavaScript for a real parser."""
    import subprocess
    from importlib import resources

    from cxr_ray.reporting.review import Worklist, review_html, static_text

    static = resources.files("cxr_ray.reporting") / "static"
    js, css = (static / "review.js").read_text(encoding="utf-8"), (static / "review.css").read_text("utf-8")
    assert "localStorage" in js and "#rv-list" in css
    page = review_html(Worklist([], 0, 0, 40, 300), run_dir="unused", run_id="r1")
    assert f"<script>{js}</script>" in page and f"<style>{css}</style>" in page
    assert static_text("review.js") == js
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node on PATH to parse static/review.js (make lint-js lints it with ESLint)")
    with resources.as_file(static / "review.js") as path:
        done = subprocess.run([node, "--check", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _ids(page: Any) -> list[str]:
    return page.eval_on_selector_all("#rv-list > li.rv", "els => els.map(e => e.dataset.id)")


def _labels(page: Any) -> dict[str, str]:
    return page.eval_on_selector_all(
        "#rv-list > li.rv", "els => Object.fromEntries(els.map(e => [e.dataset.id, e.dataset.label]))"
    )


def _export(page: Any, tmp_path: Path) -> tuple[str, list[dict[str, str]]]:
    with page.expect_download() as download:
        page.get_by_role("button", name="Export labels (CSV)").click()
    target = tmp_path / "labels.csv"
    download.value.save_as(target)
    text = target.read_text(encoding="utf-8")
    return text, list(csv.DictReader(io.StringIO(text)))


def _calibrate(site_run: dict[str, Any], labels: Path, out: Path) -> Any:
    if "calibrate" not in main.commands:
        pytest.fail("`cxr-ray calibrate` is not registered (cxr_ray/cli/calibrate.py)")
    return CliRunner().invoke(
        main,
        [
            "calibrate",
            "--model",
            str(site_run["model"]),
            "--labelled",
            str(site_run["run"]),
            "--labels",
            str(labels),
            "--out",
            str(out),
        ],
    )


def test_mark_reload_undo_export_and_calibrate_refuses_three(site_run, chromium, tmp_path):
    studies = site_run["studies"]
    context = chromium.new_context(accept_downloads=True)
    page = context.new_page()
    page.goto(site_run["report"].as_uri())
    ids = _ids(page)
    # Every flagged study, most suspicious first, then the random sample of unflagged ones.
    flagged = sorted(
        (i for i, s in studies.items() if s["flagged"]), key=lambda i: (-studies[i]["prob_pneumonia"], i)
    )
    sel = page.eval_on_selector_all("#rv-list > li.rv", "els => els.map(e => e.dataset.sel)")
    assert (
        sel.count("flagged") == site_run["flagged"] and sel.count("random") == len(ids) - site_run["flagged"]
    )
    assert ids[: len(flagged)] == flagged and set(ids) <= set(studies)
    assert page.locator("#rv-progress").inner_text().startswith(f"0 of {len(ids)} reviewed")

    # Keyboard: n / b / v on the focused study, each moving on; then a button on the fifth.
    page.locator("#rv-list > li.rv").first.focus()
    for key in ("n", "b", "v"):
        page.keyboard.press(key)
    assert page.evaluate("document.activeElement.dataset.id") == ids[3]
    page.keyboard.press("j")
    assert page.evaluate("document.activeElement.dataset.id") == ids[4]
    page.keyboard.press("k")
    page.keyboard.press("ArrowDown")
    page.locator(f'li.rv[data-id="{ids[4]}"] button[data-l="not_assessable"]').click()
    marked = {ids[0]: "normal", ids[1]: "bacterial", ids[2]: "viral", ids[4]: "not_assessable"}
    assert {i: v for i, v in _labels(page).items() if v} == marked
    assert page.locator("#rv-progress").inner_text().startswith(f"4 of {len(ids)} reviewed")
    # Filters and sort see the marks.
    page.select_option("#rv-filter", "unreviewed")
    assert page.locator("#rv-list > li.rv:visible").count() == len(ids) - 4
    page.select_option("#rv-filter", "label:viral")
    assert page.eval_on_selector_all("li.rv:not([hidden])", "els => els.map(e => e.dataset.id)") == [ids[2]]
    page.select_option("#rv-filter", "all")
    page.select_option("#rv-sort", "status")
    assert _ids(page)[-4:] == [ids[0], ids[1], ids[2], ids[4]]
    page.select_option("#rv-sort", "pp")
    assert _ids(page) == ids

    # A reload keeps the marks (localStorage, keyed by the run id); undo one of them.
    page.reload()
    assert {i: v for i, v in _labels(page).items() if v} == marked
    stored = page.evaluate(
        f"Object.keys(JSON.parse(localStorage.getItem('cxr-ray-review:{site_run['run_id']}')))"
    )
    assert sorted(stored) == sorted(marked)
    page.locator(f'li.rv[data-id="{ids[1]}"]').focus()
    page.keyboard.press("u")
    del marked[ids[1]]
    assert {i: v for i, v in _labels(page).items() if v} == marked

    text, rows = _export(page, tmp_path)
    context.close()
    assert text.splitlines()[0] == CSV_HEADER
    assert [r["image_id"] for r in rows] == [ids[0], ids[2], ids[4]]  # worklist order, reviewed only
    for row in rows:
        study = studies[row["image_id"]]  # the full sha256 of the study's driving image
        assert len(row["image_id"]) == 64 and row["label"] == marked[row["image_id"]]
        assert row["selection"] == ("flagged" if study["flagged"] else "random")
        assert row["flagged"] == str(bool(study["flagged"])).lower()
        assert row["run_id"] == site_run["run_id"] and row["model_version"] == study["model_version"]
        assert datetime.fromisoformat(row["reviewed_at"]).utcoffset() == timedelta(0)  # ISO-8601 UTC

    # calibrate reads it, and refuses a sample of two usable labels (one not assessable).
    from cxr_ray.site.sample import read_labels_csv

    labels, not_assessable = read_labels_csv(str(tmp_path / "labels.csv"))
    assert labels == {ids[0]: "normal", ids[2]: "viral"} and not_assessable == 1
    result = _calibrate(site_run, tmp_path / "labels.csv", tmp_path / "A2")
    assert result.exit_code == 2, result.output
    assert re.search(r"2 usable labelled images.*needs at least \d+", result.output), result.output
    assert not (tmp_path / "A2").exists()


@pytest.mark.slow
def test_whole_worklist_marked_from_the_keyboard_calibrates(site_run, chromium, tmp_path):
    """Every study marked with its true label (one key press each): calibrate accepts it."""
    context = chromium.new_context(accept_downloads=True)
    page = context.new_page()
    page.goto(site_run["report"].as_uri())
    ids = _ids(page)
    truth = site_run["labels"]
    assert len(ids) >= 45
    page.locator("#rv-list > li.rv").first.focus()
    for image_id in ids:
        assert page.evaluate("document.activeElement.dataset.id") == image_id
        page.keyboard.press(KEYS[truth[image_id]])
    _, rows = _export(page, tmp_path)
    context.close()
    assert [(r["image_id"], r["label"]) for r in rows] == [(i, truth[i]) for i in ids]
    result = _calibrate(site_run, tmp_path / "labels.csv", tmp_path / "A2")
    assert result.exit_code == 0, result.output
    lineage = json.loads((tmp_path / "A2" / "model_card.json").read_text())["lineage"]
    assert lineage["sample_size"] == len(ids)
    assert lineage["per_class"] == {label: Counter(truth[i] for i in ids)[label] for label in LABELS}
