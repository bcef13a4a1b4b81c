"""DICOM Part 10 files made from the real Kermany images, with the tags a PACS export carries.

The pixels come from ``../shared/data`` (``kermany224/train`` for tests, the full-resolution
``kermany-fullres/train`` originals for benchmarks); only where that data is absent do they
come from ``cxr_ray.data.synthetic`` (``REAL_DATA`` says which). Never written into the repo:
callers pass a ``tmp_path``.

The API (kept small, other test modules import it):

- ``real_jpegs(n, fullres=False)``: ``n`` original JPEG files' bytes (cycled when ``n`` is
  larger than the set).
- ``make_image(jpeg, Tags(...), syntax="jpeg" | "explicit", photometric=..., bits_stored=...)``:
  one image instance. ``"jpeg"`` encapsulates the original JPEG bytes unchanged (transfer
  syntax 1.2.840.10008.1.2.4.50; grayscale JPEGs are ``MONOCHROME2``, colour ones
  ``YBR_FULL_422``; progressive originals are re-encoded as baseline first). ``"explicit"``
  stores the decoded gray pixels uncompressed (Explicit VR Little Endian), 8 bit or 12 bit in
  16 allocated, ``MONOCHROME1`` (inverted values) or ``MONOCHROME2``.
- ``make_syntax(jpeg, Tags(...), variant)``: the image in one of ``SYNTAX_VARIANTS`` (every
  transfer syntax the reduced decode handles: JPEG baseline/extended, JPEG-LS, JPEG 2000,
  RLE, uncompressed with MONOCHROME1 / rescale + window / VOI LUT table; dcmtk for two).
- ``make_sr(Tags(...))``: a Basic Text SR (no pixel data).
- ``six_file_case()``: the issue's six files (see the function), as ``Instance`` records with
  the expectation for each.
- ``archive(n_studies, ...)``: several studies with several series each.
- ``write_files(instances, folder)`` and ``upload(instances, server)``.

>>> case = six_file_case()
>>> [i.key for i in case]
['pa', 'lateral', 'ap_mono1', 'adult', 'ct', 'hand']
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KERMANY224_TRAIN = DATA_ROOT / "kermany224" / "train"
KERMANY_FULLRES_TRAIN = DATA_ROOT / "kermany-fullres" / "train"
#: Whether the real Kermany images are here (otherwise pixels are synthetic).
REAL_DATA = KERMANY224_TRAIN.is_dir() or KERMANY_FULLRES_TRAIN.is_dir()

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"

_SOP_CLASS = {"CR": CR_IMAGE, "DX": DX_FOR_PRESENTATION, "CT": CT_IMAGE, "SR": BASIC_TEXT_SR}
#: SNOMED CT codes of ViewCodeSequence (PS3.16 CID 4010), for the ViewPosition-less variant.
#: SNOMED CT codes of DICOM CID 4010 (X-ray view): 399182000 is "oblique", not AP.
VIEW_CODES = {
    "PA": ("272479007", "postero-anterior"),
    "AP": ("399348003", "antero-posterior"),
    "LL": ("399173006", "left lateral"),
}


def new_uid() -> str:
    """A fresh DICOM UID (pydicom's ``generate_uid``)."""
    from pydicom.uid import generate_uid

    return str(generate_uid())


@dataclass(frozen=True)
class Tags:
    """The identifying and clinical header of one instance (``None`` leaves a tag out)."""

    patient_id: str = "CXR-TEST-0001"
    patient_name: str = "TEST^PEDIATRIC"
    patient_age: str | None = "004Y"
    patient_sex: str | None = "F"
    patient_birth_date: str | None = None
    accession_number: str = "ACC0001"
    study_date: str = "20261130"
    study_time: str = "081500"
    study_instance_uid: str = field(default_factory=new_uid)
    series_instance_uid: str = field(default_factory=new_uid)
    sop_instance_uid: str = field(default_factory=new_uid)
    series_number: int = 1
    instance_number: int = 1
    modality: str = "CR"
    body_part: str | None = "CHEST"
    view_position: str | None = "PA"
    #: Put the view in ViewCodeSequence only (no ViewPosition tag).
    view_code_only: bool = False
    manufacturer: str | None = "CXR-RAY TEST FACTORY"
    pixel_spacing_mm: float | None = 0.139

    @property
    def identifiers(self) -> tuple[str, ...]:
        """The values a pseudonymized output must not contain: UIDs, patient id, accession."""
        return (
            self.study_instance_uid,
            self.series_instance_uid,
            self.sop_instance_uid,
            self.patient_id,
            self.accession_number,
        )


@dataclass(frozen=True)
class Instance:
    """One generated DICOM file and what it is."""

    key: str
    data: bytes
    tags: Tags
    #: ``ok`` or ``skipped`` under the pediatric frontal chest intended use; ``error`` for
    #: objects without pixels.
    expect: str = "ok"
    #: The field that puts it outside the intended use (``None`` when in scope).
    reason_field: str | None = None

    @property
    def filename(self) -> str:
        return f"{self.key}.dcm"


class Uploader(Protocol):
    def upload(self, data: bytes) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------- source pixels


def real_jpegs(n: int, *, fullres: bool = False) -> list[bytes]:
    """``n`` JPEG files' bytes from the real Kermany train set, cycled; synthetic if absent."""
    root = KERMANY_FULLRES_TRAIN if fullres else KERMANY224_TRAIN
    if not root.is_dir():
        root = KERMANY224_TRAIN if fullres else KERMANY_FULLRES_TRAIN
    paths = sorted(root.glob("*/*.jpeg")) if root.is_dir() else []
    if not paths:
        from cxr_ray.data import synthetic

        return [synthetic.jpeg_bytes(320, 256, seed=i) for i in range(n)]
    # Interleave the classes so a small n still holds normals and pneumonias.
    by_class = [sorted(p for p in paths if p.parent.name == c) for c in ("NORMAL", "PNEUMONIA")]
    mixed = [p for pair in itertools.zip_longest(*by_class) for p in pair if p is not None]
    return [p.read_bytes() for p in itertools.islice(itertools.cycle(mixed), n)]


def _sof(jpeg: bytes) -> tuple[int, int] | None:
    """(SOF marker, component count) of a JPEG, or ``None`` when none is found."""
    i = 2
    while i + 4 <= len(jpeg) and jpeg[i] == 0xFF:
        marker = jpeg[i + 1]
        length = int.from_bytes(jpeg[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker, jpeg[i + 9]
        i += 2 + length
    return None


def baseline_jpeg(jpeg: bytes) -> tuple[bytes, int]:
    """The JPEG as baseline (SOF0) bytes and its component count; re-encodes only if needed."""
    sof = _sof(jpeg)
    if sof is not None and sof[0] == 0xC0 and sof[1] in (1, 3):
        return jpeg, sof[1]
    im = Image.open(io.BytesIO(jpeg))
    im = im.convert("L" if im.mode in ("L", "I", "I;16") else "RGB")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, progressive=False)
    return buf.getvalue(), 1 if im.mode == "L" else 3


def gray_pixels(jpeg: bytes) -> np.ndarray:
    """The JPEG decoded to 8-bit gray (what the uncompressed variants store)."""
    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


# ----------------------------------------------------------------------------- instances


def _base(tags: Tags, sop_class: str, syntax: str) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = tags.sop_instance_uid
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = tags.sop_instance_uid
    ds.StudyInstanceUID = tags.study_instance_uid
    ds.SeriesInstanceUID = tags.series_instance_uid
    ds.PatientID = tags.patient_id
    ds.PatientName = tags.patient_name
    ds.AccessionNumber = tags.accession_number
    ds.StudyDate = tags.study_date
    ds.StudyTime = tags.study_time
    ds.SeriesDate = tags.study_date
    ds.ContentDate = tags.study_date
    ds.StudyID = "1"
    ds.SeriesNumber = tags.series_number
    ds.InstanceNumber = tags.instance_number
    ds.Modality = tags.modality
    ds.ReferringPhysicianName = ""
    for keyword, value in (
        ("PatientAge", tags.patient_age),
        ("PatientSex", tags.patient_sex),
        ("PatientBirthDate", tags.patient_birth_date),
        ("BodyPartExamined", tags.body_part),
        ("Manufacturer", tags.manufacturer),
    ):
        if value is not None:
            setattr(ds, keyword, value)
    if tags.view_position is not None:
        if tags.view_code_only:
            code, meaning = VIEW_CODES[tags.view_position]
            item = Dataset()
            item.CodeValue = code
            item.CodingSchemeDesignator = "SCT"
            item.CodeMeaning = meaning
            ds.ViewCodeSequence = DicomSequence([item])
        else:
            ds.ViewPosition = tags.view_position
    return ds


def _serialise(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_image(
    jpeg: bytes,
    tags: Tags,
    *,
    syntax: str = "jpeg",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 8,
) -> bytes:
    """One image instance from ``jpeg`` (see the module docstring for the variants)."""
    from pydicom.encaps import encapsulate

    sop_class = _SOP_CLASS[tags.modality]
    if syntax == "jpeg":
        if photometric != "MONOCHROME2" or bits_stored != 8:
            raise ValueError("JPEG baseline variants are 8-bit MONOCHROME2 (or YBR_FULL_422 colour)")
        data, components = baseline_jpeg(jpeg)
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
        ds = _base(tags, sop_class, JPEG_BASELINE)
        ds.Rows, ds.Columns = height, width
        ds.SamplesPerPixel = components
        # A colour baseline JPEG holds YCbCr: YBR_FULL_422 (PS3.5 8.2.1); gray is MONOCHROME2.
        ds.PhotometricInterpretation = "MONOCHROME2" if components == 1 else "YBR_FULL_422"
        if components == 3:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.LossyImageCompression = "01"
        ds.PixelData = encapsulate([data])
        ds["PixelData"].VR = "OB"
    elif syntax == "explicit":
        gray = gray_pixels(jpeg).astype(np.uint16)
        top = 2**bits_stored - 1
        arr = np.rint(gray * (top / 255.0)).astype(np.uint16 if bits_stored > 8 else np.uint8)
        if photometric == "MONOCHROME1":
            arr = (top - arr).astype(arr.dtype)
        ds = _base(tags, sop_class, EXPLICIT_VR_LE)
        ds.set_pixel_data(arr, photometric, bits_stored, generate_instance_uid=False)
        if bits_stored > 8:
            ds.WindowCenter = top / 2
            ds.WindowWidth = top + 1
    else:
        raise ValueError(f"unknown syntax {syntax!r}: 'jpeg' or 'explicit'")
    if tags.modality == "CT":
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    elif tags.pixel_spacing_mm is not None:
        ds.ImagerPixelSpacing = [tags.pixel_spacing_mm, tags.pixel_spacing_mm]
        ds.PixelSpacing = [tags.pixel_spacing_mm, tags.pixel_spacing_mm]
    return _serialise(ds)


def make_sr(tags: Tags, text: str = "Chest radiograph: no focal consolidation.") -> bytes:
    """A Basic Text SR instance (a report, no pixel data)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    tags = replace(tags, modality="SR", body_part=None, view_position=None)
    ds = _base(tags, BASIC_TEXT_SR, EXPLICIT_VR_LE)
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = (
        "18748-4",
        "LN",
        "Diagnostic imaging report",
    )
    ds.ConceptNameCodeSequence = DicomSequence([title])
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    finding = Dataset()
    finding.CodeValue, finding.CodingSchemeDesignator, finding.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = DicomSequence([finding])
    item.TextValue = text
    ds.ContentSequence = DicomSequence([item])
    return _serialise(ds)


# ----------------------------------------------------------------------------- sets of files


def six_file_case(jpegs: Sequence[bytes] | None = None) -> list[Instance]:
    """The issue's six files: 5 studies, 2 in the pediatric frontal chest intended use.

    ``pa`` and ``lateral`` are one study (PA, then ``ViewPosition=LL``); ``ap_mono1`` is an AP
    ``MONOCHROME1`` CR of an 18-month-old (12-bit, uncompressed); ``adult`` is a 45-year-old's
    PA; ``ct`` has ``Modality=CT``; ``hand`` has ``BodyPartExamined=HAND``. The pediatric
    images are JPEG-baseline encapsulated DX/CR.
    """
    jpegs = list(jpegs) if jpegs is not None else real_jpegs(6)
    study = new_uid()
    out = [
        Instance(
            "pa",
            make_image(
                jpegs[0],
                t := Tags(
                    patient_id="CXR-0001", accession_number="ACC1001", study_instance_uid=study, modality="DX"
                ),
            ),
            t,
        ),
        Instance(
            "lateral",
            make_image(
                jpegs[1],
                t := Tags(
                    patient_id="CXR-0001",
                    accession_number="ACC1001",
                    study_instance_uid=study,
                    modality="DX",
                    series_number=2,
                    view_position="LL",
                ),
            ),
            t,
            "skipped",
            "view_position",
        ),
        Instance(
            "ap_mono1",
            make_image(
                jpegs[2],
                t := Tags(
                    patient_id="CXR-0002",
                    accession_number="ACC1002",
                    patient_age="018M",
                    patient_sex="M",
                    view_position="AP",
                ),
                syntax="explicit",
                photometric="MONOCHROME1",
                bits_stored=12,
            ),
            t,
        ),
        Instance(
            "adult",
            make_image(
                jpegs[3],
                t := Tags(
                    patient_id="CXR-0003",
                    accession_number="ACC1003",
                    patient_age="045Y",
                    patient_sex="M",
                    modality="DX",
                ),
            ),
            t,
            "skipped",
            "patient_age",
        ),
        Instance(
            "ct",
            make_image(
                jpegs[4],
                t := Tags(
                    patient_id="CXR-0004", accession_number="ACC1004", modality="CT", view_position=None
                ),
            ),
            t,
            "skipped",
            "modality",
        ),
        Instance(
            "hand",
            make_image(
                jpegs[5], t := Tags(patient_id="CXR-0005", accession_number="ACC1005", body_part="HAND")
            ),
            t,
            "skipped",
            "body_part_examined",
        ),
    ]
    return out


def archive(
    n_studies: int,
    *,
    series_per_study: int = 2,
    instances_per_series: int = 1,
    study_dates: Sequence[str] = ("20261130",),
    modalities: Sequence[str] = ("CR", "DX"),
    with_sr: bool = False,
    jpegs: Sequence[bytes] | None = None,
) -> list[Instance]:
    """``n_studies`` studies of ``series_per_study`` series each, JPEG-baseline images.

    Study ``i`` has date ``study_dates[i % len]`` and all its series modality
    ``modalities[i % len]``; ``with_sr`` adds a Basic Text SR series to every study.
    Every instance has fresh UIDs, so repeated pixels still give distinct files.
    """
    per = series_per_study * instances_per_series
    pixels = iter(itertools.cycle(jpegs if jpegs is not None else real_jpegs(min(n_studies * per, 64))))
    out = []
    for i in range(n_studies):
        study, date, modality = new_uid(), study_dates[i % len(study_dates)], modalities[i % len(modalities)]
        base = Tags(
            patient_id=f"CXR-{i:05d}",
            accession_number=f"ACC{i:06d}",
            study_instance_uid=study,
            study_date=date,
            modality=modality,
        )
        for s in range(series_per_study):
            series = new_uid()
            view = ("PA", "LL", "AP")[s % 3]
            for k in range(instances_per_series):
                tags = replace(
                    base,
                    series_instance_uid=series,
                    sop_instance_uid=new_uid(),
                    series_number=s + 1,
                    instance_number=k + 1,
                    view_position=view,
                )
                out.append(Instance(f"s{i:04d}-r{s}-i{k}", make_image(next(pixels), tags), tags))
        if with_sr:
            tags = replace(
                base,
                series_instance_uid=new_uid(),
                sop_instance_uid=new_uid(),
                series_number=series_per_study + 1,
            )
            out.append(Instance(f"s{i:04d}-sr", make_sr(tags), replace(tags, modality="SR"), "error"))
    return out


def variants(jpegs: Sequence[bytes] | None = None) -> list[Instance]:
    """One instance of each variant, all in one study: JPEG baseline gray (``MONOCHROME2``, a
    full-resolution original) and colour (``YBR_FULL_422``), uncompressed 8 and 12 bit,
    ``MONOCHROME1``, a ``ViewCodeSequence``-only view, and a Basic Text SR."""
    jpegs = list(jpegs) if jpegs is not None else real_jpegs(8)
    study = new_uid()

    def tags(**kw: Any) -> Tags:
        return Tags(study_instance_uid=study, series_instance_uid=new_uid(), **kw)

    gray = real_jpegs(1, fullres=True)[0]
    if _sof(gray) != (0xC0, 1):  # no full-resolution gray original here: re-encode as gray
        buf = io.BytesIO()
        Image.fromarray(gray_pixels(gray)).save(buf, format="JPEG", quality=95)
        gray = buf.getvalue()
    return [
        Instance("jpeg_mono2", make_image(gray, t := tags(series_number=1)), t),
        Instance("jpeg_ybr", make_image(jpegs[5], t := tags(series_number=7)), t),
        Instance("explicit_8bit", make_image(jpegs[1], t := tags(series_number=2), syntax="explicit"), t),
        Instance(
            "explicit_12bit",
            make_image(jpegs[2], t := tags(series_number=3), syntax="explicit", bits_stored=12),
            t,
        ),
        Instance(
            "explicit_mono1",
            make_image(
                jpegs[3],
                t := tags(series_number=4),
                syntax="explicit",
                photometric="MONOCHROME1",
                bits_stored=12,
            ),
            t,
        ),
        Instance("view_code_only", make_image(jpegs[4], t := tags(series_number=5, view_code_only=True)), t),
        Instance("sr", make_sr(t := tags(series_number=6)), t, "error"),
    ]


def write_files(instances: Iterable[Instance], folder: Path) -> list[Path]:
    """Write each instance to ``folder/<key>.dcm``; returns the paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for inst in instances:
        path = folder / inst.filename
        path.write_bytes(inst.data)
        paths.append(path)
    return paths


def upload(instances: Iterable[Instance], server: Uploader) -> list[dict[str, Any]]:
    """POST each instance to ``server`` (``tests.orthanc_server.Orthanc``); Orthanc's answers."""
    return [server.upload(inst.data) for inst in instances]


def iter_copies(jpegs: Sequence[bytes], n: int, *, per_study: int = 1) -> Iterator[Instance]:
    """``n`` JPEG-baseline DX instances cycling over ``jpegs``, each with its own UIDs."""
    study = base = None
    for i in range(n):
        if i % per_study == 0:
            study, series = new_uid(), new_uid()
            base = Tags(
                patient_id=f"BENCH-{i:06d}",
                accession_number=f"B{i:07d}",
                study_instance_uid=study,
                series_instance_uid=series,
                modality="DX",
            )
        assert base is not None
        tags = replace(base, sop_instance_uid=new_uid(), instance_number=i % per_study + 1)
        yield Instance(f"img{i:06d}", make_image(jpegs[i % len(jpegs)], tags), tags)


# ----------------------------------------------------------------------------- transfer syntaxes

#: The variants ``make_syntax`` builds: key -> (transfer syntax UID, what the variant is).
SYNTAX_VARIANTS: dict[str, tuple[str, str]] = {
    "jpeg-baseline": ("1.2.840.10008.1.2.4.50", "the original JPEG bytes, 8-bit"),
    "jpeg-extended-8": ("1.2.840.10008.1.2.4.51", "8-bit JPEG extended (SOF1, dcmcjpeg +ee)"),
    "jpeg-extended-12": ("1.2.840.10008.1.2.4.51", "12-bit JPEG extended (SOF1, dcmcjpeg +ee)"),
    "jpeg-ls": ("1.2.840.10008.1.2.4.80", "12-bit JPEG-LS lossless (pyjpegls)"),
    "j2k-lossless": ("1.2.840.10008.1.2.4.90", "12-bit JPEG 2000 lossless (openjpeg)"),
    "j2k": ("1.2.840.10008.1.2.4.91", "12-bit JPEG 2000 lossy, ratio 10 (openjpeg)"),
    "rle": ("1.2.840.10008.1.2.5", "8-bit RLE lossless (dcmcrle, else pydicom)"),
    "explicit-8": ("1.2.840.10008.1.2.1", "8-bit uncompressed"),
    "explicit-12-mono1": ("1.2.840.10008.1.2.1", "12-bit MONOCHROME1, full-range window"),
    "explicit-12-rescale-window": (
        "1.2.840.10008.1.2.1",
        "12-bit, rescale slope 2 / intercept -1024, a window that clips both ends",
    ),
    "explicit-12-voi-lut": ("1.2.840.10008.1.2.1", "12-bit with a gamma 0.6 VOI LUT table"),
}


def make_syntax(jpeg: bytes, tags: Tags, variant: str) -> bytes:
    """One image instance of ``jpeg`` in one of ``SYNTAX_VARIANTS`` (needs dcmtk's
    ``dcmcjpeg`` for the JPEG extended variants)."""
    import pydicom

    if variant == "jpeg-baseline":
        return make_image(jpeg, tags, syntax="jpeg")
    twelve = variant not in ("jpeg-extended-8", "rle", "explicit-8")
    mono1 = variant == "explicit-12-mono1"
    data = make_image(
        jpeg,
        tags,
        syntax="explicit",
        bits_stored=12 if twelve else 8,
        photometric="MONOCHROME1" if mono1 else "MONOCHROME2",
    )
    if variant.startswith("jpeg-extended"):
        return _dcmtk("dcmcjpeg", "+ee", data)
    ds = pydicom.dcmread(io.BytesIO(data))
    if variant == "explicit-12-rescale-window":
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 2, -1024, "US"
        ds.WindowCenter, ds.WindowWidth = 3000, 5000  # clips below 500 and above 5500
    elif variant == "explicit-12-voi-lut":
        _add_voi_lut(ds, gamma=0.6)
    elif variant in ("jpeg-ls", "j2k-lossless"):
        ds.compress(SYNTAX_VARIANTS[variant][0], generate_instance_uid=False)
    elif variant == "j2k":
        ds.compress(SYNTAX_VARIANTS[variant][0], j2k_cr=[10], generate_instance_uid=False)
    elif variant == "rle":
        import shutil

        if shutil.which("dcmcrle"):  # C, ~20x faster than pydicom's own RLE encoder
            return _dcmtk("dcmcrle", "+ot", data)
        ds.compress(SYNTAX_VARIANTS[variant][0], generate_instance_uid=False)
    elif variant not in SYNTAX_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {sorted(SYNTAX_VARIANTS)}")
    return _serialise(ds)


def _add_voi_lut(ds: Any, *, gamma: float) -> None:
    """A VOI LUT Sequence mapping the 12-bit range through ``x ** gamma`` (window removed)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    for name in ("WindowCenter", "WindowWidth"):
        if name in ds:
            delattr(ds, name)
    entries = 4096
    table = np.rint(((np.arange(entries) / (entries - 1)) ** gamma) * 65535).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [entries, 0, 16]
    item.LUTData = table.tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = DicomSequence([item])


def _dcmtk(tool: str, option: str, data: bytes) -> bytes:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        src.write_bytes(data)
        subprocess.run([tool, option, str(src), str(dst)], check=True, capture_output=True)
        return dst.read_bytes()
