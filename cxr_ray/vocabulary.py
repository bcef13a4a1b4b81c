"""The closed vocabularies of cxr-ray, each defined once (a leaf: imports nothing from cxr_ray).

Settings validation, the preprocessing contract, model cards and output tables import these,
so a value accepted in one place is accepted everywhere and an unknown one is refused at
settings validation, before any work starts. Class labels live in ``cxr_ray.labels``.
"""

from __future__ import annotations

from enum import StrEnum

#: Backbones the model factory can build (``cxr_ray.models.factory.BACKBONES`` must match).
ARCHITECTURES: tuple[str, ...] = (
    "mobilenet_v2",
    "efficientnet_lite0",
    "resnet18",
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "convnext_tiny",
)

#: Scoring engines; ``auto`` picks the best available one (``cxr_ray.engines.select_engine``).
ENGINES: tuple[str, ...] = ("auto", "onnxruntime", "torch", "tensorrt", "openvino")

#: Step 3 of the preprocessing contract (``cxr_ray.imaging.preprocess``): ``none``;
#: ``equalize``, global histogram equalisation; ``clahe``, contrast-limited adaptive
#: histogram equalisation (OpenCV's, clip limit 2.0 on an 8 x 8 tile grid).
INTENSITY_MODES: tuple[str, ...] = ("none", "equalize", "clahe")


class Status(StrEnum):
    """Row statuses of every output table; the reason for ``error``/``skipped`` is in the row's ``error``."""

    #: Scored.
    OK = "ok"
    #: The file could not be read or decoded.
    ERROR = "error"
    #: Deliberately not scored.
    SKIPPED = "skipped"


#: The statuses as plain strings (schema checks, Parquet dictionaries), in declaration order.
STATUSES: tuple[str, ...] = tuple(s.value for s in Status)


class ErrorCode(StrEnum):
    """Why a row is ``error`` or ``skipped``: the ``error_code`` column and the prefix of its
    ``error`` text (``"<code>: <detail>"``, built by ``cxr_ray.errors.row_error``).

    A closed set: the detail after the code is fixed text plus numbers, formats and tag
    keywords, never a path, file or member name, link target, UID or tag value (the row's
    location is its ``uri`` column, which pseudonymization keys). Documented in docs/OUTPUTS.md.
    """

    # Listing and reading (cxr_ray.data)
    #: The file, archive member, table row or instance does not exist (any more).
    NOT_FOUND = "not_found"
    #: The file cannot be opened or read (permissions, I/O error).
    UNREADABLE_FILE = "unreadable_file"
    #: An archive member cannot be read.
    UNREADABLE_MEMBER = "unreadable_member"
    #: The container (zip, tar, Parquet) broke while being read: its unread entries.
    UNREADABLE_CONTAINER = "unreadable_container"
    #: A Parquet table inside a folder has unusable column types.
    UNUSABLE_CONTAINER = "unusable_container"
    #: Not a regular file (a FIFO, a device).
    NOT_REGULAR = "not_regular"
    #: The file is over ``data.max_file_bytes``.
    TOO_BIG = "too_big"
    #: The file or archive member ends early.
    TRUNCATED = "truncated"
    #: A symlink (file or folder) leaving the source root: not followed.
    SYMLINK_OUTSIDE_ROOT = "symlink_outside_root"
    #: A symlink whose target does not exist.
    LINK_DANGLING = "link_dangling"
    #: A folder reached twice through directory symlinks: listed once.
    DUPLICATE_FOLDER = "duplicate_folder"
    #: A link member of an archive: never followed.
    LINK_MEMBER = "link_member"
    #: An archive member with an absolute path or ``..``.
    UNSAFE_MEMBER = "unsafe_member"
    #: A file or member name that is not valid UTF-8.
    NOT_UTF8 = "not_utf8"
    #: A manifest row outside ``data.allowed_roots`` or of a refused scheme: never opened.
    URI_NOT_ALLOWED = "uri_not_allowed"
    #: A manifest row naming a DICOMweb service not in ``dicomweb.endpoints``.
    ENDPOINT_NOT_CONFIGURED = "endpoint_not_configured"
    #: A Parquet source without the bytes column.
    NO_COLUMN = "no_column"
    #: A null in the Parquet bytes column.
    NULL_BYTES = "null_bytes"
    #: A Parquet bytes cell that is not binary.
    WRONG_TYPE = "wrong_type"
    #: A row with neither bytes nor an error (should not happen).
    NO_DATA = "no_data"
    # DICOMweb (cxr_ray.data.dicomweb)
    #: A study whose instance listing failed (the rest of the listing is scored).
    STUDY_UNLISTED = "study_unlisted"
    #: An instance the server did not deliver.
    UNRETRIEVABLE = "unretrievable"
    #: The DICOMweb client refused the request (e.g. a non-conformant UID).
    DICOMWEB_REFUSED = "dicomweb_refused"
    #: The server sent an instance pydicom cannot write back to bytes.
    UNWRITABLE_INSTANCE = "unwritable_instance"
    # Decoding (cxr_ray.imaging)
    #: A 0-byte file.
    EMPTY_FILE = "empty_file"
    #: Not JPEG, PNG or DICOM.
    UNSUPPORTED_FORMAT = "unsupported_format"
    #: Corrupt JPEG/PNG data.
    UNDECODABLE = "undecodable"
    #: Over ``data.max_pixels`` (possible decompression bomb), checked before decoding.
    PIXEL_BUDGET = "pixel_budget"
    #: A compressed DICOM frame whose own size differs from the header's.
    FRAME_MISMATCH = "frame_mismatch"
    #: A DICOM object without pixel data (SR, presentation state, ...).
    DICOM_NO_PIXELS = "dicom_no_pixels"
    #: A DICOM file or header pydicom cannot parse.
    DICOM_UNREADABLE = "dicom_unreadable"
    #: DICOM pixel data in a syntax or layout cxr-ray cannot decode.
    DICOM_UNSUPPORTED = "dicom_unsupported"
    # Scoring (cxr_ray.scoring)
    #: The model gave a NaN or infinite output.
    NOT_FINITE = "not_finite"
    #: Outside the model's intended use (a ``skipped`` row).
    OUT_OF_SCOPE = "out_of_scope"
    #: A checked DICOM tag present but malformed (a ``skipped`` row unless opted in).
    UNPARSEABLE_TAG = "unparseable_tag"
    #: An unexpected failure; the detail names only the exception type.
    INTERNAL = "internal"


#: The reason codes as plain strings, in declaration order.
ERROR_CODES: tuple[str, ...] = tuple(c.value for c in ErrorCode)

#: The label a reviewer gives an image that cannot be judged; such rows are excluded from a
#: site calibration sample and counted (``cxr_ray.site.sample``).
NOT_ASSESSABLE = "not_assessable"

#: The review CSV contract: the columns, in order, that the review page
#: (``cxr_ray.reporting.review``) writes and ``cxr-ray calibrate --labels`` reads.
REVIEW_CSV_COLUMNS: tuple[str, ...] = (
    "image_id",
    "label",
    "selection",
    "flagged",
    "run_id",
    "model_version",
    "reviewed_at",
)

#: Site-calibration methods (``cxr-ray calibrate --method``, ``calibrate.method``), in the
#: card's parametrisation ``softmax(logit_scale * logits / temperature + logit_bias)``:
#: ``bias`` refits T and the per-class offsets (the normal class's offset stays the parent's:
#: softmax is invariant to a common shift); ``vector`` refits the per-class scale and offsets
#: with T kept (a common factor of the scale and 1/T would be unidentifiable);
#: ``temperature`` refits T only.
SITE_METHODS: tuple[str, ...] = ("bias", "vector", "temperature")
