"""One settings tree for every command and job.

Built once on the driver (CLI or job entrypoint) from, highest priority first: explicit
overrides (CLI flags), ``CXR_*`` environment variables (``__`` separates levels, e.g.
``CXR_TRAIN__WORKERS=4``), an optional TOML file, then the defaults below. Workers never
build ``Settings()`` themselves: they receive ``settings.model_dump(mode="json")`` dicts.

>>> s = load_settings(overrides={"train": {"epochs": 3}})
>>> s.train.epochs
3
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cxr_ray.errors import ConfigError
from cxr_ray.vocabulary import ARCHITECTURES, ENGINES, INTENSITY_MODES, SITE_METHODS

_URI = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<rest>.*)$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")

PositiveFloat = Annotated[float, Field(gt=0)]


def _one_of(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_uri(value: str) -> str:
    """Accept local paths and ``scheme://bucket/key`` URIs; reject malformed URIs early."""
    m = _URI.match(value)
    if m is None:
        if "://" in value or value.startswith(("s3:", "gs:")):
            raise ValueError(f"malformed URI {value!r}: expected s3://bucket/key or gs://bucket/key")
        return value
    scheme = m.group("scheme")
    if scheme == "file":
        return value
    if scheme not in {"s3", "gs", "gcs", "hdfs", "abfs", "az"}:
        raise ValueError(f"unsupported URI scheme {scheme!r} in {value!r}: use s3://, gs:// or a path")
    bucket = m.group("rest").split("/", 1)[0]
    if not _BUCKET.match(bucket):
        raise ValueError(f"malformed URI {value!r}: {bucket!r} is not a valid bucket name")
    return value


class RaySettings(_Section):
    """Where the Ray cluster is."""

    #: ``None`` starts (or joins) a local Ray; ``auto`` or ``ray://host:10001`` joins a cluster.
    address: str | None = None
    #: CPUs for a local Ray started by cxr-ray (``None``: all of this machine's cores).
    num_cpus: int | None = Field(default=None, ge=1)


class DataSettings(_Section):
    """Ingestion and splits."""

    #: Images with more pixels than this are refused before decoding (decompression bombs).
    max_pixels: int = Field(default=64_000_000, ge=1)
    #: Rows per Ray Data block when reading archives: small blocks keep memory bounded.
    rows_per_block: int = Field(default=64, ge=1, le=100_000)
    #: Fraction of patients held out for validation.
    val_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    split_seed: int = 0
    #: Name of the bytes column when the source is a Parquet table of images.
    bytes_column: str = "image"
    #: Optional column of a Parquet source holding the original file name (for labels).
    name_column: str | None = "path"
    #: Where the URIs a manifest lists may point (local folders, ``s3://bucket/prefix``...).
    #: Empty: the manifest's own folder and the source roots ``cxr-ray manifest`` recorded in
    #: it. A row outside them (``file:///etc/passwd``) is an error row, never read or stat'ed.
    allowed_roots: list[str] = []


class ModelSettings(_Section):
    """The network and the preprocessing contract recorded in its model card."""

    arch: str = "mobilenet_v2"
    #: Start from ImageNet weights (found offline; see ``cxr-ray weights``).
    pretrained: bool = True
    #: Where pretrained weight files live; ``None``: ``$TORCH_HOME/hub/checkpoints``.
    weights_dir: str | None = None
    input_size: int = Field(default=224, ge=32, le=1024)
    #: Intensity normalisation applied after the resize (step 3 of the contract in
    #: ``cxr_ray.imaging.preprocess``): one of ``cxr_ray.vocabulary.INTENSITY_MODES``.
    intensity: str = "none"

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return _one_of(v, ARCHITECTURES, "architecture")

    @field_validator("intensity")
    @classmethod
    def _known_intensity(cls, v: str) -> str:
        return _one_of(v, INTENSITY_MODES, "intensity mode")


class AugmentSettings(_Section):
    """Training-time augmentation (never applied at scoring)."""

    rotation_deg: float = Field(default=10.0, ge=0, le=45)
    scale_min: float = Field(default=0.75, gt=0, le=1)
    translate: float = Field(default=0.06, ge=0, le=0.3)
    brightness: float = Field(default=0.3, ge=0, le=1)
    contrast: float = Field(default=0.3, ge=0, le=1)
    gamma: float = Field(default=0.35, ge=0, le=1)
    blur_prob: float = Field(default=0.2, ge=0, le=1)
    #: Off by default: chest anatomy is not mirror-symmetric (heart on the left).
    hflip: bool = False


class TrainSettings(_Section):
    """The fine-tuning recipe and its Ray Train resources."""

    workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    epochs: int = Field(default=12, ge=1)
    #: Per-worker batch size.
    batch_size: int = Field(default=32, ge=1)
    lr: PositiveFloat = 1.5e-3
    #: Backbone learning rate = lr * this (the new head learns at ``lr``).
    backbone_lr_mult: float = Field(default=0.3, ge=0, le=1)
    weight_decay: float = Field(default=0.02, ge=0)
    warmup_epochs: float = Field(default=0.5, ge=0)
    #: Off by default: calibration is temperature scaling's job (fitted on validation after
    #: training). With 0.1 the network came out already calibrated at T=1 and the temperature
    #: had nothing to fix; without it, the temperature corrects a clear over-confidence and
    #: accuracy is unchanged. See docs/TRAINING.md, "Calibration".
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    grad_clip: float = Field(default=2.0, ge=0)
    #: Leading feature blocks kept frozen (BatchNorm statistics too) for the whole run. On
    #: MobileNetV2 the first 7 are the high-resolution, cheap-to-keep, generic ones: freezing
    #: them halves CPU step time and cost no validation accuracy in our comparisons.
    frozen_blocks: int = Field(default=7, ge=0)
    imbalance: Literal["class_weights", "oversample", "none"] = "class_weights"
    early_stopping_patience: int = Field(default=4, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=1, ge=0)
    storage_path: str = "runs"
    run_name: str | None = None
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: Keep decoded training images in the Ray object store across epochs.
    cache_decoded: bool = True
    #: Stop each epoch after this many batches per worker (smoke tests and demos only).
    max_steps_per_epoch: int | None = Field(default=None, ge=1)
    augment: AugmentSettings = AugmentSettings()

    @field_validator("storage_path")
    @classmethod
    def _storage_uri(cls, v: str) -> str:
        return check_uri(v)


class ScoreSettings(_Section):
    """Batch scoring resources and engine."""

    engine: str = "auto"
    batch_size: int = Field(default=64, ge=1, le=4096)
    actors_min: int = Field(default=1, ge=1)
    actors_max: int = Field(default=1, ge=1)
    #: CPUs reserved per predictor actor. Keep it below the node's cores on CPU so the
    #: decode tasks are never starved (Ray would otherwise hang the pipeline silently).
    cpus_per_actor: PositiveFloat = 0.5
    #: GPUs per predictor actor (0: CPU actors).
    gpus_per_actor: float = Field(default=0.0, ge=0)
    #: Intra-op threads of the engine inside each CPU actor (``None``: as many as the CPUs it
    #: reserves, at least 1). One thread per reserved CPU leaves the decode tasks their cores:
    #: on 2 cores, 1 onnxruntime thread scored 120 img/s steady state against 111 with the
    #: engine's own default (a thread per core, competing with decode).
    threads_per_actor: int | None = Field(default=None, ge=1)
    #: CPUs reserved per decode task (fractional oversubscribes on purpose: decode blocks on I/O).
    cpus_per_decode_task: PositiveFloat = 1.0
    #: Object-store memory (MiB) the run's Ray Data pipeline may hold at once (``0``: Ray Data's
    #: own default, half the object store). Decode outruns the model on CPU nodes, and without a
    #: cap decoded blocks queue up to Ray Data's budget: 277 MB by three quarters of a
    #: 20,000-image run and still growing (benchmarks/memory_bound.py). A few blocks in flight
    #: are all the model needs.
    object_store_limit_mb: int = Field(default=256, ge=0)
    #: Decode JPEGs on the GPU inside the actor when it has one.
    gpu_decode: bool = True
    #: Grad-CAM overlays written by a torch stage after the predictor: none, flagged or all rows.
    explain: Literal["none", "flagged", "all"] = "none"
    #: At most this many heatmaps per explaining actor (``None``: no limit).
    explain_limit: int | None = Field(default=None, ge=1)
    #: Deliver each study's DICOM result objects (SR, and a Secondary Capture when flagged)
    #: to a PACS: ``dicomweb[s]://HOST:PORT/PATH`` (STOW-RS, credentials and retries of
    #: ``[dicomweb]``) or ``dicom://AET@HOST:PORT`` (C-STORE, ``[dicomweb.dimse]``);
    #: ``None``: not delivered (``cxr_ray.writeback.deliver``, docs/WRITEBACK.md).
    results_to: str | None = None
    #: Where exported ONNX models, INT8 models and TensorRT engines are cached on each node.
    #: Resolved to an absolute path on the driver (``~`` expanded; a relative path anchors at
    #: the driver's working directory, which under ``ray job submit`` is a per-package copy
    #: that changes with every code change, hence the home-folder default).
    cache_dir: str = "~/.cache/cxr-ray"
    #: Images outside the model card's intended use (modality, body part, view, age) become
    #: ``skipped`` rows with the reason. ``false`` is the research override: they are scored,
    #: and every such row says so in ``intended_use`` / ``intended_use_note``.
    enforce_intended_use: bool = True
    #: Score images whose intended-use tags are present but malformed (``PatientAge`` ``0045Y``,
    #: ``Modality`` with a control character) instead of skipping them: the operator's opt-in
    #: (``--score-unparseable``), on top of the model card's own ``score_unparseable``; every
    #: such row is ``unparseable`` with a note saying it was scored by the opt-in.
    score_unparseable: bool = False
    #: Research exports: replace patient_id, accession_number, the study/series/instance UIDs
    #: and the uri of every output row with keyed HMAC-SHA256 pseudonyms
    #: (``cxr_ray.scoring.pseudonymize``), stable for one key. Needs ``pseudonym_key``.
    pseudonymize: bool = False
    #: The HMAC key (at least 16 bytes): a secret, e.g. ``CXR_SCORE__PSEUDONYM_KEY``; never
    #: logged. Keep it: the same key gives the same pseudonyms in every later export.
    pseudonym_key: SecretStr | None = None
    #: What pseudonymisation keeps (``cxr_ray.scoring.pseudonymize``): ``basic`` keys the
    #: identifiers and uris; ``strict`` also shifts dates per patient, bands ages, keys
    #: ``image_id`` and drops the remaining quasi-identifiers (sex, device, institution).
    pseudonymize_level: Literal["basic", "strict"] = "basic"
    #: onnxruntime precision. ``int8``: static QDQ quantization calibrated on the artifact's
    #: training images (its ``split.parquet``), 2.2-2.6x the fp32 model's speed on VNNI CPUs;
    #: checked once against fp32 on the validation images (``summary.json`` reports it).
    onnx_precision: Literal["fp32", "int8"] = "fp32"
    onnx_calibration_images: int = Field(default=256, ge=8)
    #: OpenVINO CPU inference precision (engine ``openvino``). ``auto``: bf16 where the CPU
    #: has native bf16 (AMX or AVX512-BF16), fp32 elsewhere. With ``engine = "auto"`` on CPU
    #: actors, the precisions ``auto`` may choose after their agreement check (``auto``: bf16,
    #: then fp32; ``bf16`` / ``fp32``: that one, else onnxruntime fp32; ``engines.choice``).
    openvino_precision: Literal["auto", "bf16", "fp32"] = "auto"
    #: TensorRT build settings.
    trt_precision: Literal["fp16", "fp32", "int8"] = "fp16"
    trt_min_batch: int = Field(default=1, ge=1)
    trt_opt_batch: int = Field(default=64, ge=1)
    trt_max_batch: int = Field(default=256, ge=1)
    trt_calibration_images: int = Field(default=512, ge=8)

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        return _one_of(v, ENGINES, "engine")

    @model_validator(mode="after")
    def _pool_bounds(self) -> ScoreSettings:
        if self.actors_min > self.actors_max:
            raise ValueError(f"actors_min ({self.actors_min}) > actors_max ({self.actors_max})")
        if not self.trt_min_batch <= self.trt_opt_batch <= self.trt_max_batch:
            raise ValueError("TensorRT profile needs trt_min_batch <= trt_opt_batch <= trt_max_batch")
        if self.pseudonymize:
            key = self.pseudonym_key.get_secret_value() if self.pseudonym_key else ""
            if not key:
                raise ValueError(
                    "pseudonymize needs a key: set score.pseudonym_key (CXR_SCORE__PSEUDONYM_KEY); "
                    "keep it, the same key gives the same pseudonyms in later exports"
                )
            if len(key.encode()) < 16:  # cxr_ray.scoring.pseudonymize.MIN_KEY_BYTES
                raise ValueError("score.pseudonym_key must be at least 16 bytes")
        return self


class DriftSettings(_Section):
    """Drift checks of every scoring run against the artifact's reference (validation split).

    Each model-facing check (P(pneumonia), predicted-class mix, model-input statistics,
    penultimate features) is a two-sample hypothesis test with a p-value; a check alerts when
    its Holm-adjusted p-value (family-wise across the checks) is at most ``alpha`` AND its
    effect size is at least its ``*_min`` below AND the run scored at least ``min_images``.
    So a small run cannot alert on noise and a huge one cannot alert on a trivial shift.
    Acquisition facts (original size, aspect, DICOM categories) are reported, never alerted
    on by themselves. False-alarm rate and power: docs/MONITORING.md.
    """

    #: Compare each run with the artifact's drift reference (when it has one).
    enabled: bool = True
    #: Family-wise false-alarm rate of one run's checks (Holm's step-down correction).
    alpha: float = Field(default=0.01, gt=0, lt=1)
    #: Fewer scored images than this: the figures are written, no alert is raised.
    min_images: int = Field(default=100, ge=1)
    #: P(pneumonia): smallest Kolmogorov-Smirnov statistic (largest CDF gap, 0..1) to alert.
    score_ks_min: float = Field(default=0.05, ge=0)
    #: Share of ``alpha`` given to the P(pneumonia) test in the weighted Holm correction (the
    #: other tested checks share the rest equally): the score is what a site acts on, and a
    #: score-only shift is the hardest to see (power measured in docs/MONITORING.md).
    score_weight: float = Field(default=0.5, gt=0, lt=1)
    #: Predicted-class mix: smallest population stability index to alert.
    class_psi_min: float = Field(default=0.1, ge=0)
    #: Model-input statistics (intensity percentiles, mean, spread): smallest largest
    #: |mean shift| in units of the reference's standard deviation to alert.
    input_shift_min: float = Field(default=0.25, ge=0)
    #: Penultimate features: smallest root-mean-square mean shift over the reference's PCA
    #: components (each in units of the reference's std along it) to alert.
    feature_shift_min: float = Field(default=0.05, ge=0)
    #: Rows kept (a uniform reservoir) for the distribution checks of inputs and features;
    #: bounds the driver's memory whatever the run's size.
    reservoir_size: int = Field(default=2000, ge=100, le=100_000)
    #: The tests count one image per patient (else study, else image): at most this many of
    #: the run's units (a uniform, order-independent sample of them; ``scoring.drift_units``).
    unit_sample_size: int = Field(default=5000, ge=100, le=100_000)
    #: Reference (at training, ``cxr-ray drift-reference``): PCA components kept of the
    #: penultimate-layer features, and the most validation images used (a seeded sample).
    reference_components: int = Field(default=16, ge=1, le=256)
    reference_max_images: int = Field(default=2000, ge=10)


class CalibrateSettings(_Section):
    """``cxr-ray calibrate``: a site's calibration refitted on its labelled sample (``cxr_ray.site``).

    Flags of the command override these; the card's target sensitivity is used unless
    ``target_sensitivity`` is set.
    """

    #: What is refitted (``cxr_ray.vocabulary.SITE_METHODS``).
    method: str = "bias"
    #: Also try refitting the final linear layer (kept only if its cross-fitted NLL is lower).
    head: bool = False
    #: Cross-fitting folds (fewer when a class has fewer images than this).
    folds: int = Field(default=5, ge=2, le=20)
    #: Bootstrap resamples of the cross-fitted estimates' intervals.
    bootstrap: int = Field(default=1000, ge=0)
    #: Two-sided level of those intervals.
    level: float = Field(default=0.95, gt=0, lt=1)
    #: Confidence of the one-sided (Clopper-Pearson) lower bound of sensitivity that must
    #: reach the target for the site threshold to be used.
    confidence: float = Field(default=0.95, ge=0.5, lt=1)
    #: Fewest usable labelled images, and of each class, accepted.
    min_size: int = Field(default=40, ge=1)
    min_per_class: int = Field(default=5, ge=1)
    #: Flag sensitivity to guarantee; ``None``: the parent card's.
    target_sensitivity: float | None = Field(default=None, gt=0, le=1)
    #: Candidate strengths of the head refit's pull toward the shipped head (chosen by
    #: cross-fitted NLL).
    head_lambdas: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    #: Folds and bootstrap seed.
    seed: int = 0

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return _one_of(v, SITE_METHODS, "site-calibration method")


_DICOM_DATE_RANGE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")
_QIDO_RESERVED = {"limit", "offset", "includefield", "fuzzymatching"}


_AE_TITLE = re.compile(r"^[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$")


def check_ae_title(value: str) -> str:
    """A DICOM AE title: 1-16 printable ASCII characters, no backslash, not all spaces."""
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a DICOM AE title (1-16 printable ASCII characters, no backslash)")
    return value.rstrip()


class DimseSettings(_Section):
    """DIMSE transport (``dicom://AET@HOST:PORT``): C-FIND/C-GET/C-MOVE sources and C-STORE
    delivery (``cxr_ray.data.dimse``, ``cxr_ray.writeback.cstore``). The filters, retries and
    backoff are the ``[dicomweb]`` section's (``study_date``, ``modalities``, ``query``,
    ``timezone``, ``lookback_days``, ``retries``, ``backoff_s``, ``max_backoff_s``): one set for
    a PACS, whichever protocol it speaks."""

    #: Our (calling) AE title; the PACS must know it (and, for C-MOVE, where it listens).
    calling_aet: str = "CXRRAY"
    #: How a source's instances are retrieved: ``get`` (C-GET: on the association we open,
    #: parallel across read tasks, no inbound port) or ``move`` (C-MOVE to the storage SCP
    #: cxr-ray runs on ``move_port``; one read task per node at a time holds that port).
    retrieve: Literal["get", "move"] = "get"
    #: Where our storage SCP listens for C-MOVE (the PACS sends to calling_aet at this
    #: machine's address and this port: register it there).
    move_port: int = Field(default=11113, ge=1, le=65535)
    #: The address the C-MOVE storage SCP binds (``0.0.0.0``: every interface). It accepts
    #: associations from the source's AE title only.
    move_bind: str = "127.0.0.1"
    connect_timeout_s: PositiveFloat = 10.0
    #: Longest wait for an association answer and for each DIMSE message.
    dimse_timeout_s: PositiveFloat = 60.0

    @field_validator("calling_aet")
    @classmethod
    def _aet(cls, v: str) -> str:
        return check_ae_title(v)


class DicomwebSettings(_Section):
    """DICOMweb sources (``dicomweb://HOST:PORT/PATH``, ``dicomwebs://`` for HTTPS).

    Also the filters, retries and backoff of DIMSE sources (``dicom://AET@HOST:PORT``), whose
    transport settings are ``dimse`` (``[dicomweb.dimse]``).

    QIDO-RS filters, paging, timeouts, retries and credentials. Credentials are secrets:
    never logged, never in error messages, shown as ``**********`` in any dump of settings.
    Give them by environment (``CXR_DICOMWEB__PASSWORD``, ``CXR_DICOMWEB__TOKEN``) or in a
    TOML file readable only by the service account, never in the source URL.
    """

    #: Studies whose StudyDate matches: ``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD`` (one
    #: end may be left open: ``20261130-``).
    study_date: str | None = None
    #: The PACS's time zone (an IANA name, ``America/Chicago``): nightly runs turn the last
    #: committed run's listing time into a ``StudyDate`` in it (``cxr_ray.scoring.nightly``).
    timezone: str = "UTC"
    #: Nightly runs list studies dated from that date minus this many days (late arrivals).
    lookback_days: int = Field(default=2, ge=0, le=3650)
    #: Only instances of these modalities (``Modality``, e.g. ``CR,DX``). Empty: every
    #: modality. A comma list in the environment.
    modalities: Annotated[tuple[str, ...], NoDecode] = ()
    #: Extra QIDO-RS study-level matching keys (DICOM keyword or tag -> value), e.g.
    #: ``{InstitutionName = "CHILDRENS"}``.
    query: dict[str, str] = {}
    #: Results per QIDO-RS request (``limit``); the listing pages with ``offset``.
    page_size: int = Field(default=100, ge=1, le=10_000)
    connect_timeout_s: PositiveFloat = 10.0
    #: Longest wait for a response (a large instance can take a while on a busy PACS).
    read_timeout_s: PositiveFloat = 60.0
    #: Retries of one request after a timeout, a connection error or an HTTP 5xx/408/429.
    retries: int = Field(default=4, ge=0, le=20)
    #: First wait between retries; it doubles each time, up to ``max_backoff_s``.
    backoff_s: float = Field(default=0.5, ge=0)
    max_backoff_s: float = Field(default=16.0, ge=0)
    #: Bearer token (``Authorization: Bearer ...``), or basic auth with username/password.
    token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    #: CA bundle file for ``dicomwebs://`` (a hospital CA); ``None``: the system's (or
    #: ``REQUESTS_CA_BUNDLE``). When set it wins over ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``.
    ca_bundle: str | None = None
    #: The DICOMweb services credentials may be sent to (``dicomweb://HOST:PORT/PATH``), on
    #: top of a ``dicomweb://`` source given on the command line. A manifest row naming any
    #: other service is an error row: never fetched, with or without credentials.
    endpoints: Annotated[tuple[str, ...], NoDecode] = ()
    #: Send credentials over plain ``dicomweb://`` (HTTP). Off: refused (use ``dicomwebs://``);
    #: on: allowed, with one warning per endpoint.
    allow_insecure_http: bool = False
    #: Requests in flight at once: listing studies' instances on the driver, and retrieving
    #: instances in each Ray read task (on top of the read tasks running in parallel).
    concurrency: int = Field(default=4, ge=1, le=64)
    #: Blocks of ``data.rows_per_block`` instances per read task (whole studies). Over 1,
    #: the next block is retrieved while the last is decoded, but Ray Data merges a task's
    #: output blocks, so its rows reach the model together at the task's end (later first
    #: rows, less overlap with the model): measured in benchmarks/RESULTS.md.
    blocks_per_task: int = Field(default=1, ge=1, le=64)
    #: DIMSE sources and C-STORE delivery (``[dicomweb.dimse]``, ``CXR_DICOMWEB__DIMSE__*``).
    dimse: DimseSettings = DimseSettings()

    @field_validator("study_date")
    @classmethod
    def _date_range(cls, v: str | None) -> str | None:
        if v is not None and (v in ("", "-") or not _DICOM_DATE_RANGE.match(v)):
            raise ValueError(f"study_date {v!r} is not YYYYMMDD or YYYYMMDD-YYYYMMDD")
        return v

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("not an IANA time zone name (e.g. UTC, Europe/Berlin)") from None
        return v

    @field_validator("modalities", mode="before")
    @classmethod
    def _modality_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [m for m in v.replace(" ", "").split(",") if m]
        if isinstance(v, list | tuple):
            v = tuple(str(m).upper() for m in v)
            bad = [m for m in v if not re.fullmatch(r"[A-Z0-9]{1,16}", m)]
            if bad:
                raise ValueError(f"not DICOM modality codes: {bad} (e.g. CR, DX)")
        return v

    @field_validator("endpoints", mode="before")
    @classmethod
    def _endpoint_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [e for e in v.replace(" ", "").split(",") if e]
        return tuple(v) if isinstance(v, list | tuple) else v

    @field_validator("query")
    @classmethod
    def _query_keys(cls, v: dict[str, str]) -> dict[str, str]:
        reserved = sorted(k for k in v if k.lower() in _QIDO_RESERVED)
        if reserved:
            raise ValueError(f"query keys {reserved} are set by cxr-ray (use page_size)")
        return v

    @model_validator(mode="after")
    def _one_auth(self) -> DicomwebSettings:
        if self.token is not None and self.username is not None:
            raise ValueError("give either a bearer token or username/password, not both")
        if self.password is not None and self.username is None:
            raise ValueError("password given without a username")
        return self


class Settings(BaseSettings):
    """Every knob of cxr-ray; see the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="CXR_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        toml_file=None,
    )

    ray: RaySettings = RaySettings()
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    score: ScoreSettings = ScoreSettings()
    dicomweb: DicomwebSettings = DicomwebSettings()
    drift: DriftSettings = DriftSettings()
    calibrate: CalibrateSettings = CalibrateSettings()

    toml_path_: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_path_ is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_path_))
        return tuple(sources)


def _without_none(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _without_none(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out


#: Sections whose every input value is kept out of error messages (credentials live there).
SECRET_SECTIONS = frozenset({"dicomweb"})
_SECRET_NAME = re.compile(r"key|token|password|passwd|secret|credential", re.IGNORECASE)


def _fragments(value: Any) -> list[str]:
    """Every string an input value could show in a message (its leaves and their reprs)."""
    if isinstance(value, dict):
        return [f for v in value.values() for f in _fragments(v)] + [f for k in value for f in _fragments(k)]
    if isinstance(value, list | tuple | set):
        return [f for v in value for f in _fragments(v)]
    text = str(value)
    return [text, text.upper(), text.lower(), repr(value)]


def _hidden(err: Any) -> bool:
    """Whether this error's input value must never be printed: an unknown field (a typo of a
    secret's name looks like one), a secret section, or a field named like a secret."""
    loc = [str(p) for p in err["loc"]]
    return (
        err.get("type") == "extra_forbidden"
        or bool(loc and loc[0] in SECRET_SECTIONS)
        or any(_SECRET_NAME.search(p) for p in loc)
    )


def _message(err: Any) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not _hidden(err):
        given = err.get("input")
        # The allowed values are in the message already when a vocabulary refused it.
        return msg if isinstance(given, dict) or f"{given!r}" in msg else f"{msg} (got {given!r})"
    frags = [f for f in _fragments(err.get("input")) if f.strip()]
    if any(len(f) < 4 and f in msg for f in frags):
        return f"invalid value ({err.get('type', 'error')}; value not shown)"
    for f in sorted(frags, key=len, reverse=True):
        msg = msg.replace(f, "<not shown>")
    return f"{msg} (value not shown)"


def format_validation_error(exc: ValidationError) -> str:
    """One line per invalid field: where it is set, what is wrong, the value given.

    The value is never shown for a secret section (``SECRET_SECTIONS``), a field named like a
    secret, or an unknown field (``CXR_DICOMWEB__PASSWROD=...`` is a mistyped password), and
    is cut out of a validator's message that quotes it. A single invalid field gives a single
    line (``invalid settings: model.arch: ...``).
    """
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(settings)"
        env = "CXR_" + "__".join(str(p).upper() for p in err["loc"])
        lines.append(f"{loc}: {_message(err)}  [flag, {env} or TOML]")
    if len(lines) == 1:
        return f"invalid settings: {lines[0]}"
    return "invalid settings:\n" + "\n".join("  " + line for line in lines)


def load_settings(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings tree; raise ``ConfigError`` with a field-by-field message.

    ``overrides`` is a nested dict (``{"train": {"epochs": 3}}``); ``None`` values are
    ignored so unset CLI flags do not mask environment variables or the TOML file.
    """
    toml_path: Path | None = None
    if config_file is not None:
        toml_path = Path(config_file)
        if not toml_path.is_file():
            raise ConfigError(f"config file {str(toml_path)!r} does not exist")
    cls = type("Settings", (Settings,), {"toml_path_": toml_path})
    try:
        return cls(**_without_none(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except ValueError as exc:  # malformed TOML or env JSON
        raise ConfigError(f"invalid settings: {exc}") from None


def settings_from_dict(data: dict[str, Any]) -> Settings:
    """Rebuild settings from ``model_dump`` output on a worker (no env, no files)."""
    return Settings.model_validate(data)
