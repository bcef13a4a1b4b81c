from collections import Counter

import pyarrow as pa
import pytest

from cxr_ray.data.splits import data_fingerprint, split_manifest
from cxr_ray.errors import DataError


def _synthetic(n_patients=60, seed=0):
    import random

    rnd = random.Random(seed)
    rows = []
    for p in range(n_patients):
        label = ["normal", "bacterial", "viral"][p % 3]
        for k in range(rnd.randint(1, 4)):
            rows.append(
                {
                    "uri": f"/x/{p}_{k}.jpeg",
                    "image_id": f"{p:04d}{k}",
                    "label": label,
                    "patient_id": f"person{p}",
                    "status": "ok",
                }
            )
    rows.append(
        {
            "uri": "/x/bad.jpeg",
            "image_id": None,
            "label": "normal",
            "patient_id": None,
            "status": "error",
        }
    )
    rows.append({"uri": "/x/unl.jpeg", "image_id": "u", "label": None, "patient_id": None, "status": "ok"})
    return pa.Table.from_pylist(rows)


def _patients(t, split):
    return {r["patient_id"] for r in t.to_pylist() if r["split"] == split}


def test_grouped_deterministic_and_order_independent():
    t = _synthetic()
    a = split_manifest(t, val_fraction=0.2, seed=1)
    b = split_manifest(t.take(list(reversed(range(t.num_rows)))), val_fraction=0.2, seed=1)
    assert a.equals(b)
    assert not _patients(a, "train") & _patients(a, "val")
    assert a.num_rows == t.num_rows - 2  # error and unlabelled rows are not split
    assert split_manifest(t, val_fraction=0.2, seed=2).column("split") != a.column("split")


def test_copies_of_one_image_stay_together():
    t = pa.Table.from_pylist(
        [
            {
                "uri": f"/x/{i}",
                "image_id": "same" if i < 2 else f"id{i}",
                "label": "normal",
                "patient_id": None,
                "status": "ok",
            }
            for i in range(40)
        ]
    )
    s = split_manifest(t, val_fraction=0.25)
    splits = [r["split"] for r in s.to_pylist() if r["image_id"] == "same"]
    assert len(set(splits)) == 1


def test_too_few_patients():
    t = _synthetic(n_patients=3)
    with pytest.raises(DataError, match="too few"):
        split_manifest(t, val_fraction=0.15)


@pytest.mark.data
def test_real_split_has_no_patient_overlap_and_balanced_classes(kermany_manifest):
    s = split_manifest(kermany_manifest, val_fraction=0.15, seed=0)
    rows = s.to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert len(train) + len(val) == 5216
    assert 0.12 < len(val) / 5216 < 0.18
    train_p = {r["patient_id"] for r in train}
    val_p = {r["patient_id"] for r in val}
    assert not train_p & val_p, "a patient appears in both splits"
    ct, cv = Counter(r["label"] for r in train), Counter(r["label"] for r in val)
    for label in ("normal", "bacterial", "viral"):
        assert abs(ct[label] / len(train) - cv[label] / len(val)) < 0.02, label


def test_fingerprint_depends_on_content_only():
    t = _synthetic().filter(pa.compute.equal(_synthetic()["status"], "ok"))
    assert data_fingerprint(t) == data_fingerprint(t.take(list(reversed(range(t.num_rows)))))
    assert data_fingerprint(t) != data_fingerprint(t.slice(1))


def test_a_class_too_rare_for_the_folds_is_a_clear_error_not_a_traceback():
    # 6 images of each class, one per patient: 18 patients pass the patient check, but a
    # 7-fold stratified split cannot put a viral image in every fold (sklearn's ValueError).
    rows = [
        {"uri": f"/x/{c}{i}.jpeg", "image_id": f"{c}{i}", "label": c, "patient_id": f"{c}{i}", "status": "ok"}
        for c in ("normal", "bacterial", "viral")
        for i in range(6)
    ]
    with pytest.raises(DataError, match=r"the rarest class has only 6 images.*7-fold"):
        split_manifest(pa.Table.from_pylist(rows), val_fraction=0.15)
