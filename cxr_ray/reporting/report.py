"""A self-contained HTML report of a scoring run (one file, images embedded as base64 PNGs).

Sections: run summary (images, ok, skipped, errors, studies, flagged studies), drift against
the model's reference (``cxr_ray.reporting.drift_section``, when the run has it), per-class
metrics, confusion matrix, ROC curves (one-vs-rest and normal-vs-pneumonia), reliability
diagram and pneumonia-score histogram by true class (image level), the same metrics per
study beside them, a gallery of the most suspicious flagged *studies* (one entry per study:
its driving image's Grad-CAM overlay, else the image itself, with the study's counts), the
review worklist (``cxr_ray.reporting.review``: the flagged studies and a random sample of the
unflagged ones, marked in the browser and exported as a labels CSV for ``cxr-ray calibrate``),
the skipped images counted per reason, and the error rows. Sections that need labels are left
out, with a note, when a run has none. A run folder without ``studies.parquet`` (written
before study-level results existed) gets the image-level gallery instead.

No patient identifier reaches the page: studies are named by their driving image's
``image_id`` prefix (a hash of the file bytes; ``driving_image_id`` in ``studies.parquet``),
images by theirs, never by study key, UID, patient id, accession number or file name (Kermany
names carry patient ids: ``person123_bacteria_4.jpeg``), and those are cut out of error text.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from collections import Counter
from functools import cache
from importlib import resources
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray import metrics
from cxr_ray.errors import CxrRayError, error_code, safe_detail, safe_row_error
from cxr_ray.imaging.preprocess import PreprocessSpec, decode
from cxr_ray.io import storage, uris
from cxr_ray.reporting.drift_section import drift_section
from cxr_ray.reporting.figures import img, levels_html, metrics_html, plots
from cxr_ray.reporting.performance_section import performance_section
from cxr_ray.reporting.review import review_html, worklist
from cxr_ray.scoring.evaluation import labelled_arrays, summary_threshold
from cxr_ray.scoring.result import REF_CHARS, flagged_studies
from cxr_ray.scoring.studies import STUDIES_SCHEMA, study_metrics
from cxr_ray.vocabulary import Status

#: Side of the gallery's thumbnails of original images (when a study has no heatmap).
THUMB_PX = 240
#: Columns never shown (identifiers); also cut out of error text.
_IDENTIFIER_COLUMNS = (
    "uri",
    "patient_id",
    "accession_number",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
)


def _ref(image_id: str | None) -> str:
    """How the page names an image (and the study it drives): its ``image_id`` prefix."""
    return image_id[:REF_CHARS] if image_id else "(unreadable)"


def _original_png(uri: str, image_id: str) -> str | None:
    """A ``THUMB_PX`` PNG (base64) of the image at a plain file/object ``uri``, as the model saw
    it (squashed to a square), if it is still the image that was scored; else ``None``."""
    if uris.MEMBER_SEP in uri or uri.startswith(("dicomweb://", "dicomwebs://")):
        return None  # archive members and PACS instances: not re-fetched for a report
    try:
        data = storage.read_bytes(uri)
        if hashlib.sha256(data).hexdigest() != image_id:  # changed (or pseudonymised uri) since
            return None
        pixels = decode(data, PreprocessSpec(height=THUMB_PX, width=THUMB_PX)).pixels
    except (OSError, CxrRayError, ValueError):
        return None
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _picture(heatmap_uri: str | None, uri: str | None, image_id: str | None, alt: str) -> str:
    """The Grad-CAM overlay of an image, else the image itself, else a note."""
    if heatmap_uri:
        try:
            return img(base64.b64encode(storage.read_bytes(heatmap_uri)).decode(), f"{alt} (Grad-CAM)")
        except OSError:
            pass
    if uri and image_id:
        png = _original_png(uri, image_id)
        if png is not None:
            return img(png, alt)
    return '<p class="note">image not available</p>'


def _study_gallery(studies: pa.Table, t: pa.Table, top: int) -> str:
    """One figure per flagged study (most suspicious first), shown by its driving image."""
    rows = flagged_studies(studies).slice(0, max(top, 0)).to_pylist()
    if not rows:
        return '<p class="note">No flagged studies.</p>'
    ids = pa.array([r["driving_image_id"] for r in rows], pa.string())
    images: dict[str, dict[str, Any]] = {}
    for r in (
        t.filter(pc.is_in(t["image_id"], value_set=ids))
        .select(["image_id", "uri", "heatmap_uri"])
        .to_pylist()
    ):
        images.setdefault(r["image_id"], r)
    items = []
    for row in rows:
        ref = _ref(row["driving_image_id"])
        image = images.get(row["driving_image_id"], {})
        picture = _picture(
            image.get("heatmap_uri"), image.get("uri"), row["driving_image_id"], f"study {ref}"
        )
        items.append(
            f'<figure class="study">{picture}<figcaption>study {ref}<br>'
            f"P(pneumonia) {row['prob_pneumonia']:.3f}, predicted {html.escape(row['pred_label'])}"
            f"{', true ' + html.escape(row['label']) if row.get('label') else ''}<br>"
            f"{row['images']} image{'s' if row['images'] != 1 else ''}: {row['scored']} scored, "
            f"{row['skipped']} skipped, "
            f"{row['errors']} errors</figcaption></figure>"
        )
    return f'<div class="gallery" id="gallery">{"".join(items)}</div>'


def _image_gallery(t: pa.Table, top: int) -> str:
    """Older runs (no ``studies.parquet``): one figure per flagged image."""
    flagged = t.filter(pc.fill_null(t["flagged"], False)).sort_by(
        [("prob_pneumonia", "descending"), ("image_id", "ascending")]
    )
    items = []
    for row in flagged.slice(0, max(top, 0)).to_pylist():
        ref = _ref(row["image_id"])
        picture = _picture(row.get("heatmap_uri"), row["uri"], row["image_id"], f"image {ref}")
        items.append(
            f'<figure class="image">{picture}<figcaption>image {ref}<br>'
            f"P(pneumonia) {row['prob_pneumonia']:.3f}, predicted {html.escape(row['pred_label'])}"
            f"{', true ' + html.escape(row['label']) if row.get('label') else ''}</figcaption></figure>"
        )
    if not items:
        return '<p class="note">No flagged images.</p>'
    return f'<div class="gallery" id="gallery">{"".join(items)}</div>'


def _scrub(text: str, row: dict[str, Any]) -> str:
    """``text`` without the row's identifiers (its uri, file name and stem, patient id, ...)."""
    values: set[str] = set()
    for name in _IDENTIFIER_COLUMNS:
        value = row.get(name)
        if value:
            values.add(value)
    uri = row.get("uri")
    if uri:
        base = uri.rsplit(uris.MEMBER_SEP, 1)[-1].rsplit("/", 1)[-1]
        values |= {base, base.rsplit(".", 1)[0]}
    for value in sorted((v for v in values if len(v) >= 3), key=len, reverse=True):
        text = text.replace(value, "…")
    return text


def _column_or_nulls(t: pa.Table, name: str) -> pa.ChunkedArray | pa.Array:
    return t[name] if name in t.column_names else pa.nulls(t.num_rows, pa.string())


def _intended_use_html(t: pa.Table) -> str:
    """Skipped images counted per reason, and scored images whose intended use has a note."""
    status = t["status"]
    # Reasons are made safe again here (``safe_row_error``), whichever table this is.
    reasons = Counter(
        safe_row_error(e) for e in t.filter(pc.equal(status, Status.SKIPPED))["error"].to_pylist()
    )
    parts = [f"<h2>Skipped images ({sum(reasons.values())})</h2>"]
    if reasons:
        parts.append(
            '<table class="err" id="skipped"><tr><th class=l>reason</th><th>images</th></tr>'
            + "".join(
                f"<tr><td>{html.escape(reason or '(no reason recorded)')}</td><td>{n}</td></tr>"
                for reason, n in reasons.most_common()
            )
            + "</table>"
        )
    else:
        # "Inside the intended use" only where tags were checked: JPEG/PNG rows are "unchecked".
        uses = Counter(_column_or_nulls(t.filter(pc.equal(status, Status.OK)), "intended_use").to_pylist())
        scored, unchecked = sum(uses.values()), uses.get("unchecked", 0)
        if scored and unchecked == scored:
            text = (
                "None skipped, but the intended use was unchecked: no scored image carried DICOM tags "
                "(modality, body part, view, patient age), e.g. JPEG/PNG files."
            )
        elif unchecked:
            text = (
                f"None: the images with DICOM tags were inside the model's intended use; {unchecked} of "
                f"{scored} scored images were unchecked (tags missing, see below)."
            )
        elif scored and uses.get(None, 0) == scored:
            text = "None skipped; the intended use was not recorded for this run."
        else:
            text = "None: every image was inside the model's intended use or unreadable."
        parts.append(f'<p class="note" id="use-summary">{html.escape(text)}</p>')
    ok = t.filter(pc.equal(status, Status.OK))
    use, note = _column_or_nulls(ok, "intended_use"), _column_or_nulls(ok, "intended_use_note")
    noted = Counter(
        (u, n)
        for u, n in zip(use.to_pylist(), note.to_pylist(), strict=True)
        if u in ("unchecked", "overridden", "unparseable")
    )
    if noted:
        parts.append(
            '<p>Scored with a note on the intended use:</p><table class="err" id="use-notes">'
            "<tr><th class=l>intended use</th><th class=l>note</th><th>images</th></tr>"
            + "".join(
                f"<tr><td>{html.escape(u)}</td><td>{html.escape(safe_detail(n or ''))}</td><td>{k}</td></tr>"
                for (u, n), k in noted.most_common()
            )
            + "</table>"
        )
    return "\n".join(parts)


def _errors_html(t: pa.Table, n_errors: int) -> str:
    columns = [c for c in ("image_id", "error", *_IDENTIFIER_COLUMNS) if c in t.column_names]
    errors = t.filter(pc.equal(t["status"], Status.ERROR)).select(columns).slice(0, 200).to_pylist()
    parts = [f"<h2>Error rows ({n_errors})</h2>"]
    if not errors:
        parts.append('<p class="note">None.</p>')
        return "\n".join(parts)
    parts.append(
        '<table class="err" id="errors"><tr><th class=l>image</th><th class=l>reason</th>'
        "<th class=l>error</th></tr>"
        + "".join(
            f"<tr><td>{_ref(r['image_id'])}</td><td>{html.escape(error_code(r['error']) or '')}</td>"
            f"<td>{html.escape(_scrub(safe_row_error(r['error']) or '', r))}</td></tr>"
            for r in errors
        )
        + "</table>"
    )
    if n_errors > len(errors):
        parts.append(
            f'<p class="note">First {len(errors)} of {n_errors}; all are in predictions.parquet.</p>'
        )
    return "\n".join(parts)


def _read_studies(run_dir: str) -> pa.Table | None:
    uri = storage.join(run_dir, "studies.parquet")
    if not storage.exists(uri):
        return None
    return storage.read_table(uri).cast(STUDIES_SCHEMA)


@cache
def _css() -> str:
    """The page style, ``static/report.css`` (a package file)."""
    return resources.files("cxr_ray.reporting").joinpath("static/report.css").read_text("utf-8")


def render(
    run_dir: str,
    *,
    top: int = 24,
    title: str | None = None,
    review_sample: int = 40,
    review_limit: int = 300,
    review_seed: int = 0,
) -> str:
    """The HTML report of the run in ``run_dir`` (its predictions, studies and summary).

    The review worklist holds the flagged studies and a random sample (seeded with
    ``review_seed``) of ``review_sample`` unflagged scored ones, ``review_limit`` at most.
    """
    t = storage.read_table(storage.join(run_dir, "predictions.parquet"))
    studies = _read_studies(run_dir)
    summary: dict[str, Any] = {}
    if storage.exists(storage.join(run_dir, "summary.json")):
        summary = json.loads(storage.read_bytes(storage.join(run_dir, "summary.json")))
    versions = sorted({v for v in t["model_version"].to_pylist() if v})
    parts = [
        f"<h1>{html.escape(title or 'cxr-ray scoring report')}</h1>",
        f"<p>run {html.escape(str(summary.get('run_id', '')))} · model {html.escape(', '.join(versions))} · "
        f"engine {html.escape(', '.join(sorted(set(t['engine'].to_pylist()))))}</p>",
        _kpis_html(t, studies, summary),
        performance_section(summary),
        drift_section(run_dir),
        *_metrics_parts(t, studies, summary_threshold(summary)),
        *_gallery_parts(t, studies, top),
    ]
    run_id = str(summary.get("run_id") or next((r for r in t["run_id"].to_pylist() if r), ""))
    work = worklist(studies, t, sample=review_sample, limit=review_limit, seed=review_seed)
    counted = pc.is_in(t["status"], pa.array([Status.OK, Status.SKIPPED], pa.string()))
    n_errors = t.num_rows - int(pc.sum(counted).as_py() or 0)
    parts += [
        review_html(work, run_dir=run_dir, run_id=run_id),
        _intended_use_html(t),
        _errors_html(t, n_errors),
    ]
    body = "\n".join(parts)
    head = f'<meta charset="utf-8"><title>{html.escape(title or "cxr-ray report")}</title>'
    head += f"<style>{_css()}</style>"
    return f'<!doctype html><html lang="en"><head>{head}</head><body>{body}</body></html>\n'


def _kpis_html(t: pa.Table, studies: pa.Table | None, summary: dict[str, Any]) -> str:
    """The run's counts in one row: images, ok, skipped, errors, studies, flagged, speed."""
    n = t.num_rows
    ok = int(pc.sum(pc.equal(t["status"], Status.OK)).as_py() or 0)
    skipped = int(pc.sum(pc.equal(t["status"], Status.SKIPPED)).as_py() or 0)
    flagged = int(pc.sum(pc.fill_null(t["flagged"], False)).as_py() or 0)
    kpis: list[tuple[str, Any]] = [
        ("images", n),
        ("ok", ok),
        ("skipped", skipped),
        ("errors", n - ok - skipped),
    ]
    if studies is not None:
        n_flagged_studies = int(pc.sum(pc.fill_null(studies["flagged"], False)).as_py() or 0)
        kpis += [("studies", studies.num_rows), ("flagged studies", n_flagged_studies)]
    kpis.append(("flagged images", flagged))
    if summary.get("images_per_s"):
        kpis.append(("img/s", f"{summary['images_per_s']:.1f}"))
    return (
        '<div id="summary">' + "".join(f'<span class="kpi"><b>{v}</b>{k}</span>' for k, v in kpis) + "</div>"
    )


def _metrics_parts(t: pa.Table, studies: pa.Table | None, threshold: float) -> list[str]:
    """Per-class metrics and curves per image, and per study beside them (labelled runs)."""
    y, p = labelled_arrays(t)
    if not len(y):
        return ['<h2>Per-class metrics</h2><p class="note">No labelled images in this run.</p>']
    sm = study_metrics(studies, threshold=threshold) if studies is not None else None
    m = metrics.classification_metrics(y, p, threshold=threshold)
    figs = plots(y, p)
    parts = ["<h2>Images and studies</h2>", levels_html(m, sm)] if sm is not None else []
    parts += [
        f"<h2>Per-class metrics ({len(y)} labelled images)</h2>",
        metrics_html(m),
        '<h2>Curves</h2><div class="figs">',
        *(img(figs[k], k) for k in ("confusion", "roc", "reliability", "histogram")),
        "</div>",
    ]
    if sm is not None:
        parts += [
            f"<h2>Per-class metrics per study ({sm.n} labelled studies, each by its driving image)</h2>",
            metrics_html(sm, prefix="study-"),
        ]
    return parts


def _gallery_parts(t: pa.Table, studies: pa.Table | None, top: int) -> list[str]:
    """The most suspicious flagged studies (images, for runs without ``studies.parquet``)."""
    if studies is not None:
        return [f"<h2>Most suspicious flagged studies (top {top})</h2>", _study_gallery(studies, t, top)]
    return [
        f"<h2>Most suspicious flagged images (top {top})</h2>",
        '<p class="note">This run has no studies.parquet (written before study-level results): '
        "images are listed one by one.</p>",
        _image_gallery(t, top),
    ]


def write_report(run_dir: str, out: str | None = None, **kwargs: Any) -> str:
    """Render and write ``report.html`` (atomically); returns where it went."""
    target = out or storage.join(run_dir, "report.html")
    storage.write_bytes(render(run_dir, **kwargs).encode("utf-8"), target)
    return target
