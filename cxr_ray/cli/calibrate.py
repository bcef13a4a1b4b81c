"""``cxr-ray calibrate``: fit a site's operating point on a small labelled sample."""

from __future__ import annotations

import click

from cxr_ray.cli._app import handle_errors, main, require_source, settings_from


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
    type=click.Choice(["bias", "vector", "temperature"]),
    default="bias",
    show_default=True,
    help="bias: temperature + per-class offsets; vector: per-class scale + offsets; temperature only.",
)
@click.option("--head", is_flag=True, help="Also try refitting the final layer (kept only if it helps).")
@click.option(
    "--target-sensitivity", type=float, default=None, help="Flag sensitivity (default: the card's)."
)
@click.option("--folds", type=int, default=5, show_default=True, help="Cross-fitting folds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Folds and bootstrap seed.")
@click.option("--bootstrap", "n_boot", type=int, default=1000, show_default=True, help="Bootstrap resamples.")
@click.option("--min-size", type=int, default=40, show_default=True, help="Fewest usable images accepted.")
@click.option("--min-per-class", type=int, default=5, show_default=True, help="Fewest images of each class.")
@click.option("--overwrite", is_flag=True, help="Replace an artifact already at --out (never the parent).")
@click.pass_context
@handle_errors
def calibrate(
    ctx: click.Context,
    artifact: str,
    labelled: str,
    out: str,
    labels_csv: str | None,
    method: str,
    head: bool,
    target_sensitivity: float | None,
    folds: int,
    seed: int,
    n_boot: int,
    min_size: int,
    min_per_class: int,
    overwrite: bool,
) -> None:
    """Calibrate a model for a new site on 50-200 labelled images of that site.

    Refits the temperature, per-class logit offsets (or scales) and the flag threshold for
    the target sensitivity on the sample's raw logits (with a prior toward the parent's
    values), estimates what that gains by cross-fitting with bootstrap intervals, and writes
    a derived artifact to OUT whose card records its lineage. The parent is not modified.

    \b
      cxr-ray calibrate --model model/ --labelled site_sample/ --out model-site/
      cxr-ray calibrate --model model/ --labelled scores/ --labels labels.csv --out model-site/
    """
    from cxr_ray.models.site import calibrate as run
    from cxr_ray.models.site import check_out, format_report

    s = settings_from(ctx, {})
    require_source(artifact, "model artifact")
    require_source(labelled, "site sample")
    if labels_csv:
        require_source(labels_csv, "labels CSV")
    check_out(artifact, out, overwrite=overwrite)
    card, result, sample = run(
        artifact,
        labelled,
        out,
        s,
        labels_csv=labels_csv,
        method=method,
        head=head,
        target_sensitivity=target_sensitivity,
        folds=folds,
        seed=seed,
        n_boot=n_boot,
        min_size=min_size,
        min_per_class=min_per_class,
        overwrite=overwrite,
    )
    click.echo(format_report(result, sample, card))
    click.echo(
        f"derived artifact {card.version} written to {out} (site_calibration.json, site_calibration.png)"
    )
