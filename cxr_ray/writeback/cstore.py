"""C-STORE delivery: result objects stored to a DICOM peer (``dicom://AET@HOST:PORT``).

One association for the whole delivery (made again when the peer drops it), proposing a
presentation context for each SOP class cxr-ray writes (Comprehensive 3D SR, Secondary Capture)
in the objects' own transfer syntax (Explicit VR Little Endian) and Implicit VR Little Endian,
and a Study Root C-FIND context: before storing, the peer is asked for the study so the objects
carry its own PatientName, PatientBirthDate, StudyTime, StudyID and ReferringPhysicianName
(``context.SourceRef.with_study_attributes``). Our AE title is ``dicomweb.dimse.calling_aet``.
A refused or dropped association is retried with exponential backoff (``dicomweb.retries``,
``backoff_s``, ``max_backoff_s``); once the peer looks down, later studies are tried once each
until one succeeds. A C-STORE answered with a failure status fails the study (warnings, 0xB000
and 0x0001, count as stored: the peer kept the object).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cxr_ray.config import DicomwebSettings
from cxr_ray.data.dimse_net import FIND, DimseError, associate, find, peer, retrying
from cxr_ray.writeback.context import STUDY_ATTRIBUTES

__all__ = ["RESULT_SOP_CLASSES", "CStoreSender"]

#: Comprehensive 3D SR, Comprehensive SR, Enhanced SR, Secondary Capture, and the
#: multi-frame true-colour SC.
RESULT_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.4",
)
_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
_OK = (0x0000, 0x0001, 0xB000, 0xB006, 0xB007)


class CStoreSender:
    """Stores datasets to one DICOM peer; ``send`` returns ``None`` or why it failed."""

    def __init__(self, target: str, settings: DicomwebSettings) -> None:
        self.peer = peer(target)
        self.settings = settings
        self.assoc: Any = None
        self.down = False

    def _open(self) -> Any:
        contexts: list[tuple[str, tuple[str, ...] | None]] = [(c, _SYNTAXES) for c in RESULT_SOP_CLASSES]
        contexts.append((FIND, None))  # the study-level query of ``study_attributes``
        return associate(self.peer, self.settings.dimse, contexts)

    def _association(self) -> Any:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self._open() if self.down else retrying(self.settings, "association", self._open)
        return self.assoc

    def study_attributes(self, study_uid: str) -> Any:
        """The peer's study-level attributes of ``study_uid`` (a STUDY-level C-FIND of
        ``STUDY_ATTRIBUTES``), or ``None`` when it does not hold the study, refuses the query
        or does not answer (the objects are then written without them)."""
        from pydicom.dataset import Dataset

        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        for keyword in STUDY_ATTRIBUTES:
            setattr(query, keyword, "")
        query.StudyInstanceUID = study_uid
        try:
            answers = find(self._association(), query)
        except DimseError:
            self.down = True
            return None
        except ValueError:  # the peer accepted no C-FIND presentation context
            return None
        return answers[0] if len(answers) == 1 else None

    def send(self, datasets: Sequence[Any]) -> str | None:
        """C-STORE each of ``datasets`` (one study's objects); the first failure stops it."""
        for ds in datasets:
            problem = self._store(ds)
            if problem is not None:
                return problem
        return None

    def _store(self, ds: Any) -> str | None:
        for attempt in range(2):  # a dropped association is made again once per object
            try:
                status = self._association().send_c_store(ds)
            except DimseError as exc:
                self.down = True
                return f"C-STORE failed: {exc.reason}"
            except ValueError:
                # pynetdicom: no accepted presentation context for this SOP class / syntax.
                return "C-STORE failed: the DICOM peer accepted no presentation context for the object"
            self.down = False
            if not status:  # no answer: the association broke
                if attempt == 0:
                    continue
                return "C-STORE failed: the DICOM peer dropped the association"
            if int(status.Status) not in _OK:
                return f"C-STORE failed: the DICOM peer answered status 0x{int(status.Status):04X}"
            return None
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None
