"""Scoring from a PACS: DICOMweb from Orthanc on loopback vs the same images as local files.

    python benchmarks/dicomweb_throughput.py [--images 2000] [--model ARTIFACT] [--retrieval 200]
        [--blocks-ab]

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

Before the scoring runs, WADO-RS retrieval alone (no Ray, no decode) of up to --retrieval
instances in five ways: the former path (dicomweb-client, one request at a time, pydicom
writing the file again), ``cxr_ray.data.dicomweb_wado`` with 1 and with dicomweb.concurrency
requests in flight (as stored, transfer-syntax=*), metadata + frames (two requests per
image), and the server's default transfer syntax (Orthanc transcodes): img/s, MB per image,
and CPU ms per image in this process and in Orthanc.

Prints img/s (end to end, and steady state after the first committed block) and seconds to
the first rows per source, the listing time of the DICOMweb source, and in its last lines
the ratios of issue 20's goals measured in this one run. Orthanc runs on the same cores as
the pipeline, as a PACS on a shared node would not. Not a test: numbers depend on the
machine and its load.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    ap.add_argument("--retrieval", type=int, default=200, help="instances in the retrieval-only runs")
    ap.add_argument(
        "--blocks-ab",
        action="store_true",
        help="also score DICOMweb with dicomweb.blocks_per_task = 4 (next block retrieved during decode)",
    )
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

            def timed(
                source: str, out: str, n: int = args.images, s: Any = settings
            ) -> tuple[float, float, float]:
                t = timed_score(source, artifact, str(tmpd / out), s)
                assert t.result.images == n, (out, t.result.images)
                assert t.result.errors == 0, (out, t.result.error_examples)
                return t.end_to_end, t.steady, t.first_rows_s

            from cxr_ray.data.dicomweb import list_units
            from cxr_ray.data.manifest import read_options

            t = time.perf_counter()
            units = list_units(server.source, read_options(settings.data, settings.dicomweb))
            listing = time.perf_counter() - t
            assert sum(u.num_rows for u in units) == args.images
            retrieval_runs(server, units, settings.dicomweb, args.retrieval)

            # A warm-up run (ONNX export, caches) so no timed run pays one-time costs.
            jpeg_folder(files, tmpd / "warmup", 32)
            timed(str(tmpd / "warmup"), "out-warmup", 32)
            runs = {
                "jpeg": timed(str(tmpd / "jpeg"), "out-jpeg"),
                "dicom": timed(str(tmpd / "dicom"), "out-dicom"),
                "dicomweb": timed(server.source, "out-dicomweb"),
            }
            if args.blocks_ab:
                four = settings.model_copy(
                    update={"dicomweb": settings.dicomweb.model_copy(update={"blocks_per_task": 4})}
                )
                runs["dicomweb-4b"] = timed(server.source, "out-dicomweb-4b", s=four)
        finally:
            server.stop()

    print(f"\nDICOMweb listing (QIDO-RS, driver, {len(units)} read units): {listing:.1f} s")
    print("\nratios (end to end / steady):")
    pairs = [("dicomweb", "dicom"), ("dicom", "jpeg"), ("dicomweb", "jpeg")]
    for a, b in pairs + ([("dicomweb-4b", "dicomweb")] if "dicomweb-4b" in runs else []):
        print(f"  {a}/{b}: {runs[a][0] / runs[b][0]:.2f} / {runs[a][1] / runs[b][1]:.2f}")
    print(f"\n{'source':<11} {'img/s end to end':>17} {'img/s steady':>13} {'first rows s':>13}")
    for name, (e2e, steady, first) in runs.items():
        print(f"{name:<11} {e2e:>17.1f} {steady:>13.1f} {first:>13.1f}")
    goals = (
        ("DICOM files steady / JPEG steady", runs["dicom"][1] / runs["jpeg"][1], 0.8),
        ("DICOM files end to end / JPEG end to end", runs["dicom"][0] / runs["jpeg"][0], 0.8),
        ("DICOMweb steady / DICOM files steady", runs["dicomweb"][1] / runs["dicom"][1], 0.9),
    )
    print(f"\ngoals of issue 20 ({args.images} images, one run):")
    for what, ratio, goal in goals:
        print(f"  {what:<42} {ratio:5.2f}  (goal >= {goal}: {'met' if ratio >= goal else 'NOT met'})")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def retrieval_runs(server: Any, units: list[Any], dicomweb: Any, n: int) -> None:
    """WADO-RS retrieval only (no Ray, no decode) of the first ``n`` listed instances."""

    from cxr_ray.data import dicomweb_wado as wado
    from cxr_ray.data.dicomweb import endpoint, parse_instance_uri
    from cxr_ray.data.dicomweb_http import make_client, ordered_map

    refs = [r for u in units for r in u.refs][:n]
    url = endpoint(server.source).url
    threads = dicomweb.concurrency
    local = threading.local()

    def former(uri: str) -> int:
        import pydicom

        if not hasattr(local, "client"):
            local.client = make_client(url, dicomweb)
        _, study, series, sop = parse_instance_uri(uri)
        ds = local.client.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds)
        return len(buf.getvalue())

    def fetcher(concurrency: int, accept: str) -> Callable[[str], int]:
        r = wado.Retriever(url, dicomweb.model_copy(update={"concurrency": concurrency}), 1 << 30)
        r.accept = accept

        def get(uri: str) -> int:
            data, error = r.get(uri)
            assert error is None, error
            return len(data or b"")

        return get

    def meta_frames(concurrency: int) -> Callable[[str], int]:
        r = wado.Retriever(url, dicomweb.model_copy(update={"concurrency": concurrency}), 1 << 30)

        def get(uri: str) -> int:
            _, study, series, sop = parse_instance_uri(uri)
            base = f"{url}/studies/{study}/series/{series}/instances/{sop}"
            meta, _ = r._fetch(base + "/metadata", "application/dicom+json")
            frame, _ = r._fetch(
                base + "/frames/1", 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
            )
            return len(meta) + len(frame)

        return get

    ways = (
        ("former: dicomweb-client + pydicom rewrite", former, threads),
        ("instance as stored, 1 in flight", fetcher(1, wado.ACCEPT_AS_STORED), 1),
        (f"instance as stored, {threads} in flight", fetcher(threads, wado.ACCEPT_AS_STORED), threads),
        (f"metadata + frames (2 requests), {threads} in flight", meta_frames(threads), threads),
        (
            f"server default syntax, {threads} in flight",
            fetcher(threads, wado.ACCEPT_SERVER_DEFAULT),
            threads,
        ),
    )
    print(f"\nWADO-RS retrieval only, {len(refs)} instances (no Ray, no decode):")
    print(f"  {'way':<48} {'img/s':>7} {'MB/img':>7} {'client ms/img':>14} {'Orthanc ms/img':>15}")
    for name, work, t in ways:
        cpu0, orthanc0, t0 = time.process_time(), _cpu_s(server.proc.pid), time.perf_counter()
        sizes = list(ordered_map([r.uri for r in refs], work, t))
        wall = time.perf_counter() - t0
        client = (time.process_time() - cpu0) * 1000 / len(refs)
        orthanc = (_cpu_s(server.proc.pid) - orthanc0) * 1000 / len(refs)
        mb = sum(sizes) / len(sizes) / 1e6
        print(f"  {name:<48} {len(refs) / wall:>7.1f} {mb:>7.2f} {client:>14.1f} {orthanc:>15.1f}")


if __name__ == "__main__":
    main()
