"""The human-readable model card (``model_card.md``), written beside ``model_card.json``.

Metrics come with 95% bootstrap confidence intervals over the validation images (percentile
method, resampling images with replacement), because a validation split of a few hundred
images moves a few points from one split to the next.
"""

from __future__ import annotations

import math

import numpy as np

from cxr_ray import metrics
from cxr_ray.models.card import ModelCard


def limitations(card: ModelCard) -> str:
    """The card's limitations, with the scope generated from its enforced intended-use block."""
    use = card.intended_use_policy
    return f"""\
- Trained on one centre's pediatric (1-5 years) anterior-posterior chest X-rays (Guangzhou
  Women and Children's Medical Center, Kermany et al. 2018). Adults, other centres, other
  devices and other acquisition protocols are out of distribution; expect lower accuracy.
  The enforced intended use ({use.describe()}) is wider than the training data:
  ages and views inside it but absent from training are untested.
- DICOM images outside the intended use ({", ".join(use.views)} views of the
  {"/".join(b.lower() for b in use.body_parts)}, modality {"/".join(use.modalities)}, ages {use.age_range()})
  are skipped, not scored. JPEG/PNG images have no tags to check: a lateral view, a CT slice
  or a non-chest image given as JPEG is scored like any other (a meaningless result), marked
  "unchecked" in the predictions and the report.
- Images are squashed to the input size ({card.input_size[0]} px here): fine findings are lost, and
  the aspect ratio is not used on purpose (in this dataset it correlates with the label).
- Bacterial vs viral labels come from clinical grading of the original study and are noisy;
  the two pneumonia classes are much harder to separate than pneumonia from normal.
- Probabilities are calibrated by temperature scaling on the validation split; the flag
  threshold targets a sensitivity on that split, which need not hold on another population.
- Not a medical device. Every study is read by a clinician."""


def bootstrap_ci(
    y: np.ndarray, probs: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """``name -> (value, low, high)`` for the headline metrics, 95% percentile intervals."""
    rng = np.random.default_rng(seed)
    point = metrics.classification_metrics(y, probs, threshold=threshold).summary()
    keys = [
        "accuracy", "macro_f1", "macro_auroc", "binary_sensitivity_at_threshold",
        "binary_specificity_at_threshold", "binary_auroc",
        *(f"{c}_{m}" for c in ("normal", "bacterial", "viral") for m in ("precision", "recall", "f1")),
    ]  # fmt: skip
    samples: dict[str, list[float]] = {k: [] for k in keys}
    n = len(y)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        s = metrics.classification_metrics(y[idx], probs[idx], threshold=threshold).summary()
        for k in keys:
            samples[k].append(s[k])
    out = {}
    for k in keys:
        vals = np.array([v for v in samples[k] if not math.isnan(v)])
        lo, hi = np.percentile(vals, [2.5, 97.5]) if len(vals) else (math.nan, math.nan)
        out[k] = (float(point[k]), float(lo), float(hi))
    return out


def render(card: ModelCard, y: np.ndarray, probs: np.ndarray, n_boot: int = 500) -> str:
    """Markdown model card with data, intended use, limitations and metrics with 95% CIs."""
    ci = bootstrap_ci(y, probs, card.pneumonia_threshold, n_boot=n_boot)
    t = card.training
    counts = t.get("split_counts", {})
    fingerprint = str(t.get("data_fingerprint", "n/a"))[:16]
    m = card.metrics

    def fmt(k: str) -> str:
        v, lo, hi = ci[k]
        return f"{v:.3f} ({lo:.3f}-{hi:.3f})"

    per_class = "\n".join(
        f"| {c} | {fmt(c + '_precision')} | {fmt(c + '_recall')} | {fmt(c + '_f1')} |" for c in card.labels
    )
    split_rows = "\n".join(
        f"| {name} | " + " | ".join(str(counts.get(name, {}).get(c, 0)) for c in card.labels) + " |"
        for name in ("train", "val")
    )
    return f"""# Model card: {card.version}

{card.intended_use_statement}

## Model
- Architecture: `{card.arch}` (ImageNet-pretrained backbone, 3-class head), input
  {card.input_size[0]}x{card.input_size[1]} grayscale (replicated to 3 channels inside the network),
  intensity normalisation `{card.intensity}`, resize `{card.resize}` ({card.interpolation}).
- Output order: {", ".join(card.labels)}. Temperature {card.temperature:.3f}; pneumonia flag threshold
  {card.pneumonia_threshold:.4f} on P(bacterial) + P(viral)
  (target sensitivity {card.thresholds.get("target_sensitivity", "n/a")} on validation).
- Weights: `{card.weights_file}` (sha256 `{card.weights_sha256[:16]}...`), cxr-ray {card.package_version},
  created {card.created_at}.

## Data
- Source: `{t.get("source", "n/a")}`; training-set fingerprint `{fingerprint}...`.
- Patient-grouped, class-stratified validation split (no patient in both splits):

| split | {" | ".join(card.labels)} |
|---|{"---|" * len(card.labels)}
{split_rows}

- Dataset: Kermany, Zhang, Goldbaum et al., Cell 172(5), 2018, doi:10.1016/j.cell.2018.02.010;
  images CC BY 4.0 (Mendeley Data doi:10.17632/rscbjbr9sj.2).

## Validation metrics (95% bootstrap confidence intervals, {len(y)} images, {n_boot} resamples)

| metric | value (95% CI) |
|---|---|
| 3-class accuracy | {fmt("accuracy")} |
| macro-F1 | {fmt("macro_f1")} |
| macro AUROC (one-vs-rest) | {fmt("macro_auroc")} |
| normal vs pneumonia sensitivity (at threshold) | {fmt("binary_sensitivity_at_threshold")} |
| normal vs pneumonia specificity (at threshold) | {fmt("binary_specificity_at_threshold")} |
| normal vs pneumonia AUROC | {fmt("binary_auroc")} |

| class | precision | recall | F1 |
|---|---|---|---|
{per_class}

Temperature scaling (T = {card.temperature:.3f}, fitted by validation NLL): NLL
{m.get("nll_before_temperature", math.nan):.4f} -> {m.get("nll_after_temperature", math.nan):.4f},
expected calibration error (15 bins) {m.get("ece_before_temperature", math.nan):.4f} ->
{m.get("validation", {}).get("ece", math.nan):.4f}.

## Limitations
{limitations(card)}
"""
