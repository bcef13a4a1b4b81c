"""The report's review worklist: mark studies in a browser, export the labels as a CSV.

The worklist holds every flagged study (most suspicious first) and a seeded random sample of
the unflagged scored studies, each shown by its driving image (a small inline JPEG, and its
Grad-CAM overlay when the run was scored with ``--explain``). Plain JavaScript
(``static/review.js``, with ``static/review.css``; both inlined into the page, so there is no
server and no external file: it works from ``file://``) sorts and filters the items, marks the
focused one from the keyboard or its buttons, keeps the marks in ``localStorage`` under the
run id (a reload keeps them) and downloads the reviewed items as a CSV with the columns of
``CSV_HEADER``, the input of ``cxr-ray calibrate --labels``.

Why the random sample: flagged studies alone are all predicted positive, so their labels
cannot show how many pneumonias the threshold misses or how many normals a higher one would
spare; fitting a threshold needs unflagged studies too (``selection`` tells them apart).

Items are named by their driving image's ``image_id`` prefix on the page; the full
``image_id`` (a hash of the bytes, no patient identifier) is only in a data attribute, for
the export.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import logging
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.errors import CxrRayError
from cxr_ray.imaging.preprocess import PreprocessSpec, decode
from cxr_ray.io import storage, uris
from cxr_ray.labels import LABELS
from cxr_ray.scoring.result import REF_CHARS
from cxr_ray.vocabulary import REVIEW_CSV_COLUMNS, Status

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "CSV_HEADER",
    "REVIEW_LABELS",
    "ReviewItem",
    "Worklist",
    "review_html",
    "static_text",
    "stratified_sample",
    "worklist",
]

log = logging.getLogger(__name__)

#: What a reviewer can say about an item (the CSV's ``label`` values).
REVIEW_LABELS: tuple[str, ...] = (*LABELS, "not_assessable")
#: The exported CSV's header (parsed by ``cxr-ray calibrate --labels``).
CSV_HEADER = ",".join(REVIEW_CSV_COLUMNS)
#: Side of the inline thumbnails (JPEG, a few KB each).
THUMB_PX = 192
_JPEG_QUALITY = 75


@dataclass(frozen=True)
class ReviewItem:
    """One study of the worklist, shown by its driving image."""

    image_id: str
    selection: str  # "flagged" | "random"
    flagged: bool
    pred_label: str
    probs: tuple[float, float, float]  # in LABELS order
    prob_pneumonia: float
    model_version: str
    uri: str | None  # where to re-read the image for its thumbnail (never shown)
    heatmap_uri: str | None


@dataclass(frozen=True)
class Worklist:
    items: list[ReviewItem]
    flagged_total: int  # flagged studies in the run
    unflagged_total: int  # unflagged scored studies in the run
    sample: int  # random items asked for
    limit: int


def _items(rows: list[dict[str, Any]], selection: str, heatmaps: dict[str, str | None]) -> list[ReviewItem]:
    return [
        ReviewItem(
            image_id=r["image_id"],
            selection=selection,
            flagged=bool(r["flagged"]),
            pred_label=r["pred_label"],
            probs=tuple(float(r[f"prob_{label}"]) for label in LABELS),  # type: ignore[arg-type]
            prob_pneumonia=float(r["prob_pneumonia"]),
            model_version=r.get("model_version") or "",
            uri=r.get("uri"),
            heatmap_uri=heatmaps.get(r["image_id"]),
        )
        for r in rows
    ]


#: Equal-count strata of the unflagged studies' P(pneumonia) the random sample is drawn from.
SCORE_STRATA = 4


def stratified_sample(scores: np.ndarray, n: int, *, seed: int = 0, strata: int = SCORE_STRATA) -> np.ndarray:
    """Sorted indices of ``n`` of ``scores``, drawn (seeded, without replacement) from
    ``strata`` equal-count strata of the scores with proportional allocation (systematic
    rounding): every item keeps the same chance n / N as in a simple random sample,
    so calibration's class mix stays representative, but every score band, the one just
    below the flag threshold included, is sure to get its share."""
    total = len(scores)
    n = min(max(n, 0), total)
    if n == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    order = np.lexsort((np.arange(total), scores))  # by score, ties by position
    groups = [g for g in np.array_split(order, min(strata, total)) if len(g)]
    # Systematic rounding of the cumulative quotas from a random start: each stratum gets the
    # floor or the ceiling of its share n * size / N, exactly that share on average.
    cum = np.floor(np.cumsum([n * len(g) / total for g in groups]) + rng.uniform())
    cum[-1] = n  # float rounding never loses or adds one
    take = np.diff(np.concatenate([[0.0], cum])).astype(np.int64)
    picked = [rng.choice(g, size=k, replace=False) for g, k in zip(groups, take, strict=True) if k]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def worklist(
    studies: pa.Table | None, predictions: pa.Table, *, sample: int = 40, limit: int = 300, seed: int = 0
) -> Worklist:
    """The flagged studies and a seeded random ``sample`` of the unflagged scored ones, drawn
    by strata of P(pneumonia) (``stratified_sample``).

    A run without ``studies.parquet`` (``studies=None``) lists its scored images one by one.
    At most ``limit`` items: the random sample is kept whole (it is what a threshold is fitted
    on) and the least suspicious flagged studies are left out first. One item per driving
    image (two studies with byte-identical images are one item).
    """
    columns = ["image_id", "pred_label", *(f"prob_{x}" for x in LABELS), "prob_pneumonia", "flagged"]
    if studies is not None:
        units = studies.filter(pc.is_valid(studies["pred_label"])).select(
            ["driving_image_id", "driving_uri", "model_version", *columns[1:]]
        )
        units = units.rename_columns(["image_id", "uri", *units.column_names[2:]])
    else:
        units = predictions.filter(pc.equal(predictions["status"], Status.OK.value)).select(
            ["image_id", "uri", "model_version", *columns[1:]]
        )
    units = units.filter(pc.is_valid(units["image_id"]))
    is_flagged = pc.fill_null(units["flagged"], False)
    flagged = units.filter(is_flagged).sort_by([("prob_pneumonia", "descending"), ("image_id", "ascending")])
    unflagged = units.filter(pc.invert(is_flagged)).sort_by([("image_id", "ascending")])
    sample, limit = max(sample, 0), max(limit, 0)
    n_random = min(sample, unflagged.num_rows, limit)
    scores = pc.fill_null(unflagged["prob_pneumonia"], 0.0).to_numpy(zero_copy_only=False)
    picked = stratified_sample(np.asarray(scores, np.float64), n_random, seed=seed)
    random_rows = (
        unflagged.take(pa.array(picked, pa.int64()))
        .sort_by([("prob_pneumonia", "descending"), ("image_id", "ascending")])
        .to_pylist()
    )
    flagged_rows = flagged.slice(0, limit - n_random).to_pylist()

    heatmaps: dict[str, str | None] = {}
    if "heatmap_uri" in predictions.column_names:
        ids = pa.array([r["image_id"] for r in flagged_rows + random_rows], pa.string())
        explained = predictions.filter(
            pc.and_(pc.is_in(predictions["image_id"], value_set=ids), pc.is_valid(predictions["heatmap_uri"]))
        )
        for image_id, uri in zip(
            explained["image_id"].to_pylist(), explained["heatmap_uri"].to_pylist(), strict=True
        ):
            heatmaps.setdefault(image_id, uri)
    items, seen = [], set()
    for item in _items(flagged_rows, "flagged", heatmaps) + _items(random_rows, "random", heatmaps):
        if item.image_id not in seen:
            seen.add(item.image_id)
            items.append(item)
    return Worklist(items, flagged.num_rows, unflagged.num_rows, sample, limit)


def _b64_jpeg(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return base64.b64encode(buf.getvalue()).decode()


def _image_jpeg(data: bytes) -> str | None:
    """A base64 JPEG thumbnail of scored image bytes (``THUMB_PX`` square, as the model saw it)."""
    from PIL import Image

    try:
        pixels = decode(data, PreprocessSpec(height=THUMB_PX, width=THUMB_PX)).pixels
    except (CxrRayError, ValueError, OSError):
        return None
    return _b64_jpeg(Image.fromarray(pixels, mode="L"))


def _overlay_jpeg(data: bytes) -> str | None:
    """A base64 JPEG thumbnail (in colour) of a Grad-CAM overlay PNG."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _b64_jpeg(im.convert("RGB").resize((THUMB_PX, THUMB_PX), Image.Resampling.BILINEAR))
    except (OSError, ValueError):
        return None


def _image_thumb(uri: str | None, image_id: str) -> str | None:
    """The thumbnail of the scored image at ``uri`` if it is still the one scored."""
    if not uri or uris.MEMBER_SEP in uri or uri.startswith(("dicomweb://", "dicomwebs://")):
        return None  # archive members and PACS instances: not re-fetched for a report
    try:
        data = storage.read_bytes(uri)
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != image_id:  # changed (or pseudonymised uri) since
        return None
    return _image_jpeg(data)


def _heatmap_thumb(item: ReviewItem, run_dir: str) -> str | None:
    """The Grad-CAM overlay's thumbnail (``heatmap_uri``, else ``RUN_DIR/heatmaps/<image_id>.png``)."""
    for uri in (item.heatmap_uri, storage.join(run_dir, "heatmaps", f"{item.image_id}.png")):
        if not uri:
            continue
        try:
            return _overlay_jpeg(storage.read_bytes(uri))
        except OSError:
            continue
    return None


def _item_html(item: ReviewItem, index: int, run_dir: str) -> str:
    ref = item.image_id[:REF_CHARS]
    pictures = []
    thumb = _image_thumb(item.uri, item.image_id)
    if thumb:
        pictures.append(f'<img alt="study {ref}" src="data:image/jpeg;base64,{thumb}">')
    else:
        pictures.append('<p class="note">image not available</p>')
    heat = _heatmap_thumb(item, run_dir)
    if heat:
        pictures.append(f'<img alt="study {ref} (Grad-CAM)" src="data:image/jpeg;base64,{heat}">')
    probs = " · ".join(f"{label} {p:.3f}" for label, p in zip(LABELS, item.probs, strict=True))
    buttons = "".join(
        f'<button type="button" data-l="{label}" aria-pressed="false" aria-keyshortcuts="{key}" '
        f'title="{text} ({key})">{text} <kbd>{key}</kbd></button>'
        for label, key, text in (
            ("normal", "n", "Normal"),
            ("bacterial", "b", "Bacterial"),
            ("viral", "v", "Viral"),
            ("not_assessable", "x", "Not assessable"),
            ("", "u", "Clear"),
        )
    )
    return (
        f'<li class="rv" tabindex="0" data-id="{item.image_id}" data-sel="{item.selection}" '
        f'data-flagged="{str(item.flagged).lower()}" data-pred="{html.escape(item.pred_label)}" '
        f'data-pp="{item.prob_pneumonia:.6f}" data-mv="{html.escape(item.model_version)}" '
        f'data-order="{index}" aria-label="study {ref}, {item.selection}">'
        f'<div class="pics">{"".join(pictures)}</div><div class="meta"><b>study {ref}</b> '
        f'<span class="tag {item.selection}">{item.selection}</span><br>'
        f"predicted <b>{html.escape(item.pred_label)}</b>, P(pneumonia) {item.prob_pneumonia:.3f}"
        f"{' (flagged)' if item.flagged else ''}<br>"
        f'<span class="note">{probs}</span><br><output class="mark">unreviewed</output></div>'
        f'<div class="btns" role="group" aria-label="label study {ref}">{buttons}</div></li>'
    )


@functools.cache
def static_text(name: str) -> str:
    """A file of ``cxr_ray/reporting/static`` (the worklist's ``review.js`` / ``review.css``).

    Package data read with ``importlib.resources`` (installed wheels and editable checkouts
    alike). It is inlined into the report, so it must not close its own element.
    """
    text = (resources.files("cxr_ray.reporting") / "static" / name).read_text(encoding="utf-8")
    if "</" in text:
        raise ValueError(f"static/{name} contains '</', which would end the report's inline element")
    return text


def review_html(work: Worklist, *, run_dir: str, run_id: str) -> str:
    """The worklist section (HTML, its own ``<style>`` and ``<script>``)."""
    n_flagged = sum(1 for i in work.items if i.selection == "flagged")
    n_random = len(work.items) - n_flagged
    notes = [
        f"<p>{n_flagged} flagged studies (every flagged study, most suspicious first) and "
        f"{n_random} unflagged ones drawn at random (seeded; --review-sample {work.sample}) from the "
        f"run's {work.unflagged_total} unflagged scored studies, in proportion from each quarter of "
        "their P(pneumonia) range, so the band just below the flag threshold is sure to be in it "
        "(column <code>selection</code>). "
        "A sample of flagged studies only would be useless for fitting a threshold: every image in it "
        "is predicted positive, so it cannot show how many pneumonias the threshold misses or how "
        "many normals a higher threshold would spare.</p>",
        "<p>Click a study (or <button type=button id=rv-first>start at the first</button>) and use the "
        "keys <kbd>n</kbd> normal, <kbd>b</kbd> bacterial, <kbd>v</kbd> viral, <kbd>x</kbd> not "
        "assessable (each moves on to the next study), <kbd>u</kbd> clear, <kbd>j</kbd>/<kbd>k</kbd> "
        "or the arrow keys next/previous; or the buttons. Marks stay in this browser (keyed by the "
        "run id) until you export them: <b>Export labels (CSV)</b> downloads the reviewed studies, "
        "the input of <code>cxr-ray calibrate --model A --labelled RUN_DIR --labels labels.csv "
        "--out A2</code>.</p>",
    ]
    if n_random == 0:
        notes.append(
            '<p class="note" id="rv-no-random">No unflagged studies in the worklist: labels from it '
            "alone cannot fit a threshold (score more studies, or raise --review-sample).</p>"
        )
    left_out = work.flagged_total - n_flagged
    if left_out > 0:
        notes.append(
            f'<p class="note" id="rv-left-out">{left_out} of {work.flagged_total} flagged studies are '
            f"not in the worklist (--review-limit {work.limit}): the random sample is kept whole and the "
            "least suspicious flagged studies are left out; they are all in studies.parquet.</p>"
        )
    options = [("all", "all"), ("unreviewed", "unreviewed"), ("reviewed", "reviewed")]
    options += [("flagged", "flagged"), ("random", "random")]
    options += [(f"pred:{x}", f"predicted {x}") for x in LABELS]
    options += [(f"label:{x}", f"marked {x.replace('_', ' ')}") for x in REVIEW_LABELS]
    bar = (
        '<div class="bar"><label>Sort <select id="rv-sort">'
        '<option value="pp">P(pneumonia), highest first</option>'
        '<option value="pred">predicted class</option><option value="status">unreviewed first</option>'
        '</select></label><label>Show <select id="rv-filter">'
        + "".join(f'<option value="{v}">{t}</option>' for v, t in options)
        + '</select></label><button type="button" id="rv-export">Export labels (CSV)</button>'
        '<output id="rv-progress" aria-live="polite"></output></div>'
    )
    body = "".join(_item_html(item, i, run_dir) for i, item in enumerate(work.items))
    if not work.items:
        body = ""
        notes.append('<p class="note">No scored studies to review.</p>')
    return (
        f"<style>{static_text('review.css')}</style>"
        f'<section id="review" data-run="{html.escape(run_id)}" data-header="{CSV_HEADER}">'
        f"<h2>Review worklist ({len(work.items)} studies)</h2>{''.join(notes)}{bar}"
        f'<ol id="rv-list" aria-label="studies to review">{body}</ol></section>'
        f"<script>{static_text('review.js')}</script>"
    )
