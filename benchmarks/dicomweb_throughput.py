"""Scoring from a PACS: DICOMweb from Orthanc on loopback vs the same images as local files.

    python benchmarks/dicomweb_throughput.py [--images 2000] [--model ARTIFACT]

From the full-resolution Kermany originals in ../shared/data/kermany-fullres (479 JPEGs,
cycled up to --images, each copy a DICOM with its own UIDs), three sources of the same
images, each scored end to end by ``cxr_ray.scoring.pipeline.score`` on a fresh local Ray
(default CPU engine and settings), measured in one run on one machine:

  jpeg       the original JPEG files (hard links) in a folder
  dicom      JPEG-baseline encapsulated DICOM files (the original JPEG bytes, transfer
             syntax 1.2.840.10008.1.2.4.50) in a folder
  dicomweb   the same DICOM files uploaded to a local Orthanc (Debian's orthanc +
             orthanc-dicomweb, started by tests.orthanc_server), read through
             dicomweb://127.0.0.1:PORT/dicom-web: QIDO-RS listing on the driver, WADO-RS
             retrieval in the Ray read tasks

Prints img/s (end to end, and steady state after the first committed block), the listing
time of the DICOMweb source, and the ratios dicomweb/dicom, dicom/jpeg and dicomweb/jpeg.
Orthanc runs on the same cores as the pipeline, as a PACS on a shared node would not.
Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from _common import mobilenet_artifact, timed_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.dicom_factory and tests.orthanc_server

DATA = ROOT.parent / "shared" / "data" / "kermany-fullres"


def originals(data: Path) -> list[Path]:
    files = sorted(data.rglob("*.jpeg"))
    if not files:
        sys.exit(f"no images under {data}: the benchmark needs ../shared/data/kermany-fullres")
    return files


def jpeg_folder(files: list[Path], dst: Path, n: int) -> None:
    for i in range(n):
        f = files[i % len(files)]
        target = dst / f"copy{i // len(files):02d}" / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, target)


def dicom_folder(files: list[Path], dst: Path, n: int) -> list[Path]:
    from tests import dicom_factory

    jpegs = [f.read_bytes() for f in files]
    dst.mkdir(parents=True)
    out = []
    for inst in dicom_factory.iter_copies(jpegs, n):
        path = dst / inst.filename
        path.write_bytes(inst.data)
        out.append(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--model", default=None, help="artifact (default: MobileNetV2, random head)")
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()

    from cxr_ray.config import load_settings
    from cxr_ray.models.artifact import load_artifact
    from tests.orthanc_server import Orthanc, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        sys.exit(reason)
    files = originals(Path(args.data))
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        t = time.perf_counter()
        jpeg_folder(files, tmpd / "jpeg", args.images)
        dicoms = dicom_folder(files, tmpd / "dicom", args.images)
        made = time.perf_counter() - t
        size_mb = sum(p.stat().st_size for p in dicoms) / 1e6
        server = Orthanc(tmpd / "orthanc")
        server.start()
        try:
            t = time.perf_counter()
            server.upload_many([p.read_bytes() for p in dicoms])
            uploaded = time.perf_counter() - t
            assert server.count_instances() == args.images

            artifact = args.model
            if artifact is None:
                artifact = mobilenet_artifact(tmpd / "model")
            art = load_artifact(artifact)
            settings = load_settings(None, {"score": {"cache_dir": str(tmpd / "cache")}})
            print(
                f"{args.images} images from {len(files)} full-resolution originals ({size_mb:.0f} MB of "
                f"DICOM, made in {made:.1f} s, uploaded to Orthanc in {uploaded:.1f} s); model "
                f"{art.card.version} at {art.card.input_size[0]}px; {os.cpu_count()} CPUs"
            )

            def timed(source: str, out: str, n: int = args.images) -> tuple[float, float, float]:
                t = timed_score(source, artifact, str(tmpd / out), settings)
                assert t.result.images == n, (out, t.result.images)
                assert t.result.errors == 0, (out, t.result.error_examples)
                return t.end_to_end, t.steady, t.first_rows_s

            from cxr_ray.data.dicomweb import list_units
            from cxr_ray.data.manifest import read_options

            t = time.perf_counter()
            units = list_units(server.source, read_options(settings.data, settings.dicomweb))
            listing = time.perf_counter() - t
            assert sum(u.num_rows for u in units) == args.images

            # A warm-up run (ONNX export, caches) so no timed run pays one-time costs.
            jpeg_folder(files, tmpd / "warmup", 32)
            timed(str(tmpd / "warmup"), "out-warmup", 32)
            runs = {
                "jpeg": timed(str(tmpd / "jpeg"), "out-jpeg"),
                "dicom": timed(str(tmpd / "dicom"), "out-dicom"),
                "dicomweb": timed(server.source, "out-dicomweb"),
            }
        finally:
            server.stop()

    print(f"\nDICOMweb listing (QIDO-RS, driver, {len(units)} read units): {listing:.1f} s")
    print(f"\n{'source':<10} {'img/s end to end':>17} {'img/s steady':>13} {'first rows s':>13}")
    for name, (e2e, steady, first) in runs.items():
        print(f"{name:<10} {e2e:>17.1f} {steady:>13.1f} {first:>13.1f}")
    print("\nratios (end to end / steady):")
    for a, b in (("dicomweb", "dicom"), ("dicom", "jpeg"), ("dicomweb", "jpeg")):
        print(f"  {a}/{b}: {runs[a][0] / runs[b][0]:.2f} / {runs[a][1] / runs[b][1]:.2f}")


if __name__ == "__main__":
    main()
