"""Scoring commands: score, screen, nightly, evaluate, report."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from cxr_ray.cli._app import (
    DataError,
    handle_errors,
    literal_choice,
    load_model,
    main,
    require_source,
    settings_from,
    verbosity,
)
from cxr_ray.config import ScoreSettings
from cxr_ray.vocabulary import ENGINES

F = TypeVar("F", bound=Callable[..., Any])


class _NightlyChoice(click.Choice):
    """``literal_choice(NightlyOptions, name)``, resolved when first used: importing
    ``cxr_ray.scoring.nightly`` (the drift check's scipy with it, about a second) is then not
    the start-up cost of every command."""

    def __init__(self, name: str) -> None:
        self._field = name
        self.case_sensitive = True

    @functools.cached_property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        from cxr_ray.scoring.nightly import NightlyOptions

        return tuple(str(c) for c in literal_choice(NightlyOptions, self._field).choices)


def _engine_flags(fn: F) -> F:
    """The engine and resource options shared by score, screen and nightly."""
    options = [
        click.option("--engine", default=None, help=f"{' | '.join(ENGINES)} (default: auto)."),
        click.option("--batch-size", type=int, default=None, help="Images per predictor call."),
        click.option("--actors", type=int, default=None, help="Predictor actors (min = max)."),
        click.option(
            "--gpus-per-actor", type=float, default=None, help="GPUs per predictor actor (0 = CPU)."
        ),
        click.option("--cpus-per-actor", type=float, default=None, help="CPUs reserved per predictor actor."),
        click.option(
            "--onnx-precision",
            type=literal_choice(ScoreSettings, "onnx_precision"),
            default=None,
            help="onnxruntime precision; int8 is quantized from the artifact's training images (opt-in).",
        ),
        click.option(
            "--openvino-precision",
            type=literal_choice(ScoreSettings, "openvino_precision"),
            default=None,
            help="openvino engine precision; auto: bf16 where the CPU has it natively, else fp32.",
        ),
        click.option(
            "--study-date",
            default=None,
            help="DICOMweb sources: StudyDate YYYYMMDD or YYYYMMDD-YYYYMMDD (one end may be open).",
        ),
        click.option(
            "--modality",
            "modalities",
            multiple=True,
            help="DICOMweb sources: only this Modality (repeatable).",
        ),
        click.option(
            "--query", "queries", multiple=True, metavar="KEY=VALUE", help="DICOMweb: extra QIDO-RS key."
        ),
        click.option(
            "--pseudonymize",
            is_flag=True,
            default=None,
            help="Research export: keyed HMAC pseudonyms for patient id, accession, UIDs and uri "
            "(key: score.pseudonym_key / CXR_SCORE__PSEUDONYM_KEY).",
        ),
        click.option(
            "--pseudonymize-level",
            type=click.Choice(["basic", "strict"]),
            default=None,
            help="With --pseudonymize: basic keys identifiers and uris; strict also shifts dates per "
            "patient, bands ages, keys image_id and drops sex and manufacturer.",
        ),
        click.option(
            "--results-to",
            default=None,
            metavar="TARGET",
            help="Store each study's DICOM SR (and a Grad-CAM secondary capture when flagged) in a PACS: "
            "dicomweb://HOST:PORT/PATH (STOW-RS) or dicom://AET@HOST:PORT (C-STORE). docs/WRITEBACK.md.",
        ),
        click.option(
            "--score-outside-intended-use",
            is_flag=True,
            default=None,
            help="Research override: score images outside the model's intended use too (recorded per row).",
        ),
        click.option(
            "--score-unparseable",
            is_flag=True,
            default=None,
            help="Score images whose intended-use tags are present but malformed (PatientAge 0045Y, "
            "Modality with a control character) instead of skipping them (recorded per row).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _query(pairs: tuple[str, ...]) -> dict[str, str] | None:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--query")
        out[key] = value
    return out or None


def _score_overrides(flags: dict[str, Any]) -> dict[str, Any]:
    actors = flags.pop("actors", None)
    outside = flags.pop("score_outside_intended_use", None)
    return {
        "dicomweb": {
            "study_date": flags.pop("study_date", None),
            "modalities": tuple(flags.pop("modalities", ())) or None,
            "query": _query(tuple(flags.pop("queries", ()))),
        },
        "score": {
            "pseudonymize": flags.pop("pseudonymize", None),
            "pseudonymize_level": flags.pop("pseudonymize_level", None),
            "enforce_intended_use": None if outside is None else not outside,
            "score_unparseable": flags.pop("score_unparseable", None),
            "engine": flags.pop("engine", None),
            "batch_size": flags.pop("batch_size", None),
            "actors_min": actors,
            "actors_max": actors,
            "gpus_per_actor": flags.pop("gpus_per_actor", None),
            "cpus_per_actor": flags.pop("cpus_per_actor", None),
            "onnx_precision": flags.pop("onnx_precision", None),
            "openvino_precision": flags.pop("openvino_precision", None),
            "explain": flags.pop("explain", None),
            "results_to": flags.pop("results_to", None),
        },
    }


def _with_delivery(s: Any, source: str) -> Any:
    """With ``--results-to``: the target checked before anything runs, Grad-CAM for flagged studies."""
    if s.score.results_to is None:
        return s
    from cxr_ray.writeback.deliver import check_results_to, delivery_settings

    check_results_to(s.score.results_to, source, s)
    return delivery_settings(s)


@main.command()
@click.argument("source")
@click.option("--model", "artifact", required=True, help="Model artifact directory (path or s3://).")
@click.option("--out", required=True, help="Output folder for this run (path or s3://).")
@_engine_flags
@click.option(
    "--explain",
    type=literal_choice(ScoreSettings, "explain"),
    default=None,
    help="Grad-CAM overlays (torch stage) for flagged or all studies; shown in the report.",
)
@click.option(
    "--history",
    default=None,
    help="Metrics history table to append to (default: metrics_history.parquet beside OUT).",
)
@click.option("--overwrite", is_flag=True, help="Replace a committed run already in OUT.")
@click.pass_context
@handle_errors
def score(
    ctx: click.Context,
    source: str,
    artifact: str,
    out: str,
    history: str | None,
    overwrite: bool,
    **flags: Any,
) -> None:
    """Score every image of SOURCE with a model artifact; write predictions and metrics.

    \b
    Writes into OUT (columns described in docs/OUTPUTS.md and in each file's schema):
      predictions.parquet  one row per input file (broken files as status=error rows)
      studies.parquet      one row per study, from its driving image
      metrics.parquet      per-class and overall metrics (labelled runs; also appended
                           to the history table)
      confusion.parquet    the confusion matrix (labelled runs)
      drift.parquet        the drift check against the model's reference, drift_plot.json
      summary.json         counts, flag threshold, versions, settings; written last
      report.html          the HTML report (labelled runs; `cxr-ray report` for any run)

    Ends with a summary: images, ok, errors, flagged, img/s. An OUT that already holds a
    run is refused unless --overwrite.
    """
    s = _with_delivery(settings_from(ctx, _score_overrides(flags)), source)
    require_source(source)
    # Imported after the checks above, so a bad flag or path is refused at once.
    from cxr_ray.cli.progress import Progress
    from cxr_ray.cli.runtime import ray_session
    from cxr_ray.io import storage
    from cxr_ray.metrics import format_metrics_summary
    from cxr_ray.scoring.pipeline import score as run_score

    art = load_model(artifact)
    history = history or storage.join(storage.parent(out), "metrics_history.parquet")
    with ray_session(s.ray, verbose=verbosity(ctx)), Progress("scoring") as progress:
        result = run_score(source, art, out, s, history=history, overwrite=overwrite, on_block=progress)
    from cxr_ray.scoring.result import format_summary  # imported by the run, off its start-up

    click.echo(format_summary(result))
    _write_fhir(out, art)
    if s.score.results_to is not None:
        from cxr_ray.writeback.deliver import deliver_run, format_delivery

        click.echo(format_delivery(deliver_run(out, art, s)))
    if result.metrics:
        from cxr_ray.reporting.report import write_report

        click.echo(format_metrics_summary(result.metrics, title="metrics"))
        click.echo(f"report: {write_report(out)}")


def _write_fhir(out: str, art: Any) -> None:
    """OUT/results.fhir.ndjson: a FHIR DiagnosticReport (+ Observations, the model's Device)
    per assessed DICOM study; nothing for runs of plain image files."""
    from cxr_ray.writeback.context import ModelInfo
    from cxr_ray.writeback.fhir import FHIR_NDJSON, write_run_fhir

    try:
        n = write_run_fhir(out, ModelInfo.from_card(art.card), threshold=art.card.pneumonia_threshold)
    except Exception as exc:  # the run is committed: an export problem must not fail it
        click.echo(f"fhir: not written ({type(exc).__name__}); the run's tables are complete", err=True)
        return
    if n:
        click.echo(f"fhir: {n} resources in {FHIR_NDJSON}")


@main.command()
@click.argument("source")
@click.option("--model", "artifact", required=True, help="Model artifact directory (path or s3://).")
@click.option("--out", required=True, help="Output folder (path or s3://).")
@click.option("--top", type=int, default=20, show_default=True, help="Flagged studies to print.")
@_engine_flags
@click.option("--overwrite", is_flag=True, help="Replace a committed run already in OUT.")
@click.pass_context
@handle_errors
def screen(
    ctx: click.Context, source: str, artifact: str, out: str, top: int, overwrite: bool, **flags: Any
) -> None:
    """Screen a whole archive retrospectively: score everything, rank the flagged studies.

    Writes what `score` writes (predictions, studies, metrics, confusion, drift and
    summary.json) plus OUT/flagged.parquet (the flagged rows of studies.parquet,
    one per study, most suspicious first) and OUT/report.html, and prints the images ok /
    skipped / errors, studies per predicted class and the TOP flagged studies, each named by
    its driving image's id (never study UIDs, patient ids or file names).
    """
    s = _with_delivery(settings_from(ctx, _score_overrides(flags)), source)
    require_source(source)
    from cxr_ray.cli.progress import Progress
    from cxr_ray.cli.runtime import ray_session
    from cxr_ray.metrics import format_metrics_summary
    from cxr_ray.reporting.report import write_report
    from cxr_ray.scoring.screen import format_screen
    from cxr_ray.scoring.screen import screen as run_screen

    art = load_model(artifact)
    delivered: list[str] = []

    def deliver(_: Any) -> None:
        from cxr_ray.writeback.deliver import deliver_run, format_delivery

        delivered.append(format_delivery(deliver_run(out, art, s)))

    after = deliver if s.score.results_to is not None else None
    with ray_session(s.ray, verbose=verbosity(ctx)), Progress("screening") as progress:
        result = run_screen(
            source, art, out, s, top=top, overwrite=overwrite, on_block=progress, after_score=after
        )
    click.echo(format_screen(result))
    _write_fhir(out, art)
    for line in delivered:
        click.echo(line)
    if result.scored.metrics:
        click.echo(format_metrics_summary(result.scored.metrics, title="metrics"))
    click.echo(f"report: {write_report(out)}")


@main.command()
@click.argument("source")
@click.option("--model", "artifact", required=True, help="Model artifact directory (path or s3://).")
@click.option("--root", required=True, help="Folder of the nightly tables and runs (path or s3://).")
@_engine_flags
@click.option(
    "--on-busy",
    type=_NightlyChoice("on_busy"),
    default="wait",
    show_default=True,
    help="When another run holds this root's lease: wait for it, or exit 0 at once.",
)
@click.option("--max-wait", type=float, default=6 * 3600.0, show_default=True, help="Seconds to wait.")
@click.option(
    "--lease-ttl",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds a lease outlives its holder's last heartbeat (a killed run's lease expires).",
)
@click.option("--no-lease", is_flag=True, help="Run without the lease (exactly-once still holds).")
@click.pass_context
@handle_errors
def nightly(
    ctx: click.Context,
    source: str,
    artifact: str,
    root: str,
    on_busy: str,
    max_wait: float,
    lease_ttl: float,
    no_lease: bool,
    **flags: Any,
) -> None:
    """Incremental scoring: only the images of SOURCE this model version has not scored yet.

    Everything goes under ROOT as Delta Lake tables (predictions, studies, metrics_history,
    drift_history) plus each run's folder ROOT/runs/RUN_ID (what `score` writes): each
    (image, model version) is recorded exactly once, also when runs overlap; a rerun over
    the same SOURCE adds nothing, and a run killed mid-way leaves no rows and is finished by
    the next one. A run that finds another one active on ROOT waits for it (or, with
    --on-busy exit, exits 0 at once). For a DICOMweb SOURCE without
    --study-date, only studies dated since the last committed run are listed.
    """
    s = _with_delivery(settings_from(ctx, _score_overrides(flags)), source)
    require_source(source)
    from cxr_ray.cli.progress import Progress
    from cxr_ray.cli.runtime import ray_session
    from cxr_ray.scoring.nightly import NightlyOptions, format_nightly, run_nightly

    art = load_model(artifact)
    options = NightlyOptions(
        on_busy="exit" if on_busy == "exit" else "wait",
        max_wait_s=max_wait,
        lease_ttl_s=lease_ttl,
        lease=not no_lease,
    )
    after = None
    if s.score.results_to is not None:
        from cxr_ray.writeback.deliver import nightly_hook

        after = nightly_hook(root, art, s)
    with ray_session(s.ray, verbose=verbosity(ctx)), Progress("nightly") as progress:
        result = run_nightly(source, art, root, s, on_block=progress, options=options, after_commit=after)
    click.echo(format_nightly(result))


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
    from cxr_ray.scoring.evaluation import evaluate_table, run_threshold

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
@click.option(
    "--review-sample",
    type=click.IntRange(min=0),
    default=40,
    show_default=True,
    help="Unflagged scored studies drawn at random (seeded) into the review worklist, beside the "
    "flagged ones: a threshold cannot be fitted on flagged studies alone.",
)
@click.option(
    "--review-limit",
    type=click.IntRange(min=0),
    default=300,
    show_default=True,
    help="Most studies in the review worklist (the random sample is kept; the least suspicious "
    "flagged studies are left out first, with a note).",
)
@handle_errors
def report(run_dir: str, out: str | None, top: int, review_sample: int, review_limit: int) -> None:
    """Write a self-contained HTML report of a scoring run.

    Run summary, drift against the model's reference, per-class metrics, confusion matrix,
    ROC and reliability curves, the pneumonia-score histogram, error rows, a gallery of the
    most suspicious flagged studies (with Grad-CAM overlays when the run was scored with
    --explain) and a review worklist: mark studies in the browser (keys n/b/v/x) and export
    the labels as a CSV for `cxr-ray calibrate --labelled RUN_DIR --labels CSV`. One file,
    images embedded, no server: it can be mailed or attached to a ticket and works offline.
    """
    from cxr_ray.io import storage
    from cxr_ray.reporting.report import write_report

    if not storage.exists(storage.join(run_dir, "predictions.parquet")):
        raise DataError(f"{run_dir!r} has no predictions.parquet: pass a folder written by `cxr-ray score`")
    target = write_report(run_dir, out, top=top, review_sample=review_sample, review_limit=review_limit)
    click.echo(f"wrote {target}")
