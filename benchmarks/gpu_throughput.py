"""GPU scoring throughput on full-resolution X-rays: torch-cuda vs TensorRT, per GPU.

    python benchmarks/gpu_throughput.py [--images 2000] [--model ARTIFACT] [--append-results]

Needs a CUDA GPU (exits with a message otherwise). Uses ../shared/data/kermany-fullres
(original-resolution JPEGs), hard-linked into a temp folder until there are at least
--images files. Measured in one run, on one machine:

  end to end   cxr_ray.scoring.pipeline.score on a local Ray, one predictor actor per GPU,
               GPU JPEG decode in the actor, for engine torch (CUDA, fp16) and tensorrt
               (only when the tensorrt package imports); img/s per GPU
  decode only  GPU decode_batch (nvJPEG + resize on the GPU) vs the CPU contract
               (cxr_ray.imaging.preprocess.decode) on one core
  model only   engine.run_tensor on batches already on the GPU (no decode, no copies)
  in-actor     decode_batch + run_tensor in a loop, no Ray: what one actor can sustain

Prints a table with ratios and the GPU name; --append-results appends it to
benchmarks/RESULTS.md. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch
from _common import mobilenet_artifact, replicate, timed_score

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kermany-fullres"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def _rate(n: int, fn, *, sync: bool = True) -> float:
    """Items per second of ``fn()`` processing ``n`` items (CUDA work included)."""
    if sync:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def decode_ceilings(datas: list[bytes], spec, batch: int) -> tuple[float, float]:
    from cxr_ray.imaging.gpu_decode import decode_batch
    from cxr_ray.imaging.preprocess import decode

    decode_batch(datas[:batch], spec, device="cuda")  # nvJPEG handles, CUDA context

    def gpu() -> None:
        for i in range(0, len(datas), batch):
            decode_batch(datas[i : i + batch], spec, device="cuda")

    def cpu() -> None:
        for d in datas[:300]:
            decode(d, spec)

    return _rate(len(datas), gpu), _rate(min(300, len(datas)), cpu, sync=False)


def engine_ceilings(engine, datas: list[bytes], spec, batch: int) -> tuple[float, float]:
    """(model-only img/s, in-actor decode+model+input-statistics img/s) for one engine."""
    import numpy as np

    from cxr_ray.imaging.gpu_decode import decode_pixels, to_input
    from cxr_ray.scoring.stages import pixel_stats

    x = torch.rand(batch, 1, spec.height, spec.width, device="cuda")
    for _ in range(3):
        engine.run_tensor(x)  # warm-up: cuDNN autotune, TensorRT context memory
    reps = 20
    model = _rate(batch * reps, lambda: [engine.run_tensor(x) for _ in range(reps)])

    def in_actor() -> None:  # what CxrPredictor does per batch on the GPU-decode path
        for i in range(0, len(datas), batch):
            decoded = decode_pixels(datas[i : i + batch], spec, device="cuda")
            good = [k for k, e in enumerate(decoded.errors) if e is None]
            pixels = decoded.pixels[good]
            logits, features = engine.run_tensor(to_input(pixels))
            logits.cpu(), features.cpu()
            pixel_stats(pixels[:, 0].cpu().numpy(), np.array([decoded.sizes[k] for k in good]))

    return model, _rate(len(datas), in_actor)


def end_to_end(images: Path, artifact: str, out: Path, score_settings: dict) -> tuple[float, float]:
    """(img/s wall, img/s steady state) of the scoring pipeline on the running local Ray."""
    from cxr_ray.config import load_settings

    t = timed_score(
        str(images), artifact, str(out), load_settings(None, {"score": score_settings}), fresh_ray=False
    )
    if t.result.errors:
        print(f"  warning: {t.result.errors} error rows, e.g. {t.result.error_examples[:1]}")
    return t.end_to_end, t.steady


def _model(tmpd: Path, size: int, files: list[Path]) -> str:
    """A MobileNetV2 artifact whose ``split.parquet`` lists real images (INT8 calibrates on them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxr_ray.labels import parse_kermany_path

    artifact = mobilenet_artifact(tmpd / "model", size)
    uris = [str(f) for f in files[:640]]
    split = ["val" if i % 5 == 0 else "train" for i in range(len(uris))]
    labels = [parse_kermany_path(u).label for u in uris]
    pq.write_table(pa.table({"uri": uris, "label": labels, "split": split}), f"{artifact}/split.parquet")
    return artifact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--model", default=None, help="artifact (default: MobileNetV2 at 224 px)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--batch", type=int, default=128, help="predictor batch size")
    ap.add_argument("--precision", default="fp16", choices=["fp16", "fp32", "int8"])
    ap.add_argument("--append-results", action="store_true", help=f"append to {RESULTS}")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        sys.exit("gpu_throughput.py needs a CUDA GPU and none is visible; run it on a GPU node")
    gpus = torch.cuda.device_count()
    gpu_name = torch.cuda.get_device_name(0)
    has_trt = importlib.util.find_spec("tensorrt") is not None

    import ray
    import ray.data

    from cxr_ray.config import ScoreSettings
    from cxr_ray.engines import build, engine_options, prepare
    from cxr_ray.models.artifact import load_artifact
    from cxr_ray.models.card import spec_for

    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        files = replicate(Path(args.data), tmpd / "images", args.images)
        artifact = args.model or _model(tmpd, 224, files)
        art = load_artifact(artifact)
        card = art.card
        spec = spec_for(card)
        cache = str(tmpd / "cache")
        trt = {"trt_precision": args.precision, "trt_opt_batch": args.batch}
        trt["trt_max_batch"] = max(256, args.batch)
        options = engine_options(ScoreSettings(cache_dir=cache, gpus_per_actor=1, **trt))
        print(
            f"{len(files)} full-resolution JPEGs, model {card.version} at {spec.height}px, "
            f"{gpus} x {gpu_name}, {os.cpu_count()} CPUs, tensorrt: {has_trt}"
        )

        datas = [f.read_bytes() for f in files[:1000]]
        gpu_dec, cpu_dec = decode_ceilings(datas, spec, args.batch)
        engines = ["torch"] + (["tensorrt"] if has_trt else [])
        ceilings: dict[str, tuple[float, float]] = {}
        for name in engines:
            # Also warms the ONNX export and the TensorRT engine cache the actors will use.
            payload, _ = prepare(art, name, options, spec)
            ceilings[name] = engine_ceilings(build(payload), datas, spec, args.batch)
            torch.cuda.empty_cache()

        ray.init(include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        e2e: dict[str, tuple[float, float]] = {}
        for name in engines:
            score_settings = {
                "engine": name,
                "gpus_per_actor": 1,
                "actors_min": gpus,
                "actors_max": gpus,
                "batch_size": args.batch,
                "gpu_decode": True,
                "cache_dir": cache,
                **trt,
            }
            rate = end_to_end(tmpd / "images", artifact, tmpd / f"out-{name}", score_settings)
            e2e[name] = (rate[0] / gpus, rate[1] / gpus)
        # The CPU path on the same node, for the ratio: onnxruntime actors, two cores each,
        # leaving half the cores to the decode tasks.
        cpus = os.cpu_count() or 2
        actors = max(1, cpus // 4)
        cpu_settings = {
            "engine": "onnxruntime",
            "actors_min": actors,
            "actors_max": actors,
            "cpus_per_actor": 2,
            "threads_per_actor": 2,
            "cache_dir": cache,
        }
        cpu_rate = end_to_end(tmpd / "images", artifact, tmpd / "out-cpu", cpu_settings)
        ray.shutdown()

    rows = [(f"end to end, {n} (per GPU)", e2e[n][0]) for n in engines]
    rows += [(f"end to end, CPU path (onnxruntime, {actors} actors, {cpus} CPUs)", cpu_rate[0])]
    rows += [(f"end to end, {n}, steady state (per GPU)", e2e[n][1]) for n in engines]
    rows += [(f"in-actor decode+model, {n} (no Ray)", ceilings[n][1]) for n in engines]
    rows += [(f"model only, {n}, batch {args.batch} on GPU", ceilings[n][0]) for n in engines]
    rows += [
        (f"decode only, GPU decode_batch, batch {args.batch}", gpu_dec),
        ("decode only, CPU draft decode, 1 core", cpu_dec),
    ]
    lines = [f"{'what':<52} {'img/s':>9}", *(f"{k:<52} {v:>9.1f}" for k, v in rows), ""]
    lines.append(f"GPU decode / CPU decode per core: {gpu_dec / cpu_dec:.1f}x")
    for n in engines:
        lines.append(f"{n} (all {gpus} GPUs) / CPU path end to end: {e2e[n][0] * gpus / cpu_rate[0]:.2f}x")
    if "tensorrt" in engines:
        lines.append(f"tensorrt / torch end to end: {e2e['tensorrt'][0] / e2e['torch'][0]:.2f}x")
        lines.append(f"tensorrt / torch model only: {ceilings['tensorrt'][0] / ceilings['torch'][0]:.2f}x")
    else:
        lines.append("tensorrt: not installed here (pip install 'cxr-ray[tensorrt]'), skipped")
    table = "\n".join(lines)
    print(f"\n{gpu_name} x {gpus}, TensorRT precision {args.precision}\n{table}")

    if args.append_results:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        with RESULTS.open("a") as f:
            f.write(
                f"\n## gpu_throughput.py, {stamp}\n\n{gpus} x {gpu_name}, {platform.node()}, "
                f"{os.cpu_count()} CPUs, {len(files)} images, model {card.version}, "
                f"batch {args.batch}, TensorRT {args.precision}\n\n```\n{table}\n```\n"
            )
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
