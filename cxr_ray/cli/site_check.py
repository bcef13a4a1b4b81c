"""``cxr-ray site-check``: a new site's first step (score a sample, see drift and the estimate)."""

from __future__ import annotations

import click

from cxr_ray.cli._app import handle_errors, load_model, main, require_source, settings_from, verbosity


@main.command("site-check")
@click.argument("source")
@click.option("--model", "artifact", required=True, help="Model artifact directory (path or s3://).")
@click.option(
    "--sample", default=300, show_default=True, type=click.IntRange(min=10), help="Images to score."
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the sample.")
@click.option("--out", default="site-check", show_default=True, help="Output folder (a scoring run).")
@click.pass_context
@handle_errors
def site_check(ctx: click.Context, source: str, artifact: str, sample: int, seed: int, out: str) -> None:
    """Score a seeded sample of SOURCE, print drift, the estimated performance and what to do.

    Ends with `recommendation: ok`, or `recommendation: calibrate: label >= K studies,
    worklist at OUT/report.html`: label those studies in the report's worklist, export the
    CSV, then `cxr-ray calibrate --model A --labelled OUT --labels labels.csv --out A2`.
    """
    s = settings_from(ctx, {})
    require_source(source)
    from cxr_ray.cli.runtime import ray_session
    from cxr_ray.scoring.result import format_summary
    from cxr_ray.site.check import site_check as run_check

    art = load_model(artifact)
    with ray_session(s.ray, verbose=verbosity(ctx)):
        check = run_check(source, art, out, s, sample=sample, seed=seed)
    click.echo(format_summary(check.result))
    click.echo(check.line())
