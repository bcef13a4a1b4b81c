"""The report's review worklist: mark studies in a browser, export the labels as a CSV.

The worklist holds every flagged study (most suspicious first) and a seeded random sample of
the unflagged scored studies, each shown by its driving image (a small inline JPEG, and its
Grad-CAM overlay when the run was scored with ``--explain``). Plain inline JavaScript (no
server, no external files: it works from ``file://``) sorts and filters the items, marks the
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
import hashlib
import html
import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.errors import CxrRayError
from cxr_ray.imaging.preprocess import PreprocessSpec, decode
from cxr_ray.io import storage, uris
from cxr_ray.labels import LABELS
from cxr_ray.scoring.screen import REF_CHARS

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["CSV_HEADER", "REVIEW_LABELS", "ReviewItem", "Worklist", "review_html", "worklist"]

log = logging.getLogger(__name__)

#: What a reviewer can say about an item (the CSV's ``label`` values).
REVIEW_LABELS: tuple[str, ...] = (*LABELS, "not_assessable")
#: The exported CSV's header (parsed by ``cxr-ray calibrate --labels``).
CSV_HEADER = "image_id,label,selection,flagged,run_id,model_version,reviewed_at"
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


def worklist(
    studies: pa.Table | None, predictions: pa.Table, *, sample: int = 40, limit: int = 300, seed: int = 0
) -> Worklist:
    """The flagged studies and a seeded random ``sample`` of the unflagged scored ones.

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
        units = predictions.filter(pc.equal(predictions["status"], "ok")).select(
            ["image_id", "uri", "model_version", *columns[1:]]
        )
    units = units.filter(pc.is_valid(units["image_id"]))
    is_flagged = pc.fill_null(units["flagged"], False)
    flagged = units.filter(is_flagged).sort_by([("prob_pneumonia", "descending"), ("image_id", "ascending")])
    unflagged = units.filter(pc.invert(is_flagged)).sort_by([("image_id", "ascending")])
    sample, limit = max(sample, 0), max(limit, 0)
    n_random = min(sample, unflagged.num_rows, limit)
    picked = np.sort(np.random.default_rng(seed).choice(unflagged.num_rows, size=n_random, replace=False))
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


REVIEW_CSS = """
#review .bar{display:flex;flex-wrap:wrap;gap:.6rem;align-items:center;margin:.6rem 0}
#rv-list{list-style:none;padding:0;margin:0}
.rv{display:flex;gap:1rem;align-items:center;border:1px solid #dde3ea;border-radius:6px;padding:.5rem;
margin:.4rem 0;font-size:.85rem}.rv[hidden]{display:none}
.rv:focus{outline:3px solid #1b6ac9;outline-offset:2px;background:#f2f7fd}
.rv .pics{display:flex;gap:.3rem;min-width:248px}.rv .pics img{width:120px;height:120px}
.rv:focus-within .pics img{width:192px;height:192px}
.rv .meta{flex:1}.rv .btns{display:flex;flex-wrap:wrap;gap:.3rem;max-width:270px}
.rv button,#review .bar button{font:inherit;padding:.25rem .5rem;border:1px solid #8793a1;
border-radius:4px;background:#fff;cursor:pointer}
.rv button:focus-visible,#review .bar button:focus-visible,#review select:focus-visible{
outline:3px solid #1b6ac9;outline-offset:1px}
.rv button[aria-pressed=true]{background:#1b6ac9;color:#fff;border-color:#1b6ac9}
.rv button[aria-pressed=true] kbd{color:#fff}
.rv[data-label]:not([data-label=""]){border-left:6px solid #2e8b57}
.tag{border-radius:3px;padding:0 .3rem;font-size:.75rem}.tag.flagged{background:#fde2e1}
.tag.random{background:#e3eefc}kbd{font-size:.7rem;color:#56606b}
"""

#: Small and readable on purpose: it is the only code a reviewer's browser runs.
REVIEW_JS = r"""
(function () {
  "use strict";
  const root = document.getElementById("review");
  const list = document.getElementById("rv-list");
  const items = Array.from(list.querySelectorAll(".rv"));
  const run = root.dataset.run;
  const STORE = "cxr-ray-review:" + run;
  const KEYS = {n: "normal", b: "bacterial", v: "viral", x: "not_assessable"};
  const CLASS_ORDER = {normal: 0, bacterial: 1, viral: 2};
  let marks = {};
  let stored = true;
  try { marks = JSON.parse(localStorage.getItem(STORE) || "{}") || {}; }
  catch (e) { stored = false; marks = {}; }

  function save() {
    try { localStorage.setItem(STORE, JSON.stringify(marks)); }
    catch (e) { stored = false; }
  }
  function show(li) {
    const m = marks[li.dataset.id];
    li.dataset.label = m ? m.label : "";
    li.querySelector(".mark").textContent = m ? "marked " + m.label.replace("_", " ") : "unreviewed";
    li.querySelectorAll("button[data-l]").forEach(function (b) {
      b.setAttribute("aria-pressed", String(!!m && b.dataset.l === m.label));
    });
  }
  function progress() {
    const done = items.filter(function (li) { return marks[li.dataset.id]; });
    const of = function (sel) { return items.filter(function (li) { return li.dataset.sel === sel; }); };
    const count = function (xs) { return xs.filter(function (li) { return marks[li.dataset.id]; }).length; };
    document.getElementById("rv-progress").textContent =
      done.length + " of " + items.length + " reviewed (flagged " + count(of("flagged")) + "/" +
      of("flagged").length + ", random " + count(of("random")) + "/" + of("random").length + ")" +
      (stored ? "" : "; this browser does not keep them across a reload: export before closing");
  }
  function keep(li, filter) {
    const m = marks[li.dataset.id];
    if (filter === "all") return true;
    if (filter === "unreviewed") return !m;
    if (filter === "reviewed") return !!m;
    if (filter === "flagged" || filter === "random") return li.dataset.sel === filter;
    if (filter.startsWith("pred:")) return li.dataset.pred === filter.slice(5);
    if (filter.startsWith("label:")) return !!m && m.label === filter.slice(6);
    return true;
  }
  function applyFilter() {
    const filter = document.getElementById("rv-filter").value;
    items.forEach(function (li) { li.hidden = !keep(li, filter); });
  }
  function applySort() {
    const by = document.getElementById("rv-sort").value;
    const order = function (li) { return Number(li.dataset.order); };
    const key = {
      pp: function (li) { return [-Number(li.dataset.pp), order(li)]; },
      pred: function (li) { return [CLASS_ORDER[li.dataset.pred], -Number(li.dataset.pp), order(li)]; },
      status: function (li) { return [marks[li.dataset.id] ? 1 : 0, order(li)]; },
    }[by];
    const sorted = items.slice().sort(function (a, b) {
      const ka = key(a), kb = key(b);
      for (let i = 0; i < ka.length; i++) { if (ka[i] !== kb[i]) return ka[i] - kb[i]; }
      return 0;
    });
    sorted.forEach(function (li) { list.appendChild(li); });
  }
  function visible() {
    return Array.from(list.children).filter(function (li) { return !li.hidden; });
  }
  function neighbour(li, step) {
    const v = visible();
    return v[v.indexOf(li) + step] || null;
  }
  function go(li) {
    if (li) { li.focus(); li.scrollIntoView({block: "nearest"}); }
  }
  function mark(li, label) {
    const next = neighbour(li, 1);
    if (label) marks[li.dataset.id] = {label: label, at: new Date().toISOString()};
    else delete marks[li.dataset.id];
    save();
    show(li);
    progress();
    applyFilter();
    if (label) go(next || (li.hidden ? visible()[0] : li));  // marked: on to the next one
    else if (!li.hidden) go(li);
  }
  function quote(s) {
    s = String(s);
    return /[",\r\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }
  function csv() {
    const rows = [root.dataset.header];
    items.forEach(function (li) {
      const m = marks[li.dataset.id];
      if (!m) return;
      rows.push([li.dataset.id, m.label, li.dataset.sel, li.dataset.flagged, run, li.dataset.mv, m.at]
        .map(quote).join(","));
    });
    return rows.join("\n") + "\n";
  }
  function exportCsv() {
    const url = URL.createObjectURL(new Blob([csv()], {type: "text/csv"}));
    const a = document.createElement("a");
    a.href = url;
    a.download = "labels-" + run + ".csv";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 10000);
  }

  list.addEventListener("click", function (e) {
    const b = e.target.closest("button[data-l]");
    if (b) mark(b.closest(".rv"), b.dataset.l);
  });
  list.addEventListener("keydown", function (e) {
    const li = e.target.closest(".rv");
    if (!li || e.altKey || e.ctrlKey || e.metaKey) return;
    const k = e.key.toLowerCase();
    if (KEYS[k]) mark(li, KEYS[k]);
    else if (k === "u") mark(li, "");
    else if (k === "j" || k === "arrowdown" || k === "arrowright") go(neighbour(li, 1));
    else if (k === "k" || k === "arrowup" || k === "arrowleft") go(neighbour(li, -1));
    else return;
    e.preventDefault();
  });
  document.getElementById("rv-filter").addEventListener("change", applyFilter);
  document.getElementById("rv-sort").addEventListener("change", function () { applySort(); applyFilter(); });
  document.getElementById("rv-export").addEventListener("click", exportCsv);
  document.getElementById("rv-first").addEventListener("click", function () { go(visible()[0]); });
  items.forEach(show);
  progress();
  applySort();
  applyFilter();
  window.cxrReview = {csv: csv, reviewed: function () { return Object.keys(marks).length; }};
})();
"""


def review_html(work: Worklist, *, run_dir: str, run_id: str) -> str:
    """The worklist section (HTML, its own ``<style>`` and ``<script>``)."""
    n_flagged = sum(1 for i in work.items if i.selection == "flagged")
    n_random = len(work.items) - n_flagged
    notes = [
        f"<p>{n_flagged} flagged studies (every flagged study, most suspicious first) and "
        f"{n_random} unflagged ones drawn at random (seeded; --review-sample {work.sample}) from the "
        f"run's {work.unflagged_total} unflagged scored studies (column <code>selection</code>). "
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
        f"<style>{REVIEW_CSS}</style>"
        f'<section id="review" data-run="{html.escape(run_id)}" data-header="{CSV_HEADER}">'
        f"<h2>Review worklist ({len(work.items)} studies)</h2>{''.join(notes)}{bar}"
        f'<ol id="rv-list" aria-label="studies to review">{body}</ol></section>'
        f"<script>{REVIEW_JS}</script>"
    )
