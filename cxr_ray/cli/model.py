"""Model commands: train, export, explain, demo."""

from __future__ import annotations

from typing import Any

import click

from cxr_ray.cli._app import (
    handle_errors,
    literal_choice,
    load_model,
    main,
    require_source,
    settings_from,
    verbosity,
)
from cxr_ray.config import TrainSettings
from cxr_ray.errors import CxrRayError
from cxr_ray.labels import LABELS
from cxr_ray.vocabulary import ARCHITECTURES, INTENSITY_MODES


@main.command()
@click.argument("data")
@click.option("--out", required=True, help="Artifact directory to write (path or s3://).")
@click.option("--arch", default=None, help=f"Backbone: {' | '.join(ARCHITECTURES)} (default: mobilenet_v2).")
@click.option("--pretrained/--no-pretrained", default=None, help="Start from offline ImageNet weights.")
@click.option("--input-size", type=int, default=None, help="Square input size in pixels (224).")
@click.option("--intensity", default=None, help=f"Intensity normalisation: {' | '.join(INTENSITY_MODES)}.")
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
@click.option(
    "--precision",
    type=literal_choice(TrainSettings, "precision"),
    default=None,
    help="Training precision; auto: bf16 autocast on GPUs and on CPUs with native bf16, else fp32.",
)
@click.pass_context
@handle_errors
def train(ctx: click.Context, data: str, out: str, **flags: Any) -> None:
    """Fine-tune a pretrained CNN on labelled X-rays with Ray Train (DDP) and write an artifact.

    DATA is an image source (folder, archive, Parquet of bytes, s3://...), a manifest, or a
    split table from `cxr-ray split`. Validation is a patient-grouped split of DATA; the
    best epoch by validation macro-F1 becomes the artifact (model_card.json,
    model.safetensors, val_metrics.parquet, training_curve.png).
    """
    model_keys = ("arch", "pretrained", "input_size", "intensity")
    overrides = {
        "model": {k: flags.pop(k) for k in model_keys},
        "train": dict(flags),
    }
    s = settings_from(ctx, overrides)
    require_source(data, "training data")
    # Imported after the checks above, so a bad flag is refused without loading torch.
    from cxr_ray.cli.runtime import ray_session
    from cxr_ray.metrics import format_metrics_summary
    from cxr_ray.training.trainer import train as run_training

    # Ray Train's per-epoch lines come from the workers: forwarded even when not verbose.
    with ray_session(s.ray, verbose=verbosity(ctx), worker_logs=True):
        card = run_training(s, data, out)
    click.echo(f"artifact {card.version} written to {out}")
    click.echo(format_metrics_summary(card.metrics.get("validation", {})))


@main.command("export")
@click.option("--model", "artifact", required=True, help="Model artifact directory.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True)
@click.option("--out", default=None, help="Where to write the file (default: the engine cache).")
@click.pass_context
@handle_errors
def export_cmd(ctx: click.Context, artifact: str, fmt: str, out: str | None) -> None:
    """Build the artifact's ONNX model or TensorRT engine ahead of time.

    ONNX: a single-file model with a dynamic batch axis (input "pixels" float32
    [N,1,H,W] in 0..1; outputs "logits" [N,3], raw, and "features" [N,F], the penultimate
    layer). The card's calibration (temperature, per-class scale and bias) is applied to the
    logits outside the graph: ModelCard.probabilities / cxr_ray.calibration.calibrated_probs.
    TensorRT: an engine for this machine's GPU and TensorRT version, cached under
    score.cache_dir so scoring actors on this node load it instead of building it.
    """
    from pathlib import Path

    from cxr_ray.engines import engine_options, prepare, select_engine
    from cxr_ray.engines.onnx_export import cached_onnx, onnx_cache_path
    from cxr_ray.io import storage
    from cxr_ray.models.card import spec_for

    s = settings_from(ctx, {})
    art = load_model(artifact)
    options = engine_options(s.score)
    if fmt == "onnx":
        data, _ = cached_onnx(art, options.cache_dir)
        target = out or str(onnx_cache_path(art, options.cache_dir))
        if out:
            storage.write_bytes(data, out)
        click.echo(f"ONNX model ({len(data) / 1e6:.1f} MB) for {art.card.version}: {target}")
        return
    select_engine("tensorrt")
    from cxr_ray.engines.tensorrt_engine import build_engine_file

    payload, _ = prepare(art, "tensorrt", options, spec_for(art.card, s.data))
    path = build_engine_file(payload)
    if out:
        storage.write_bytes(Path(path).read_bytes(), out)
    click.echo(f"TensorRT engine for {art.card.version}: {out or path}")


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--model", "artifact", required=True, help="Model artifact directory.")
@click.option("--out", default="heatmaps", show_default=True, help="Folder for the overlay PNGs.")
@click.option(
    "--target",
    type=click.Choice(["predicted", *LABELS]),
    default="predicted",
    show_default=True,
    help="Class whose evidence the heatmap shows.",
)
@click.pass_context
@handle_errors
def explain(ctx: click.Context, images: tuple[str, ...], artifact: str, out: str, target: str) -> None:
    """Grad-CAM heatmaps for single images: where the model looked.

    Writes OUT/<file name>.png (the preprocessed image with the heatmap in jet colours) and
    prints each image's probabilities. The target layer comes from the model card.
    """
    from pathlib import Path

    import numpy as np
    import torch

    from cxr_ray.imaging.preprocess import decode, to_model_input
    from cxr_ray.io import storage
    from cxr_ray.labels import LABELS
    from cxr_ray.models.card import spec_for
    from cxr_ray.scoring.explain import gradcam, overlay_png

    s = settings_from(ctx, {})
    art = load_model(artifact)
    net = art.build()
    spec = spec_for(art.card, s.data)
    for path in images:
        try:
            pixels = decode(storage.read_bytes(path), spec, path).pixels
        except (OSError, CxrRayError) as exc:
            click.echo(f"{path}: error: {exc}")
            continue
        x = torch.from_numpy(to_model_input(pixels[None]))
        with torch.inference_mode():
            probs = art.card.probabilities(net(x).double().numpy())[0]
        cls = None if target == "predicted" else np.array([LABELS.index(target)])
        heat, used = gradcam(net, x, art.card.target_layer, cls)
        dest = storage.join(out, Path(path).name.rsplit(".", 1)[0] + ".png")
        storage.write_bytes(overlay_png(pixels, heat[0]), dest)
        shown = "  ".join(f"{k}={v:.3f}" for k, v in zip(LABELS, probs, strict=True))
        click.echo(f"{path}: {shown}  heatmap for {LABELS[int(used[0])]} -> {dest}")


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

    from cxr_ray.cli.demo import run_demo
    from cxr_ray.cli.runtime import ray_session
    from cxr_ray.metrics import format_metrics_summary
    from cxr_ray.scoring.result import format_summary

    s = settings_from(ctx, {})
    data = Path(data_dir) if data_dir and Path(data_dir).is_dir() else None
    if data_dir and data is None:
        click.echo(f"{data_dir} not found: using a generated synthetic sample")
    with ray_session(s.ray, verbose=verbosity(ctx)):
        result = run_demo(Path(out), s, data)
    click.echo(f"\nsource: {result.source}")
    click.echo(f"manifest: {result.manifest.rows} files {dict(result.manifest.status)}")
    click.echo(f"model: {result.card.version} in {Path(out) / 'model'}")
    click.echo(format_metrics_summary(result.card.metrics.get("validation", {})))
    click.echo("\nscoring the validation images the model did not train on:")
    click.echo(format_summary(result.scored))
    from cxr_ray import metrics
    from cxr_ray.io import storage
    from cxr_ray.scoring.evaluation import evaluate_table

    m = evaluate_table(
        storage.read_table(str(Path(out) / "scores" / "predictions.parquet")), result.scored.flag_threshold
    )
    if m is not None:
        click.echo(metrics.format_metrics(m))


@main.command("intended-use")
@click.argument("artifact")
@click.option("--modality", "modalities", multiple=True, help="Allowed DICOM Modality (repeat; replaces).")
@click.option("--body-part", "body_parts", multiple=True, help="Allowed BodyPartExamined (repeat; replaces).")
@click.option("--view", "views", multiple=True, help="Allowed ViewPosition (repeat; replaces).")
@click.option("--min-age", "min_age_years", type=float, default=None, help="Youngest patient, in years.")
@click.option("--max-age", "max_age_years", type=float, default=None, help="Oldest patient, in years.")
@handle_errors
def intended_use(artifact: str, **changes: Any) -> None:
    """Show, or change, the intended use an artifact's model card enforces at scoring.

    Without options: prints the block (modalities, body parts, views, age range). With
    options: validates the new block and rewrites the card in place (the weights, and so the
    model version, are unchanged); every later scoring run skips images outside it.

    \b
      cxr-ray intended-use artifacts/mnv2                   # show
      cxr-ray intended-use artifacts/mnv2 --max-age 21      # a site that scans young adults
    """
    from cxr_ray.io import storage
    from cxr_ray.models.card import CARD_FILE
    from cxr_ray.models.intended_use import with_intended_use

    art = load_model(artifact)
    given = {k: v for k, v in changes.items() if v not in (None, ())}
    if not given:
        click.echo(f"{art.card.version}: {art.card.intended_use_policy.describe()}")
        return
    card = with_intended_use(art.card, **given)
    storage.write_bytes(card.to_json().encode(), storage.join(artifact, CARD_FILE))
    click.echo(f"{card.version}: {card.intended_use_policy.describe()} (written to {artifact}/{CARD_FILE})")
