"""Scoring commands: score, evaluate, report."""

from __future__ import annotations

import click

from cxr_ray.cli._app import DataError, handle_errors, main, settings_from


@main.command()
@click.argument("source")
@click.option("--model", "artifact", required=True, help="Model artifact directory (path or s3://).")
@click.option("--out", required=True, help="Output folder for this run (path or s3://).")
@click.option("--engine", default=None, help="auto | onnxruntime | torch | tensorrt.")
@click.option("--batch-size", type=int, default=None, help="Images per predictor call.")
@click.option("--actors", type=int, default=None, help="Predictor actors (min = max).")
@click.option("--gpus-per-actor", type=float, default=None, help="GPUs per predictor actor (0 = CPU).")
@click.option("--cpus-per-actor", type=float, default=None, help="CPUs reserved per predictor actor.")
@click.option(
    "--onnx-precision",
    type=click.Choice(["fp32", "int8"]),
    default=None,
    help="onnxruntime precision; int8 is quantized from the artifact's training images (opt-in).",
)
@click.option(
    "--explain",
    type=click.Choice(["none", "flagged", "all"]),
    default=None,
    help="Grad-CAM overlays (torch stage) for flagged or all studies; shown in the report.",
)
@click.option(
    "--history",
    default=None,
    help="Metrics history table to append to (default: metrics_history.parquet beside OUT).",
)
@click.pass_context
@handle_errors
def score(
    ctx: click.Context,
    source: str,
    artifact: str,
    out: str,
    engine: str | None,
    batch_size: int | None,
    actors: int | None,
    gpus_per_actor: float | None,
    cpus_per_actor: float | None,
    onnx_precision: str | None,
    explain: str | None,
    history: str | None,
) -> None:
    """Score every image of SOURCE with a model artifact; write predictions and metrics.

    One row per input file in OUT/predictions.parquet (broken files included, as
    status=error rows). When SOURCE carries labels (Kermany names or folders), per-class
    metrics go to OUT/metrics.parquet and OUT/confusion.parquet and are appended to the
    history table. Ends with a summary: images, ok, errors, flagged, img/s.
    """
    from cxr_ray.cli.runtime import ray_session
    from cxr_ray.io import storage
    from cxr_ray.metrics import format_metrics_summary
    from cxr_ray.scoring.pipeline import format_summary
    from cxr_ray.scoring.pipeline import score as run_score

    overrides = {
        "score": {
            "engine": engine,
            "batch_size": batch_size,
            "actors_min": actors,
            "actors_max": actors,
            "gpus_per_actor": gpus_per_actor,
            "cpus_per_actor": cpus_per_actor,
            "onnx_precision": onnx_precision,
            "explain": explain,
        }
    }
    s = settings_from(ctx, overrides)
    history = history or storage.join(storage.parent(out), "metrics_history.parquet")
    with ray_session(s.ray):
        result = run_score(source, artifact, out, s, history=history)
    click.echo(format_summary(result))
    if result.metrics:
        from cxr_ray.reporting.report import write_report

        click.echo(format_metrics_summary(result.metrics, title="metrics"))
        click.echo(f"report: {write_report(out)}")


@main.command()
@click.argument("predictions")
@click.option("--out", default=None, help="Folder to write metrics.parquet and confusion.parquet to.")
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Pneumonia flag threshold (default: the scoring run's, from its summary.json; else 0.5).",
)
@handle_errors
def evaluate(predictions: str, out: str | None, threshold: float | None) -> None:
    """Compute per-class metrics from any predictions table that has labels.

    Uses the rows with status=ok and a known label; prints precision, recall, F1, AUROC and
    support per class, accuracy, macro/weighted F1, the confusion matrix and the
    normal-vs-pneumonia sensitivity/specificity/AUROC.
    """
    from cxr_ray import metrics
    from cxr_ray.io import storage
    from cxr_ray.labels import LABELS
    from cxr_ray.scoring.pipeline import evaluate_table, run_threshold

    try:
        t = storage.read_table(predictions)
    except FileNotFoundError:
        raise DataError(f"predictions table {predictions!r} does not exist") from None
    need = {"status", "label", *(f"prob_{k}" for k in LABELS)}
    if need - set(t.column_names):
        raise DataError(
            f"{predictions!r} is not a predictions table: missing {sorted(need - set(t.column_names))}"
        )
    m = evaluate_table(t, run_threshold(predictions) if threshold is None else threshold)
    if m is None:
        raise DataError("no rows with status=ok and a known label to evaluate")
    click.echo(metrics.format_metrics(m))
    click.echo("confusion (rows: true, columns: predicted " + "/".join(LABELS) + "):")
    for label, row in zip(LABELS, m.confusion, strict=True):
        click.echo(f"  {label:<10} " + " ".join(f"{v:>6d}" for v in row))
    if out:
        storage.write_table(metrics.metrics_table(m), storage.join(out, "metrics.parquet"))
        storage.write_table(metrics.confusion_table(m), storage.join(out, "confusion.parquet"))
        click.echo(f"wrote {out}/metrics.parquet and confusion.parquet")


@main.command()
@click.argument("run_dir")
@click.option("--out", default=None, help="Where to write the HTML (default: RUN_DIR/report.html).")
@click.option("--top", type=int, default=24, show_default=True, help="Flagged studies in the gallery.")
@handle_errors
def report(run_dir: str, out: str | None, top: int) -> None:
    """Write a self-contained HTML report of a scoring run.

    Run summary, per-class metrics, confusion matrix, ROC and reliability curves, the
    pneumonia-score histogram, error rows and a gallery of the most suspicious flagged
    studies (with Grad-CAM overlays when the run was scored with --explain). One file,
    images embedded: it can be mailed or attached to a ticket.
    """
    from cxr_ray.io import storage
    from cxr_ray.reporting.report import write_report

    if not storage.exists(storage.join(run_dir, "predictions.parquet")):
        raise DataError(f"{run_dir!r} has no predictions.parquet: pass a folder written by `cxr-ray score`")
    click.echo(f"wrote {write_report(run_dir, out, top=top)}")
