"""``cxr-ray calibrate``: fit a site's operating point on a small labelled sample."""

from __future__ import annotations

import click

from cxr_ray.cli._app import handle_errors, main, require_source, settings_from
from cxr_ray.config import CalibrateSettings
from cxr_ray.vocabulary import SITE_METHODS

#: The ``[calibrate]`` defaults, quoted in the help (flags left out keep the settings' values).
_D = CalibrateSettings()


@main.command()
@click.option("--model", "artifact", required=True, help="Parent model artifact (never modified).")
@click.option(
    "--labelled",
    required=True,
    help="Labelled site images: a folder or archive (labels in names/folders), a manifest, "
    "or a scoring run / predictions.parquet with --labels.",
)
@click.option("--out", required=True, help="Directory for the derived artifact.")
@click.option(
    "--labels", "labels_csv", default=None, help="Labels CSV exported by the report's review worklist."
)
@click.option(
    "--method",
    type=click.Choice(SITE_METHODS),
    default=None,
    help=f"bias: temperature + per-class offsets; vector: per-class scale + offsets; temperature only "
    f"[calibrate.method: {_D.method}].",
)
@click.option(
    "--head/--no-head",
    default=None,
    help="Also try refitting the final layer (kept only if it helps) [calibrate.head].",
)
@click.option(
    "--target-sensitivity",
    type=float,
    default=None,
    help="Flag sensitivity to guarantee (default: the card's).",
)
@click.option(
    "--confidence",
    type=float,
    default=None,
    help=f"Confidence of the sensitivity lower bound [calibrate.confidence: {_D.confidence}].",
)
@click.option("--folds", type=int, default=None, help=f"Cross-fitting folds [calibrate.folds: {_D.folds}].")
@click.option("--seed", type=int, default=None, help=f"Folds and bootstrap seed [calibrate.seed: {_D.seed}].")
@click.option(
    "--bootstrap",
    "n_boot",
    type=int,
    default=None,
    help=f"Bootstrap resamples [calibrate.bootstrap: {_D.bootstrap}].",
)
@click.option(
    "--min-size",
    type=int,
    default=None,
    help=f"Fewest usable images accepted [calibrate.min_size: {_D.min_size}].",
)
@click.option(
    "--min-per-class",
    type=int,
    default=None,
    help=f"Fewest images of each class [calibrate.min_per_class: {_D.min_per_class}].",
)
@click.option("--overwrite", is_flag=True, help="Replace an artifact already at --out (never the parent).")
@click.pass_context
@handle_errors
def calibrate(
    ctx: click.Context,
    artifact: str,
    labelled: str,
    out: str,
    labels_csv: str | None,
    method: str | None,
    head: bool | None,
    target_sensitivity: float | None,
    confidence: float | None,
    folds: int | None,
    seed: int | None,
    n_boot: int | None,
    min_size: int | None,
    min_per_class: int | None,
    overwrite: bool,
) -> None:
    """Calibrate a model for a new site on 50-200 labelled images of that site.

    Refits the temperature, per-class logit offsets (or scales) on the sample's raw logits
    (with a prior toward the parent's values) and picks the most specific flag threshold whose
    one-sided lower confidence bound of sensitivity, on cross-fitted scores, meets the target.
    Estimates what that gains by cross-fitting with bootstrap intervals, and writes a derived
    artifact to OUT whose card records its lineage. The parent is not modified. When the
    sample's pneumonia images are too few to guarantee the target, the parent's calibration
    and threshold are kept and the number of further labelled positives needed is printed.
    Defaults: the [calibrate] settings section.

    \b
      cxr-ray calibrate --model model/ --labelled site_sample/ --out model-site/
      cxr-ray calibrate --model model/ --labelled scores/ --labels labels.csv --out model-site/
    """
    from cxr_ray.reporting.site_report import format_report
    from cxr_ray.site import FIGURE_FILE, REPORT_FILE, check_out
    from cxr_ray.site import calibrate as run

    flags = {
        "method": method,
        "head": head,
        "target_sensitivity": target_sensitivity,
        "confidence": confidence,
        "folds": folds,
        "seed": seed,
        "bootstrap": n_boot,
        "min_size": min_size,
        "min_per_class": min_per_class,
    }
    s = settings_from(ctx, {"calibrate": flags})
    require_source(artifact, "model artifact")
    require_source(labelled, "site sample")
    if labels_csv:
        require_source(labels_csv, "labels CSV")
    check_out(artifact, out, overwrite=overwrite)
    card, _, _ = run(artifact, labelled, out, s, labels_csv=labels_csv, overwrite=overwrite)
    click.echo(format_report(card.lineage or {}))
    click.echo(f"derived artifact {card.version} written to {out} ({REPORT_FILE}, {FIGURE_FILE})")
