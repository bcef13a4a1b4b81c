"""Ray Train entry point: fine-tune with a recipe and write a model artifact.

The training code is the library's (``cxr_ray.training.trainer``: ``train_loop_per_worker``,
the ``TorchTrainer`` and ``train``); this file is the thin script form of ``cxr-ray train``::

    python -m trainers.cxr_trainer --config trainers/recipes/mobilenet_v2_cpu.toml \\
        ../shared/data/kermany224 --out artifacts/mnv2-cpu
"""

from __future__ import annotations

import sys

from cxr_ray.training.trainer import build_trainer, train, train_loop_per_worker

__all__ = ["build_trainer", "train", "train_loop_per_worker"]


def main(argv: list[str] | None = None) -> int:
    """``cxr-ray train`` with the recipe options; ``--config FILE`` may come first."""
    from cxr_ray.cli import run_command

    args = list(sys.argv[1:] if argv is None else argv)
    config: list[str] = []
    if args[:1] == ["--config"] and len(args) > 1:
        config, args = args[:2], args[2:]
    return run_command([*config, "train", *args])


if __name__ == "__main__":
    sys.exit(main())
