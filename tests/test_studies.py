"""Study-level results: hand-computed cases, each rule, edge tables, and a reference check."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxr_ray.labels import LABELS
from cxr_ray.metrics import classification_metrics
from cxr_ray.scoring.schema import PREDICTIONS_SCHEMA
from cxr_ray.scoring.studies import KEY_KINDS, STUDIES_SCHEMA, study_metrics, study_table

PROBS = [f"prob_{label}" for label in LABELS]


def _rows(*rows: dict) -> pa.Table:
    """Predictions rows; unspecified columns are null, probabilities from ``p`` (3 values)."""
    cols = [
        "image_id",
        "uri",
        "patient_id",
        "label",
        "status",
        "study_instance_uid",
        "view_position",
        "accession_number",
        "study_date",
        *PROBS,
        "prob_pneumonia",
        "pred_label",
        "flagged",
        "model_version",
        "run_id",
    ]
    out: dict[str, list] = {c: [] for c in cols}
    for r in rows:
        r = dict(r)
        p = r.pop("p", None)
        if p is not None:
            r.update(dict(zip(PROBS, p, strict=True)))
            r["prob_pneumonia"] = p[1] + p[2]
            r["pred_label"] = LABELS[int(np.argmax(p))]
            r["flagged"] = p[1] + p[2] >= 0.5
        r.setdefault("status", "ok" if p is not None else "error")
        r.setdefault("model_version", "m1")
        r.setdefault("run_id", "r1")
        for c in cols:
            out[c].append(r.get(c))
    types = {"study_date": pa.date32(), "flagged": pa.bool_(), **{c: pa.float32() for c in PROBS}}
    types["prob_pneumonia"] = pa.float32()
    return pa.table({c: pa.array(v, type=types.get(c, pa.string())) for c, v in out.items()})


def _by_key(studies: pa.Table) -> dict[str, dict]:
    return {r["study_key"]: r for r in studies.to_pylist()}


def test_hand_computed_archive():
    preds = _rows(
        # Study 1.2.3: a PA and a lateral scored, a lateral skipped, all labelled alike.
        dict(image_id="a", uri="s/a.dcm", patient_id="P1", study_instance_uid="1.2.3", view_position="PA",
             p=(0.5, 0.3, 0.2), label="normal", accession_number="ACC1", study_date=dt.date(2026, 11, 30)),
        dict(image_id="b", uri="s/b.dcm", patient_id="P1", study_instance_uid="1.2.3", view_position="LL",
             p=(0.1, 0.5, 0.4), label="normal", accession_number="ACC1", study_date=dt.date(2026, 11, 30)),
        dict(image_id="c", uri="s/c.dcm", patient_id="P1", study_instance_uid="1.2.3", view_position="LL",
             status="skipped", label="normal"),
        # Study 1.2.4: an AP and an unreadable file of the same study (by its UID).
        dict(image_id="d", uri="s/d.dcm", patient_id="P2", study_instance_uid="1.2.4", view_position="AP",
             p=(0.2, 0.7, 0.1), label="bacterial"),
        dict(image_id="e", uri="s/e.dcm", patient_id="P2", study_instance_uid="1.2.4", status="error"),
        # A JPEG patient: two images, one study by patient id, labels disagree.
        dict(image_id="f", uri="j/person9_virus_1.jpeg", patient_id="person9", p=(0.1, 0.2, 0.7),
             label="viral"),
        dict(image_id="g", uri="j/person9_bacteria_2.jpeg", patient_id="person9", p=(0.6, 0.3, 0.1),
             label="bacterial"),
        # No patient id: its own image; unreadable without an image id: its uri.
        dict(image_id="h", uri="j/IMG.png", p=(0.9, 0.05, 0.05)),
        dict(image_id=None, uri="j/broken.jpeg", status="error"),
    )  # fmt: skip
    studies = study_table(preds)
    assert studies.schema == STUDIES_SCHEMA
    assert studies.num_rows == 5
    s = _by_key(studies)

    a = s["1.2.3"]
    assert (a["study_key_kind"], a["images"], a["scored"], a["skipped"], a["errors"]) == (
        "study_instance_uid", 3, 2, 1, 0
    )  # fmt: skip
    # The PA drives (frontal first), although the lateral's P(pneumonia) is higher.
    assert (a["driving_image_id"], a["driving_uri"], a["pred_label"]) == ("a", "s/a.dcm", "normal")
    assert a["prob_pneumonia"] == pytest.approx(0.5) and a["prob_normal"] == pytest.approx(0.5)
    assert a["flagged"] is True and a["label"] == "normal"
    assert (a["patient_id"], a["accession_number"], a["study_date"]) == ("P1", "ACC1", dt.date(2026, 11, 30))
    assert (a["study_instance_uid"], a["model_version"], a["run_id"]) == ("1.2.3", "m1", "r1")

    b = s["1.2.4"]
    assert (b["images"], b["scored"], b["errors"], b["driving_image_id"], b["label"]) == (
        2,
        1,
        1,
        "d",
        "bacterial",
    )
    assert b["pred_label"] == "bacterial" and b["prob_bacterial"] == pytest.approx(0.7)

    p9 = s["person9"]
    assert (p9["study_key_kind"], p9["images"], p9["study_instance_uid"]) == ("patient_id", 2, None)
    assert p9["driving_image_id"] == "f" and p9["prob_pneumonia"] == pytest.approx(0.9)
    assert p9["label"] is None  # viral and bacterial disagree

    assert s["h"]["study_key_kind"] == "image_id" and s["h"]["flagged"] is False
    broken = s["j/broken.jpeg"]
    assert (broken["study_key_kind"], broken["images"], broken["errors"], broken["scored"]) == (
        "uri",
        1,
        1,
        0,
    )
    assert broken["prob_pneumonia"] is None and broken["flagged"] is None and broken["driving_uri"] is None
    # Deterministic order: by key kind, then key.
    assert [(r["study_key_kind"], r["study_key"]) for r in studies.to_pylist()] == sorted(
        (r["study_key_kind"], r["study_key"]) for r in studies.to_pylist()
    )


def test_driving_image_rules():
    def driving(*rows: dict) -> str | None:
        return study_table(_rows(*(dict(r, study_instance_uid="9.9") for r in rows)))["driving_image_id"][
            0
        ].as_py()

    # Highest P(pneumonia) among frontal views; the view order PA/AP does not matter.
    assert driving(dict(image_id="x", view_position="PA", p=(0.6, 0.2, 0.2)),
                   dict(image_id="y", view_position="AP", p=(0.3, 0.4, 0.3))) == "y"  # fmt: skip
    # Ties: the smallest image id, whatever the row order.
    tie = [dict(image_id=i, view_position="AP", p=(0.5, 0.25, 0.25)) for i in ("q", "k", "z")]
    assert driving(*tie) == driving(*reversed(tie)) == "k"
    # Frontal before unrecorded view before any other (research-override) view.
    assert driving(dict(image_id="lat", view_position="LL", p=(0.0, 1.0, 0.0)),
                   dict(image_id="unk", p=(0.5, 0.5, 0.0)),
                   dict(image_id="pa", view_position="PA", p=(0.9, 0.05, 0.05))) == "pa"  # fmt: skip
    assert driving(dict(image_id="lat", view_position="LL", p=(0.0, 1.0, 0.0)),
                   dict(image_id="unk", p=(0.9, 0.1, 0.0))) == "unk"  # fmt: skip
    # Skipped and error rows never drive; a study with none scored has no result.
    assert driving(dict(image_id="s", status="skipped", view_position="LL"), dict(image_id="e")) is None
    # Which views count as frontal is a parameter (the intended-use block's views).
    preds = _rows(
        dict(image_id="pa", study_instance_uid="1", view_position="PA", p=(0.9, 0.05, 0.05)),
        dict(image_id="ll", study_instance_uid="1", view_position="LL", p=(0.1, 0.8, 0.1)),
    )
    assert study_table(preds, frontal_views=("PA", "AP", "LL"))["driving_image_id"][0].as_py() == "ll"


def test_labels_agree_or_null():
    def label(*labels: str | None) -> str | None:
        rows = [dict(image_id=str(i), patient_id="P", label=lab, p=(1, 0, 0)) for i, lab in enumerate(labels)]
        return study_table(_rows(*rows))["label"][0].as_py()

    assert label("viral", None, "viral") == "viral"  # unlabelled images do not disagree
    assert label("viral", "normal") is None
    assert label(None, None) is None


def test_key_rule_order():
    preds = _rows(
        dict(image_id="i1", uri="u1", patient_id="P", study_instance_uid="1.2", p=(1, 0, 0)),
        dict(image_id="i2", uri="u2", patient_id="P", p=(1, 0, 0)),
        dict(image_id="i3", uri="u3", p=(1, 0, 0)),
        dict(uri="u4"),
    )
    got = {(r["study_key_kind"], r["study_key"]) for r in study_table(preds).to_pylist()}
    assert got == {("study_instance_uid", "1.2"), ("patient_id", "P"), ("image_id", "i3"), ("uri", "u4")}
    assert {k for k, _ in got} == set(KEY_KINDS)


def test_empty_error_only_and_old_tables():
    empty = study_table(PREDICTIONS_SCHEMA.empty_table())
    assert empty.num_rows == 0 and empty.schema == STUDIES_SCHEMA
    errors = study_table(_rows(dict(image_id="a", uri="a"), dict(image_id=None, uri="b")))
    assert errors.num_rows == 2 and errors["scored"].to_pylist() == [0, 0]
    assert errors["errors"].to_pylist() == [1, 1] and errors["prob_pneumonia"].null_count == 2
    # A predictions table of an older run (no DICOM columns): grouped by patient, then image.
    old = _rows(dict(image_id="a", patient_id="P", p=(0.2, 0.5, 0.3)), dict(image_id="b", p=(1, 0, 0)))
    old = old.drop_columns(["study_instance_uid", "view_position", "accession_number", "study_date"])
    studies = study_table(old)
    assert studies["study_key_kind"].to_pylist() == ["image_id", "patient_id"]
    assert studies.schema == STUDIES_SCHEMA


def test_parquet_round_trip(tmp_path):
    studies = study_table(_rows(dict(image_id="a", study_instance_uid="1.2", p=(0.2, 0.5, 0.3))))
    pq.write_table(studies, tmp_path / "studies.parquet")
    assert pq.read_table(tmp_path / "studies.parquet").equals(studies)


def test_study_metrics_match_the_driving_images():
    preds = _rows(
        dict(image_id="a", study_instance_uid="1", view_position="PA", p=(0.7, 0.2, 0.1), label="normal"),
        dict(image_id="b", study_instance_uid="1", view_position="LL", p=(0.1, 0.8, 0.1), label="normal"),
        dict(image_id="c", study_instance_uid="2", view_position="AP", p=(0.1, 0.6, 0.3), label="bacterial"),
        dict(image_id="d", study_instance_uid="3", view_position="AP", p=(0.3, 0.3, 0.4), label="bacterial"),
        dict(image_id="e", study_instance_uid="4", view_position="AP", p=(0.2, 0.2, 0.6)),  # unlabelled
        dict(image_id="f", study_instance_uid="5", status="skipped", label="viral"),  # not scored
    )
    m = study_metrics(study_table(preds), threshold=0.4)
    assert m is not None and m.n == 3
    expected = classification_metrics(
        np.array([0, 1, 1]), np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]]), threshold=0.4
    )
    assert m.accuracy == pytest.approx(2 / 3) and m.accuracy == pytest.approx(expected.accuracy)
    assert m.confusion == expected.confusion and m.binary["threshold"] == 0.4
    assert study_metrics(study_table(_rows(dict(image_id="a", p=(1, 0, 0))))) is None
    assert study_metrics(study_table(PREDICTIONS_SCHEMA.empty_table())) is None


def _reference(preds: pa.Table) -> dict[tuple[str, str], dict]:
    """The documented rules, one study at a time in plain Python."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in preds.to_pylist():
        for kind in KEY_KINDS:
            if r[kind] is not None:
                groups.setdefault((kind, r[kind]), []).append(r)
                break
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        rank = {"PA": 0, "AP": 0, None: 1}
        ok.sort(
            key=lambda r: (rank.get(r["view_position"], 2), -r["prob_pneumonia"], r["image_id"], r["uri"])
        )
        labels = {r["label"] for r in rs} - {None}
        out[key] = {
            "images": len(rs),
            "scored": len(ok),
            "skipped": sum(r["status"] == "skipped" for r in rs),
            "errors": sum(r["status"] == "error" for r in rs),
            "driving_image_id": ok[0]["image_id"] if ok else None,
            "label": labels.pop() if len(labels) == 1 else None,
            "accession_number": min(
                (r["accession_number"] for r in rs if r["accession_number"]), default=None
            ),
        }
    return out


def test_matches_the_reference_on_a_random_archive():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3000):
        study = int(rng.integers(0, 400))
        p = rng.dirichlet([1, 1, 1]).round(2)  # rounded: ties happen
        rows.append(
            dict(
                image_id=f"img{int(rng.integers(0, 10**6)):07d}",
                uri=f"u/{i}",
                patient_id=f"P{study % 150}" if rng.random() < 0.8 else None,
                study_instance_uid=f"1.2.{study}" if rng.random() < 0.6 else None,
                view_position=rng.choice(["PA", "AP", "LL", None]),
                label=rng.choice([*LABELS, None]),
                accession_number=rng.choice(["A1", "A2", None]),
                status=rng.choice(["ok", "ok", "ok", "skipped", "error"]),
                p=tuple(float(x) for x in p),
            )
        )
    preds = _rows(*rows)
    # error/skipped rows carry no probabilities
    scored = pa.compute.equal(preds["status"], "ok")
    for c in [*PROBS, "prob_pneumonia", "flagged", "pred_label"]:
        preds = preds.set_column(
            preds.schema.get_field_index(c),
            c,
            pa.compute.if_else(scored, preds[c], pa.scalar(None, preds[c].type)),
        )
    got = {(r["study_key_kind"], r["study_key"]): r for r in study_table(preds).to_pylist()}
    ref = _reference(preds)
    assert set(got) == set(ref)
    for key, want in ref.items():
        assert {k: got[key][k] for k in want} == want, key
    assert not any(math.isnan(r["prob_pneumonia"]) for r in got.values() if r["prob_pneumonia"] is not None)
