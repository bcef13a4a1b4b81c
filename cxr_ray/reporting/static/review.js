// The review worklist: the only code a reviewer's browser runs, so small and readable on purpose.
// Inlined into the self-contained report by cxr_ray/reporting/review.py (works from file://).
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
