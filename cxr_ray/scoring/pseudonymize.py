"""Keyed pseudonymisation of output tables for research exports, and redaction for logs.

A hospital needs the real identifiers in its own outputs (to find the flagged study); a
research export must not carry them but must still join: the same patient, study or image
maps to the same pseudonym in every table and every run made with the same key, and nobody
without the key can recompute or reverse the mapping (HMAC-SHA256, RFC 2104).

What becomes what (nulls stay null):

- UIDs (``study_instance_uid``, ``series_instance_uid``, ``sop_instance_uid``): a valid
  DICOM UID under the ``2.25`` root (PS3.5 B.2): ``2.25.`` + the decimal integer of the first
  128 bits of the HMAC, with the RFC 9562 version-8 bits set, at most 44 characters. All UID
  columns share one namespace, so a study UID maps identically wherever it appears.
- ``patient_id``, ``accession_number``: the first 16 hex digits of the HMAC (fits the 16
  characters of the DICOM SH type); each column has its own namespace.
- URIs (``uri``, ``driving_uri``, ``heatmap_uri``; on by default, ``include_uris=False`` keeps
  them): ``pseudonymized:`` + 24 hex digits, because paths carry names and ids (Kermany's
  ``person1000_bacteria_2931.jpeg`` holds the patient id).
- ``studies.parquet``'s ``study_key`` follows its ``study_key_kind`` (a UID, a patient id, a
  URI, or an ``image_id``, which is a hash of the bytes and is kept).

Levels (``score.pseudonymize_level``):

- ``basic`` (the default): the above; ``error``, ``intended_use_note`` and ``delivery_error``
  texts lose anything quoted, path-like or UID-shaped (``error_code`` is a closed vocabulary
  and kept). Kept as they are: ``image_id`` (a SHA-256 of the file bytes: whoever holds the
  file can find its row), exact ``study_date``, ``patient_age_years``, ``patient_sex``,
  ``manufacturer`` and the acquisition columns.
- ``strict``: also ``study_date`` shifted by a keyed per-patient offset (-365..+365 days, the
  same for every row of one patient, so intervals within a patient survive),
  ``patient_age_years`` replaced by the lower edge of its band (0, 1, 5, 12, 18, 65 years),
  ``image_id`` keyed (HMAC, 64 hex digits: still joins across tables, no longer a hash of the
  bytes), ``patient_sex`` and ``manufacturer`` nulled. Kept: modality, view, body part, pixel
  spacing, image geometry, predictions, run columns.

The key is bytes, at least 16 of them; the command line reads it from settings or the
environment and refuses to run without one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.errors import ConfigError

__all__ = [
    "ID_COLUMNS",
    "MIN_KEY_BYTES",
    "TEXT_COLUMNS",
    "UID_COLUMNS",
    "URI_COLUMNS",
    "pseudonym_id",
    "pseudonym_uid",
    "pseudonym_uri",
    "pseudonymize_table",
    "redact",
]

MIN_KEY_BYTES = 16
LEVELS = ("basic", "strict")
#: Lower edges (years) of the age bands of the strict level.
AGE_BANDS = (0.0, 1.0, 5.0, 12.0, 18.0, 65.0)
_DROPPED_STRICT = ("patient_sex", "manufacturer")
UID_COLUMNS: tuple[str, ...] = ("study_instance_uid", "series_instance_uid", "sop_instance_uid")
ID_COLUMNS: tuple[str, ...] = ("patient_id", "accession_number")
URI_COLUMNS: tuple[str, ...] = ("uri", "driving_uri", "heatmap_uri")
#: Free-text columns: quoted, path-like and UID-shaped text cut out (``safe_error``).
TEXT_COLUMNS: tuple[str, ...] = ("error", "intended_use_note", "delivery_error")


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"the pseudonymisation key must be at least {MIN_KEY_BYTES} bytes "
            "(e.g. 32 random bytes: python -c 'import secrets; print(secrets.token_hex(32))')"
        )


def _digest(key: bytes, namespace: str, value: str) -> bytes:
    return hmac.new(key, f"{namespace}\0{value}".encode(), hashlib.sha256).digest()


def pseudonym_uid(value: str, key: bytes) -> str:
    """A stable, valid-looking DICOM UID for ``value`` under ``key``.

    >>> pseudonym_uid("1.2.840.1", b"k" * 16).startswith("2.25.")
    True
    """
    b = bytearray(_digest(key, "uid", value)[:16])
    b[6] = (b[6] & 0x0F) | 0x80  # UUID version 8 (custom), RFC 9562
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122/9562 variant
    return f"2.25.{int.from_bytes(b, 'big')}"


def pseudonym_id(value: str, key: bytes, namespace: str = "patient_id") -> str:
    """16 hex digits standing for ``value`` (a patient id or accession number)."""
    return _digest(key, namespace, value).hex()[:16]


def pseudonym_uri(value: str, key: bytes) -> str:
    return "pseudonymized:" + _digest(key, "uri", value).hex()[:24]


def _map_unique(arr: pa.Array, fn: Callable[[str], str]) -> pa.Array:
    """``fn`` applied once per distinct value (HMAC in Python, but never once per row)."""
    encoded = pc.dictionary_encode(arr.cast(pa.string()))
    mapped = pa.array([None if v is None else fn(v) for v in encoded.dictionary.to_pylist()], pa.string())
    return mapped.take(encoded.indices)


def _mappers(key: bytes) -> dict[str, Callable[[str], str]]:
    mappers: dict[str, Callable[[str], str]] = {c: (lambda v: pseudonym_uid(v, key)) for c in UID_COLUMNS}
    mappers["patient_id"] = lambda v: pseudonym_id(v, key, "patient_id")
    mappers["accession_number"] = lambda v: pseudonym_id(v, key, "accession_number")
    mappers["uri"] = lambda v: pseudonym_uri(v, key)
    return mappers


def pseudonymize_table(
    table: pa.Table, key: bytes, *, include_uris: bool = True, level: str = "basic"
) -> pa.Table:
    """``table`` (predictions, studies or manifest) with its identifiers pseudonymised at
    ``level`` (``basic`` or ``strict``, see the module docstring).

    Columns it does not have are ignored; the schema (names, types, order) is unchanged.
    """
    _check_key(key)
    if level not in LEVELS:
        raise ConfigError(f"unknown pseudonymisation level {level!r}; choose one of {', '.join(LEVELS)}")
    key = bytes(key)
    mappers = _mappers(key)
    targets = [*UID_COLUMNS, *ID_COLUMNS, *(URI_COLUMNS if include_uris else ())]
    out = _strict(table, key) if level == "strict" else table
    for name in TEXT_COLUMNS:  # free text: scrubbed (cxr-ray's own texts carry no identifier)
        if name in out.column_names:
            i = out.schema.get_field_index(name)
            texts = _map_unique(out.column(name).combine_chunks(), safe_error)
            out = out.set_column(i, out.schema.field(name), texts.cast(out.schema.field(name).type))
    for name in targets:
        if name not in table.column_names:
            continue
        fn = mappers["uri"] if name in URI_COLUMNS else mappers[name]
        mapped = _map_unique(table.column(name).combine_chunks(), fn)
        i = out.schema.get_field_index(name)
        out = out.set_column(i, out.schema.field(name), mapped.cast(out.schema.field(name).type))
    if "study_key" in table.column_names and "study_key_kind" in table.column_names:
        out = _pseudonymize_study_key(out, table, mappers, include_uris)
    return out


def _pseudonymize_study_key(
    out: pa.Table, table: pa.Table, mappers: dict[str, Callable[[str], str]], include_uris: bool
) -> pa.Table:
    study_key = table.column("study_key").combine_chunks()
    kind = table.column("study_key_kind").combine_chunks()
    result = study_key
    for kind_name, mapper in (
        ("study_instance_uid", "study_instance_uid"),
        ("patient_id", "patient_id"),
        *((("uri", "uri"),) if include_uris else ()),
    ):
        result = pc.if_else(pc.equal(kind, kind_name), _map_unique(study_key, mappers[mapper]), result)
    i = out.schema.get_field_index("study_key")
    return out.set_column(i, out.schema.field("study_key"), result.cast(out.schema.field("study_key").type))


_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){2,}(?!\w|\.\d)")


def redact(text: str, identifiers: Iterable[str | None] = ()) -> str:
    """``text`` without identifiers, for logs, summaries and error messages.

    Every value in ``identifiers`` (a row's patient id, accession number, file name, ...;
    values under 3 characters are too common to replace safely) becomes ``<redacted>``, and
    anything shaped like a DICOM UID (five or more dotted numbers, or three or more with a
    long one, as in ``2.25.<uuid>``; addresses and versions stay) becomes ``<uid>``.

    >>> redact("no study 1.2.840.113619.2.55 for patient P12345", ["P12345"])
    'no study <uid> for patient <redacted>'
    """
    for value in sorted({v for v in identifiers if v and len(v) >= 3}, key=len, reverse=True):
        text = text.replace(value, "<redacted>")
    return _UID.sub(_uid_or_address, text)


def _uid_or_address(m: re.Match[str]) -> str:
    parts = m.group(0).split(".")
    # Keep addresses and versions (127.0.0.1, 2.60.0): UIDs have 5+ components or long ones.
    short = len(parts) < 5 and all(len(p) <= 5 for p in parts)
    return m.group(0) if short else "<uid>"


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATHLIKE = re.compile(r"\S*[/\\]\S*")


def safe_error(text: str) -> str:
    """An error text without quoted values, path-like tokens or UIDs (a last line of defence:
    cxr-ray's own texts carry none)."""
    return redact(_PATHLIKE.sub("<path>", _QUOTED.sub("<value>", text)))


def _date_shift_days(key: bytes, subject: str) -> int:
    return int.from_bytes(_digest(key, "date_shift", subject)[:4], "big") % 731 - 365


def _subjects(table: pa.Table) -> list[str]:
    """Per row, whose date offset applies: the patient, else the study, else the image."""
    cols = [c for c in ("patient_id", "study_instance_uid", "image_id", "uri") if c in table.column_names]
    values = [table.column(c).to_pylist() for c in cols]
    return [
        next((f"{c}:{v}" for c, v in zip(cols, row, strict=True) if v), "")
        for row in zip(*values, strict=True)
    ]


def _strict(table: pa.Table, key: bytes) -> pa.Table:
    """The strict level's extra replacements (run before the identifiers are keyed)."""
    import datetime

    out = table
    n = table.num_rows

    def put(name: str, values: list[object]) -> None:
        nonlocal out
        i = out.schema.get_field_index(name)
        out = out.set_column(i, out.schema.field(name), pa.array(values, out.schema.field(name).type))

    if "study_date" in table.column_names and n:
        subjects = _subjects(table)
        dates = table.column("study_date").to_pylist()
        put(
            "study_date",
            [
                None if d is None else d + datetime.timedelta(days=_date_shift_days(key, s))
                for d, s in zip(dates, subjects, strict=True)
            ],
        )
    if "patient_age_years" in table.column_names:
        ages = table.column("patient_age_years").to_pylist()
        put(
            "patient_age_years",
            [None if a is None or a != a else max(b for b in AGE_BANDS if b <= max(a, 0.0)) for a in ages],
        )
    if "image_id" in table.column_names:
        i = out.schema.get_field_index("image_id")
        keyed = _map_unique(
            out.column("image_id").combine_chunks(), lambda v: _digest(key, "image_id", v).hex()
        )
        out = out.set_column(i, out.schema.field("image_id"), keyed.cast(out.schema.field("image_id").type))
    for name in _DROPPED_STRICT:
        if name in out.column_names:
            put(name, [None] * n)
    return out
