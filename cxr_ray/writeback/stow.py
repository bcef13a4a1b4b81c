"""STOW-RS delivery: a study's result objects stored to a DICOMweb service in one request.

``dicomweb[s]://HOST:PORT/PATH`` as for sources. The HTTP rules are the DICOMweb source's
(``cxr_ray.data.dicomweb_http``): the client is made for the target's URL, so credentials
(``dicomweb.username``/``password``/``token``) go to that URL's requests only, never to a
redirect or any other host; credentials over plain HTTP need ``dicomweb.allow_insecure_http``;
``dicomweb.ca_bundle`` wins over the environment. Which targets may get credentials at all
is checked before the run (``deliver.check_results_to``: the source itself or one of
``dicomweb.endpoints``). Timeouts, connection errors and HTTP 5xx/408/429 are retried with
exponential backoff (``dicomweb.retries``, ``backoff_s``, ``max_backoff_s``); once the
server looks down, later studies are tried once each until one succeeds.

Before storing, the target is asked for the study (QIDO-RS with ``includefield``) so the
objects carry the PACS's own PatientName, PatientBirthDate, StudyTime, StudyID and
ReferringPhysicianName (``context.SourceRef.with_study_attributes``).

A STOW-RS answer lists the stored instances (``ReferencedSOPSequence``) and the refused ones
(``FailedSOPSequence`` with a ``FailureReason``); a study counts as delivered only when
none of its objects was refused.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from cxr_ray.config import DicomwebSettings
from cxr_ray.data.dicomweb import endpoint
from cxr_ray.data.dicomweb_http import Caller, describe, make_client
from cxr_ray.writeback.context import STUDY_ATTRIBUTES

__all__ = ["StowSender"]


class StowSender:
    """Stores datasets to one DICOMweb service; ``send`` returns ``None`` or why it failed."""

    def __init__(self, target: str, settings: DicomwebSettings) -> None:
        self.endpoint = endpoint(target)
        self.settings = settings
        self.call = Caller(settings)
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            # DataError (credentials over plain HTTP without the opt-in) reaches the caller.
            self._client = make_client(self.endpoint.url, self.settings)
        return self._client

    def send(self, datasets: Sequence[Any]) -> str | None:
        """Store ``datasets`` (one study's objects) in one STOW-RS request."""
        try:
            answer = self.call(
                "result storage (STOW-RS)",
                functools.partial(self.client.store_instances, datasets=list(datasets)),
            )
        except Exception as exc:
            return f"STOW-RS failed: {describe(exc)}"
        return refused(answer, len(datasets))

    def study_attributes(self, study_uid: str) -> Any:
        """The target's study-level attributes of ``study_uid`` (QIDO-RS, ``STUDY_ATTRIBUTES``)
        as a dataset, or ``None`` when it does not hold the study or the query fails (the
        objects are then written without them; the store that follows says why it failed)."""
        import pydicom

        try:
            found = self.call(
                "study query (QIDO-RS)",
                functools.partial(
                    self.client.search_for_studies,
                    search_filters={"StudyInstanceUID": study_uid},
                    fields=list(STUDY_ATTRIBUTES),
                ),
            )
            return pydicom.Dataset.from_json(found[0]) if len(found) == 1 else None
        except Exception:  # DataError included: the store reports it
            return None

    def close(self) -> None:
        session = getattr(self._client, "_session", None)
        if session is not None:
            session.close()


def refused(answer: Any, sent: int) -> str | None:
    """Why a STOW-RS answer refused some objects (fixed text), or ``None`` when it took all."""
    failed = list(getattr(answer, "FailedSOPSequence", None) or [])
    if not failed:
        return None
    reasons = sorted({f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed})
    return f"the server refused {len(failed)} of {sent} objects (FailureReason {', '.join(reasons)})"
