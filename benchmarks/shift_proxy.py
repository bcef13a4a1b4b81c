"""How a trained artifact holds up under acquisition shift, on its own validation images.

    python benchmarks/shift_proxy.py ARTIFACT [ARTIFACT ...] [--tta]

The official Kermany test split is held out, and it is known to differ from train (models
fitted to train over-call pneumonia on its normals). As a proxy, each validation image (the
patient-grouped split recorded in ARTIFACT/split.parquet) is re-rendered the way another
site or device might: darker or brighter gamma, flatter contrast, heavy JPEG compression,
blur, a smaller source image. The shift is applied to the decoded grayscale image before the
model's own preprocessing (so an ``equalize`` model gets to undo what it can). Prints
3-class accuracy, macro-F1, pneumonia sensitivity and specificity per condition.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from PIL import Image, ImageFilter, ImageOps

from cxr_ray import metrics
from cxr_ray.config import ScoreSettings
from cxr_ray.engines import build, engine_options, prepare
from cxr_ray.imaging.preprocess import PreprocessSpec, decode, to_model_input
from cxr_ray.io import storage
from cxr_ray.labels import LABELS
from cxr_ray.models.artifact import load_artifact
from cxr_ray.models.card import spec_for


def _gamma(g: float) -> Callable[[Image.Image], Image.Image]:
    lut = [round(255 * (i / 255) ** g) for i in range(256)]
    return lambda im: im.point(lut)


def _jpeg(q: int) -> Callable[[Image.Image], Image.Image]:
    def f(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=q)
        return Image.open(buf).convert("L")

    return f


SHIFTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": lambda im: im,
    "gamma 0.6 (brighter)": _gamma(0.6),
    "gamma 1.6 (darker)": _gamma(1.6),
    "contrast x0.6": lambda im: im.point(lambda v: round(128 + (v - 128) * 0.6 + 15)),
    "JPEG quality 30": _jpeg(30),
    "blur sigma 1.5": lambda im: im.filter(ImageFilter.GaussianBlur(1.5)),
    "downsample to 112 and back": lambda im: im.resize((112, 112)).resize(im.size),
    "autocontrast (cutoff 2%)": lambda im: ImageOps.autocontrast(im, cutoff=2),
}


def evaluate(artifact: str, tta: bool = False, limit: int | None = None) -> list[tuple[str, metrics.Metrics]]:
    art = load_artifact(artifact)
    split = storage.read_table(storage.join(artifact, "split.parquet"))
    val = split.filter(pc.equal(split["split"], "val"))
    if limit:
        val = val.slice(0, limit)
    raw_spec = PreprocessSpec(*art.card.input_size)  # geometry only; intensity after the shift
    model_spec = spec_for(art.card)
    raws = [decode(storage.read_bytes(u), raw_spec).pixels for u in val["uri"].to_pylist()]
    y = np.array([LABELS.index(v) for v in val["label"].to_pylist()])
    engine = build(prepare(art, "onnxruntime", engine_options(ScoreSettings()), model_spec)[0])
    out = []
    for name, shift in SHIFTS.items():
        pix = []
        for r in raws:
            im = shift(Image.fromarray(r))
            if model_spec.intensity == "equalize":
                im = ImageOps.equalize(im)
            pix.append(np.asarray(im, dtype=np.uint8))
        x = to_model_input(np.stack(pix))
        probs = np.concatenate(
            [art.card.probabilities(engine(x[i : i + 128])[0]) for i in range(0, len(x), 128)]
        )
        if tta:  # small shifts of the same image, averaged
            for dx in (-6, 6):
                xs = np.roll(x, dx, axis=3)
                probs += np.concatenate(
                    [art.card.probabilities(engine(xs[i : i + 128])[0]) for i in range(0, len(xs), 128)]
                )
            probs /= 3
        out.append((name, metrics.classification_metrics(y, probs, threshold=art.card.pneumonia_threshold)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--tta", action="store_true", help="average over 3 horizontally shifted views")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    for artifact in args.artifacts:
        print(f"\n{Path(artifact).name}  ({load_artifact(artifact).card.version}, tta={args.tta})")
        print(f"{'condition':<30} {'acc':>6} {'mF1':>6} {'sens':>6} {'spec':>6} {'AUROC':>6}")
        for name, m in evaluate(artifact, args.tta, args.limit):
            b = m.binary
            print(
                f"{name:<30} {m.accuracy:>6.3f} {m.macro_f1:>6.3f} {b['sensitivity_at_threshold']:>6.3f} "
                f"{b['specificity_at_threshold']:>6.3f} {b['auroc']:>6.3f}"
            )


if __name__ == "__main__":
    main()
