"""What the model card says matches what scoring enforces (cxr_ray.reporting.card_md,
``ModelCard.intended_use_statement``), and the report says "unchecked" for JPEG-only runs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cxr_ray.models.card import _LEGACY_PURPOSE, PURPOSE, intended_use_prose
from cxr_ray.models.intended_use import IntendedUse, with_intended_use
from cxr_ray.reporting import card_md
from cxr_ray.reporting.report import _intended_use_html


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    from cxr_ray.models.artifact import read_card
    from tests.conftest import make_artifact

    return read_card(str(make_artifact(tmp_path_factory.mktemp("card") / "model", input_size=64)))


def _render(card) -> str:
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 10)
    probs = rng.dirichlet([1, 1, 1], size=len(y))
    return card_md.render(card, y, probs, n_boot=20)


def _intended_use_paragraph(md: str) -> str:
    return md.split("\n\n")[1]


def test_card_states_the_enforced_block(card):
    md = _render(card)
    use = _intended_use_paragraph(md)
    policy = card.intended_use_policy
    assert policy.age_range() == "0-17 years"
    assert "patients 0-17 years" in use and "view PA or AP" in use and "modality CR or DX" in use
    # The stale prose (an age range and a view scoring did not enforce) is gone everywhere.
    assert "1-5 years" not in use and "anterior-posterior" not in use
    assert "still receive a prediction" not in md
    assert "is skipped with the reason, not scored" in use
    assert policy.describe() in md  # the limitations quote the same block


def test_changing_the_block_changes_the_card(card):
    wider = with_intended_use(card, max_age_years=21, views=("PA",))
    use = _intended_use_paragraph(_render(wider))
    assert "patients 0-21 years" in use and "view PA." in use and "AP" not in use.split("view PA")[1][:3]
    assert "0-17" not in use


def test_legacy_purpose_is_replaced_by_the_generated_scope(card):
    old = card.model_copy(update={"intended_use": _LEGACY_PURPOSE})
    text = old.intended_use_statement
    assert "1-5 years" not in text and text.startswith(PURPOSE)
    assert text.endswith(intended_use_prose(old.intended_use_policy))
    # A purpose someone wrote on purpose is kept.
    own = card.model_copy(update={"intended_use": "Research only."})
    assert own.intended_use_statement.startswith("Research only. Intended use (enforced")


def test_prose_for_a_policy_that_admits_lateral_and_ct():
    text = intended_use_prose(IntendedUse(modalities=("CR", "CT"), views=("PA", "LL")))
    assert "a lateral view" not in text and "another modality such as CT" not in text
    assert "modality CR or CT, view PA or LL" in text


def _table(statuses: list[str], uses: list[str | None]) -> pa.Table:
    return pa.table(
        {
            "status": pa.array(statuses, pa.string()),
            "error": pa.array([None] * len(statuses), pa.string()),
            "intended_use": pa.array(uses, pa.string()),
            "intended_use_note": pa.array(
                [("intended use not checked: not a DICOM file" if u == "unchecked" else None) for u in uses],
                pa.string(),
            ),
        }
    )


def test_report_says_unchecked_for_jpeg_only_runs():
    page = _intended_use_html(_table(["ok"] * 3, ["unchecked"] * 3))
    assert "intended use was unchecked" in page
    assert "every image was inside" not in page


def test_report_counts_unchecked_among_checked_images():
    page = _intended_use_html(_table(["ok"] * 3, ["in_scope", "in_scope", "unchecked"]))
    assert "1 of 3 scored images were unchecked" in page
    assert "every image was inside" not in page
    page = _intended_use_html(_table(["ok"] * 2, ["in_scope", "in_scope"]))
    assert "every image was inside the model&#x27;s intended use" in page
