"""The intended-use block of a model card, and the check of one image's DICOM header against it.

A model reads only what it was trained for: this pediatric frontal chest model, CR/DX
radiographs of the chest, PA or AP, patients 0-17 years old. ``check`` decides per image:

- ``in_scope``: every checked tag is inside the block: scored.
- ``out_of_scope``: a tag is outside it: the row is ``skipped``, the reason names the field
  and the allowed values (``view LL is outside the model's intended use (PA, AP)``).
- ``unchecked``: no violation, but tags are missing (or the input is JPEG/PNG, which has no
  tags): scored, with a note naming the missing fields.
- ``overridden``: outside, but the research override (``enforce=False``) scores it anyway;
  the note records what was outside.
- ``unparseable``: no violation, but a checked tag is present and malformed (``PatientAge``
  ``45`` or ``0045Y``, ``Modality`` with a control character): the gate fails closed, the
  row is ``skipped`` and the reason names the tag and shows its value sanitised, unless the
  operator opted in (``score_unparseable`` in the block) or the research override is on;
  then it is scored, and the note says so. A malformed tag is never reported as missing.

Values are compared as DICOM code strings (upper case). ``BodyPartExamined`` in the wild is
not always ``CHEST``: ``body_part_aliases`` maps the common synonyms (``THORAX``, ``LUNG``,
``TORAX``) onto it; anything else (``CHEST_LAT``, ``ABDOMEN``, ``HAND``) is outside. Ages are
in completed years, as ``PatientAge`` states them: ``0-17 years`` admits 17 years 11 months
and refuses an 18th birthday.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cxr_ray.errors import ConfigError
from cxr_ray.imaging.dicom import DicomHeader

#: A ``ModelCard`` (not imported: the card imports this module).
CardT = TypeVar("CardT", bound=BaseModel)

__all__ = [
    "INTENDED_USE_FIELDS",
    "OUTCOMES",
    "IntendedUse",
    "Outcome",
    "UseCheck",
    "use_columns",
    "with_intended_use",
]

Outcome = Literal["in_scope", "out_of_scope", "unchecked", "overridden", "unparseable"]
#: The values of the ``intended_use`` column (the module docstring says what each means).
OUTCOMES: tuple[str, ...] = get_args(Outcome)

#: Columns a predictions table gets from ``UseCheck``s (see ``use_columns``).
INTENDED_USE_FIELDS: list[pa.Field] = [
    # in_scope | out_of_scope | unchecked | overridden (outside, scored by the research override)
    # | unparseable (a checked tag present but malformed: skipped unless opted in)
    pa.field("intended_use", pa.string()),
    # why (unchecked: the missing fields; overridden: what was outside; unparseable: which tag
    # was malformed, its value sanitised); the skip reason of a skipped row is its ``error``
    pa.field("intended_use_note", pa.string()),
]

_DEFAULT_ALIASES = {"THORAX": "CHEST", "LUNG": "CHEST", "TORAX": "CHEST"}


def _codes(values: tuple[str, ...]) -> tuple[str, ...]:
    out = tuple(v.strip().upper() for v in values)
    if not out or any(not v for v in out):
        raise ValueError("must list at least one non-empty value")
    return out


class IntendedUse(BaseModel):
    """What a model may read; stored in the model card (``intended_use_policy``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: DICOM ``Modality`` values.
    modalities: tuple[str, ...] = ("CR", "DX")
    #: DICOM ``BodyPartExamined`` values (after ``body_part_aliases``).
    body_parts: tuple[str, ...] = ("CHEST",)
    #: Synonyms found in archives -> the value they stand for.
    body_part_aliases: dict[str, str] = Field(default_factory=lambda: dict(_DEFAULT_ALIASES))
    #: DICOM ``ViewPosition`` values (or the ``ViewCodeSequence`` code mapped to them).
    views: tuple[str, ...] = ("PA", "AP")
    #: Patient age range in completed years, both ends included.
    min_age_years: float = Field(default=0.0, ge=0)
    max_age_years: float = Field(default=17.0, ge=0)
    #: Score images whose checked tags are present but malformed (``unparseable``) instead of
    #: skipping them: the operator's opt-in, recorded in every such row's note.
    score_unparseable: bool = False

    @field_validator("modalities", "body_parts", "views")
    @classmethod
    def _upper(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _codes(v)

    @field_validator("body_part_aliases")
    @classmethod
    def _upper_aliases(cls, v: dict[str, str]) -> dict[str, str]:
        return {k.strip().upper(): a.strip().upper() for k, a in v.items()}

    @model_validator(mode="after")
    def _age_range(self) -> IntendedUse:
        if self.min_age_years > self.max_age_years:
            raise ValueError(f"min_age_years {self.min_age_years} > max_age_years {self.max_age_years}")
        return self

    def describe(self) -> str:
        """One line for model cards and reports."""
        return (
            f"modality {', '.join(self.modalities)}; body part {', '.join(self.body_parts)}; "
            f"view {', '.join(self.views)}; patient age {self.age_range()}"
        )

    def age_range(self) -> str:
        return f"{_num(self.min_age_years)}-{_num(self.max_age_years)} years"

    def check(self, header: DicomHeader | None, *, enforce: bool = True) -> UseCheck:
        """Where ``header`` (``None``: not a DICOM file) stands against this block.

        ``enforce=False`` is the research override: an image outside is ``overridden``
        (scored, the note says what was outside) instead of ``out_of_scope``.
        """
        if header is None:
            return UseCheck(
                "unchecked",
                note="intended use not checked: not a DICOM file (no modality, body part, view or age tags)",
                missing=_FIELDS,
            )
        reasons, missing = self._violations(header)
        bad = getattr(header, "malformed", ())
        malformed = [f"{keyword} is present but malformed ('{shown}')" for keyword, shown in bad]
        if reasons:
            reason = "; ".join(reasons + malformed)
            if enforce:
                return UseCheck("out_of_scope", reason=reason, missing=tuple(missing), skipped=True)
            return UseCheck(
                "overridden",
                reason=reason,
                note=f"scored by the research override although {reason}",
                missing=tuple(missing),
            )
        if malformed:
            found = "; ".join(malformed) + ": the intended use cannot be checked"
            if enforce and not self.score_unparseable:
                return UseCheck("unparseable", reason=found, note=found, missing=tuple(missing), skipped=True)
            why = "the research override" if not enforce else "the operator's opt-in (score_unparseable)"
            return UseCheck("unparseable", note=f"scored by {why} although {found}", missing=tuple(missing))
        if missing:
            return UseCheck(
                "unchecked",
                note=f"intended use not fully checked: no {', '.join(missing)} in the DICOM header",
                missing=tuple(missing),
            )
        return UseCheck("in_scope")

    def _violations(self, header: DicomHeader) -> tuple[list[str], list[str]]:
        """(reasons a tag is outside, fields the header lacks); a malformed tag is neither."""
        reasons: list[str] = []
        missing: list[str] = []
        bad = set(getattr(header, "malformed_tags", ()))
        values: tuple[tuple[str, str, str | None, tuple[str, ...]], ...] = (
            ("modality", "Modality", header.modality, self.modalities),
            ("body part", "BodyPartExamined", self._body_part(header.body_part_examined), self.body_parts),
            ("view", "ViewPosition", header.view_position, self.views),
        )
        for name, keyword, value, allowed in values:
            if value is None:
                if keyword not in bad:
                    missing.append(name)
            elif value not in allowed:
                shown = header.body_part_examined if name == "body part" else value
                reasons.append(f"{name} {shown} is outside the model's intended use ({', '.join(allowed)})")
        age = header.patient_age_years
        if age is None:
            if "PatientAge" not in bad:
                missing.append("patient age")
        elif not (self.min_age_years <= age and math.floor(age) <= self.max_age_years):
            reasons.append(
                f"patient age {_age_words(age)} is outside the model's intended use ({self.age_range()})"
            )
        return reasons, missing

    def _body_part(self, value: str | None) -> str | None:
        return None if value is None else self.body_part_aliases.get(value, value)


_FIELDS = ("modality", "body part", "view", "patient age")


@dataclass(frozen=True, slots=True)
class UseCheck:
    """The outcome of ``IntendedUse.check`` for one image."""

    outcome: Outcome
    #: Every violated field in words (out_of_scope, overridden): the skip reason.
    reason: str | None = None
    #: The row's ``intended_use_note`` (unchecked, overridden).
    note: str | None = None
    #: Fields the header lacked ("modality", "body part", "view", "patient age").
    missing: tuple[str, ...] = ()
    #: Not scored: ``out_of_scope``, and ``unparseable`` unless opted in or overridden.
    skipped: bool = False

    @property
    def scored(self) -> bool:
        """Whether the image is scored."""
        return not self.skipped


def use_columns(checks: list[UseCheck | None]) -> dict[str, pa.Array]:
    """``INTENDED_USE_FIELDS`` columns for rows with these checks (``None``: not checked,
    e.g. an unreadable file, which is an error row)."""
    return {
        "intended_use": pa.array([None if c is None else c.outcome for c in checks], pa.string()),
        "intended_use_note": pa.array([None if c is None else c.note for c in checks], pa.string()),
    }


def with_intended_use(card: CardT, **changes: Any) -> CardT:
    """A copy of ``card`` with its intended-use block changed (validated), e.g. to widen the
    age range of one artifact: ``with_intended_use(card, max_age_years=21)``."""
    policy = getattr(card, "intended_use_policy", None)
    if not isinstance(policy, IntendedUse):
        raise TypeError(f"{type(card).__name__} has no intended-use block")
    try:
        new = IntendedUse.model_validate({**policy.model_dump(), **changes})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(intended use)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid intended use: {problems}") from None
    return card.model_copy(update={"intended_use_policy": new})


def _num(x: float) -> str:
    return f"{x:g}"


def _age_words(years: float) -> str:
    """An age the way a radiographer would say it: ``45 years``, ``18 months``, ``10 days``."""
    if years >= 2:
        return f"{math.floor(years)} years"
    if years >= 1 / 12:
        months = math.floor(round(years * 12, 6))
        return f"{months} month{'s' if months != 1 else ''}"
    days = round(years * 365.25)
    return f"{days} day{'s' if days != 1 else ''}"
