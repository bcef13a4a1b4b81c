"""Reduced-resolution DICOM decode vs the full-resolution path, per transfer syntax.

    python benchmarks/dicom_agreement.py [--images 479] [--model /work/art/mnv2]
                                         [--variants jpeg-baseline,j2k,...] [--oversample 2,4]
                                         [--min-side 1792]

Every full-resolution Kermany original in ../shared/data/kermany-fullres (479 JPEGs) is
written as a DICOM in each of ``tests.dicom_factory.SYNTAX_VARIANTS`` (JPEG baseline, JPEG
extended 8 and 12 bit, JPEG-LS, JPEG 2000 lossless and lossy, RLE, uncompressed 8 bit, 12 bit
MONOCHROME1, 12 bit with a rescale and a clipping window, 12 bit with a VOI LUT table),
then decoded and preprocessed twice by ``cxr_ray.imaging.preprocess.decode``: the old path
(``dicom_full=True``: full-resolution decode, LUTs, resize) and the reduced one (for each
``--oversample``), and both are scored by the artifact with the onnxruntime fp32 engine.

Prints per variant and oversample: argmax agreement (bar >= 0.995), |dP(pneumonia)| max,
p99 and the share of images within 0.02 (bar >= 0.99), the mean and max absolute difference
of the preprocessed 224 px images (0..255), decode + preprocess ms/image old vs new, and how
many images were large enough to be reduced at all (``k>=2``: at least 2 x 2 source pixels
per reduced pixel; the rest take the reduced path's decoder at full size, or the old path).
``--min-side 1792`` keeps only the originals large enough to be reduced at the default
oversample (19 of the 479; the median original is 1368 x 944). One process, one core's
worth of decode work at a time; timings move with the machine's load, compare the ratios
within one run. Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.dicom_factory

DATA = ROOT.parent / "shared" / "data" / "kermany-fullres"
DEFAULT_MODEL = "/work/art/mnv2"
BATCH = 64


@dataclasses.dataclass
class Arm:
    pixels: list[np.ndarray] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    reduced: int = 0  # images large enough for a reduction (2 x 2 blocks or more)


def engine_for(art: Any, cache: str) -> Any:
    from cxr_ray.config import ScoreSettings
    from cxr_ray.engines import build, engine_options, prepare
    from cxr_ray.models.card import spec_for

    opts = engine_options(ScoreSettings(cache_dir=cache, engine="onnxruntime"))
    return build(prepare(art, "onnxruntime", opts, spec_for(art.card))[0])


def probabilities(art: Any, run: Any, pixels: list[np.ndarray]) -> np.ndarray:
    from cxr_ray.imaging.preprocess import to_model_input

    x = np.stack(pixels)
    logits = np.concatenate([run(to_model_input(x[i : i + BATCH]))[0] for i in range(0, len(x), BATCH)])
    return np.asarray(art.card.probabilities(logits), dtype=np.float64)


def decode_arms(jpegs: list[bytes], variant: str, spec: Any, oversamples: list[int]) -> dict[str, Arm]:
    from cxr_ray.imaging import dicom_reduced
    from cxr_ray.imaging.preprocess import decode
    from tests import dicom_factory

    arms = {"old": Arm(), **{f"new x{o}": Arm() for o in oversamples}}
    default = dicom_reduced.DEFAULT_OVERSAMPLE
    for i, jpeg in enumerate(jpegs):
        data = dicom_factory.make_syntax(jpeg, dicom_factory.Tags(), variant)
        t = time.perf_counter()
        arms["old"].pixels.append(decode(data, spec, dicom_full=True).pixels)
        arms["old"].seconds += time.perf_counter() - t
        for o in oversamples:
            dicom_reduced.DEFAULT_OVERSAMPLE = o
            t = time.perf_counter()
            out = decode(data, spec)
            arms[f"new x{o}"].seconds += time.perf_counter() - t
            arms[f"new x{o}"].pixels.append(out.pixels)
            need = (o * spec.width, o * spec.height)
            arms[f"new x{o}"].reduced += dicom_reduced.block_factor(out.width, out.height, need) >= 2
        if i % 100 == 99:
            print(f"  {variant}: {i + 1}/{len(jpegs)}", file=sys.stderr, flush=True)
    dicom_reduced.DEFAULT_OVERSAMPLE = default
    return arms


def report(variant: str, arms: dict[str, Arm], probs: dict[str, np.ndarray]) -> list[str]:
    n = len(arms["old"].pixels)
    ref, ref_px = probs["old"], np.stack(arms["old"].pixels).astype(np.int16)
    old_ms = arms["old"].seconds / n * 1000
    lines = []
    for name, arm in arms.items():
        if name == "old":
            continue
        p = probs[name]
        dp = np.abs(p[:, 1:].sum(1) - ref[:, 1:].sum(1))
        px = np.abs(np.stack(arm.pixels).astype(np.int16) - ref_px)
        ms = arm.seconds / n * 1000
        agree = float((p.argmax(1) == ref.argmax(1)).mean())
        within = float((dp <= 0.02).mean())
        ok = "ok" if agree >= 0.995 and within >= 0.99 else "FAIL"
        lines.append(
            f"{variant:27s} {name:7s} {n:4d} {agree:7.4f} {dp.max():7.4f} {np.quantile(dp, 0.99):7.4f} "
            f"{within:7.4f} {px.mean():6.2f} {px.max():4d} {old_ms:7.1f} {ms:7.1f} {old_ms / ms:6.2f}x "
            f"{arm.reduced:4d} {ok}"
        )
    return lines


def main() -> None:
    from tests import dicom_factory

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=479)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--min-side", type=int, default=0, help="only originals with a shorter side this long")
    ap.add_argument("--variants", default=",".join(dicom_factory.SYNTAX_VARIANTS))
    ap.add_argument("--oversample", default=None, help="comma-separated reduced-decode oversampling factors")
    args = ap.parse_args()

    from cxr_ray.models.artifact import load_artifact
    from cxr_ray.models.card import spec_for

    files = sorted(Path(args.data).rglob("*.jpeg"))
    if args.min_side:  # only originals large enough to be reduced (the 2-3k px of a CR/DX export)
        from PIL import Image

        files = [f for f in files if min(Image.open(f).size) >= args.min_side]
    if 0 < args.images < len(files):  # evenly spaced, so both classes are in a subset
        files = [files[i * len(files) // args.images] for i in range(args.images)]
    if not files:
        sys.exit(f"no images under {args.data}: the benchmark needs ../shared/data/kermany-fullres")
    jpegs = [f.read_bytes() for f in files]
    art = load_artifact(args.model)
    spec = spec_for(art.card)
    from cxr_ray.imaging.dicom_reduced import DEFAULT_OVERSAMPLE

    oversamples = [int(o) for o in (args.oversample or str(DEFAULT_OVERSAMPLE)).split(",")]
    print(
        f"{len(jpegs)} full-resolution originals, model {art.card.version} "
        f"at {spec.width}px, onnxruntime fp32"
    )
    header = (
        f"{'variant':27s} {'arm':7s} {'n':>4s} {'argmax':>7s} {'dPmax':>7s} {'dPp99':>7s} {'<=0.02':>7s} "
        f"{'pxmean':>6s} {'pxmx':>4s} {'old_ms':>7s} {'new_ms':>7s} {'speed':>7s} {'k>=2':>4s}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        run = engine_for(art, cache)
        for variant in args.variants.split(","):
            arms = decode_arms(jpegs, variant, spec, oversamples)
            probs = {name: probabilities(art, run, arm.pixels) for name, arm in arms.items()}
            rows += report(variant, arms, probs)
            print("\n".join([header, *rows[-len(oversamples) :]]), flush=True)
    print("\nsummary (decode + preprocess ms/image; bars: argmax >= 0.995, |dP| <= 0.02 for >= 99%)")
    print("\n".join([header, *rows]))


if __name__ == "__main__":
    main()
