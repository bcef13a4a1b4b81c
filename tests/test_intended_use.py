"""The intended-use block: the issue's six-file case, every field's reason, missing tags,
the research override, and the block inside model cards."""

from __future__ import annotations

import json

import pytest

from cxr_ray.errors import ConfigError, ModelError
from cxr_ray.imaging.dicom import DicomHeader, read_header
from cxr_ray.imaging.preprocess import PreprocessSpec, decode
from cxr_ray.models.card import ModelCard
from cxr_ray.models.intended_use import (
    INTENDED_USE_FIELDS,
    IntendedUse,
    UseCheck,
    use_columns,
    with_intended_use,
)
from tests import dicom_factory as factory

POLICY = IntendedUse()
CHILD_PA = DicomHeader(modality="DX", body_part_examined="CHEST", view_position="PA", patient_age_years=4.0)


def _with(**changes: object) -> DicomHeader:
    from dataclasses import replace

    return replace(CHILD_PA, **changes)  # type: ignore[arg-type]


def test_six_file_case_from_real_images():
    """The issue's acceptance case: the PA and the AP are scored, four are skipped, each with
    the reason a radiographer reads."""
    expected = {
        "pa": ("in_scope", None),
        "lateral": ("out_of_scope", "view LL is outside the model's intended use (PA, AP)"),
        "ap_mono1": ("in_scope", None),
        "adult": ("out_of_scope", "patient age 45 years is outside the model's intended use (0-17 years)"),
        "ct": ("out_of_scope", "modality CT is outside the model's intended use (CR, DX)"),
        "hand": ("out_of_scope", "body part HAND is outside the model's intended use (CHEST)"),
    }
    spec = PreprocessSpec(height=64, width=64)
    got = {}
    for inst in factory.six_file_case():
        header = read_header(inst.data)
        check = POLICY.check(header)
        got[inst.key] = (check.outcome, check.reason)
        assert check.scored == (inst.expect == "ok")
        if check.scored:  # the in-scope ones decode (MONOCHROME1 12-bit included)
            assert decode(inst.data, spec, name=inst.filename).pixels.shape == (64, 64)
    assert got == expected


def test_every_field_and_several_at_once():
    assert POLICY.check(CHILD_PA) == UseCheck("in_scope")
    assert POLICY.check(_with(modality="CR", view_position="AP", patient_age_years=0.0)).outcome == "in_scope"
    check = POLICY.check(_with(modality="MR", view_position="RL", patient_age_years=30.2))
    assert check.outcome == "out_of_scope" and not check.scored
    assert check.reason == (
        "modality MR is outside the model's intended use (CR, DX); "
        "view RL is outside the model's intended use (PA, AP); "
        "patient age 30 years is outside the model's intended use (0-17 years)"
    )


@pytest.mark.parametrize(
    ("years", "inside", "words"),
    [
        (0.0, True, None),
        (5 / 365.25, True, None),
        (17.0, True, None),
        (17.99, True, None),  # 17 years 11 months is 17 in completed years
        (18.0, False, "18 years"),
        (45.0, False, "45 years"),
    ],
)
def test_age_boundaries(years, inside, words):
    check = POLICY.check(_with(patient_age_years=years))
    assert check.scored is inside
    if words is not None:
        assert check.reason == f"patient age {words} is outside the model's intended use (0-17 years)"


def test_age_words_for_infants():
    policy = IntendedUse(min_age_years=1)
    assert policy.check(_with(patient_age_years=0.5)).reason == (
        "patient age 6 months is outside the model's intended use (1-17 years)"
    )
    assert policy.check(_with(patient_age_years=10 / 365.25)).reason == (
        "patient age 10 days is outside the model's intended use (1-17 years)"
    )
    assert IntendedUse(min_age_years=0.5, max_age_years=12).age_range() == "0.5-12 years"


def test_body_part_synonyms():
    for part in ("CHEST", "THORAX", "LUNG"):
        assert POLICY.check(_with(body_part_examined=part)).outcome == "in_scope", part
    check = POLICY.check(_with(body_part_examined="CHEST_LAT"))
    assert check.reason == "body part CHEST_LAT is outside the model's intended use (CHEST)"
    strict = IntendedUse(body_part_aliases={})
    assert strict.check(_with(body_part_examined="THORAX")).outcome == "out_of_scope"


def test_missing_tags_are_scored_with_a_note():
    check = POLICY.check(_with(view_position=None, patient_age_years=None))
    assert check.outcome == "unchecked" and check.scored and check.reason is None
    assert check.missing == ("view", "patient age")
    assert check.note == "intended use not fully checked: no view, patient age in the DICOM header"
    # A violation wins over missing tags: the CT without a view is skipped.
    ct = POLICY.check(_with(modality="CT", view_position=None))
    assert ct.outcome == "out_of_scope" and ct.missing == ("view",)
    assert ct.reason == "modality CT is outside the model's intended use (CR, DX)"
    # Not a DICOM file (JPEG/PNG): nothing to check, scored.
    jpeg = POLICY.check(None)
    assert jpeg.outcome == "unchecked" and jpeg.scored and "not a DICOM file" in (jpeg.note or "")
    assert jpeg.missing == ("modality", "body part", "view", "patient age")


def test_research_override_scores_and_records():
    check = POLICY.check(_with(view_position="LL"), enforce=False)
    assert check.outcome == "overridden" and check.scored
    assert check.reason == "view LL is outside the model's intended use (PA, AP)"
    assert check.note == (
        "scored by the research override although view LL is outside the model's intended use (PA, AP)"
    )
    # In-scope and unchecked images are unaffected by the override.
    assert POLICY.check(CHILD_PA, enforce=False).outcome == "in_scope"
    assert POLICY.check(None, enforce=False).outcome == "unchecked"


def test_policy_validation():
    p = IntendedUse(modalities=("cr", " dx "), views=("pa",), body_part_aliases={"thorax": "chest"})
    assert p.modalities == ("CR", "DX") and p.views == ("PA",) and p.body_part_aliases == {"THORAX": "CHEST"}
    assert p.check(_with(view_position="AP")).reason == "view AP is outside the model's intended use (PA)"
    for bad in ({"views": ()}, {"modalities": ("",)}, {"min_age_years": 10, "max_age_years": 5}, {"x": 1}):
        with pytest.raises(ValueError):
            IntendedUse(**bad)  # type: ignore[arg-type]
    assert "view PA, AP" in POLICY.describe() and "0-17 years" in POLICY.describe()


def test_use_columns():
    cols = use_columns([POLICY.check(CHILD_PA), POLICY.check(None), None])
    assert [f.name for f in INTENDED_USE_FIELDS] == list(cols)
    assert cols["intended_use"].to_pylist() == ["in_scope", "unchecked", None]
    assert cols["intended_use_note"].to_pylist()[0] is None
    assert "not a DICOM file" in cols["intended_use_note"].to_pylist()[1]


def _card(**kw: object) -> ModelCard:
    return ModelCard(
        arch="mobilenet_v2",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        target_layer="features.18",
        weights_sha256="0" * 64,
        **kw,  # type: ignore[arg-type]
    )


def test_card_carries_the_block_and_old_cards_load():
    card = _card()
    assert card.intended_use_policy == IntendedUse()
    assert card.intended_use.startswith("Research and triage")  # the free text stays
    # A card written before the block existed: the pediatric default.
    old = json.loads(card.to_json())
    del old["intended_use_policy"]
    assert ModelCard.from_json(json.dumps(old)).intended_use_policy == IntendedUse()
    # Edited per artifact, saved and read back.
    wider = with_intended_use(card, max_age_years=21, views=["PA", "AP", "LL"])
    assert (
        wider.intended_use_policy.views == ("PA", "AP", "LL")
        and wider.intended_use_policy.max_age_years == 21
    )
    assert card.intended_use_policy.max_age_years == 17  # the original is untouched (frozen)
    again = ModelCard.from_json(wider.to_json())
    assert again == wider
    assert (
        again.intended_use_policy.check(_with(view_position="LL", patient_age_years=20)).outcome == "in_scope"
    )


def test_bad_edits_are_refused():
    card = _card()
    with pytest.raises(ConfigError, match="max_age_years"):
        with_intended_use(card, min_age_years=5, max_age_years=2)
    with pytest.raises(ConfigError, match="colour"):
        with_intended_use(card, colour="red")
    bad = json.loads(card.to_json())
    bad["intended_use_policy"]["views"] = []
    with pytest.raises(ModelError, match=r"intended_use_policy\.views"):
        ModelCard.from_json(json.dumps(bad))


# -- issue 24, defect 7: present but malformed tags fail closed -------------------------------

MALFORMED = [
    ("PatientAge", "45", "patient age"),
    ("PatientAge", "0045Y", "patient age"),
    ("PatientAge", "-5Y", "patient age"),
    ("PatientAge", "45 years", "patient age"),
    ("Modality", "CT\x01", "modality"),
    ("ViewPosition", "LL\x7f", "view"),
    ("BodyPartExamined", "CHEST\x1b[2J", "body part"),
]


def _malformed_dicom(keyword: str, value: str) -> bytes:
    """A pediatric PA chest DX whose ``keyword`` holds ``value`` as written (no validation)."""
    import io

    import pydicom

    good = factory.make_image(factory.real_jpegs(1)[0], factory.Tags(modality="DX"))
    ds = pydicom.dcmread(io.BytesIO(good))
    ds[keyword].value = value
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(("keyword", "value", "field"), MALFORMED)
def test_malformed_tag_is_its_own_outcome_and_skipped(keyword, value, field):
    """A tag that is there but cannot be read is not "missing": the image is ``unparseable``,
    skipped, and the reason names the tag, says it is malformed and shows the value
    sanitised (control characters escaped, never raw)."""
    header = read_header(_malformed_dicom(keyword, value))
    assert keyword in header.malformed_tags
    check = POLICY.check(header)
    assert check.outcome == "unparseable" and not check.scored
    assert check.reason is not None and keyword in check.reason and "malformed" in check.reason
    assert all(c.isprintable() for c in check.reason)
    assert "missing" not in check.reason and "no " + field not in check.reason
    assert check.note == check.reason  # the row's note says what was found too
    # The operator may opt in (a setting of the intended-use block): scored, still recorded.
    opted = IntendedUse(score_unparseable=True).check(header)
    assert opted.outcome == "unparseable" and opted.scored and keyword in (opted.note or "")
    # The research override scores it too, and says so.
    override = POLICY.check(header, enforce=False)
    assert override.outcome == "unparseable" and override.scored and "override" in (override.note or "")


def test_a_violation_beats_a_malformed_tag_and_good_tags_stay_in_scope():
    header = read_header(_malformed_dicom("PatientAge", "45"))
    from dataclasses import replace

    lateral = replace(header, view_position="LL")
    check = POLICY.check(lateral)
    assert check.outcome == "out_of_scope" and "view LL" in (check.reason or "")
    assert "PatientAge" in (check.reason or "")
    good = read_header(factory.make_image(factory.real_jpegs(1)[0], factory.Tags(modality="DX")))
    assert good.malformed_tags == () and POLICY.check(good).outcome == "in_scope"


def test_decode_stage_skips_an_unparseable_image():
    """End to end through the scoring stage: a skipped row, never decoded."""
    import pyarrow as pa

    from cxr_ray.data.sources import RAW_SCHEMA
    from cxr_ray.scoring.stages import decode_stage

    data = _malformed_dicom("PatientAge", "45 years")
    raw = pa.table(
        {"uri": ["a.dcm"], "name": ["a.dcm"], "data": [data], "error": [None], "label": [None]},
        schema=RAW_SCHEMA,
    )
    out = decode_stage(raw, spec=PreprocessSpec(height=32, width=32), intended_use=POLICY)
    assert out["status"].tolist() == ["skipped"] and not out["decoded"][0]
    assert out["intended_use"].tolist() == ["unparseable"]
    assert "PatientAge" in out["error"][0] and "PatientAge" in out["intended_use_note"][0]


def test_score_unparseable_flag_through_the_cli(ray_local, tiny_artifact, tmp_path):
    """``PatientAge=0045Y`` via ``cxr-ray score``: skipped by default; scored with
    ``--score-unparseable``, the outcome and the opt-in recorded per row and in summary.json."""
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from cxr_ray.cli import main

    src = tmp_path / "dicoms"
    src.mkdir()
    (src / "age_0045Y.dcm").write_bytes(_malformed_dicom("PatientAge", "0045Y"))
    (src / "good.dcm").write_bytes(factory.make_image(factory.real_jpegs(1)[0], factory.Tags(modality="DX")))
    env = {"CXR_SCORE__CACHE_DIR": str(tmp_path / "cache")}

    def run(out: str, *flags: str) -> dict[str, dict[str, object]]:
        args = ["score", str(src), "--model", str(tiny_artifact), "--out", str(tmp_path / out), *flags]
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 0, result.output
        rows = pq.read_table(tmp_path / out / "predictions.parquet").to_pylist()
        return {str(r["uri"]).rsplit("/", 1)[-1]: r for r in rows}

    default = run("default")
    bad = default["age_0045Y.dcm"]
    assert bad["status"] == "skipped" and bad["intended_use"] == "unparseable"
    assert "PatientAge" in (bad["intended_use_note"] or "") and "PatientAge" in (bad["error"] or "")
    assert default["good.dcm"]["status"] == "ok" and default["good.dcm"]["intended_use"] == "in_scope"
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert summary["settings"]["score"]["score_unparseable"] is False

    opted = run("opted", "--score-unparseable")
    bad = opted["age_0045Y.dcm"]
    assert bad["status"] == "ok" and bad["intended_use"] == "unparseable"
    assert bad["prob_pneumonia"] is not None
    assert "opt-in" in (bad["intended_use_note"] or "") and "PatientAge" in (bad["intended_use_note"] or "")
    summary = json.loads((tmp_path / "opted" / "summary.json").read_text())
    assert summary["settings"]["score"]["score_unparseable"] is True
    # The same flag on the other scoring commands (and so on their jobs, which reuse them).
    for command in ("screen", "nightly"):
        shown = CliRunner().invoke(main, [command, "--help"])
        assert "--score-unparseable" in shown.output, command
