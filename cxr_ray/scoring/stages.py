"""The two per-batch stages of the scoring pipeline, testable without Ray.

``decode_stage`` (CPU tasks): raw bytes -> identity, label, preprocessed pixels or an error.
``CxrPredictor`` (actors): builds the engine once per actor; pixels -> raw logits and
penultimate features -> the card's calibrated probabilities (``ModelCard.probabilities``).

Besides the prediction columns, the predictor's batches carry two internal per-row columns
for the run's drift check (never written to an output table; ``INTERNAL``):
``features`` (``float32 [n, F]``, the network's penultimate features; NaN rows where the row
was not scored) and ``input_stats`` (``float32 [n, len(INPUT_STATS)]``, the statistics of
``cxr_ray.imaging.stats`` over the exact uint8 pixels the model saw and the original size;
NaN rows where the row was not decoded). Ray Data carries them as tensor columns; on the
driver, ``tensor_column(block, name)`` gets the ``numpy`` array back from a pyarrow block.

Both receive the run's ``PreprocessSpec`` from the driver (``spec_for(card, settings.data)``),
so the decode contract, including ``data.max_pixels``, is the same in the decode tasks and in
a GPU actor that decodes JPEGs itself.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, NamedTuple, Protocol

import numpy as np
import pyarrow as pa

from cxr_ray.data.manifest import identify
from cxr_ray.errors import DecodeError, row_error, row_text, safe_row_error
from cxr_ray.imaging.dicom import DicomHeader, header_columns, read_header
from cxr_ray.imaging.preprocess import PreprocessSpec, decode, sniff_format, to_model_input
from cxr_ray.imaging.stats import INPUT_STATS
from cxr_ray.labels import LABELS, NORMAL
from cxr_ray.models.intended_use import IntendedUse, UseCheck, use_columns
from cxr_ray.vocabulary import ErrorCode, Status

logger = logging.getLogger(__name__)

_PASS = ("image_id", "uri", "patient_id", "label", "status", "error")
#: The predictor's per-row drift inputs (see the module docstring).
FEATURES = "features"
INPUT_STATS_COLUMN = "input_stats"
#: Columns between the stages that never reach an output table: the decode stage's pixels,
#: undecoded JPEG bytes, which rows hold decoded pixels and their original size (0 where
#: unknown), and the predictor's drift inputs.
INTERNAL = ("pixels", "jpeg", "decoded", "source_width", "source_height", FEATURES, INPUT_STATS_COLUMN)
_NOT_DECODED = row_error(ErrorCode.INTERNAL, "the image was not decoded before scoring (no prediction given)")
_NOT_FINITE = row_error(ErrorCode.NOT_FINITE, "model output is not finite")


def _read_header(data: bytes) -> tuple[DicomHeader | None, str | None]:
    """(header, None) or (None, the row error): unreadable DICOM unless the error says more."""
    try:
        return read_header(data), None
    except DecodeError as exc:
        code = ErrorCode.DICOM_UNREADABLE if exc.code == ErrorCode.UNDECODABLE else exc.code
        return None, row_error(code, str(exc))


def _skip_reason(check: UseCheck) -> str:
    """A skipped row's ``error``: ``out_of_scope`` or ``unparseable_tag`` and the check's reason."""
    code = ErrorCode.UNPARSEABLE_TAG if check.outcome == "unparseable" else ErrorCode.OUT_OF_SCOPE
    return row_error(code, check.reason or "outside the model's intended use")


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
    hold the decoded image, ``source_width`` / ``source_height`` its original size (0 where
    the row was not decoded here).
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
    sizes = np.zeros((len(rows), 2), np.int32)
    jpeg: list[bytes | None] = []
    headers: list[DicomHeader | None] = []
    checks: list[UseCheck | None] = []
    for i, (row, image_id) in enumerate(zip(rows, ids, strict=True)):
        # A reader's error text is "<code>: <detail>" already; anything else becomes internal.
        data, error = row["data"], safe_row_error(row["error"])
        info = identify(row["name"], row["uri"])
        raw = header = check = None
        status = Status.OK.value
        if error is None and data is not None:
            fmt = sniff_format(data, row["name"])
            header, error = _read_header(data) if fmt == "dicom" else (None, None)
            if error is None and intended_use is not None:
                check = intended_use.check(header, enforce=enforce_intended_use)
                if not check.scored:
                    status, error = Status.SKIPPED.value, _skip_reason(check)
            if error is None and gpu_jpeg and fmt == "jpeg":
                raw = data
            elif error is None:
                try:
                    d = decode(data, spec, row["name"])
                    pixels[i], sizes[i], decoded[i] = d.pixels, (d.width, d.height), True
                except DecodeError as exc:
                    error = row_text(exc)
        elif error is None:
            error = row_error(ErrorCode.NO_DATA, "the row has no image bytes")
        out["image_id"].append(image_id)
        out["uri"].append(row["uri"])
        out["patient_id"].append(info.patient_id)
        out["label"].append(row.get("label") or info.label)
        if status != Status.SKIPPED:
            status = Status.ERROR.value if error else Status.OK.value
        out["status"].append(status)
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
    result["source_width"], result["source_height"] = sizes[:, 0], sizes[:, 1]
    if gpu_jpeg:
        result["jpeg"] = np.array(jpeg, dtype=object)
    return result


class CxrPredictor:
    """Ray Data actor: builds the engine once, then scores batches.

    Rows that failed decoding (or were skipped) pass through with null probabilities; every
    input row comes out, with every column it came in with. A row is ``ok`` only if the
    model saw its decoded pixels: JPEGs passed on undecoded are decoded on this actor's GPU
    when its engine runs on CUDA, and on the CPU otherwise. Probabilities are the card's
    ``probabilities(logits)`` (temperature, site logit scale and bias), for every engine.
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
        self.card = payload.card
        self.spec = spec
        self.threshold = payload.card.pneumonia_threshold
        self.normal = LABELS.index(NORMAL)
        self.gpu_decode = (
            gpu_decode
            and getattr(self.engine, "device", "cpu") == "cuda"
            and hasattr(self.engine, "run_tensor")
        )
        self.keep_pixels = keep_pixels  # for a Grad-CAM stage downstream
        # The feature width, once: every batch's features column has it, even a batch with no
        # scored row (Ray cannot concatenate tensor columns of different shapes).
        _, features = self.engine(to_model_input(np.zeros((1, spec.height, spec.width), np.uint8)))
        self.n_features = int(features.shape[1])
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

    def _cpu_decode(
        self, batch: dict[str, np.ndarray], rows: list[int], errors: np.ndarray, sizes: np.ndarray
    ) -> list[int]:
        """Decode undecoded JPEG rows on the CPU into ``batch["pixels"]``; returns the successes."""
        done = []
        for i in rows:
            try:
                d = decode(batch["jpeg"][i], self.spec)
            except DecodeError as exc:
                errors[i] = row_text(exc)
                continue
            batch["pixels"][i], sizes[i] = d.pixels, (d.width, d.height)
            done.append(i)
        return done

    def _score(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> _Scored:
        """Run the engine on every ``ok`` row's decoded pixels (decoding JPEGs left undecoded)."""
        n = len(ok)
        logits = np.full((n, len(LABELS)), np.nan, np.float32)
        features = np.full((n, self.n_features), np.nan, np.float32)
        stats = np.full((n, len(INPUT_STATS)), np.nan, np.float32)
        # A column of only missing values reaches the actor as float NaN (Ray's conversion):
        # messages need an object column with None for "no error".
        errors = np.array([e if isinstance(e, str) else None for e in batch["error"]], dtype=object)
        decoded = batch.get("decoded", np.ones(n, dtype=bool)).copy()
        sizes = np.stack([_sizes(batch, "source_width", n), _sizes(batch, "source_height", n)], axis=1)
        jpeg = batch.get("jpeg")
        pending = [int(i) for i in np.flatnonzero(ok & ~decoded)] if jpeg is not None else []
        pending = [i for i in pending if jpeg is not None and jpeg[i] is not None]
        scored = np.zeros(n, dtype=bool)
        if pending and self.gpu_decode:
            import torch

            from cxr_ray.imaging.gpu_decode import decode_pixels, to_input

            gpu = decode_pixels([jpeg[i] for i in pending], self.spec, device="cuda")  # type: ignore[index]
            # torchvision's CUDA decoder writes on its own stream; the engine reads on another.
            # Without this the model could read a partly written batch (today each batch also
            # ends with a synchronous .cpu(), but nothing may overlap decode and inference
            # without this barrier).
            torch.cuda.synchronize()
            good = [k for k, e in enumerate(gpu.errors) if e is None]
            if good:
                seen_pixels = gpu.pixels[good]
                lo, fe = self.engine.run_tensor(to_input(seen_pixels))  # type: ignore[attr-defined]
                rows = [pending[k] for k in good]
                logits[rows], features[rows] = lo.cpu().numpy(), fe.cpu().numpy()
                # The same uint8 pixels the model saw (3 MB per 64 images over PCIe).
                sizes[rows] = [gpu.sizes[k] for k in good]
                stats[rows] = pixel_stats(seen_pixels[:, 0].cpu().numpy(), sizes[rows])
                scored[rows] = True
            for k, e in enumerate(gpu.errors):
                if e is not None:
                    errors[pending[k]] = safe_row_error(e, ErrorCode.UNDECODABLE)
        elif pending:  # undecoded JPEGs reached an actor that cannot decode them on a GPU
            # Ray hands the actor read-only (zero-copy) arrays: decode into a copy.
            batch["pixels"] = np.array(batch["pixels"], copy=True)
            decoded[self._cpu_decode(batch, pending, errors, sizes)] = True
        cpu_rows = np.flatnonzero(ok & decoded & ~scored)
        if len(cpu_rows):
            pixels = batch["pixels"][cpu_rows]
            logits[cpu_rows], features[cpu_rows] = self.engine(to_model_input(pixels))
            stats[cpu_rows] = pixel_stats(pixels, sizes[cpu_rows])
            scored[cpu_rows] = True
        return _Scored(logits, features, stats, errors, scored)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = dict(batch)  # the stage may replace arrays, never the caller's dict
        status_in = batch["status"]
        ok = status_in == Status.OK.value
        s = self._score(batch, ok)
        errors, scored = s.errors, s.scored
        lost = ok & ~scored & (errors == None)  # noqa: E711  (object array)
        if lost.any():  # never happens by construction; if it did, no diagnosis without pixels
            logger.error("%d rows reached the model without decoded pixels", int(lost.sum()))
            errors = np.where(lost, _NOT_DECODED, errors)
        # Calibration in float64, the same for every engine; unscored rows stay NaN.
        probs = np.asarray(self.card.probabilities(s.logits.astype(np.float64)), np.float64)
        finite = np.isfinite(probs).all(axis=1) & np.isfinite(s.logits).all(axis=1)
        errors = np.where(ok & scored & ~finite & (errors == None), _NOT_FINITE, errors)  # noqa: E711
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
        out["prob_normal"] = probs[:, 0].astype(np.float32)
        out["prob_bacterial"] = probs[:, 1].astype(np.float32)
        out["prob_viral"] = probs[:, 2].astype(np.float32)
        out["prob_pneumonia"] = pneumonia.astype(np.float32)
        out["flagged"] = flagged
        # Rows that came in skipped stay skipped (with their reason); failures become errors.
        skipped = status_in == Status.SKIPPED.value
        status = np.where(ok, Status.OK.value, np.where(skipped, Status.SKIPPED.value, Status.ERROR.value))
        out["status"] = status.astype(object)
        out["error"] = np.where(ok, np.array(None), errors)
        out["engine"] = np.full(len(ok), self.engine.name, dtype=object)
        # Drift inputs: features of scored rows only; input statistics of every decoded row.
        out[FEATURES] = np.where(ok[:, None], s.features, np.float32(np.nan))
        out[INPUT_STATS_COLUMN] = s.stats
        if self.keep_pixels:
            out["pixels"] = batch["pixels"]
        return out


class _Scored(NamedTuple):
    logits: np.ndarray  # float32 [n, 3], NaN where not scored
    features: np.ndarray  # float32 [n, F], NaN where not scored
    stats: np.ndarray  # float32 [n, len(INPUT_STATS)], NaN where not decoded
    errors: np.ndarray  # object [n]: message or None
    scored: np.ndarray  # bool [n]: the model saw the row's decoded pixels


def _sizes(batch: dict[str, np.ndarray], name: str, n: int) -> np.ndarray:
    """An original-size column as float (NaN where unknown: absent, 0, or NaN from Ray)."""
    col = batch.get(name)
    if col is None:
        return np.full(n, np.nan)
    v = np.asarray(col, dtype=np.float64)
    return np.where(v > 0, v, np.nan)


def pixel_stats(pixels: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``cxr_ray.imaging.stats.input_stats`` of the pixels the model saw; ``sizes`` is
    ``[n, 2]`` (original width, height)."""
    from cxr_ray.imaging.stats import input_stats

    sizes = np.asarray(sizes).reshape(len(pixels), 2)
    return input_stats(pixels, sizes[:, 0], sizes[:, 1])


def tensor_column(block: pa.Table, name: str) -> np.ndarray:
    """A 2-D column of a pyarrow block (``iter_batches(batch_format="pyarrow")``) as ``numpy``
    ``[n, k]``: the predictor's ``features`` and ``input_stats``.

    Ray Data stores a ``numpy`` batch's 2-D column as its tensor extension type; a plain
    fixed-size list (or pyarrow's own fixed-shape tensor type) also works. An empty block gives
    ``[0, k]`` (``[0, 0]`` when its type does not say ``k``).

    >>> feats = tensor_column(block, "features")  # doctest: +SKIP
    >>> feats.shape, feats.dtype
    ((1024, 1280), dtype('float32'))
    """
    column = block.column(name)
    parts = [_chunk_array(chunk) for chunk in column.chunks if len(chunk)]
    if not parts:
        return np.zeros((0, _width(column.type)), np.float32)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _chunk_array(chunk: pa.Array) -> np.ndarray:
    if isinstance(chunk, pa.ExtensionArray):
        to_numpy = getattr(chunk, "to_numpy", None)  # Ray's ArrowTensorArray
        if isinstance(chunk.type, pa.FixedShapeTensorType):
            return np.asarray(chunk.to_numpy_ndarray())
        if to_numpy is not None:
            arr = np.asarray(to_numpy(zero_copy_only=False))
            if arr.dtype != object:
                return arr
        chunk = chunk.storage
    if pa.types.is_fixed_size_list(chunk.type):
        width = chunk.type.list_size
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(len(chunk), width)
    if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
        return np.stack([np.asarray(v, dtype=np.float32) for v in chunk.to_pylist()])
    raise TypeError(f"column of type {chunk.type} is not a 2-D tensor column")


def _width(typ: pa.DataType) -> int:
    shape = getattr(typ, "shape", None)  # Ray's tensor types and pyarrow's fixed-shape tensor
    if shape is not None and len(shape) == 1 and shape[0] is not None:
        return int(shape[0])
    storage = getattr(typ, "storage_type", typ)
    return int(storage.list_size) if pa.types.is_fixed_size_list(storage) else 0
