"""The two per-batch stages of the scoring pipeline, testable without Ray.

``decode_stage`` (CPU tasks): raw bytes -> identity, label, preprocessed pixels or an error.
``CxrPredictor`` (actors): loads the engine once per actor; pixels -> probabilities.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from cxr_ray.data.manifest import identify
from cxr_ray.errors import DecodeError
from cxr_ray.imaging.preprocess import PreprocessSpec, decode, sniff_format, to_model_input
from cxr_ray.labels import LABELS, NORMAL
from cxr_ray.models.card import spec_for

logger = logging.getLogger(__name__)

_PASS = ("image_id", "uri", "patient_id", "label", "status", "error")


def decode_stage(
    batch: pa.Table, *, spec: PreprocessSpec, seen: Any = None, gpu_jpeg: bool = False
) -> dict[str, np.ndarray]:
    """Raw rows (``sources.RAW_SCHEMA``) -> rows ready for the predictor.

    ``seen`` (an actor handle with ``new_ids``) drops images already scored by this model
    version (nightly runs). With ``gpu_jpeg`` the JPEG bytes are passed on undecoded for the
    actor to decode on its GPU; other formats are decoded here either way.
    """
    rows = batch.to_pylist()
    ids = [hashlib.sha256(r["data"]).hexdigest() if r["data"] is not None else None for r in rows]
    if seen is not None:  # hash first, decode only what this model version has not scored
        import ray

        new = set(ray.get(seen.new_ids.remote([i for i in ids if i is not None])))
        keep = [k for k, i in enumerate(ids) if i is None or i in new]
        rows, ids = [rows[k] for k in keep], [ids[k] for k in keep]
    out: dict[str, list[Any]] = {k: [] for k in _PASS}
    pixels = np.zeros((len(rows), spec.height, spec.width), np.uint8)
    jpeg: list[bytes | None] = []
    for i, (row, image_id) in enumerate(zip(rows, ids, strict=True)):
        data, error = row["data"], row["error"]
        info = identify(row["name"], row["uri"])
        raw = None
        if error is None and data is not None:
            if gpu_jpeg and sniff_format(data) == "jpeg":
                raw = data
            else:
                try:
                    pixels[i] = decode(data, spec, row["name"]).pixels
                except DecodeError as exc:
                    error = str(exc)
        out["image_id"].append(image_id)
        out["uri"].append(row["uri"])
        out["patient_id"].append(info.patient_id)
        out["label"].append(row.get("label") or info.label)
        out["status"].append("error" if error else "ok")
        out["error"].append(error)
        jpeg.append(raw)
    result = {k: np.array(v, dtype=object) for k, v in out.items()}
    result["pixels"] = pixels
    if gpu_jpeg:
        result["jpeg"] = np.array(jpeg, dtype=object)
    return result


class CxrPredictor:
    """Ray Data actor: builds the engine once, then scores batches.

    Rows that failed decoding pass through with null probabilities; every input row comes out.
    """

    def __init__(self, payload: Any, *, gpu_decode: bool = False, keep_pixels: bool = False) -> None:
        import ray

        from cxr_ray.engines import EnginePayload, build_engine, select_engine

        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        assert isinstance(payload, EnginePayload)
        if payload.engine == "auto":  # resolved where the actor runs (GPU workers)
            import dataclasses

            payload = dataclasses.replace(payload, engine=select_engine("auto"))
        self.engine = build_engine(payload)
        card = payload.card
        self.spec = spec_for(card)
        self.threshold = card.pneumonia_threshold
        self.normal = LABELS.index(NORMAL)
        self.gpu_decode = gpu_decode and getattr(self.engine, "device", "cpu") == "cuda"
        self.keep_pixels = keep_pixels  # for a Grad-CAM stage downstream
        logger.info("predictor ready: %s on %s", self.engine.name, self.engine.device)

    def _probs(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(ok)
        probs = np.full((n, len(LABELS)), np.nan, np.float32)
        errors = batch["error"].copy()
        jpeg = batch.get("jpeg")
        if self.gpu_decode and jpeg is not None:
            from cxr_ray.imaging.gpu_decode import decode_batch

            idx = [i for i in np.flatnonzero(ok) if jpeg[i] is not None]
            cpu_idx = [i for i in np.flatnonzero(ok) if jpeg[i] is None]
            if idx:
                x, errs = decode_batch([jpeg[i] for i in idx], self.spec, device="cuda")
                good = [k for k, e in enumerate(errs) if e is None]
                if good:
                    out = self.engine.run_tensor(x[good])  # type: ignore[attr-defined]
                    probs[[idx[k] for k in good]] = out.cpu().numpy()
                for k, e in enumerate(errs):
                    if e is not None:
                        errors[idx[k]] = e
            if cpu_idx:
                probs[cpu_idx] = self.engine(to_model_input(batch["pixels"][cpu_idx]))
        elif ok.any():
            probs[ok] = self.engine(to_model_input(batch["pixels"][ok]))
        return probs, errors

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["status"] == "ok"
        probs, errors = self._probs(batch, ok)
        finite = np.isfinite(probs).all(axis=1)
        errors = np.where(ok & ~finite & (errors == None), "model output is not finite", errors)  # noqa: E711
        ok = ok & finite
        pneumonia = 1.0 - probs[:, self.normal]
        pred = np.array([LABELS[i] for i in np.nan_to_num(probs).argmax(axis=1)], dtype=object)
        pred[~ok] = None
        # A plain bool column (False on error rows; the writer nulls those): an object column
        # of None would reach Arrow as float NaN, and NaN cast to bool is True.
        flagged = ok & (np.nan_to_num(pneumonia) >= self.threshold)
        out: dict[str, np.ndarray] = {k: batch[k] for k in ("image_id", "uri", "patient_id", "label")}
        out["pred_label"] = pred
        out["prob_normal"] = probs[:, 0]
        out["prob_bacterial"] = probs[:, 1]
        out["prob_viral"] = probs[:, 2]
        out["prob_pneumonia"] = pneumonia.astype(np.float32)
        out["flagged"] = flagged
        out["status"] = np.where(ok, "ok", "error").astype(object)
        out["error"] = np.where(ok, np.array(None), errors)
        out["engine"] = np.full(len(ok), self.engine.name, dtype=object)
        if self.keep_pixels:
            out["pixels"] = batch["pixels"]
        return out


class SeenIndex:
    """Ray actor holding the image ids a model version has already scored (nightly runs)."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = frozenset(ids)

    def new_ids(self, ids: list[str]) -> list[str]:
        return [i for i in ids if i not in self.ids]
