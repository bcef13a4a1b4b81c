"""Training step throughput of the default recipe in fp32 and in bf16 autocast (not a test).

    python benchmarks/train_precision.py [--arch mobilenet_v2] [--steps 12] [--rounds 3] [--threads 1]

What one Ray Train worker of the default recipe does per step (``cxr_ray.training.loop.
train_step``: the recipe's frozen blocks, AdamW param groups, class weights, gradient
clipping, the training augmentation, channels_last, batch 32), on real Kermany 224 px
images when ``../shared/data`` is there (random pixels otherwise: the speed does not depend on
the content). fp32 and bf16 alternate, ``--rounds`` times each, so a machine whose speed drifts
affects both; prints images/s per round and the bf16 / fp32 ratio within the run. Also prints
the validation-style inference throughput (``loop.predict``) in both precisions.
``--threads 1`` matches a worker holding 1 CPU (the recipe's ``cpus_per_worker``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from cxr_ray.config import TrainSettings
from cxr_ray.models.factory import create_model
from cxr_ray.training import loop, recipe
from cxr_ray.training.augment import TrainAugment

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany224" / "train"


def real_batch(n: int) -> torch.Tensor:
    from PIL import Image

    files = sorted(DATA.glob("*/*.jpeg"))[:: max(1, len(list(DATA.glob("*/*.jpeg"))) // n)][:n]
    if len(files) < n:
        return torch.randint(0, 256, (n, 224, 224), dtype=torch.uint8)
    arr = [np.asarray(Image.open(f).convert("L").resize((224, 224))) for f in files]
    return torch.from_numpy(np.stack(arr))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mobilenet_v2")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainSettings()
    device = torch.device("cpu")
    print(
        f"cpu bf16 native: {loop.cpu_bf16_native()}; "
        f"auto resolves to {loop.resolve_precision(device, 'auto')}"
    )
    pixels = real_batch(cfg.batch_size)
    y = torch.arange(cfg.batch_size) % 3
    augment = TrainAugment(**cfg.augment.model_dump())
    nets = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        net = create_model(args.arch, pretrained=False).to(memory_format=torch.channels_last)
        frozen = recipe.freeze_blocks(net, args.arch, cfg.frozen_blocks)
        opt, _ = recipe.optimization(net, args.arch, cfg, steps=100)
        nets[precision] = (net, frozen, opt)
    weights = recipe.class_weights([1341, 2530, 1345])
    train: dict[str, list[float]] = {"fp32": [], "bf16": []}
    infer: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        for precision in ("fp32", "bf16"):
            net, frozen, opt = nets[precision]
            net.train()
            for b in frozen:
                b.eval()
            x = loop.to_input(pixels, device)
            loop.train_step(
                net, augment(x), y, opt, weights=weights, grad_clip=cfg.grad_clip, precision=precision
            )
            t = time.perf_counter()
            for _ in range(args.steps):
                xa = augment(loop.to_input(pixels, device))
                loop.train_step(
                    net, xa, y, opt, weights=weights, grad_clip=cfg.grad_clip, precision=precision
                )
            train[precision].append(args.steps * cfg.batch_size / (time.perf_counter() - t))
            batches = [{"pixels": pixels, "label": y}] * args.steps
            t = time.perf_counter()
            loop.predict(net, batches, device=device, precision=precision)
            infer[precision].append(args.steps * cfg.batch_size / (time.perf_counter() - t))
        print(
            f"round {r}: train fp32 {train['fp32'][-1]:.1f} img/s, bf16 {train['bf16'][-1]:.1f} img/s "
            f"({train['bf16'][-1] / train['fp32'][-1]:.2f}x); inference fp32 {infer['fp32'][-1]:.1f}, "
            f"bf16 {infer['bf16'][-1]:.1f} ({infer['bf16'][-1] / infer['fp32'][-1]:.2f}x)"
        )
    tr = float(np.median(np.array(train["bf16"]) / np.array(train["fp32"])))
    inf = float(np.median(np.array(infer["bf16"]) / np.array(infer["fp32"])))
    print(f"median over {args.rounds} rounds: training bf16/fp32 {tr:.2f}x, inference bf16/fp32 {inf:.2f}x")


if __name__ == "__main__":
    main()
