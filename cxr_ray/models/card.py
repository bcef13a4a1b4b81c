"""The model card: everything needed to use a set of weights correctly, saved beside them.

Scoring, export and reports derive preprocessing, label order, thresholds and calibration
from the card; nothing else hard-codes 224 or the label order.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cxr_ray.config import DataSettings, ModelSettings
from cxr_ray.errors import ModelError
from cxr_ray.imaging.preprocess import PreprocessSpec
from cxr_ray.labels import LABELS
from cxr_ray.models.intended_use import IntendedUse
from cxr_ray.vocabulary import INTENSITY_MODES

CARD_FILE = "model_card.json"

#: What the model is for; the scope (who, which images) is generated from the enforced block.
PURPOSE = (
    "Research and triage support for chest X-rays: normal vs bacterial vs viral pneumonia. "
    "Not a diagnostic device; a clinician reads every study."
)
#: The purpose text cards carried before it was generated (it named an age range and view that
#: scoring did not enforce); such cards are shown with ``PURPOSE`` and the enforced scope.
_LEGACY_PURPOSE = (
    "Research and triage support for pediatric (1-5 years) frontal chest X-rays: normal vs "
    "bacterial vs viral pneumonia. Not a diagnostic device; a clinician reads every study."
)


def intended_use_prose(policy: IntendedUse) -> str:
    """The enforced intended-use block in words, for model cards and reports.

    >>> print(intended_use_prose(IntendedUse()))  # doctest: +NORMALIZE_WHITESPACE
    Intended use (enforced at scoring): patients 0-17 years; chest (body part CHEST) radiographs,
    modality CR or DX, view PA or AP. A DICOM image whose tags fall outside this (another
    modality such as CT, another body part, a lateral view, an age outside 0-17 years) is
    skipped with the reason, not scored. JPEG and PNG images carry no such tags: they are scored
    and marked "unchecked", so the user must make sure they are in scope.
    """
    views = " or ".join(policy.views)
    others = [
        "another modality such as CT" if "CT" not in policy.modalities else "another modality",
        "another body part",
        "a lateral view" if not {"LL", "RL", "LAT", "LATERAL"} & set(policy.views) else "another view",
        f"an age outside {policy.age_range()}",
    ]
    return (
        f"Intended use (enforced at scoring): patients {policy.age_range()}; "
        f"{', '.join(b.lower() for b in policy.body_parts)} (body part {', '.join(policy.body_parts)}) "
        f"radiographs, modality {' or '.join(policy.modalities)}, view {views}. A DICOM image whose tags "
        f"fall outside this ({', '.join(others)}) is skipped with the reason, not scored. JPEG and PNG "
        'images carry no such tags: they are scored and marked "unchecked", so the user must make '
        "sure they are in scope."
    )


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cxr-ray")
    except PackageNotFoundError:
        return "0+unknown"


class ModelCard(BaseModel):
    """Frozen description of a trained model (``model_card.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    arch: str
    labels: tuple[str, ...] = LABELS
    #: (height, width) of the network input.
    input_size: tuple[int, int] = (224, 224)
    in_chans: Literal[1] = 1
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    intensity: str = "none"
    resize: Literal["squash"] = "squash"
    interpolation: Literal["bilinear"] = "bilinear"
    #: The JPEG quality the training images were stored at, at the input size, when they
    #: share one (detected at training, ``cxr_ray.imaging.storage_form``): scoring re-encodes
    #: an image it resized at this quality. ``None``: not recorded (older cards), no re-encode.
    storage_jpeg_quality: int | None = Field(default=None, ge=1, le=100)
    #: Softmax temperature fitted on validation (1.0 = uncalibrated).
    temperature: float = Field(default=1.0, gt=0)
    #: Per-class logit scale and offset applied after the temperature (site calibration,
    #: ``cxr-ray calibrate``): ``p = softmax(logit_scale * logits / temperature + logit_bias)``
    #: (``cxr_ray.calibration.calibrated_probs``). Identity for a freshly trained model.
    logit_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    logit_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: A derived artifact's origin (``cxr-ray calibrate``): parent version and weights hash,
    #: sample fingerprint and size, fitted values, date. ``None`` for a trained artifact.
    lineage: dict[str, Any] | None = None
    #: The drift reference stored beside the weights (written at training from the
    #: validation split, ``cxr_ray.models.reference``), and its SHA-256 (checked on load).
    drift_reference_file: str | None = None
    drift_reference_sha256: str | None = None
    #: Decision thresholds; ``pneumonia`` applies to P(bacterial) + P(viral).
    thresholds: dict[str, float] = Field(default_factory=lambda: {"pneumonia": 0.5})
    #: Grad-CAM target layer (dotted module name inside ``CxrNet``).
    target_layer: str
    weights_file: str = "model.safetensors"
    weights_sha256: str
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    package_version: str = Field(default_factory=_package_version)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    #: The purpose in words (who may use it for what). The population and images it may read
    #: are the enforced ``intended_use_policy``; ``intended_use_statement`` joins the two.
    intended_use: str = PURPOSE
    #: What scoring lets the model read (modality, body part, view, age); images outside are
    #: skipped. Cards written before this field existed get the pediatric default.
    intended_use_policy: IntendedUse = Field(default_factory=IntendedUse)

    @field_validator("labels")
    @classmethod
    def _labels_known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if tuple(v) != LABELS:
            raise ValueError(f"labels {list(v)} differ from this cxr-ray's {list(LABELS)}")
        return v

    @field_validator("intensity")
    @classmethod
    def _intensity_known(cls, v: str) -> str:
        if v not in INTENSITY_MODES:
            raise ValueError(f"unknown intensity mode {v!r}")
        return v

    @property
    def version(self) -> str:
        """Model version used in predictions and ledgers: arch + weights hash prefix, and for a
        site-calibrated artifact (``lineage``) a suffix hashing its calibration, so that a
        derived model with the parent's weights is a different version in every ledger."""
        base = f"{self.arch}-{self.weights_sha256[:12]}"
        if self.lineage is None:
            return base
        return f"{base}-cal{self.calibration_fingerprint[:8]}"

    @property
    def calibration_fingerprint(self) -> str:
        """SHA-256 of what turns logits into probabilities and flags (temperature, per-class
        scale and bias, thresholds)."""
        import hashlib

        fitted = {
            "temperature": self.temperature,
            "logit_scale": list(self.logit_scale),
            "logit_bias": list(self.logit_bias),
            "thresholds": dict(sorted(self.thresholds.items())),
        }
        return hashlib.sha256(json.dumps(fitted, sort_keys=True).encode()).hexdigest()

    @property
    def engine_key(self) -> str:
        """What an exported engine model depends on (arch + weights hash, not calibration):
        engines output raw logits, so calibrated versions of one network share engines."""
        return f"{self.arch}-{self.weights_sha256[:12]}"

    def probabilities(self, logits: Any) -> Any:
        """Calibrated class probabilities (float64 ``[N, 3]``) from raw logits ``[N, 3]``."""
        from cxr_ray.calibration import calibrated_probs

        return calibrated_probs(logits, self.temperature, self.logit_scale, self.logit_bias)

    @property
    def intended_use_statement(self) -> str:
        """The card's intended use in words, its scope generated from the enforced block (so
        what the card says is what scoring checks)."""
        purpose = PURPOSE if self.intended_use.strip() == _LEGACY_PURPOSE else self.intended_use.strip()
        return f"{purpose} {intended_use_prose(self.intended_use_policy)}"

    @property
    def pneumonia_threshold(self) -> float:
        return float(self.thresholds.get("pneumonia", 0.5))

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "model_card.json") -> ModelCard:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(card)'}: {e['msg']}" for e in exc.errors()
            )
            raise ModelError(f"invalid model card {where}: {problems}") from None


def spec_for(model: ModelCard | ModelSettings, data: DataSettings | None = None) -> PreprocessSpec:
    """The preprocessing spec for a model under ``data`` settings: the one way to build one.

    ``model`` is a trained model's card, or (training, before there is a card) the model
    settings the card will be written from. Training, the decode stage, the predictor's
    GPU-decode path and the split-image readers all call this, so a setting such as
    ``data.max_pixels`` (the decompression-bomb limit) means the same on every node and device.
    """
    data = data or DataSettings()
    if isinstance(model, ModelSettings):
        h = w = model.input_size
        return PreprocessSpec(height=h, width=w, intensity=model.intensity, max_pixels=data.max_pixels)
    card = model
    h, w = card.input_size
    return PreprocessSpec(
        height=h,
        width=w,
        intensity=card.intensity,
        max_pixels=data.max_pixels,
        storage_jpeg_quality=card.storage_jpeg_quality,
    )
