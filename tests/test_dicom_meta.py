"""DICOM headers: every carried tag, the fallbacks, age parsing, and hostile headers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
import math
import struct
import warnings

import numpy as np
import pyarrow as pa
import pytest

from cxr_ray.errors import DecodeError
from cxr_ray.imaging.dicom import (
    DICOM_FIELD_DOCS,
    DICOM_FIELDS,
    DicomHeader,
    decode_dicom,
    header_columns,
    parse_age,
    read_header,
)
from tests import dicom_factory as factory
from tests import imaging


@pytest.fixture(autouse=True)
def _no_warning_leaks():
    with warnings.catch_warnings():
        yield


def _dicom(pixels: np.ndarray | None = None, *, preamble: bool = True, **tags: object) -> bytes:
    """A CR file with exactly ``tags`` (pydicom keywords; a list of (code, scheme, meaning)
    for ``ViewCodeSequence`` / ``AnatomicRegionSequence``)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    warnings.simplefilter("ignore")  # pydicom warns when a test writes an odd value on purpose
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = factory.CR_IMAGE
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    if pixels is not None:
        ds.set_pixel_data(pixels, "MONOCHROME2", 8, generate_instance_uid=False)
    for keyword, value in tags.items():
        if keyword.endswith("Sequence"):
            items = []
            for code, scheme, meaning in value:  # type: ignore[attr-defined]
                item = Dataset()
                item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, scheme, meaning
                items.append(item)
            value = Sequence(items)
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=preamble)
    return buf.getvalue()


def test_real_pacs_export_header_carries_every_field():
    jpeg = factory.real_jpegs(1)[0]
    tags = factory.Tags(
        patient_id="CXR-7781",
        accession_number="ACC55012",
        study_date="20261130",
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.3",
        modality="DX",
        view_position="AP",
        patient_age="018M",
        patient_sex="M",
        pixel_spacing_mm=0.139,
    )
    h = read_header(factory.make_image(jpeg, tags, syntax="explicit", bits_stored=12))
    rows, cols = factory.gray_pixels(jpeg).shape
    assert h == DicomHeader(
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.3",
        sop_class_uid=factory.DX_FOR_PRESENTATION,
        accession_number="ACC55012",
        patient_id="CXR-7781",
        study_date=dt.date(2026, 11, 30),
        modality="DX",
        body_part_examined="CHEST",
        view_position="AP",
        patient_age_years=1.5,
        patient_sex="M",
        manufacturer="CXR-RAY TEST FACTORY",
        pixel_spacing=(0.139, 0.139),
        photometric_interpretation="MONOCHROME2",
        transfer_syntax_uid=factory.EXPLICIT_VR_LE,
        rows=rows,
        columns=cols,
        bits_stored=12,
        number_of_frames=None,
    )


def test_header_never_reads_pixel_data_and_decoder_still_works():
    pixels = (np.arange(64 * 48, dtype=np.uint32) % 256).astype(np.uint8).reshape(64, 48)
    data = _dicom(pixels, Modality="CR", ViewPosition="PA")
    assert np.array_equal(decode_dicom(data, max_pixels=10**6), pixels)
    # Pixel data cut off mid-way: the header is intact and read; the decoder refuses.
    cut = data[: len(data) - 1000]
    h = read_header(cut)
    assert (h.modality, h.view_position, h.rows, h.columns) == ("CR", "PA", 64, 48)
    with pytest.raises(DecodeError):
        decode_dicom(cut, max_pixels=10**6)


def test_file_without_preamble_and_minimal_file():
    h = read_header(imaging.dicom_bytes(preamble=False))
    assert h.modality == "CR" and h.photometric_interpretation == "MONOCHROME2"
    assert h.rows == h.columns == 256 and h.bits_stored == 12
    # Tags a minimal file lacks are None, not "" or errors.
    assert h.study_instance_uid is None and h.view_position is None and h.patient_age_years is None


@pytest.mark.parametrize(
    ("code", "scheme", "meaning", "view"),
    [
        ("272479007", "SCT", "postero-anterior", "PA"),
        ("R-40888", "SRT", "postero-anterior", "PA"),
        ("R-10214", "SNM3", "postero-anterior", "PA"),  # older CID 4010 editions
        ("399348003", "SCT", "antero-posterior", "AP"),
        ("R-10206", "SRT", "antero-posterior", "AP"),
        ("399173006", "SCT", "left lateral", "LL"),
        ("R-10232", "SRT", "right lateral", "RL"),
        ("399198007", "SCT", "right lateral", "RL"),
        ("399067008", "SCT", "lateral", "LATERAL"),
        ("RID43594", "RADLEX", "PA view", "PA"),
        ("99LOCAL1", "99LOCAL", "Postero-Anterior", "PA"),  # unknown code: the meaning decides
        ("399110001", "SCT", "tangential", "TANGENTIAL"),  # other views stay visible (and out)
    ],
)
def test_view_code_sequence_fallback(code, scheme, meaning, view):
    seq = [(code, scheme, meaning)]
    assert read_header(_dicom(ViewCodeSequence=seq)).view_position == view
    # An empty ViewPosition also falls back; a present one wins.
    assert read_header(_dicom(ViewPosition="", ViewCodeSequence=seq)).view_position == view
    assert read_header(_dicom(ViewPosition="ll ", ViewCodeSequence=seq)).view_position == "LL"


def test_body_part_falls_back_to_anatomic_region_code():
    chest = [("51185008", "SCT", "Thorax")]
    assert read_header(_dicom(AnatomicRegionSequence=chest)).body_part_examined == "CHEST"
    assert read_header(_dicom(AnatomicRegionSequence=[("T-D3000", "SRT", "Chest")])).body_part_examined == (
        "CHEST"
    )
    hand = [("85562004", "SCT", "Hand")]
    assert read_header(_dicom(AnatomicRegionSequence=hand)).body_part_examined == "HAND"
    assert read_header(_dicom(BodyPartExamined="hand", AnatomicRegionSequence=chest)).body_part_examined == (
        "HAND"
    )


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("004Y", 4.0),
        ("045Y", 45.0),
        ("018M", 1.5),
        ("010W", 70 / 365.25),
        ("005D", 5 / 365.25),
        ("17Y", 17.0),
        ("004y", 4.0),
        ("", None),
        ("Y", None),
        ("45", None),  # no unit: not guessed
        ("abcY", None),
        ("-04Y", None),
        ("999Y", None),  # beyond any human age: corrupt
        (None, None),
    ],
)
def test_parse_age(text, years):
    got = parse_age(text)
    assert got == (pytest.approx(years) if years is not None else None)


@pytest.mark.parametrize(
    ("birth", "study", "expected_floor", "expected"),
    [
        ("20200615", "20240614", 3, None),  # the day before the 4th birthday
        ("20200615", "20240615", 4, 4.0),  # the birthday
        ("20200229", "20230228", 2, None),  # leap-day birthdays count from 1 March
        ("20200229", "20230301", 3, 3.0),
        ("20261201", "20261201", 0, 0.0),  # born today
    ],
)
def test_age_from_birth_and_study_date(birth, study, expected_floor, expected):
    h = read_header(_dicom(PatientBirthDate=birth, StudyDate=study))
    assert h.patient_age_years is not None
    assert math.floor(h.patient_age_years) == expected_floor
    if expected is not None:
        assert h.patient_age_years == pytest.approx(expected)


def test_age_sources_in_order():
    # PatientAge wins; an invalid one falls back to the dates; the study date falls back to
    # the acquisition date; a birth date after the study is nonsense.
    h = read_header(_dicom(PatientAge="006Y", PatientBirthDate="20000101", StudyDate="20240101"))
    assert h.patient_age_years == 6.0
    h = read_header(_dicom(PatientAge="6 years", PatientBirthDate="20180101", StudyDate="20240101"))
    assert h.patient_age_years == pytest.approx(6.0)
    h = read_header(_dicom(PatientBirthDate="20180101", AcquisitionDate="20240101"))
    assert h.patient_age_years == pytest.approx(6.0) and h.study_date is None
    assert read_header(_dicom(PatientBirthDate="20250101", StudyDate="20240101")).patient_age_years is None


def test_pixel_spacing_sources_and_bad_values():
    assert read_header(_dicom(PixelSpacing=["0.139", "0.14"])).pixel_spacing == (0.139, 0.14)
    assert read_header(_dicom(ImagerPixelSpacing=["0.2", "0.2"])).pixel_spacing == (0.2, 0.2)
    both = _dicom(PixelSpacing=["0.1", "0.1"], ImagerPixelSpacing=["0.2", "0.2"])
    assert read_header(both).pixel_spacing == (0.1, 0.1)
    assert read_header(_dicom(PixelSpacing=["-1", "0.1"])).pixel_spacing is None
    assert read_header(_dicom(PixelSpacing="0.1")).pixel_spacing is None  # one value


def test_code_strings_and_dates_are_normalised():
    h = read_header(
        _dicom(
            Modality="dx", PatientSex="f", StudyDate="2024.03.05", BodyPartExamined="Chest", ViewPosition="pa"
        )
    )
    assert (h.modality, h.patient_sex, h.body_part_examined, h.view_position) == ("DX", "F", "CHEST", "PA")
    assert h.study_date == dt.date(2024, 3, 5)  # the ACR-NEMA dotted form
    bad = read_header(_dicom(StudyDate="20241399", PatientSex="X", NumberOfFrames="99999999999"))
    assert bad.study_date is None and bad.patient_sex is None and bad.number_of_frames is None


def test_huge_values_become_null_without_reading_them_all():
    h = read_header(_dicom(PatientID="P" * 1_000_000, AccessionNumber="A1", Modality="CR"))
    assert h.patient_id is None and h.accession_number == "A1" and h.modality == "CR"
    # Over the VR's length by far, or with control characters: corrupt, not an identifier.
    h = read_header(_dicom(PatientID="P" * 300, AccessionNumber="A\x01B", Manufacturer="M" * 200))
    assert h.patient_id is None and h.accession_number is None and h.manufacturer == "M" * 200


def _element(tag: tuple[int, int], vr: bytes, value: bytes, *, length: int | None = None) -> bytes:
    n = len(value) if length is None else length
    head = struct.pack("<HH", *tag) + vr
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return head + b"\0\0" + struct.pack("<I", n) + value
    return head + struct.pack("<H", n) + value


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a dicom file at all, just text\n" * 20,
        imaging.jpeg_bytes(64, 64),
        imaging.png_bytes(64, 64),
        np.random.default_rng(0).bytes(4096),
        b"\0" * 128 + b"DICM",  # the marker and nothing else
    ],
    ids=["empty", "text", "jpeg", "png", "random", "marker-only"],
)
def test_not_dicom_is_a_decode_error(data):
    with pytest.raises(DecodeError, match=r"not a DICOM file|header is empty"):
        read_header(data)


def test_hostile_headers_never_crash():
    """Every prefix and many byte flips of a real file: a header or a DecodeError, nothing else."""
    jpeg = factory.real_jpegs(1)[0]
    data = factory.make_image(jpeg, factory.Tags(patient_id="SECRET-ID-42", patient_name="DOE^JANE"))
    end = data.index(b"\xe0\x7f\x10\x00") + 64  # a little into the pixel data element
    cases = [data[:n] for n in range(0, end, 7)]
    rng = np.random.default_rng(1)
    for _ in range(300):
        mutated = bytearray(data[:end])
        for pos in rng.integers(132, end, size=3):
            mutated[pos] = int(rng.integers(0, 256))
        cases.append(bytes(mutated))
    # An element claiming 4 GB, and a sequence item claiming more than the file holds.
    head = data[: data.index(b"\x08\x00\x16\x00")]  # file meta + preamble, up to SOPClassUID
    cases.append(
        head
        + _element((0x0008, 0x0060), b"CS", b"CR")
        + _element((0x0010, 0x0020), b"UT", b"x", length=0xFFFFFFF0)
    )
    cases.append(
        head + _element((0x0054, 0x0220), b"SQ", b"\xfe\xff\x00\xe0" + struct.pack("<I", 10**9) + b"x" * 16)
    )
    outcomes = {"header": 0, "error": 0}
    full = read_header(data)
    _assert_sane(full)
    for case in cases:
        try:
            h = read_header(case)
        except DecodeError as exc:
            outcomes["error"] += 1
            assert "SECRET-ID-42" not in str(exc) and "DOE" not in str(exc)
        else:
            _assert_sane(h)
            outcomes["header"] += 1
            # What the damage did not reach is still read: the tags before byte 132 + the
            # first mutation are the original file's.
            if case == data[: len(case)] and len(case) > data.index(b"\x08\x00\x60\x00") + 16:
                assert h.modality == full.modality == "CR"
    assert outcomes["header"] > 0 and outcomes["error"] > 0


_HEADER_TYPES = {
    "study_date": dt.date,
    "patient_age_years": float,
    "pixel_spacing": tuple,
    "malformed": tuple,
}
_HEADER_INTS = {
    "rows": (1, 65535),
    "columns": (1, 65535),
    "bits_stored": (1, 64),
    "number_of_frames": (1, 2**31),
}


def _assert_sane(h: DicomHeader) -> None:
    """Every field ``None`` or a clean value of its type: strings stripped, without control
    characters; numbers in their DICOM range; ages 0-150 years; spacings positive and finite;
    a malformed intended-use tag listed with its value shown safely."""
    assert isinstance(h, DicomHeader)
    for field in dataclasses.fields(h):
        value = getattr(h, field.name)
        if value is None:
            continue
        if field.name in _HEADER_INTS:
            lo, hi = _HEADER_INTS[field.name]
            assert type(value) is int and lo <= value <= hi, (field.name, value)
        elif field.name in _HEADER_TYPES:
            assert isinstance(value, _HEADER_TYPES[field.name]), (field.name, value)
        else:
            assert isinstance(value, str) and value and value == value.strip(), (field.name, value)
            assert not any(ord(c) < 32 or ord(c) == 127 for c in value), (field.name, value)
    if h.patient_age_years is not None:
        assert math.isfinite(h.patient_age_years) and 0 <= h.patient_age_years <= 150
    if h.pixel_spacing is not None:
        assert len(h.pixel_spacing) == 2 and all(math.isfinite(v) and v > 0 for v in h.pixel_spacing)
    for keyword, shown in h.malformed:
        assert keyword and getattr(h, _snake(keyword), None) is None, (keyword, h)
        assert not any(ord(c) < 32 or ord(c) == 127 for c in shown), shown


def _snake(keyword: str) -> str:
    return {"PatientAge": "patient_age_years"}.get(keyword) or "".join(
        f"_{c.lower()}" if c.isupper() else c for c in keyword
    ).lstrip("_")


def test_a_truncated_header_never_yields_a_partial_value():
    # Cut inside a value, pydicom keeps the prefix (PatientID 'SECRET' of 'SECRET-ID-42',
    # StudyInstanceUID '1.2.', the transfer syntax '1.2.840'): every field must be the
    # full value or None, never a plausible partial one.
    jpeg = factory.real_jpegs(1)[0]
    data = factory.make_image(jpeg, factory.Tags(patient_id="SECRET-ID-42", patient_name="DOE^JANE"))
    full = read_header(data)
    changed = []
    for n in range(132, data.index(b"\xe0\x7f\x10\x00")):  # every cut inside the header
        try:
            h = read_header(data[:n])
        except DecodeError:
            continue
        for field in dataclasses.fields(h):
            value = getattr(h, field.name)
            if value not in (None, ()) and value != getattr(full, field.name):
                changed.append((n, field.name))
    assert not changed, changed[:10]


def _with_identifier_in_frames() -> bytes:
    """A file whose NumberOfFrames holds the patient id (a corrupt value quoting identifiers)."""
    data = _dicom(np.zeros((8, 8), np.uint8), PatientID="SECRET-ID-42", NumberOfFrames="123456789012")
    assert data.count(b"123456789012") == 1
    return data.replace(b"123456789012", b"SECRET-ID-42")


def test_decoder_errors_carry_no_identifiers():
    # pydicom's own message quotes the value: "invalid literal for int() with base 10: 'SECRET-ID-42'"
    data = _with_identifier_in_frames()
    with pytest.raises(DecodeError) as err:
        decode_dicom(data, max_pixels=10**6)
    assert "unreadable DICOM" in str(err.value) and "SECRET-ID-42" not in str(err.value)
    assert read_header(data).number_of_frames is None


def test_reading_logs_no_identifiers(caplog):
    # pydicom logs (not only warns) "Invalid value for VR IS: 'SECRET-ID-42'" when validating.
    data = _with_identifier_in_frames()
    with caplog.at_level(logging.DEBUG):
        read_header(data)
        with pytest.raises(DecodeError):
            decode_dicom(data, max_pixels=10**6)
    assert not [r for r in caplog.records if "SECRET-ID-42" in r.getMessage()]


def test_fields_schema_and_columns():
    header_fields = {f.name for f in dataclasses.fields(DicomHeader)}
    column_names = {f.name for f in DICOM_FIELDS}
    # ``malformed`` reaches the tables through ``intended_use`` / ``intended_use_note``.
    assert column_names == (header_fields - {"pixel_spacing", "patient_id", "malformed"}) | {
        "pixel_spacing_row_mm",
        "pixel_spacing_col_mm",
    }
    assert set(DICOM_FIELD_DOCS) == column_names and all(DICOM_FIELD_DOCS.values())
    assert all(f.nullable for f in DICOM_FIELDS)

    h = read_header(_dicom(Modality="DX", PatientID="P1", StudyDate="20240101", PixelSpacing=["0.1", "0.2"]))
    cols = header_columns([h, None], patient_ids=["from-file-1", "from-file-2"])
    table = pa.table(cols)
    assert table.schema.remove(table.schema.get_field_index("patient_id")) == pa.schema(DICOM_FIELDS)
    assert cols["patient_id"].to_pylist() == ["P1", "from-file-2"]  # the tag wins over the name
    assert cols["modality"].to_pylist() == ["DX", None]
    assert cols["study_date"].to_pylist() == [dt.date(2024, 1, 1), None]
    assert cols["pixel_spacing_row_mm"].to_pylist() == [pytest.approx(0.1), None]
    assert cols["pixel_spacing_col_mm"].to_pylist() == [pytest.approx(0.2), None]
    assert header_columns([])["modality"].type == pa.string()
    with pytest.raises(ValueError, match="patient ids"):
        header_columns([h], patient_ids=[])
