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
