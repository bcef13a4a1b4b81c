"""CPU engines: onnxruntime fp32 vs OpenVINO fp32 / bf16, model only and end to end, one run.

    python benchmarks/cpu_engines.py [--images 479] [--model /tmp/demo_new/model] [--reps 2]

On the same full-resolution Kermany JPEGs (../shared/data/kermany-fullres: the 479 originals
by default, hard-linked repeatedly into a temp folder to reach --images) and the artifact's
own validation images (its split.parquet), measures in one run:

  (a) model only: img/s on preprocessed batches of 64 (decoded from those JPEGs) for
      onnxruntime fp32 and OpenVINO fp32 and bf16, at 1 and 2 threads, the configurations
      interleaved --reps times (median reported);
  (b) end to end: cxr_ray.scoring.pipeline.score with score.engine = onnxruntime (fp32) and
      openvino (bf16 where the CPU has it), default settings otherwise, a fresh local Ray per
      run, alternated --reps times; each run and the openvino / onnxruntime ratio;
  (c) agreement on the artifact's validation images: argmax agreement of OpenVINO bf16 (and
      fp32) with onnxruntime fp32 on calibrated probabilities (card.probabilities), max and
      mean |dp|, and each engine's accuracy against the labels.

Not a test: numbers depend on the machine and its load (printed with `uptime` before/after).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
from _common import replicate, timed_score

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kermany-fullres"
DEFAULT_MODEL = "/tmp/demo_new/model"
BATCH = 64


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def engine_for(art: Any, cache: str, engine: str, threads: int, **score: Any) -> Any:
    from cxr_ray.config import ScoreSettings
    from cxr_ray.engines import build, engine_options, prepare
    from cxr_ray.models.card import spec_for

    opts = dataclasses.replace(engine_options(ScoreSettings(cache_dir=cache, **score)), threads=threads)
    return build(prepare(art, engine, opts, spec_for(art.card))[0])


def model_only(art: Any, cache: str, x: np.ndarray, reps: int) -> list[tuple[str, float]]:
    """Median img/s per configuration on batches of 64, configurations interleaved."""
    configs = {
        f"{name}, {t} thread{'s' if t > 1 else ''}": (engine, t, score)
        for t in (1, 2)
        for name, engine, score in (
            ("onnxruntime fp32", "onnxruntime", {}),
            ("openvino fp32", "openvino", {"openvino_precision": "fp32"}),
            ("openvino bf16", "openvino", {"openvino_precision": "bf16"}),
        )
    }
    engines = {k: engine_for(art, cache, e, t, **s) for k, (e, t, s) in configs.items()}
    for run in engines.values():
        run(x[:8])  # warm-up: first-call allocations
    speeds: dict[str, list[float]] = {k: [] for k in engines}
    batches = max(1, len(x) // BATCH)
    for _ in range(reps):
        for k, run in engines.items():
            t = time.perf_counter()
            for b in range(batches):
                run(x[b * BATCH : (b + 1) * BATCH])
            speeds[k].append(batches * BATCH / (time.perf_counter() - t))
    return [(k, statistics.median(v)) for k, v in speeds.items()]


def agreement(art: Any, cache: str) -> dict[str, Any]:
    """OpenVINO (bf16, fp32) against onnxruntime fp32 on the artifact's validation images."""
    from cxr_ray.imaging.preprocess import to_model_input
    from cxr_ray.labels import LABELS
    from cxr_ray.models.outputs import split_images

    pixels, labels = split_images(art, "val")
    y = np.array([LABELS.index(lbl) if lbl in LABELS else -1 for lbl in labels])

    def run_all(run: Any) -> tuple[np.ndarray, np.ndarray]:
        outs = [run(to_model_input(pixels[i : i + BATCH])) for i in range(0, len(pixels), BATCH)]
        logits = np.concatenate([o[0] for o in outs])
        features = np.concatenate([o[1] for o in outs]).astype(np.float64)
        return np.asarray(art.card.probabilities(logits), dtype=np.float64), features

    ref, ref_f = run_all(engine_for(art, cache, "onnxruntime", 2))
    out: dict[str, Any] = {"images": len(pixels), "labelled": int((y >= 0).sum())}
    out["onnxruntime fp32"] = {"accuracy": float((ref.argmax(1) == y)[y >= 0].mean())}
    for precision in ("bf16", "fp32"):
        p, f = run_all(engine_for(art, cache, "openvino", 2, openvino_precision=precision))
        d = np.abs(p - ref)
        rel = np.linalg.norm(f - ref_f, axis=1) / np.maximum(1e-12, np.linalg.norm(ref_f, axis=1))
        mean_rel = np.linalg.norm(f.mean(0) - ref_f.mean(0)) / np.linalg.norm(ref_f.mean(0))
        out[f"openvino {precision}"] = {
            "argmax_agreement": float((p.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_dp": float(d.max()),
            "mean_abs_dp": float(d.mean()),
            "accuracy": float((p.argmax(1) == y)[y >= 0].mean()),
            "features_rel_l2_median": float(np.median(rel)),
            "features_rel_l2_max": float(rel.max()),
            "features_mean_rel_l2": float(mean_rel),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=479, help="JPEGs per end-to-end run (479 originals)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="artifact with a split.parquet")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--reps", type=int, default=2, help="end-to-end runs per engine (alternated)")
    ap.add_argument("--model-batches", type=int, default=4, help="batches of 64 per model-only timing")
    args = ap.parse_args()

    from cxr_ray.config import load_settings
    from cxr_ray.engines.openvino_engine import native_bf16
    from cxr_ray.imaging.preprocess import decode, to_model_input
    from cxr_ray.models.artifact import load_artifact
    from cxr_ray.models.card import spec_for

    load_before = uptime()
    print(f"uptime before: {load_before}")
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        files = replicate(Path(args.data), tmpd / "images", args.images)
        art = load_artifact(args.model)
        spec = spec_for(art.card)
        cache = str(tmpd / "cache")
        bf16 = native_bf16()
        print(
            f"{len(files)} full-resolution JPEGs, model {art.card.version} at {spec.height}px, "
            f"{os.cpu_count()} CPUs, native bf16: {bf16}"
        )
        n_model = args.model_batches * BATCH
        pix = np.stack([decode(files[i % len(files)].read_bytes(), spec).pixels for i in range(n_model)])
        x = to_model_input(pix)

        speeds = model_only(art, cache, x, reps=3)  # also exports the ONNX model once (cached)
        agree = agreement(art, cache)

        runs: dict[str, list[Any]] = {"onnxruntime": [], "openvino": []}
        settings = {
            "onnxruntime": load_settings(None, {"score": {"cache_dir": cache, "engine": "onnxruntime"}}),
            "openvino": load_settings(
                None, {"score": {"cache_dir": cache, "engine": "openvino", "openvino_precision": "bf16"}}
            ),
        }
        for rep in range(args.reps):
            for name in ("onnxruntime", "openvino"):
                t = timed_score(str(tmpd / "images"), args.model, str(tmpd / f"{name}-{rep}"), settings[name])
                assert t.result.images == len(files), (t.result.images, len(files))
                runs[name].append(t)
                print(
                    f"  e2e {name:<12} run {rep + 1}: {t.end_to_end:6.1f} img/s end to end, "
                    f"{t.steady:6.1f} steady, first rows {t.first_rows_s:5.1f} s, precision "
                    f"{t.result.engine_precision}, rows {t.result.images} ({t.result.ok} ok)"
                )
        load_after = uptime()

    print(f"\n(a) model only, batch {BATCH}, {n_model} preprocessed images, median of 3 interleaved")
    base = dict(speeds)
    for name, v in speeds:
        ref = base[f"onnxruntime fp32, {name.split(', ')[1]}"]
        print(f"  {name:<32} {v:7.1f} img/s  ({v / ref:.2f}x onnxruntime fp32, same threads)")

    print("\n(b) end to end, score() on a fresh local Ray, default settings (1 actor, 1 thread)")
    e2e = {k: [t.end_to_end for t in v] for k, v in runs.items()}
    steady = {k: [t.steady for t in v] for k, v in runs.items()}
    for k in runs:
        print(
            f"  {k:<12} end to end {', '.join(f'{v:.1f}' for v in e2e[k])} img/s; "
            f"steady {', '.join(f'{v:.1f}' for v in steady[k])}"
        )
    pairs = [o / max(r, 1e-9) for o, r in zip(e2e["openvino"], e2e["onnxruntime"], strict=True)]
    spairs = [o / max(r, 1e-9) for o, r in zip(steady["openvino"], steady["onnxruntime"], strict=True)]
    of_means = statistics.mean(e2e["openvino"]) / max(1e-9, statistics.mean(e2e["onnxruntime"]))
    print(
        f"  openvino / onnxruntime, per alternated pair: end to end {', '.join(f'{p:.2f}' for p in pairs)}"
        f" (ratio of means {of_means:.2f}); "
        f"steady {', '.join(f'{p:.2f}' for p in spairs)}"
    )

    print(f"\n(c) agreement with onnxruntime fp32 on {agree['images']} validation images")
    print(f"  onnxruntime fp32: accuracy {agree['onnxruntime fp32']['accuracy']:.4f}")
    for k in ("openvino bf16", "openvino fp32"):
        v = agree[k]
        print(
            f"  {k}: argmax agreement {v['argmax_agreement']:.4f}, max |dp| {v['max_abs_dp']:.4f}, "
            f"mean |dp| {v['mean_abs_dp']:.5f}, accuracy {v['accuracy']:.4f}"
        )
        print(
            f"    features: relative L2 error per image median {v['features_rel_l2_median']:.4f}, max "
            f"{v['features_rel_l2_max']:.4f}; of the mean feature vector {v['features_mean_rel_l2']:.4f}"
        )
    print(f"\nuptime before: {load_before}\nuptime after:  {load_after}")


if __name__ == "__main__":
    main()
