"""``cxr-ray drift-reference``: add a drift reference to an artifact trained before they existed."""

from __future__ import annotations

import click

from cxr_ray.cli._app import handle_errors, load_model, main, settings_from

#: Artifact files besides the card, weights and reference that a copy (``--out``) carries.
_COMPANIONS = ("split.parquet", "val_metrics.parquet", "training_curve.png", "model_card.md")


@main.command("drift-reference")
@click.option("--model", "artifact", required=True, help="Model artifact directory (with its split.parquet).")
@click.option(
    "--out",
    default=None,
    help="Write a copy of the artifact with the reference here (default: add it to --model in place).",
)
@click.pass_context
@handle_errors
def drift_reference(ctx: click.Context, artifact: str, out: str | None) -> None:
    """Build the drift reference from the artifact's validation images and store it.

    Every scoring run compares itself with this reference (drift.parquet, the summary's
    `drift` entry). Artifacts written by `cxr-ray train` already have one; this adds it to
    older ones. The images named by the artifact's split.parquet must be readable here. The
    model version does not change: weights and calibration are untouched.
    """
    from cxr_ray.io import storage
    from cxr_ray.models.artifact import save_artifact
    from cxr_ray.models.reference import build_reference, read_reference

    s = settings_from(ctx, {})
    art = load_model(artifact, verify_shapes=True)
    reference = build_reference(
        art,
        data=s.data,
        components=s.drift.reference_components,
        max_images=s.drift.reference_max_images,
    )
    target = out or artifact
    if out:
        for name in _COMPANIONS:
            src = storage.join(artifact, name)
            if storage.exists(src):
                storage.write_bytes(storage.read_bytes(src), storage.join(out, name))
    card = save_artifact(art.weights, art.card, target, reference=reference)
    ref = read_reference(reference)
    replaced = " (replacing the previous one)" if art.reference is not None and not out else ""
    click.echo(
        f"drift reference of {card.version} from {ref.n} validation images "
        f"({ref.meta['components']} feature components) written to {target}{replaced}"
    )
