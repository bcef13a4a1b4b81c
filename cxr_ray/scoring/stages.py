"""The two per-batch stages of the scoring pipeline, testable without Ray.

``decode_stage`` (CPU tasks): raw bytes -> identity, label, preprocessed pixels or an error.
``CxrPredictor`` (actors): builds the engine once per actor; pixels -> probabilities.

Both receive the run's ``PreprocessSpec`` from the driver (``spec_for(card, settings.data)``),
so the decode contract, including ``data.max_pixels``, is the same in the decode tasks and in
a GPU actor that decodes JPEGs itself.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from cxr_ray.data.manifest import identify
from cxr_ray.errors import DecodeError
from cxr_ray.imaging.dicom import DicomHeader, header_columns, read_header
from cxr_ray.imaging.preprocess import PreprocessSpec, decode, sniff_format, to_model_input
from cxr_ray.labels import LABELS, NORMAL
from cxr_ray.models.intended_use import IntendedUse, UseCheck, use_columns

logger = logging.getLogger(__name__)

_PASS = ("image_id", "uri", "patient_id", "label", "status", "error")
#: Columns between the stages that never reach an output table.
INTERNAL = ("pixels", "jpeg", "decoded")
_NOT_DECODED = "internal error: the image was not decoded before scoring (no prediction given)"


class SeenFilter(Protocol):
    """What nightly runs pass as ``seen``: picklable, called inside the decode tasks."""

    def unseen(self, ids: list[str]) -> list[str]:
        """The subset of ``ids`` (sha256 of file bytes) this model version has not scored."""
        ...


class SeenSet:
    """A ``SeenFilter`` over an in-memory set of ids (small ledgers and tests)."""

    def __init__(self, ids: list[str] | set[str] | frozenset[str]) -> None:
        self.ids = frozenset(ids)

    def unseen(self, ids: list[str]) -> list[str]:
        return [i for i in ids if i not in self.ids]


def decode_stage(
    batch: pa.Table,
    *,
    spec: PreprocessSpec,
    seen: SeenFilter | None = None,
    gpu_jpeg: bool = False,
    intended_use: IntendedUse | None = None,
    enforce_intended_use: bool = True,
) -> dict[str, np.ndarray]:
    """Raw rows (``sources.RAW_SCHEMA``) -> rows ready for the predictor.

    ``seen`` drops images already scored by this model version (nightly runs): ids are hashed
    first and only what is new is decoded. A DICOM's header is read first (no pixels): its
    identifiers and acquisition tags become columns, and an image outside ``intended_use``
    becomes a ``skipped`` row with the reason (never decoded, never scored) unless
    ``enforce_intended_use`` is off (the research override, recorded in the row). With
    ``gpu_jpeg`` the JPEG bytes are passed on undecoded (``decoded`` False) for a GPU actor to
    decode; other formats are decoded here either way. ``decoded`` says which rows' ``pixels``
    hold the decoded image.
    """
    rows = batch.to_pylist()
    ids = [hashlib.sha256(r["data"]).hexdigest() if r["data"] is not None else None for r in rows]
    if seen is not None:  # hash first, decode only what this model version has not scored
        new = set(seen.unseen([i for i in ids if i is not None]))
        keep = [k for k, i in enumerate(ids) if i is None or i in new]
        rows, ids = [rows[k] for k in keep], [ids[k] for k in keep]
    out: dict[str, list[Any]] = {k: [] for k in _PASS}
    pixels = np.zeros((len(rows), spec.height, spec.width), np.uint8)
    decoded = np.zeros(len(rows), dtype=bool)
    jpeg: list[bytes | None] = []
    headers: list[DicomHeader | None] = []
    checks: list[UseCheck | None] = []
    for i, (row, image_id) in enumerate(zip(rows, ids, strict=True)):
        data, error = row["data"], row["error"]
        info = identify(row["name"], row["uri"])
        raw = header = check = None
        status = "ok"
        if error is None and data is not None:
            fmt = sniff_format(data, row["name"])
            try:
                header = read_header(data) if fmt == "dicom" else None
            except DecodeError as exc:
                error = str(exc)
            if error is None and intended_use is not None:
                check = intended_use.check(header, enforce=enforce_intended_use)
                if not check.scored:
                    status, error = "skipped", check.reason
            if error is None and gpu_jpeg and fmt == "jpeg":
                raw = data
            elif error is None:
                try:
                    pixels[i] = decode(data, spec, row["name"]).pixels
                    decoded[i] = True
                except DecodeError as exc:
                    error = str(exc)
        elif error is None:
            error = "no image data"
        out["image_id"].append(image_id)
        out["uri"].append(row["uri"])
        out["patient_id"].append(info.patient_id)
        out["label"].append(row.get("label") or info.label)
        out["status"].append(status if status == "skipped" else ("error" if error else "ok"))
        out["error"].append(error)
        jpeg.append(raw)
        headers.append(header)
        checks.append(check)
    result = {k: np.array(v, dtype=object) for k, v in out.items()}
    extra = header_columns(headers, out["patient_id"]) | use_columns(checks)
    for name, column in extra.items():
        result[name] = np.array(column.to_pylist(), dtype=object)
    result["pixels"] = pixels
    result["decoded"] = decoded
    if gpu_jpeg:
        result["jpeg"] = np.array(jpeg, dtype=object)
    return result


class CxrPredictor:
    """Ray Data actor: builds the engine once, then scores batches.

    Rows that failed decoding (or were skipped) pass through with null probabilities; every
    input row comes out, with every column it came in with. A row is ``ok`` only if the
    model saw its decoded pixels: JPEGs passed on undecoded are decoded on this actor's GPU
    when its engine runs on CUDA, and on the CPU otherwise.
    """

    def __init__(
        self,
        payload: Any,
        *,
        spec: PreprocessSpec,
        gpu_decode: bool = False,
        keep_pixels: bool = False,
    ) -> None:
        import ray

        from cxr_ray.engines import EnginePayload, build

        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        assert isinstance(payload, EnginePayload)
        self._check_gpus(ray)
        self.engine = build(payload)
        self.spec = spec
        self.threshold = payload.card.pneumonia_threshold
        self.normal = LABELS.index(NORMAL)
        self.gpu_decode = (
            gpu_decode
            and getattr(self.engine, "device", "cpu") == "cuda"
            and hasattr(self.engine, "run_tensor")
        )
        self.keep_pixels = keep_pixels  # for a Grad-CAM stage downstream
        logger.info(
            "predictor ready: %s on %s (JPEG decode on %s)",
            self.engine.name,
            self.engine.device,
            "GPU" if self.gpu_decode else "CPU",
        )

    @staticmethod
    def _check_gpus(ray: Any) -> None:
        """An actor given GPUs that CUDA cannot use says why, once, at start (an old driver is
        the usual cause); CPU engines still score correctly, TensorRT then refuses to build."""
        from cxr_ray.engines.base import cuda_problem

        gpus = ray.get_gpu_ids() if ray.is_initialized() else []
        problem = cuda_problem() if gpus else None
        if problem is not None:
            logger.warning("predictor given GPU %s, but %s: scoring on the CPU", gpus, problem)

    def _cpu_decode(self, batch: dict[str, np.ndarray], rows: list[int], errors: np.ndarray) -> list[int]:
        """Decode undecoded JPEG rows on the CPU into ``batch["pixels"]``; returns the successes."""
        done = []
        for i in rows:
            try:
                batch["pixels"][i] = decode(batch["jpeg"][i], self.spec).pixels
                done.append(i)
            except DecodeError as exc:
                errors[i] = str(exc)
        return done

    def _probs(
        self, batch: dict[str, np.ndarray], ok: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probabilities, error messages, which rows were scored from decoded pixels)."""
        n = len(ok)
        probs = np.full((n, len(LABELS)), np.nan, np.float32)
        # A column of only missing values reaches the actor as float NaN (Ray's conversion):
        # messages need an object column with None for "no error".
        errors = np.array([e if isinstance(e, str) else None for e in batch["error"]], dtype=object)
        decoded = batch.get("decoded", np.ones(n, dtype=bool)).copy()
        jpeg = batch.get("jpeg")
        pending = [int(i) for i in np.flatnonzero(ok & ~decoded)] if jpeg is not None else []
        pending = [i for i in pending if jpeg is not None and jpeg[i] is not None]
        scored = np.zeros(n, dtype=bool)
        if pending and self.gpu_decode:
            import torch

            from cxr_ray.imaging.gpu_decode import decode_batch

            x, errs = decode_batch([jpeg[i] for i in pending], self.spec, device="cuda")  # type: ignore[index]
            # torchvision's CUDA decoder writes on its own stream; the engine reads on another.
            # Without this the model could read a partly written batch (today each batch also
            # ends with a synchronous .cpu(), but nothing may overlap decode and inference
            # without this barrier).
            torch.cuda.synchronize()
            good = [k for k, e in enumerate(errs) if e is None]
            if good:
                out = self.engine.run_tensor(x[good])  # type: ignore[attr-defined]
                rows = [pending[k] for k in good]
                probs[rows] = out.cpu().numpy()
                scored[rows] = True
            for k, e in enumerate(errs):
                if e is not None:
                    errors[pending[k]] = e
        elif pending:  # undecoded JPEGs reached an actor that cannot decode them on a GPU
            # Ray hands the actor read-only (zero-copy) arrays: decode into a copy.
            batch["pixels"] = np.array(batch["pixels"], copy=True)
            decoded[self._cpu_decode(batch, pending, errors)] = True
        cpu_rows = np.flatnonzero(ok & decoded & ~scored)
        if len(cpu_rows):
            probs[cpu_rows] = self.engine(to_model_input(batch["pixels"][cpu_rows]))
            scored[cpu_rows] = True
        return probs, errors, scored

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = dict(batch)  # the stage may replace arrays, never the caller's dict
        status_in = batch["status"]
        ok = status_in == "ok"
        probs, errors, scored = self._probs(batch, ok)
        lost = ok & ~scored & (errors == None)  # noqa: E711  (object array)
        if lost.any():  # never happens by construction; if it did, no diagnosis without pixels
            logger.error("%d rows reached the model without decoded pixels", int(lost.sum()))
            errors = np.where(lost, _NOT_DECODED, errors)
        finite = np.isfinite(probs).all(axis=1)
        errors = np.where(ok & scored & ~finite & (errors == None), "model output is not finite", errors)  # noqa: E711
        ok = ok & scored & finite
        assert not (ok & ~scored).any(), "a row is ok only if the model scored its decoded pixels"
        pneumonia = 1.0 - probs[:, self.normal]
        pred = np.array([LABELS[i] for i in np.nan_to_num(probs).argmax(axis=1)], dtype=object)
        pred[~ok] = None
        # A plain bool column (False on other rows; the writer nulls those): an object column
        # of None would reach Arrow as float NaN, and NaN cast to bool is True.
        flagged = ok & (np.nan_to_num(pneumonia) >= self.threshold)
        out: dict[str, np.ndarray] = {k: v for k, v in batch.items() if k not in INTERNAL}
        out["pred_label"] = pred
        out["prob_normal"] = probs[:, 0]
        out["prob_bacterial"] = probs[:, 1]
        out["prob_viral"] = probs[:, 2]
        out["prob_pneumonia"] = pneumonia.astype(np.float32)
        out["flagged"] = flagged
        # Rows that came in skipped stay skipped (with their reason); failures become errors.
        out["status"] = np.where(ok, "ok", np.where(status_in == "skipped", "skipped", "error")).astype(
            object
        )
        out["error"] = np.where(ok, np.array(None), errors)
        out["engine"] = np.full(len(ok), self.engine.name, dtype=object)
        if self.keep_pixels:
            out["pixels"] = batch["pixels"]
        return out
