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
    assert sum(reasons.values()) == 4 and "view LL is outside the model's intended use (PA, AP)" in reasons
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
