"""The HTML report (cxr_ray.reporting.report): per study, skipped reasons, no patient identifiers.

One real scoring run (Ray, onnxruntime, DICOM and JPEG files) is shared by the module: the
issue's six DICOM files (5 studies, a PA + lateral in one; 4 images outside the intended use)
and Kermany-named JPEGs with two images for some patients (a JPEG's study is its patient), plus
an unreadable file. The model's threshold is 0, so every scored image is flagged: 8 flagged
images in 6 flagged studies, and the gallery must show the 6.
"""

from __future__ import annotations

import html
import re
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cxr_ray.config import load_settings
from cxr_ray.data.synthetic import jpeg_bytes
from cxr_ray.reporting.report import render, write_report
from cxr_ray.reporting.review import CSV_HEADER
from cxr_ray.scoring.schema import PREDICTIONS_SCHEMA
from tests import dicom_factory
from tests.conftest import make_artifact

#: (file name, label) of the JPEGs: person7001 and IM-0101 have two images each.
JPEGS = (
    ("person7001_bacteria_1.jpeg", "bacterial"),
    ("person7001_bacteria_2.jpeg", "bacterial"),
    ("person7002_virus_3.jpeg", "viral"),
    ("IM-0101-0001.jpeg", "normal"),
    ("IM-0101-0002.jpeg", "normal"),
    ("NORMAL2-IM-0202-0001.jpeg", "normal"),
)
BROKEN = "person7003_bacteria_9.jpeg"


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory) -> Path:
    from cxr_ray.scoring.pipeline import score

    tmp = tmp_path_factory.mktemp("report")
    src = tmp / "in"
    case = dicom_factory.six_file_case()
    dicom_factory.write_files(case, src / "dicom")
    (src / "jpeg").mkdir(parents=True)
    for i, (name, label) in enumerate(JPEGS):
        (src / "jpeg" / name).write_bytes(jpeg_bytes(200, 180, seed=40 + i, label=label))
    (src / "jpeg" / BROKEN).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    model = make_artifact(tmp / "model", threshold=0.0)
    settings = load_settings(None, {"score": {"cache_dir": str(tmp / "cache")}})
    out = tmp / "run"
    r = score(str(src), str(model), str(out), settings)
    assert (r.images, r.ok, r.skipped, r.errors) == (13, 8, 4, 1)
    assert (r.studies, r.flagged_studies, r.flagged) == (10, 6, 8)
    return out


def _without_images(page: str) -> str:
    """The page without its base64 images (random bytes could spell anything)."""
    return re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,", page)


def _gallery_refs(page: str, kind: str) -> list[str]:
    return re.findall(rf'<figure class="{kind}">.*?<figcaption>{kind} ([0-9a-f]{{12}})<br>', page)


def test_gallery_has_one_entry_per_flagged_study(run):
    page = Path(write_report(str(run))).read_text()
    studies = pq.read_table(run / "studies.parquet")
    flagged = studies.filter(pc.fill_null(studies["flagged"], False)).sort_by(
        [("prob_pneumonia", "descending"), ("driving_image_id", "ascending")]
    )
    assert flagged.num_rows == 6
    # One figure per flagged study (not per flagged image: 8), most suspicious first.
    assert _gallery_refs(page, "study") == [i[:12] for i in flagged["driving_image_id"].to_pylist()]
    assert '<figure class="image">' not in page
    # Each study shows its driving image (no heatmaps in this run: the image itself).
    gallery = page.split('id="gallery"', 1)[1].split("</div>", 1)[0]
    assert gallery.count("<img") == 6
    # ... and its counts: the PA + lateral study has 2 images, 1 scored, 1 skipped.
    assert "2 images: 1 scored, 1 skipped, 0 errors" in gallery
    assert "2 images: 2 scored, 0 skipped, 0 errors" in gallery  # person7001, IM-0101
    kpis = page.split('id="summary"', 1)[1].split("</div>", 1)[0]
    for value, name in ((13, "images"), (8, "ok"), (4, "skipped"), (1, "errors"), (10, "studies")):
        assert f"<b>{value}</b>{name}<" in kpis
    assert "<b>6</b>flagged studies<" in kpis


def test_skipped_reasons_and_study_metrics(run):
    page = render(str(run))
    preds = pq.read_table(run / "predictions.parquet")
    reasons = Counter(preds.filter(pc.equal(preds["status"], "skipped"))["error"].to_pylist())
    assert (
        sum(reasons.values()) == 4
        and "out_of_scope: view LL is outside the model's intended use (PA, AP)" in reasons
    )
    skipped = page.split('id="skipped"', 1)[1].split("</table>", 1)[0]
    for reason, n in reasons.items():
        assert f"<td>{html.escape(reason)}</td><td>{n}</td>" in skipped
    assert "Skipped images (4)" in page and "Error rows (1)" in page
    # JPEGs are scored with the note that their intended use could not be checked.
    assert 'id="use-notes"' in page and "not a DICOM file" in page
    # Study-level metrics beside the image-level ones: 6 labelled images, 4 labelled studies.
    levels = page.split('id="levels"', 1)[1].split("</table>", 1)[0]
    assert "<td class=l>labelled</td><td>6</td><td>4</td>" in levels
    assert 'id="per-class"' in page and 'id="study-per-class"' in page and "4 labelled studies" in page


def test_report_names_no_patient(run):
    page = _without_images(render(str(run)))
    preds = pq.read_table(run / "predictions.parquet")
    identifiers = set()
    for column in ("patient_id", "accession_number", "study_instance_uid", "uri"):
        identifiers |= {v for v in preds[column].to_pylist() if v}
    identifiers |= {Path(u).name for u in preds["uri"].to_pylist()}
    identifiers |= {"TEST^PEDIATRIC", "person70", "IM-0", ".dcm", ".jpeg", str(run.parent)}
    assert {"CXR-0001", "ACC1001", "person7001"} <= identifiers
    leaked = sorted(i for i in identifiers if i in page or html.escape(i) in page)
    assert not leaked, leaked
    # The broken file is still listed, by its image id.
    broken = preds.filter(pc.equal(preds["status"], "error"))["image_id"][0].as_py()
    assert f"<td>{broken[:12]}</td>" in page.split('id="errors"', 1)[1]


def test_old_run_without_studies_renders_per_image(run, tmp_path):
    """A run folder from before studies.parquet (and before the DICOM / intended-use columns)."""
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(run / "summary.json", old / "summary.json")
    legacy = PREDICTIONS_SCHEMA.names[: PREDICTIONS_SCHEMA.get_field_index("heatmap_uri") + 1]
    preds = pq.read_table(run / "predictions.parquet", columns=legacy)
    pq.write_table(preds, old / "predictions.parquet")
    page = Path(write_report(str(old))).read_text()
    flagged = preds.filter(pc.fill_null(preds["flagged"], False)).sort_by(
        [("prob_pneumonia", "descending"), ("image_id", "ascending")]
    )
    assert _gallery_refs(page, "image") == [i[:12] for i in flagged["image_id"].to_pylist()]
    assert len(_gallery_refs(page, "image")) == 8
    assert "no studies.parquet" in page and "flagged studies<" not in page
    assert "Skipped images (4)" in page and 'id="errors"' in page
    assert "person70" not in _without_images(page)


def test_error_text_loses_the_file_name(run, tmp_path):
    """Reader errors can quote the path (pyarrow's "Failed to open local file '...'")."""
    import pyarrow as pa

    preds = pq.read_table(run / "predictions.parquet")
    bad = pc.equal(preds["status"], "error")
    uri = preds.filter(bad)["uri"][0].as_py()
    message = f"cannot read file: Failed to open local file '{uri}'. Detail: [errno 5] {Path(uri).name}"
    errors = pc.if_else(bad, pa.scalar(message), preds["error"])
    (tmp_path / "r").mkdir()
    pq.write_table(
        preds.set_column(preds.schema.get_field_index("error"), "error", errors),
        tmp_path / "r" / "predictions.parquet",
    )
    for name in ("summary.json", "studies.parquet"):
        shutil.copy(run / name, tmp_path / "r" / name)
    page = _without_images(render(str(tmp_path / "r")))
    row = page.split('id="errors"', 1)[1].split("</table>", 1)[0]
    assert "cannot read file: Failed to open local file" in row
    assert BROKEN not in page and "person7003" not in page and str(run.parent) not in page


def _review(page: str) -> str:
    return page.split('<section id="review"', 1)[1].split("</section>", 1)[0]


def _review_items(page: str) -> list[tuple[str, str]]:
    """(full image id, selection) of the worklist's items, in page order."""
    return re.findall(r'<li class="rv" tabindex="0" data-id="([0-9a-f]{64})" data-sel="(\w+)"', _review(page))


def _review_html(run_dir: Path, **kwargs) -> str:
    """Only the worklist section (no figures to draw): ``review_html(worklist(...))``."""
    from cxr_ray.reporting.review import review_html, worklist

    studies, preds = (
        pq.read_table(run_dir / "studies.parquet"),
        pq.read_table(run_dir / "predictions.parquet"),
    )
    run_id = preds["run_id"][0].as_py()
    return review_html(worklist(studies, preds, **kwargs), run_dir=str(run_dir), run_id=run_id)


@pytest.fixture()
def half_flagged(run, tmp_path) -> tuple[Path, list[str], list[str]]:
    """The run re-flagged at the median P(pneumonia) of its scored studies (3 flagged, 3 not),
    with Grad-CAM overlays (``explain.overlay_png``) of the flagged studies' driving images in
    ``heatmaps/`` (as ``--explain`` names them); returns (folder, flagged ids, unflagged ids)."""
    import numpy as np
    import pyarrow as pa

    from cxr_ray.scoring.explain import overlay_png

    out = tmp_path / "half"
    out.mkdir()
    shutil.copy(run / "summary.json", out / "summary.json")
    studies = pq.read_table(run / "studies.parquet")
    threshold = float(np.median([p for p in studies["prob_pneumonia"].to_pylist() if p is not None]))
    for name, table in (
        ("studies.parquet", studies),
        ("predictions.parquet", pq.read_table(run / "predictions.parquet")),
    ):
        flagged = pc.greater_equal(table["prob_pneumonia"], pa.scalar(threshold, pa.float32()))
        pq.write_table(
            table.set_column(table.schema.get_field_index("flagged"), "flagged", flagged), out / name
        )
    scored = studies.filter(pc.is_valid(studies["prob_pneumonia"])).sort_by(
        [("prob_pneumonia", "descending"), ("driving_image_id", "ascending")]
    )
    ids = scored["driving_image_id"].to_pylist()
    (out / "heatmaps").mkdir()
    rng = np.random.default_rng(0)
    for image_id in ids[:3]:
        pixels = rng.integers(0, 255, (64, 64), dtype=np.uint8)
        (out / "heatmaps" / f"{image_id}.png").write_bytes(overlay_png(pixels, rng.random((64, 64))))
    return out, ids[:3], ids[3:]


def test_worklist_has_flagged_and_random_studies(half_flagged):
    out, flagged, unflagged = half_flagged
    page = render(str(out), review_sample=2)
    items = _review_items(page)
    assert items[:3] == [(i, "flagged") for i in flagged]  # every flagged study, most suspicious first
    assert len(items) == 5 and {s for _, s in items[3:]} == {"random"}
    assert {i for i, _ in items[3:]} < set(unflagged)
    assert _review(_review_html(out, sample=2)) == _review(page)  # the sample is seeded
    review = _review(page)
    assert review.count("(Grad-CAM)") == 3 and review.count("data:image/jpeg;base64,") == 5 + 3
    assert "useless for fitting a threshold" in review and 'id="rv-left-out"' not in review
    assert 'id="rv-no-random"' not in review
    # Controls and the export, inline.
    for needle in ('id="rv-export"', 'id="rv-sort"', 'id="rv-filter"', 'id="rv-progress"', "localStorage"):
        assert needle in page
    assert f'data-header="{CSV_HEADER}"' in review
    # At most --review-limit studies: the random sample stays, the least suspicious flagged go.
    capped = _review_html(out, sample=2, limit=3)
    assert [s for _, s in _review_items(capped)] == ["flagged", "random", "random"]
    assert "2 of 3 flagged studies are not in the worklist (--review-limit 3)" in capped
    assert 'id="rv-no-random"' in _review_html(out, sample=0)


def test_worklist_is_self_contained_and_names_no_patient(run, half_flagged):
    out, _, _ = half_flagged
    preds = pq.read_table(run / "predictions.parquet")
    identifiers = {"TEST^PEDIATRIC", "person70", "IM-0", ".dcm", ".jpeg", str(run.parent), "heatmaps/"}
    for column in ("patient_id", "accession_number", "study_instance_uid", "sop_instance_uid", "uri"):
        identifiers |= {v for v in preds[column].to_pylist() if v}
    for page in (render(str(out), review_sample=3), render(str(run))):
        text = _without_images(page)
        assert not sorted(i for i in identifiers if i in text or html.escape(i) in text)
        # One file: nothing fetched from elsewhere (only inline data: images, inline script/style).
        assert not re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
        assert "<link" not in page and "<script src" not in page and "@import" not in page
        assert all(s.startswith("data:image/") for s in re.findall(r'src="([^"]*)"', page))
    # Every scored study of the threshold-0 run is flagged: no random sample, and the page says why
    # that cannot fit a threshold.
    page = render(str(run))
    assert [s for _, s in _review_items(page)] == ["flagged"] * 6 and 'id="rv-no-random"' in page


def test_cli_report_review_options(half_flagged, tmp_path):
    from click.testing import CliRunner

    from cxr_ray.cli import main

    out, flagged, _ = half_flagged
    target = tmp_path / "r.html"
    args = ["report", str(out), "--out", str(target), "--review-sample", "1", "--review-limit", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    items = _review_items(target.read_text())
    assert [s for _, s in items] == ["flagged", "random"] and items[0][0] == flagged[0]
    assert CliRunner().invoke(main, [*args[:3], "--review-sample", "-1"]).exit_code == 2
