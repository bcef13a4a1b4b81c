"""The error hierarchy. Messages say what was wrong and what to do about it.

Row errors (a file that cannot be read or decoded becomes an ``error`` row, never a failed
run) are identifier-free by construction: a reason code from the closed vocabulary
``cxr_ray.vocabulary.ErrorCode`` plus a fixed detail (numbers, formats, DICOM tag keywords,
exception type names), never a path, file or member name, link target, UID or tag value. The
row's location is in its own ``uri`` column, which pseudonymization keys.

- ``DataError(message, code=ErrorCode.X)`` / ``DecodeError(...)`` carry ``.code``; their
  ``message`` must be such a fixed detail when the error can become a row.
- ``row_error(code, detail)`` builds a row's ``error`` text, ``"<code>: <detail>"``;
  ``row_text(exc)`` does it for any exception (anything not raised by cxr-ray on purpose is
  ``internal`` with only its type name); ``error_code(text)`` reads the code back
  (``internal`` for text not built by ``row_error``).
- ``safe_detail`` is the last line of defence: whatever a detail holds, quoted text, path- and
  file-name-like words and UID-shaped numbers are cut out before it reaches a row.
"""

from __future__ import annotations

import re
from typing import Any

from cxr_ray.vocabulary import ERROR_CODES, ErrorCode


class CxrRayError(Exception):
    """Base class for every error cxr-ray raises on purpose."""


class ConfigError(CxrRayError):
    """Invalid settings, flags or config file."""


class DataError(CxrRayError):
    """An input (archive, file, manifest, image) cannot be used.

    ``code`` says why (``ErrorCode``); as a row error its text is ``row_text(exc)``.
    """

    default_code = ErrorCode.UNREADABLE_FILE

    def __init__(self, message: str, *, code: ErrorCode | str | None = None) -> None:
        super().__init__(message)
        self.code = ErrorCode(code) if code is not None else self.default_code

    def __reduce__(self) -> tuple[Any, tuple[type[DataError], str, str]]:
        """Keeps ``code`` across processes (Ray pickles exceptions)."""
        return (_rebuild, (type(self), str(self), self.code.value))


class DecodeError(DataError):
    """One image cannot be decoded; scoring turns this into an error row."""

    default_code = ErrorCode.UNDECODABLE


def _rebuild(cls: type[DataError], message: str, code: str) -> DataError:
    return cls(message, code=code)


class ModelError(CxrRayError):
    """A model artifact, model card or weight file is missing, unsafe or inconsistent."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights are not available offline."""


class EngineUnavailableError(CxrRayError):
    """The requested inference engine cannot run here (missing package, no GPU, ...)."""


_MAX_DETAIL = 240
_CUT = "[...]"
# Quoted text (a repr of a path, a value), then words with a path separator or an archive
# member separator, file names with an extension, UID-shaped dotted numbers, e-mail-like words.
_SCRUB = (
    re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`"),
    re.compile(r"\S*[/\\]\S*"),
    re.compile(
        r"\S+\.(?:jpe?g|png|dcm|dicom|ima|zip|tar|t?gz|bz2|xz|zst|parquet|pq|json|csv|txt|bmp|gif|"
        r"tiff?|j2k|jp2|nii|html?)\b",
        re.IGNORECASE,
    ),
    re.compile(r"\b\d+(?:\.\d+){2,}\b"),
    re.compile(r"\S+@\S+"),
)
_PREFIX = re.compile(r"^([a-z_]+): ")


def safe_detail(detail: str) -> str:
    """``detail`` with anything that could be an identifier cut out (``[...]``): quoted text,
    path-like and file-name-like words, UID-shaped numbers; control and non-ASCII characters
    dropped; at most 240 characters. Fixed texts with numbers pass unchanged."""
    text = "".join(ch if " " <= ch <= "~" else " " for ch in detail)
    for pattern in _SCRUB:
        text = pattern.sub(_CUT, text)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def row_error(code: ErrorCode | str, detail: str = "") -> str:
    """A row's ``error`` text: ``"<code>: <safe detail>"``. ``code`` must be an ``ErrorCode``
    (a ``ValueError`` otherwise); a detail already starting with its code is not prefixed twice."""
    code = ErrorCode(code)
    detail = detail.removeprefix(f"{code.value}: ").strip()
    return f"{code.value}: {safe_detail(detail)}" if detail else code.value


def row_text(exc: BaseException) -> str:
    """The row ``error`` text of an exception: its code and safe message for a ``DataError``,
    ``internal`` with only the type name for anything else (a library's message can quote a
    path or a value)."""
    if isinstance(exc, DataError):
        return row_error(exc.code, str(exc))
    return row_error(ErrorCode.INTERNAL, f"unexpected {type(exc).__name__}")


def error_code(text: str | None) -> str | None:
    """The reason code of a row's ``error`` text (None for None); ``internal`` for text that
    ``row_error`` did not build."""
    if text is None:
        return None
    m = _PREFIX.match(text)
    if m and m.group(1) in ERROR_CODES:
        return m.group(1)
    return text if text in ERROR_CODES else ErrorCode.INTERNAL.value


def safe_row_error(text: str | None, default: ErrorCode | str = ErrorCode.INTERNAL) -> str | None:
    """Any row ``error`` text made safe: one built by ``row_error`` is re-scrubbed (idempotent);
    other text gets ``default`` as its code and a scrubbed detail."""
    if text is None:
        return None
    m = _PREFIX.match(text)
    if m and m.group(1) in ERROR_CODES:
        return row_error(m.group(1), text[m.end() :])
    if text in ERROR_CODES:
        return text
    return row_error(default, text)
