"""End-to-end scoring throughput on full-resolution X-rays: cxr-ray vs a naive loop.

    python benchmarks/score_throughput.py [--images 2000] [--model ARTIFACT] [--int8] [--onnxruntime]

Uses ../shared/data/kermany-fullres (original-resolution JPEGs), hard-linked into a temp
folder until there are at least --images files. Measured in one run, on one machine:

  naive      one process: PIL full decode -> resize -> torch eager, batch 32
  cxr-ray    cxr_ray.scoring.pipeline.score on a local Ray, default settings: engine auto, which
             on CPUs picks the fastest engine whose agreement check with fp32 on the artifact's
             validation images passes (cxr_ray.engines.choice; checked and cached before timing)
  --onnxruntime  also score with engine = onnxruntime (fp32), the fallback, in the same run
  --int8     the same with score.onnx_precision = "int8" (opt-in; quantized before timing)
  ceilings   decode-only img/s on one core (full decode and cxr-ray's draft decode) and
             model-only img/s (torch eager and onnxruntime) on preprocessed batches

Prints img/s, the cxr-ray/naive ratio and the fixed start-up overhead (time to first rows,
Ray already running); the last lines: the default engine's end-to-end ratio to the naive loop
and its agreement check. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import torch
from _common import mobilenet_artifact, replicate, timed_score
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kermany-fullres"


def naive(files: list[Path], net: torch.nn.Module, size: int, batch: int = 32) -> float:
    start = time.perf_counter()
    buf: list[np.ndarray] = []
    with torch.inference_mode():
        for i, f in enumerate(files):
            im = Image.open(f).convert("L").resize((size, size), Image.Resampling.BILINEAR)
            buf.append(np.asarray(im))
            if len(buf) == batch or i == len(files) - 1:
                x = torch.from_numpy(np.stack(buf)).float().div(255).unsqueeze(1)
                net(x).softmax(1)
                buf = []
    return len(files) / (time.perf_counter() - start)


def decode_ceiling(datas: list[bytes], size: int) -> tuple[float, float]:
    from cxr_ray.imaging.preprocess import PreprocessSpec, decode

    spec = PreprocessSpec(height=size, width=size)
    t = time.perf_counter()
    for d in datas:
        Image.open(io.BytesIO(d)).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    full = len(datas) / (time.perf_counter() - t)
    t = time.perf_counter()
    for d in datas:
        decode(d, spec)
    draft = len(datas) / (time.perf_counter() - t)
    return full, draft


def model_ceiling(artifact: str, size: int, cache: str, engine: str, options: dict | None = None) -> float:
    """Model-only img/s of one engine (engine default threads) on preprocessed batches of 64."""
    from cxr_ray.config import ScoreSettings
    from cxr_ray.engines import build, engine_options, prepare
    from cxr_ray.models.artifact import load_artifact
    from cxr_ray.models.card import spec_for

    x = np.random.rand(64, 1, size, size).astype(np.float32)
    art = load_artifact(artifact)
    # threads=None: the engine's own default (every core), as the ceiling is measured alone.
    opts = dataclasses.replace(
        engine_options(ScoreSettings(cache_dir=cache, **(options or {}))), threads=None
    )
    run = build(prepare(art, engine, opts, spec_for(art.card))[0])
    run(x[:8])
    t = time.perf_counter()
    reps = 4
    for _ in range(reps):
        run(x)
    return 64 * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--model", default=None, help="artifact (default: MobileNetV2, random head)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--int8", action="store_true", help="also score with onnx_precision=int8 (needs --model)")
    ap.add_argument("--onnxruntime", action="store_true", help="also score with engine=onnxruntime (fp32)")
    args = ap.parse_args()

    from cxr_ray.config import load_settings
    from cxr_ray.errors import EngineUnavailableError
    from cxr_ray.models.artifact import load_artifact

    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        files = replicate(Path(args.data), tmpd / "images", args.images)
        artifact = args.model
        if artifact is None:
            artifact = mobilenet_artifact(tmpd / "model")
        art = load_artifact(artifact)
        size = art.card.input_size[0]
        cache = str(tmpd / "cache")
        settings = load_settings(None, {"score": {"cache_dir": cache}})
        print(
            f"{len(files)} full-resolution JPEGs, model {art.card.version} at {size}px, "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
        )

        datas = [f.read_bytes() for f in files[:200]]
        full, draft = decode_ceiling(datas, size)
        m_torch = model_ceiling(artifact, size, cache, "torch")
        m_ort = model_ceiling(artifact, size, cache, "onnxruntime")  # also warms the ONNX cache
        choice = default_engine(art, settings)  # the agreement check runs (and is cached) here
        m_default = None
        if choice.engine == "openvino":
            m_default = model_ceiling(
                artifact, size, cache, "openvino", {"openvino_precision": choice.precision or "fp32"}
            )

        eager = art.build().eval()  # naive() applies the softmax
        base = naive(files, eager, size)

        int8 = None
        if args.int8:
            int8 = load_settings(None, {"score": {"cache_dir": cache, "onnx_precision": "int8"}})
            try:  # quantize (once per model, cached) before timing, as the fp32 export is
                m_int8 = model_ceiling(artifact, size, cache, "onnxruntime", {"onnx_precision": "int8"})
            except EngineUnavailableError as exc:
                print(f"INT8 skipped: {exc}")
                int8 = None

        def timed(run_settings, out: str):
            t = timed_score(str(tmpd / "images"), artifact, str(tmpd / out), run_settings)
            assert t.result.images == len(files), (t.result.images, len(files))
            return t.result, t.end_to_end, t.steady

        result, e2e, steady = timed(settings, "out")
        if args.onnxruntime:
            ort = load_settings(None, {"score": {"cache_dir": cache, "engine": "onnxruntime"}})
            _, e2e_o, steady_o = timed(ort, "out-ort")
        if int8 is not None:
            result8, e2e8, steady8 = timed(int8, "out-int8")

        rows = [
            ("naive loop (PIL full decode + torch eager, batch 32)", base),
            (f"cxr-ray end to end (local Ray, auto: {choice.engine} {choice.precision})", e2e),
            ("cxr-ray after first rows (steady state)", steady),
        ]
        if args.onnxruntime:
            rows += [
                ("cxr-ray end to end, engine onnxruntime fp32", e2e_o),
                ("cxr-ray onnxruntime after first rows (steady)", steady_o),
            ]
        if int8 is not None:
            rows += [
                ("cxr-ray end to end, onnxruntime INT8 (opt-in)", e2e8),
                ("cxr-ray INT8 after first rows (steady state)", steady8),
            ]
        rows += [
            ("ceiling: decode only, PIL full decode, 1 core", full),
            ("ceiling: decode only, cxr-ray draft decode, 1 core", draft),
            ("ceiling: model only, torch eager, batch 64", m_torch),
            ("ceiling: model only, onnxruntime, batch 64", m_ort),
        ]
        if m_default is not None:
            rows.append((f"ceiling: model only, {choice.engine} {choice.precision}, batch 64", m_default))
        if int8 is not None:
            rows.append(("ceiling: model only, onnxruntime INT8, batch 64", m_int8))
        print(f"\n{'what':<56} {'img/s':>8}")
        for name, v in rows:
            print(f"{name:<56} {v:>8.1f}")
        print(f"\ncxr-ray / naive: {e2e / base:.2f}x end to end ({steady / base:.2f}x steady state)")
        if args.onnxruntime:
            print(
                f"onnxruntime fp32 / naive: {e2e_o / base:.2f}x end to end ({steady_o / base:.2f}x steady); "
                f"default / onnxruntime {e2e / max(e2e_o, 1e-9):.2f}x end to end"
            )
        print(f"start-up to first rows (Ray running, ONNX cached): {result.first_row_seconds:.1f} s")
        print(f"rows: {result.images} ({result.ok} ok, {result.errors} errors)")
        if int8 is not None:
            c = result8.int8_check or {}
            print(
                f"INT8: {e2e8 / base:.2f}x naive end to end, start-up {result8.first_row_seconds:.1f} s, "
                f"rows {result8.images} ({result8.ok} ok); vs fp32 on {c.get('images')} validation images: "
                f"argmax agreement {c.get('argmax_agreement', float('nan')):.3f}, mean |dp| "
                f"{c.get('mean_abs_prob_change', float('nan')):.4f}"
            )
            for name in ("fp32", "int8"):
                if name in c:
                    v = c[name]
                    sens, spec = v["sensitivity_at_threshold"], v["specificity_at_threshold"]
                    print(
                        f"  {name}: accuracy {v['accuracy']:.4f}, macro-F1 {v['macro_f1']:.4f}, "
                        f"sensitivity {sens:.4f} / specificity {spec:.4f} at threshold {c['threshold']:.4f}"
                    )
        ran = f"{result.engine} {result.engine_precision}"
        print(f"default engine (auto): {ran}; {agreement_line(result.engine_report.get('choice') or {})}")
        print(
            f"default engine / naive: {e2e / base:.2f}x end to end (goal >= 4.0x), "
            f"{steady / base:.2f}x steady"
        )


def default_engine(art, settings):
    """What ``engine = "auto"`` resolves to for these settings (runs and caches the check)."""
    from cxr_ray.engines import engine_options
    from cxr_ray.engines.base import prepare
    from cxr_ray.models.card import spec_for

    _, report = prepare(
        art, "auto", engine_options(settings.score), spec_for(art.card, settings.data), cpu=True
    )
    return dataclasses.replace(report, drift_reference=None)


def agreement_line(choice: dict) -> str:
    """The agreement check behind the default engine, in one line."""
    checks = choice.get("checks") or []
    if not checks:
        return f"no agreement check ({choice.get('reason')}); onnxruntime fp32 is the reference"
    parts = [
        f"{c['engine']} {c['precision']} {'passed' if c['passed'] else 'failed'}: argmax agreement "
        f"{c['argmax_agreement']:.4f}, max |dp| {c['max_abs_dp']:.4f} on {c['images']} validation images"
        for c in checks
    ]
    return "agreement with onnxruntime fp32 (bar >= 0.995, <= 0.05): " + "; ".join(parts)


if __name__ == "__main__":
    main()
