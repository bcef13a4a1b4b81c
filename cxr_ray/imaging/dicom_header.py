"""The DICOM header cxr-ray carries: study identity and the acquisition tags, pixels unread.

``read_header`` parses the header only (``stop_before_pixels``, and only the tags listed in
``_TAGS``), so the intended-use check and the study identifiers cost about a millisecond, a
fraction of a decode, and never touch the pixel data. Its errors are identifier-free: they
say what was wrong, never a tag value.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from cxr_ray.errors import DecodeError
from cxr_ray.io.columns import column

__all__ = [
    "DICOM_FIELDS",
    "DICOM_FIELD_DOCS",
    "DicomHeader",
    "header_columns",
    "parse_age",
    "quiet_pydicom",
    "read_header",
]

#: Strings longer than this are corrupt, not identifiers (the longest string VRs read here,
#: LO and UI, allow 64 characters): a hostile 10 MB "PatientID" becomes null.
_MAX_STR = 256
#: Ages above this are corrupt values, not very old patients.
_MAX_AGE_YEARS = 150.0


@dataclass(frozen=True, slots=True)
class DicomHeader:
    """The header tags cxr-ray carries, by their DICOM keywords in snake_case; all nullable.

    Strings are stripped of DICOM padding (code strings also upper-cased); a value that is
    absent, empty or unparseable is ``None``. Derived fields: ``view_position`` falls back to
    ``ViewCodeSequence`` (DICOM CID 4010 codes), ``body_part_examined`` to
    ``AnatomicRegionSequence``, ``patient_age_years`` to ``PatientBirthDate`` and the study
    date, ``pixel_spacing`` (row, column mm) to ``ImagerPixelSpacing``.
    """

    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None
    study_date: dt.date | None = None
    modality: str | None = None
    body_part_examined: str | None = None
    view_position: str | None = None
    patient_age_years: float | None = None
    patient_sex: str | None = None
    manufacturer: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    photometric_interpretation: str | None = None
    transfer_syntax_uid: str | None = None
    rows: int | None = None
    columns: int | None = None
    bits_stored: int | None = None
    number_of_frames: int | None = None
    #: Intended-use tags (``MALFORMED_CHECKED``) that are present but unreadable: ``(keyword,
    #: the value shown safely)``, e.g. ``("PatientAge", "45 years")``; never "missing".
    malformed: tuple[tuple[str, str], ...] = ()

    @property
    def malformed_tags(self) -> tuple[str, ...]:
        """The keywords of ``malformed``."""
        return tuple(keyword for keyword, _ in self.malformed)


# (column, Arrow type, documentation). ``patient_id`` is not here: the predictions table
# already has it, and ``header_columns`` fills it from the tag, file-name parsing second.
_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("study_instance_uid", pa.string(), "StudyInstanceUID (0020,000D): the study the image belongs to"),
    ("series_instance_uid", pa.string(), "SeriesInstanceUID (0020,000E)"),
    ("sop_instance_uid", pa.string(), "SOPInstanceUID (0008,0018): this image's own UID"),
    ("sop_class_uid", pa.string(), "SOPClassUID (0008,0016): CR, DX, secondary capture, ..."),
    ("accession_number", pa.string(), "AccessionNumber (0008,0050): the order in the RIS"),
    ("study_date", pa.date32(), "StudyDate (0008,0020)"),
    ("modality", pa.string(), "Modality (0008,0060): CR, DX, CT, ..."),
    (
        "body_part_examined",
        pa.string(),
        "BodyPartExamined (0018,0015), else the AnatomicRegionSequence code (chest codes -> CHEST)",
    ),
    (
        "view_position",
        pa.string(),
        "ViewPosition (0018,5101): PA, AP, LL, RL...; else mapped from the ViewCodeSequence code",
    ),
    (
        "patient_age_years",
        pa.float32(),
        "PatientAge (0010,1010; 004Y, 018M, 010W, 005D) in years, else from PatientBirthDate and StudyDate",
    ),
    ("patient_sex", pa.string(), "PatientSex (0010,0040): M, F or O"),
    ("manufacturer", pa.string(), "Manufacturer (0008,0070)"),
    ("pixel_spacing_row_mm", pa.float32(), "PixelSpacing (0028,0030), else ImagerPixelSpacing: rows"),
    ("pixel_spacing_col_mm", pa.float32(), "PixelSpacing (0028,0030), else ImagerPixelSpacing: columns"),
    ("photometric_interpretation", pa.string(), "PhotometricInterpretation (0028,0004)"),
    ("transfer_syntax_uid", pa.string(), "TransferSyntaxUID (0002,0010) of the file"),
    ("rows", pa.int32(), "Rows (0028,0010)"),
    ("columns", pa.int32(), "Columns (0028,0011)"),
    ("bits_stored", pa.int32(), "BitsStored (0028,0101)"),
    ("number_of_frames", pa.int32(), "NumberOfFrames (0028,0008); null for single-frame objects"),
)

#: Units of the DICOM columns that have one.
_UNITS = {
    "patient_age_years": "years",
    "pixel_spacing_row_mm": "mm",
    "pixel_spacing_col_mm": "mm",
    "rows": "pixels",
    "columns": "pixels",
    "bits_stored": "bits",
}
#: The DICOM columns of the manifest and predictions tables (all nullable; null for JPEG/PNG),
#: each carrying its description (and unit) as field metadata (``cxr_ray.io.columns``).
DICOM_FIELDS: list[pa.Field] = [
    column(name, typ, (doc, _UNITS[name]) if name in _UNITS else doc) for name, typ, doc in _COLUMNS
]
#: ``column -> description`` of ``DICOM_FIELDS`` (for the docs and reports).
DICOM_FIELD_DOCS: dict[str, str] = {name: doc for name, _, doc in _COLUMNS}


def header_columns(
    headers: Sequence[DicomHeader | None], patient_ids: Sequence[str | None] | None = None
) -> dict[str, pa.Array]:
    """``DICOM_FIELDS`` columns (and ``patient_id``) for rows with these headers.

    ``None`` stands for a non-DICOM or unreadable input: all its columns are null.
    ``patient_id`` is the PatientID tag where there is one, else ``patient_ids[i]`` (the id
    parsed from the file name), so JPEG/PNG rows keep theirs.
    """
    if patient_ids is not None and len(patient_ids) != len(headers):
        raise ValueError(f"{len(patient_ids)} patient ids for {len(headers)} headers")

    def values(attr: str) -> list[Any]:
        return [None if h is None else getattr(h, attr) for h in headers]

    spacing = values("pixel_spacing")
    derived: dict[str, list[Any]] = {
        "pixel_spacing_row_mm": [None if s is None else s[0] for s in spacing],
        "pixel_spacing_col_mm": [None if s is None else s[1] for s in spacing],
    }
    out = {
        f.name: pa.array(derived[f.name] if f.name in derived else values(f.name), type=f.type)
        for f in DICOM_FIELDS
    }
    tag_ids = values("patient_id")
    fallback = patient_ids if patient_ids is not None else [None] * len(headers)
    out["patient_id"] = pa.array(
        [t if t is not None else f for t, f in zip(tag_ids, fallback, strict=True)], type=pa.string()
    )
    return out


# Every tag read (top level; the rest of the header is skipped, never loaded).
_TAGS = tuple(
    """SpecificCharacterSet SOPClassUID SOPInstanceUID StudyDate SeriesDate AcquisitionDate
    ContentDate AccessionNumber Modality Manufacturer PatientID PatientBirthDate PatientSex
    PatientAge BodyPartExamined ViewPosition StudyInstanceUID SeriesInstanceUID
    ImagerPixelSpacing NumberOfFrames PhotometricInterpretation Rows Columns PixelSpacing
    BitsStored AnatomicRegionSequence ViewCodeSequence""".split()  # noqa: SIM905
)

# ViewCodeSequence code values (DICOM CID 4010 "DX View": SNOMED CT, the legacy SNOMED-RT
# ids, and RadLex) -> ViewPosition terms. Code values of the three schemes never collide.
_VIEW_CODES: dict[str, str] = {
    "272479007": "PA",  # postero-anterior
    "R-40888": "PA",
    "R-10214": "PA",  # the SNOMED-RT id older CID 4010 editions (and many devices) use
    "RID43594": "PA",
    "399348003": "AP",  # antero-posterior
    "R-10206": "AP",
    "RID43583": "AP",
    "399173006": "LL",  # left lateral
    "R-10236": "LL",
    "399198007": "RL",  # right lateral
    "R-10232": "RL",
    "399067008": "LATERAL",
    "R-102CD": "LATERAL",
    "RID43591": "LATERAL",
}
# Code meanings (lower case, letters only) for codes outside the table above.
_VIEW_MEANINGS: dict[str, str] = {
    "pa": "PA",
    "posteroanterior": "PA",
    "ap": "AP",
    "anteroposterior": "AP",
    "leftlateral": "LL",
    "rightlateral": "RL",
    "lateral": "LATERAL",
}
# AnatomicRegionSequence codes for the chest (SNOMED CT "Thorax" and "Chest", SNOMED-RT, RadLex).
_CHEST_CODES = frozenset({"51185008", "43799004", "T-D3000", "RID1243"})


def read_header(data: bytes) -> DicomHeader:
    """The ``DicomHeader`` of a DICOM file's bytes, without reading its pixel data.

    Never raises on hostile input except ``DecodeError`` (not DICOM at all, or so corrupt
    nothing can be parsed); a truncated or partly corrupt header gives what can be read,
    with the unreadable fields ``None``.
    """
    try:
        with quiet_pydicom():
            ds = _parse(data)
            return _header(ds)
    except DecodeError:
        raise
    except Exception as exc:  # pydicom raises many types on corrupt data
        # Only the type: pydicom's messages can quote element values.
        raise DecodeError(
            f"unreadable DICOM header ({type(exc).__name__}): the file is truncated or corrupt"
        ) from None


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom without value validation: it warns *and logs* about every odd value, quoting
    it ("Invalid value for VR IS: 'DOE^JANE'"), and logs must carry no identifiers."""
    from pydicom import config

    with warnings.catch_warnings(), config.disable_value_validation():
        warnings.simplefilter("ignore")
        yield


def _parse(data: bytes) -> Any:
    import pydicom

    has_magic = data[128:132] == b"DICM"
    ds = pydicom.dcmread(
        io.BytesIO(data), force=not has_magic, stop_before_pixels=True, specific_tags=list(_TAGS)
    )
    _drop_truncated(ds, data)
    # force=True "parses" any bytes; a real header has file meta or one of the tags we read.
    found = _safe(lambda: "TransferSyntaxUID" in ds.file_meta) or any(
        _safe(lambda kw=kw: kw in ds) for kw in _TAGS[1:]
    )
    if not found:
        raise DecodeError(
            "DICOM header is empty (file truncated before its first element)"
            if has_magic
            else "not a DICOM file (no DICM marker and no DICOM image tags)"
        )
    return ds


#: pydicom's "undefined length" marker (sequences and encapsulated data).
_UNDEFINED = 0xFFFFFFFF
_TRANSFER_SYNTAX_TAG = 0x00020010


def _drop_truncated(ds: Any, data: bytes) -> None:
    """Remove every element whose value the file cut short (``read_header`` of a truncated file).

    pydicom keeps what it could read of the last element, so a file cut inside a value would
    yield its prefix (PatientID ``SECRET`` of ``SECRET-ID-42``, StudyInstanceUID ``1.2.``):
    a plausible, wrong value. An element read shorter than its declared length is dropped,
    so the field is ``None``. The file meta's transfer syntax is converted while pydicom
    reads (it chooses the encoding), so its raw length is read again from the file meta here.
    """
    from pydicom.dataelem import RawDataElement

    for dataset in (ds, _safe(lambda: ds.file_meta)):
        if dataset is None:
            continue
        for tag, elem in list(dataset._dict.items()):
            if isinstance(elem, RawDataElement) and _short(elem):
                del dataset._dict[tag]
    meta = _safe(lambda: ds.file_meta)
    if meta is not None and _TRANSFER_SYNTAX_TAG in meta._dict and _meta_syntax_truncated(data):
        del meta._dict[_TRANSFER_SYNTAX_TAG]


def _short(elem: Any) -> bool:
    """Whether a raw element's value is shorter than the length its header declares."""
    if elem.length == _UNDEFINED:
        return False
    value = elem.value
    return value is not None and isinstance(value, bytes | bytearray) and len(value) < elem.length


def _meta_syntax_truncated(data: bytes) -> bool:
    """Whether the file meta's TransferSyntaxUID element runs past the end of ``data``."""
    from pydicom.dataelem import RawDataElement
    from pydicom.filereader import data_element_generator

    start = 132 if data[128:132] == b"DICM" else 0
    if data[start : start + 2] != b"\x02\x00":
        return False
    elements = data_element_generator(
        io.BytesIO(data[start:]), False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2
    )
    try:
        for elem in elements:
            if elem.tag == _TRANSFER_SYNTAX_TAG:
                return isinstance(elem, RawDataElement) and _short(elem)
    except Exception:  # a meta pydicom cannot walk: the syntax is not to be trusted
        return True
    return False


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception:
        return None


def _raw(ds: Any, keyword: str) -> Any:
    """The element's value, or None when absent or unreadable (pydicom converts lazily)."""
    return _safe(lambda: ds.get(keyword))


def _text(value: Any, *, upper: bool = False) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).strip().strip("\x00").strip()
    if not text or len(text) > _MAX_STR or not text.isprintable():
        return None
    return text.upper() if upper else text


def _str(ds: Any, keyword: str, *, upper: bool = False) -> str | None:
    return _text(_raw(ds, keyword), upper=upper)


def _code_string(ds: Any, keyword: str) -> str | None:
    """A CS value upper-cased; only the first of several values."""
    value = _raw(ds, keyword)
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    return _text(value, upper=True)


def _int(ds: Any, keyword: str, lo: int, hi: int) -> int | None:
    value = _raw(ds, keyword)
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return n if lo <= n <= hi else None


def _date(value: Any) -> dt.date | None:
    text = _text(value)
    if text is None:
        return None
    digits = text.replace(".", "")  # ACR-NEMA wrote YYYY.MM.DD
    try:
        return dt.datetime.strptime(digits[:8], "%Y%m%d").date() if len(digits) == 8 else None
    except ValueError:
        return None


def _first_code(ds: Any, keyword: str) -> tuple[str | None, str | None]:
    """(CodeValue, CodeMeaning) of a code sequence's first item."""
    seq = _raw(ds, keyword)
    item = _safe(lambda: seq[0]) if seq is not None else None
    if item is None:
        return None, None
    return _text(_raw(item, "CodeValue"), upper=True), _text(_raw(item, "CodeMeaning"))


def _view(ds: Any) -> str | None:
    view = _code_string(ds, "ViewPosition")
    if view is not None:
        return view
    code, meaning = _first_code(ds, "ViewCodeSequence")
    if code is not None and code in _VIEW_CODES:
        return _VIEW_CODES[code]
    if meaning is not None:
        key = re.sub(r"[^a-z]", "", meaning.lower())
        return _VIEW_MEANINGS.get(key, meaning.upper())
    return None


def _body_part(ds: Any) -> str | None:
    part = _code_string(ds, "BodyPartExamined")
    if part is not None:
        return part
    code, meaning = _first_code(ds, "AnatomicRegionSequence")
    if code is not None and code in _CHEST_CODES:
        return "CHEST"
    return meaning.upper() if meaning is not None else None


_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$")
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def parse_age(value: str | None) -> float | None:
    """A DICOM age string (``004Y``, ``018M``, ``010W``, ``005D``) in years; None if invalid.

    >>> parse_age("018M")
    1.5
    """
    if not isinstance(value, str):
        return None
    m = _AGE.match(value.upper())
    if m is None:
        return None
    years = int(m.group(1)) * _UNIT_YEARS[m.group(2)]
    return years if years <= _MAX_AGE_YEARS else None


def _age_from_dates(birth: dt.date | None, on: dt.date | None) -> float | None:
    """Completed years plus the elapsed fraction of the current year (floor = age in years)."""
    if birth is None or on is None or on < birth:
        return None

    def birthday(year: int) -> dt.date:
        try:
            return birth.replace(year=year)
        except ValueError:  # born on 29 February
            return dt.date(year, 3, 1)

    years = on.year - birth.year - (birthday(on.year) > on)
    last, nxt = birthday(birth.year + years), birthday(birth.year + years + 1)
    age = years + (on - last).days / (nxt - last).days
    return age if age <= _MAX_AGE_YEARS else None


#: Tags the intended-use check reads, whose presence-but-unreadability is recorded.
MALFORMED_CHECKED = ("Modality", "BodyPartExamined", "ViewPosition", "PatientAge")
_SHOWN_CHARS = 16


def _shown(value: Any) -> str:
    """A tag value fit for a message: at most 16 characters, control characters escaped."""
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("latin-1")
    elif isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = text.strip(" \x00")
    cut = text[:_SHOWN_CHARS]
    safe = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else "?" for c in cut)
    return safe + ("..." if len(text) > _SHOWN_CHARS else "")


def _malformed(ds: Any) -> tuple[tuple[str, str], ...]:
    """The ``MALFORMED_CHECKED`` tags with a non-empty value that does not parse."""
    parsed = {
        "Modality": _code_string(ds, "Modality"),
        "BodyPartExamined": _code_string(ds, "BodyPartExamined"),
        "ViewPosition": _code_string(ds, "ViewPosition"),
        "PatientAge": parse_age(_str(ds, "PatientAge")),
    }
    out = []
    for keyword in MALFORMED_CHECKED:
        raw = _raw(ds, keyword)
        if parsed[keyword] is None and raw is not None and _shown(raw):
            out.append((keyword, _shown(raw)))
    return tuple(out)


def _spacing(ds: Any) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _raw(ds, keyword)
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if all(math.isfinite(v) and 0 < v < 1000 for v in (row, col)):
            return row, col
    return None


def _header(ds: Any) -> DicomHeader:
    study_date = _date(_raw(ds, "StudyDate"))
    age = parse_age(_str(ds, "PatientAge"))
    if age is None:
        on = study_date or next(
            (d for kw in ("SeriesDate", "AcquisitionDate", "ContentDate") if (d := _date(_raw(ds, kw)))),
            None,
        )
        age = _age_from_dates(_date(_raw(ds, "PatientBirthDate")), on)
    sex = _code_string(ds, "PatientSex")
    meta = _safe(lambda: ds.file_meta)
    syntax = _text(_safe(lambda: meta.get("TransferSyntaxUID"))) if meta is not None else None
    return DicomHeader(
        study_instance_uid=_str(ds, "StudyInstanceUID"),
        series_instance_uid=_str(ds, "SeriesInstanceUID"),
        sop_instance_uid=_str(ds, "SOPInstanceUID"),
        sop_class_uid=_str(ds, "SOPClassUID"),
        accession_number=_str(ds, "AccessionNumber"),
        patient_id=_str(ds, "PatientID"),
        study_date=study_date,
        modality=_code_string(ds, "Modality"),
        body_part_examined=_body_part(ds),
        view_position=_view(ds),
        patient_age_years=age,
        patient_sex=sex if sex in ("M", "F", "O") else None,
        manufacturer=_str(ds, "Manufacturer"),
        pixel_spacing=_spacing(ds),
        photometric_interpretation=_code_string(ds, "PhotometricInterpretation"),
        transfer_syntax_uid=syntax,
        rows=_int(ds, "Rows", 1, 65535),
        columns=_int(ds, "Columns", 1, 65535),
        bits_stored=_int(ds, "BitsStored", 1, 64),
        number_of_frames=_int(ds, "NumberOfFrames", 1, 2**31 - 1),
        malformed=_malformed(ds),
    )
